//! The one error type of `stillpoint-qmp`.
//!
//! Rules this crate keeps (and asks contributors to keep):
//! - Every public fallible function returns [`Result<T>`], whose error is [`Error`]:
//!   a [`#[non_exhaustive]`](ErrorKind) kind that callers match on, the context that
//!   says *where* (the command name, the monitor socket, the line of the monitor
//!   stream), and the underlying source when there is one.
//! - Messages are sentence-style, lower-case, without a trailing period, and never
//!   repeat their source: the CLI prints the chain once (`error: …: caused by …`).
//! - A QEMU error reply keeps QEMU's `class` and `desc` verbatim, so a caller can
//!   react to `GenericError` vs `DeviceNotFound` and show QEMU's own words.
//! - Bad input from the peer (malformed JSON, a reply of the wrong shape) is an
//!   error naming the line or the command, never a panic.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers to match on.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The monitor socket could not be connected to.
    Connect,
    /// Reading from or writing to the monitor failed.
    Io,
    /// The monitor connection is closed (QEMU exited, or `quit` was sent).
    Closed,
    /// The peer sent something that is not QMP: bad JSON, a missing field,
    /// a line that is too long, or no greeting.
    Malformed,
    /// QEMU answered the command with an error reply.
    Command {
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// No reply (or no awaited event) arrived in time.
    Timeout {
        /// How long we waited.
        after: Duration,
    },
    /// The reply was valid QMP but not of the shape this typed helper expects.
    UnexpectedReply,
    /// The caller passed an argument that cannot be sent (e.g. a non-UTF-8 path).
    InvalidArgument,
    /// An event subscriber fell so far behind that events were dropped;
    /// the awaited event may have been among them.
    EventsLost {
        /// How many events were dropped.
        count: u64,
    },
}

/// The error of every fallible operation in this crate (boxed: results stay small).
#[derive(Debug, Clone)]
pub struct Error(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    kind: ErrorKind,
    /// The QMP command (or awaited event) this error belongs to.
    command: Option<String>,
    /// The monitor socket, when connected by path.
    socket: Option<PathBuf>,
    /// 1-based line of the monitor stream where malformed input was found.
    line: Option<u64>,
    /// Extra words for the message (what was expected, what arrived).
    detail: Option<String>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error(Box::new(Inner {
            kind,
            command: None,
            socket: None,
            line: None,
            detail: None,
            source: None,
        }))
    }

    pub(crate) fn with_command(mut self, command: impl Into<String>) -> Self {
        self.0.command = Some(command.into());
        self
    }

    pub(crate) fn with_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.0.socket = Some(socket.into());
        self
    }

    pub(crate) fn with_line(mut self, line: u64) -> Self {
        self.0.line = Some(line);
        self
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.0.detail = Some(detail.into());
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.0.source = Some(Arc::new(source));
        self
    }

    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        Error::new(ErrorKind::Malformed).with_detail(detail)
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The QMP command (or awaited event) this error belongs to.
    pub fn command(&self) -> Option<&str> {
        self.0.command.as_deref()
    }

    /// The monitor socket path, when the client was connected by path.
    pub fn socket(&self) -> Option<&std::path::Path> {
        self.0.socket.as_deref()
    }

    /// The line of the monitor stream where malformed input was found.
    pub fn line(&self) -> Option<u64> {
        self.0.line
    }

    /// QEMU's error class when QEMU rejected the command.
    pub fn qemu_class(&self) -> Option<&str> {
        match &self.0.kind {
            ErrorKind::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's error description when QEMU rejected the command.
    pub fn qemu_desc(&self) -> Option<&str> {
        match &self.0.kind {
            ErrorKind::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmd = self.0.command.as_deref();
        match (&self.0.kind, cmd) {
            (ErrorKind::Connect, _) => write!(f, "cannot connect to the QMP monitor")?,
            (ErrorKind::Io, Some(c)) => write!(f, "QMP monitor I/O failed during '{c}'")?,
            (ErrorKind::Io, None) => write!(f, "QMP monitor I/O failed")?,
            (ErrorKind::Closed, Some(c)) => {
                write!(f, "QMP monitor connection closed before '{c}' completed")?
            }
            (ErrorKind::Closed, None) => write!(f, "QMP monitor connection is closed")?,
            (ErrorKind::Malformed, _) => write!(f, "malformed QMP message")?,
            (ErrorKind::Command { class, desc }, Some(c)) => {
                write!(f, "QEMU rejected '{c}': {class}: {desc}")?
            }
            (ErrorKind::Command { class, desc }, None) => {
                write!(f, "QEMU returned an error: {class}: {desc}")?
            }
            (ErrorKind::Timeout { after }, Some(c)) => {
                write!(f, "'{c}' did not complete within {after:?}")?
            }
            (ErrorKind::Timeout { after }, None) => write!(f, "timed out after {after:?}")?,
            (ErrorKind::UnexpectedReply, Some(c)) => write!(f, "unexpected reply shape for '{c}'")?,
            (ErrorKind::UnexpectedReply, None) => write!(f, "unexpected QMP reply shape")?,
            (ErrorKind::InvalidArgument, Some(c)) => write!(f, "invalid argument for '{c}'")?,
            (ErrorKind::InvalidArgument, None) => write!(f, "invalid argument")?,
            (ErrorKind::EventsLost { count }, _) => write!(
                f,
                "{count} QMP events were dropped because the subscriber fell behind"
            )?,
        }
        if let Some(line) = self.0.line {
            write!(f, " at line {line} of the monitor stream")?;
        }
        if let Some(socket) = &self.0.socket {
            write!(f, " (monitor {})", socket.display())?;
        }
        if let Some(detail) = &self.0.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_error_names_command_class_and_desc() {
        let e = Error::new(ErrorKind::Command {
            class: "GenericError".into(),
            desc: "Node fl1 is in use".into(),
        })
        .with_command("blockdev-del");
        assert_eq!(
            e.to_string(),
            "QEMU rejected 'blockdev-del': GenericError: Node fl1 is in use"
        );
        assert_eq!(e.qemu_class(), Some("GenericError"));
    }

    #[test]
    fn malformed_error_names_line_socket_and_detail_but_not_source() {
        let src = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let e = Error::malformed("not JSON: `{`")
            .with_line(7)
            .with_socket("/run/vm.qmp")
            .with_source(src);
        let text = e.to_string();
        assert_eq!(
            text,
            "malformed QMP message at line 7 of the monitor stream (monitor /run/vm.qmp): not JSON: `{`"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
