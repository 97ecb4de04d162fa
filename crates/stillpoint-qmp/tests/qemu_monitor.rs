//! The QMP client against a real QEMU 7.2 with no guest: negotiation,
//! pipelining, events with timestamps, typed errors, transactions that roll
//! back, `quit`.

mod common;

use std::time::Duration;

use common::{QemuNoGuest, qcow2_create};
use serde_json::json;
use stillpoint_qmp::{Action, ErrorKind};

#[tokio::test]
async fn greeting_reports_qemu_7_2_and_pipelined_commands_all_get_their_reply() {
    let qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    assert!(
        qmp.greeting().version.at_least(7, 2),
        "{:?}",
        qmp.greeting()
    );

    // 40 commands in flight at once, of two kinds, from clones of one client.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let qmp = qmp.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let s = qmp.query_status().await.unwrap();
                assert!(s.running || s.status == "prelaunch" || s.status == "paused");
                "status"
            } else {
                let nodes = qmp.query_named_block_nodes().await.unwrap();
                assert!(nodes.is_empty());
                "nodes"
            }
        }));
    }
    let mut kinds = Vec::new();
    for t in tasks {
        kinds.push(t.await.unwrap());
    }
    assert_eq!(kinds.iter().filter(|k| **k == "status").count(), 20);
}

#[tokio::test]
async fn stop_emits_a_timestamped_event_and_cont_resumes() {
    let qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();
    qmp.stop().await.unwrap();
    let stop = events
        .wait_event("STOP", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(stop.timestamp.to_system_time().is_some(), "{stop:?}");
    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "paused");
    qmp.cont().await.unwrap();
    let resume = events
        .wait_event("RESUME", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(resume.timestamp >= stop.timestamp);
    assert!(qmp.query_status().await.unwrap().running);
}

#[tokio::test]
async fn qemu_errors_are_typed_with_class_desc_and_command() {
    let qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    let err = qmp.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(err.qemu_class(), Some("CommandNotFound"));
    assert_eq!(err.command(), Some("no-such-command"));
    assert_eq!(err.socket(), Some(qemu.qmp_socket.as_path()));

    let err = qmp.blockdev_del("missing").await.unwrap_err();
    assert_eq!(err.qemu_class(), Some("GenericError"), "{err}");
    assert!(
        err.to_string()
            .starts_with("QEMU rejected 'blockdev-del': GenericError: ")
    );

    let err = qmp
        .blockdev_add(json!({"driver": "qcow2", "node-name": "d",
                             "file": {"driver": "file", "filename": "/nonexistent/x.qcow2"}}))
        .await
        .unwrap_err();
    assert!(
        err.qemu_desc().unwrap().contains("/nonexistent/x.qcow2"),
        "{err}"
    );
}

#[tokio::test]
async fn transaction_with_a_bad_action_rolls_back_every_action() {
    let qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    let img = qemu.path("a.qcow2");
    qcow2_create(&img, 16 << 20);
    qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "disk0",
                            "file": {"driver": "file", "filename": img}}))
        .await
        .unwrap();
    let err = qmp
        .transaction(vec![
            Action::bitmap_add("disk0", "b1", true),
            Action::bitmap_disable("no-such-node", "b0"),
        ])
        .await
        .unwrap_err();
    assert!(err.qemu_desc().unwrap().contains("no-such-node"), "{err}");
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let disk0 = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
    assert!(
        disk0.bitmap("b1").is_none(),
        "b1 must have been rolled back"
    );

    qmp.transaction(vec![Action::bitmap_add_with_granularity(
        "disk0",
        "b1",
        false,
        1 << 20,
    )])
    .await
    .unwrap();
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let b1 = nodes
        .iter()
        .find(|n| n.node_name == "disk0")
        .and_then(|n| n.bitmap("b1"))
        .cloned()
        .unwrap();
    assert_eq!(b1.granularity, 1 << 20);
    assert!(b1.recording && !b1.persistent && !b1.busy && b1.count == 0);
}

#[tokio::test]
async fn quit_succeeds_qemu_exits_cleanly_and_later_commands_are_closed() {
    let mut qemu = QemuNoGuest::start().await;
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();
    qmp.quit().await.unwrap();
    let status = qemu.wait_exit().await;
    assert!(status.success(), "{status}");
    let shutdown = events
        .wait_event("SHUTDOWN", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    // Give the reader task the EOF, then every command fails with Closed.
    let err = loop {
        match qmp.query_status().await {
            Err(e) => break e,
            Ok(_) => tokio::task::yield_now().await,
        }
    };
    assert_eq!(err.kind(), &ErrorKind::Closed, "{err}");
}
