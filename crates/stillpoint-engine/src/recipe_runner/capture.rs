//! The capture step of a recipe: what the runner delegates to the backup orchestration.
//!
//! The runner knows which disks a volume group selects, not how to capture them. It calls a
//! [`CaptureHook`] with the disk names and whether to freeze; the hook freezes, starts the
//! point-in-time capture and thaws, and says what happened in a [`FreezeTrace`].
//! [`GuardedCapture`] is that sequence with the guarded freeze ([`GuardedFreeze`]: a guardian
//! thaws if this process dies) around any [`CaptureStart`]; [`FreezeOnlyCapture`] starts no
//! capture at all (tests). `stillpoint recipe run --phase pre`, where the platform captures
//! after the process exits, leaves the guest frozen instead (`crate::recipe_phase`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_platform::Vm;
use stillpoint_recipe::{CaptureOutcome, FreezeTrace};

use crate::error::error_chain;
use crate::error::{EngineError, EngineErrorKind, Result};
use crate::freeze::{GuardContext, GuardedFreeze};

/// Freezes (when asked), starts the capture of `disks`, thaws — one call, so nothing can run
/// in between. Implementations must thaw on every path they froze on and report it in the
/// outcome's [`FreezeTrace`]; an `Err` makes the executor thaw through the agent anyway.
#[async_trait]
pub trait CaptureHook: Send + Sync {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome>;
}

/// The start of a point-in-time capture of some disks, run while the guest is frozen (the
/// QMP transaction that starts copy-before-write fleecing, in the real backup). It must be
/// quick: the frozen time is its duration.
#[async_trait]
pub trait CaptureStart: Send + Sync {
    async fn start(&self, disks: &[String]) -> Result<()>;
}

/// Starts nothing: the freeze alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDiskCapture;

#[async_trait]
impl CaptureStart for NoDiskCapture {
    async fn start(&self, _disks: &[String]) -> Result<()> {
        Ok(())
    }
}

/// Bounds of a guarded freeze.
#[derive(Debug, Clone, Copy)]
pub struct FreezeLimits {
    /// How long the agent's freeze call may take (fsfreeze hooks in the guest run first).
    pub freeze_timeout: Duration,
    /// How long the guest may stay frozen before the guardian stops this process and thaws.
    pub hold_limit: Duration,
}

impl Default for FreezeLimits {
    fn default() -> Self {
        FreezeLimits {
            freeze_timeout: Duration::from_secs(60),
            hold_limit: Duration::from_secs(60),
        }
    }
}

/// Guarded freeze → `start` → thaw.
pub struct GuardedCapture<S> {
    vm: Arc<dyn Vm>,
    guard: GuardContext,
    limits: FreezeLimits,
    start: S,
}

/// Guarded freeze → (no capture) → thaw.
pub type FreezeOnlyCapture = GuardedCapture<NoDiskCapture>;

impl FreezeOnlyCapture {
    pub fn freeze_only(vm: Arc<dyn Vm>, guard: GuardContext, limits: FreezeLimits) -> Self {
        GuardedCapture::new(vm, guard, limits, NoDiskCapture)
    }
}

impl<S: CaptureStart> GuardedCapture<S> {
    pub fn new(vm: Arc<dyn Vm>, guard: GuardContext, limits: FreezeLimits, start: S) -> Self {
        GuardedCapture {
            vm,
            guard,
            limits,
            start,
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> EngineError {
        EngineError::new(
            EngineErrorKind::Capture,
            format!("VM `{}`: {message}", self.vm.reference()),
        )
    }
}

#[async_trait]
impl<S: CaptureStart> CaptureHook for GuardedCapture<S> {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome> {
        let disks = disks.to_vec();
        if !freeze {
            self.start
                .start(&disks)
                .await
                .map_err(|e| self.error("the capture did not start").with_source(e))?;
            return Ok(CaptureOutcome {
                disks,
                freeze: None,
            });
        }
        let agent = self.vm.agent().ok_or_else(|| {
            self.error("the VM has no guest agent channel, so it cannot be frozen for the capture")
        })?;
        // On error nothing stays frozen (GuardedFreeze thaws or hands the thaw to the guardian).
        let frozen = GuardedFreeze::freeze(
            self.vm.as_ref(),
            agent,
            &self.guard,
            self.limits.freeze_timeout,
            self.limits.hold_limit,
        )
        .await
        .map_err(|e| {
            self.error("the freeze before the capture failed")
                .with_source(e)
        })?;
        let started = self.start.start(&disks).await;
        let (window, thawed) = frozen.thaw().await;
        let trace = FreezeTrace {
            frozen: true,
            thawed: thawed.is_ok(),
            frozen_for: Some(Duration::from_secs_f64(window.frozen_ms / 1000.0)),
            error: thawed.as_ref().err().map(|e| error_chain(e)),
        };
        tracing::info!(
            vm = %self.vm.reference(),
            filesystems = window.filesystems,
            frozen_ms = window.frozen_ms,
            thawed = trace.thawed,
            "capture under freeze"
        );
        match started {
            Ok(()) => Ok(CaptureOutcome {
                disks,
                freeze: Some(trace),
            }),
            Err(error) => {
                let after = if trace.thawed {
                    format!("the guest was thawed after {:.0} ms", window.frozen_ms)
                } else {
                    "thawing the guest failed as well".to_owned()
                };
                Err(self
                    .error(format!("the capture did not start ({after})"))
                    .with_source(error))
            }
        }
    }
}
