//! FITRIM (`btrfs_ioctl_fitrim` / `btrfs_trim_fs`): discard device space no chunk uses.
//!
//! The kernel discards two kinds of free space: the free space inside block groups (in the
//! range the caller gives, with the free-space cache and pinned extents kept out) and each
//! device's unallocated space (`btrfs_trim_free_extents`, whatever the range). ubtrfs does
//! the second only: device space outside every DEV_EXTENT holds nothing, now or in the last
//! commit, as long as no chunk is allocated meanwhile, which the exclusive tree lock of a
//! write operation guarantees for the whole scan and discard. Free space inside block groups
//! is left alone: telling it apart from extents freed in the running transaction (still
//! referenced by the committed trees) needs the pinned-extent tracking the kernel has.
//! The reported length is the bytes discarded, as in the kernel.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::volumes::Device;
use ubtrfs_format::items::{DevExtent, DevItem};
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::super_block::{sb_offset, SUPER_INFO_SIZE, SUPER_MIRROR_MAX};

/// `BTRFS_DEVICE_RANGE_RESERVED`: the first MiB of a device is never allocated or trimmed.
const DEVICE_RANGE_RESERVED: u64 = 1 << 20;

/// `struct fstrim_range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FstrimRange {
    pub start: u64,
    pub len: u64,
    pub minlen: u64,
}

impl FstrimRange {
    pub const SIZE: usize = 24;

    pub fn parse(b: &[u8]) -> Option<FstrimRange> {
        let w = |i: usize| -> Option<u64> {
            Some(u64::from_ne_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        Some(FstrimRange {
            start: w(0)?,
            len: w(8)?,
            minlen: w(16)?,
        })
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.start.to_ne_bytes());
        b[8..16].copy_from_slice(&self.len.to_ne_bytes());
        b[16..].copy_from_slice(&self.minlen.to_ne_bytes());
        b
    }
}

/// The unallocated stretches of a device of `size` bytes whose allocated stretches are
/// `used` (sorted by start), from the reserved first MiB on, with the superblock copies cut
/// out (`btrfs_issue_discard` never discards them).
pub fn unallocated(size: u64, used: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut pos = DEVICE_RANGE_RESERVED;
    for &(start, len) in used {
        if start > pos {
            gaps.push((pos, start.min(size)));
        }
        pos = pos.max(start.saturating_add(len));
    }
    if size > pos {
        gaps.push((pos, size));
    }
    // Cut the superblock mirrors out of the gaps.
    let mut out = Vec::new();
    for (mut s, e) in gaps {
        for m in 0..SUPER_MIRROR_MAX {
            let sb = sb_offset(m);
            let sb_end = sb + SUPER_INFO_SIZE as u64;
            if sb_end <= s || sb >= e {
                continue;
            }
            if sb > s {
                out.push((s, sb - s));
            }
            s = sb_end.min(e);
        }
        if e > s {
            out.push((s, e - s));
        }
    }
    out
}

/// `btrfs_ioctl_fitrim` after the capability check: validate `range` as the kernel does and
/// discard every device's unallocated space through `discard(device, offset, len)`; returns
/// the range with `len` = bytes discarded.
pub fn btrfs_trim_fs(
    fs: &FsInfo,
    mut range: FstrimRange,
    discard: impl Fn(&Device, u64, u64) -> std::io::Result<()>,
) -> Result<FstrimRange> {
    if fs.is_readonly() {
        // The kernel trims a read-only mount too, but refuses one whose log was not
        // replayed; ubtrfs keeps to the safe side for every read-only mount.
        return Err(FsError::ReadOnly);
    }
    if range.len < u64::from(fs.sectorsize()) {
        return Err(FsError::Invalid(
            "FITRIM length below the sector size".into(),
        ));
    }
    if range.start == u64::MAX
        || (range.len != u64::MAX && range.start.checked_add(range.len).is_none())
    {
        return Err(FsError::Invalid("FITRIM range overflows".into()));
    }
    let rsv = crate::space_info::MetaRsv {
        items: 0,
        flush: crate::space_info::Flush::Steal,
    };
    let trimmed = fs.write_op_rsv(rsv, |c| {
        let mut trimmed = 0u64;
        for dev in c.fs.reader.devices() {
            let devid = dev.devid;
            let size = match c.lookup(
                objectid::CHUNK_TREE,
                &Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, devid),
            )? {
                Some(d) => {
                    DevItem::parse(&d)
                        .map_err(|e| FsError::corrupt(format!("dev item {devid}: {e}")))?
                        .total_bytes
                }
                None => continue,
            };
            let used: Vec<(u64, u64)> = c
                .items(
                    objectid::DEV_TREE,
                    Key::new(devid, item::DEV_EXTENT, 0),
                    usize::MAX,
                    |k| k.objectid == devid && k.item_type == item::DEV_EXTENT,
                )?
                .into_iter()
                .map(|(k, d)| {
                    DevExtent::parse(&d)
                        .map(|de| (k.offset, de.length))
                        .map_err(|e| FsError::corrupt(format!("dev extent {k}: {e}")))
                })
                .collect::<Result<_>>()?;
            for (off, len) in unallocated(size.min(dev.size), &used) {
                discard(dev, off, len).map_err(|e| {
                    FsError::Tree(ubtrfs_ctree::Error::io(
                        format!("discard {} at {off} len {len}", dev.path.display()),
                        e,
                    ))
                })?;
                trimmed += len;
            }
        }
        Ok(trimmed)
    })?;
    range.len = trimmed;
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: the gaps between device extents start after the reserved first MiB,
    // end at the device size, and leave the superblock copy at 64 MiB alone.
    #[test]
    fn gaps_skip_reserved_and_superblocks() {
        let mib = 1u64 << 20;
        let g = unallocated(128 * mib, &[(mib, 8 * mib), (20 * mib, 10 * mib)]);
        assert_eq!(
            g,
            vec![
                (9 * mib, 11 * mib),
                (30 * mib, 34 * mib),
                (64 * mib + 4096, 64 * mib - 4096),
            ]
        );
        assert_eq!(unallocated(mib, &[]), vec![]);
        let r = FstrimRange {
            start: 1,
            len: 2,
            minlen: 3,
        };
        assert_eq!(FstrimRange::parse(&r.to_bytes()), Some(r));
    }
}
