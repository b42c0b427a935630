//! The extent map value (`struct extent_map`'s data fields), its flags, special addresses and
//! derived helpers (extent_map.h), the policies and the error type.

use std::fmt;
use std::str::FromStr;

/// Every real disk address is below this value (`EXTENT_MAP_LAST_BYTE`).
pub const EXTENT_MAP_LAST_BYTE: u64 = u64::MAX - 3;
/// `disk_bytenr` of a hole map (`EXTENT_MAP_HOLE`).
pub const EXTENT_MAP_HOLE: u64 = u64::MAX - 2;
/// `disk_bytenr` of an inline map (`EXTENT_MAP_INLINE`).
pub const EXTENT_MAP_INLINE: u64 = u64::MAX - 1;

/// Extent map flag bits, in the kernel's bit order (`EXTENT_FLAG_*`).
pub mod flags {
    /// The ordered extent of this map is still in flight (`EXTENT_FLAG_PINNED`).
    pub const PINNED: u32 = 1 << 0;
    /// zlib compressed extent (`EXTENT_FLAG_COMPRESS_ZLIB`).
    pub const COMPRESS_ZLIB: u32 = 1 << 1;
    /// lzo compressed extent (`EXTENT_FLAG_COMPRESS_LZO`).
    pub const COMPRESS_LZO: u32 = 1 << 2;
    /// zstd compressed extent (`EXTENT_FLAG_COMPRESS_ZSTD`).
    pub const COMPRESS_ZSTD: u32 = 1 << 3;
    /// Preallocated extent, reads as zeroes (`EXTENT_FLAG_PREALLOC`).
    pub const PREALLOC: u32 = 1 << 4;
    /// Being copied into a log tree by a fast fsync (`EXTENT_FLAG_LOGGING`).
    pub const LOGGING: u32 = 1 << 5;
    /// Result of merging adjacent maps (`EXTENT_FLAG_MERGED`).
    pub const MERGED: u32 = 1 << 6;
    /// All compression bits.
    pub const COMPRESS_MASK: u32 = COMPRESS_ZLIB | COMPRESS_LZO | COMPRESS_ZSTD;
}

/// Plain value of a map's fields (Copy). What callers build and what lookups return (a snapshot
/// copy). 64 bytes: the kernel's `struct extent_map` is 104 bytes because it also carries its
/// rb_node, refcount and list head, which live in the tree and identity node types here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExtentMap {
    /// File offset of the first byte covered.
    pub start: u64,
    /// Number of file bytes covered.
    pub len: u64,
    /// Logical address of the whole on-disk extent, or [`EXTENT_MAP_HOLE`] / [`EXTENT_MAP_INLINE`].
    pub disk_bytenr: u64,
    /// Size of the whole on-disk extent (0 for holes and inline).
    pub disk_num_bytes: u64,
    /// Offset inside the (decompressed) extent where this file range starts.
    pub offset: u64,
    /// Decompressed size of the whole extent.
    pub ram_bytes: u64,
    /// Transaction id (see KERNEL-SEMANTICS.md section 1).
    pub generation: u64,
    /// [`flags`] bits.
    pub flags: u32,
}

impl ExtentMap {
    /// A regular, uncompressed map of `[start, start+len)` at the start of a fresh on-disk
    /// extent of exactly `len` bytes.
    pub const fn regular(start: u64, len: u64, disk_bytenr: u64, generation: u64) -> Self {
        ExtentMap {
            start,
            len,
            disk_bytenr,
            disk_num_bytes: len,
            offset: 0,
            ram_bytes: len,
            generation,
            flags: 0,
        }
    }

    /// A hole map of `[start, start+len)`.
    pub const fn hole(start: u64, len: u64, generation: u64) -> Self {
        ExtentMap {
            start,
            len,
            disk_bytenr: EXTENT_MAP_HOLE,
            disk_num_bytes: 0,
            offset: 0,
            ram_bytes: len,
            generation,
            flags: 0,
        }
    }

    /// The same map with `flags` set in addition.
    pub const fn with_flags(mut self, flags: u32) -> Self {
        self.flags |= flags;
        self
    }

    /// Exclusive end, saturating at `u64::MAX` (`btrfs_extent_map_end`).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// `disk_bytenr` is a real address, not HOLE or INLINE.
    pub const fn is_regular(&self) -> bool {
        self.disk_bytenr < EXTENT_MAP_LAST_BYTE
    }

    /// Any compression flag is set (`extent_map_is_compressed`).
    pub const fn is_compressed(&self) -> bool {
        self.flags & flags::COMPRESS_MASK != 0
    }

