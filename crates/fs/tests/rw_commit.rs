//! Read-write commits checked by the oracles: `btrfs check --readonly` and a kernel mount.

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use std::path::PathBuf;
use std::process::Command;
use ubtrfs_fs::{FsInfo, MountOptions};

fn tmpdir(name: &str) -> PathBuf {
    let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("rw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        ..MountOptions::default()
    }
}

// Test scenario: on a fresh mkfs.btrfs image, ubtrfs creates files and directories in one
// transaction and commits; btrfs check finds no error, ubtrfs and the kernel both see the names.
#[test]
fn create_commit_check_and_kernel_mount() {
    let d = tmpdir("create");
    let img = d.join("img");
    mkfs_btrfs(&img, 512 << 20, &[]);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (sub, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"subdir", 0o040755, 0, 0, 0)
                .unwrap();
        for i in 0..300 {
            let name = format!("file-{i:04}-with-a-longer-name-to-fill-leaves");
            ubtrfs_fs::inode::btrfs_new_inode(
                &fs,
                root,
                sub,
                name.as_bytes(),
                0o100644,
                0,
                1000,
                1000,
            )
            .unwrap();
        }
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"top", 0o100600, 0, 0, 0).unwrap();
        assert!(matches!(
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"top", 0o100600, 0, 0, 0),
            Err(ubtrfs_fs::FsError::Exists)
        ));
        let st = fs.commit().unwrap().expect("something to commit");
        assert!(st.blocks_written > 0);
        // Readers see the new state.
        let entries = ubtrfs_fs::dir_item::readdir(&fs, root, sub, 0, 1000).unwrap();
        assert_eq!(entries.len(), 300);
    }
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let top = ubtrfs_fs::dir_item::readdir(&fs, root, dir, 0, 100).unwrap();
        let names: Vec<_> = top
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert_eq!(names, vec!["subdir", "top"]);
    }
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "ro");
        let n = std::fs::read_dir(m.dir.join("subdir")).unwrap().count();
        assert_eq!(n, 300);
        let md = std::fs::metadata(
            m.dir
                .join("subdir/file-0042-with-a-longer-name-to-fill-leaves"),
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.mode() & 0o7777), (1000, 0o644));
    }
    // A second transaction on top of the first.
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"second", 0o100644, 0, 0, 0).unwrap();
        fs.commit().unwrap();
    }
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: files written through the buffered write path (inline-sized, sector-odd,
// a 12 MiB file written in 4 KiB pieces, an overwrite in the middle of it that splits its
// extent, an append) are read back identically by ubtrfs before and after commit, by a fresh
// read-only open, and by the kernel; btrfs check is clean; the sequential file is one extent.
#[test]
fn buffered_writes_writeback_and_check() {
    use std::os::unix::fs::MetadataExt;
    let d = tmpdir("write");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let mut expect: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let mk = |name: &str, content: &[u8], chunk: usize| {
            let (ino, _) = ubtrfs_fs::inode::btrfs_new_inode(
                &fs,
                root,
                dir,
                name.as_bytes(),
                0o100644,
                0,
                0,
                0,
            )
            .unwrap();
            for (i, c) in content.chunks(chunk.max(1)).enumerate() {
                ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, (i * chunk) as u64, c)
                    .unwrap();
            }
            ino
        };
        for (name, len, chunk) in [
            ("tiny", 100usize, 100usize),
            ("inline-max", 2048, 7),
            ("over-inline", 2049, 2049),
            ("odd", 3000, 1000),
            ("seq", 12 << 20, 4096),
        ] {
            let c = pattern(len as u64, len);
            mk(name, &c, chunk);
            expect.push((name.to_string(), c));
        }
        fs.sync().unwrap();
        // Overwrite 64 KiB in the middle of "seq" (splits its extent) and append to "odd".
        let seq_ino = ubtrfs_fs::dir_item::lookup(&fs, root, dir, b"seq").unwrap();
        let ubtrfs_fs::dir_item::Target::Inode { ino: seq_ino, .. } = seq_ino else {
            panic!()
        };
        let patch = pattern(99, 65536);
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, seq_ino, 5 << 20, &patch).unwrap();
        expect[4].1[5 << 20..(5 << 20) + 65536].copy_from_slice(&patch);
        let odd = match ubtrfs_fs::dir_item::lookup(&fs, root, dir, b"odd").unwrap() {
            ubtrfs_fs::dir_item::Target::Inode { ino, .. } => ino,
            _ => panic!(),
        };
        let more = pattern(7, 5000);
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, odd, 3000, &more).unwrap();
        expect[3].1.extend_from_slice(&more);
        // Dirty data is visible before writeback.
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, odd).unwrap();
        let emi = fs.ems.inode(root, odd);
        let got = ubtrfs_fs::file::read(&fs, root, odd, &ii, &emi, 0, 1 << 20).unwrap();
        assert_eq!(got, expect[3].1);
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for (name, content) in &expect {
            let ubtrfs_fs::dir_item::Target::Inode { ino, .. } =
                ubtrfs_fs::dir_item::lookup(&fs, root, dir, name.as_bytes()).unwrap()
            else {
                panic!()
            };
            let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
            assert_eq!(ii.size, content.len() as u64, "{name}");
            let emi = fs.ems.inode(root, ino);
            let got = ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, 0, 64 << 20).unwrap();
            assert!(got == *content, "{name}: content differs");
        }
    }
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "ro");
        for (name, content) in &expect {
            let got = std::fs::read(m.dir.join(name)).unwrap();
            assert!(got == *content, "kernel reads {name} differently");
            let md = std::fs::metadata(m.dir.join(name)).unwrap();
            assert_eq!(md.size(), content.len() as u64);
        }
        // The 4 KiB sequential writes became one extent; the overwrite split it in three.
        let out = Command::new("filefrag")
            .arg(m.dir.join("seq"))
            .output()
            .expect("filefrag (e2fsprogs) must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(": 3 extents found"), "{text}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: enough files to fill several MiB of metadata, on a 1 GiB mkfs.btrfs image
// whose metadata DUP chunk holds the 64 MiB superblock copy: allocation must skip the copy
// (btrfs check verifies every superblock mirror and the extent tree), and the tree grows
// several levels.
#[test]
fn many_files_skip_superblock_copies() {
    let d = tmpdir("many");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let before = std::fs::read(&img).unwrap()[(64 << 20)..(64 << 20) + 4096].to_vec();
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        // No free range of any block group overlaps a superblock copy, although mkfs.btrfs's
        // free space tree lists the copy inside a free extent.
        {
            let t = fs.trans.as_ref().unwrap().lock();
            let chunks: Vec<_> = fs.reader.chunks().iter().cloned().collect();
            let mut checked = 0;
            for c in &chunks {
                let g = &t.space.groups[&c.logical];
                for (l, len) in ubtrfs_ctree::block_group::super_stripes(c.logical, &c.item) {
                    checked += 1;
                    for (&fs_, &fl) in &g.free {
                        assert!(
                            fs_ + fl <= l || fs_ >= l + len,
                            "free {fs_}+{fl} overlaps superblock stripe {l}+{len}"
                        );
                    }
                }
            }
            assert!(
                checked >= 1,
                "the 1 GiB image has a superblock copy inside a chunk"
            );
        }
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for i in 0..12000 {
            let name = format!("entry-{i:06}-padding-padding-padding-padding");
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, name.as_bytes(), 0o100644, 0, 0, 0)
                .unwrap();
            if i % 4000 == 3999 {
                fs.commit().unwrap();
            }
        }
        fs.sync().unwrap();
    }
    let after = std::fs::read(&img).unwrap()[(64 << 20)..(64 << 20) + 4096].to_vec();
    // The mirror was rewritten by the commits (new generation) but is still a superblock.
    assert_eq!(&after[64..72], b"_BHRfS_M");
    assert_ne!(before, after);
    btrfs_check(&img);
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    assert_eq!(std::fs::read_dir(&m.dir).unwrap().count(), 12000);
    drop(m);
    let _ = std::fs::remove_dir_all(&d);
}

