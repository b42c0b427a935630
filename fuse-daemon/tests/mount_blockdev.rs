//! Mounting the daemon on a block device (a loop device): a remount right after `umount`
//! succeeds even though the previous daemon may still be closing the device, while a device
//! really in use (held O_EXCL by another program for the whole wait, or mounted by the kernel)
//! is refused with one clear error.

mod common;

use common::mount::{mount_at, LoopDevice, LoopMount, Mount, MOUNT_TIMEOUT};
use common::{check_image, mkfs_image, require_fuse_env, run_with_timeout, Mkfs, TestDir};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;

fn payload(round: usize) -> Vec<u8> {
    (0..(4usize << 20))
        .map(|i| (i.wrapping_mul(31) ^ round.wrapping_mul(131)) as u8)
        .collect()
}

// Test scenario: mount a loop device read-write, write a few MiB (left for the daemon's final
// commit), `fusermount3 -u`, and mount the same device again at once (on another mountpoint,
// so the previous daemon's guard never touches the new mount) — 20 times. `umount` returns
// before the FUSE daemon has committed and closed the device, so every new mount starts while
// the previous daemon may still hold the device exclusively. Each mount must succeed and see
// the data the previous daemon committed on its way out; the image must check clean.
#[test]
fn remount_right_after_umount_of_a_block_device() {
    require_fuse_env();
    let t = TestDir::new("blockdev-remount");
    let img = t.join("img");
    mkfs_image(&img, &Mkfs::default());
    let lo = LoopDevice::attach(&img);
    let mnts = [t.mkdir("a"), t.mkdir("b")];
    let mut prev: Option<Mount> = None;
    for round in 0..ROUNDS {
        let mnt = &mnts[round % 2];
        let m = match Mount::try_new(lo.path(), mnt, "rw") {
            Ok(m) => m,
            Err(f) => panic!(
                "round {round}: mount of {:?} right after umount failed{} after {:?}: {}",
                lo.path(),
                if f.timed_out { " (timed out)" } else { "" },
                f.elapsed,
                f.exit.describe()
            ),
        };
        if let Some(p) = prev.take() {
            let e = p.unmount();
            assert!(
                e.is_clean_exit(),
                "round {round}: the previous daemon {}",
                e.describe()
            );
        }
        if round > 0 {
            let name = format!("f{}", round - 1);
            let got = fs::read(m.path().join(&name))
                .unwrap_or_else(|e| panic!("round {round}: reading {name}: {e}"));
            assert!(
                got == payload(round - 1),
                "round {round}: {name} does not hold what the previous mount wrote"
            );
        }
        fs::write(m.path().join(format!("f{round}")), payload(round))
            .unwrap_or_else(|e| panic!("round {round}: writing: {e}"));
        let out = run_with_timeout(
            Command::new("fusermount3").arg("-u").arg(m.path()),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("round {round}: fusermount3 -u hung"));
        assert!(
            out.status.success(),
            "round {round}: fusermount3 -u: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        prev = Some(m);
    }
    if let Some(p) = prev.take() {
        let e = p.unmount();
        assert!(e.is_clean_exit(), "last daemon {}", e.describe());
    }
    drop(lo);
    check_image(&img);
}

// Test scenario: another program holds the loop device O_EXCL. With a 1.5 s wait
// (UBTRFS_DEVICE_WAIT_MS) the mount fails after the wait with one message saying the device
// is in use, and nothing gets mounted; released within the wait, the same mount succeeds.
#[test]
fn block_device_held_exclusively_is_refused_after_the_wait() {
    require_fuse_env();
    let t = TestDir::new("blockdev-excl");
    let img = t.join("img");
    mkfs_image(&img, &Mkfs::default());
    let lo = LoopDevice::attach(&img);
    let mnt = t.mkdir("mnt");
    let holder = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(lo.path())
        .unwrap_or_else(|e| panic!("opening {:?} O_EXCL: {e}", lo.path()));
    let wait = Duration::from_millis(1500);
    let env = [("UBTRFS_DEVICE_WAIT_MS", "1500")];
    match Mount::try_new_env(lo.path(), &mnt, "rw", MOUNT_TIMEOUT, &env) {
        Ok(m) => {
            drop(m);
            panic!(
                "mounted {:?} while another program held it O_EXCL",
                lo.path()
            );
        }
        Err(f) => {
            assert!(!f.timed_out, "the daemon hung: {}", f.exit.describe());
            assert!(
                f.elapsed >= wait,
                "gave up after {:?}, before the {wait:?} wait: {}",
                f.elapsed,
                f.exit.describe()
            );
            let dev = lo.path().display().to_string();
            let errors: Vec<&str> = f
                .exit
                .stderr
                .lines()
                .filter(|l| l.contains("in use"))
                .collect();
            assert!(
                errors.len() == 1
                    && errors[0].contains(&dev)
                    && errors[0].contains("opened exclusively by another program"),
                "expected one clear 'in use' error naming {dev}: {}",
                f.exit.describe()
            );
        }
    }
    assert!(mount_at(&mnt).is_none(), "something got mounted at {mnt:?}");

    // Released half-way through the wait: the mount goes through.
    let release = Duration::from_millis(700);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(release);
        drop(holder);
    });
    let start = Instant::now();
    let m = Mount::try_new_env(
        lo.path(),
        &mnt,
        "rw",
        MOUNT_TIMEOUT,
        &[("UBTRFS_DEVICE_WAIT_MS", "10000")],
    )
    .unwrap_or_else(|f| {
        panic!(
            "mount after the holder let go failed after {:?}: {}",
            f.elapsed,
            f.exit.describe()
        )
    });
    releaser.join().expect("releaser thread");
    assert!(
        start.elapsed() >= release,
        "mounted after {:?}, before the holder let go",
        start.elapsed()
    );
    let e = m.unmount();
    assert!(e.is_clean_exit(), "daemon {}", e.describe());
}

// Test scenario: the kernel has the loop device mounted. A ubtrfs mount of the same device
// is refused at once (a kernel mount is no departing daemon: nothing to wait for) with an
// error naming the kernel's mountpoint, even with a long wait configured.
#[test]
fn block_device_mounted_by_the_kernel_is_refused_at_once() {
    require_fuse_env();
    let t = TestDir::new("blockdev-kernel");
    let img = t.join("img");
    mkfs_image(&img, &Mkfs::default());
    let kmnt = t.mkdir("kernel");
    let k = LoopMount::new(&img, &kmnt, "rw");
    let mnt = t.mkdir("mnt");
    let dev = std::path::PathBuf::from(k.device());
    let env = [("UBTRFS_DEVICE_WAIT_MS", "15000")];
    match Mount::try_new_env(&dev, &mnt, "rw", MOUNT_TIMEOUT, &env) {
        Ok(m) => {
            drop(m);
            panic!("mounted {dev:?} while the kernel has it mounted");
        }
        Err(f) => {
            assert!(!f.timed_out, "the daemon hung: {}", f.exit.describe());
            assert!(
                f.elapsed < Duration::from_secs(10),
                "waited {:?} for a kernel mount to go away",
                f.elapsed
            );
            let kpath = k.path().display().to_string();
            assert!(
                f.exit.stderr.contains("mounted by the kernel") && f.exit.stderr.contains(&kpath),
                "expected an error naming the kernel mount at {kpath}: {}",
                f.exit.describe()
            );
        }
    }
    assert!(mount_at(&mnt).is_none(), "something got mounted at {mnt:?}");
}
