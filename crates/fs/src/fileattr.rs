//! Inode flags as `chattr`/`lsattr` and `xfs_io chattr` see them (the kernel's
//! `btrfs_fileattr_get` / `btrfs_fileattr_set` in ioctl.c), and the checks the VFS makes on
//! immutable and append-only inodes before it calls a filesystem (`may_open`, `may_delete`,
//! `notify_change`, `vfs_fallocate`, `xattr_permission`, `vfs_link`).
//!
//! A FUSE mount never sets `S_IMMUTABLE` / `S_APPEND` on its kernel inodes (the FUSE protocol
//! carries no inode flags), so the VFS checks never fire on it: the daemon makes them, with
//! the same errno, from the flags in the inode item.
//!
//! On disk the flags are the inode item's `flags` (BTRFS_INODE_*; the high 32 bits are the
//! read-only compat flags such as VERITY), exactly what the kernel writes. Setting the
//! compression flag also writes the `btrfs.compression` property xattr, as the kernel does;
//! clearing both compression flags removes it.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_format::items::{inode_flags as bi, InodeItem, Timespec, ROOT_SUBVOL_RDONLY};

/// `FS_*_FL` (include/uapi/linux/fs.h): the flags word of FS_IOC_GETFLAGS/SETFLAGS.
pub mod fs_fl {
    pub const COMPR: u32 = 0x0000_0004;
    pub const SYNC: u32 = 0x0000_0008;
    pub const IMMUTABLE: u32 = 0x0000_0010;
    pub const APPEND: u32 = 0x0000_0020;
    pub const NODUMP: u32 = 0x0000_0040;
    pub const NOATIME: u32 = 0x0000_0080;
    pub const NOCOMP: u32 = 0x0000_0400;
    pub const DIRSYNC: u32 = 0x0001_0000;
    pub const VERITY: u32 = 0x0010_0000;
    pub const NOCOW: u32 = 0x0080_0000;
    pub const DAX: u32 = 0x0200_0000;
    pub const PROJINHERIT: u32 = 0x2000_0000;
    /// `FS_COMMON_FL`: the flags that have an `FS_XFLAG_*` twin.
    pub const COMMON: u32 = SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME | DAX | PROJINHERIT;
}

/// `FS_XFLAG_*`: the flags word of FS_IOC_FSGETXATTR/FSSETXATTR.
pub mod xflag {
    pub const IMMUTABLE: u32 = 0x0000_0008;
    pub const APPEND: u32 = 0x0000_0010;
    pub const SYNC: u32 = 0x0000_0020;
    pub const NOATIME: u32 = 0x0000_0040;
    pub const NODUMP: u32 = 0x0000_0080;
    pub const PROJINHERIT: u32 = 0x0000_0200;
    pub const DAX: u32 = 0x0000_8000;
    /// `FS_XFLAG_COMMON`.
    pub const COMMON: u32 = SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME | DAX | PROJINHERIT;
}

/// BTRFS_INODE_RO_VERITY, in the high half of the item's flags.
const RO_VERITY: u64 = 1 << 32;

const FL_XFLAG: [(u32, u32); 7] = [
    (fs_fl::SYNC, xflag::SYNC),
    (fs_fl::IMMUTABLE, xflag::IMMUTABLE),
    (fs_fl::APPEND, xflag::APPEND),
    (fs_fl::NODUMP, xflag::NODUMP),
    (fs_fl::NOATIME, xflag::NOATIME),
    (fs_fl::DAX, xflag::DAX),
    (fs_fl::PROJINHERIT, xflag::PROJINHERIT),
];

/// `btrfs_inode_flags_to_fsflags`.
pub fn fsflags_of(flags: u64) -> u32 {
    let mut f = 0;
    for (b, fl) in [
        (bi::SYNC, fs_fl::SYNC),
        (bi::IMMUTABLE, fs_fl::IMMUTABLE),
        (bi::APPEND, fs_fl::APPEND),
        (bi::NODUMP, fs_fl::NODUMP),
        (bi::NOATIME, fs_fl::NOATIME),
        (bi::DIRSYNC, fs_fl::DIRSYNC),
        (bi::NODATACOW, fs_fl::NOCOW),
        (RO_VERITY, fs_fl::VERITY),
    ] {
        if flags & b != 0 {
            f |= fl;
        }
    }
    if flags & bi::NOCOMPRESS != 0 {
        f |= fs_fl::NOCOMP;
    } else if flags & bi::COMPRESS != 0 {
        f |= fs_fl::COMPR;
    }
    f
}

