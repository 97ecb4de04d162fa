//! The NBD client against QEMU's built-in NBD server, driven through the QMP
//! client: a point-in-time export (QEMU's fleecing job; docs/capture.md has the capture itself) read by
//! our client, checked against `nbdinfo` and the known writes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{QemuNoGuest, connect_retrying, mixed_content, nbdinfo_map, qcow2_from_bytes, run};
use serde_json::json;
use stillpoint_nbd::{ErrorKind, ReadOptions, dirty_ranges};
use stillpoint_qmp::{Action, BitmapRef, BlockdevBackup, ExportRemoveMode, JobStatus, NbdExport};

const SIZE: usize = 32 << 20;
const CLUSTER: u64 = 64 << 10;
const T: Duration = Duration::from_secs(20);

fn clusters_of(writes: &[(u64, usize)]) -> BTreeSet<u64> {
    writes
        .iter()
        .flat_map(|&(o, l)| o / CLUSTER..(o + l as u64).div_ceil(CLUSTER))
        .collect()
}

#[tokio::test]
async fn capture_read_through_qemus_nbd_server_is_the_point_in_time_with_exact_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let content = mixed_content(SIZE);
    let img = qcow2_from_bytes(dir.path(), "disk0", &content);
    let scratch = dir.path().join("fleece.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            scratch.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    let nbd_sock = dir.path().join("nbd.sock");

    let qemu = QemuNoGuest::start(dir.path()).await;
    let qmp = qemu.connect().await;
    qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "disk0",
                            "file": {"driver": "file", "filename": img}}))
        .await
        .unwrap();
    qmp.transaction(vec![Action::bitmap_add("disk0", "b1", true)])
        .await
        .unwrap();
    qmp.nbd_server_start_unix(&nbd_sock).await.unwrap();
    qmp.block_export_add_nbd(
        &NbdExport::new("src-exp", "disk0")
            .name("src")
            .writable(true),
    )
    .await
    .unwrap();

    // "Guest" writes through our own client, before the capture...
    let guest = connect_retrying(&nbd_sock, "src", &[]).await.unwrap();
    let before: [(u64, usize); 3] = [(4096, 8192), (9 << 20, 200_000), (31 << 20, 1 << 20)];
    let mut at_capture = content.clone();
    for (i, &(o, l)) in before.iter().enumerate() {
        let bytes = vec![0xA0 + i as u8; l];
        guest.write(o, &bytes).await.unwrap();
        at_capture[o as usize..o as usize + l].copy_from_slice(&bytes);
    }
    guest.flush().await.unwrap();

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
    events
        .wait_job_status("fleece0", JobStatus::Running, T)
        .await
        .unwrap();

    // ...and after it, over the same ranges and a new one.
    let after: [(u64, usize); 2] = [(0, 64 << 10), (20 << 20, 4096)];
    for &(o, l) in &after {
        guest.write(o, &vec![0xEE; l]).await.unwrap();
    }
    guest.flush().await.unwrap();

    qmp.block_export_add_nbd(
        &NbdExport::new("cap-exp", "fl0")
            .name("disk0")
            .bitmaps(vec![BitmapRef::Local("b1".into())]),
    )
    .await
    .unwrap();
    let ctx = "qemu:dirty-bitmap:b1";
    let cap = connect_retrying(&nbd_sock, "disk0", &["base:allocation", ctx])
        .await
        .unwrap();
    assert_eq!(cap.size(), SIZE as u64);
    assert!(cap.info().read_only());

    let whole = cap.read(0, cap.size()).await.unwrap();
    assert!(
        whole == at_capture,
        "the capture is not the point-in-time view"
    );

    let uri = format!("nbd+unix:///disk0?socket={}", nbd_sock.display());
    let dirty_map = cap.map(ctx).await.unwrap();
    assert_eq!(dirty_map, nbdinfo_map(Some(ctx), &uri));
    let dirty = dirty_ranges(&dirty_map);
    let got: BTreeSet<u64> = dirty
        .iter()
        .flat_map(|&(o, l)| o / CLUSTER..(o + l) / CLUSTER)
        .collect();
    assert_eq!(got, clusters_of(&before));
    assert_eq!(
        cap.map("base:allocation").await.unwrap(),
        nbdinfo_map(None, &uri)
    );

    // The incremental: only dirty clusters, with their point-in-time bytes.
    let mut n = 0u64;
    cap.read_ranges(&dirty, ReadOptions::default(), |o, d| {
        assert!(
            d == &at_capture[o as usize..o as usize + d.len()],
            "block at {o}"
        );
        n += d.len() as u64;
    })
    .await
    .unwrap();
    assert_eq!(n, clusters_of(&before).len() as u64 * CLUSTER);

    // Safe removal refuses while we are connected; hard removal disconnects
    // us, and our next read fails instead of hanging.
    let err = qmp
        .block_export_del("cap-exp", ExportRemoveMode::Safe)
        .await
        .unwrap_err();
    assert!(err.qemu_desc().unwrap().contains("still in use"), "{err}");
    qmp.block_export_del_and_wait("cap-exp", ExportRemoveMode::Hard, T)
        .await
        .unwrap();
    let err = cap.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Closed | ErrorKind::Io),
        "{err}"
    );

    guest.disconnect().await.unwrap();
    qmp.block_export_del_and_wait("src-exp", ExportRemoveMode::Safe, T)
        .await
        .unwrap();
    qmp.nbd_server_stop().await.unwrap();
    qmp.block_job_cancel_and_wait("fleece0", T).await.unwrap();
    qmp.job_dismiss("fleece0").await.unwrap();
    qmp.blockdev_del("fl0").await.unwrap();
    qmp.quit().await.unwrap();
    assert!(qemu.wait_exit().await.success());
}
