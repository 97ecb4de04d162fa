//! The crate's one error type.
//!
//! Rules (they hold for every function of this crate):
//! - Public functions return [`Result<T>`]; the error is [`Error`]: a [`ErrorKind`] that callers
//!   match on (it is `#[non_exhaustive]`), the context that says *where* (repository path or
//!   object key, snapshot, disk, byte offset, VM), and the underlying source error if any.
//! - The message is one sentence saying what failed, without a trailing period; the context is
//!   appended in brackets by `Display`. The message never repeats the source: callers print the
//!   chain (`source()`) once, as the CLI does.
//! - Bad repository contents (a flipped bit, a truncated file, an unknown version) are errors
//!   of kind [`ErrorKind::Corrupt`] or [`ErrorKind::UnsupportedVersion`], never panics.
//! - Secrets (passphrases, keys) never appear in messages or context.

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of failure this is; stable for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// There is no repository at the given location.
    NoRepository,
    /// A repository already exists where `init` was asked to create one.
    AlreadyExists,
    /// The repository has a format version this build does not read.
    UnsupportedVersion,
    /// The passphrase opens none of the repository's keys.
    WrongPassphrase,
    /// The repository is encrypted and no passphrase was given (or the reverse).
    PassphraseRequired,
    /// Stored data failed authentication, its digest, or parsing.
    Corrupt,
    /// An object the repository refers to is missing.
    Missing,
    /// A snapshot id, prefix or `VM:latest` matched nothing.
    SnapshotNotFound,
    /// A snapshot id prefix matched more than one snapshot.
    AmbiguousSnapshot,
    /// A disk name was not found in a snapshot.
    DiskNotFound,
    /// The storage is full.
    NoSpace,
    /// Another process holds a lock that conflicts with the requested operation.
    Locked,
    /// Reading the data source (image file, capture export) failed.
    Source,
    /// The caller passed something invalid (a range outside the disk, a bad rule, …).
    InvalidInput,
    /// Any other I/O failure of the storage backend or a local file.
    Io,
    /// An external program (qemu-img) failed.
    External,
}

/// Where an error happened: each field is optional and printed when set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    /// A file path or object key.
    pub path: Option<PathBuf>,
    /// A snapshot id.
    pub snapshot: Option<String>,
    /// A disk name.
    pub disk: Option<String>,
    /// A byte offset within the disk.
    pub offset: Option<u64>,
    /// A VM name.
    pub vm: Option<String>,
}

/// The error of every fallible function in this crate.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Box<ErrorContext>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a one-sentence `message` (no trailing period).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            context: Box::default(),
            source: None,
        }
    }

    /// An I/O error; `ENOSPC`/`EDQUOT` become [`ErrorKind::NoSpace`].
    pub fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
                ErrorKind::NoSpace
            }
            _ => ErrorKind::Io,
        };
        Self::new(kind, message).with_source(source)
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Sets the file path or object key.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        self.context.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets the snapshot id.
    pub fn with_snapshot(mut self, snapshot: impl Into<String>) -> Self {
        self.context.snapshot = Some(snapshot.into());
        self
    }

    /// Sets the disk name.
    pub fn with_disk(mut self, disk: impl Into<String>) -> Self {
        self.context.disk = Some(disk.into());
        self
    }

    /// Sets the byte offset within the disk.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.context.offset = Some(offset);
        self
    }

    /// Sets the VM name.
    pub fn with_vm(mut self, vm: impl Into<String>) -> Self {
        self.context.vm = Some(vm.into());
        self
    }

    /// Puts `prefix` before the message (e.g. which kind of object failed).
    pub(crate) fn prefixed(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Where it happened.
    pub fn context(&self) -> &ErrorContext {
        &self.context
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        let c = &self.context;
        let mut parts = Vec::new();
        if let Some(vm) = &c.vm {
            parts.push(format!("VM {vm}"));
        }
        if let Some(snapshot) = &c.snapshot {
            parts.push(format!("snapshot {snapshot}"));
        }
        if let Some(disk) = &c.disk {
            parts.push(format!("disk {disk}"));
        }
        if let Some(offset) = c.offset {
            parts.push(format!("offset {offset}"));
        }
        if let Some(path) = &c.path {
            parts.push(format!("path {}", path.display()));
        }
        if !parts.is_empty() {
            write!(f, " [{}]", parts.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_appends_context_but_not_the_source() {
        let err = Error::io(
            "cannot write chunk",
            std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        )
        .with_snapshot("00ab")
        .with_disk("sda")
        .with_offset(4096)
        .with_path("/r/chunks/aa/bb");
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        assert_eq!(
            err.to_string(),
            "cannot write chunk [snapshot 00ab, disk sda, offset 4096, path /r/chunks/aa/bb]"
        );
        let source = std::error::Error::source(&err).expect("source kept");
        assert!(source.to_string().contains("No space left"));
    }
}