/// `fileattr_fill_flags`: the xflags that mirror `fsflags`.
pub fn xflags_of(fsflags: u32) -> u32 {
    FL_XFLAG
        .iter()
        .filter(|(f, _)| fsflags & f != 0)
        .fold(0, |a, (_, x)| a | x)
}

/// `fileattr_fill_xflags`: the fsflags that mirror `xflags`.
pub fn fsflags_of_xflags(xflags: u32) -> u32 {
    FL_XFLAG
        .iter()
        .filter(|(_, x)| xflags & x != 0)
        .fold(0, |a, (f, _)| a | f)
}

/// `struct fsxattr` (28 bytes, native endian as every ioctl argument).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsXattr {
    pub xflags: u32,
    pub extsize: u32,
    pub nextents: u32,
    pub projid: u32,
    pub cowextsize: u32,
}

impl FsXattr {
    pub const SIZE: usize = 28;

    pub fn parse(b: &[u8]) -> Option<FsXattr> {
        if b.len() < Self::SIZE {
            return None;
        }
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(FsXattr {
            xflags: w(0),
            extsize: w(4),
            nextents: w(8),
            projid: w(12),
            cowextsize: w(16),
        })
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        for (i, v) in [
            self.xflags,
            self.extsize,
            self.nextents,
            self.projid,
            self.cowextsize,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// What a set request carries: FS_IOC_SETFLAGS's flags word or FS_IOC_FSSETXATTR's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAttrSet {
    Flags(u32),
    Fsx(FsXattr),
}

/// FS_IOC_GETFLAGS of `ino`.
pub fn btrfs_fileattr_get(fs: &FsInfo, root: u64, ino: u64) -> Result<u32> {
    Ok(fsflags_of(crate::inode::read_inode(fs, root, ino)?.flags))
}

/// FS_IOC_FSGETXATTR of `ino`: btrfs fills only the flags (`fileattr_fill_flags`).
pub fn btrfs_fsxattr_get(fs: &FsInfo, root: u64, ino: u64) -> Result<FsXattr> {
    Ok(FsXattr {
        xflags: xflags_of(btrfs_fileattr_get(fs, root, ino)?),
        ..FsXattr::default()
    })
}

/// `check_fsflags`.
fn check_fsflags(old: u32, new: u32) -> Result<()> {
    use fs_fl::*;
    let known = IMMUTABLE | APPEND | NOATIME | NODUMP | SYNC | DIRSYNC | NOCOMP | COMPR | NOCOW;
    if new & !known != 0 {
        return Err(FsError::Unsupported(format!(
            "inode flags {:#x}",
            new & !known
        )));
    }
    let both = |f: u32, a: u32, b: u32| f & a != 0 && f & b != 0;
    let bad = both(new, NOCOMP, COMPR)
        || both(new, COMPR, NOCOW)
        || (old & NOCOW != 0 && new & (COMPR | NOCOMP) != 0)
        || (new & NOCOW != 0 && old & (COMPR | NOCOMP) != 0);
    if bad {
        return Err(FsError::Invalid(format!(
            "inode flags {new:#x} over {old:#x}: NOCOW and compression exclude each other"
        )));
    }
    Ok(())
}

/// `btrfs_mask_fsflags_for_type`.
fn mask_for_type(mode: u32, f: u32) -> u32 {
    use crate::inode::{S_IFDIR, S_IFMT, S_IFREG};
    match mode & S_IFMT {
        S_IFDIR => f,
        S_IFREG => f & !fs_fl::DIRSYNC,
        _ => f & (fs_fl::NODUMP | fs_fl::NOATIME),
    }
}

const COMPRESSION_PROP: &[u8] = b"btrfs.compression";

/// `btrfs_fileattr_set` after the VFS's checks (owner, CAP_LINUX_IMMUTABLE), which the kernel
/// makes before the request reaches the daemon. FS_IOC_FSSETXATTR changes only the flags with
/// an xflag twin; fields btrfs has no place for (extent size hints, project id, other xflags)
/// give EOPNOTSUPP, as `fileattr_has_fsx` does.
pub fn btrfs_fileattr_set(fs: &FsInfo, root: u64, ino: u64, set: FileAttrSet) -> Result<()> {
    if fs.root(root)?.item.flags & ROOT_SUBVOL_RDONLY != 0 {
        return Err(FsError::ReadOnly);
    }
    // NOCOW can change only while a regular file has no data: its size as the file sees it,
    // data not yet written back included.
    let mut live = crate::inode::read_inode(fs, root, ino)?;
    crate::file_write::live_attrs(fs, root, ino, &mut live);
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        let old = fsflags_of(ii.flags);
        let (requested, flags_valid) = match set {
            FileAttrSet::Flags(f) => (f, true),
            FileAttrSet::Fsx(x) => {
                if x.xflags & !xflag::COMMON != 0
                    || x.extsize != 0
                    || x.projid != 0
                    || x.cowextsize != 0
                {
                    return Err(FsError::Unsupported(format!(
                        "fsxattr fields btrfs does not keep: {x:?}"
                    )));
                }
                (fsflags_of_xflags(x.xflags) | (old & !fs_fl::COMMON), false)
            }
        };
        let new = mask_for_type(ii.mode, requested);
        check_fsflags(old, new)?;
        let mut f = ii.flags;
        let mut put = |bit: u64, on: bool| {
            if on {
                f |= bit;
            } else {
                f &= !bit;
            }
        };
        put(bi::SYNC, new & fs_fl::SYNC != 0);
        put(bi::IMMUTABLE, new & fs_fl::IMMUTABLE != 0);
        put(bi::APPEND, new & fs_fl::APPEND != 0);
        put(bi::NODUMP, new & fs_fl::NODUMP != 0);
        put(bi::NOATIME, new & fs_fl::NOATIME != 0);
        if flags_valid {
            put(bi::DIRSYNC, new & fs_fl::DIRSYNC != 0);
            let is_reg = ii.mode & crate::inode::S_IFMT == crate::inode::S_IFREG;
            if new & fs_fl::NOCOW != 0 {
                if !is_reg {
                    f |= bi::NODATACOW;
                } else if live.size == 0 {
                    // No extents yet, so checksums can go too; a file with data keeps
                    // what it has, so that the flag tells the truth about its extents.
                    f |= bi::NODATACOW | bi::NODATASUM;
                }
            } else if !is_reg {
                f &= !bi::NODATACOW;
            } else if live.size == 0 {
                // ubtrfs has no nodatasum mount option, so NODATASUM goes with NODATACOW.
                f &= !(bi::NODATACOW | bi::NODATASUM);
            }
            // COMPRESS changes only here; NOCOMPRESS may also be set by compression that
            // did not pay off.
            let prop: Option<&[u8]> = if new & fs_fl::NOCOMP != 0 {
                f = (f & !bi::COMPRESS) | bi::NOCOMPRESS;
                None
            } else if new & fs_fl::COMPR != 0 {
                f = (f & !bi::NOCOMPRESS) | bi::COMPRESS;
                // The mount's compression type; ubtrfs writes uncompressed, so the kernel's
                // choice for a mount without compress=, zlib.
                Some(b"zlib")
            } else {
                f &= !(bi::COMPRESS | bi::NOCOMPRESS);
                None
            };
            match prop {
                Some(v) => crate::xattr::set_item_in(c, root, ino, COMPRESSION_PROP, v, 0)?,
                None => {
                    let key = ubtrfs_format::key::Key::new(
                        ino,
                        ubtrfs_format::key::item::XATTR_ITEM,
                        ubtrfs_format::csum::name_hash(COMPRESSION_PROP),
                    );
                    crate::inode::delete_one_dir_name(c, root, &key, COMPRESSION_PROP)?;
                }
            }
        }
        ii.flags = f;
        crate::inode::fold_dirty_mtime(c, root, ino, &mut ii);
        ii.ctime = crate::disk_io::now_timespec();
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}

/// Flags inherited by a new inode from its directory (`btrfs_inherit_iflags`).
pub fn inherited_flags(dir_flags: u64, mode: u32) -> u64 {
    let mut f = 0;
    if dir_flags & bi::NOCOMPRESS != 0 {
        f |= bi::NOCOMPRESS;
    } else if dir_flags & bi::COMPRESS != 0 {
        f |= bi::COMPRESS;
    }
    if dir_flags & bi::NODATACOW != 0 {
        f |= bi::NODATACOW;
        if mode & crate::inode::S_IFMT == crate::inode::S_IFREG {
            f |= bi::NODATASUM;
        }
    }
    f
}

/// What the `nodatasum` and `nodatacow` mount options add to a new inode's flags (applied
/// after the inherited ones, regular files only, as `btrfs_new_inode` does).
pub fn mount_data_flags(o: &crate::MountOptions, mode: u32) -> u64 {
    if mode & crate::inode::S_IFMT != crate::inode::S_IFREG {
        return 0;
    }
    let mut f = 0;
    if o.nodatasum {
        f |= bi::NODATASUM;
    }
    if o.nodatacow {
        f |= bi::NODATACOW | bi::NODATASUM;
    }
    f
}

/// How a mount updates atime (`MNT_NOATIME`, `MNT_RELATIME`, strictatime; `MNT_NODIRATIME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtimePolicy {
    pub noatime: bool,
    pub strictatime: bool,
    pub nodiratime: bool,
}

/// `atime_needs_update` with `relatime_need_update`: whether an access at `now` changes the
/// atime of `ii`.
pub fn atime_needs_update(p: AtimePolicy, ii: &InodeItem, now: &Timespec) -> bool {
    use std::cmp::Ordering;
    let cmp = |a: &Timespec, b: &Timespec| (a.sec as i64, a.nsec).cmp(&(b.sec as i64, b.nsec));
    if ii.flags & bi::NOATIME != 0 || p.noatime {
        return false;
    }
    if p.nodiratime && ii.mode & crate::inode::S_IFMT == crate::inode::S_IFDIR {
        return false;
    }
    if !p.strictatime
        && cmp(&ii.mtime, &ii.atime) == Ordering::Less
        && cmp(&ii.ctime, &ii.atime) == Ordering::Less
        && (now.sec as i64).saturating_sub(ii.atime.sec as i64) < 24 * 60 * 60
    {
        return false;
    }
    cmp(&ii.atime, now) != Ordering::Equal
}

/// `touch_atime` after a read or readdir of `ino`: the atime becomes now when the policy
/// says so (ctime stays: `inode_update_time` with S_ATIME only). Nothing in a read-only
/// subvolume or on a read-only mount. Returns whether the atime changed.
pub fn touch_atime(fs: &FsInfo, root: u64, ino: u64, p: AtimePolicy) -> Result<bool> {
    if fs.is_readonly() || fs.root(root)?.item.flags & ROOT_SUBVOL_RDONLY != 0 {
        return Ok(false);
    }
    let now = crate::disk_io::now_timespec();
    // relatime compares with the times the file has now: data written but not yet written
    // back carries its mtime in the dirty buffer.
    let mut live = crate::inode::read_inode(fs, root, ino)?;
    crate::file_write::live_attrs(fs, root, ino, &mut live);
    if !atime_needs_update(p, &live, &now) {
        return Ok(false);
    }
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        if ii.atime == now {
            return Ok(false);
        }
        ii.atime = now;
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)?;
        Ok(true)
    })
}

