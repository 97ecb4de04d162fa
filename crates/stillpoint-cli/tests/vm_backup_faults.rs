//! `stillpoint backup` when things go wrong, against real VMs (TCG), through the real binary:
//! the VM restarted between backups, QEMU killed during the copy, stillpoint killed while the
//! guest is frozen and while it copies, a copy that fails, scratch space that runs out.
//!
//! What every test checks afterwards: nothing was published for the failed run, the guest is
//! thawed and running, and the next backup restores to exactly what the guest reads (files
//! written in every period, compared byte for byte, and a clean ext4) — so no changed block
//! was missed.
//!
//! Faults are placed with the engine's fail points (docs/testing.md): the backup runs with
//! `FAILPOINTS=backup::…=pause`, says `failpoint … reached` on stderr when it stands there, and
//! goes on when it gets SIGUSR1 — no test depends on how long a step takes.
#![cfg(feature = "vm-tests")]

mod backup_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backup_support::{
    Bench, MIB, debugfs_file, disk, e2fsck, needs_recovery, sha256_bytes, snapshot_of, text,
};
use serde_json::Value;
use stillpoint_testvm::{RECORD_MARK, Restart, VmConfig, scan_records, wait_until};

const AFTER_FREEZE: &str = "backup::after-freeze";
const DURING_COPY: &str = "backup::during-copy";

/// The files the guest wrote so far (period 0 is `/data/base`).
fn files(periods: u32) -> Vec<String> {
    std::iter::once("/data/base".to_string())
        .chain((1..=periods).map(|p| format!("/data/p{p}")))
        .collect()
}

/// Boots a VM with one 128 MiB disk, writes `/data/base` (8 MiB) and takes a first, full,
/// filesystem-level backup.
async fn with_first_backup(name: &str) -> Bench {
    let bench = Bench::boot(VmConfig::new(name).with_disks(1, 128 * MIB)).await;
    bench
        .sh("dd if=/dev/urandom of=/data/base bs=1M count=8 2>/dev/null && sync")
        .await;
    change(&bench, 1).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "first backup: {}", text(&output));
    assert_eq!(disk(&report, "vd0")["mode"], "full");
    bench
}

/// Period `period`'s changes: a new file `/data/pN` and 16 KiB overwritten in place inside
/// `/data/base`, at an offset of its own.
async fn change(bench: &Bench, period: u32) {
    bench
        .sh(&format!(
            "dd if=/dev/urandom of=/data/p{period} bs=64k count=8 2>/dev/null && \
             dd if=/dev/urandom of=/data/base bs=4k seek={} count=4 conv=notrunc 2>/dev/null && sync",
            u64::from(period) * 64
        ))
        .await;
}

/// What the guest reads from each file now: (path, SHA-256), hashed in the guest.
async fn guest_view(bench: &Bench, paths: &[String]) -> Vec<(String, String)> {
    let out = bench.sh(&format!("sha256sum {}", paths.join(" "))).await;
    let view: Vec<(String, String)> = out
        .lines()
        .filter_map(|line| {
            let (sha, path) = line.split_once("  ")?;
            Some((path.trim().to_string(), sha.to_string()))
        })
        .collect();
    assert_eq!(view.len(), paths.len(), "sha256sum in the guest: {out}");
    view
}

/// Restores `snapshot`'s vd0 and checks it: a clean ext4 (no journal to replay) holding every
/// file exactly as the guest read it.
fn assert_restores_to(bench: &Bench, snapshot: &str, expected: &[(String, String)]) -> PathBuf {
    let image = bench.restore(snapshot, "vd0");
    let (fsck, log) = e2fsck(&image);
    assert_eq!(fsck, 0, "e2fsck -fn of snapshot {snapshot}:\n{log}");
    assert!(
        !needs_recovery(&image),
        "snapshot {snapshot} needs a journal replay"
    );
    for (path, want) in expected {
        let inside = path.strip_prefix("/data").expect("a file on /data");
        let got = debugfs_file(&image, inside);
        assert_eq!(
            sha256_bytes(&got),
            *want,
            "snapshot {snapshot}: {path} ({} bytes restored) differs from what the guest \
             reads: a changed block was missed",
            got.len()
        );
    }
    image
}

/// The lease of the capture guardian of the bench's VM (exists while a backup holds a capture).
fn capture_lease(bench: &Bench) -> PathBuf {
    bench
        .root
        .join("leases")
        .join(format!("{}.capture.json", bench.name()))
}

/// The log of the capture guardian of the bench's VM.
fn capture_guardian_log(bench: &Bench) -> String {
    std::fs::read_to_string(
        bench
            .root
            .join("leases")
            .join(format!("{}.capture.guardian.log", bench.name())),
    )
    .unwrap_or_default()
}

