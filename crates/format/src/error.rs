//! Errors of the format layer: one variant per way the disk can lie.

use std::fmt;

/// What kind of inconsistency a structure showed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorruptKind {
    /// A read went past the end of the structure that holds it.
    OutOfBounds {
        what: &'static str,
        offset: usize,
        len: usize,
        available: usize,
    },
    /// A magic number did not match.
    BadMagic,
    /// A stored checksum does not match the data.
    ChecksumMismatch,
    /// The checksum type is not one btrfs defines.
    UnknownCsumType(u16),
    /// A field holds a value the format forbids.
    BadField { what: &'static str, value: u64 },
    /// Keys of a tree block are not strictly ascending.
    KeyOrder { slot: usize },
    /// Leaf item data overlaps, leaves gaps or leaves the block.
    ItemLayout { slot: usize },
}

impl fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptKind::OutOfBounds {
                what,
                offset,
                len,
                available,
            } => write!(
                f,
                "{what}: {len} bytes at offset {offset} exceed the {available} available"
            ),
            CorruptKind::BadMagic => write!(f, "bad magic"),
            CorruptKind::ChecksumMismatch => write!(f, "checksum mismatch"),
            CorruptKind::UnknownCsumType(t) => write!(f, "unknown checksum type {t}"),
            CorruptKind::BadField { what, value } => write!(f, "invalid {what} {value}"),
            CorruptKind::KeyOrder { slot } => write!(f, "bad key order at slot {slot}"),
            CorruptKind::ItemLayout { slot } => write!(f, "bad item offset or size at slot {slot}"),
        }
    }
}

/// Error returned by every parser of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("corrupt {0}")]
    Corrupt(CorruptKind),
}

impl From<CorruptKind> for FormatError {
    fn from(k: CorruptKind) -> Self {
        FormatError::Corrupt(k)
    }
}

pub type Result<T> = std::result::Result<T, FormatError>;
