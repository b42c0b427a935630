//! Damaged images: a flipped data block, one or both DUP copies of a metadata leaf, both copies
//! of the root of the root tree or chunk tree, a bad primary superblock, and files that are not
//! btrfs at all. ubtrfs must answer EIO (or EUCLEAN) exactly where the damage is, read
//! everything else, never panic, and fail a mount it cannot do with one clear line.
//!
//! Physical locations come from btrfs-progs: `btrfs inspect-internal dump-tree` for the leaves
//! and their keys, `btrfs-map-logical` for both DUP copies, `dump-super` for tree roots; data
//! blocks are found by searching the image for content written by the test.

mod common;

use common::compare::{diff, snapshot, CompareOptions, Snapshot};
use common::mount::{LoopMount, Mount};
use common::tree::{make_file, Content, Rng};
use common::walk::{walk_everything, WalkLimits};
use common::{
    errno_name, errno_of, find_in_file, flip_bytes, message_lines, mkfs_image, require_fuse_env,
    sh, snapshot_guarded, Mkfs, Problems, TestDir, PANIC_EXIT_CODE,
};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const NODESIZE: u64 = 16384;

/// A small tree for corruption tests: `data/` with larger files (regular extents),
/// `many/` with 1500 small files (inline, spread over many fs-tree leaves), `other/` with a
/// few files of each kind.
fn corruption_tree(src: &Path, seed: u64) {
    let data = src.join("data");
    let many = src.join("many");
    let other = src.join("other");
    for d in [&data, &many, &other] {
        fs::create_dir_all(d).unwrap();
    }
    for i in 0..4u64 {
        make_file(
            &data.join(format!("file-{i}")),
            seed + i,
            65536 + i * 4096,
            Content::Random,
        );
    }
    for i in 0..1500u64 {
        make_file(
            &many.join(format!("small-{i:04}")),
            seed + 100 + i,
            20 + (i % 500),
            Content::Text,
        );
    }
    for (i, len) in [0u64, 100, 5000, 300_000].into_iter().enumerate() {
        make_file(
            &other.join(format!("other-{len}")),
            seed + 5000 + i as u64,
            len,
            Content::Mixed,
        );
    }
    std::os::unix::fs::symlink("../data/file-0", other.join("link")).unwrap();
}

/// Build a corruption-test image; returns (image, source snapshot).
fn build(t: &TestDir, seed: u64) -> (PathBuf, PathBuf, Snapshot) {
    let src = t.mkdir("src");
    corruption_tree(&src, seed);
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            rootdir: Some(&src),
            ..Default::default()
        },
    );
    let snap = snapshot(&src);
    (img, src, snap)
}

/// Physical offsets of every copy of the tree block at `logical` (btrfs-map-logical).
fn physical_copies(img: &Path, logical: u64) -> Vec<u64> {
    let out = sh(
        "btrfs-map-logical",
        &[
            "-l",
            &logical.to_string(),
            "-b",
            &NODESIZE.to_string(),
            img.to_str().unwrap(),
        ],
    );
    let v: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with("mirror"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "physical")?;
            w.get(i + 1)?.parse().ok()
        })
        .collect();
    assert!(!v.is_empty(), "btrfs-map-logical printed no mirror:\n{out}");
    v
}

/// Corrupt one copy of a tree block: 16 bytes well inside the checksummed area.
fn corrupt_block_copy(img: &Path, physical: u64) {
    flip_bytes(img, physical + 4000, 16);
}

/// A value from `btrfs inspect-internal dump-super`.
fn super_field(img: &Path, field: &str) -> u64 {
    let out = sh(
        "btrfs",
        &["inspect-internal", "dump-super", img.to_str().unwrap()],
    );
    out.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(field)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {field} in dump-super:\n{out}"))
}

/// The leaves of the fs tree: (logical address, objectids of the keys in it, key types).
fn fs_tree_leaves(img: &Path) -> Vec<(u64, Vec<u64>, Vec<String>)> {
    let out = sh(
        "btrfs",
        &[
            "inspect-internal",
            "dump-tree",
            "-t",
            "5",
            img.to_str().unwrap(),
        ],
    );
    let mut leaves: Vec<(u64, Vec<u64>, Vec<String>)> = Vec::new();
    let mut in_leaf = false;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() >= 3 && w[0] == "leaf" && w[2] == "items" {
            leaves.push((w[1].parse().unwrap(), Vec::new(), Vec::new()));
            in_leaf = true;
        } else if w.len() >= 3 && w[0] == "node" && w[2] == "level" {
            in_leaf = false;
        } else if in_leaf && w.len() >= 5 && w[0] == "item" && w[2] == "key" {
            let obj = w[3].trim_start_matches('(');
            if let (Ok(obj), Some(l)) = (obj.parse::<u64>(), leaves.last_mut()) {
                l.1.push(obj);
                l.2.push(w[4].to_string());
            }
        }
    }
    assert!(leaves.len() > 3, "expected a multi-leaf fs tree:\n{out}");
    leaves
}

