//! Errors of the filesystem layer. The FUSE adapter maps them to errno values; nothing here
//! knows about errno (STYLE.md habit 2).

use ubtrfs_ctree::Error as TreeError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// Trees, devices, metadata verification.
    #[error(transparent)]
    Tree(TreeError),
    /// A data block failed checksum verification on every copy.
    #[error("csum failed root {root} ino {ino} off {offset}")]
    DataChecksum { root: u64, ino: u64, offset: u64 },
    /// A compressed extent could not be decompressed.
    #[error("root {root} ino {ino} off {offset}: {source}")]
    Decompress {
        root: u64,
        ino: u64,
        offset: u64,
        #[source]
        source: crate::compression::DecompressError,
    },
    /// No such name, inode or subvolume.
    #[error("not found")]
    NotFound,
    /// No space left for data or metadata.
    #[error("no space left on device")]
    NoSpace,
    /// The name already exists.
    #[error("file exists")]
    Exists,
    /// The operation wants a directory.
    #[error("not a directory")]
    NotDir,
    /// The operation does not apply to directories.
    #[error("is a directory")]
    IsDir,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoXattr,
    /// The operation does not apply to this inode type.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The mount is read-only.
    #[error("read-only filesystem")]
    ReadOnly,
    /// An inode number cannot be represented in the FUSE node id space.
    #[error("inode number {0} too large for the node id mapping")]
    Overflow(u64),
    /// The image can be served read-only but not written (ONDISK-NOTES.md B.13).
    #[error("cannot mount read-write: {0}")]
    ReadWriteRefused(String),
    /// Refused at mount: unsupported feature or unusable device.
    #[error("{0}")]
    Mount(String),
}

impl From<TreeError> for FsError {
    fn from(e: TreeError) -> Self {
        match e {
            TreeError::NoSpace(_) => FsError::NoSpace,
            other => FsError::Tree(other),
        }
    }
}

impl FsError {
    pub fn corrupt(msg: impl Into<String>) -> Self {
        FsError::Tree(TreeError::corrupt(msg))
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
