//! The transport: runs the codec over any async byte stream.
//!
//! One reader task splits the stream into lines, routes replies to the waiting
//! command by `id` and broadcasts events; one writer task writes whole command
//! lines, so a caller that gives up on a command (timeout, dropped future)
//! never leaves half a line on the wire.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, trace, warn};

use crate::codec::{self, Event, Greeting, Message};
use crate::error::{Error, ErrorKind, Result};
use crate::events::EventStream;

/// Replies such as `query-named-block-nodes` on a VM with many disks run to
/// megabytes; anything past this is a broken peer, not a reply.
const MAX_LINE: usize = 64 << 20;
/// Events kept for a slow subscriber before it is told it lost some.
const EVENT_BUFFER: usize = 1024;
/// Default per-command timeout; `transaction` and `blockdev-add` take
/// milliseconds, so this only bounds a hung QEMU.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = Result<Value>;

struct Shared {
    state: Mutex<State>,
    socket: Option<PathBuf>,
}

struct State {
    /// Commands sent and not yet answered: id → (command name, reply slot).
    pending: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    /// `None` once the connection is closed; dropping it ends every subscription.
    events: Option<broadcast::Sender<Event>>,
    /// Why the connection closed, given to every later command.
    closed: Option<Error>,
}

impl Shared {
    fn close(&self, why: Error) {
        let mut st = self.state.lock().expect("qmp state lock");
        if st.closed.is_none() {
            debug!(error = %why, "QMP connection closed");
            st.closed = Some(why.clone());
        }
        st.events = None;
        for (_, (name, tx)) in st.pending.drain() {
            let _ = tx.send(Err(why.clone().with_command(name)));
        }
    }

    fn closed_error(&self) -> Option<Error> {
        self.state.lock().expect("qmp state lock").closed.clone()
    }
}

/// A connected, negotiated QMP monitor. Cheap to clone; all clones share one
/// connection. The connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    lines: mpsc::UnboundedSender<String>,
    next_id: AtomicU64,
    greeting: Greeting,
    default_timeout: Duration,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Qmp> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
            Error::new(ErrorKind::Connect)
                .with_socket(path)
                .with_source(e)
        })?;
        Self::negotiate(stream, Some(path.to_path_buf()), DEFAULT_TIMEOUT).await
    }

    /// Runs the QMP handshake over any byte stream: reads the greeting, sends
    /// `qmp_capabilities`, and starts the reader and writer tasks.
    /// `socket` only labels errors; `timeout` bounds the greeting and becomes
    /// the default per-command timeout.
    pub async fn negotiate<S>(stream: S, socket: Option<PathBuf>, timeout: Duration) -> Result<Qmp>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut framed = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
        let label = |e: Error| match &socket {
            Some(s) => e.with_socket(s),
            None => e,
        };
        let first = tokio::time::timeout(timeout, framed.next())
            .await
            .map_err(|_| {
                label(Error::new(ErrorKind::Timeout { after: timeout }).with_command("greeting"))
            })?;
        let line = match first {
            Some(Ok(line)) => line,
            Some(Err(e)) => return Err(label(line_error(e, 1))),
            None => {
                return Err(label(
                    Error::new(ErrorKind::Closed)
                        .with_detail("the peer closed before its greeting"),
                ));
            }
        };
        let greeting = codec::parse_greeting(&line).map_err(|e| label(e.with_line(1)))?;
        debug!(version = ?greeting.version, "QMP greeting");

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(events),
                closed: None,
            }),
            socket: socket.clone(),
        });
        let reader = tokio::spawn(read_loop(framed, shared.clone()));
        let (lines, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(wr, rx, shared.clone()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                lines,
                next_id: AtomicU64::new(1),
                greeting,
                default_timeout: timeout,
                reader,
            }),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (version, capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// True once the connection is closed (QEMU exited, `quit`, I/O error).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed_error().is_some()
    }

    /// A new event subscription. It sees every event that arrives after this
    /// call, so subscribe *before* sending the command whose events you await.
    pub fn subscribe(&self) -> EventStream {
        let st = self.inner.shared.state.lock().expect("qmp state lock");
        match &st.events {
            Some(tx) => EventStream::new(Some(tx.subscribe()), self.inner.default_timeout),
            None => EventStream::new(None, self.inner.default_timeout),
        }
    }

    /// Runs one command with the default timeout and returns its `return` value.
    pub async fn execute(&self, name: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(name, arguments, self.inner.default_timeout)
            .await
    }

    /// Runs one command, failing with [`ErrorKind::Timeout`] if QEMU has not
    /// answered within `timeout`. Commands may be issued concurrently from
    /// clones of this client: each gets its own id and its own reply.
    pub async fn execute_with_timeout(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.shared.state.lock().expect("qmp state lock");
            if let Some(why) = &st.closed {
                return Err(self.label(why.clone().with_command(name)));
            }
            st.pending.insert(id, (name.to_string(), tx));
        }
        debug!(command = name, id, "QMP execute");
        let line = codec::encode_command(id, name, arguments.as_ref());
        if self.inner.lines.send(line).is_err() {
            self.forget(id);
            return Err(self.label(Error::new(ErrorKind::Closed).with_command(name)));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| self.label(e.with_command(name))),
            Ok(Err(_)) => Err(self.label(Error::new(ErrorKind::Closed).with_command(name))),
            Err(_) => {
                self.forget(id);
                Err(self
                    .label(Error::new(ErrorKind::Timeout { after: timeout }).with_command(name)))
            }
        }
    }

    /// Runs a command and deserializes its return value.
    pub async fn execute_as<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        arguments: Option<Value>,
    ) -> Result<T> {
        let value = self.execute(name, arguments).await?;
        serde_json::from_value(value).map_err(|e| {
            self.label(
                Error::new(ErrorKind::UnexpectedReply)
                    .with_command(name)
                    .with_source(e),
            )
        })
    }

    fn forget(&self, id: u64) {
        self.inner
            .shared
            .state
            .lock()
            .expect("qmp state lock")
            .pending
            .remove(&id);
    }

    pub(crate) fn label(&self, e: Error) -> Error {
        match (&self.inner.shared.socket, e.socket()) {
            (Some(s), None) => e.with_socket(s),
            _ => e,
        }
    }
}