/// FS_IOC_GETFSLABEL (`btrfs_ioctl_get_fslabel`): the label as the superblock holds it.
pub fn btrfs_get_fslabel(fs: &FsInfo) -> String {
    fs.sb_live.lock().label.clone()
}

/// FS_IOC_SETFSLABEL (`btrfs_ioctl_set_fslabel`): a label of up to 255 bytes (the argument is
/// 256 bytes, NUL-terminated), written by a transaction commit before this returns, as the
/// kernel commits it. The commit needs a changed tree: the mounted subvolume's root
/// directory item is rewritten as it is (the kernel's commit COWs the root tree every time).
pub fn btrfs_set_fslabel(fs: &FsInfo, arg: &[u8]) -> Result<()> {
    let len = arg.iter().position(|&b| b == 0).unwrap_or(arg.len());
    if len >= ubtrfs_format::super_block::LABEL_SIZE {
        return Err(FsError::Invalid(format!(
            "label of {len} bytes (at most {})",
            ubtrfs_format::super_block::LABEL_SIZE - 1
        )));
    }
    let label = String::from_utf8(arg[..len].to_vec())
        .map_err(|_| FsError::Invalid("label is not UTF-8".into()))?;
    let root = fs.mount_root;
    let dir = fs.root(root)?.item.root_dirid;
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, dir)?;
        ii.transid = c.transid();
        c.write_inode(root, dir, &ii)?;
        // The commit writes the superblock from its raw bytes: the label goes there too
        // (offset 299 of struct btrfs_super_block, NUL-padded).
        let mut sb = fs.sb_live.lock();
        let at = 299..299 + ubtrfs_format::super_block::LABEL_SIZE;
        sb.raw[at.clone()].fill(0);
        sb.raw[at.start..at.start + len].copy_from_slice(label.as_bytes());
        sb.label = label;
        Ok(())
    })?;
    fs.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The VFS's checks of immutable and append-only inodes (EPERM everywhere).
