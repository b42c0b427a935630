//! Data checksums from the csum tree (the read side of the kernel's file-item.c
//! `btrfs_lookup_csums_list` / `search_csum_tree`).
//!
//! EXTENT_CSUM items are keyed (EXTENT_CSUM_OBJECTID, EXTENT_CSUM, logical bytenr) and hold one
//! checksum per sector of consecutive data; items may be split or merged anywhere.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::ctree::Path;
use ubtrfs_format::key::{item, objectid, Key};

/// Checksums of the sectors of `[start, start + nr * sectorsize)`; None where no item covers a
/// sector.
pub fn lookup_csums(fs: &FsInfo, start: u64, nr: usize) -> Result<Vec<Option<Vec<u8>>>> {
    let mut out = vec![None; nr];
    let _g = fs.read_guard();
    let Some(root) = fs.csum_root() else {
        return Ok(out);
    };
    let ss = u64::from(fs.sectorsize());
    let csize = fs.reader.csum_type.size();
    let end = (nr as u64)
        .checked_mul(ss)
        .and_then(|len| start.checked_add(len))
        .ok_or_else(|| {
            FsError::corrupt(format!(
                "checksums of {nr} sectors at logical {start} overflow the address space"
            ))
        })?;
    let key = Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, start);
    let (mut path, found) = Path::search(&fs.reader, &root, &key)?;
    if !found && path.prev_item(&fs.reader)? {
        // The previous item may cover `start`; if it does not, step forward again.
        let covers = match path.item()? {
            Some((k, d)) => {
                k.objectid == objectid::EXTENT_CSUM
                    && k.item_type == item::EXTENT_CSUM
                    && k.offset
                        .checked_add((d.len() / csize) as u64 * ss)
                        .is_none_or(|item_end| item_end > start)
            }
            None => false,
        };
        if !covers && !path.next_item(&fs.reader)? {
            return Ok(out);
        }
    } else if !path.normalize(&fs.reader)? {
        return Ok(out);
    }
    while let Some((k, d)) = path.item()? {
        if k.objectid != objectid::EXTENT_CSUM
            || k.item_type != item::EXTENT_CSUM
            || k.offset >= end
        {
            break;
        }
        if d.len() % csize != 0 || k.offset % ss != 0 {
            return Err(FsError::corrupt(format!(
                "csum item {k}: size {} or offset unaligned",
                d.len()
            )));
        }
        let n_item = (d.len() / csize) as u64;
        // Key offsets come from the disk: an item reaching past u64::MAX is corrupt.
        let item_end = k.offset.checked_add(n_item * ss).ok_or_else(|| {
            FsError::corrupt(format!(
                "csum item {k}: {n_item} sectors overflow the address space"
            ))
        })?;
        let lo = k.offset.max(start);
        let hi = item_end.min(end);
        let mut s = lo;
        while s < hi {
            let i_item = ((s - k.offset) / ss) as usize;
            let i_out = ((s - start) / ss) as usize;
            out[i_out] = Some(d[i_item * csize..(i_item + 1) * csize].to_vec());
            s += ss;
        }
        if !path.next_item(&fs.reader)? {
            break;
        }
    }
    Ok(out)
}