/// Files of `dir` (relative to `root`) by inode number, as a kernel mount shows them.
fn inodes_in(root: &Path, dir: &str) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(root.join(dir))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.metadata().unwrap().ino(),
                Path::new(dir).join(e.file_name()),
            )
        })
        .collect();
    v.sort();
    v
}

fn is_eio_or_euclean(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EUCLEAN))
}

/// Checks common to every damaged mount: the daemon is alive after the operations and exits
/// by itself, without a panic, after unmount.
fn check_daemon(p: &mut Problems, m: Mount) {
    let mut m = m;
    if !m.is_alive() {
        p.add_one(
            "daemon died while serving a damaged image",
            m.try_exit().map(|e| e.describe()).unwrap_or_default(),
        );
        return;
    }
    let exit = m.unmount();
    if !exit.is_clean_exit() || exit.panicked() {
        p.add_one("daemon exit after unmount", exit.describe());
    }
}

// Test scenario: one byte flipped in one data block of one file (found by searching the image
// for content only that block holds): reading that file fails with EIO, as on a kernel mount,
// every other file reads correctly, and the daemon keeps running.
#[test]
fn corrupt_data_block_gives_eio() {
    require_fuse_env();
    let t = TestDir::new("corrupt-data");
    let (img, src, expected) = build(&t, 10);
    let victim_rel = Path::new("data/file-2");
    let content = fs::read(src.join(victim_rel)).unwrap();
    let needle = &content[8192 + 100..8192 + 164];
    let hits = find_in_file(&img, needle);
    assert_eq!(
        hits.len(),
        1,
        "the victim's block must be in the image exactly once"
    );
    flip_bytes(&img, hits[0] + 7, 1);

    let mnt = t.mkdir("mnt");
    let mut p = Problems::default();
    let mut m = Mount::new(&img, &mnt);
    let victim = m.path().join(victim_rel);
    let read = m
        .run_guarded(LIMIT, move |_| fs::read(victim))
        .unwrap_or_else(|e| panic!("{e}"));
    match read {
        Ok(data) => p.add_one(
            "reading the damaged file",
            format!(
                "succeeded with {} bytes (equal to the original: {})",
                data.len(),
                data == content
            ),
        ),
        Err(e) if errno_of(&e) == libc::EIO => {}
        Err(e) => p.add_one(
            "reading the damaged file",
            format!("expected EIO, got {e} ({})", errno_name(errno_of(&e))),
        ),
    }
    let got = snapshot_guarded(&mut m, LIMIT);
    let other: Vec<String> = diff(&expected, &got, &CompareOptions::mkfs_vs_source())
        .into_iter()
        .filter(|l| !l.starts_with("/data/file-2: read: EIO"))
        .collect();
    p.add("files other than the damaged one", other);
    check_daemon(&mut p, m);

    // Oracle: the kernel gives EIO on that file too (proves the damage is where we think).
    let k = LoopMount::new(&img, &mnt, "ro");
    match fs::read(k.path().join(victim_rel)) {
        Err(e) if errno_of(&e) == libc::EIO => {}
        other => p.add_one(
            "harness: kernel read of the damaged file",
            format!("expected EIO, got {other:?}"),
        ),
    }
    drop(k);
    p.check("corrupt data block");
}

/// Find a fs-tree leaf holding only items of files in `many/` (none of the directory itself),
/// not the first or last leaf. Returns (logical, the files whose INODE_ITEM it holds).
fn pick_leaf_of_many(img: &Path, mnt: &Path) -> (u64, Vec<PathBuf>) {
    let k = LoopMount::new(img, mnt, "ro");
    let files = inodes_in(k.path(), "many");
    drop(k);
    let inos: BTreeSet<u64> = files.iter().map(|(i, _)| *i).collect();
    let leaves = fs_tree_leaves(img);
    let n = leaves.len();
    for (logical, objs, types) in leaves.into_iter().skip(1).take(n - 2) {
        if objs.iter().all(|o| inos.contains(o)) {
            let victims: Vec<PathBuf> = objs
                .iter()
                .zip(&types)
                .filter(|(_, t)| t.as_str() == "INODE_ITEM")
                .filter_map(|(o, _)| files.iter().find(|(i, _)| i == o).map(|(_, p)| p.clone()))
                .collect();
            if victims.len() >= 3 {
                return (logical, victims);
            }
        }
    }
    panic!("no fs-tree leaf holds only items of files in many/");
}

