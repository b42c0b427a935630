//! ubtrfs-fs: the mounted btrfs filesystem.
//!
//! [`disk_io::FsInfo`] is `open_ctree`: devices, superblock, chunk tree, root tree, subvolume
//! roots. The read side of inodes ([`inode`]), directories ([`dir_item`]), extended attributes
//! ([`xattr`]), file data through extent maps ([`file`]: `btrfs_get_extent` feeding the
//! `ubtrfs-extent-map` trees), data checksums ([`file_item`]) and decompression
//! ([`compression`]) build on it. Everything is `Sync`: FUSE worker threads call in parallel.
//!
//! Lock order (outermost first), kept by every path of this crate:
//! 1. per-inode `inode_lock` (i_rwsem counterpart, in ubtrfs-extent-map's `BtrfsInode`);
//! 2. per-inode `mmap_lock` (i_mmap_lock);
//! 3. `FsInfo::tree_lock`: shared for every tree search, exclusive for a write operation
//!    (`FsInfo::write_op`) and for commit; then the running transaction's mutex;
//! 4. the inode's extent-map tree lock (internal to ubtrfs-extent-map);
//! 5. `FsInfo::roots` (subvolume root cache), `FsInfo` small caches (`next_ino`, ...);
//! 6. the tree-block cache and dirty-overlay locks inside `ubtrfs_ctree::BlockReader` (leaf
//!    locks, never held across a call out).
#![forbid(unsafe_code)]

pub mod acl;
pub mod compression;
pub mod dir_item;
pub mod direct_io;
pub mod disk_io;
pub mod error;
pub mod file;
pub mod file_item;
pub mod file_write;
pub mod fileattr;
pub mod inode;
pub mod mkfs;
pub mod space_info;
pub mod transaction;
pub mod tree_log;
pub mod trim;
pub mod xattr;

pub use disk_io::{FsInfo, FsRoot, MountOptions};
pub use error::{FsError, Result};
