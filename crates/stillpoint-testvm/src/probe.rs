//! Just enough of the guest agent and QMP protocols for the launcher: readiness checks,
//! `quit`, and test set-up (`guest-exec`). Raw newline-delimited JSON over a Unix socket.
//! The project's real clients are `stillpoint-qga` and `stillpoint-qmp`; this crate sits below
//! them and is used by their tests, so it cannot use them.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::{Error, ErrorKind, Result};

/// The byte qemu-ga puts before its answer to `guest-sync-delimited` (and that a client sends
/// to reset the agent's parser).
const SYNC_DELIMITER: u8 = 0xFF;
/// Longest reply line accepted (guest-exec output comes base64-encoded on one line).
const MAX_LINE: usize = 16 << 20;

/// A distinct id for each `guest-sync-delimited`, so a late answer to an earlier one (buffered
/// while the guest port was closed) is never taken for ours.
fn next_sync_id() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(1);
    let salt = std::process::id().wrapping_mul(65_537);
    salt.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed)) & 0x7fff_ffff
}

struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    what: &'static str,
}

impl Connection {
    async fn open(socket: &Path, what: &'static str) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("cannot connect to the {what} at `{}`", socket.display()),
            )
            .with_path(socket)
            .with_source(e)
        })?;
        let (reader, writer) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(reader),
            writer,
            what,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).await.map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("cannot write to the {}", self.what),
            )
            .with_source(e)
        })
    }

    async fn send_json(&mut self, value: &Value) -> Result<()> {
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line).await
    }

    /// Reads up to and including `delimiter`.
    async fn read_until(&mut self, delimiter: u8) -> Result<Vec<u8>> {
        let mut buffer = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(delimiter, &mut buffer)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("cannot read from the {}", self.what),
                )
                .with_source(e)
            })?;
        if read == 0 || buffer.last() != Some(&delimiter) {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "the {} closed the connection or sent an over-long reply",
                    self.what
                ),
            ));
        }
        Ok(buffer)
    }

    async fn read_json(&mut self) -> Result<Value> {
        let line = self.read_until(b'\n').await?;
        serde_json::from_slice(&line).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "the {} sent a reply that is not JSON: {:?}",
                    self.what,
                    crate::tool::tail(&String::from_utf8_lossy(&line), 200)
                ),
            )
            .with_source(e)
        })
    }

    /// Reads replies until one answers a command (skipping QMP events).
    async fn read_answer(&mut self, command: &str) -> Result<Value> {
        loop {
            let reply = self.read_json().await?;
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "the {} refused `{command}`: {} ({})",
                        self.what,
                        error["desc"].as_str().unwrap_or("no description"),
                        error["class"].as_str().unwrap_or("no class"),
                    ),
                ));
            }
        }
    }

    /// `guest-sync-delimited`: discards whatever precedes the answer with our id.
    async fn agent_sync(&mut self) -> Result<()> {
        let id = next_sync_id();
        self.send(&[SYNC_DELIMITER]).await?;
        self.send_json(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}))
            .await?;
        loop {
            self.read_until(SYNC_DELIMITER).await?;
            let reply = self.read_json().await?;
            if reply.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                return Ok(());
            }
        }
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    what: String,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("{what}: no answer within {timeout:?}"),
            ))
        })
}

/// Runs one guest agent command on a fresh connection (after `guest-sync-delimited`) and
/// returns its `return` value.
pub async fn agent_command(
    socket: &Path,
    execute: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value> {
    with_timeout(timeout, format!("guest agent command `{execute}`"), async {
        let mut connection = Connection::open(socket, "guest agent").await?;
        connection.agent_sync().await?;
        let mut command = json!({ "execute": execute });
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        connection.send_json(&command).await?;
        connection.read_answer(execute).await
    })
    .await
}

/// Runs one QMP command (after the greeting and `qmp_capabilities`) and returns its `return`.
pub async fn monitor_command(socket: &Path, execute: &str, timeout: Duration) -> Result<Value> {
    with_timeout(timeout, format!("QMP command `{execute}`"), async {
        let mut connection = Connection::open(socket, "QEMU monitor").await?;
        let greeting = connection.read_json().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("the QEMU monitor greeted with {greeting} instead of a QMP banner"),
            ));
        }
        connection
            .send_json(&json!({"execute": "qmp_capabilities"}))
            .await?;
        connection.read_answer("qmp_capabilities").await?;
        connection.send_json(&json!({ "execute": execute })).await?;
        connection.read_answer(execute).await
    })
    .await
}