// ---------------------------------------------------------------------------------------------

pub fn is_immutable(ii: &InodeItem) -> bool {
    ii.flags & bi::IMMUTABLE != 0
}

pub fn is_append(ii: &InodeItem) -> bool {
    ii.flags & bi::APPEND != 0
}

/// EPERM; `what` says which check refused, for the reader of the call site.
fn eperm(what: &str) -> FsError {
    let _ = what;
    FsError::NotPermitted
}

/// `may_open` + `inode_permission(MAY_WRITE)`: an immutable inode opens read-only; an
/// append-only one opens for writing only with O_APPEND and never with O_TRUNC.
pub fn may_open(ii: &InodeItem, write: bool, append: bool, trunc: bool) -> Result<()> {
    if is_immutable(ii) && (write || trunc) {
        return Err(eperm("open for writing of an immutable inode"));
    }
    if is_append(ii) && ((write && !append) || trunc) {
        return Err(eperm("open of an append-only inode without O_APPEND"));
    }
    Ok(())
}

/// A data write at `offset` (`generic_write_checks` after `may_open`): an append-only file
/// takes data only at its end.
pub fn may_write(ii: &InodeItem, offset: u64, size: u64) -> Result<()> {
    if is_immutable(ii) {
        return Err(eperm("write to an immutable inode"));
    }
    if is_append(ii) && offset < size {
        return Err(eperm("write inside an append-only inode"));
    }
    Ok(())
}

