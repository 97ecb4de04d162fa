//! What a backup reports — to the user (human and `--json`) and into the snapshot's manifest
//! (its free-form `report`): requested and achieved level, indications and why, the freeze
//! window, every step with its outcome and duration, and per disk what was read and stored.
//!
//! The next backup of the VM reads one thing back from the parent's report: which dirty
//! bitmap tracks each disk's changes since that snapshot ([`ParentTracking`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::consistency::{Indication, Level};
use crate::coverage::Coverage;
use crate::freeze::FreezeWindow;

/// The whole report of one VM's backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupReport {
    /// The VM reference as given.
    pub vm: String,
    pub platform: String,
    pub requested: Level,
    /// The level the snapshot really has (never overstated: invariant 5).
    pub achieved: Level,
    pub indications: Vec<Indication>,
    /// Why `achieved` is below `requested` (empty when it is not).
    pub degraded_because: Vec<String>,
    /// Things worth knowing that do not change the level.
    pub notes: Vec<String>,
    /// The freeze around the capture start, when there was one.
    pub freeze: Option<FreezeWindow>,
    /// Which captured disks the freeze covered.
    pub coverage: Option<Coverage>,
    /// How long the capture start took and how long the vCPUs were paused for it.
    pub capture: Option<CaptureTiming>,
    pub disks: Vec<DiskReport>,
    pub steps: Vec<StepRecord>,
    /// What is needed to start the VM again (restore rewrites it for the restored disks).
    pub vm_definition: Option<stillpoint_platform::VmDefinition>,
    /// The recipe workflow's own report (application level).
    pub recipe: Option<serde_json::Value>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub duration_ms: f64,
    /// The published snapshot; `None` when the backup failed.
    pub snapshot: Option<String>,
    /// Why the backup failed, when it did (the whole error chain).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureTiming {
    /// The whole capture start (the only thing that runs while the guest is frozen).
    pub start_ms: f64,
    /// How long the vCPUs were paused around it (zero for a VM that was not running).
    pub paused_ms: f64,
    /// Leftovers of an interrupted earlier capture that were cleaned up first.
    pub recovered: Vec<String>,
}

/// One disk's part of a backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskReport {
    pub id: String,
    pub size: u64,
    /// `full` or `incremental`.
    pub mode: String,
    /// Why a disk was read in full (no parent, bitmap lost after an unclean exit, …).
    pub full_reason: Option<String>,
    /// The dirty bitmap that tracks changes since this snapshot (for the next incremental).
    pub bitmap: Option<String>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub chunks_unchanged: u64,
    pub chunks_zero: u64,
    pub copy_ms: f64,
}

/// One step of the backup, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    /// Since the start of this VM's backup.
    pub started_ms: f64,
    pub duration_ms: f64,
    /// `ok`, `failed` or `skipped`.
    pub outcome: String,
    pub detail: Option<String>,
}

/// Records steps as they run.
#[derive(Debug)]
pub struct StepLog {
    began: Instant,
    pub steps: Vec<StepRecord>,
}

impl Default for StepLog {
    fn default() -> Self {
        Self {
            began: Instant::now(),
            steps: Vec::new(),
        }
    }
}

impl StepLog {
    /// Runs `step`, recording its duration and outcome.
    pub async fn run<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = step.await;
        let detail = result.as_ref().err().map(|error| error.to_string());
        self.record(
            name,
            started,
            if result.is_ok() { "ok" } else { "failed" },
            detail,
        );
        result
    }

    /// Records a step that ran between `started` and now.
    pub fn record(&mut self, name: &str, started: Instant, outcome: &str, detail: Option<String>) {
        self.record_span(name, started, Instant::now(), outcome, detail);
    }

    /// Records a step that ran between `started` and `ended`.
    pub fn record_span(
        &mut self,
        name: &str,
        started: Instant,
        ended: Instant,
        outcome: &str,
        detail: Option<String>,
    ) {
        self.steps.push(StepRecord {
            name: name.to_string(),
            started_ms: ms(started.saturating_duration_since(self.began)),
            duration_ms: ms(ended.saturating_duration_since(started)),
            outcome: outcome.to_string(),
            detail,
        });
    }

    pub fn skipped(&mut self, name: &str, why: &str) {
        self.record(name, Instant::now(), "skipped", Some(why.to_string()));
    }

    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }
}

pub fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// What the next backup needs from a parent snapshot's report: per disk, its size and the
/// bitmap tracking changes since. Read leniently: a report without it means "no parent".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ParentTracking {
    #[serde(default)]
    pub disks: Vec<TrackedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TrackedDisk {
    pub id: String,
    pub size: u64,
    pub bitmap: Option<String>,
}

impl ParentTracking {
    pub fn from_report(report: &serde_json::Value) -> Self {
        serde_json::from_value(report.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn step_log_records_outcomes_in_order() {
        let mut log = StepLog::default();
        let ok: Result<u32, String> = log.run("first", async { Ok(1) }).await;
        assert_eq!(ok, Ok(1));
        let failed: Result<(), String> = log.run("second", async { Err("boom".to_string()) }).await;
        assert!(failed.is_err());
        log.skipped("third", "not needed");
        let outcomes: Vec<(&str, &str)> = log
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.outcome.as_str()))
            .collect();
        assert_eq!(
            outcomes,
            [("first", "ok"), ("second", "failed"), ("third", "skipped")]
        );
        assert_eq!(log.steps[1].detail.as_deref(), Some("boom"));
    }

    #[test]
    fn parent_tracking_reads_disks_and_tolerates_other_reports() {
        let report = serde_json::json!({
            "vm": "demo", "disks": [{"id": "vd0", "size": 1024, "bitmap": "stillpoint-1", "mode": "full"}]
        });
        let tracking = ParentTracking::from_report(&report);
        assert_eq!(
            tracking.disks,
            [TrackedDisk {
                id: "vd0".into(),
                size: 1024,
                bitmap: Some("stillpoint-1".into())
            }]
        );
        assert_eq!(
            ParentTracking::from_report(&serde_json::json!({"image": "x"})),
            ParentTracking::default()
        );
        assert_eq!(
            ParentTracking::from_report(&serde_json::Value::Null),
            ParentTracking::default()
        );
    }
}
