//! The client against a hand-written FAKE guest agent.
//!
//! The fake exists only for faults the real qemu-ga cannot be made to produce: malformed and
//! truncated replies, replies split across many reads, garbage before the 0xFF sentinel, stale
//! replies carrying old sync ids, and an agent that never answers. Everything the real agent
//! does is tested against it in `tests/vm_qemu.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use stillpoint_qga::{
    Client, DisabledReason, ErrorKind, ExecRequest, FreezeStatus, Timeouts, codec::ReplyDecoder,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// What the fake does in answer to one request.
enum Action {
    /// Write these bytes at once.
    Send(Vec<u8>),
    /// Write these bytes in pieces of this size, flushing and yielding between them.
    SendSplit(Vec<u8>, usize),
    /// Close the connection.
    Close,
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Request {
    execute: String,
    arguments: Value,
}

impl Request {
    fn sync_id(&self) -> Option<i64> {
        (self.execute == "guest-sync-delimited")
            .then(|| self.arguments["id"].as_i64())
            .flatten()
    }
}

/// The reply to `guest-sync-delimited` as qemu-ga writes it: 0xFF, then the JSON line.
fn sync_reply(id: i64) -> Vec<u8> {
    let mut bytes = vec![0xFF];
    bytes.extend(line(json!({ "return": id })));
    bytes
}

fn line(value: Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&value).unwrap();
    bytes.push(b'\n');
    bytes
}

fn ret(value: Value) -> Action {
    Action::Send(line(json!({ "return": value })))
}

/// Runs a fake agent on `io`: requests are cut at `\n` (a 0xFF drops what came before it,
/// as in qemu-ga), every request is logged, and `script` decides the answer.
async fn fake_agent<IO, F>(mut io: IO, log: Arc<Mutex<Vec<Request>>>, mut script: F)
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&Request) -> Vec<Action>,
{
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let after_reset = match raw.iter().rposition(|b| *b == 0xFF) {
                Some(at) => &raw[at + 1..],
                None => &raw[..],
            };
            let value: Value = serde_json::from_slice(after_reset).expect("client sent JSON");
            let request = Request {
                execute: value["execute"].as_str().unwrap().to_owned(),
                arguments: value.get("arguments").cloned().unwrap_or(Value::Null),
            };
            log.lock().unwrap().push(request.clone());
            for action in script(&request) {
                match action {
                    Action::Send(bytes) => {
                        if io.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Action::SendSplit(bytes, size) => {
                        for piece in bytes.chunks(size) {
                            if io.write_all(piece).await.is_err() || io.flush().await.is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                    Action::Close => return,
                }
            }
        }
    }
}

/// A client wired to a fake agent over an in-memory duplex pipe.
fn client_with_fake<F>(script: F) -> (Client<DuplexStream>, Arc<Mutex<Vec<Request>>>)
where
    F: FnMut(&Request) -> Vec<Action> + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(1024);
    let log = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(fake_agent(theirs, log.clone(), script));
    (Client::new(ours, "fake-agent"), log)
}

/// Answers syncs correctly and everything else with `answer`.
fn well_behaved(
    mut answer: impl FnMut(&Request) -> Vec<Action> + Send + 'static,
) -> impl FnMut(&Request) -> Vec<Action> + Send + 'static {
    move |request| match request.sync_id() {
        Some(id) => vec![Action::Send(sync_reply(id))],
        None => answer(request),
    }
}

fn commands(log: &Arc<Mutex<Vec<Request>>>) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|r| r.execute.clone())
        .collect()
}

fn short_timeouts() -> Timeouts {
    let short = Duration::from_millis(200);
    Timeouts {
        sync: short,
        quick: short,
        freeze: short,
        thaw: short,
    }
}

