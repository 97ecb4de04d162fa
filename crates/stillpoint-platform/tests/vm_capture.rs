//! The QEMU capture against real VMs: real QEMU 7.2, the real guest writing through virtio,
//! QEMU's own NBD server read by our client, `qemu-img` for the references.
//!
//! How exactness is checked: with the VM paused (and,
//! when it matters, the guest's filesystems frozen so nothing is in flight), the disk images
//! are copied on the host with `qemu-img convert -U`; the capture is taken at that same
//! instant; the guest then overwrites data; the export must still equal the copy, byte for
//! byte. Raw-device writes go to disks unmounted in the guest first, so that nothing but the
//! test's own writes touches them and dirty maps can be compared exactly.
#![cfg(feature = "vm-tests")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stillpoint_platform::PlatformErrorKind;
use stillpoint_platform::capture::{
    ByteRange, Capture, CaptureMode, CaptureRequest, CapturedDisk, FullReason, StartedCapture,
};
use stillpoint_platform::qemu::capture::{QemuCapture, ResumeOutcome, resume_if_paused_by_capture};
use stillpoint_platform::qemu::{QemuVmSpec, SpecOrigin};
use stillpoint_qmp::Qmp;
use stillpoint_testvm::{DiskSpec, LaunchedVm, Restart, VmConfig};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
const T: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers

async fn boot(name: &str, disks: usize, size: u64) -> LaunchedVm {
    LaunchedVm::boot_for_test(VmConfig::new(name).with_disks(disks, size))
        .await
        .unwrap_or_else(|e| panic!("VM `{name}` did not boot: {e}"))
}

/// Runs a shell script in the guest; it must succeed. Returns its stdout.
async fn sh(vm: &LaunchedVm, script: &str) -> String {
    let out = vm
        .guest_exec(&["sh", "-c", script], T)
        .await
        .unwrap_or_else(|e| panic!("guest-exec of `{script}`: {e}"));
    assert_eq!(
        out.exit_code,
        Some(0),
        "guest script failed: {script}\nstdout: {}\nstderr: {}",
        out.stdout_text(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout_text()
}

/// Unmounts `/data*` so the test's raw writes are the only writes to those disks.
async fn unmount_all(vm: &LaunchedVm) {
    sh(vm, "sync; for m in /data*; do umount $m; done").await;
}

/// Writes `len` random bytes at `offset` of `/dev/vdX` through the page cache and syncs.
async fn write_raw(vm: &LaunchedVm, device: &str, writes: &[(u64, u64)]) {
    let mut script = String::new();
    for (offset, len) in writes {
        script.push_str(&format!(
            "head -c {len} /dev/urandom | dd of=/dev/{device} bs=4096 seek={offset} \
             oflag=seek_bytes conv=notrunc,fsync 2>/dev/null || exit 1\n"
        ));
    }
    sh(vm, &script).await;
}

async fn monitor(vm: &LaunchedVm) -> Qmp {
    Qmp::connect_unix(vm.qmp_socket())
        .await
        .expect("QMP monitor")
}

/// The image `image` of format `format` (`qcow2`, `raw`) as raw bytes, read on the host.
fn qemu_img_raw(image: &Path, format: &str, out: &Path) -> Vec<u8> {
    let status = Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(out)
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img convert {}", image.display());
    let bytes = std::fs::read(out).expect("read the converted image");
    std::fs::remove_file(out).unwrap();
    bytes
}

/// The VM's disks as they are now, copied on the host while the VM is paused (it is resumed
/// afterwards if it ran). With the guest's filesystems frozen or the disks idle, this is the
/// state a capture started right after must export.
async fn reference(qmp: &Qmp, vm: &LaunchedVm, work: &Path) -> Vec<Vec<u8>> {
    let running = qmp.query_status().await.unwrap().running;
    if running {
        qmp.stop().await.unwrap();
    }
    let copies = vm
        .disks()
        .iter()
        .map(|d| qemu_img_raw(&d.path, &d.format, &work.join("reference.raw")))
        .collect();
    if running {
        qmp.cont().await.unwrap();
    }
    copies
}

/// Reads a captured disk whole, 4 MiB at a time with 8 reads in flight.
async fn read_all(disk: &Arc<dyn CapturedDisk>) -> stillpoint_platform::Result<Vec<u8>> {
    use futures::StreamExt;
    let size = disk.size();
    let piece = 4 * MIB;
    let mut out = vec![0u8; size as usize];
    let mut reads = futures::stream::iter((0..size.div_ceil(piece)).map(|i| {
        let disk = disk.clone();
        async move {
            let offset = i * piece;
            let mut buf = vec![0u8; piece.min(size - offset) as usize];
            disk.read_at(offset, &mut buf).await.map(|_| (offset, buf))
        }
    }))
    .buffer_unordered(8);
    while let Some(read) = reads.next().await {
        let (offset, buf) = read?;
        out[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
    }
    Ok(out)
}

/// `base` with the bytes of `ranges` read from `disk` (applying an incremental).
async fn apply(base: &[u8], disk: &Arc<dyn CapturedDisk>, ranges: &[ByteRange]) -> Vec<u8> {
    let mut out = base.to_vec();
    for r in ranges {
        disk.read_at(r.offset, &mut out[r.offset as usize..r.end() as usize])
            .await
            .unwrap();
    }
    out
}

/// The 64 KiB clusters `writes` touch, as merged ranges: what a dirty bitmap must show.
fn clusters(writes: &[(u64, u64)]) -> Vec<ByteRange> {
    let set: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(o, l)| o / CLUSTER..(o + l).div_ceil(CLUSTER))
        .collect();
    let mut out: Vec<ByteRange> = Vec::new();
    for c in set {
        match out.last_mut() {
            Some(last) if last.end() == c * CLUSTER => last.len += CLUSTER,
            _ => out.push(ByteRange {
                offset: c * CLUSTER,
                len: CLUSTER,
            }),
        }
    }
    out
}

/// The first differing offset of two images, for assertion messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(at) = first_difference(got, want) {
        panic!("{what}: differs from the reference at offset {at}");
    }
}