    /// Flag test helper.
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Physical start of the data this map reads (`btrfs_extent_map_block_start`):
    /// `disk_bytenr` for compressed and special maps, else `disk_bytenr + offset`.
    pub const fn block_start(&self) -> u64 {
        if self.is_regular() && !self.is_compressed() {
            self.disk_bytenr.wrapping_add(self.offset)
        } else {
            self.disk_bytenr
        }
    }

    /// `disk_num_bytes` if compressed, else `len` (`extent_map_block_len`).
    pub const fn block_len(&self) -> u64 {
        if self.is_compressed() {
            self.disk_num_bytes
        } else {
            self.len
        }
    }

    /// `block_start + block_len`, `u64::MAX` on overflow (`extent_map_block_end`).
    pub const fn block_end(&self) -> u64 {
        match self.block_start().checked_add(self.block_len()) {
            Some(e) => e,
            None => u64::MAX,
        }
    }

    /// `[start, start+len)` (end saturating) intersects this map.
    pub const fn intersects(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        end > self.start && start < self.end()
    }
}

/// Which variant of the kernel's logic to run (KERNEL-SEMANTICS.md section 5). The default is
/// the kernel-faithful `kernel`; KERNEL-SEMANTICS.md has a live mount default to `fixed-split`
/// (what a current kernel does), which is the mount's choice, not this crate's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Split pieces inherit the flags saved before PINNED|LOGGING are cleared (so pieces inherit
    /// LOGGING and the original loses it); the shrinker skips only PINNED maps.
    #[default]
    Kernel,
    /// "btrfs: don't propagate EXTENT_FLAG_LOGGING to split extent maps": pieces never get
    /// LOGGING; the original keeps it and stays on fsync's list.
    FixedSplit,
    /// The June 2026 proposal: the shrinker also skips LOGGING maps.
    FixedShrinker,
    /// Both fixes.
    FixedBoth,
}

impl Policy {
    /// All policies, in declaration order.
    pub const ALL: [Policy; 4] = [
        Policy::Kernel,
        Policy::FixedSplit,
        Policy::FixedShrinker,
        Policy::FixedBoth,
    ];

    /// The name used by the issues and mount options.
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Kernel => "kernel",
            Policy::FixedSplit => "fixed-split",
            Policy::FixedShrinker => "fixed-shrinker",
            Policy::FixedBoth => "fixed-both",
        }
    }

    /// Split pieces never inherit LOGGING; the original keeps it.
    pub const fn split_fixed(self) -> bool {
        matches!(self, Policy::FixedSplit | Policy::FixedBoth)
    }

    /// The shrinker skips LOGGING maps.
    pub const fn shrinker_fixed(self) -> bool {
        matches!(self, Policy::FixedShrinker | Policy::FixedBoth)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not one of `kernel`, `fixed-split`, `fixed-shrinker`, `fixed-both`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown extent map policy {:?} (expected kernel, fixed-split, fixed-shrinker or fixed-both)",
            self.0
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

/// Errors of the extent-map operations, named after the kernel's errnos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmError {
    /// -EEXIST: the range overlaps a map already in the tree.
    #[error("extent map [{start}, {end}) overlaps an existing map (EEXIST)")]
    Exists {
        /// Start of the rejected map.
        start: u64,
        /// Exclusive end of the rejected map.
        end: u64,
    },
    /// -ENOENT: no map where one was required (`btrfs_unpin_extent_cache`).
    #[error("no extent map for [{start}, {end}) (ENOENT)")]
    NotFound {
        /// Start of the requested range.
        start: u64,
        /// Exclusive end of the requested range.
        end: u64,
    },
    /// -EUCLEAN: the map found does not start where expected.
    #[error("extent map starts at {found}, expected {expected} (EUCLEAN)")]
    Unclean {
        /// Expected start.
        expected: u64,
        /// Start of the map found.
        found: u64,
    },
    /// -EINVAL: the arguments break the operation's preconditions (a caller bug).
    #[error("invalid extent map operation: {0} (EINVAL)")]
    Invalid(&'static str),
    /// -ENOMEM: a map could not be allocated.
    #[error("extent map allocation failed (ENOMEM)")]
    NoMem,
    /// -EIO: `btrfs_split_extent_map` found no map to split.
    #[error("no extent map to split at [{start}, {end}) (EIO)")]
    Io {
        /// Start of the range.
        start: u64,
        /// Exclusive end of the range.
        end: u64,
    },
    /// -EFBIG: more than 32768 units on the modified list; the fsync must fall back to a full
    /// transaction commit.
    #[error("too many modified extent maps to log (EFBIG), full commit needed")]
    TooManyModified,
}
