//! One VM's backup, following DESIGN.md's flow:
//!
//! ```text
//! preflight ─► plan (level, policy, freeze coverage) ─► prepare capture (recover leftovers,
//! full/incremental per disk, scratch + filters) ─► [guarded freeze] ─► capture start (one
//! atomic step for all disks) ─► [thaw, always] ─► export ─► copy into the repository
//! (allocated / dirty extents only) ─► publish the manifest ─► finish the capture (settle
//! bitmaps) ─► report
//! ```
//!
//! What can go wrong, and what this code guarantees then:
//! - The level cannot be reached: `--on-quiesce-failure fail` stops before the capture and
//!   publishes nothing; `degrade` goes on at the level reached and says why.
//! - The freeze fails at run time: same policy; the guest is never left frozen (the guarded
//!   freeze and its guardian see to it).
//! - Anything fails after the capture started: the capture is finished as a failure (the dirty
//!   bitmaps keep every change for the next run), nothing is published, chunks already stored
//!   stay in the repository for the next backup to reuse.
//! - The manifest is published before the capture's bitmaps are settled as a success, so a
//!   failure between the two never loses a change: at worst the next backup reads more.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stillpoint_platform::capture::{
    CaptureMode, CaptureRequest, CapturedDisk, PreparedCapture, StartedCapture,
};
use stillpoint_platform::{DiskIdentity, Platforms, Vm};
use stillpoint_qga::FsInfo;
use stillpoint_repo::{BackupOptions, DiskInput, Extent, Manifest, Repository, SnapshotInfo};

use crate::capture_source::CapturedDiskSource;
use crate::consistency::{self, Indication, Level, OnQuiesceFailure, RecipeFacts};
use crate::coverage;
use crate::error::{EngineError, EngineErrorKind, Result};
use crate::freeze::{GuardContext, GuardedFreeze};
use crate::preflight::{self, error_chain};
use crate::report::{BackupReport, CaptureTiming, DiskReport, ParentTracking, StepLog, ms};

/// Shared by every VM of one `stillpoint backup` run.
#[derive(Clone)]
pub struct BackupEnv {
    pub platforms: Platforms,
    pub repo: Repository,
    pub guard: GuardContext,
    /// Scratch space for copy-before-write (one subdirectory per capture).
    pub scratch_root: PathBuf,
    /// How long the guest agent's freeze call may take.
    pub freeze_timeout: Duration,
    /// How long the guest may stay frozen before the guardian stops this process and thaws.
    pub hold_limit: Duration,
    pub progress: Arc<dyn CopyProgress>,
}

/// Progress of the copy, for progress bars.
pub trait CopyProgress: Send + Sync {
    /// `disk_size` bytes will pass, read or skipped (holes, unchanged chunks).
    fn disk_started(&self, _vm: &str, _disk: &str, _disk_size: u64) {}
    fn advanced(&self, _vm: &str, _disk: &str, _bytes: u64) {}
    fn disk_finished(&self, _vm: &str, _disk: &str) {}
}

/// No progress output (`--json`, tests).
pub struct NoProgress;
impl CopyProgress for NoProgress {}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// The VM reference (`NAME` or `PLATFORM:NAME`).
    pub vm: String,
    pub requested: Level,
    pub policy: OnQuiesceFailure,
    /// A recipe for the application level.
    pub recipe: Option<RecipeFacts>,
    /// Read every disk in full even when an incremental would be possible.
    pub force_full: bool,
}

/// How one VM's backup ended.
#[derive(Debug)]
pub struct BackupOutcome {
    pub report: BackupReport,
    /// The published snapshot; `None` when the backup failed.
    pub manifest: Option<Manifest>,
    pub error: Option<EngineError>,
}

impl BackupOutcome {
    /// Published at the requested level.
    pub fn achieved_requested(&self) -> bool {
        self.manifest.is_some() && self.report.achieved >= self.report.requested
    }
}