/// Nothing of a capture is left in QEMU or the scratch directory, and the VM runs.
async fn assert_released(qmp: &Qmp, scratch: &Path) {
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let left: Vec<&str> = nodes
        .iter()
        .map(|n| n.node_name.as_str())
        .filter(|n| n.starts_with("sp-"))
        .collect();
    assert!(left.is_empty(), "capture nodes left: {left:?}");
    assert!(qmp.query_block_exports().await.unwrap().is_empty());
    for device in qmp.query_block().await.unwrap() {
        let node = device.inserted.expect("medium").node_name;
        assert!(node.starts_with("disk"), "device attached to {node}");
    }
    let files: Vec<_> = std::fs::read_dir(scratch).unwrap().flatten().collect();
    assert!(files.is_empty(), "scratch files left: {files:?}");
}

/// The bitmaps of node `disk0` as (name, recording, inconsistent).
async fn bitmaps(qmp: &Qmp, node: &str) -> Vec<(String, bool, bool)> {
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let node = nodes.iter().find(|n| n.node_name == node).expect("node");
    node.dirty_bitmaps
        .iter()
        .filter_map(|b| Some((b.name.clone()?, b.recording, b.inconsistent)))
        .collect()
}

/// Prepares, (freezes), takes a reference, starts, (thaws): the capture's instant is the
/// reference's. Returns the started capture and the reference images.
async fn capture_with_reference(
    capture: &QemuCapture,
    vm: &LaunchedVm,
    request: CaptureRequest,
    work: &Path,
    freeze: bool,
) -> (Box<dyn StartedCapture>, Vec<Vec<u8>>) {
    let prepared = capture.prepare(request).await.expect("prepare");
    if freeze {
        vm.agent_command("guest-fsfreeze-freeze", None, T)
            .await
            .expect("freeze");
    }
    let reference = reference(capture.monitor().await.unwrap(), vm, work).await;
    let started = prepared.start().await;
    if freeze {
        vm.agent_command("guest-fsfreeze-thaw", None, T)
            .await
            .expect("thaw");
    }
    (started.expect("start"), reference)
}

/// A full capture read whole, released as a success. Returns (new bitmap, image).
async fn full_capture(capture: &QemuCapture, scratch: &Path) -> (String, Vec<u8>) {
    let prepared = capture.prepare(CaptureRequest::new(scratch)).await.unwrap();
    let mut started = prepared.start().await.unwrap();
    let disks = started.export().await.unwrap();
    let image = read_all(&disks[0]).await.unwrap();
    let report = started.finish(true).await.unwrap();
    let bitmap = report.bitmaps["vd0"].clone().expect("new bitmap");
    (bitmap, image)
}

// ---------------------------------------------------------------------------------------------
// Point in time

#[tokio::test(flavor = "multi_thread")]
async fn a_running_vm_is_captured_at_one_instant_while_the_guest_keeps_writing() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-pit", 1, 64 * MIB).await;
    sh(
        &vm,
        "dd if=/dev/urandom of=/data/old bs=1M count=8 conv=fsync 2>/dev/null",
    )
    .await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let inventory = capture.inspect().await.unwrap();
    assert_eq!(inventory.disks.len(), 1);
    assert_eq!(
        (
            inventory.disks[0].id.as_str(),
            inventory.disks[0].node.as_str()
        ),
        ("vd0", "disk0")
    );
    assert!(inventory.leftovers.is_empty(), "{:?}", inventory.leftovers);

    let (mut started, reference) = capture_with_reference(
        &capture,
        &vm,
        CaptureRequest::new(scratch.path()),
        work.path(),
        true,
    )
    .await;
    let report = started.start_report().clone();
    assert!(report.was_running);
    assert_eq!(report.run_state, "running");
    assert!(qmp.query_status().await.unwrap().running, "resumed");
    let plan = started.plan().clone();
    assert_eq!(
        plan.disks[0].mode,
        CaptureMode::Full {
            reason: FullReason::NoParent
        }
    );

    // The guest overwrites old data and writes new files; every write succeeds.
    sh(
        &vm,
        "dd if=/dev/urandom of=/data/old bs=1M count=8 conv=notrunc,fsync 2>/dev/null && \
         dd if=/dev/urandom of=/data/new bs=1M count=4 conv=fsync 2>/dev/null && sync",
    )
    .await;
    let disks = started.export().await.unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].id(), "vd0");
    assert_eq!(disks[0].changes().await.unwrap(), None, "a full capture");
    let allocation = disks[0].allocation().await.unwrap();
    assert!(!allocation.is_empty());
    let exported = read_all(&disks[0]).await.unwrap();
    assert_same("the export", &exported, &reference[0]);
    // The guest's later writes did reach the disk (the test would prove nothing otherwise).
    let now = reference_now(&qmp, &vm, work.path()).await;
    assert!(first_difference(&now, &reference[0]).is_some());

    let finished = started.finish(true).await.unwrap();
    assert!(finished.success);
    assert_eq!(
        finished.bitmaps["vd0"].as_deref(),
        Some(plan.disks[0].new_bitmap.as_str())
    );
    assert!(finished.warnings.is_empty(), "{:?}", finished.warnings);
    assert_released(&qmp, scratch.path()).await;
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(plan.disks[0].new_bitmap.clone(), true, false)]
    );
    assert!(
        !vm.console_text().contains("I/O error"),
        "guest I/O errors:\n{}",
        vm.console_tail(30)
    );
}