/// `bytes_used` of every ROOT_ITEM of the global and fs trees, from `btrfs inspect-internal
/// dump-tree -t root`, by tree id.
fn root_bytes_used(img: &std::path::Path) -> Vec<(u64, u64)> {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-tree", "-t", "root"])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ids = [
        ("EXTENT_TREE", 2),
        ("DEV_TREE", 4),
        ("FS_TREE", 5),
        ("CSUM_TREE", 7),
        ("UUID_TREE", 9),
        ("FREE_SPACE_TREE", 10),
        ("BLOCK_GROUP_TREE", 11),
    ];
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        for (name, id) in ids {
            if l.contains(&format!("key ({name} ROOT_ITEM 0)")) {
                let next = lines[i + 1];
                let v = next
                    .split_whitespace()
                    .skip_while(|w| *w != "bytes_used")
                    .nth(1)
                    .unwrap();
                found.push((id, v.parse().unwrap()));
            }
        }
    }
    found
}

/// Bytes of the blocks of tree `id` (every leaf and node dump-tree prints, × nodesize).
fn tree_bytes(img: &std::path::Path, id: u64) -> u64 {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-tree", "-t", &id.to_string()])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let blocks = text
        .lines()
        .filter(|l| (l.starts_with("leaf ") || l.starts_with("node ")) && l.contains(" items "))
        .count() as u64;
    blocks * 16384
}