#[tokio::test]
async fn first_command_syncs_then_runs() {
    let (mut client, log) = client_with_fake(well_behaved(|_| vec![ret(json!({}))]));
    assert!(!client.is_synchronised());
    client.ping().await.unwrap();
    client.ping().await.unwrap();
    assert!(client.is_synchronised());
    assert_eq!(
        commands(&log),
        ["guest-sync-delimited", "guest-ping", "guest-ping"]
    );
}

#[tokio::test]
async fn reply_split_into_single_bytes_is_reassembled() {
    let info = json!({
        "version": "7.2.22",
        "supported_commands": [
            {"name": "guest-fsfreeze-freeze", "enabled": true, "success-response": true}
        ]
    });
    let (mut client, _log) = client_with_fake(move |request| match request.sync_id() {
        Some(id) => vec![Action::SendSplit(sync_reply(id), 1)],
        None => vec![Action::SendSplit(line(json!({ "return": info })), 1)],
    });
    let info = client.info().await.unwrap();
    assert_eq!(info.version, "7.2.22");
    assert!(info.is_enabled("guest-fsfreeze-freeze"));
}

#[tokio::test]
async fn garbage_before_the_sentinel_is_discarded() {
    let (mut client, _log) = client_with_fake(|request| match request.sync_id() {
        Some(id) => {
            // Left-overs of an earlier session: a partial reply, a full stale reply, a NUL,
            // then the sentinel and the sync reply.
            let mut bytes = b"{\"return\": {\"vers\n{\"return\": 99}\n\x00 junk {".to_vec();
            bytes.extend(sync_reply(id));
            vec![Action::Send(bytes)]
        }
        None => vec![ret(json!("thawed"))],
    });
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
}

#[tokio::test]
async fn stale_sync_replies_with_old_ids_are_skipped() {
    let (mut client, log) = client_with_fake(|request| match request.sync_id() {
        Some(id) => {
            let old = id.wrapping_add(1);
            vec![
                Action::Send(sync_reply(old)),                 // a sync sent long ago
                ret(json!(1)),                                 // the reply to a timed-out freeze
                Action::Send(sync_reply(old.wrapping_add(1))), // another old sync
                Action::Send(sync_reply(id)),                  // ours, last
            ]
        }
        None => vec![ret(json!(2))],
    });
    assert_eq!(client.fsfreeze_thaw().await.unwrap(), 2);
    assert_eq!(
        commands(&log),
        ["guest-sync-delimited", "guest-fsfreeze-thaw"]
    );
}

#[tokio::test]
async fn hung_agent_times_out_and_the_next_call_resynchronises() {
    let mut hung_freeze = true;
    let (client, log) = client_with_fake(move |request| match request.sync_id() {
        // The late reply to the hung freeze arrives first, before the agent gets to the sync.
        Some(id) if !hung_freeze => vec![ret(json!(1)), Action::Send(sync_reply(id))],
        Some(id) => vec![Action::Send(sync_reply(id))],
        None if request.execute == "guest-fsfreeze-freeze" => {
            hung_freeze = false;
            vec![]
        }
        None => vec![ret(json!(2))],
    });
    let mut client = client.with_timeouts(short_timeouts());
    let err = client.fsfreeze_freeze().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Timeout {
            after: Duration::from_millis(200)
        }
    );
    assert_eq!(err.command(), Some("guest-fsfreeze-freeze"));
    assert_eq!(err.agent(), Some("fake-agent"));
    assert!(!client.is_synchronised());

    // The late "1" of the freeze must not be taken as the thaw's reply.
    assert_eq!(client.fsfreeze_thaw().await.unwrap(), 2);
    assert_eq!(
        commands(&log),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-sync-delimited",
            "guest-fsfreeze-thaw"
        ]
    );
}

#[tokio::test]
async fn agent_that_never_answers_the_sync_is_reported_as_not_answering() {
    let (client, _log) = client_with_fake(|_| vec![]);
    let mut client = client.with_timeouts(short_timeouts());
    let err = client.ping().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::NotAnswering {
            after: Duration::from_millis(200)
        }
    );
    assert_eq!(err.command(), Some("guest-sync-delimited"));
    assert!(err.to_string().contains("busy"), "{err}");
}

