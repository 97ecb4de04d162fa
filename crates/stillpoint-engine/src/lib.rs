//! Backup and restore orchestration: consistency planning, the freeze guardian, reports.
//!
//! Decisions are pure functions of their inputs (preflight facts, requested level, policy)
//! that return a plan (`consistency`); separate code carries the plan out against the
//! platform drivers. Only this crate combines the platform, the recipe executor and the
//! repository.

pub mod backup;
pub mod capture_source;
pub mod consistency;
pub mod coverage;
pub mod error;
pub mod failpoints;
pub mod freeze;
pub mod guardian;
pub mod preflight;
pub mod recipe_phase;
pub mod recipe_runner;
pub mod report;
pub mod restore;

pub use error::{EngineError, EngineErrorKind, Result};
