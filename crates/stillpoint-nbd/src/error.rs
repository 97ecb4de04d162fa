//! The one error type of `stillpoint-nbd`.
//!
//! Rules this crate keeps (and asks contributors to keep):
//! - Every public fallible function returns [`Result<T>`], whose error is
//!   [`Error`]: a [`#[non_exhaustive]`](ErrorKind) kind to match on, the context
//!   that says *where* (export name, disk offset, socket path), and the source.
//! - Messages are sentence-style, lower-case, without a trailing period, and
//!   never repeat their source: the CLI prints the chain once.
//! - Malformed bytes from the server are a [`ErrorKind::Protocol`] error that
//!   names the message, the field and its byte position within the message,
//!   never a panic. A protocol error ends the connection: once the stream is
//!   out of step no later reply can be trusted.
//! - Errors are cheap to clone (the source is shared), because one broken
//!   connection fails every request in flight with the same cause.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers to match on.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The socket could not be connected to.
    Connect,
    /// Reading or writing the connection failed.
    Io,
    /// The connection is closed (server gone, or after `disconnect`).
    Closed,
    /// The server sent bytes that break the protocol.
    Protocol,
    /// The server refused an option during the handshake (unknown export,
    /// unsupported context, …).
    Refused {
        /// The `NBD_REP_ERR_*` reply type.
        reply: u32,
    },
    /// The server lacks a feature this call needs (structured replies, a
    /// metadata context, writes on a read-only export).
    Unsupported,
    /// The server failed a request with an NBD error number.
    Request {
        /// The NBD error number (`EIO` = 5, `EINVAL` = 22, …).
        errno: u32,
    },
    /// The caller asked for something invalid (past the end, misaligned).
    InvalidArgument,
}

/// The error of every fallible operation in this crate (boxed: results stay small).
#[derive(Debug, Clone)]
pub struct Error(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    export: Option<String>,
    offset: Option<u64>,
    socket: Option<PathBuf>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            export: None,
            offset: None,
            socket: None,
            source: None,
        }))
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Protocol, message)
    }

    pub(crate) fn io(e: std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::UnexpectedEof | K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted => {
                ErrorKind::Closed
            }
            _ => ErrorKind::Io,
        };
        let message = match kind {
            ErrorKind::Closed => format!("the NBD connection closed while {what}"),
            _ => format!("NBD I/O failed while {what}"),
        };
        Error::new(kind, message).with_source(e)
    }

    pub(crate) fn with_export(mut self, export: &str) -> Self {
        if self.0.export.is_none() {
            self.0.export = Some(export.to_string());
        }
        self
    }

    pub(crate) fn with_offset(mut self, offset: u64) -> Self {
        if self.0.offset.is_none() {
            self.0.offset = Some(offset);
        }
        self
    }

    pub(crate) fn with_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.0.socket = Some(socket.into());
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.0.source = Some(Arc::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The export the error concerns.
    pub fn export(&self) -> Option<&str> {
        self.0.export.as_deref()
    }

    /// The disk offset the error concerns (start of the failed request, or
    /// the exact offset when the server said).
    pub fn offset(&self) -> Option<u64> {
        self.0.offset
    }

    /// The socket, when connected by path.
    pub fn socket(&self) -> Option<&std::path::Path> {
        self.0.socket.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        let mut ctx = Vec::new();
        if let Some(e) = &self.0.export {
            ctx.push(format!("export '{e}'"));
        }
        if let Some(o) = self.0.offset {
            ctx.push(format!("offset {o}"));
        }
        if let Some(s) = &self.0.socket {
            ctx.push(format!("socket {}", s.display()));
        }
        if !ctx.is_empty() {
            write!(f, " ({})", ctx.join(", "))?;
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
    fn message_carries_export_offset_and_socket() {
        let e = Error::new(
            ErrorKind::Request { errno: 5 },
            "the server failed a read: EIO",
        )
        .with_export("disk0")
        .with_offset(1 << 20)
        .with_socket("/run/nbd.sock");
        assert_eq!(
            e.to_string(),
            "the server failed a read: EIO (export 'disk0', offset 1048576, socket /run/nbd.sock)"
        );
        // The first offset set is kept: it is the most precise.
        assert_eq!(e.with_offset(0).offset(), Some(1 << 20));
    }

    #[test]
    fn eof_is_closed_and_names_what_was_going_on() {
        let e = Error::io(
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof"),
            "reading a reply header",
        );
        assert_eq!(e.kind(), &ErrorKind::Closed);
        assert_eq!(
            e.to_string(),
            "the NBD connection closed while reading a reply header"
        );
    }
}