/// The first disk as it is now (VM paused for the copy).
async fn reference_now(qmp: &Qmp, vm: &LaunchedVm, work: &Path) -> Vec<u8> {
    reference(qmp, vm, work).await.swap_remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_vm_is_captured_without_being_resumed() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-paused", 1, 64 * MIB).await;
    // A writer that never stops: appends and syncs.
    sh(
        &vm,
        "(while :; do head -c 65536 /dev/urandom >> /data/log; sync; done) \
         >/dev/null 2>&1 </dev/null &",
    )
    .await;
    // As the engine gets it: from the inventory's spec, connecting on first use.
    let spec = QemuVmSpec {
        name: vm.name().to_string(),
        qmp_socket: vm.qmp_socket().to_path_buf(),
        qga_socket: vm.qga_socket().map(Path::to_path_buf),
        pid: Some(vm.pid()),
        origin: SpecOrigin::RuntimeDir(vm.dir().join("vm.json")),
    };
    let capture = QemuCapture::for_spec(&spec);
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()))
        .await
        .unwrap();
    let qmp = capture.monitor().await.unwrap().clone();
    // The user pauses the VM (a crash-consistent capture of a paused VM).
    qmp.stop().await.unwrap();
    let reference = reference(&qmp, &vm, work.path()).await;
    let mut started = prepared.start().await.unwrap();
    let status = qmp.query_status().await.unwrap();
    assert_eq!(
        status.status, "paused",
        "start() must not resume a paused VM"
    );
    assert!(!started.start_report().was_running);
    assert_eq!(started.start_report().paused, Duration::ZERO);
    assert_eq!(started.start_report().run_state, "paused");

    qmp.cont().await.unwrap();
    // Let the writer append a few MiB after the instant.
    let before = sh(&vm, "stat -c %s /data/log").await;
    sh(&vm, "sleep 2").await;
    let after = sh(&vm, "stat -c %s /data/log").await;
    assert_ne!(before, after, "the writer kept writing");
    let disks = started.export().await.unwrap();
    let exported = read_all(&disks[0]).await.unwrap();
    assert_same("the export of the paused VM", &exported, &reference[0]);
    started.finish(true).await.unwrap();
    assert_released(&qmp, scratch.path()).await;
}

/// The guest writes an increasing counter to disk 0, then the same value to disk 1, each
/// write synced before the next. A consistent cut sees (c0, c1) with c0 == c1 (between two
/// rounds) or c0 == c1 + 1 (disk 0 written, disk 1 not yet); anything else mixes instants.
#[tokio::test(flavor = "multi_thread")]
async fn two_disks_written_in_lockstep_are_captured_as_one_cut() {
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-cut", 2, 32 * MIB).await;
    unmount_all(&vm).await;
    sh(
        &vm,
        "(i=0; while :; do i=$((i+1)); \
           printf '%016d' $i | dd of=/dev/vda bs=512 conv=sync,notrunc,fsync 2>/dev/null; \
           printf '%016d' $i | dd of=/dev/vdb bs=512 conv=sync,notrunc,fsync 2>/dev/null; \
         done) >/dev/null 2>&1 </dev/null &",
    )
    .await;
    sh(&vm, "sleep 1").await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let counter = |bytes: &[u8]| -> u64 {
        std::str::from_utf8(&bytes[..16])
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    };
    let mut seen = Vec::new();
    for _ in 0..4 {
        let prepared = capture
            .prepare(CaptureRequest::new(scratch.path()))
            .await
            .unwrap();
        let mut started = prepared.start().await.unwrap();
        let disks = started.export().await.unwrap();
        assert_eq!(
            disks.iter().map(|d| d.id()).collect::<Vec<_>>(),
            ["vd0", "vd1"]
        );
        let mut head = vec![0u8; 512];
        disks[0].read_at(0, &mut head).await.unwrap();
        let c0 = counter(&head);
        disks[1].read_at(0, &mut head).await.unwrap();
        let c1 = counter(&head);
        assert!(
            c0 == c1 || c0 == c1 + 1,
            "not one cut: disk 0 holds {c0}, disk 1 holds {c1}"
        );
        seen.push(c0);
        started.finish(true).await.unwrap();
        sh(&vm, "sleep 0.5").await;
    }
    assert!(seen[0] > 0, "the writer ran before the first capture");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "the counter kept increasing between captures: {seen:?}"
    );
    assert_released(&qmp, scratch.path()).await;
}

// ---------------------------------------------------------------------------------------------
// Incrementals

