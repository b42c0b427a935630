//! ubtrfs-format: the btrfs on-disk format as pure data.
//!
//! Keys, item layouts, tree-block headers, the superblock and the checksum algorithms. Everything
//! here parses from and encodes into byte slices; nothing does I/O, takes a lock or decides policy.
//!
//! Disk data is untrusted: every accessor is bounds-checked and every on-disk length goes through
//! checked arithmetic. A parse failure is a [`FormatError`] naming what was wrong and where, never
//! a panic. Field offsets follow the kernel's `include/uapi/linux/btrfs_tree.h` (packed structs,
//! little endian).
#![forbid(unsafe_code)]

pub mod bytes;
pub mod csum;
pub mod error;
pub mod extent_items;
pub mod items;
pub mod key;
pub mod super_block;
pub mod tree_block;

pub use csum::CsumType;
pub use error::{CorruptKind, FormatError, Result};
pub use key::Key;
