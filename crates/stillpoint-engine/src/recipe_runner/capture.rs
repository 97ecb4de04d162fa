//! The capture step of a recipe: what the runner delegates to the backup orchestration.
//!
//! The runner knows which disks a volume group selects, not how to capture them. It calls a
//! [`CaptureHook`] with the disk names and whether to freeze; the hook freezes, starts the
//! point-in-time capture and thaws, and says what happened in a [`FreezeTrace`]. The backup's
//! hook is `RecipeCapture` in `crate::backup` (the same guarded freeze → capture start → thaw as
//! a backup without a recipe, cancel-safe under the executor's capture timeout).
//! `stillpoint recipe run --phase pre`, where the platform captures after the process exits,
//! leaves the guest frozen instead (`crate::recipe_phase`).

use async_trait::async_trait;
use stillpoint_recipe::CaptureOutcome;
#[cfg(doc)]
use stillpoint_recipe::FreezeTrace;

use crate::error::Result;

/// Freezes (when asked), starts the capture of `disks`, thaws — one call, so nothing can run
/// in between. Implementations must thaw on every path they froze on and report it in the
/// outcome's [`FreezeTrace`]; an `Err` makes the executor thaw through the agent anyway. The
/// executor drops the call at the recipe's capture timeout: implementations must be
/// cancel-safe (undo a freeze from a guard's drop, not only at the end of the call).
#[async_trait]
pub trait CaptureHook: Send + Sync {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome>;
}