#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_dirty_map_is_exactly_the_written_clusters_and_reproduces_the_disk() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-inc", 1, 64 * MIB).await;
    unmount_all(&vm).await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (b1, full) = full_capture(&capture, scratch.path()).await;

    // 4 KiB inside a cluster, 8 KiB across a cluster boundary, 1 MiB aligned, 512 B unaligned.
    let writes = [
        (MIB, 4096),
        (3 * MIB - 4096, 8192),
        (10 * MIB, MIB),
        (20 * MIB + 512, 512),
    ];
    write_raw(&vm, "vda", &writes).await;
    let request = CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB);
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, request, work.path(), false).await;
    let planned = &started.plan().disks[0];
    assert_eq!(
        planned.mode,
        CaptureMode::Incremental {
            parent_bitmap: b1.clone()
        }
    );
    let b2 = planned.new_bitmap.clone();
    // Writes after the instant belong to the next incremental, not this one.
    write_raw(&vm, "vda", &[(40 * MIB, 4096)]).await;
    let disks = started.export().await.unwrap();
    let changes = disks[0].changes().await.unwrap().expect("incremental");
    assert_eq!(changes, clusters(&writes));
    let rebuilt = apply(&full, &disks[0], &changes).await;
    assert_same("full + incremental", &rebuilt, &reference[0]);
    let whole = read_all(&disks[0]).await.unwrap();
    assert_same("the incremental's export", &whole, &reference[0]);

    let report = started.finish(true).await.unwrap();
    assert_eq!(report.bitmaps["vd0"].as_deref(), Some(b2.as_str()));
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(b2.clone(), true, false)]
    );
    let inventory = capture.inspect().await.unwrap();
    let health = inventory.disks[0].bitmap(&b2).unwrap();
    assert_eq!(health.granularity, 64 << 10);
    assert_eq!(health.count, CLUSTER, "only the write after the instant");
    assert_released(&qmp, scratch.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_capture_loses_no_change_the_next_incremental_covers_both_periods() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-fail", 1, 64 * MIB).await;
    unmount_all(&vm).await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (b1, full) = full_capture(&capture, scratch.path()).await;

    let first = [(2 * MIB, 4096), (7 * MIB, 128 << 10)];
    write_raw(&vm, "vda", &first).await;
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB))
        .await
        .unwrap();
    let mut started = prepared.start().await.unwrap();
    let disks = started.export().await.unwrap();
    assert_eq!(disks[0].changes().await.unwrap().unwrap(), clusters(&first));
    let second = [(30 * MIB, 4096), (2 * MIB + 8192, 4096)];
    write_raw(&vm, "vda", &second).await;
    // The backup fails half-way.
    let report = started.finish(false).await.unwrap();
    assert!(!report.success);
    assert_eq!(report.bitmaps["vd0"].as_deref(), Some(b1.as_str()));
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(b1.clone(), true, false)]
    );
    assert_released(&qmp, scratch.path()).await;

    let third = [(50 * MIB, 4096)];
    write_raw(&vm, "vda", &third).await;
    let request = CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB);
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, request, work.path(), false).await;
    let disks = started.export().await.unwrap();
    let changes = disks[0].changes().await.unwrap().unwrap();
    let all: Vec<(u64, u64)> = first.iter().chain(&second).chain(&third).copied().collect();
    assert_eq!(
        changes,
        clusters(&all),
        "the union of every period since b1"
    );
    let rebuilt = apply(&full, &disks[0], &changes).await;
    assert_same(
        "full + incremental after a failure",
        &rebuilt,
        &reference[0],
    );
    started.finish(true).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Leftovers of an interrupted stillpoint

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_or_dropped_capture_is_recovered_and_the_next_one_misses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-kill", 1, 64 * MIB).await;
    unmount_all(&vm).await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (b1, full) = full_capture(&capture, scratch.path()).await;
    let before = [(MIB, 4096)];
    write_raw(&vm, "vda", &before).await;
    // The monitor takes one client: hand it to the holder.
    drop(capture);
    drop(qmp);

    let mut holder = Command::new(env!("CARGO_BIN_EXE_stillpoint-platform-capture-holder"))
        .arg(vm.qmp_socket())
        .arg(scratch.path())
        .args(["vd0", &b1, &(64 * MIB).to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the capture holder");
    let stdout = holder.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(T, line)
        .await
        .expect("holder ready")
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"READY"), "holder said: {line:?}");
    let holder_bitmap = words[2].to_string();
    let during = [(5 * MIB, 4096), (9 * MIB, 64 << 10)];
    write_raw(&vm, "vda", &during).await;
    holder.kill().unwrap();
    holder.wait().unwrap();

    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let inventory = capture.inspect().await.unwrap();
    let leftovers = inventory.leftovers.join("\n");
    for expected in [
        "delete the NBD export `sp-exp-disk0`",
        "give device /machine/peripheral/vd0/virtio-backend its disk node `disk0` back",
        "delete the block node `sp-cbw-disk0`",
        &format!("merge dirty bitmap `{holder_bitmap}` into `{b1}`"),
    ] {
        assert!(
            leftovers.contains(expected),
            "{expected:?} not in:\n{leftovers}"
        );
    }
    let after = [(12 * MIB, 4096)];
    write_raw(&vm, "vda", &after).await;

    let request = CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB);
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, request, work.path(), false).await;
    let plan = started.plan().clone();
    assert!(!plan.recovered.is_empty());
    assert_eq!(
        plan.disks[0].mode,
        CaptureMode::Incremental {
            parent_bitmap: b1.clone()
        },
        "the reconciled parent is usable again"
    );
    let disks = started.export().await.unwrap();
    let changes = disks[0].changes().await.unwrap().unwrap();
    let all: Vec<(u64, u64)> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .copied()
        .collect();
    assert_eq!(changes, clusters(&all));
    let rebuilt = apply(&full, &disks[0], &changes).await;
    assert_same("full + incremental after a kill", &rebuilt, &reference[0]);
    let report = started.finish(true).await.unwrap();
    let b3 = report.bitmaps["vd0"].clone().unwrap();
    assert_released(&qmp, scratch.path()).await;

    // Dropped without finish: released in the background, as a failure.
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()).with_parent("vd0", &b3, 64 * MIB))
        .await
        .unwrap();
    let mut started = prepared.start().await.unwrap();
    started.export().await.unwrap();
    let dropped_bitmap = started.plan().disks[0].new_bitmap.clone();
    drop(started);
    let late = [(20 * MIB, 4096)];
    write_raw(&vm, "vda", &late).await;
    // The next prepare waits for the background release (it holds the capture lock).
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()).with_parent("vd0", &b3, 64 * MIB))
        .await
        .unwrap();
    assert!(
        prepared.plan().recovered.is_empty(),
        "the background release left nothing: {:?}",
        prepared.plan().recovered
    );
    assert!(prepared.plan().disks[0].mode.is_incremental());
    let mut started = prepared.start().await.unwrap();
    let disks = started.export().await.unwrap();
    assert_eq!(disks[0].changes().await.unwrap().unwrap(), clusters(&late));
    started.finish(true).await.unwrap();
    assert!(
        !bitmaps(&qmp, "disk0")
            .await
            .iter()
            .any(|(name, _, _)| name == &dropped_bitmap)
    );
    assert_released(&qmp, scratch.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_vm_paused_by_a_dead_capture_is_resumed() {
    let scratch = tempfile::tempdir().unwrap();
    let vm = boot("cap-resume", 1, 32 * MIB).await;
    let qmp = monitor(&vm).await;
    // What a stillpoint killed between `stop` and `cont` leaves: the marker, a paused VM.
    let leave_paused_by_capture = || async {
        qmp.blockdev_add(serde_json::json!({"driver": "null-co",
                                            "node-name": "sp-paused-by-capture"}))
            .await
            .unwrap();
        qmp.stop().await.unwrap();
    };
    leave_paused_by_capture().await;
    assert_eq!(
        resume_if_paused_by_capture(&qmp).await.unwrap(),
        ResumeOutcome::Resumed
    );
    assert!(qmp.query_status().await.unwrap().running);
    // A user's pause is left alone.
    qmp.stop().await.unwrap();
    assert_eq!(
        resume_if_paused_by_capture(&qmp).await.unwrap(),
        ResumeOutcome::NoCaptureMarker
    );
    assert_eq!(qmp.query_status().await.unwrap().status, "paused");
    qmp.cont().await.unwrap();
    // The next prepare resumes it too, as part of its recovery.
    leave_paused_by_capture().await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()))
        .await
        .unwrap();
    assert!(
        prepared.plan().recovered[0].contains("resume the VM"),
        "{:?}",
        prepared.plan().recovered
    );
    assert!(qmp.query_status().await.unwrap().running);
    prepared.abort().await.unwrap();
    assert_released(&qmp, scratch.path()).await;
}

