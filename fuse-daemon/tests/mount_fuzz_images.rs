//! btrfs-progs' crafted and fuzzed images (tests/fuzz-tests/images; many from kernel bug
//! reports). For each one, `ubtrfs mount` must either refuse cleanly (non-zero exit that is not
//! a panic, one error line on stderr, within the time limit) or mount; a mounted image is walked
//! completely (every file read, every symlink read, every xattr listed and read) within a time
//! limit, errors such as EIO/EUCLEAN being fine, and the daemon must stay alive and exit by
//! itself after the unmount. A hang is a failure.
//!
//! The images are read from `$UBTRFS_FUZZ_IMAGES`, by default
//! /work/shared/testdata/btrfs-progs-fuzz-images; a missing directory fails the test.
//! The outcome of every image is printed (see it with `-- --nocapture`) and is part of the
//! failure message.

mod common;

use common::mount::Mount;
use common::walk::{walk_everything, WalkLimits};
use common::{message_lines, require_fuse_env, require_tool, xz_decompress_into, TestDir};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEFAULT_DIR: &str = "/work/shared/testdata/btrfs-progs-fuzz-images";
const MOUNT_LIMIT: Duration = Duration::from_secs(15);
const WALK_LIMIT: Duration = Duration::from_secs(60);
/// All images together; beyond this the remaining ones are reported as not run (a failure).
const TOTAL_LIMIT: Duration = Duration::from_secs(900);

fn images_dir() -> PathBuf {
    std::env::var_os("UBTRFS_FUZZ_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

struct Outcome {
    name: String,
    ok: bool,
    text: String,
}

fn try_image(xz: &Path, work: &Path) -> Outcome {
    let name = xz.file_name().unwrap().to_string_lossy().into_owned();
    let dir = work.join(name.replace('.', "_"));
    fs::create_dir_all(&dir).unwrap();
    let img = xz_decompress_into(xz, &dir);
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let start = Instant::now();
    let outcome = match Mount::try_new_timeout(&img, &mnt, "ro", MOUNT_LIMIT) {
        Err(f) => {
            let code = f.exit.status.and_then(|s| s.code());
            let lines = message_lines(&f.exit.stderr);
            let first = lines.first().copied().unwrap_or("").to_string();
            if f.timed_out {
                Outcome {
                    name,
                    ok: false,
                    text: format!("HANG at mount (> {MOUNT_LIMIT:?}); {}", f.exit.describe()),
                }
            } else if f.exit.panicked() || code.is_none() || code == Some(0) {
                Outcome {
                    name,
                    ok: false,
                    text: format!("BAD REFUSAL: {}", f.exit.describe()),
                }
            } else if lines.len() != 1 {
                Outcome {
                    name,
                    ok: false,
                    text: format!(
                        "REFUSED WITHOUT ONE CLEAR LINE ({} error lines): {}",
                        lines.len(),
                        f.exit.describe()
                    ),
                }
            } else {
                Outcome {
                    name,
                    ok: true,
                    text: format!("refused in {:?}: {first}", f.elapsed),
                }
            }
        }
        Ok(mut m) => {
            let walk = m.run_guarded(WALK_LIMIT, |root| {
                walk_everything(&root, &WalkLimits::default())
            });
            match walk {
                Err(e) => {
                    let exit = m.unmount();
                    Outcome {
                        name,
                        ok: false,
                        text: format!("HANG during walk: {e}; {}", exit.describe()),
                    }
                }
                Ok(w) => {
                    let alive = m.is_alive();
                    let exit = m.unmount();
                    let summary = format!(
                        "mounted; {} dirs, {} files ({} bytes), {} symlinks, {} other, {} xattrs; \
                         errors: [{}]{}{}",
                        w.dirs,
                        w.files,
                        w.bytes_read,
                        w.symlinks,
                        w.other,
                        w.xattrs,
                        w.error_summary(),
                        if w.cycles > 0 {
                            format!("; {} directory cycles cut", w.cycles)
                        } else {
                            String::new()
                        },
                        if w.truncated { "; walk truncated" } else { "" }
                    );
                    if !alive || w.daemon_gone() {
                        Outcome {
                            name,
                            ok: false,
                            text: format!("DAEMON DIED: {summary}; {}", exit.describe()),
                        }
                    } else if !exit.is_clean_exit() || exit.panicked() {
                        Outcome {
                            name,
                            ok: false,
                            text: format!("BAD EXIT after unmount: {summary}; {}", exit.describe()),
                        }
                    } else {
                        Outcome {
                            name,
                            ok: true,
                            text: format!("{summary} in {:?}", start.elapsed()),
                        }
                    }
                }
            }
        }
    };
    let _ = fs::remove_file(&img);
    outcome
}

// Test scenario: every btrfs-progs fuzz image is refused cleanly or served without a panic, a
// hang or a dying daemon; the per-image outcome is printed.
#[test]
fn fuzz_images_refused_or_served() {
    require_fuse_env();
    require_tool("xz");
    let dir = images_dir();
    assert!(
        dir.is_dir(),
        "fuzz images directory {dir:?} is missing (set UBTRFS_FUZZ_IMAGES)"
    );
    let mut images: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".raw.xz") || n.ends_with(".img.xz")
        })
        .collect();
    images.sort();
    assert!(!images.is_empty(), "no .raw.xz/.img.xz images in {dir:?}");

    let t = TestDir::new("fuzz-images");
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for xz in &images {
        if start.elapsed() > TOTAL_LIMIT {
            outcomes.push(Outcome {
                name: xz.file_name().unwrap().to_string_lossy().into_owned(),
                ok: false,
                text: format!("NOT RUN: the run exceeded {TOTAL_LIMIT:?}"),
            });
            continue;
        }
        let o = try_image(xz, t.path());
        println!(
            "{} {}: {}",
            if o.ok { "ok  " } else { "FAIL" },
            o.name,
            o.text
        );
        outcomes.push(o);
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let refused = outcomes
        .iter()
        .filter(|o| o.ok && o.text.starts_with("refused"))
        .count();
    let served = outcomes.iter().filter(|o| o.ok).count() - refused;
    let summary = format!(
        "{} images: {refused} refused cleanly, {served} mounted and walked, {} failed",
        outcomes.len(),
        failed.len()
    );
    println!("{summary}");
    if !failed.is_empty() {
        let mut msg = format!("{summary}:\n");
        for o in &failed {
            msg.push_str(&format!("  {}: {}\n", o.name, o.text));
        }
        panic!("{msg}");
    }
}