#[tokio::test]
async fn malformed_reply_is_an_error_with_excerpt_and_the_client_recovers() {
    let mut first = true;
    let (mut client, log) = client_with_fake(well_behaved(move |_| {
        if std::mem::take(&mut first) {
            vec![Action::Send(b"{\"return\": oops}\n".to_vec())]
        } else {
            vec![ret(json!({}))]
        }
    }));
    let err = client.ping().await.unwrap_err();
    let ErrorKind::MalformedReply { problem, excerpt } = err.kind() else {
        panic!("expected MalformedReply, got {err:?}");
    };
    assert_eq!(problem, "the reply is not valid JSON");
    assert_eq!(excerpt, "{\\\"return\\\": oops}");
    assert!(err.to_string().contains("guest-ping"), "{err}");
    client.ping().await.unwrap();
    assert_eq!(
        commands(&log),
        [
            "guest-sync-delimited",
            "guest-ping",
            "guest-sync-delimited",
            "guest-ping"
        ]
    );
}

#[tokio::test]
async fn non_object_reply_is_rejected() {
    let (mut client, _log) = client_with_fake(well_behaved(|_| {
        vec![Action::Send(b"[1, 2, 3]\n".to_vec())]
    }));
    let err = client.ping().await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::MalformedReply { problem, .. } if problem == "the reply is not a JSON object"),
        "{err:?}"
    );
}

#[tokio::test]
async fn reply_of_the_wrong_shape_is_rejected_with_the_command_named() {
    let (mut client, _log) = client_with_fake(well_behaved(|_| vec![ret(json!("melting"))]));
    let err = client.fsfreeze_status().await.unwrap_err();
    let ErrorKind::MalformedReply { problem, excerpt } = err.kind() else {
        panic!("expected MalformedReply, got {err:?}");
    };
    assert_eq!(problem, "the reply does not have the documented shape");
    assert_eq!(excerpt, "\\\"melting\\\"");
    assert_eq!(err.command(), Some("guest-fsfreeze-status"));
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test]
async fn truncated_reply_then_close_is_reported_as_closed() {
    let (mut client, _log) = client_with_fake(well_behaved(|_| {
        vec![
            Action::Send(b"{\"return\": {\"version\": \"7.2".to_vec()),
            Action::Close,
        ]
    }));
    let err = client.info().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Closed);
    assert_eq!(err.command(), Some("guest-info"));
}

#[tokio::test]
async fn oversized_reply_is_rejected_and_the_client_recovers() {
    let mut first = true;
    let (client, _log) = client_with_fake(well_behaved(move |_| {
        if std::mem::take(&mut first) {
            vec![ret(json!("x".repeat(500)))]
        } else {
            vec![ret(json!("thawed"))]
        }
    }));
    let mut client = client.with_decoder(ReplyDecoder::new(128));
    let err = client.fsfreeze_status().await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::MalformedReply { problem, .. } if problem.contains("128 byte limit")),
        "{err:?}"
    );
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
}

#[tokio::test]
async fn a_dropped_call_leaves_the_client_to_resynchronise() {
    let mut first = true;
    let (mut client, log) = client_with_fake(move |request| match request.sync_id() {
        Some(id) if !first => vec![ret(json!({})), Action::Send(sync_reply(id))],
        Some(id) => vec![Action::Send(sync_reply(id))],
        None if std::mem::take(&mut first) => vec![], // the first ping hangs
        None => vec![ret(json!({}))],
    });
    // The caller gives up on its own (select!, its own timeout), dropping the future.
    let abandoned = tokio::time::timeout(Duration::from_millis(100), client.ping()).await;
    assert!(abandoned.is_err());
    assert!(!client.is_synchronised());
    client.ping().await.unwrap();
    assert_eq!(
        commands(&log),
        [
            "guest-sync-delimited",
            "guest-ping",
            "guest-sync-delimited",
            "guest-ping"
        ]
    );
}