// ---------------------------------------------------------------------------------------------
// QEMU restarts

#[tokio::test(flavor = "multi_thread")]
async fn after_a_clean_quit_and_relaunch_the_incremental_is_still_exact() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut vm = boot("cap-quit", 1, 64 * MIB).await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (b1, full) = full_capture(&capture, scratch.path()).await;
    sh(
        &vm,
        "dd if=/dev/urandom of=/data/before bs=64k count=20 conv=fsync 2>/dev/null",
    )
    .await;
    drop(capture);
    drop(qmp);
    vm.restart(Restart::Quit).await.expect("quit and relaunch");
    sh(
        &vm,
        "dd if=/dev/urandom of=/data/after bs=64k count=10 conv=fsync 2>/dev/null",
    )
    .await;

    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let request = CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB);
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, request, work.path(), true).await;
    assert_eq!(
        started.plan().disks[0].mode,
        CaptureMode::Incremental {
            parent_bitmap: b1.clone()
        },
        "a persistent bitmap survives a clean quit"
    );
    let disks = started.export().await.unwrap();
    let changes = disks[0].changes().await.unwrap().unwrap();
    let changed: u64 = changes.iter().map(|r| r.len).sum();
    assert!(changed >= 30 * CLUSTER, "both files' data is in the map");
    assert!(changed < 64 * MIB / 2, "and not the whole disk");
    let rebuilt = apply(&full, &disks[0], &changes).await;
    assert_same(
        "full + incremental across a restart",
        &rebuilt,
        &reference[0],
    );
    started.finish(true).await.unwrap();
    assert_released(&qmp, scratch.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_qemu_crash_the_next_capture_is_full_and_says_why() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut vm = boot("cap-crash", 1, 64 * MIB).await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    // Created in this QEMU session, never written to the image: gone after a crash.
    let (b1, _) = full_capture(&capture, scratch.path()).await;
    drop(capture);
    drop(qmp);
    vm.restart(Restart::Kill).await.expect("kill and relaunch");

    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let prepared = capture
        .prepare(CaptureRequest::new(scratch.path()).with_parent("vd0", &b1, 64 * MIB))
        .await
        .unwrap();
    let mode = prepared.plan().disks[0].mode.clone();
    assert_eq!(
        mode,
        CaptureMode::Full {
            reason: FullReason::BitmapMissing {
                bitmap: b1.clone(),
                memory_only: None
            }
        }
    );
    let mut started = prepared.start().await.unwrap();
    started.export().await.unwrap();
    let b2 = started.finish(true).await.unwrap().bitmaps["vd0"]
        .clone()
        .unwrap();

    // Saved by a clean quit, loaded at start (marked in use in the image), then a crash:
    // it comes back inconsistent.
    drop(capture);
    drop(qmp);
    vm.restart(Restart::Quit).await.expect("quit and relaunch");
    vm.restart(Restart::Kill).await.expect("kill and relaunch");
    let qmp = monitor(&vm).await;
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(b2.clone(), false, true)]
    );
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let request = CaptureRequest::new(scratch.path()).with_parent("vd0", &b2, 64 * MIB);
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, request, work.path(), true).await;
    let planned = started.plan().disks[0].clone();
    assert_eq!(
        planned.mode,
        CaptureMode::Full {
            reason: FullReason::BitmapInconsistent { bitmap: b2.clone() }
        }
    );
    assert_eq!(
        match &planned.mode {
            CaptureMode::Full { reason } => reason.to_string(),
            _ => unreachable!(),
        },
        format!("the parent's dirty bitmap `{b2}` is inconsistent after an unclean QEMU exit")
    );
    assert_eq!(planned.removed_bitmaps, vec![b2.clone()]);
    let disks = started.export().await.unwrap();
    let exported = read_all(&disks[0]).await.unwrap();
    assert_same("the full capture after a crash", &exported, &reference[0]);
    let report = started.finish(true).await.unwrap();
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(report.bitmaps["vd0"].clone().unwrap(), true, false)],
        "the inconsistent bitmap is gone, the new one records"
    );
    assert_released(&qmp, scratch.path()).await;
}

// ---------------------------------------------------------------------------------------------
// Images that cannot store dirty bitmaps (raw, qcow2 v2)

/// The guest's block device (`vda`, …) of each data disk, in disk order: matched by the
/// serial `stillpoint-diskN`, not assumed from the probe order.
async fn devices(vm: &LaunchedVm) -> Vec<String> {
    let listing = sh(
        vm,
        "for d in /sys/block/vd*; do echo \"$(cat $d/serial) ${d##*/}\"; done",
    )
    .await;
    let by_serial: std::collections::BTreeMap<&str, &str> =
        listing.lines().filter_map(|l| l.split_once(' ')).collect();
    (0..vm.disks().len())
        .map(|i| {
            by_serial
                .get(format!("stillpoint-disk{i}").as_str())
                .unwrap_or_else(|| panic!("no device with serial stillpoint-disk{i}: {listing}"))
                .to_string()
        })
        .collect()
}