// Test scenario: one of the two DUP copies of a fs-tree leaf is damaged: the checksum catches
// it, the other copy is used, and the whole tree reads exactly as the source.
#[test]
fn one_metadata_copy_corrupt_reads_fine() {
    require_fuse_env();
    let t = TestDir::new("corrupt-meta-one");
    let (img, _src, expected) = build(&t, 20);
    let mnt = t.mkdir("mnt");
    let (leaf, _victims) = pick_leaf_of_many(&img, &mnt);
    let copies = physical_copies(&img, leaf);
    assert_eq!(copies.len(), 2, "metadata should be DUP: {copies:?}");
    corrupt_block_copy(&img, copies[0]);

    let mut p = Problems::default();
    let mut m = Mount::new(&img, &mnt);
    let got = snapshot_guarded(&mut m, LIMIT);
    p.add(
        "tree with one bad copy of a leaf vs source",
        diff(&expected, &got, &CompareOptions::mkfs_vs_source()),
    );
    check_daemon(&mut p, m);
    p.check(&format!("one bad copy of leaf {leaf}"));
}

// Test scenario: both DUP copies of a fs-tree leaf are damaged: looking up or reading the files
// whose items live in that leaf fails with EIO or EUCLEAN (the kernel agrees), files elsewhere
// read correctly, a walk of everything finishes, and the daemon survives and exits cleanly.
#[test]
fn both_metadata_copies_corrupt_give_eio() {
    require_fuse_env();
    let t = TestDir::new("corrupt-meta-both");
    let (img, _src, expected) = build(&t, 30);
    let mnt = t.mkdir("mnt");
    let (leaf, victims) = pick_leaf_of_many(&img, &mnt);
    for c in physical_copies(&img, leaf) {
        corrupt_block_copy(&img, c);
    }

    let mut p = Problems::default();
    let mut m = Mount::new(&img, &mnt);
    let vs = victims.clone();
    let results = m
        .run_guarded(LIMIT, move |root| {
            vs.iter()
                .map(|v| {
                    let r = fs::symlink_metadata(root.join(v))
                        .and_then(|_| fs::read(root.join(v)).map(|_| ()));
                    (v.clone(), r)
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    for (v, r) in results {
        match r {
            Err(e) if is_eio_or_euclean(&e) => {}
            Err(e) => p.add_one(
                "files in the damaged leaf",
                format!(
                    "{v:?}: expected EIO/EUCLEAN, got {}",
                    errno_name(errno_of(&e))
                ),
            ),
            Ok(()) => p.add_one(
                "files in the damaged leaf",
                format!("{v:?}: stat and read succeeded"),
            ),
        }
    }
    let got = snapshot_guarded(&mut m, LIMIT);
    let outside: Vec<String> = diff(&expected, &got, &CompareOptions::mkfs_vs_source())
        .into_iter()
        .filter(|l| !l.starts_with("/many"))
        .collect();
    p.add("files outside the damaged leaf", outside);
    let walk = m
        .run_guarded(LIMIT, |root| walk_everything(&root, &WalkLimits::default()))
        .unwrap_or_else(|e| panic!("{e}"));
    let bad: Vec<String> = walk
        .errors
        .iter()
        .filter(|(_, _, e)| *e != libc::EIO && *e != libc::EUCLEAN)
        .map(|(path, op, e)| format!("{path:?}: {op}: {}", errno_name(*e)))
        .collect();
    p.add("walk: errors other than EIO/EUCLEAN", bad);
    check_daemon(&mut p, m);

    let k = LoopMount::new(&img, &mnt, "ro");
    if fs::symlink_metadata(k.path().join(&victims[0])).is_ok() {
        p.add_one(
            "harness: the kernel can still stat a file of the damaged leaf",
            format!("{:?}", victims[0]),
        );
    }
    drop(k);
    p.check(&format!("both copies of leaf {leaf} damaged"));
}

/// Result of trying to mount a damaged image: Err(problems) or Ok(description).
fn mount_refused_or_serves(img: &Path, mnt: &Path, expected: Option<&Snapshot>) -> Problems {
    let mut p = Problems::default();
    match Mount::try_new(img, mnt, "ro") {
        Err(f) => {
            let code = f.exit.status.and_then(|s| s.code());
            let lines = message_lines(&f.exit.stderr);
            if f.timed_out {
                p.add_one("mount", format!("hung: {}", f.exit.describe()));
            } else if code.is_none() || code == Some(0) || code == Some(PANIC_EXIT_CODE) {
                p.add_one("mount refused badly", f.exit.describe());
            } else if lines.len() != 1 || f.exit.panicked() {
                p.add_one(
                    "mount refused without exactly one error line on stderr (log lines aside)",
                    f.exit.describe(),
                );
            } else {
                eprintln!("{img:?}: refused: {}", lines[0]);
            }
        }
        Ok(mut m) => {
            eprintln!("{img:?}: mounted");
            match m.run_guarded(LIMIT, |root| walk_everything(&root, &WalkLimits::default())) {
                Ok(w) => {
                    if w.daemon_gone() {
                        p.add_one("walk", format!("daemon went away: {}", w.error_summary()));
                    }
                }
                Err(e) => p.add_one("walk", e),
            }
            if let Some(exp) = expected {
                if m.is_alive() {
                    let got = snapshot_guarded(&mut m, LIMIT);
                    p.add(
                        "mounted anyway, so it must show the right tree",
                        diff(exp, &got, &CompareOptions::mkfs_vs_source()),
                    );
                }
            }
            check_daemon(&mut p, m);
        }
    }
    p
}

// Test scenario: both copies of the root tree's root block, and in a second image both copies
// of the chunk tree's root, are damaged: mounting fails with one clear line and a non-zero exit
// that is not a panic (as the kernel refuses the mount), or, if ubtrfs recovers through a
// backup root, it serves the right tree without dying.
#[test]
fn root_level_tree_corrupt_mount_fails_cleanly() {
    require_fuse_env();
    let mut all = Problems::default();
    for (i, field) in ["root", "chunk_root"].into_iter().enumerate() {
        let t = TestDir::new(&format!("corrupt-{field}"));
        let (img, _src, expected) = build(&t, 40 + i as u64);
        let logical = super_field(&img, field);
        for c in physical_copies(&img, logical) {
            corrupt_block_copy(&img, c);
        }
        let mnt = t.mkdir("mnt");
        if let Ok(k) = LoopMount::try_new(&img, &mnt, "ro") {
            drop(k);
            all.add_one(
                "harness",
                format!("the kernel mounted the image with a damaged {field}"),
            );
        }
        all.merge(
            &format!("damaged {field}"),
            mount_refused_or_serves(&img, &mnt, Some(&expected)),
        );
    }
    all.check("root-level tree damaged");
}

// Test scenario: the primary superblock's checksum is broken (the mirror at 64 MiB is intact):
// ubtrfs either refuses with one clear line or mounts from the mirror (warning) and then shows
// exactly the source tree; it never panics.
#[test]
fn bad_primary_superblock() {
    require_fuse_env();
    let t = TestDir::new("corrupt-super");
    let (img, _src, expected) = build(&t, 50);
    flip_bytes(&img, 65536 + 0x100, 4);
    let mnt = t.mkdir("mnt");
    mount_refused_or_serves(&img, &mnt, Some(&expected)).check("bad primary superblock");
}

// Test scenario: files that are not btrfs at all (64 MiB of random bytes, 10 MiB of zeros, a
// 100-byte file, an empty file, a directory, a missing path) are refused within the time
// limit: non-zero exit that is not a panic, exactly one error line on stderr (besides log
// lines).
#[test]
fn garbage_images_are_refused() {
    require_fuse_env();
    let t = TestDir::new("garbage");
    let mut rng = Rng::new(60);
    let random = t.join("random.img");
    {
        let mut buf = vec![0u8; 64 << 20];
        rng.fill(&mut buf);
        fs::write(&random, &buf).unwrap();
    }
    let zeros = t.join("zeros.img");
    fs::File::create(&zeros).unwrap().set_len(10 << 20).unwrap();
    let tiny = t.join("tiny.img");
    fs::write(&tiny, [0x5au8; 100]).unwrap();
    let empty = t.join("empty.img");
    fs::write(&empty, b"").unwrap();
    let dir = t.mkdir("a-directory");
    let missing = t.join("does-not-exist.img");
    let mnt = t.mkdir("mnt");
    let mut all = Problems::default();
    for img in [&random, &zeros, &tiny, &empty, &dir, &missing] {
        match Mount::try_new(img, &mnt, "ro") {
            Ok(m) => {
                let e = m.unmount();
                all.add_one(
                    format!("{img:?}"),
                    format!("was mounted; daemon {}", e.describe()),
                );
            }
            Err(f) => {
                let code = f.exit.status.and_then(|s| s.code());
                let lines = message_lines(&f.exit.stderr);
                if f.timed_out
                    || code.is_none()
                    || code == Some(0)
                    || code == Some(PANIC_EXIT_CODE)
                    || lines.len() != 1
                {
                    all.add_one(
                        format!("{img:?}"),
                        format!(
                            "{}{}",
                            if f.timed_out { "timed out; " } else { "" },
                            f.exit.describe()
                        ),
                    );
                } else {
                    eprintln!("{img:?}: {}", lines[0]);
                }
            }
        }
    }
    all.check("garbage images");
}