/// `notify_change`: nothing of an immutable inode changes; an append-only one keeps its
/// mode, owner, size and explicitly set times (touching them to now is allowed).
pub fn may_setattr(ii: &InodeItem, a: &crate::inode::SetAttr) -> Result<()> {
    use crate::inode::TimeSet;
    let explicit_time = matches!(a.atime, Some(TimeSet::At(_)))
        || matches!(a.mtime, Some(TimeSet::At(_)))
        || a.ctime.is_some();
    let owner_mode = a.mode.is_some() || a.uid.is_some() || a.gid.is_some();
    if is_immutable(ii)
        && (owner_mode
            || explicit_time
            || a.size.is_some()
            || a.atime.is_some()
            || a.mtime.is_some())
    {
        return Err(eperm("setattr of an immutable inode"));
    }
    if is_append(ii) && (owner_mode || explicit_time || a.size.is_some()) {
        return Err(eperm("setattr of an append-only inode"));
    }
    Ok(())
}

/// `inode_permission(dir, MAY_WRITE)` for a new name in `dir` (create, link, rename target
/// directory): an immutable directory takes none.
pub fn may_create(dir: &InodeItem) -> Result<()> {
    if is_immutable(dir) {
        return Err(eperm("new entry in an immutable directory"));
    }
    Ok(())
}