/// Backs up one VM. Never panics and never returns early without a report: the outcome
/// says what was done, what was achieved and, on failure, why.
pub async fn backup_vm(env: &BackupEnv, job: BackupJob) -> BackupOutcome {
    let mut run = Run::new(&job);
    let result = run.execute(env, &job).await;
    run.report.steps = std::mem::take(&mut run.log.steps);
    run.report.duration_ms = ms(run.log.elapsed());
    match result {
        Ok(manifest) => {
            run.report.snapshot = Some(manifest.id.clone());
            BackupOutcome {
                report: run.report,
                manifest: Some(manifest),
                error: None,
            }
        }
        Err(error) => {
            run.report.error = Some(error_chain(&error));
            BackupOutcome {
                report: run.report,
                manifest: None,
                error: Some(error),
            }
        }
    }
}

struct Run {
    log: StepLog,
    report: BackupReport,
}

impl Run {
    fn new(job: &BackupJob) -> Self {
        Self {
            log: StepLog::default(),
            report: BackupReport {
                vm: job.vm.clone(),
                platform: String::new(),
                requested: job.requested,
                achieved: Level::Crash,
                indications: Vec::new(),
                degraded_because: Vec::new(),
                notes: Vec::new(),
                freeze: None,
                coverage: None,
                capture: None,
                vm_definition: None,
                disks: Vec::new(),
                steps: Vec::new(),
                recipe: None,
                bytes_read: 0,
                bytes_stored: 0,
                duration_ms: 0.0,
                snapshot: None,
                error: None,
            },
        }
    }

    fn degrade(&mut self, to: Level, indication: Indication, why: String) {
        if to < self.report.achieved {
            self.report.achieved = to;
        }
        if !self.report.indications.contains(&indication) {
            self.report.indications.push(indication);
        }
        self.report.degraded_because.push(why);
    }