// Test scenario: a transaction grows the fs, extent, csum and free space trees by many blocks
// (thousands of files, data) and another shrinks some again (unlinks); after each commit every
// ROOT_ITEM's bytes_used equals its tree's blocks × nodesize, as the kernel keeps it
// (root_add_used_bytes / root_sub_used_bytes; the global block reserve is sized from it).
#[test]
fn root_item_bytes_used_follows_the_tree() {
    let d = tmpdir("bytes-used");
    let img = d.join("img");
    mkfs_btrfs(&img, 512 << 20, &[]);
    let check = |what: &str| {
        let used = root_bytes_used(&img);
        assert!(used.len() >= 5, "{what}: root items {used:?}");
        eprintln!("{what}: bytes_used by tree {used:?}");
        for (id, bytes) in used {
            assert_eq!(bytes, tree_bytes(&img, id), "{what}: tree {id} bytes_used");
        }
    };
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for i in 0..2000 {
            let name = format!("file-{i:05}-with-a-name-long-enough-to-need-leaves");
            let (ino, _) = ubtrfs_fs::inode::btrfs_new_inode(
                &fs,
                root,
                dir,
                name.as_bytes(),
                0o100644,
                0,
                0,
                0,
            )
            .unwrap();
            if i % 10 == 0 {
                ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, 0, &pattern(i, 70000))
                    .unwrap();
            }
        }
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    check("after growing");
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for i in (0..2000).filter(|i| i % 3 != 0) {
            let name = format!("file-{i:05}-with-a-name-long-enough-to-need-leaves");
            ubtrfs_fs::inode::btrfs_unlink(&fs, root, dir, name.as_bytes()).unwrap();
        }
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    check("after shrinking");
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: the new delalloc bytes stat adds to nbytes (btrfs_getattr) follow the dirty
// sectors that were holes: appends, a write past EOF and one into a hole inside i_size count,
// rewriting a dirty sector or overwriting written data does not, a truncate of dirty data
// takes its sectors out, and a writeback moves the bytes into nbytes exactly.
#[test]
fn new_delalloc_bytes_follow_dirty_holes() {
    let d = tmpdir("delalloc");
    let img = d.join("img");
    mkfs_btrfs(&img, 512 << 20, &[]);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (ino, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"f", 0o100644, 0, 0, 0).unwrap();
        let write = |off: u64, len: usize| {
            ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, off, &pattern(off, len))
                .unwrap();
        };
        let new = || ubtrfs_fs::file_write::new_delalloc_bytes(&fs, root, ino);
        let nbytes = || ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap().nbytes;
        write(0, 65536);
        assert_eq!((new(), nbytes()), (65536, 0));
        write(1 << 20, 4096);
        assert_eq!(new(), 65536 + 4096);
        write(100, 5000);
        assert_eq!(new(), 65536 + 4096, "rewriting dirty sectors adds nothing");
        ubtrfs_fs::file_write::truncate_dirty(&fs, root, ino, 65536);
        assert_eq!(new(), 65536, "the truncated sector is gone");
        ubtrfs_fs::file_write::btrfs_writeback(&fs, root, ino).unwrap();
        assert_eq!((new(), nbytes()), (0, 65536));
        write(16384, 8192);
        assert_eq!(new(), 0, "an overwrite of written data is not new");
        write(300 << 10, 4096);
        assert_eq!(new(), 4096, "past EOF");
        write(128 << 10, 4096);
        assert_eq!(new(), 8192, "a hole inside i_size");
        ubtrfs_fs::file_write::btrfs_writeback(&fs, root, ino).unwrap();
        assert_eq!((new(), nbytes()), (0, 65536 + 8192));
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}