fn line_error(e: LinesCodecError, line: u64) -> Error {
    match e {
        LinesCodecError::MaxLineLengthExceeded => {
            Error::malformed(format!("a line is longer than {MAX_LINE} bytes")).with_line(line)
        }
        LinesCodecError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            Error::malformed("the line is not UTF-8")
                .with_line(line)
                .with_source(io)
        }
        LinesCodecError::Io(io) => io_error(io),
    }
}

/// A peer that went away is `Closed` (with the OS error as source), whichever
/// side noticed first; other I/O failures are `Io`.
fn io_error(e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    let kind = match e.kind() {
        K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof => {
            ErrorKind::Closed
        }
        _ => ErrorKind::Io,
    };
    Error::new(kind).with_source(e)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut framed: FramedRead<R, LinesCodec>,
    shared: Arc<Shared>,
) {
    // The greeting was line 1.
    let mut line_no: u64 = 1;
    loop {
        let next = framed.next().await;
        line_no += 1;
        let line = match next {
            None => {
                // QEMU wrote a partial last line and closed: say so.
                shared.close(Error::new(ErrorKind::Closed));
                return;
            }
            Some(Err(e)) => {
                shared.close(line_error(e, line_no));
                return;
            }
            Some(Ok(line)) => line,
        };
        trace!(line = %line, "QMP <<");
        match codec::parse_message(&line) {
            Ok(Message::Return { id, value }) => route(&shared, id, Ok(value)),
            Ok(Message::Error { id, class, desc }) => route(
                &shared,
                id,
                Err(Error::new(ErrorKind::Command { class, desc })),
            ),
            Ok(Message::Event(ev)) => {
                debug!(event = %ev.name, data = %ev.data, "QMP event");
                let st = shared.state.lock().expect("qmp state lock");
                if let Some(tx) = &st.events {
                    // No subscriber is not an error.
                    let _ = tx.send(ev);
                }
            }
            Err(e) => {
                // The stream is out of step with us: no later reply can be trusted.
                shared.close(e.with_line(line_no));
                return;
            }
        }
    }
}

fn route(shared: &Shared, id: Option<Value>, reply: Reply) {
    let key = id.as_ref().and_then(Value::as_u64);
    let slot = key.and_then(|k| {
        shared
            .state
            .lock()
            .expect("qmp state lock")
            .pending
            .remove(&k)
    });
    match slot {
        Some((_, tx)) => {
            let _ = tx.send(reply);
        }
        // A reply to a command that timed out, or one QEMU could not even
        // parse (then it has no id). Nobody waits for it.
        None => warn!(?id, ?reply, "QMP reply matches no waiting command"),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut lines: mpsc::UnboundedReceiver<String>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        trace!(line = %line.trim_end(), "QMP >>");
        let res = async {
            wr.write_all(line.as_bytes()).await?;
            wr.flush().await
        }
        .await;
        if let Err(e) = res {
            shared.close(io_error(e));
            return;
        }
    }
    // Every client handle is gone: close our half so QEMU sees EOF.
    let _ = wr.shutdown().await;
}