    async fn execute(&mut self, env: &BackupEnv, job: &BackupJob) -> Result<Manifest> {
        let vm = env.platforms.resolve(&job.vm).map_err(platform)?;
        self.report.platform = vm.reference().platform.as_str().to_string();
        let capture = vm.capture().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::Platform,
                format!("VM `{}`: its platform cannot capture disks", job.vm),
            )
        })?;

        // Preflight and plan.
        let facts = self
            .log
            .run(
                "preflight",
                preflight::gather(vm.as_ref(), job.recipe.clone()),
            )
            .await
            .map_err(platform)?;
        let assessment = consistency::assess(&facts.facts);
        self.report.notes.extend(assessment.notes.iter().cloned());
        let mut plan = consistency::plan_quiesce(job.requested, &assessment, job.policy).map_err(
            |refused| {
                EngineError::new(
                    EngineErrorKind::ConsistencyRefused,
                    format!("VM `{}`: {refused}; nothing was backed up", job.vm),
                )
            },
        )?;
        self.report.achieved = plan.target;
        self.report.indications = plan.indications.clone();
        self.report.degraded_because = plan.degraded_because.clone();
        if plan.run_recipe {
            return Err(EngineError::new(
                EngineErrorKind::ConsistencyRefused,
                "application-consistent backups are not wired into `backup` yet",
            ));
        }

        // The parent snapshot and its bitmaps.
        let parent = if job.force_full {
            None
        } else {
            self.latest_snapshot(env, vm.as_ref()).await?
        };
        let tracking = parent
            .as_ref()
            .map(|m| ParentTracking::from_report(&m.report))
            .unwrap_or_default();
        let scratch = env.scratch_root.join(sanitize(&job.vm));
        std::fs::create_dir_all(&scratch).map_err(|error| {
            EngineError::new(
                EngineErrorKind::Platform,
                format!("cannot create the scratch directory {}", scratch.display()),
            )
            .with_source(error)
        })?;
        let mut request = CaptureRequest::new(&scratch);
        for disk in &tracking.disks {
            if let Some(bitmap) = &disk.bitmap {
                request = request.with_parent(&disk.id, bitmap, disk.size);
            }
        }
        // How to start the VM again, and what a freeze would cover: asked before the capture
        // holds the VM's monitor.
        match vm.definition().await {
            Ok(definition) => self.report.vm_definition = definition,
            Err(error) => self.report.notes.push(format!(
                "the VM's definition could not be recorded: {}",
                error_chain(&error)
            )),
        }
        let freeze_facts = if plan.freeze {
            Some(self.freeze_facts(vm.as_ref()).await)
        } else {
            None
        };
        let prepared = self
            .log
            .run("prepare capture", capture.prepare(request))
            .await
            .map_err(platform)?;

        // Which captured disks a freeze covers: decided before anything is frozen.
        if let Some(facts) = freeze_facts {
            let captured: Vec<String> = prepared
                .plan()
                .disks
                .iter()
                .map(|d| d.disk.id.clone())
                .collect();
            let outcome = facts.map(|(filesystems, identities)| {
                coverage::freeze_coverage(&filesystems, &identities, &captured)
            });
            match outcome {
                Ok(coverage) if coverage.complete() => self.report.coverage = Some(coverage),
                outcome => {
                    let why = match &outcome {
                        Ok(coverage) => format!(
                            "no filesystem the guest agent freezes sits on disk(s) {}: their data is only crash-consistent",
                            coverage.uncovered.join(", ")
                        ),
                        Err(error) => format!(
                            "cannot tell which disks a freeze covers ({})",
                            error_chain(error)
                        ),
                    };
                    self.report.coverage = outcome.ok();
                    if job.policy == OnQuiesceFailure::Fail {
                        abort(prepared).await;
                        return Err(EngineError::new(
                            EngineErrorKind::ConsistencyRefused,
                            format!(
                                "VM `{}`: {} consistency cannot be reached: {why}; nothing was backed up",
                                job.vm, job.requested
                            ),
                        ));
                    }
                    self.degrade(Level::Crash, Indication::QuiesceFailed, why);
                    plan.freeze = false;
                }
            }
        }

        // The point in time: frozen only across the capture start.
        let started = self
            .start_capture(env, job, vm.as_ref(), prepared, plan.freeze)
            .await?;
        self.copy_and_publish(env, job, parent, started).await
    }

    async fn latest_snapshot(&mut self, env: &BackupEnv, vm: &dyn Vm) -> Result<Option<Manifest>> {
        let repo = env.repo.clone();
        let name = vm.reference().name.clone();
        let started = Instant::now();
        let latest = tokio::task::spawn_blocking(move || repo.latest_snapshot(&name))
            .await
            .map_err(|e| {
                EngineError::new(EngineErrorKind::Repository, "the repository task panicked")
                    .with_source(e)
            })?
            .map_err(repository)?;
        self.log.record(
            "find parent",
            started,
            "ok",
            latest.as_ref().map(|m| format!("parent snapshot {}", m.id)),
        );
        Ok(latest)
    }

    /// The guest's filesystems (with the disks under them) and how the guest sees each disk.
    async fn freeze_facts(&mut self, vm: &dyn Vm) -> Result<(Vec<FsInfo>, Vec<DiskIdentity>)> {
        let agent = vm
            .agent()
            .ok_or_else(|| EngineError::new(EngineErrorKind::Agent, "no guest agent"))?;
        let filesystems = agent.fs_info().await;
        agent.release().await;
        let filesystems = filesystems.map_err(|e| {
            EngineError::new(EngineErrorKind::Agent, "guest-get-fsinfo failed").with_source(e)
        })?;
        let identities = vm.disk_identities().await.map_err(platform)?;
        Ok((filesystems, identities))
    }

    /// Freeze (when planned) → capture start → thaw. The guest is frozen for exactly this.
    async fn start_capture(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        vm: &dyn Vm,
        prepared: Box<dyn PreparedCapture>,
        freeze: bool,
    ) -> Result<Box<dyn StartedCapture>> {
        let frozen = if freeze {
            let agent = vm.agent().expect("a planned freeze has an agent");
            match self
                .log
                .run(
                    "freeze",
                    GuardedFreeze::freeze(
                        vm,
                        agent,
                        &env.guard,
                        env.freeze_timeout,
                        env.hold_limit,
                    ),
                )
                .await
            {
                Ok(frozen) => Some(frozen),
                Err(error) => {
                    let timed_out = error_chain(&error).contains("did not complete within");
                    let indication = if timed_out {
                        Indication::QuiesceTimeout
                    } else {
                        Indication::QuiesceFailed
                    };
                    if job.policy == OnQuiesceFailure::Fail {
                        abort(prepared).await;
                        return Err(EngineError::new(
                            EngineErrorKind::ConsistencyRefused,
                            format!("VM `{}`: the freeze failed and --on-quiesce-failure is fail; nothing was backed up", job.vm),
                        )
                        .with_source(error));
                    }
                    self.degrade(
                        Level::Crash,
                        indication,
                        format!("the freeze failed: {}", error_chain(&error)),
                    );
                    None
                }
            }
        } else {
            self.log.skipped("freeze", "not planned for this level");
            None
        };

        let start_began = Instant::now();
        let started = prepared.start().await;
        let start_took = start_began.elapsed();
        match &started {
            Ok(_) => self.log.record("capture start", start_began, "ok", None),
            Err(error) => self.log.record(
                "capture start",
                start_began,
                "failed",
                Some(error_chain(error)),
            ),
        }
        // Thaw at once, on every path.
        if let Some(frozen) = frozen {
            let thaw_began = Instant::now();
            let (window, thawed) = frozen.thaw().await;
            self.log.record(
                "thaw",
                thaw_began,
                if thawed.is_ok() { "ok" } else { "failed" },
                thawed.as_ref().err().map(|e| error_chain(e)),
            );
            self.report.freeze = Some(window);
            if let Err(error) = thawed {
                self.report.notes.push(format!(
                    "the thaw after the capture failed; the guardian thaws: {}",
                    error_chain(&error)
                ));
            }
        }
        let started = started.map_err(platform)?;
        let start_report = started.start_report();
        self.report.capture = Some(CaptureTiming {
            start_ms: ms(start_took),
            paused_ms: ms(start_report.paused),
            recovered: started.plan().recovered.clone(),
        });
        Ok(started)
    }

    async fn copy_and_publish(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        parent: Option<Manifest>,
        mut started: Box<dyn StartedCapture>,
    ) -> Result<Manifest> {
        let copied = self.copy(env, job, parent.as_ref(), started.as_mut()).await;
        let published = match copied {
            Ok(session) => self.publish(session).await,
            Err(error) => Err(error),
        };
        let finish_began = Instant::now();
        let finished = started.finish(published.is_ok()).await;
        match &finished {
            Ok(report) => {
                self.log.record(
                    "finish capture",
                    finish_began,
                    "ok",
                    (!report.warnings.is_empty()).then(|| report.warnings.join("; ")),
                );
            }
            Err(error) => {
                self.log.record(
                    "finish capture",
                    finish_began,
                    "failed",
                    Some(error_chain(error)),
                );
                if published.is_ok() {
                    self.report.notes.push(format!(
                        "the snapshot is complete, but releasing the capture failed ({}); the next backup cleans up and may read more",
                        error_chain(error)
                    ));
                }
            }
        }
        published
    }

    async fn copy(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        parent: Option<&Manifest>,
        started: &mut dyn StartedCapture,
    ) -> Result<stillpoint_repo::BackupSession> {
        let disks = self
            .log
            .run("export", started.export())
            .await
            .map_err(platform)?;
        let plan = started.plan().clone();
        let incremental = plan.disks.iter().any(|d| d.mode.is_incremental());
        let repo = env.repo.clone();
        let options = BackupOptions {
            vm: vm_name(&job.vm),
            parent: if incremental {
                parent.map(|p| p.id.clone())
            } else {
                None
            },
            workers: None,
        };
        let mut session = tokio::task::spawn_blocking(move || repo.begin_backup(options))
            .await
            .map_err(|e| {
                EngineError::new(EngineErrorKind::Repository, "the repository task panicked")
                    .with_source(e)
            })?
            .map_err(repository)?;

        for disk in disks {
            let planned = plan
                .disk(disk.id())
                .expect("exported disks are planned")
                .clone();
            let mut entry = DiskReport {
                id: disk.id().to_string(),
                size: disk.size(),
                mode: if planned.mode.is_incremental() {
                    "incremental".into()
                } else {
                    "full".into()
                },
                full_reason: match &planned.mode {
                    CaptureMode::Full { reason } => Some(reason.to_string()),
                    CaptureMode::Incremental { .. } => None,
                },
                bitmap: Some(planned.new_bitmap.clone()),
                ..Default::default()
            };
            let began = Instant::now();
            let result = copy_disk(env, job, &mut session, disk).await;
            let step = format!("copy {}", entry.id);
            match result {
                Ok(stats) => {
                    self.log.record(&step, began, "ok", None);
                    entry.bytes_read = stats.bytes_read;
                    entry.bytes_stored = stats.bytes_stored;
                    entry.chunks_new = stats.chunks_new;
                    entry.chunks_reused = stats.chunks_reused;
                    entry.chunks_unchanged = stats.chunks_unchanged;
                    entry.chunks_zero = stats.chunks_zero;
                    entry.copy_ms = ms(began.elapsed());
                    self.report.bytes_read += stats.bytes_read;
                    self.report.bytes_stored += stats.bytes_stored;
                    self.report.disks.push(entry);
                }
                Err(error) => {
                    self.log
                        .record(&step, began, "failed", Some(error_chain(&error)));
                    self.report.disks.push(entry);
                    return Err(error);
                }
            }
        }
        Ok(session)
    }

    async fn publish(&mut self, session: stillpoint_repo::BackupSession) -> Result<Manifest> {
        let info = SnapshotInfo {
            platform: Some(format!(
                "{}:{}",
                self.report.platform,
                vm_name(&self.report.vm)
            )),
            time: None,
            requested: Some(self.report.requested.to_string()),
            achieved: Some(self.report.achieved.to_string()),
            indications: self
                .report
                .indications
                .iter()
                .map(|i| format!("{i:?}"))
                .collect(),
            report: serde_json::to_value(&self.report).expect("a report always serialises"),
        };
        let began = Instant::now();
        let published = tokio::task::spawn_blocking(move || session.publish(info))
            .await
            .map_err(|e| {
                EngineError::new(EngineErrorKind::Repository, "the repository task panicked")
                    .with_source(e)
            })?
            .map_err(repository);
        self.log.record(
            "publish",
            began,
            if published.is_ok() { "ok" } else { "failed" },
            published.as_ref().err().map(|e| error_chain(e)),
        );
        published
    }
}

