//! A hand-written **fake QMP peer**, only for faults real QEMU cannot be made
//! to produce: malformed and truncated replies, a monitor that never answers,
//! replies out of order. Everything else is tested against real QEMU
//! (`qemu_*.rs`).

use std::time::Duration;

use serde_json::{Value, json};
use stillpoint_qmp::{ErrorKind, Qmp};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// The fake's side of the connection.
struct FakeMonitor {
    rd: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    wr: tokio::io::WriteHalf<DuplexStream>,
}

impl FakeMonitor {
    async fn send(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\r\n").await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    /// Reads one command and returns (execute, id).
    async fn recv(&mut self) -> (String, Value) {
        let mut line = String::new();
        self.rd.read_line(&mut line).await.unwrap();
        let v: Value = serde_json::from_str(&line).expect("client sends JSON");
        (v["execute"].as_str().unwrap().to_string(), v["id"].clone())
    }

    /// Answers the client's `qmp_capabilities`.
    async fn accept_capabilities(&mut self) {
        let (cmd, id) = self.recv().await;
        assert_eq!(cmd, "qmp_capabilities");
        self.send(&json!({"return": {}, "id": id}).to_string())
            .await;
    }
}

fn pair() -> (DuplexStream, FakeMonitor) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (rd, wr) = tokio::io::split(server);
    (
        client,
        FakeMonitor {
            rd: BufReader::new(rd),
            wr,
        },
    )
}

async fn connected(timeout: Duration) -> (Qmp, FakeMonitor) {
    let (client, mut fake) = pair();
    let fake_task = tokio::spawn(async move {
        fake.send(GREETING).await;
        fake.accept_capabilities().await;
        fake
    });
    let qmp = Qmp::negotiate(client, None, timeout).await.unwrap();
    (qmp, fake_task.await.unwrap())
}

#[tokio::test]
async fn malformed_reply_fails_the_command_with_its_line_and_closes() {
    let (qmp, mut fake) = connected(Duration::from_secs(5)).await;
    let peer = tokio::spawn(async move {
        let _ = fake.recv().await;
        fake.send(r#"{"return": {"status": "running", "running": tru"#)
            .await;
        fake
    });
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Malformed, "{err}");
    // greeting = line 1, capabilities reply = line 2, the bad reply = line 3
    assert_eq!(err.line(), Some(3));
    assert_eq!(err.command(), Some("query-status"));
    let _fake = peer.await.unwrap();
    // The stream is out of step: later commands fail at once with the same cause.
    let again = qmp.execute("query-status", None).await.unwrap_err();
    assert_eq!(again.kind(), &ErrorKind::Malformed);
    assert!(qmp.is_closed());
}

#[tokio::test]
async fn truncated_reply_then_eof_is_closed_not_a_hang() {
    let (qmp, mut fake) = connected(Duration::from_secs(5)).await;
    let peer = tokio::spawn(async move {
        let _ = fake.recv().await;
        fake.send_raw(br#"{"return": {"status": "runn"#).await;
        drop(fake); // QEMU crashed mid-reply
    });
    let err = qmp.execute("query-status", None).await.unwrap_err();
    peer.await.unwrap();
    // LinesCodec hands over the unterminated tail at EOF; it is not valid JSON.
    assert!(
        matches!(err.kind(), ErrorKind::Malformed | ErrorKind::Closed),
        "{err}"
    );
    let again = qmp.execute("query-status", None).await.unwrap_err();
    assert!(matches!(
        again.kind(),
        ErrorKind::Malformed | ErrorKind::Closed
    ));
}

#[tokio::test]
async fn eof_with_commands_pending_fails_them_with_closed() {
    let (qmp, mut fake) = connected(Duration::from_secs(5)).await;
    let peer = tokio::spawn(async move {
        let _ = fake.recv().await;
        drop(fake);
    });
    let err = qmp.execute("stop", None).await.unwrap_err();
    peer.await.unwrap();
    assert_eq!(err.kind(), &ErrorKind::Closed, "{err}");
    assert_eq!(
        err.to_string(),
        "QMP monitor connection closed before 'stop' completed"
    );
}

#[tokio::test(start_paused = true)]
async fn unanswered_command_times_out_and_a_late_reply_is_not_misrouted() {
    let (qmp, mut fake) = connected(Duration::from_secs(5)).await;
    let err = qmp
        .execute_with_timeout("query-jobs", None, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Timeout {
            after: Duration::from_secs(2)
        }
    );
    let (cmd1, id1) = fake.recv().await;
    assert_eq!(cmd1, "query-jobs");
    // The next command is in flight when the late reply to the first arrives.
    let next = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    let (cmd2, id2) = fake.recv().await;
    assert_eq!(cmd2, "query-status");
    assert_ne!(id1, id2);
    fake.send(&json!({"return": ["late"], "id": id1}).to_string())
        .await;
    fake.send(&json!({"return": {"running": true, "status": "running"}, "id": id2}).to_string())
        .await;
    let v = next.await.unwrap().unwrap();
    assert_eq!(v["status"], "running");
}

#[tokio::test]
async fn out_of_order_replies_and_interleaved_events_reach_the_right_callers() {
    let (qmp, mut fake) = connected(Duration::from_secs(5)).await;
    let mut events = qmp.subscribe();
    let a = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("cmd-a", None).await }
    });
    let (_, id_a) = fake.recv().await;
    let b = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("cmd-b", None).await }
    });
    let (_, id_b) = fake.recv().await;
    fake.send(&json!({"return": "for-b", "id": id_b}).to_string())
        .await;
    fake.send(r#"{"timestamp": {"seconds": 10, "microseconds": 5}, "event": "STOP"}"#)
        .await;
    fake.send(&json!({"id": id_a, "error": {"class": "GenericError", "desc": "no"}}).to_string())
        .await;
    assert_eq!(b.await.unwrap().unwrap(), json!("for-b"));
    let err = a.await.unwrap().unwrap_err();
    assert_eq!(err.qemu_class(), Some("GenericError"));
    assert_eq!(err.to_string(), "QEMU rejected 'cmd-a': GenericError: no");
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "STOP");
    assert_eq!(ev.timestamp.seconds, 10);
}

#[tokio::test]
async fn garbage_instead_of_greeting_is_malformed_at_line_one() {
    let (client, mut fake) = pair();
    fake.send("SSH-2.0-OpenSSH_9.2").await;
    let err = Qmp::negotiate(
        client,
        Some("/tmp/not-qmp.sock".into()),
        Duration::from_secs(5),
    )
    .await
    .err()
    .expect("negotiation fails");
    assert_eq!(err.kind(), &ErrorKind::Malformed);
    assert_eq!(err.line(), Some(1));
    assert!(
        err.to_string().contains("(monitor /tmp/not-qmp.sock)"),
        "{err}"
    );
}

#[tokio::test]
async fn overlong_line_is_malformed_not_unbounded_memory() {
    let (qmp, mut fake) = connected(Duration::from_secs(20)).await;
    let peer = tokio::spawn(async move {
        let _ = fake.recv().await;
        // 65 MiB without a newline: past the 64 MiB line limit.
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..65 {
            if fake.wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        fake
    });
    let err = qmp.execute("query-block", None).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Malformed, "{err}");
    assert!(err.to_string().contains("longer than"), "{err}");
    drop(peer);
}