/// The stillpoint bitmaps of `node` as (name, persistent).
async fn persistence(qmp: &Qmp, node: &str) -> Vec<(String, bool)> {
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let node = nodes.iter().find(|n| n.node_name == node).expect("node");
    node.dirty_bitmaps
        .iter()
        .filter_map(|b| Some((b.name.clone()?, b.persistent)))
        .filter(|(name, _)| name.starts_with("stillpoint-"))
        .collect()
}

/// A raw (vd0), a qcow2 v2 (vd1) and a qcow2 v3 (vd2) disk in one VM, unmounted so the test's
/// writes are the only ones. The driver reads each image's kind from QEMU; every capture
/// works on all three (copy-before-write and snapshot-access over a raw node included); the
/// new bitmaps of raw and qcow2 v2 live in QEMU's memory, yet their incrementals are exact —
/// the dirty map is exactly the written clusters, a failed capture folds its period back into
/// the parent — until a clean QEMU restart drops them: the next capture of those two is full
/// and says why, while the qcow2 v3 disk's persistent bitmap carries the incremental across
/// the restart.
#[tokio::test(flavor = "multi_thread")]
async fn raw_and_qcow2_v2_disks_have_exact_incrementals_until_qemu_restarts() {
    let work = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let ids = ["vd0", "vd1", "vd2"];
    let nodes = ["disk0", "disk1", "disk2"];
    let mut vm = LaunchedVm::boot_for_test(VmConfig::new("cap-formats").with_data_disks([
        DiskSpec::raw(size),
        DiskSpec::qcow2_v2(size),
        DiskSpec::qcow2(size),
    ]))
    .await
    .unwrap_or_else(|e| panic!("VM `cap-formats` did not boot: {e}"));
    unmount_all(&vm).await;
    let dev = devices(&vm).await;
    let write_all = |writes: Vec<(u64, u64)>| {
        let vm = &vm;
        let dev = &dev;
        async move {
            for d in dev {
                write_raw(vm, d, &writes).await;
            }
        }
    };
    // Every write below lands in blocks the 64 MiB ext4 leaves free (its metadata sits in the
    // first 4.3 MiB, its journal at 16–20 MiB, backup superblocks at the start of 8, 24, 40 and
    // 56 MiB): after the QEMU restart the guest must mount these file systems again.
    // Old data for copy-before-write to save when the guest overwrites it during a capture.
    write_all(vec![(32 * MIB, 8 * MIB)]).await;

    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let inventory = capture.inspect().await.unwrap();
    let kinds: Vec<(&str, String, bool)> = inventory
        .disks
        .iter()
        .map(|d| (d.id.as_str(), d.image_kind(), d.persistent_bitmaps))
        .collect();
    assert_eq!(
        kinds,
        [
            ("vd0", "raw".to_string(), false),
            ("vd1", "qcow2 v2".to_string(), false),
            ("vd2", "qcow2 v3".to_string(), true),
        ],
        "read from QEMU"
    );
    let persistent = [false, false, true];

    // 1. Full, while the guest overwrites old data and writes new data.
    let (mut started, reference) = capture_with_reference(
        &capture,
        &vm,
        CaptureRequest::new(scratch.path()),
        work.path(),
        false,
    )
    .await;
    for disk in &started.plan().disks {
        assert_eq!(
            disk.mode,
            CaptureMode::Full {
                reason: FullReason::NoParent
            }
        );
    }
    let during = [(32 * MIB, MIB), (36 * MIB + 4096, 4096), (60 * MIB, 4096)];
    write_all(during.to_vec()).await;
    let views = started.export().await.unwrap();
    let mut images = Vec::new();
    for (i, view) in views.iter().enumerate() {
        assert_eq!(view.id(), ids[i]);
        let image = read_all(view).await.unwrap();
        assert_same(
            &format!("full capture of {}", ids[i]),
            &image,
            &reference[i],
        );
        images.push(image);
    }
    let report = started.finish(true).await.unwrap();
    let b1 = report.bitmaps["vd0"].clone().expect("new bitmap");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            persistence(&qmp, node).await,
            vec![(b1.clone(), persistent[i])],
            "{}: persistent only where the image stores bitmaps",
            ids[i]
        );
    }
    let parents = |bitmap: &str| {
        ids.iter()
            .fold(CaptureRequest::new(scratch.path()), |r, id| {
                r.with_parent(*id, bitmap, size)
            })
    };

    // 2. An incremental that fails: its period goes back into the parent.
    let first = [(5 * MIB, 4096), (7 * MIB - 4096, 8192)];
    write_all(first.to_vec()).await;
    let prepared = capture.prepare(parents(&b1)).await.unwrap();
    for disk in &prepared.plan().disks {
        assert_eq!(
            disk.mode,
            CaptureMode::Incremental {
                parent_bitmap: b1.clone()
            },
            "{}: a parent bitmap that exists serves, persistent or not",
            disk.disk.id
        );
    }
    let started = prepared.start().await.unwrap();
    let second = [(30 * MIB, 4096)];
    write_all(second.to_vec()).await;
    let report = started.finish(false).await.unwrap();
    for id in ids {
        assert_eq!(report.bitmaps[id].as_deref(), Some(b1.as_str()), "{id}");
    }

    // 3. The incremental: exactly the clusters written since b1's instant, over both periods.
    let third = [(10 * MIB, MIB), (50 * MIB + 512, 512)];
    write_all(third.to_vec()).await;
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, parents(&b1), work.path(), false).await;
    let views = started.export().await.unwrap();
    let all: Vec<(u64, u64)> = [&during[..], &first, &second, &third].concat();
    for (i, view) in views.iter().enumerate() {
        let changes = view.changes().await.unwrap().expect("incremental");
        assert_eq!(changes, clusters(&all), "{}: the dirty map", ids[i]);
        images[i] = apply(&images[i], view, &changes).await;
        assert_same(
            &format!("full + incremental of {}", ids[i]),
            &images[i],
            &reference[i],
        );
    }
    let b2 = started.finish(true).await.unwrap().bitmaps["vd0"]
        .clone()
        .expect("new bitmap");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            persistence(&qmp, node).await,
            vec![(b2.clone(), persistent[i])]
        );
    }

    // 4. A clean restart of QEMU: memory-only bitmaps are gone, the persistent one is not.
    drop(capture);
    drop(qmp);
    vm.restart(Restart::Quit).await.expect("quit and relaunch");
    unmount_all(&vm).await; // /init mounted them again: those writes are changes too
    let dev = devices(&vm).await;
    let fourth = [(44 * MIB, 64 << 10)];
    for d in &dev {
        write_raw(&vm, d, &fourth).await;
    }
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (mut started, reference) =
        capture_with_reference(&capture, &vm, parents(&b2), work.path(), false).await;
    let modes: Vec<CaptureMode> = started
        .plan()
        .disks
        .iter()
        .map(|d| d.mode.clone())
        .collect();
    let missing = |kind: &str| CaptureMode::Full {
        reason: FullReason::BitmapMissing {
            bitmap: b2.clone(),
            memory_only: Some(kind.to_string()),
        },
    };
    assert_eq!(
        modes,
        [
            missing("raw"),
            missing("qcow2 v2"),
            CaptureMode::Incremental {
                parent_bitmap: b2.clone()
            }
        ]
    );
    let CaptureMode::Full { reason } = &modes[0] else {
        unreachable!()
    };
    assert_eq!(
        reason.to_string(),
        format!(
            "the parent's dirty bitmap `{b2}` is missing: the non-persistent bitmap of a raw \
             image is lost when QEMU restarts (or it was removed)"
        )
    );
    let views = started.export().await.unwrap();
    for i in 0..2 {
        let image = read_all(&views[i]).await.unwrap();
        assert_same(
            &format!("full capture of {} after the restart", ids[i]),
            &image,
            &reference[i],
        );
    }
    let changes = views[2].changes().await.unwrap().expect("incremental");
    let expected = clusters(&fourth);
    assert!(
        expected.iter().all(|w| changes
            .iter()
            .any(|c| c.offset <= w.offset && w.end() <= c.end())),
        "vd2: the write after the restart is in the map: {changes:?}"
    );
    let changed: u64 = changes.iter().map(|r| r.len).sum();
    assert!(
        changed < size / 4,
        "vd2: not the whole disk: {changed} bytes"
    );
    let rebuilt = apply(&images[2], &views[2], &changes).await;
    assert_same(
        "vd2: incremental across the restart",
        &rebuilt,
        &reference[2],
    );
    let report = started.finish(true).await.unwrap();
    let b3 = report.bitmaps["vd0"].clone().expect("new bitmap");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            persistence(&qmp, node).await,
            vec![(b3.clone(), persistent[i])],
            "{}: only the new bitmap is left",
            ids[i]
        );
    }
    assert_released(&qmp, scratch.path()).await;
    assert!(
        !vm.console_text().contains("I/O error"),
        "guest I/O errors:\n{}",
        vm.console_tail(30)
    );
}