/// `may_delete`: a name goes away (unlink, rmdir, rename source or replaced target) only when
/// neither its directory nor its inode is immutable or append-only.
pub fn may_delete(dir: &InodeItem, victim: &InodeItem) -> Result<()> {
    if is_immutable(dir) || is_append(dir) {
        return Err(eperm(
            "removing a name from an immutable or append-only directory",
        ));
    }
    if is_immutable(victim) || is_append(victim) {
        return Err(eperm(
            "removing a name of an immutable or append-only inode",
        ));
    }
    Ok(())
}

/// `vfs_link`: an immutable or append-only inode gets no new name.
pub fn may_link(ii: &InodeItem) -> Result<()> {
    if is_immutable(ii) || is_append(ii) {
        return Err(eperm("link to an immutable or append-only inode"));
    }
    Ok(())
}

/// `xattr_permission` for set and remove.
pub fn may_set_xattr(ii: &InodeItem) -> Result<()> {
    if is_immutable(ii) || is_append(ii) {
        return Err(eperm("xattr change of an immutable or append-only inode"));
    }
    Ok(())
}

/// `vfs_fallocate`: nothing on an immutable file; only plain allocation (with or without
/// KEEP_SIZE) on an append-only one.
pub fn may_fallocate(ii: &InodeItem, mode: i32) -> Result<()> {
    if is_immutable(ii) {
        return Err(eperm("fallocate of an immutable inode"));
    }
    if is_append(ii) && mode & !FALLOC_FL_KEEP_SIZE != 0 {
        return Err(eperm(
            "fallocate other than allocation on an append-only inode",
        ));
    }
    Ok(())
}

const FALLOC_FL_KEEP_SIZE: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: the flag conversions match the kernel's tables for every btrfs flag.
    #[test]
    fn flag_conversions() {
        let all = bi::SYNC
            | bi::IMMUTABLE
            | bi::APPEND
            | bi::NODUMP
            | bi::NOATIME
            | bi::DIRSYNC
            | bi::NODATACOW
            | bi::NODATASUM
            | bi::COMPRESS;
        assert_eq!(
            fsflags_of(all),
            fs_fl::SYNC
                | fs_fl::IMMUTABLE
                | fs_fl::APPEND
                | fs_fl::NODUMP
                | fs_fl::NOATIME
                | fs_fl::DIRSYNC
                | fs_fl::NOCOW
                | fs_fl::COMPR
        );
        // NOCOMPRESS wins over COMPRESS, as in btrfs_inode_flags_to_fsflags.
        assert_eq!(fsflags_of(bi::COMPRESS | bi::NOCOMPRESS), fs_fl::NOCOMP);
        assert_eq!(fsflags_of(RO_VERITY), fs_fl::VERITY);
        let x = xflags_of(fs_fl::IMMUTABLE | fs_fl::APPEND | fs_fl::NOCOW);
        assert_eq!(x, xflag::IMMUTABLE | xflag::APPEND);
        assert_eq!(fsflags_of_xflags(x), fs_fl::IMMUTABLE | fs_fl::APPEND);
        let f = FsXattr {
            xflags: 1,
            extsize: 2,
            nextents: 3,
            projid: 4,
            cowextsize: 5,
        };
        assert_eq!(FsXattr::parse(&f.to_bytes()), Some(f));
        assert_eq!(FsXattr::parse(&[0; 27]), None);
    }

    // Test scenario: check_fsflags refuses unknown flags and NOCOW with compression.
    #[test]
    fn check_fsflags_matches_kernel() {
        assert!(matches!(
            check_fsflags(0, fs_fl::DAX),
            Err(FsError::Unsupported(_))
        ));
        assert!(matches!(
            check_fsflags(0, fs_fl::COMPR | fs_fl::NOCOMP),
            Err(FsError::Invalid(_))
        ));
        assert!(matches!(
            check_fsflags(fs_fl::NOCOW, fs_fl::NOCOW | fs_fl::COMPR),
            Err(FsError::Invalid(_))
        ));
        assert!(check_fsflags(0, fs_fl::IMMUTABLE | fs_fl::NOCOW).is_ok());
    }
}
