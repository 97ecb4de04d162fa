//! The engine's one error type.
//!
//! Rules (shared by every stillpoint library crate):
//! - One public error type per crate: a `#[non_exhaustive]` kind callers can match on, a
//!   message that says what failed and where (VM, disk, path), and the underlying source.
//! - Messages never repeat the source's text — the CLI prints the whole chain once.
//! - Bad input from peers or files becomes an error, never a panic.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineErrorKind {
    /// A freeze lease could not be read or written.
    Lease,
    /// The guardian process could not be started or gave up.
    Guardian,
    /// The platform failed (VM not found, agent or monitor error).
    Platform,
    /// The guest agent failed or refused.
    Agent,
    /// The requested consistency cannot be reached and the policy says fail.
    ConsistencyRefused,
    /// The repository failed (open, write, publish).
    Repository,
    /// A recipe cannot be used (planning failed, its volume group selects no disk).
    Recipe,
    /// A recipe command in the guest could not be started, watched or ended (guest-exec).
    GuestCommand,
    /// A recipe command on the host could not be started, watched or ended.
    HostCommand,
    /// The capture step of a recipe failed (disk selection, freeze, capture start).
    Capture,
    /// The capture broke while it was read: copy-before-write could not keep the old data
    /// the guest overwrote (scratch space ran out). The guest was not harmed.
    CaptureBroken,
    /// A restore failed: the target directory, a disk, or a file written beside the disks.
    Restore,
    /// A recorded VM definition cannot be used (not a QEMU command line, an argument that
    /// does not parse, a disk image the command line does not name).
    VmDefinition,
    /// The boot test of a restore could not be set up or run.
    BootTest,
    /// A fault injected by a test at a named failpoint (`failpoints` feature builds only).
    Injected,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: EngineErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn new(kind: EngineErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> EngineErrorKind {
        self.kind
    }

    pub fn lease(path: &Path, what: impl std::fmt::Display) -> Self {
        Self::new(
            EngineErrorKind::Lease,
            format!("{what} ({})", path.display()),
        )
    }

    pub fn guardian(what: impl Into<String>) -> Self {
        Self::new(EngineErrorKind::Guardian, what)
    }
}

/// An error and its causes on one line (the one formatter, in `stillpoint-os`).
pub use stillpoint_os::error_chain;