// ---------------------------------------------------------------------------------------------
// Scratch space runs out

/// A small tmpfs, unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs as the scratch area and must run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t tmpfs failed");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn when_scratch_space_runs_out_the_capture_fails_never_the_guest() {
    let tmpfs = SmallTmpfs::mount("8M");
    let scratch: PathBuf = tmpfs.path().to_path_buf();
    let vm = boot("cap-enospc", 1, 64 * MIB).await;
    unmount_all(&vm).await;
    // 32 MiB of old data the guest will overwrite: 4× what the scratch area holds.
    sh(
        &vm,
        "yes old-data | dd of=/dev/vda bs=1M count=32 iflag=fullblock conv=notrunc,fsync \
         2>/dev/null",
    )
    .await;
    let qmp = monitor(&vm).await;
    let capture = QemuCapture::new(vm.name(), qmp.clone());
    let (b1, _) = full_capture(&capture, &scratch).await;

    let prepared = capture
        .prepare(CaptureRequest::new(&scratch).with_parent("vd0", &b1, 64 * MIB))
        .await
        .unwrap();
    let scratch_file = prepared.plan().disks[0].scratch.clone();
    let mut started = prepared.start().await.unwrap();
    let disks = started.export().await.unwrap();
    // Every guest write succeeds, and the guest logs no I/O error.
    let out = vm
        .guest_exec(
            &[
                "sh",
                "-c",
                "yes new-data | dd of=/dev/vda bs=1M count=32 iflag=fullblock \
                 conv=notrunc,fsync 2>&1; echo rc=$?; dmesg",
            ],
            T,
        )
        .await
        .unwrap();
    let text = out.stdout_text();
    assert!(text.contains("rc=0"), "the guest's write failed:\n{text}");
    for bad in ["I/O error", "blk_update_request", "Buffer I/O"] {
        assert!(!text.contains(bad), "guest logged `{bad}`:\n{text}");
    }
    assert_eq!(qmp.query_status().await.unwrap().status, "running");

    let error = read_all(&disks[0]).await.expect_err("the capture broke");
    assert_eq!(error.kind(), PlatformErrorKind::CaptureBroken, "{error}");
    let message = error.to_string();
    assert!(
        message.contains("the capture broke: copy-before-write could not save old data to the scratch area (full?)"),
        "{message}"
    );
    assert!(
        message.contains(&scratch_file.display().to_string()),
        "{message}"
    );
    assert!(message.contains("disk vd0"), "{message}");

    // Even when asked to settle as a success, a broken capture is released as a failure.
    let error = started.finish(true).await.expect_err("broken capture");
    assert_eq!(error.kind(), PlatformErrorKind::CaptureBroken);
    assert_eq!(
        bitmaps(&qmp, "disk0").await,
        vec![(b1.clone(), true, false)]
    );
    assert_released(&qmp, &scratch).await;
    assert_eq!(qmp.query_status().await.unwrap().status, "running");

    // Nothing was lost: the next incremental has the overwritten region.
    let prepared = capture
        .prepare(CaptureRequest::new(&scratch).with_parent("vd0", &b1, 64 * MIB))
        .await
        .unwrap();
    assert!(prepared.plan().disks[0].mode.is_incremental());
    let mut started = prepared.start().await.unwrap();
    let disks = started.export().await.unwrap();
    let changes = disks[0].changes().await.unwrap().unwrap();
    assert_eq!(changes, clusters(&[(0, 32 * MIB)]));
    started.finish(false).await.unwrap();
    assert_released(&qmp, &scratch).await;
}

