//! POSIX ACLs as the kernel's btrfs keeps them (acl.c): the `system.posix_acl_access` and
//! `system.posix_acl_default` xattrs hold the VFS's xattr form of the ACL (version 2, then
//! little-endian {tag u16, perm u16, id u32} entries), and the mode bits stay in step with the
//! access ACL: a new inode takes its directory's default ACL (`posix_acl_create`), setting an
//! access ACL sets the mode (`posix_acl_update_mode`), chmod rewrites the ACL
//! (`posix_acl_chmod`).
//!
//! On a FUSE mount with FUSE_POSIX_ACL the kernel checks permissions against the ACLs itself
//! (reading them through getxattr) and validates an ACL before it sends it; these mode/ACL
//! updates, which the VFS leaves to the filesystem's `set_acl` and create paths, are the
//! daemon's.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
#[cfg(test)]
use crate::inode::S_IFREG;
use crate::inode::{S_IFDIR, S_IFMT};
use ubtrfs_format::items::InodeItem;

pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const S_ISGID: u32 = 0o2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// An ACL in xattr form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    pub fn parse(b: &[u8]) -> Result<Acl> {
        let bad = || FsError::Invalid("malformed POSIX ACL xattr".into());
        if b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
            return Err(bad());
        }
        if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION {
            return Err(bad());
        }
        let entries = b[4..]
            .chunks_exact(8)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        Ok(Acl(entries))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            b.extend_from_slice(&e.tag.to_le_bytes());
            b.extend_from_slice(&e.perm.to_le_bytes());
            b.extend_from_slice(&e.id.to_le_bytes());
        }
        b
    }

    /// `posix_acl_equiv_mode`: the mode bits this ACL amounts to, and whether it says no more
    /// than them (only the owner, group and other entries).
    pub fn equiv_mode(&self) -> (u32, bool) {
        let mut mode = 0u32;
        let mut equiv = true;
        for e in &self.0 {
            let p = u32::from(e.perm & 7);
            match e.tag {
                USER_OBJ => mode |= p << 6,
                GROUP_OBJ => mode |= p << 3,
                OTHER => mode |= p,
                // The mask stands for the group bits when there is one.
                MASK => {
                    mode = (mode & !0o070) | (p << 3);
                    equiv = false;
                }
                USER | GROUP => equiv = false,
                _ => equiv = false,
            }
        }
        (mode, equiv)
    }

    /// `posix_acl_create_masq`: restrict the ACL by `mode` and `mode` by the ACL; true when
    /// the result says more than the mode bits.
    fn create_masq(&mut self, mode: &mut u32) -> bool {
        let mut not_equiv = false;
        let (mut group_obj, mut mask_obj) = (None, None);
        for (i, e) in self.0.iter_mut().enumerate() {
            let p = u32::from(e.perm);
            match e.tag {
                USER_OBJ => {
                    let np = p & ((*mode >> 6) | !0o7);
                    e.perm = np as u16;
                    *mode &= (np << 6) | !0o700;
                }
                USER | GROUP => not_equiv = true,
                GROUP_OBJ => group_obj = Some(i),
                OTHER => {
                    let np = p & (*mode | !0o7);
                    e.perm = np as u16;
                    *mode &= np | !0o7;
                }
                MASK => {
                    mask_obj = Some(i);
                    not_equiv = true;
                }
                _ => {}
            }
        }
        if let Some(i) = mask_obj.or(group_obj) {
            let e = &mut self.0[i];
            let np = u32::from(e.perm) & ((*mode >> 3) | !0o7);
            e.perm = np as u16;
            *mode &= (np << 3) | !0o070;
        }
        not_equiv
    }

    /// `__posix_acl_chmod`: the owner, mask (or group) and other entries take `mode`'s bits.
    fn chmod_masq(&mut self, mode: u32) {
        let has_mask = self.0.iter().any(|e| e.tag == MASK);
        for e in &mut self.0 {
            match e.tag {
                USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
                MASK => e.perm = ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
                OTHER => e.perm = (mode & 7) as u16,
                _ => {}
            }
        }
    }
}

/// What a new inode gets from its directory: its mode, and the access and default ACLs to
/// store (xattr form).
pub type NewInodeAcls = (u32, Option<Vec<u8>>, Option<Vec<u8>>);

/// `posix_acl_create` for a new inode of `mode` in a directory with default ACL `default`
/// (none: the umask applies): the mode, the access ACL and (directories) the default ACL
/// to store.
pub fn acl_create(default: Option<&[u8]>, mode: u32, umask: u32) -> Result<NewInodeAcls> {
    let Some(d) = default else {
        return Ok((mode & !(umask & 0o777), None, None));
    };
    if mode & S_IFMT == crate::inode::S_IFLNK {
        return Ok((mode, None, None));
    }
    let dacl = Acl::parse(d)?;
    let mut access = dacl.clone();
    let mut m = mode;
    let not_equiv = access.create_masq(&mut m);
    let access = not_equiv.then(|| access.to_bytes());
    let default = (mode & S_IFMT == S_IFDIR).then(|| dacl.to_bytes());
    Ok((m, access, default))
}

