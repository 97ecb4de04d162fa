//! The QMP client's block-job, bitmap, export and event API end to end on a
//! real QEMU 7.2 with no guest, through QEMU's own fleecing sequence (a
//! `blockdev-backup sync=none` job), checked with the real libnbd tools
//! (`nbdcopy` writes through a writable export of the source, as a guest
//! would; `qemu-img convert` and `nbdinfo --map` read the capture).
//!
//! This is not the capture stillpoint takes: that one uses the standalone
//! `copy-before-write` filter (docs/capture.md says why) and is tested end to
//! end on real VMs in `stillpoint-platform`'s `vm_capture.rs`. The job sequence
//! stays here because it exercises what the filter path does not: job events
//! with QEMU's timestamps, cancel, dismiss and their refusals.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{QemuNoGuest, nbd_uri, qcow2_create, run};
use serde_json::{Value, json};
use stillpoint_qmp::{
    Action, BitmapRef, BlockdevBackup, ExportRemoveMode, JobStatus, NbdExport, Qmp,
};

const SIZE: usize = 32 << 20;
const T: Duration = Duration::from_secs(20);

/// Original disk: 8 MiB of a position-dependent pattern, then zeros.
fn original() -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for (i, b) in v[..8 << 20].iter_mut().enumerate() {
        *b = ((i / 4096) % 251) as u8 + 1;
    }
    v
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn read_as_raw(qemu: &QemuNoGuest, source: &str, format: &str, name: &str) -> Vec<u8> {
    let out = qemu.path(name);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            source,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

async fn bitmap(qmp: &Qmp, node: &str, name: &str) -> stillpoint_qmp::DirtyBitmapInfo {
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    nodes
        .iter()
        .find(|n| n.node_name == node)
        .and_then(|n| n.bitmap(name))
        .cloned()
        .unwrap_or_else(|| panic!("bitmap {name} on {node} not found"))
}

/// `nbdinfo --map=CONTEXT` as (offset, length, description) rows.
fn nbdinfo_map(context: &str, uri: &str) -> Vec<(u64, u64, String)> {
    run("nbdinfo", &[&format!("--map={context}"), uri])
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let off = f.next().unwrap().parse().unwrap();
            let len = f.next().unwrap().parse().unwrap();
            let _type = f.next();
            (off, len, f.collect::<Vec<_>>().join(" "))
        })
        .collect()
}