/// Copies one captured disk into the session: only allocated extents for a full capture,
/// only changed ones for an incremental (the rest keeps the parent's chunks unread).
async fn copy_disk(
    env: &BackupEnv,
    job: &BackupJob,
    session: &mut stillpoint_repo::BackupSession,
    disk: Arc<dyn CapturedDisk>,
) -> Result<stillpoint_repo::DiskStats> {
    let id = disk.id().to_string();
    let source = CapturedDiskSource::new(disk.clone(), tokio::runtime::Handle::current())
        .await
        .map_err(platform)?;
    let changed = disk.changes().await.map_err(platform)?.map(|ranges| {
        ranges
            .into_iter()
            .map(|r| Extent {
                offset: r.offset,
                len: r.len,
            })
            .collect::<Vec<_>>()
    });
    let vm = job.vm.clone();
    // The writer reports every byte of the disk as it passes it, read or skipped.
    env.progress.disk_started(&vm, &id, disk.size());
    let progress = env.progress.clone();
    // The writer runs on plain threads and blocks on reads through the runtime handle.
    let result = tokio::task::block_in_place(|| {
        let advance = |bytes: u64| progress.advanced(&vm, &id, bytes);
        session.write_disk(
            DiskInput {
                name: id.clone(),
                source: &source,
                changed,
            },
            Some(&advance),
        )
    });
    env.progress.disk_finished(&job.vm, &id);
    result.map_err(repository)
}

async fn abort(prepared: Box<dyn PreparedCapture>) {
    if let Err(error) = prepared.abort().await {
        tracing::warn!(
            "releasing the prepared capture failed: {}",
            error_chain(&error)
        );
    }
}

/// The VM's name (the snapshot is filed under it) from a reference.
pub fn vm_name(reference: &str) -> String {
    stillpoint_platform::VmRef::parse(reference)
        .map(|r| r.name)
        .unwrap_or_else(|_| reference.to_string())
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn platform(error: stillpoint_platform::PlatformError) -> EngineError {
    EngineError::new(EngineErrorKind::Platform, "the platform failed").with_source(error)
}

fn repository(error: stillpoint_repo::Error) -> EngineError {
    EngineError::new(EngineErrorKind::Repository, "the repository failed").with_source(error)
}
