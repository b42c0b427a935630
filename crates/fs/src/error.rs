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
    /// The directory still has entries (ENOTEMPTY).
    #[error("directory not empty")]
    NotEmpty,
    /// A name or symlink target is longer than btrfs stores (ENAMETOOLONG).
    #[error("name too long")]
    NameTooLong,
    /// The operation would cross subvolumes (EXDEV), as the kernel refuses for links and
    /// renames between subvolumes.
    #[error("cross-subvolume operation")]
    CrossDevice,
    /// The inode has the maximum number of links, or its names no longer fit (EMLINK).
    #[error("too many links")]
    TooManyLinks,
    /// The operation is not permitted on this inode, e.g. a hard link to a directory (EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// The operation or mode is not supported (EOPNOTSUPP).
    #[error("operation not supported: {0}")]
    Unsupported(String),
    /// An extended attribute name is empty or longer than 255 bytes, or a buffer is too
    /// small (ERANGE).
    #[error("result out of range")]
    Range,
    /// An extended attribute value is larger than the VFS accepts (E2BIG).
    #[error("argument list too long")]
    TooBig,
    /// A size or offset beyond the maximum file size (EFBIG).
    #[error("file too large")]
    FileTooBig,
    /// SEEK_DATA/SEEK_HOLE at or beyond the end of the file, or no data after it (ENXIO).
    #[error("no such offset")]
    NoSuchOffset,
    /// Try again (EAGAIN): the kernel's answer to a buffered write that finds no data space
    /// over a preallocated range of a file without NODATACOW holding unwritten data
    /// (`can_nocow_extent` in `btrfs_check_nocow_lock`).
    #[error("resource temporarily unavailable")]
    Again,
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