#[tokio::test]
async fn fleecing_job_exports_the_point_in_time_and_cleans_up_in_order() {
    let mut qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    let src_raw = qemu.path("src.raw");
    let src = qemu.path("src.qcow2");
    let scratch = qemu.path("fleece.qcow2");
    let nbd_sock = qemu.path("nbd.sock");
    let mut expected = original();
    write_file(&src_raw, &expected);
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src_raw.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    );
    qcow2_create(&scratch, SIZE as u64); // no backing in its header

    // The "VM disk" and the bitmap of the previous backup.
    qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "disk0",
                            "file": {"driver": "file", "filename": src}}))
        .await
        .unwrap();
    qmp.transaction(vec![Action::bitmap_add("disk0", "b1", true)])
        .await
        .unwrap();

    // Guest writes stand in as writes through a writable export of disk0. It
    // must exist *before* the capture: the backup job's filter is inserted
    // above disk0's existing parents, as it is above a guest's device.
    qmp.nbd_server_start_unix(&nbd_sock).await.unwrap();
    qmp.block_export_add_nbd(
        &NbdExport::new("src-exp", "disk0")
            .name("src")
            .writable(true),
    )
    .await
    .unwrap();
    let src_uri = nbd_uri(&nbd_sock, "src");
    let write1 = qemu.path("w1.raw");
    write_file(&write1, &vec![0xAA; 192 << 10]);
    run("nbdcopy", &[write1.to_str().unwrap(), &src_uri]);
    expected[..192 << 10].fill(0xAA);
    assert_eq!(bitmap(&qmp, "disk0", "b1").await.count, 192 << 10);

    // Capture: one transaction (bitmap rotation + the fleecing job).
    qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "fl0",
                            "file": {"driver": "file", "filename": scratch},
                            "backing": "disk0"}))
        .await
        .unwrap();
    let mut events = qmp.subscribe();
    qmp.transaction(vec![
        Action::bitmap_add("disk0", "b2", true),
        Action::bitmap_disable("disk0", "b1"),
        Action::blockdev_backup(BlockdevBackup::fleece("fleece0", "disk0", "fl0")),
    ])
    .await
    .unwrap();
    // The job's first events come before the transaction's reply; the
    // subscription made before the command still has them.
    let created = events
        .wait_job_status("fleece0", JobStatus::Created, T)
        .await
        .unwrap();
    let running = events
        .wait_job_status("fleece0", JobStatus::Running, T)
        .await
        .unwrap();
    assert_eq!(running.status, JobStatus::Running);
    assert!(running.timestamp >= created.timestamp);
    let jobs = qmp.query_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].id.as_str(), jobs[0].job_type.as_str()),
        ("fleece0", "backup")
    );

    // A write after the point in time: must not reach the capture.
    let write2 = qemu.path("w2.raw");
    write_file(&write2, &vec![0xBB; 64 << 10]);
    run("nbdcopy", &[write2.to_str().unwrap(), &src_uri]);
    let b1 = bitmap(&qmp, "disk0", "b1").await;
    let b2 = bitmap(&qmp, "disk0", "b2").await;
    assert_eq!((b1.count, b1.recording), (192 << 10, false));
    assert_eq!((b2.count, b2.recording), (64 << 10, true));

    // Export the point-in-time view with the frozen bitmap.
    qmp.block_export_add_nbd(
        &NbdExport::new("cap-exp", "fl0")
            .name("disk0")
            .bitmaps(vec![BitmapRef::Local("b1".into())]),
    )
    .await
    .unwrap();
    assert!(bitmap(&qmp, "disk0", "b1").await.busy);
    let exports = qmp.query_block_exports().await.unwrap();
    assert!(
        exports
            .iter()
            .any(|e| e.id == "cap-exp" && e.node_name == "fl0")
    );
    let cap_uri = nbd_uri(&nbd_sock, "disk0");
    let captured = read_as_raw(&qemu, &cap_uri, "raw", "captured.raw");
    assert!(
        captured == expected,
        "the export is not the point-in-time view"
    );
    let map = nbdinfo_map("qemu:dirty-bitmap:b1", &cap_uri);
    assert_eq!(
        map,
        vec![
            (0, 192 << 10, "dirty".to_string()),
            (192 << 10, SIZE as u64 - (192 << 10), "clean".to_string())
        ]
    );

    // Wrong orders fail with QEMU's words and change nothing.
    let err = qmp.blockdev_del("fl0").await.unwrap_err();
    assert!(err.qemu_desc().unwrap().contains("in use"), "{err}");
    let err = qmp.job_dismiss("fleece0").await.unwrap_err();
    assert!(
        err.qemu_desc()
            .unwrap()
            .contains("cannot accept command verb 'dismiss'"),
        "{err}"
    );

    // Cleanup: exports, then the server, then the job and its node, waiting
    // for each event.
    qmp.block_export_del_and_wait("cap-exp", ExportRemoveMode::Safe, T)
        .await
        .unwrap();
    qmp.block_export_del_and_wait("src-exp", ExportRemoveMode::Hard, T)
        .await
        .unwrap();
    qmp.nbd_server_stop().await.unwrap();
    let mut cancel_events = qmp.subscribe();
    let concluded = qmp.block_job_cancel_and_wait("fleece0", T).await.unwrap();
    assert_eq!(concluded.status, JobStatus::Concluded);
    let cancelled = cancel_events
        .wait_event("BLOCK_JOB_CANCELLED", T)
        .await
        .unwrap();
    assert_eq!(cancelled.data["device"], "fleece0");
    assert!(concluded.timestamp >= running.timestamp);
    let mut dismiss_events = qmp.subscribe();
    qmp.job_dismiss("fleece0").await.unwrap();
    let gone = dismiss_events
        .wait_job_status("fleece0", JobStatus::Null, T)
        .await
        .unwrap();
    assert_eq!(gone.status, JobStatus::Null);
    assert!(qmp.query_jobs().await.unwrap().is_empty());
    qmp.blockdev_del("fl0").await.unwrap();

    // Success: drop the old bitmap; the new one keeps recording.
    qmp.transaction(vec![Action::bitmap_remove("disk0", "b1")])
        .await
        .unwrap();
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let disk0 = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
    let names: Vec<_> = disk0
        .dirty_bitmaps
        .iter()
        .filter_map(|b| b.name.clone())
        .collect();
    assert_eq!(names, vec!["b2".to_string()]);
    assert!(nodes.iter().all(|n| n.node_name != "fl0"));

    qmp.quit().await.unwrap();
    assert!(qemu.wait_exit().await.success());

    // On disk: the guest's later write is in the source, and the persistent
    // bitmap b2 was stored when QEMU closed the image.
    let mut now = expected.clone();
    now[..64 << 10].fill(0xBB);
    assert!(read_as_raw(&qemu, src.to_str().unwrap(), "qcow2", "after.raw") == now);
    let info: Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output=json", src.to_str().unwrap()],
    ))
    .unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps.as_array().map(Vec::len), Some(1), "{info}");
    assert_eq!(bitmaps[0]["name"], "b2");
    assert_eq!(bitmaps[0]["flags"], json!(["auto"]));
}
