//! A small generated source tree and `mkfs.btrfs --rootdir` images of it.
//!
//! The tree holds what the read path has to get right: files of sizes around the inline and
//! sector limits (inline extents, one-sector and multi-extent regular files), a sparse file, a
//! directory big enough to span several leaves at nodesize 4096, nested directories, a hard link,
//! short and long symlinks, and user xattrs (small, large and many on one inode). Everything is
//! derived from a seed.

use super::{require_tool, run_ok, Rng};
use std::ffi::CString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

/// Sizes of the regular files at the top of the tree.
pub const FILE_SIZES: &[u64] = &[
    0, 1, 100, 2000, 3000, 4095, 4096, 4097, 12288, 70_000, 300_000, 1_100_000,
];

/// Entries of the big directory (several leaves at nodesize 4096).
pub const BIG_DIR_ENTRIES: usize = 300;

/// Fixed filesystem UUID, so that images of one seed are alike.
pub const FSID: &str = "5c8d6c3e-5f21-4d0b-9d7e-0f6c1a2b3c4d";

fn write_file(path: &Path, rng: &mut Rng, size: u64) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
    let mut left = size;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
        left -= n as u64;
    }
}

/// Set a user xattr on `path` (the source filesystem must support them; ext4 and tmpfs do).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let n = CString::new(name).expect("name without NUL");
    // SAFETY: `p` and `n` are NUL-terminated strings that live across the call; `value` is a
    // valid slice and its exact length is passed; flags 0 means create or replace.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {path:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// Populate `dir` (which must exist and be empty) with the test tree of `seed`.
pub fn generate_tree(dir: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    for &size in FILE_SIZES {
        write_file(&dir.join(format!("file-{size}")), &mut rng, size);
    }
    // Sparse: data, a 1 MiB hole, data.
    {
        let p = dir.join("sparse");
        let mut f = fs::File::create(&p).unwrap();
        let mut b = vec![0u8; 8192];
        rng.fill(&mut b);
        f.write_all(&b).unwrap();
        f.seek(SeekFrom::Start((1 << 20) + 8192)).unwrap();
        f.write_all(&b).unwrap();
    }
    let big = dir.join("big");
    fs::create_dir(&big).unwrap();
    for i in 0..BIG_DIR_ENTRIES {
        let size = rng.below(300);
        write_file(&big.join(format!("entry-{i:04}")), &mut rng, size);
    }
    let mut deep = dir.to_path_buf();
    for c in ["a", "b", "c", "d", "e", "f"] {
        deep = deep.join(c);
        fs::create_dir(&deep).unwrap();
        write_file(&deep.join("leaf"), &mut rng, 5000);
    }
    fs::hard_link(dir.join("file-4096"), dir.join("a").join("hardlink-4096")).unwrap();
    std::os::unix::fs::symlink("file-100", dir.join("link-short")).unwrap();
    let long_target: String = std::iter::repeat_n("x/", 900).collect();
    std::os::unix::fs::symlink(&long_target, dir.join("link-long")).unwrap();
    set_xattr(&dir.join("file-100"), "user.small", b"value");
    let mut big_value = vec![0u8; 1500];
    rng.fill(&mut big_value);
    set_xattr(&dir.join("file-70000"), "user.big", &big_value);
    for i in 0..20 {
        set_xattr(
            &dir.join("a"),
            &format!("user.many-{i:02}"),
            format!("v{i}").as_bytes(),
        );
    }
}

/// `mkfs.btrfs --rootdir src` into a new image file `img` of `size` bytes with `nodesize`,
/// default profiles (DUP metadata on one device) and the fixed [`FSID`].
pub fn mkfs_rootdir(src: &Path, img: &Path, size: u64, nodesize: u32) {
    require_tool("mkfs.btrfs");
    let f = fs::File::create(img).unwrap_or_else(|e| panic!("creating {img:?}: {e}"));
    f.set_len(size).unwrap();
    drop(f);
    run_ok(
        Command::new("mkfs.btrfs")
            .arg("-q")
            .arg("-f")
            .arg("--nodesize")
            .arg(nodesize.to_string())
            .arg("-U")
            .arg(FSID)
            .arg("--rootdir")
            .arg(src)
            .arg(img),
    );
}
