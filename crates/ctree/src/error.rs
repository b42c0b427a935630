//! Errors of the tree layer. Each names what failed and where (block, root, key), like the
//! kernel's messages. errno mapping is done by the FUSE layer only.

use ubtrfs_format::FormatError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be read or written.
    #[error("I/O error {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A checksum did not match on every copy (tree block or data).
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// A structure failed validation (tree-checker, parent transid, bad item).
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// A feature or profile ubtrfs does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No free space for an allocation.
    #[error("no space: {0}")]
    NoSpace(String),
    /// An item with this key already exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// A requested item does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt(what.into())
    }
    /// Wrap a format parse error with the location it was met at.
    pub fn format(where_: impl std::fmt::Display, e: FormatError) -> Self {
        Error::Corrupt(format!("{where_}: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
