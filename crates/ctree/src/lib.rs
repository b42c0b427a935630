//! ubtrfs-ctree: devices, chunk mapping, verified tree-block I/O and B-tree search.
//!
//! Module names follow the kernel's files: [`volumes`] (devices and the chunk map),
//! [`disk_io`] (superblock and tree-block reads with verification and a bounded cache),
//! [`ctree`] (search paths and item iteration), [`tree_checker`] (per-block validation).
#![forbid(unsafe_code)]

pub mod block_group;
pub mod cow;
pub mod ctree;
pub mod disk_io;
pub mod error;
pub mod extent_tree;
pub mod transaction;
pub mod tree_checker;
pub mod volumes;

pub use ctree::{Path, RootPtr, TreeIter};
pub use disk_io::{BlockReader, CacheStats};
pub use error::{Error, Result};
pub use volumes::{BlockDevice, ChunkMap, Device, DeviceIo};