/// `btrfs_set_acl` of the access ACL through setxattr: the mode takes the ACL's bits, an ACL
/// that says no more than the mode is not stored (an existing one is removed), and the
/// setgid bit goes unless the caller is in the file's group or privileged
/// (`posix_acl_update_mode`). Default ACLs are stored as given.
pub fn btrfs_set_acl(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    name: &[u8],
    value: &[u8],
    flags: u32,
    caller_in_group: impl Fn(&InodeItem) -> bool,
) -> Result<()> {
    if name != ACL_ACCESS {
        return crate::xattr::btrfs_setxattr(fs, root, ino, name, value, flags);
    }
    let acl = Acl::parse(value)?;
    let (bits, equiv) = acl.equiv_mode();
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        let key = ubtrfs_format::key::Key::new(
            ino,
            ubtrfs_format::key::item::XATTR_ITEM,
            ubtrfs_format::csum::name_hash(name),
        );
        if equiv {
            crate::inode::delete_one_dir_name(c, root, &key, name)?;
        } else {
            crate::xattr::set_item_in(c, root, ino, name, value, flags)?;
        }
        let mut mode = (ii.mode & !0o777) | bits;
        if !caller_in_group(&ii) {
            mode &= !S_ISGID;
        }
        ii.mode = mode;
        crate::inode::fold_dirty_mtime(c, root, ino, &mut ii);
        ii.ctime = crate::disk_io::now_timespec();
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}

/// `posix_acl_chmod` after a mode change: an access ACL follows the new mode.
pub fn btrfs_acl_chmod(fs: &FsInfo, root: u64, ino: u64, mode: u32) -> Result<()> {
    if mode & S_IFMT == crate::inode::S_IFLNK {
        return Ok(());
    }
    let old = match crate::xattr::get(fs, root, ino, ACL_ACCESS) {
        Ok(v) => v,
        Err(FsError::NoXattr) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut acl = Acl::parse(&old)?;
    acl.chmod_masq(mode);
    let new = acl.to_bytes();
    if new == old {
        return Ok(());
    }
    fs.write_op(|c| crate::xattr::set_item_in(c, root, ino, ACL_ACCESS, &new, 0))
}

/// `btrfs_create_new_inode` with `btrfs_init_acl`: the inode and the ACLs it inherits from
/// `dir`'s default ACL in one transaction. `mode` is as the caller asked (the umask is applied
/// here, only when `dir` has no default ACL).
#[allow(clippy::too_many_arguments)]
pub fn btrfs_new_inode_acl(
    fs: &FsInfo,
    root: u64,
    dir: u64,
    name: &[u8],
    mode: u32,
    umask: u32,
    rdev: u64,
    uid: u32,
    gid: u32,
) -> Result<(u64, InodeItem)> {
    crate::inode::check_name(name)?;
    let default = match crate::xattr::get(fs, root, dir, ACL_DEFAULT) {
        Ok(v) => Some(v),
        Err(FsError::NoXattr) => None,
        Err(e) => return Err(e),
    };
    let (mode, access, default) = acl_create(default.as_deref(), mode, umask)?;
    fs.write_op(|c| {
        let (ino, ii) = crate::inode::new_inode_in(c, root, dir, name, mode, rdev, uid, gid)?;
        if let Some(d) = &default {
            crate::xattr::set_item_in(c, root, ino, ACL_DEFAULT, d, 0)?;
        }
        if let Some(a) = &access {
            crate::xattr::set_item_in(c, root, ino, ACL_ACCESS, a, 0)?;
        }
        Ok((ino, ii))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries
            .iter()
            .map(|&(tag, perm, id)| Entry { tag, perm, id })
            .collect())
    }

    // Test scenario: the xattr form round-trips; a malformed value is refused.
    #[test]
    fn xattr_form() {
        let a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 5, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        assert_eq!(Acl::parse(&a.to_bytes()).unwrap(), a);
        assert!(Acl::parse(&[2, 0, 0, 0, 1]).is_err());
        assert!(Acl::parse(&[1, 0, 0, 0]).is_err());
    }

    // Test scenario: posix_acl_create as the kernel computes it: a default ACL with a named
    // user and mask gives the new file an access ACL and a mode restricted by both; a default
    // ACL of base entries only gives no access ACL; no default ACL applies the umask.
    #[test]
    fn create_from_default() {
        let d = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 5, u32::MAX),
        ])
        .to_bytes();
        let (m, a, dd) = acl_create(Some(&d), S_IFREG | 0o644, 0o077).unwrap();
        assert_eq!(m, S_IFREG | 0o644);
        let a = Acl::parse(&a.unwrap()).unwrap();
        assert_eq!(a.0[0].perm, 6); // user::rw-
        assert_eq!(a.0[3].perm, 4); // mask::r--
        assert_eq!(a.0[4].perm, 4); // other::r--
        assert!(dd.is_none());
        let (_, _, dd) = acl_create(Some(&d), S_IFDIR | 0o777, 0o022).unwrap();
        assert_eq!(dd.as_deref(), Some(&d[..]));
        let base = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (GROUP_OBJ, 0, u32::MAX),
            (OTHER, 0, u32::MAX),
        ])
        .to_bytes();
        let (m, a, _) = acl_create(Some(&base), S_IFREG | 0o666, 0o022).unwrap();
        assert_eq!((m, a), (S_IFREG | 0o600, None));
        let (m, a, _) = acl_create(None, S_IFREG | 0o666, 0o022).unwrap();
        assert_eq!((m, a), (S_IFREG | 0o644, None));
    }

    // Test scenario: chmod rewrites owner, mask and other; the named entries stay.
    #[test]
    fn chmod_rewrites_mask() {
        let mut a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 7, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 7, u32::MAX),
        ]);
        a.chmod_masq(0o640);
        let perms: Vec<u16> = a.0.iter().map(|e| e.perm).collect();
        assert_eq!(perms, vec![6, 7, 7, 4, 0]);
        assert_eq!(a.equiv_mode(), (0o640, false));
    }
}
