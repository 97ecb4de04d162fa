//! `stillpoint backup` end to end against real VMs (TCG), through the real binary: what a
//! restored snapshot holds when the guest was writing during the backup, whether several disks
//! are captured at one instant, how much an incremental reads, and what the consistency policy
//! does for a paused VM and a VM without a guest agent.
//!
//! Restored images are checked with the real e2fsprogs and against what the guest itself
//! reads; the guest workloads are in `stillpoint_testvm::workload`.
#![cfg(feature = "vm-tests")]

mod backup_support;
mod support;

use std::process::Command;
use std::time::Duration;

use backup_support::{
    Bench, CHUNK, MIB, debugfs_file, disk, e2fsck, guest_disk_sha256, needs_recovery, sha256,
    sha256_bytes, snapshot_of, text, u64_of,
};
use serde_json::Value;
use stillpoint_qga::FreezeStatus;
use stillpoint_testvm::{
    DiskSpec, LOCKSTEP_MARK, LockstepLayout, RECORD_MARK, Restart, VmConfig, newest_lockstep_block,
    scan_records,
};

fn indications(report: &Value) -> Vec<String> {
    report["indications"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A filesystem-level backup taken while the guest appends records: the freeze flushed
/// everything written before it and nothing is half-written, so the restored ext4 is clean
/// without a journal replay and holds records 1..=N exactly. A crash-level backup under the
/// same load is taken too; what it shows is printed, and after the journal replay a boot would
/// do, its filesystem must be consistent.
#[tokio::test(flavor = "multi_thread")]
async fn filesystem_backup_under_a_writer_restores_clean_ext4_with_a_record_prefix() {
    let bench = Bench::boot(VmConfig::new("bk-writer").with_disks(1, 128 * MIB)).await;
    bench
        .vm
        .start_record_writer("/data/records")
        .await
        .expect("the record writer starts");
    bench
        .vm
        .wait_for_mark(RECORD_MARK, 20, Duration::from_secs(60))
        .await
        .expect("the record writer runs");

    // Filesystem level.
    let before = bench.vm.records_written();
    let (code, report, output) = bench.backup(&["--consistency", "filesystem"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(report["achieved"], "filesystem", "{report:#}");
    assert!(
        indications(&report).contains(&"GuestAgent".to_string()),
        "{report:#}"
    );
    assert!(
        u64_of(&report["freeze"]["filesystems"]) >= 1,
        "the freeze covered /data: {report:#}"
    );
    assert_eq!(report["coverage"]["uncovered"], serde_json::json!([]));
    let snapshot = snapshot_of(&report);
    // The writer goes on after the thaw.
    let at_end = bench.vm.records_written();
    bench
        .vm
        .wait_for_mark(RECORD_MARK, at_end + 5, Duration::from_secs(60))
        .await
        .expect("the writer resumed after the thaw");

    let image = bench.restore(&snapshot, "vd0");
    let (fsck, log) = e2fsck(&image);
    assert_eq!(fsck, 0, "e2fsck -fn of the restored filesystem:\n{log}");
    assert!(
        !needs_recovery(&image),
        "a frozen filesystem has no journal left to replay"
    );
    let scan = scan_records(&debugfs_file(&image, "/records"));
    assert!(
        scan.is_clean_prefix(),
        "the restored records are not a clean prefix: {scan:?}"
    );
    assert!(
        scan.complete >= before,
        "records the guest had written before the backup started are missing: \
         {} restored, {before} written before",
        scan.complete
    );

    // Crash level under the same load (an incremental on top of the first snapshot).
    let before = bench.vm.records_written();
    let (code, report, output) = bench.backup(&["--consistency", "crash"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(report["achieved"], "crash", "{report:#}");
    assert!(report["freeze"].is_null(), "no freeze at crash level");
    assert_eq!(disk(&report, "vd0")["mode"], "incremental", "{report:#}");
    let image = bench.restore(&snapshot_of(&report), "vd0");
    let (fsck_before_replay, _) = e2fsck(&image);
    let recovery = needs_recovery(&image);
    // Replay the journal on the copy, as mounting it would.
    let replay = Command::new("e2fsck")
        .arg("-fy")
        .arg(&image)
        .output()
        .expect("e2fsck runs");
    let (fsck_after_replay, log) = e2fsck(&image);
    assert_eq!(
        fsck_after_replay,
        0,
        "the crash-consistent filesystem is damaged even after its journal replay \
         (e2fsck -fy said: {})\n{log}",
        String::from_utf8_lossy(&replay.stdout)
    );
    let scan = scan_records(&debugfs_file(&image, "/records"));
    eprintln!(
        "crash-level backup under the writer: needs_recovery={recovery}, e2fsck -fn before \
         the journal replay exited {fsck_before_replay}, e2fsck -fy exited {:?}; after the \
         replay: {} whole records ({before} reported written before the backup started), {}",
        replay.status.code(),
        scan.complete,
        scan.damage
            .as_deref()
            .map(|d| format!("then {d}"))
            .unwrap_or_else(|| "a clean prefix".into())
    );
}

/// Two disks written in lockstep (disk 0, then disk 1, each write on the virtual disk before
/// the next starts): a capture of both at one instant finds disk 0 at most one block ahead of
/// disk 1, never behind it and never further ahead. Crash level, so no freeze stops the writer
/// — only the atomic capture start makes the cut consistent. Checked on a full and on an
/// incremental backup.
#[tokio::test(flavor = "multi_thread")]
async fn two_disks_written_in_lockstep_restore_as_a_consistent_cut() {
    let bench = Bench::boot(VmConfig::new("bk-lockstep").with_disks(2, 64 * MIB)).await;
    bench.sh("umount /data /data1").await;
    // 16 MiB of slots from 16 MiB on, on both disks.
    let layout = LockstepLayout {
        first_block: 16 * MIB / 4096,
        slots: 16 * MIB / 4096,
    };
    bench
        .vm
        .start_lockstep_writer(&["stillpoint-disk0", "stillpoint-disk1"], layout)
        .await
        .expect("the lockstep writer starts");
    bench
        .vm
        .wait_for_mark(LOCKSTEP_MARK, 10, Duration::from_secs(60))
        .await
        .expect("the lockstep writer runs");

    for round in ["full", "incremental"] {
        let before = bench.vm.lockstep_rounds();
        let (code, report, output) = bench.backup(&["--consistency", "crash"]);
        assert_eq!(code, Some(0), "{}", text(&output));
        for id in ["vd0", "vd1"] {
            assert_eq!(disk(&report, id)["mode"], round, "{report:#}");
        }
        let snapshot = snapshot_of(&report);
        let first = std::fs::read(bench.restore(&snapshot, "vd0")).unwrap();
        let second = std::fs::read(bench.restore(&snapshot, "vd1")).unwrap();
        let newest_first = newest_lockstep_block(&first, layout)
            .unwrap_or_else(|e| panic!("{round} backup, disk vd0: {e}"));
        let newest_second = newest_lockstep_block(&second, layout)
            .unwrap_or_else(|e| panic!("{round} backup, disk vd1: {e}"));
        eprintln!(
            "{round} backup: vd0 holds block {newest_first}, vd1 block {newest_second} \
             ({before} rounds done before the backup started)"
        );
        assert!(
            newest_first == newest_second || newest_first == newest_second + 1,
            "not one instant: vd0 holds block {newest_first}, vd1 block {newest_second}"
        );
        assert!(
            newest_second >= before,
            "rounds finished before the backup are missing: {newest_second} < {before}"
        );
        // The writer keeps going between the two backups.
        bench
            .vm
            .wait_for_mark(
                LOCKSTEP_MARK,
                bench.vm.lockstep_rounds() + 10,
                Duration::from_secs(60),
            )
            .await
            .expect("the lockstep writer keeps running");
    }
}

/// Known guest writes between a full and an incremental backup: the incremental reads exactly
/// the chunks those writes touched (counted: 5 of 16), and both restores equal what the guest
/// reads from its disk. The disk is unmounted, so nothing but these writes changes it.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_reads_only_the_changed_chunks_and_restores_the_guest_disk() {
    let bench = Bench::boot(VmConfig::new("bk-incr").with_disks(1, 64 * MIB)).await;
    let size = 64 * MIB;
    bench.sh("umount /data").await;
    // 16..48 MiB full of data, so every chunk there is allocated in full.
    bench
        .sh("dd if=/dev/urandom of=/dev/vda bs=1M seek=16 count=32 oflag=direct conv=notrunc 2>/dev/null")
        .await;
    let full_sha = guest_disk_sha256(&bench, "stillpoint-disk0").await;
    let (code, report, output) = bench.backup(&["--consistency", "crash"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    let full = disk(&report, "vd0");
    assert_eq!(full["mode"], "full");
    assert_eq!(full["full_reason"], "no parent snapshot");
    assert!(
        u64_of(&full["bytes_read"]) >= 32 * MIB,
        "the full backup read the written data: {full:#}"
    );
    let full_snapshot = snapshot_of(&report);

    // (offset, length) of each write, and the chunks they touch: 4, 6, 7+8 (across the
    // boundary), 11.
    let writes = [
        (17 * MIB + 4096, 4096),
        (25 * MIB, 4096),
        (32 * MIB - 32 * 1024, 64 * 1024),
        (47 * MIB, 8192),
    ];
    let mut touched: Vec<u64> = writes
        .iter()
        .flat_map(|&(offset, len)| offset / CHUNK..=(offset + len - 1) / CHUNK)
        .collect();
    touched.dedup();
    assert_eq!(touched, [4, 6, 7, 8, 11]);
    for (offset, len) in writes {
        bench
            .sh(&format!(
                "dd if=/dev/urandom of=/dev/vda bs=4096 seek={} count={} oflag=direct conv=notrunc 2>/dev/null",
                offset / 4096,
                len / 4096
            ))
            .await;
    }
    let incremental_sha = guest_disk_sha256(&bench, "stillpoint-disk0").await;
    assert_ne!(incremental_sha, full_sha);

    let (code, report, output) = bench.backup(&["--consistency", "crash"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    let incremental = disk(&report, "vd0");
    assert_eq!(incremental["mode"], "incremental", "{report:#}");
    let chunks = size / CHUNK;
    let unchanged = u64_of(&incremental["chunks_unchanged"]);
    let bytes_read = u64_of(&incremental["bytes_read"]);
    eprintln!(
        "incremental after {} writes ({} bytes): {} of {chunks} chunks read, {bytes_read} bytes \
         read (the full backup read {})",
        writes.len(),
        writes.iter().map(|w| w.1).sum::<u64>(),
        chunks - unchanged,
        full["bytes_read"]
    );
    assert_eq!(
        chunks - unchanged,
        touched.len() as u64,
        "the incremental read other chunks than the ones written: {incremental:#}"
    );
    assert_eq!(
        bytes_read,
        touched.len() as u64 * CHUNK,
        "bytes read: exactly the touched (fully allocated) chunks"
    );

    let restored = bench.restore(&snapshot_of(&report), "vd0");
    assert_eq!(
        sha256(&restored),
        incremental_sha,
        "the incremental restores to the guest's disk"
    );
    let restored = bench.restore(&full_snapshot, "vd0");
    assert_eq!(
        sha256(&restored),
        full_sha,
        "the full snapshot still restores to the disk as it was"
    );
}

/// The data disks of the formats test: raw, qcow2 v2, qcow2 v3, with their mount points.
const FORMAT_DISKS: [(&str, &str); 3] = [("vd0", "/data"), ("vd1", "/data1"), ("vd2", "/data2")];

/// The guest's SHA-256 of each file in `names`, on every data disk, as `(disk, name, hash)`.
async fn guest_file_hashes(bench: &Bench, names: &[&str]) -> Vec<(String, String, String)> {
    let mut hashes = Vec::new();
    for (id, mount) in FORMAT_DISKS {
        for name in names {
            let out = bench.sh(&format!("sha256sum {mount}/{name}")).await;
            let hash = out
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            hashes.push((id.to_string(), name.to_string(), hash));
        }
    }
    hashes
}

/// Restores every data disk of `snapshot`, checks each file system is clean (no journal to
/// replay: the freeze flushed it) and holds the files `expected` with the guest's contents.
/// Returns the restored images by disk id.
fn restore_and_check(
    bench: &Bench,
    snapshot: &str,
    expected: &[(String, String, String)],
) -> std::collections::BTreeMap<String, std::path::PathBuf> {
    let mut images = std::collections::BTreeMap::new();
    for (id, _) in FORMAT_DISKS {
        let image = bench.restore(snapshot, id);
        let (fsck, log) = e2fsck(&image);
        assert_eq!(fsck, 0, "{snapshot} {id}: e2fsck -fn:\n{log}");
        assert!(
            !needs_recovery(&image),
            "{snapshot} {id}: a journal to replay"
        );
        for (_, name, hash) in expected.iter().filter(|(disk, ..)| disk == id) {
            assert_eq!(
                &sha256_bytes(&debugfs_file(&image, &format!("/{name}"))),
                hash,
                "{snapshot} {id}: /{name} differs from what the guest read"
            );
        }
        images.insert(id.to_string(), image);
    }
    images
}

/// The chunks in which two images of one disk differ.
fn differing_chunks(a: &std::path::Path, b: &std::path::Path) -> u64 {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.chunks(CHUNK as usize)
        .zip(b.chunks(CHUNK as usize))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// Chunks an incremental read (every chunk it did not skip as unchanged).
fn chunks_read(report: &Value, id: &str) -> u64 {
    let entry = disk(report, id);
    u64_of(&entry["size"]) / CHUNK - u64_of(&entry["chunks_unchanged"])
}

/// A VM with a raw (vd0), a qcow2 v2 (vd1) and a qcow2 v3 (vd2) data disk, each mounted ext4,
/// backed up at the filesystem level through the binary. Raw and qcow2 v2 images cannot store
/// dirty bitmaps, so their capture bitmaps live in QEMU's memory: the backups work and the
/// incrementals read only what changed (every chunk read differs from the parent snapshot)
/// and restore the guest's files exactly — as long as that QEMU process runs. After a clean
/// QEMU restart their next backup is full and the report says why; the qcow2 v3 disk's
/// persistent bitmap carries its incremental across the restart.
///
/// At the CLI level rather than the capture's own tests: this is what users run, and it
/// proves the chain the capture tests cannot — the engine names the manifest's bitmaps as
/// parents, the report words the reason, the repository restores. The capture's test
/// (`raw_and_qcow2_v2_disks_have_exact_incrementals_until_qemu_restarts` in the platform's
/// `vm_capture.rs`) checks the dirty maps cluster by cluster.
#[tokio::test(flavor = "multi_thread")]
async fn raw_and_qcow2_v2_disks_back_up_incrementally_until_qemu_restarts() {
    let size = 64 * MIB;
    let mut bench = Bench::boot(VmConfig::new("bk-formats").with_data_disks([
        DiskSpec::raw(size),
        DiskSpec::qcow2_v2(size),
        DiskSpec::qcow2(size),
    ]))
    .await;
    for (_, mount) in FORMAT_DISKS {
        bench
            .sh(&format!(
                "dd if=/dev/urandom of={mount}/base bs=1M count=24 conv=fsync 2>/dev/null"
            ))
            .await;
    }
    let before_full = guest_file_hashes(&bench, &["base"]).await;

    // 1. Full, at the filesystem level.
    let (code, full, output) = bench.backup(&["--consistency", "filesystem"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(full["achieved"], "filesystem", "{full:#}");
    for (id, _) in FORMAT_DISKS {
        assert_eq!(disk(&full, id)["mode"], "full", "{full:#}");
        assert_eq!(disk(&full, id)["full_reason"], "no parent snapshot");
    }
    // QEMU keeps the new bitmaps in memory on raw and qcow2 v2, in the image on qcow2 v3.
    let inventory = bench.capture_inventory().await;
    for ((id, _), persistent) in FORMAT_DISKS.iter().zip([false, false, true]) {
        let info = inventory.disks.iter().find(|d| d.id == *id).expect("disk");
        assert_eq!(info.persistent_bitmaps, persistent, "{id}: {info:?}");
        let names: Vec<(&str, bool)> = info
            .bitmaps
            .iter()
            .map(|b| (b.name.as_str(), b.persistent))
            .collect();
        assert_eq!(
            names,
            [(disk(&full, id)["bitmap"].as_str().unwrap(), persistent)],
            "{id}"
        );
    }

    // 2. Known writes: 1 MiB overwritten in place in the middle of the file, a new file.
    for (_, mount) in FORMAT_DISKS {
        bench
            .sh(&format!(
                "dd if=/dev/urandom of={mount}/base bs=64k seek=96 count=16 conv=notrunc,fsync \
                 2>/dev/null && dd if=/dev/urandom of={mount}/new bs=64k count=4 conv=fsync \
                 2>/dev/null"
            ))
            .await;
    }
    let before_incremental = guest_file_hashes(&bench, &["base", "new"]).await;

    // 3. Incremental, at the filesystem level: only what changed is read.
    let (code, incremental, output) = bench.backup(&["--consistency", "filesystem"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(incremental["achieved"], "filesystem", "{incremental:#}");
    let full_images = restore_and_check(&bench, &snapshot_of(&full), &before_full);
    let incremental_images =
        restore_and_check(&bench, &snapshot_of(&incremental), &before_incremental);
    for (id, _) in FORMAT_DISKS {
        assert_eq!(
            disk(&incremental, id)["mode"],
            "incremental",
            "{incremental:#}"
        );
        let read = chunks_read(&incremental, id);
        let differing = differing_chunks(&full_images[id], &incremental_images[id]);
        eprintln!(
            "{id}: the incremental read {read} of {} chunks ({} bytes; the full read {}), \
             {differing} differ from the full snapshot",
            size / CHUNK,
            disk(&incremental, id)["bytes_read"],
            disk(&full, id)["bytes_read"]
        );
        // A chunk is read only if the guest wrote in it, and everything the guest writes here
        // changes bytes (new data, journal blocks, inode times, allocation bitmaps): so the
        // chunks read are exactly the chunks that differ.
        assert_eq!(read, differing, "{id}: chunks read vs chunks changed");
        assert!(read < size / CHUNK / 2, "{id}: not the whole disk");
    }
    for image in full_images.values() {
        std::fs::remove_file(image).unwrap();
    }

    // 4. A clean QEMU restart, more writes, and the next backup.
    bench
        .vm
        .restart(Restart::Quit)
        .await
        .expect("QEMU quits and starts again");
    for (_, mount) in FORMAT_DISKS {
        bench
            .sh(&format!(
                "dd if=/dev/urandom of={mount}/after bs=64k count=4 conv=fsync 2>/dev/null"
            ))
            .await;
    }
    let before_last = guest_file_hashes(&bench, &["base", "new", "after"]).await;
    let (code, last, output) = bench.backup(&["--consistency", "filesystem"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(last["achieved"], "filesystem", "{last:#}");
    for (id, kind) in [("vd0", "raw"), ("vd1", "qcow2 v2")] {
        let parent = disk(&incremental, id)["bitmap"].as_str().unwrap();
        assert_eq!(disk(&last, id)["mode"], "full", "{last:#}");
        assert_eq!(
            disk(&last, id)["full_reason"],
            format!(
                "the parent's dirty bitmap `{parent}` is missing: the non-persistent bitmap of \
                 a {kind} image is lost when QEMU restarts (or it was removed)"
            ),
            "{id}"
        );
    }
    assert_eq!(disk(&last, "vd2")["mode"], "incremental", "{last:#}");
    let last_images = restore_and_check(&bench, &snapshot_of(&last), &before_last);
    let read = chunks_read(&last, "vd2");
    let differing = differing_chunks(&incremental_images["vd2"], &last_images["vd2"]);
    eprintln!(
        "vd2 after the restart: the incremental read {read} chunks, {differing} differ from \
         the snapshot before the restart"
    );
    assert_eq!(read, differing, "vd2: chunks read vs chunks changed");
}

/// A paused VM cannot be frozen: the default policy backs it up crash-consistent (exit 3,
/// indication `Paused`) and leaves it paused; `--on-quiesce-failure fail` exits 1 and
/// publishes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn paused_vm_is_not_frozen_and_fail_policy_publishes_nothing() {
    let bench = Bench::boot(VmConfig::new("bk-paused").with_disks(1, 64 * MIB)).await;
    bench.qmp("stop").await;
    assert_eq!(bench.run_state().await, "paused");

    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(3), "degraded: {}", text(&output));
    assert_eq!(report["requested"], "filesystem");
    assert_eq!(report["achieved"], "crash");
    assert!(
        indications(&report).contains(&"Paused".to_string()),
        "{report:#}"
    );
    assert!(report["freeze"].is_null(), "a paused guest is not frozen");
    assert!(report["snapshot"].is_string(), "published: {report:#}");
    assert_eq!(
        bench.run_state().await,
        "paused",
        "the backup does not resume it"
    );
    assert_eq!(bench.snapshots().len(), 1);

    let (code, report, output) = bench.backup(&["--on-quiesce-failure", "fail"]);
    assert_eq!(code, Some(1), "{}", text(&output));
    assert!(report["snapshot"].is_null(), "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("nothing was backed up"), "{error}");
    assert!(
        error.contains("bk-paused"),
        "the error names the VM: {error}"
    );
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
    assert_eq!(bench.run_state().await, "paused");
    bench.qmp("cont").await;
}

/// Without a guest agent: crash-consistent with indication `NoGuestAgent` (exit 3), or with
/// `--on-quiesce-failure fail` exit 1 and nothing published.
#[tokio::test(flavor = "multi_thread")]
async fn vm_without_agent_is_crash_consistent_and_fail_policy_publishes_nothing() {
    let bench = Bench::boot(
        VmConfig::new("bk-no-agent")
            .without_agent()
            .with_disks(1, 64 * MIB),
    )
    .await;
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(3), "degraded: {}", text(&output));
    assert_eq!(report["achieved"], "crash");
    assert!(
        indications(&report).contains(&"NoGuestAgent".to_string()),
        "{report:#}"
    );
    assert!(report["freeze"].is_null());
    assert!(report["snapshot"].is_string(), "published: {report:#}");
    assert_eq!(bench.snapshots().len(), 1);

    let (code, report, output) = bench.backup(&["--on-quiesce-failure", "fail"]);
    assert_eq!(code, Some(1), "{}", text(&output));
    assert!(report["snapshot"].is_null(), "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("nothing was backed up"), "{error}");
    assert_eq!(bench.snapshots().len(), 1, "nothing was published");
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_full_backups_leave_one_dirty_bitmap_per_disk() {
    // A full backup (`--full`, a new repository, a lost parent) starts a new bitmap; the
    // superseded ones must go, or every guest write would be recorded in all of them forever.
    let bench = Bench::boot(VmConfig::new("bk-bitmaps").with_disks(2, 64 * MIB)).await;
    for round in 0..3 {
        let args: &[&str] = if round == 0 { &[] } else { &["--full"] };
        let (code, report, output) = bench.backup(args);
        assert_eq!(code, Some(0), "{}", text(&output));
        assert_eq!(disk(&report, "vd0")["mode"], "full", "{report:#}");
    }
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(disk(&report, "vd0")["mode"], "incremental", "{report:#}");
    let tracking = disk(&report, "vd0")["bitmap"].as_str().unwrap().to_string();
    let inventory = bench.capture_inventory().await;
    for info in &inventory.disks {
        let names: Vec<&str> = info.bitmaps.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names.len(), 1, "disk {}: {names:?}", info.id);
        assert!(info.bitmaps[0].recording);
    }
    let vd0 = inventory.disks.iter().find(|d| d.id == "vd0").unwrap();
    assert_eq!(
        vd0.bitmaps[0].name, tracking,
        "the one left is the one the manifest records"
    );
}

/// The reasons the report or `check` gives for the filesystem level, joined.
fn filesystem_reasons(check: &Value) -> String {
    check["levels"]
        .as_array()
        .and_then(|levels| levels.iter().find(|l| l["level"] == "filesystem"))
        .and_then(|level| level["reasons"].as_array())
        .map(|reasons| {
            reasons
                .iter()
                .filter_map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// A guest frozen already (issue 8, item 5) is reported as frozen — by a stillpoint freeze
/// (its pid, for how long, when its guardian thaws it) or not by stillpoint — and never as
/// "guest-fsfreeze-freeze disabled (--block-rpcs)", which is what the agent's command list
/// alone suggests (qemu-ga disables the freeze while frozen). The backup degrades to crash and
/// leaves the freeze to whoever made it.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_frozen_already_is_reported_frozen_and_by_whom_not_as_blocked() {
    let bench = Bench::boot(VmConfig::new("bk-frozen").with_disks(1, 64 * MIB)).await;
    let name = bench.name().to_string();

    // Frozen by `stillpoint freeze`, with a guardian that thaws after 300 s.
    let frozen = bench.run(&["freeze", "--name", &name, "--unfreezeTimeoutSeconds", "300"]);
    assert!(frozen.status.success(), "freeze: {}", text(&frozen));
    assert_eq!(bench.freeze_status().await, Some(FreezeStatus::Frozen));
    let output = bench.run(&["check", &name, "--json"]);
    assert!(output.status.success(), "check: {}", text(&output));
    let check: Value = serde_json::from_slice(&output.stdout).expect("check JSON");
    let reasons = filesystem_reasons(&check);
    eprintln!("check, frozen by stillpoint: {reasons}");
    assert!(
        reasons.contains("the guest is frozen already (by a stillpoint freeze (pid ")
            && reasons.contains("thaws it in"),
        "{reasons}"
    );
    assert!(!reasons.contains("block-rpcs"), "{reasons}");

    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(3), "degraded: {}", text(&output));
    assert_eq!(report["achieved"], "crash", "{report:#}");
    let why = report["degraded_because"].to_string();
    assert!(
        why.contains("frozen already (by a stillpoint freeze"),
        "{why}"
    );
    assert!(!why.contains("block-rpcs"), "{why}");
    assert!(
        report["freeze"].is_null(),
        "the backup made no freeze of its own"
    );
    assert_eq!(
        bench.freeze_status().await,
        Some(FreezeStatus::Frozen),
        "someone else's freeze is left to them"
    );
    let thawed = bench.run(&["unfreeze", "--name", &name]);
    assert!(thawed.status.success(), "unfreeze: {}", text(&thawed));
    assert!(bench.wait_thawed().await);

    // Frozen through the agent directly: not by stillpoint.
    {
        let socket = bench.vm.qga_socket().expect("an agent socket");
        let mut agent = stillpoint_qga::connect_unix(socket, Duration::from_secs(5))
            .await
            .expect("the agent answers");
        agent.fsfreeze_freeze().await.expect("the guest freezes");
    }
    let output = bench.run(&["check", &name, "--json"]);
    let check: Value = serde_json::from_slice(&output.stdout).expect("check JSON");
    let reasons = filesystem_reasons(&check);
    eprintln!("check, frozen by the agent directly: {reasons}");
    assert!(
        reasons.contains("the guest is frozen already (not by stillpoint"),
        "{reasons}"
    );
    let (code, report, output) = bench.backup(&[]);
    assert_eq!(code, Some(3), "degraded: {}", text(&output));
    let why = report["degraded_because"].to_string();
    assert!(why.contains("not by stillpoint"), "{why}");
    {
        let socket = bench.vm.qga_socket().expect("an agent socket");
        let mut agent = stillpoint_qga::connect_unix(socket, Duration::from_secs(5))
            .await
            .expect("the agent answers");
        agent.fsfreeze_thaw().await.expect("the guest thaws");
    }
    assert!(bench.wait_thawed().await);
}