#[tokio::test]
async fn agent_errors_are_classified_and_keep_the_client_in_sync() {
    let (mut client, log) = client_with_fake(well_behaved(|request| {
        let desc = match request.execute.as_str() {
            "guest-exec" => "Command guest-exec has been disabled: the agent is in frozen state",
            "guest-fsfreeze-freeze" => "Command guest-fsfreeze-freeze has been disabled",
            _ => "Guest agent command failed, error was 'No such file'",
        };
        let class = if desc.contains("disabled") {
            "CommandNotFound"
        } else {
            "GenericError"
        };
        vec![Action::Send(line(
            json!({"error": {"class": class, "desc": desc}}),
        ))]
    }));
    let err = client
        .exec(&ExecRequest::new("true", Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(err.is_frozen_refusal(), "{err:?}");
    assert_eq!(
        err.to_string(),
        "guest agent fake-agent: guest-exec is disabled while the guest's filesystems are frozen"
    );

    let err = client.fsfreeze_freeze().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::CommandDisabled {
            reason: DisabledReason::Policy { detail: None }
        }
    );

    let err = client.get_osinfo().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Agent {
            class: "GenericError".into(),
            desc: "Guest agent command failed, error was 'No such file'".into()
        }
    );
    // An error reply is a complete reply: no resync was needed in between.
    assert_eq!(
        commands(&log)
            .iter()
            .filter(|c| *c == "guest-sync-delimited")
            .count(),
        1
    );
}

#[tokio::test]
async fn exec_status_output_is_decoded_and_bad_base64_is_rejected() {
    let mut calls = 0;
    let (mut client, _log) = client_with_fake(well_behaved(move |_| {
        calls += 1;
        match calls {
            1 => vec![ret(json!({
                "exited": true, "exitcode": 3,
                "out-data": "aGVsbG8K",   // "hello\n"
                "err-data": "b29wcw==",   // "oops"
                "out-truncated": false
            }))],
            _ => vec![ret(
                json!({"exited": true, "exitcode": 0, "out-data": "!!not base64"}),
            )],
        }
    }));
    let status = client.exec_status(42).await.unwrap();
    assert_eq!(status.stdout, b"hello\n");
    assert_eq!(status.stderr, b"oops");
    assert_eq!(status.exit_code, Some(3));
    assert!(!status.success());

    let err = client.exec_status(43).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::MalformedReply { problem, .. } if problem.contains("out-data")),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_unix_to_a_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-qga.sock");
    let err = stillpoint_qga::connect_unix(&path, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Connect);
    assert_eq!(err.agent(), Some(path.display().to_string().as_str()));
    assert!(err.to_string().contains("no-such-qga.sock"), "{err}");
}

#[tokio::test]
async fn connect_unix_to_a_socket_nobody_serves_is_not_answering() {
    // What a QEMU chardev does while another client holds the agent: the connection is
    // accepted by the kernel, but nothing ever reads or answers.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy-qga.sock");
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let err = stillpoint_qga::connect_unix(&path, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::NotAnswering { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_unix_syncs_with_a_fake_agent_on_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let served = log.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        fake_agent(stream, served, well_behaved(|_| vec![ret(json!({}))])).await;
    });
    let mut client = stillpoint_qga::connect_unix(&path, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(client.is_synchronised());
    client.ping().await.unwrap();
    assert_eq!(commands(&log), ["guest-sync-delimited", "guest-ping"]);
}

#[tokio::test]
async fn agent_gone_after_sync_is_reported_as_closed() {
    let (mut client, _log) = client_with_fake(|request| match request.sync_id() {
        Some(id) => vec![Action::Send(sync_reply(id)), Action::Close],
        None => unreachable!("the fake has closed"),
    });
    client.sync().await.unwrap();
    tokio::task::yield_now().await;
    let err = client.ping().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Closed, "{err:?}");
    assert_eq!(err.command(), Some("guest-ping"));
}