// ---------------------------------------------------------------------------------------------
// Measurements (not run by CI: `cargo nextest run -p stillpoint-platform --all-features
// --run-ignored only -E 'test(measure)' --no-capture`). Nothing is asserted on time.

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement: prints start() durations and read throughput"]
async fn measure_start_duration_and_read_throughput() {
    for (disks, size) in [
        (1, 256 * MIB),
        (4, 256 * MIB),
        (1, 4096 * MIB),
        (4, 4096 * MIB),
    ] {
        let scratch = tempfile::tempdir().unwrap();
        let vm = boot(&format!("measure-{disks}x{}", size / MIB), disks, size).await;
        // Some data on each disk.
        let mut script = String::new();
        for i in 0..disks {
            let mount = if i == 0 {
                "/data".to_string()
            } else {
                format!("/data{i}")
            };
            script.push_str(&format!(
                "dd if=/dev/zero of={mount}/fill bs=1M count=64 conv=fsync 2>/dev/null\n"
            ));
        }
        sh(&vm, &script).await;
        let qmp = monitor(&vm).await;
        let capture = QemuCapture::new(vm.name(), qmp.clone());
        let mut totals = Vec::new();
        let mut pauses = Vec::new();
        for _ in 0..5 {
            let prepared = capture
                .prepare(CaptureRequest::new(scratch.path()))
                .await
                .unwrap();
            let started = prepared.start().await.unwrap();
            totals.push(started.start_report().total.as_secs_f64() * 1e3);
            pauses.push(started.start_report().paused.as_secs_f64() * 1e3);
            started.finish(true).await.unwrap();
        }
        totals.sort_by(f64::total_cmp);
        pauses.sort_by(f64::total_cmp);
        println!(
            "start(): {disks} disk(s) x {} MiB: total ms min {:.2} median {:.2} max {:.2}; \
             vCPUs paused ms median {:.2}",
            size / MIB,
            totals[0],
            totals[2],
            totals[4],
            pauses[2]
        );

        if disks == 1 && size == 4096 * MIB {
            // Full read of a 4 GiB disk with 1 GiB allocated: our view vs the peers.
            sh(
                &vm,
                "dd if=/dev/zero of=/data/big bs=1M count=960 conv=fsync 2>/dev/null",
            )
            .await;
            let prepared = capture
                .prepare(CaptureRequest::new(scratch.path()))
                .await
                .unwrap();
            let mut started = prepared.start().await.unwrap();
            let view = started.export().await.unwrap().remove(0);
            let allocation = view.allocation().await.unwrap();
            let bytes: u64 = allocation.iter().map(|r| r.len).sum();
            let socket = scratch
                .path()
                .read_dir()
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "sock"))
                .unwrap();
            // Alternating rounds, medians: the machine is shared and noisy.
            let (mut ours, mut nbdcopy, mut qemu_img) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..3 {
                let began = Instant::now();
                read_ranges_with_threads(&view, &allocation, 4);
                ours.push(began.elapsed());
                let began = Instant::now();
                let status = Command::new("nbdcopy")
                    .arg(format!("nbd+unix:///vd0?socket={}", socket.display()))
                    .arg("null:")
                    .status()
                    .unwrap();
                assert!(status.success());
                nbdcopy.push(began.elapsed());
                let began = Instant::now();
                let status = Command::new("qemu-img")
                    .args(["convert", "-U", "-n", "-f", "qcow2"])
                    .arg(&vm.disks()[0].path)
                    .args([
                        "--target-image-opts",
                        &format!("driver=null-co,size={size}"),
                    ])
                    .status()
                    .unwrap();
                assert!(status.success());
                qemu_img.push(began.elapsed());
            }
            started.finish(true).await.unwrap();
            let median = |mut v: Vec<Duration>| {
                v.sort();
                v[1]
            };
            let (ours, nbdcopy, qemu_img) = (median(ours), median(nbdcopy), median(qemu_img));
            let rate = |d: Duration| bytes as f64 / MIB as f64 / d.as_secs_f64();
            println!(
                "read {} MiB allocated of a {} MiB disk: ours (4 threads, 4 MiB reads) {:.0} \
                 MiB/s in {:.2?}; nbdcopy of the same export {:.0} MiB/s; qemu-img convert of \
                 the image file {:.0} MiB/s; ratio ours/nbdcopy {:.2}, ours/qemu-img {:.2}",
                bytes / MIB,
                size / MIB,
                rate(ours),
                ours,
                rate(nbdcopy),
                rate(qemu_img),
                nbdcopy.as_secs_f64() / ours.as_secs_f64(),
                qemu_img.as_secs_f64() / ours.as_secs_f64(),
            );
        }
        drop(capture);
    }
}

/// Reads `ranges` in 4 MiB pieces from `threads` plain threads, each blocking on the view's
/// async reads — the way the repository writer's workers read (see the engine's adapter).
fn read_ranges_with_threads(view: &Arc<dyn CapturedDisk>, ranges: &[ByteRange], threads: usize) {
    let handle = tokio::runtime::Handle::current();
    let pieces: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|r| {
            (0..r.len.div_ceil(4 * MIB)).map(move |i| {
                let offset = r.offset + i * 4 * MIB;
                (offset, (4 * MIB).min(r.end() - offset))
            })
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut buf = vec![0u8; (4 * MIB) as usize];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(offset, len)) = pieces.get(i) else {
                            break;
                        };
                        handle
                            .block_on(view.read_at(offset, &mut buf[..len as usize]))
                            .unwrap();
                    }
                });
            }
        });
    });
}
