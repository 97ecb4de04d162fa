//! The platform layer's one error type.
//!
//! Rules (shared by every stillpoint library crate):
//! - One public error type per crate: a `#[non_exhaustive]` kind callers can match on, the
//!   context that says where (VM, disk, path), and the underlying source.
//! - Messages are sentence fragments that say what failed and where; they never repeat the
//!   source's text — the CLI prints the whole chain once.
//! - No panics on bad input from peers or files: it becomes an error of kind `BadDefinition`,
//!   `Protocol` or similar.

use std::path::Path;

/// What went wrong, for callers that decide by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlatformErrorKind {
    /// No VM by that name (or reference) is known.
    VmNotFound,
    /// A VM definition (configuration entry, vm.json) is malformed.
    BadDefinition,
    /// The VM reference names a platform this build does not drive.
    UnsupportedPlatform,
    /// The guest agent failed or refused.
    Agent,
    /// The hypervisor's monitor failed or refused.
    Monitor,
    /// The VM is not in a state that allows the operation.
    VmState,
    /// Local I/O failed.
    Io,
    /// A step of a point-in-time capture failed (setting it up, starting it, exporting it,
    /// releasing it). The guest's own disk I/O is not affected; the message names the VM, the
    /// disk and the QEMU node or export involved.
    Capture,
    /// The point-in-time view broke while it was being read: copy-before-write could not save
    /// the guest's old data to the scratch area (full, or failing). The guest kept running and
    /// writing; only this backup is lost. The message names the scratch file and the offset.
    CaptureBroken,
    /// A recorded VM definition cannot be used for a restore (written by a platform this
    /// build cannot restore, an argument that does not parse, a disk image it does not name).
    VmDefinition,
    /// The boot test of a restored VM could not be set up or run.
    BootTest,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PlatformError {
    kind: PlatformErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = PlatformError> = std::result::Result<T, E>;

impl PlatformError {
    pub fn new(kind: PlatformErrorKind, message: impl Into<String>) -> Self {
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

    pub fn kind(&self) -> PlatformErrorKind {
        self.kind
    }

    /// The underlying cause, for a caller that re-wraps this error with the same message
    /// (so that the chain does not say it twice).
    pub fn into_source(self) -> Option<Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.source
    }

    pub fn vm_not_found(name: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            PlatformErrorKind::VmNotFound,
            format!("unknown VM `{name}`: {why}"),
        )
    }

    pub fn bad_definition(path: &Path, what: impl std::fmt::Display) -> Self {
        Self::new(
            PlatformErrorKind::BadDefinition,
            format!("bad VM definition in {}: {what}", path.display()),
        )
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::new(
            PlatformErrorKind::Io,
            format!("cannot read {}", path.display()),
        )
        .with_source(source)
    }
}