/// What a command run with `guest-exec` left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestExecOutput {
    /// Exit code, when the process exited normally.
    pub exit_code: Option<i64>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i64>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

impl GuestExecOutput {
    /// Standard output as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `argv` in the guest with `guest-exec` and waits for it with `guest-exec-status`.
pub async fn guest_exec(
    socket: &Path,
    argv: &[&str],
    timeout: Duration,
) -> Result<GuestExecOutput> {
    let Some((path, args)) = argv.split_first() else {
        return Err(Error::invalid("guest-exec command", "the argv is empty"));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let started = agent_command(
        socket,
        "guest-exec",
        Some(json!({"path": path, "arg": args, "capture-output": true})),
        timeout,
    )
    .await?;
    let pid = started["pid"].as_i64().ok_or_else(|| {
        Error::new(
            ErrorKind::Protocol,
            format!("guest-exec answered {started} without a pid"),
        )
    })?;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status =
            agent_command(socket, "guest-exec-status", Some(json!({"pid": pid})), left).await?;
        if status["exited"].as_bool() == Some(true) {
            return Ok(GuestExecOutput {
                exit_code: status["exitcode"].as_i64(),
                signal: status["signal"].as_i64(),
                stdout: decode_output(&status, "out-data")?,
                stderr: decode_output(&status, "err-data")?,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "`{}` did not exit in the guest within {timeout:?}",
                    argv.join(" ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn decode_output(status: &Value, field: &str) -> Result<Vec<u8>> {
    let Some(text) = status.get(field).and_then(Value::as_str) else {
        return Ok(Vec::new());
    };
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("guest-exec-status `{field}` is not base64"),
            )
            .with_source(e)
        })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;

    /// A hand-written fake agent (the real qemu-ga cannot be made to do this): it first
    /// answers a stale sync id, then ours, then the command with an error.
    #[tokio::test]
    async fn sync_skips_stale_answers_and_errors_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake-qga.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let fake = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (reader, mut writer) = stream.into_split();
            let mut reader = BufReader::new(reader);
            let mut flush = [0u8; 1];
            reader.read_exact(&mut flush).await.expect("0xff");
            assert_eq!(flush[0], 0xFF);
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("sync");
            let sync: Value = serde_json::from_str(&line).expect("sync json");
            let id = sync["arguments"]["id"].as_u64().expect("id");
            // Noise, a late answer to someone else's sync, then ours, then the refusal.
            let mut bytes = b"garbage".to_vec();
            bytes.push(0xFF);
            bytes.extend_from_slice(b"{\"return\": 1}\n");
            bytes.push(0xFF);
            bytes.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            bytes.extend_from_slice(
                br#"{"error": {"class": "GenericError", "desc": "Command guest-exec has been disabled"}}"#,
            );
            bytes.push(b'\n');
            writer.write_all(&bytes).await.expect("write");
            line.clear();
            reader.read_line(&mut line).await.expect("command");
            line
        });
        let error = agent_command(
            &socket,
            "guest-exec",
            Some(json!({"path": "/bin/true"})),
            Duration::from_secs(5),
        )
        .await
        .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Protocol);
        assert!(
            error
                .to_string()
                .contains("has been disabled (GenericError)"),
            "{error}"
        );
        let command: Value =
            serde_json::from_str(&fake.await.expect("fake")).expect("command json");
        assert_eq!(command["execute"], "guest-exec");
        assert_eq!(command["arguments"]["path"], "/bin/true");
    }

    /// A hand-written fake that never answers (a hung agent).
    #[tokio::test]
    async fn silent_agent_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("hung.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let _hold = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let error = agent_command(&socket, "guest-ping", None, Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert_eq!(error.kind(), ErrorKind::Timeout);
        assert!(error.to_string().contains("guest-ping"), "{error}");
    }

    #[test]
    fn exec_output_decodes_base64() {
        let status = json!({"exited": true, "exitcode": 0, "out-data": "aGVsbG8K"});
        assert_eq!(
            decode_output(&status, "out-data").expect("decode"),
            b"hello\n"
        );
        assert!(
            decode_output(&status, "err-data")
                .expect("absent")
                .is_empty()
        );
        let bad = json!({"out-data": "***"});
        assert_eq!(
            decode_output(&bad, "out-data").expect_err("bad").kind(),
            ErrorKind::Protocol
        );
    }
}
