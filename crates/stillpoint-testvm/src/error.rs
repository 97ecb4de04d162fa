//! The crate's one error type.
//!
//! Rules for errors in this crate:
//! - Every public function returns [`Result`]; there is exactly one error type, [`Error`].
//! - An error carries a [`ErrorKind`] (non-exhaustive, for callers that want to match), the
//!   context that says *where* it happened (the VM, the Debian package, the build step, the
//!   path), and the underlying cause as its `source`.
//! - Messages are sentence-style, lower-case, and say what failed and where; they never repeat
//!   the text of their source, which the caller prints once as the next link of the chain.
//! - A guest that does not boot or an agent that never answers is an error whose message holds
//!   the tail of the VM's serial console, because that is where the reason is.
//! - Bad input (a VM name, a disk size, a qga argument) is an [`ErrorKind::InvalidConfig`] that
//!   names the field and the value; never a panic.

use std::path::{Path, PathBuf};

/// What kind of failure this was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A host tool (qemu-system-x86_64, apt-get, dpkg-deb, mkfs.ext4, qemu-img) is missing.
    ToolMissing,
    /// A host tool ran but failed (its stderr is in the message).
    ToolFailed,
    /// Downloading, extracting or resolving a Debian package failed.
    Package,
    /// The guest image could not be assembled (missing file, missing library, bad module).
    GuestBuild,
    /// A VM configuration value is invalid.
    InvalidConfig,
    /// QEMU could not be started, or exited on its own.
    QemuStart,
    /// The guest did not reach the awaited state (console marker, agent) or answer in time.
    Timeout,
    /// The guest agent or the QEMU monitor answered with an error or garbage.
    Protocol,
    /// A VM of this name is already running.
    AlreadyRunning,
    /// No VM of this name exists under the runtime root.
    NotFound,
    /// `vm.json` is unreadable or malformed.
    Record,
    /// A file-system operation failed.
    Io,
}

/// The error of every operation in this crate.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    vm: Option<String>,
    path: Option<PathBuf>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a sentence-style `message`.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            vm: None,
            path: None,
            source: None,
        }
    }

    /// An [`ErrorKind::Io`] error about `path`.
    pub(crate) fn io(what: impl std::fmt::Display, path: &Path, source: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("cannot {what} `{}`", path.display()))
            .with_path(path)
            .with_source(source)
    }

    /// An [`ErrorKind::InvalidConfig`] error naming the field and why.
    pub(crate) fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::InvalidConfig,
            format!("invalid {field}: {problem}"),
        )
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn with_vm(mut self, vm: &str) -> Self {
        if self.vm.is_none() {
            self.message = format!("VM `{vm}`: {}", self.message);
            self.vm = Some(vm.to_owned());
        }
        self
    }

    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    /// What kind of failure this was.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The VM this error is about, when there is one.
    pub fn vm(&self) -> Option<&str> {
        self.vm.as_deref()
    }

    /// The file or directory this error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_vm_once_and_keeps_source_apart() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = Error::io("read", Path::new("/x/vm.json"), source)
            .with_vm("demo")
            .with_vm("other");
        assert_eq!(error.to_string(), "VM `demo`: cannot read `/x/vm.json`");
        assert_eq!(error.vm(), Some("demo"));
        assert_eq!(error.path(), Some(Path::new("/x/vm.json")));
        assert_eq!(error.kind(), ErrorKind::Io);
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("no such file"));
    }
}