/// The copy-before-write scratch files in the VM's default scratch directory, with their
/// sizes on the host (allocated bytes).
fn scratch_files(bench: &Bench) -> Vec<(PathBuf, u64)> {
    let dir = bench.root.join("captures").join(bench.name());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| stillpoint_platform::qemu::capture::names::is_scratch_file(path))
        .map(|path| {
            let bytes = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            (path, bytes)
        })
        .collect()
}

/// Waits (bounded, no timing asserted) until the capture guardian is done: its lease is gone.
async fn capture_guardian_done(bench: &Bench) -> bool {
    wait_until(Duration::from_secs(120), || async {
        !capture_lease(bench).exists()
    })
    .await
}

fn recovered(report: &Value) -> Vec<String> {
    report["capture"]["recovered"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A clean `quit` keeps the dirty bitmaps (persistent, written on close): the next backup is
/// an incremental holding the changes from before and after the restart. A crash of QEMU
/// (SIGKILL) leaves them unusable: the next backup reads in full and says why.
#[tokio::test(flavor = "multi_thread")]
async fn vm_restarted_between_backups_loses_no_change() {
    let mut bench = with_first_backup("bkf-restart").await;

    change(&bench, 2).await;
    bench
        .vm
        .restart(Restart::Quit)
        .await
        .expect("clean restart");
    change(&bench, 3).await;
    let expected = guest_view(&bench, &files(3)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(
        disk(&report, "vd0")["mode"],
        "incremental",
        "the bitmap survived the clean restart: {report:#}"
    );
    assert_restores_to(&bench, &snapshot_of(&report), &expected);

    change(&bench, 4).await;
    bench
        .vm
        .restart(Restart::Kill)
        .await
        .expect("restart after a kill");
    change(&bench, 5).await;
    let expected = guest_view(&bench, &files(5)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    let vd0 = disk(&report, "vd0");
    assert_eq!(vd0["mode"], "full", "{report:#}");
    let reason = vd0["full_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unclean"),
        "full because of the crash: {reason}"
    );
    assert_restores_to(&bench, &snapshot_of(&report), &expected);
}

/// QEMU dies while the backup copies: the backup fails (exit 1), publishes nothing, and the
/// next backup — of the restarted VM, whose bitmaps died with QEMU — reads in full and holds
/// every period's data.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_killed_during_the_copy_publishes_nothing_and_the_next_backup_is_whole() {
    let mut bench = with_first_backup("bkf-qemu-kill").await;
    change(&bench, 2).await;

    let mut backup = bench.spawn_backup(&format!("{DURING_COPY}=pause"), &[]);
    backup.wait_for_failpoint(DURING_COPY);
    bench
        .vm
        .restart(Restart::Kill)
        .await
        .expect("restart after a kill");
    backup.release();
    let (code, report, stderr) = backup.finish();
    assert_eq!(code, Some(1), "the backup fails: {report:#}\n{stderr}");
    assert!(report["snapshot"].is_null(), "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("bkf-qemu-kill")),
        "the error names the VM: {report:#}"
    );
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
    assert_eq!(bench.run_state().await, "running");

    change(&bench, 3).await;
    let expected = guest_view(&bench, &files(3)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    let vd0 = disk(&report, "vd0");
    assert_eq!(vd0["mode"], "full", "{report:#}");
    assert!(
        vd0["full_reason"]
            .as_str()
            .is_some_and(|r| r.contains("unclean")),
        "{report:#}"
    );
    assert_restores_to(&bench, &snapshot_of(&report), &expected);
}

/// stillpoint is SIGKILLed inside the frozen window: its guardian thaws the guest at once (the
/// writer in the guest goes on), nothing is published, and the next backup cleans up what the
/// dead one prepared and is an incremental holding both periods.
#[tokio::test(flavor = "multi_thread")]
async fn stillpoint_killed_while_the_guest_is_frozen_is_thawed_by_the_guardian() {
    let bench = with_first_backup("bkf-frozen-kill").await;
    change(&bench, 2).await;
    bench
        .vm
        .start_record_writer("/data/records")
        .await
        .expect("the record writer starts");

    let backup = {
        let mut backup = bench.spawn_backup(&format!("{AFTER_FREEZE}=pause"), &[]);
        backup.wait_for_failpoint(AFTER_FREEZE);
        backup
    };
    assert!(bench.lease().exists(), "the frozen guest has a lease");
    backup.kill();

    assert!(
        bench.wait_thawed().await,
        "the guest stayed frozen; guardian log:\n{}",
        bench.guardian_log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            !bench.lease().exists()
        })
        .await,
        "the guardian removes the lease"
    );
    let log = bench.guardian_log();
    assert!(
        log.contains("the process that froze the guest died"),
        "{log}"
    );
    assert!(log.contains("thawed 1 filesystem"), "it was frozen: {log}");
    let written = bench.vm.records_written();
    bench
        .vm
        .wait_for_mark(RECORD_MARK, written + 5, Duration::from_secs(60))
        .await
        .expect("the writer goes on after the thaw");
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
    // The capture it had prepared (filter and scratch nodes, a scratch file) is released by
    // the capture guardian, not left to the next backup.
    assert!(
        capture_guardian_done(&bench).await,
        "the capture guardian ends; its log:\n{}",
        capture_guardian_log(&bench)
    );
    let log = capture_guardian_log(&bench);
    assert!(log.contains("released the capture"), "{log}");
    assert!(scratch_files(&bench).is_empty(), "{log}");
    let inventory = bench.capture_inventory().await;
    assert!(inventory.leftovers.is_empty(), "{inventory:#?}\n{log}");

    change(&bench, 3).await;
    let before = bench.vm.records_written();
    let expected = guest_view(&bench, &files(3)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert!(
        recovered(&report).is_empty(),
        "the guardian left nothing for the next backup to recover: {report:#}"
    );
    assert_eq!(disk(&report, "vd0")["mode"], "incremental", "{report:#}");
    let image = assert_restores_to(&bench, &snapshot_of(&report), &expected);
    let scan = scan_records(&debugfs_file(&image, "/records"));
    assert!(scan.is_clean_prefix(), "{scan:?}");
    assert!(scan.complete >= before, "{} < {before}", scan.complete);
}

/// stillpoint is SIGKILLed while it copies, after the capture started (its new bitmap records,
/// the parent's is stopped) and while the guest writes: the capture guardian releases the
/// dead backup's capture at once — the copy-before-write filter, the NBD export and the
/// scratch file, which grows with every guest write — and settles the bitmaps as the next
/// backup's recovery would (what the dead capture's bitmap recorded merged back into the
/// parent's). Nothing is published, the VM runs, and the next backup's incremental holds the
/// writes made before, during and after the killed run.
#[tokio::test(flavor = "multi_thread")]
async fn stillpoint_killed_while_copying_is_released_by_the_guardian_and_loses_no_change() {
    let bench = with_first_backup("bkf-copy-kill").await;
    change(&bench, 2).await;

    let mut backup = bench.spawn_backup(&format!("{DURING_COPY}=pause"), &[]);
    backup.wait_for_failpoint(DURING_COPY);
    assert!(
        capture_lease(&bench).exists(),
        "the capture has a guardian while the backup copies"
    );
    let before = scratch_files(&bench);
    assert_eq!(before.len(), 1, "one scratch file for vd0: {before:?}");
    // After the capture's instant: recorded only by the new bitmap of the capture, and the
    // old data of every block it overwrites goes to the scratch file.
    change(&bench, 3).await;
    let grown = scratch_files(&bench);
    eprintln!("scratch file while the backup copies: {before:?} → {grown:?}");
    backup.kill();

    assert!(
        wait_until(Duration::from_secs(120), || async {
            scratch_files(&bench).is_empty()
        })
        .await,
        "the scratch file is removed; capture guardian log:\n{}",
        capture_guardian_log(&bench)
    );
    assert!(
        capture_guardian_done(&bench).await,
        "the capture guardian ends; its log:\n{}",
        capture_guardian_log(&bench)
    );
    let log = capture_guardian_log(&bench);
    eprintln!("capture guardian log:\n{log}");
    // Nothing else either: QEMU removes the export's socket when the NBD server stops.
    let left: Vec<_> = std::fs::read_dir(bench.root.join("captures").join(bench.name()))
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the scratch directory: {left:?}");
    assert!(
        log.contains(
            "released the capture of VM bkf-copy-kill: the backup that held the capture died"
        ),
        "{log}"
    );
    assert!(log.contains("sp-cbw-"), "the filter was deleted: {log}");
    assert!(log.contains("NBD export"), "the export was deleted: {log}");
    assert!(
        log.contains("merge dirty bitmap"),
        "the bitmaps were settled: {log}"
    );
    // Nothing of the capture is left in QEMU: no filter, scratch or snapshot node, no export,
    // and the device has its disk node again.
    let inventory = bench.capture_inventory().await;
    assert!(inventory.leftovers.is_empty(), "{inventory:#?}");
    assert_eq!(bench.run_state().await, "running");
    assert_eq!(
        bench.freeze_status().await,
        Some(stillpoint_qga::FreezeStatus::Thawed)
    );
    change(&bench, 4).await;
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");

    let expected = guest_view(&bench, &files(4)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert!(
        recovered(&report).is_empty(),
        "the guardian left nothing for the next backup to recover: {report:#}"
    );
    assert_eq!(disk(&report, "vd0")["mode"], "incremental", "{report:#}");
    assert_restores_to(&bench, &snapshot_of(&report), &expected);
}

/// A copy that fails (an injected error before the disk's copy) releases the capture as a
/// failure: exit 1, nothing published, the guest thawed and running, and the next incremental
/// covers the failed run's period too.
#[tokio::test(flavor = "multi_thread")]
async fn failed_copy_publishes_nothing_and_the_next_incremental_covers_both_periods() {
    let bench = with_first_backup("bkf-copy-fail").await;
    change(&bench, 2).await;

    let backup = bench.spawn_backup(&format!("{DURING_COPY}=return(test)"), &[]);
    let (code, report, stderr) = backup.finish();
    assert_eq!(code, Some(1), "{report:#}\n{stderr}");
    assert!(report["snapshot"].is_null());
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("fault injected at failpoint backup::during-copy"),
        "{error}"
    );
    let steps = report["steps"].to_string();
    assert!(
        steps.contains("\"finish capture\""),
        "the capture was released: {steps}"
    );
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
    assert_eq!(bench.run_state().await, "running");
    assert_eq!(
        bench.freeze_status().await,
        Some(stillpoint_qga::FreezeStatus::Thawed)
    );

    change(&bench, 3).await;
    let expected = guest_view(&bench, &files(3)).await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(disk(&report, "vd0")["mode"], "incremental", "{report:#}");
    assert_restores_to(&bench, &snapshot_of(&report), &expected);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs for the scratch space and must run as root (CI \
             does); running as uid {}",
            nix::unistd::geteuid()
        );
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        let fs = nix::sys::statvfs::statvfs(&self.0).unwrap();
        fs.blocks_available() * fs.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Copy-before-write runs out of scratch space (a 2 MiB tmpfs) while the guest overwrites
/// 24 MiB of data the capture still needs: every guest write succeeds and lands, the VM keeps
/// running, and the backup fails with a clear error naming the scratch area. The next backup
/// (enough scratch space) holds the new data.
#[tokio::test(flavor = "multi_thread")]
async fn scratch_space_running_out_fails_the_backup_never_the_guest() {
    let bench = Bench::boot(VmConfig::new("bkf-scratch").with_disks(1, 128 * MIB)).await;
    bench
        .sh("dd if=/dev/urandom of=/data/big bs=1M count=24 2>/dev/null && sync")
        .await;
    let (code, _, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "first backup: {}", text(&output));

    let scratch = Tmpfs::mount(&bench.dir.path().join("small-scratch"), "2m");
    // What the guest will write: 24 MiB it keeps in RAM (/tmp is a tmpfs in the guest).
    bench
        .sh("dd if=/dev/urandom of=/tmp/pattern bs=1M count=24 2>/dev/null")
        .await;

    let mut backup = bench.spawn_backup(
        &format!("{DURING_COPY}=pause"),
        &["--scratch-dir", scratch.0.to_str().unwrap()],
    );
    backup.wait_for_failpoint(DURING_COPY);
    // Overwrite every block the capture still needs: far more old data than fits in scratch.
    // `sh` fails the test unless dd exits 0; the guest answering at all shows it runs (the
    // backup holds QEMU's monitor until it ends, so `query-status` has to wait).
    bench
        .sh("dd if=/tmp/pattern of=/data/big bs=1M conv=notrunc oflag=direct 2>/dev/null")
        .await;
    bench
        .sh("sync && echo 3 > /proc/sys/vm/drop_caches && cmp /tmp/pattern /data/big")
        .await;
    let free = scratch.free();
    eprintln!("scratch space left after the guest's writes: {free} bytes");
    assert!(
        free < MIB,
        "the scratch area did not fill up ({free} bytes free): the test proves nothing"
    );

    backup.release();
    let (code, report, stderr) = backup.finish();
    assert_eq!(code, Some(1), "the backup fails: {report:#}\n{stderr}");
    assert!(report["snapshot"].is_null(), "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    eprintln!("the backup's error: {error}");
    assert!(error.contains("the capture broke"), "{error}");
    assert!(
        error.contains(scratch.0.to_str().unwrap()),
        "the error names the scratch area: {error}"
    );
    assert!(
        error.contains("bkf-scratch"),
        "the error names the VM: {error}"
    );
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
    assert_eq!(bench.run_state().await, "running");
    drop(scratch);

    let expected = guest_view(&bench, &["/data/big".to_string()]).await;
    let pattern = guest_view(&bench, &["/tmp/pattern".to_string()]).await;
    assert_eq!(expected[0].1, pattern[0].1, "the guest's writes landed");
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_restores_to(&bench, &snapshot_of(&report), &expected);
}
