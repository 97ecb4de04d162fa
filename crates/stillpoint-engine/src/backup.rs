//! One VM's backup, following DESIGN.md's flow:
//!
//! ```text
//! preflight ─► plan (level, policy, freeze coverage) ─► prepare capture (recover leftovers,
//! full/incremental per disk, scratch + filters) ─► [recipe steps before] ─► [guarded freeze]
//! ─► capture start (one atomic step for all disks) ─► [thaw, always] ─► [recipe steps after]
//! ─► export ─► copy into the repository (allocated / dirty extents only) ─► publish the
//! manifest ─► finish the capture (settle bitmaps) ─► report
//! ```
//!
//! What can go wrong, and what this code guarantees then:
//! - The level cannot be reached: `--on-quiesce-failure fail` stops before the capture and
//!   publishes nothing; `degrade` goes on at the level reached and says why.
//! - The freeze fails at run time, or the recipe's steps before the capture fail: same policy
//!   (degrade: capture without the freeze or without the application steps); the guest is
//!   never left frozen (the guarded freeze and its guardian see to it), and the recipe's
//!   inverse ops undo what its steps did.
//! - Anything fails after the capture started: the capture is finished as a failure (the dirty
//!   bitmaps keep every change for the next run), nothing is published, chunks already stored
//!   stay in the repository for the next backup to reuse.
//! - The manifest is published before the capture's bitmaps are settled as a success, so a
//!   failure between the two never loses a change: at worst the next backup reads more.
//! - The recipe's capture step is dropped at its timeout (the executor's): the freeze and
//!   pause guards thaw and remove their leases on drop, the platform resumes the VM and
//!   releases the capture, and the backup fails saying the step did not finish.
//!
//! Where the flow decides, the decision is a pure function tested without a VM:
//! [`consistency::decide_shortfall`] (degrade or refuse), [`consistency::quiesce_failure_indication`]
//! (a freeze timeout by its typed cause), [`full_read_reason`], [`recipe_capture_timeout`].
//! The flow itself is tested over fakes of the platform in `tests/backup_flow.rs`, on both
//! runtime flavours (the copy runs on `spawn_blocking`, never `block_in_place`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stillpoint_platform::capture::{
    CaptureMode, CaptureRequest, CapturedDisk, FullReason, PreparedCapture, StartedCapture,
};
use stillpoint_platform::{DiskIdentity, Platforms, RunState, Vm};
use stillpoint_qga::{ExecRequest, FsInfo};
use stillpoint_recipe::model::{HookType, Recipe, Target};
use stillpoint_recipe::{
    CaptureOutcome, ExecOptions, Executor, FreezeTrace, PlanOptions, PlannedStep, WorkflowPlan,
};
use stillpoint_repo::{BackupOptions, DiskInput, Manifest, Repository, SnapshotInfo};
use tokio::sync::Mutex;

use crate::capture_source::{CapturedDiskSource, capture_broke};
use crate::consistency::{self, Indication, Level, OnQuiesceFailure, RecipeFacts, Shortfall};
use crate::coverage;
use crate::error::error_chain;
use crate::error::{EngineError, EngineErrorKind, Result};
use crate::failpoints;
use crate::freeze::{CaptureGuard, FreezeWindow, GuardContext, GuardedFreeze, PauseGuard};
use crate::preflight;
use crate::recipe_runner::{CaptureHook, QemuStepRunner};
use crate::report::{BackupReport, CaptureTiming, DiskReport, ParentTracking, StepLog, ms};

/// How long the guest's `sync` before a freeze may take.
const FLUSH_LIMIT: Duration = Duration::from_secs(30);

/// Shared by every VM of one `stillpoint backup` run.
#[derive(Clone)]
pub struct BackupEnv {
    pub platforms: Platforms,
    pub repo: Repository,
    pub guard: GuardContext,
    /// Scratch space for copy-before-write (one subdirectory per VM).
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

/// A recipe for the application level, as loaded and validated.
#[derive(Debug, Clone)]
pub struct RecipeInput {
    pub path: PathBuf,
    pub recipe: Recipe,
    /// The workflow to run (`--workflow`, `backup` unless said otherwise).
    pub workflow: String,
}

impl RecipeInput {
    /// What the consistency decision needs to know about it.
    pub fn facts(&self) -> RecipeFacts {
        let needs_guest_exec = self.recipe.hooks.iter().any(|hook| {
            hook.target.value == Target::Guest
                && matches!(hook.hook_type.value, HookType::Exec | HookType::Check)
        });
        let name = self
            .recipe
            .name
            .clone()
            .unwrap_or_else(|| self.path.display().to_string());
        RecipeFacts {
            name,
            needs_guest_exec,
        }
    }
}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// The VM reference (`NAME` or `PLATFORM:NAME`).
    pub vm: String,
    pub requested: Level,
    pub policy: OnQuiesceFailure,
    /// A recipe for the application level.
    pub recipe: Option<Arc<RecipeInput>>,
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
    match env.platforms.resolve(&job.vm) {
        Ok(vm) => backup_vm_on(env, job, vm).await,
        Err(error) => Run::new(&job).conclude(Err(platform(error))),
    }
}

/// [`backup_vm`] of a VM already resolved (any platform's [`Vm`], the fakes of the flow's
/// unit tests among them). Safe on a current-thread and a multi-thread tokio runtime alike.
pub async fn backup_vm_on(env: &BackupEnv, job: BackupJob, vm: Arc<dyn Vm>) -> BackupOutcome {
    let mut run = Run::new(&job);
    let result = run.execute(env, &job, vm).await;
    run.conclude(result)
}

/// One attempt at the point in time: the guarded freeze (when asked), the capture start, the
/// thaw. Kept as data so the plain path and the recipe's capture step share it.
struct StartAttempt {
    /// Given back when nothing was started (the freeze failed first).
    unstarted: Option<Box<dyn PreparedCapture>>,
    started:
        Option<std::result::Result<Box<dyn StartedCapture>, stillpoint_platform::PlatformError>>,
    /// The guest's `sync` before the freeze, and why it failed (it is best effort).
    flush: Option<(Span, Option<String>)>,
    freeze: Option<Span>,
    freeze_error: Option<EngineError>,
    start: Option<Span>,
    thaw: Option<Span>,
    window: Option<FreezeWindow>,
    thaw_error: Option<String>,
}

#[derive(Clone, Copy)]
struct Span {
    began: Instant,
    ended: Instant,
}

impl Span {
    fn since(began: Instant) -> Self {
        Self {
            began,
            ended: Instant::now(),
        }
    }
}

/// Clean-up tasks that guards dropped mid-way spawned (a thaw), for the backup to wait on
/// before it reports: so the guest is thawed when `backup_vm` returns.
#[derive(Clone, Default)]
struct PendingCleanup(Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl PendingCleanup {
    fn push(&self, task: tokio::task::JoinHandle<()>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }

    /// Waits for every clean-up spawned so far.
    async fn settle(&self) {
        let tasks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// A guarded freeze that thaws when it is dropped still frozen: the future holding it was
/// cancelled (the recipe executor's capture timeout drops the capture step). The thaw then
/// runs as a task (it needs the agent), which also removes the lease, so the guardian never
/// comes to stop this process for a freeze nobody holds any more.
struct ThawOnDrop {
    frozen: Option<GuardedFreeze>,
    vm: String,
    cleanup: PendingCleanup,
}

impl ThawOnDrop {
    async fn thaw(mut self) -> (FreezeWindow, Result<()>) {
        match self.frozen.take() {
            Some(frozen) => frozen.thaw().await,
            None => unreachable!("a ThawOnDrop is thawed once, by value"),
        }
    }
}

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let Some(frozen) = self.frozen.take() else {
            return;
        };
        let vm = self.vm.clone();
        tracing::warn!(
            vm,
            "the capture step was abandoned while frozen: thawing now"
        );
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => self.cleanup.push(handle.spawn(async move {
                if let (_, Err(error)) = frozen.thaw().await {
                    tracing::warn!(vm, "{}", error_chain(&error));
                }
            })),
            // No runtime to thaw from: the lease stays, and its guardian thaws.
            Err(_) => tracing::warn!(vm, "no runtime to thaw from; the guardian thaws"),
        }
    }
}

/// A pause guard whose lease is removed when dropped, released or not: a cancelled capture
/// start leaves no lease behind (the platform resumes the VM it paused on its own drop).
struct ReleaseOnDrop(Option<PauseGuard>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(guard) = self.0.take() {
            guard.release();
        }
    }
}

/// Freeze (when asked) → capture start → thaw. The guest is frozen for exactly this, and
/// thawed on every path that froze it.
///
/// Cancel-safe: dropped at any await, the guards thaw the guest (spawning the thaw onto
/// `cleanup`), remove the pause lease, and the platform's capture resumes the VM and releases
/// what it set up.
async fn freeze_and_start(
    env: &BackupEnv,
    vm: &dyn Vm,
    prepared: Box<dyn PreparedCapture>,
    freeze: bool,
    running: bool,
    cleanup: &PendingCleanup,
) -> StartAttempt {
    let mut attempt = StartAttempt {
        unstarted: None,
        started: None,
        flush: None,
        freeze: None,
        freeze_error: None,
        start: None,
        thaw: None,
        window: None,
        thaw_error: None,
    };
    let frozen = if freeze {
        let began = Instant::now();
        let agent = match vm.agent() {
            Some(agent) => agent,
            None => {
                attempt.freeze_error = Some(EngineError::new(
                    EngineErrorKind::Agent,
                    "the VM has no guest agent channel",
                ));
                attempt.unstarted = Some(prepared);
                return attempt;
            }
        };
        // Write back the guest's dirty data before freezing, while writers may still run:
        // the freeze then only flushes what came since, so the filesystems (the first frozen
        // waits for the last) stay frozen for less time. Best effort: an agent without
        // guest-exec, or a slow `sync`, only costs this step.
        let flush = agent
            .run(&ExecRequest::new("sync", Vec::<String>::new()), FLUSH_LIMIT)
            .await;
        attempt.flush = Some((
            Span::since(began),
            flush.err().map(|error| error_chain(&error)),
        ));
        let began = Instant::now();
        let frozen =
            GuardedFreeze::freeze(vm, agent, &env.guard, env.freeze_timeout, env.hold_limit).await;
        attempt.freeze = Some(Span::since(began));
        match frozen {
            Ok(frozen) => Some(ThawOnDrop {
                frozen: Some(frozen),
                vm: vm.reference().to_string(),
                cleanup: cleanup.clone(),
            }),
            Err(error) => {
                attempt.freeze_error = Some(error);
                attempt.unstarted = Some(prepared);
                return attempt;
            }
        }
    } else {
        None
    };
    if frozen.is_some() {
        failpoints::delay(failpoints::AFTER_FREEZE);
    }
    // Without a freeze, the capture start still pauses a running VM's vCPUs for a few ms: a
    // guardian resumes the VM if this process dies in between (invariant 8).
    let pause_guard = ReleaseOnDrop(if frozen.is_none() && running {
        match PauseGuard::start(vm, &env.guard, env.hold_limit).await {
            Ok(guard) => Some(guard),
            Err(error) => {
                tracing::warn!("no guardian for the capture start: {}", error_chain(&error));
                None
            }
        }
    } else {
        None
    });
    let began = Instant::now();
    attempt.started = Some(match failpoints::check(failpoints::CAPTURE_START) {
        Ok(()) => prepared.start().await,
        // As a start that QEMU refused: everything prepared is released, no bitmap changed.
        Err(injected) => {
            abort(prepared).await;
            Err(stillpoint_platform::PlatformError::new(
                stillpoint_platform::PlatformErrorKind::Capture,
                "the capture did not start",
            )
            .with_source(injected))
        }
    });
    attempt.start = Some(Span::since(began));
    drop(pause_guard);
    if let Some(frozen) = frozen {
        let began = Instant::now();
        let (window, thawed) = frozen.thaw().await;
        attempt.thaw = Some(Span::since(began));
        attempt.window = Some(window);
        attempt.thaw_error = thawed.err().map(|error| error_chain(&error));
    }
    attempt
}

/// The recipe's capture step: the same freeze → start → thaw, on the prepared capture.
///
/// The executor drops this step's future when the recipe's capture timeout passes. That is
/// safe: the guards in [`freeze_and_start`] undo the freeze and the pause, the platform
/// releases the capture, and the slots here then say so (`prepared` and `attempt` both
/// empty: the capture was abandoned), which the backup turns into an error.
struct RecipeCapture {
    env: BackupEnv,
    /// The VM ran at the preflight (so the capture start pauses and resumes it).
    running: bool,
    vm: Arc<dyn Vm>,
    prepared: Mutex<Option<Box<dyn PreparedCapture>>>,
    attempt: Mutex<Option<StartAttempt>>,
    cleanup: PendingCleanup,
}

#[async_trait]
impl CaptureHook for RecipeCapture {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome> {
        let prepared = self.prepared.lock().await.take().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::Capture,
                "the recipe asks for a second capture; a backup takes one",
            )
        })?;
        let mut attempt = freeze_and_start(
            &self.env,
            self.vm.as_ref(),
            prepared,
            freeze,
            self.running,
            &self.cleanup,
        )
        .await;
        let outcome = if let Some(error) = &attempt.freeze_error {
            *self.prepared.lock().await = attempt.unstarted.take();
            Err(EngineError::new(
                EngineErrorKind::Agent,
                format!(
                    "the freeze before the capture failed: {}",
                    error_chain(error)
                ),
            ))
        } else {
            match &attempt.started {
                Some(Ok(_)) => Ok(CaptureOutcome {
                    disks: disks.to_vec(),
                    freeze: attempt.window.as_ref().map(|window| FreezeTrace {
                        frozen: true,
                        thawed: attempt.thaw_error.is_none(),
                        frozen_for: Some(Duration::from_secs_f64(window.frozen_ms / 1000.0)),
                        error: attempt.thaw_error.clone(),
                    }),
                }),
                Some(Err(error)) => Err(EngineError::new(
                    EngineErrorKind::Capture,
                    format!("the capture did not start: {}", error_chain(error)),
                )),
                None => Err(EngineError::new(
                    EngineErrorKind::Capture,
                    "the capture did not start",
                )),
            }
        };
        *self.attempt.lock().await = Some(attempt);
        outcome
    }
}

struct Run {
    log: StepLog,
    report: BackupReport,
    /// The VM ran at the preflight.
    running: bool,
    /// The latest snapshot, when `--full` left it unused as the parent.
    unused_parent: Option<String>,
}

impl Run {
    fn new(job: &BackupJob) -> Self {
        Self {
            log: StepLog::default(),
            running: false,
            unused_parent: None,
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

    /// The outcome: the report with its steps, the manifest or the error.
    fn conclude(mut self, result: Result<Manifest>) -> BackupOutcome {
        self.report.steps = std::mem::take(&mut self.log.steps);
        self.report.duration_ms = ms(self.log.elapsed());
        match result {
            Ok(manifest) => {
                self.report.snapshot = Some(manifest.id.clone());
                BackupOutcome {
                    report: self.report,
                    manifest: Some(manifest),
                    error: None,
                }
            }
            Err(error) => {
                self.report.error = Some(error_chain(&error));
                BackupOutcome {
                    report: self.report,
                    manifest: None,
                    error: Some(error),
                }
            }
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

    /// Applies the policy to a step that fell short of the requested level: refused (`Err`,
    /// the caller releases its capture) or recorded as degraded.
    fn fall_short(
        &mut self,
        job: &BackupJob,
        to: Level,
        indication: Indication,
        why: String,
    ) -> Result<()> {
        match consistency::decide_shortfall(&job.vm, job.requested, job.policy, to, indication, why)
        {
            Shortfall::Refuse(message) => Err(EngineError::new(
                EngineErrorKind::ConsistencyRefused,
                message,
            )),
            Shortfall::Degrade {
                to,
                indication,
                why,
            } => {
                self.degrade(to, indication, why);
                Ok(())
            }
        }
    }

    async fn execute(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        vm: Arc<dyn Vm>,
    ) -> Result<Manifest> {
        self.report.platform = vm.reference().platform.as_str().to_string();
        let capture = vm.capture().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::Platform,
                format!("VM `{}`: its platform cannot capture disks", job.vm),
            )
        })?;

        // Preflight and plan.
        let recipe_facts = job.recipe.as_ref().map(|recipe| recipe.facts());
        let facts = self
            .log
            .run(
                "preflight",
                preflight::gather_with_leases(
                    vm.as_ref(),
                    recipe_facts,
                    Some(&env.guard.runtime_root),
                ),
            )
            .await
            .map_err(platform)?;
        self.running = facts.facts.run_state == RunState::Running;
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
        let workflow = match (&job.recipe, plan.run_recipe) {
            (Some(recipe), true) => Some(self.plan_workflow(env, recipe, plan.freeze)?),
            _ => None,
        };

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

        // The parent snapshot and its bitmaps; the disks the recipe's volume group selects.
        // Looked up under `--full` too, so the report can name the parent it did not use.
        let latest = self
            .latest_snapshot(env, vm.as_ref(), job.force_full)
            .await?;
        let parent = if job.force_full {
            self.unused_parent = latest.map(|m| m.id);
            None
        } else {
            latest
        };
        let tracking = parent
            .as_ref()
            .map(|m| ParentTracking::from_report(&m.report))
            .unwrap_or_default();
        // Absolute: QEMU opens the scratch files, and its working directory is not ours.
        let scratch =
            std::path::absolute(env.scratch_root.join(sanitize(&job.vm))).map_err(|error| {
                EngineError::new(
                    EngineErrorKind::Platform,
                    "cannot make the scratch directory's path absolute",
                )
                .with_source(error)
            })?;
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
        if let Some(workflow) = &workflow {
            let inventory = capture.inspect().await.map_err(platform)?;
            let disks: Vec<stillpoint_recipe::DiskInfo> = inventory
                .disks
                .iter()
                .map(|disk| stillpoint_recipe::DiskInfo {
                    name: disk.id.clone(),
                    labels: Default::default(),
                })
                .collect();
            let selected: Vec<String> = workflow
                .steps
                .iter()
                .find_map(|step| match step {
                    PlannedStep::Capture(capture) => Some(capture),
                    _ => None,
                })
                .map(|step| {
                    step.select(&disks)
                        .into_iter()
                        .map(|d| d.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            if selected.is_empty() {
                return Err(EngineError::new(
                    EngineErrorKind::Recipe,
                    format!(
                        "VM `{}`: the recipe's volume group selects none of its disks ({})",
                        job.vm,
                        inventory
                            .disks
                            .iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            request = request.only(selected);
        }
        // Covers the capture until this function returns (finished or released by then): if
        // this process dies meanwhile, a guardian releases what the capture left.
        let _capture_guard = CaptureGuard::start(vm.as_ref(), &env.guard).await?;
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
                    if let Err(refused) =
                        self.fall_short(job, Level::Crash, Indication::QuiesceFailed, why)
                    {
                        abort(prepared).await;
                        return Err(refused);
                    }
                    plan.freeze = false;
                }
            }
        }

        // The point in time: frozen only across the capture start.
        // A freeze dropped above (coverage) is dropped from the recipe's capture step too.
        let workflow = match (workflow, &job.recipe) {
            (Some(_), Some(recipe)) if !plan.freeze => {
                Some(self.plan_workflow(env, recipe, false)?)
            }
            (workflow, _) => workflow,
        };
        let started = match workflow {
            Some(workflow) => {
                self.start_with_recipe(env, job, vm.clone(), prepared, workflow, plan.freeze)
                    .await?
            }
            None => {
                self.start_plain(env, job, vm.as_ref(), prepared, plan.freeze)
                    .await?
            }
        };
        self.copy_and_publish(env, job, parent, started).await
    }

    fn plan_workflow(
        &mut self,
        env: &BackupEnv,
        recipe: &RecipeInput,
        freeze: bool,
    ) -> Result<WorkflowPlan> {
        let options = PlanOptions {
            freeze,
            capture_timeout: recipe_capture_timeout(env.freeze_timeout, env.hold_limit),
            ..PlanOptions::default()
        };
        stillpoint_recipe::plan_workflow(&recipe.recipe, &recipe.workflow, &options).map_err(
            |error| {
                EngineError::new(
                    EngineErrorKind::Recipe,
                    format!("recipe {} cannot be planned", recipe.path.display()),
                )
                .with_source(error)
            },
        )
    }

    async fn latest_snapshot(
        &mut self,
        env: &BackupEnv,
        vm: &dyn Vm,
        force_full: bool,
    ) -> Result<Option<Manifest>> {
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
            latest.as_ref().map(|m| {
                if force_full {
                    format!("parent snapshot {} (not used: --full)", m.id)
                } else {
                    format!("parent snapshot {}", m.id)
                }
            }),
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

    /// Records what an attempt did and hands back its started capture (or the error).
    fn absorb(&mut self, attempt: &mut StartAttempt) -> Option<Result<Box<dyn StartedCapture>>> {
        if let Some((span, error)) = attempt.flush.take() {
            let outcome = if error.is_none() { "ok" } else { "skipped" };
            self.log
                .record_span("flush guest", span.began, span.ended, outcome, error);
        }
        if let Some(span) = attempt.freeze {
            let detail = attempt.freeze_error.as_ref().map(|e| error_chain(e));
            self.log.record_span(
                "freeze",
                span.began,
                span.ended,
                if detail.is_none() { "ok" } else { "failed" },
                detail,
            );
        }
        if let Some(span) = attempt.start {
            let detail = match &attempt.started {
                Some(Err(error)) => Some(error_chain(error)),
                _ => None,
            };
            self.log.record_span(
                "capture start",
                span.began,
                span.ended,
                if detail.is_none() { "ok" } else { "failed" },
                detail,
            );
        }
        if let Some(span) = attempt.thaw {
            let detail = attempt.thaw_error.clone();
            self.log.record_span(
                "thaw",
                span.began,
                span.ended,
                if detail.is_none() { "ok" } else { "failed" },
                detail.clone(),
            );
            if let Some(detail) = detail {
                self.report.notes.push(format!(
                    "the thaw after the capture failed; the guardian thaws: {detail}"
                ));
            }
        }
        if let Some(window) = attempt.window.take() {
            self.report.freeze = Some(window);
        }
        let started = attempt.started.take()?;
        Some(match started {
            Ok(started) => {
                let start_report = started.start_report();
                self.report.capture = Some(CaptureTiming {
                    start_ms: attempt
                        .start
                        .map(|s| ms(s.ended - s.began))
                        .unwrap_or_default(),
                    paused_ms: ms(start_report.paused),
                    recovered: started.plan().recovered.clone(),
                });
                Ok(started)
            }
            Err(error) => Err(platform(error)),
        })
    }

    /// A freeze that failed: `fail` gives up (releasing the capture), `degrade` says why and
    /// hands the capture back for a start without the freeze.
    async fn freeze_failed(
        &mut self,
        job: &BackupJob,
        error: EngineError,
        prepared: Box<dyn PreparedCapture>,
    ) -> Result<Box<dyn PreparedCapture>> {
        let why = format!("the freeze failed: {}", error_chain(&error));
        let indication = consistency::quiesce_failure_indication(&error);
        match self.fall_short(job, Level::Crash, indication, why) {
            Ok(()) => Ok(prepared),
            Err(refused) => {
                abort(prepared).await;
                Err(refused.with_source(error))
            }
        }
    }

    async fn start_plain(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        vm: &dyn Vm,
        prepared: Box<dyn PreparedCapture>,
        freeze: bool,
    ) -> Result<Box<dyn StartedCapture>> {
        if !freeze {
            self.log.skipped("freeze", "not planned for this level");
        }
        let mut attempt = freeze_and_start(
            env,
            vm,
            prepared,
            freeze,
            self.running,
            &PendingCleanup::default(),
        )
        .await;
        self.absorb_started(job, env, vm, &mut attempt).await
    }

    /// Absorbs an attempt; after a failed freeze, applies the policy (and on `degrade` starts
    /// again without freezing).
    async fn absorb_started(
        &mut self,
        job: &BackupJob,
        env: &BackupEnv,
        vm: &dyn Vm,
        attempt: &mut StartAttempt,
    ) -> Result<Box<dyn StartedCapture>> {
        if let Some(started) = self.absorb(attempt) {
            return started;
        }
        let (Some(error), Some(prepared)) = (attempt.freeze_error.take(), attempt.unstarted.take())
        else {
            return Err(EngineError::new(
                EngineErrorKind::Capture,
                "the capture neither started nor came back unstarted",
            ));
        };
        let prepared = self.freeze_failed(job, error, prepared).await?;
        let mut again = freeze_and_start(
            env,
            vm,
            prepared,
            false,
            self.running,
            &PendingCleanup::default(),
        )
        .await;
        self.absorb(&mut again).unwrap_or_else(|| {
            Err(EngineError::new(
                EngineErrorKind::Capture,
                "the capture start without a freeze did not run",
            ))
        })
    }

    /// The application level: the recipe's workflow runs its steps around the capture step,
    /// which freezes, starts the capture and thaws.
    async fn start_with_recipe(
        &mut self,
        env: &BackupEnv,
        job: &BackupJob,
        vm: Arc<dyn Vm>,
        prepared: Box<dyn PreparedCapture>,
        workflow: WorkflowPlan,
        freeze: bool,
    ) -> Result<Box<dyn StartedCapture>> {
        let hook = Arc::new(RecipeCapture {
            env: env.clone(),
            running: self.running,
            vm: vm.clone(),
            prepared: Mutex::new(Some(prepared)),
            attempt: Mutex::new(None),
            cleanup: PendingCleanup::default(),
        });
        let disks: Vec<stillpoint_recipe::DiskInfo> = hook
            .prepared
            .lock()
            .await
            .as_ref()
            .map(|p| {
                p.plan()
                    .disks
                    .iter()
                    .map(|d| stillpoint_recipe::DiskInfo {
                        name: d.disk.id.clone(),
                        labels: Default::default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let began = Instant::now();
        let hook_for_runner: Arc<dyn CaptureHook> = hook.clone();
        let workflow_report = {
            let runner = QemuStepRunner::new(vm.clone(), disks, hook_for_runner);
            Executor::new(&runner, ExecOptions::default())
                .run(&workflow)
                .await
        };
        self.log.record(
            "recipe workflow",
            began,
            if workflow_report.succeeded {
                "ok"
            } else {
                "failed"
            },
            workflow_report
                .stopped_at
                .as_ref()
                .map(|step| format!("stopped at {step}")),
        );
        self.report.recipe = serde_json::to_value(&workflow_report).ok();
        // A capture step the executor gave up on thaws from a task: wait for it, so the guest
        // is thawed when this backup reports.
        hook.cleanup.settle().await;
        let attempt = hook.attempt.lock().await.take();
        let unused = hook.prepared.lock().await.take();

        let mut attempt = match (attempt, unused) {
            (Some(attempt), unused) => {
                if attempt.freeze_error.is_some() {
                    let mut attempt = attempt;
                    attempt.unstarted = unused;
                    attempt
                } else {
                    attempt
                }
            }
            (None, None) => {
                // The capture step took the capture and never finished (the executor's
                // capture timeout dropped it): its guards thawed the guest and released the
                // capture. A capture that did not happen is not a level to degrade to.
                return Err(EngineError::new(
                    EngineErrorKind::Capture,
                    format!(
                        "VM `{}`: the recipe's capture step did not finish ({}); the guest was thawed and the capture released; nothing was backed up",
                        job.vm,
                        capture_step_error(&workflow_report)
                    ),
                ));
            }
            (None, Some(prepared)) => {
                // The workflow stopped before its capture step (its inverse ops have run).
                let why = format!(
                    "the recipe's steps before the capture failed ({})",
                    workflow_report
                        .stopped_at
                        .as_deref()
                        .unwrap_or("workflow stopped")
                );
                if let Err(refused) = self.fall_short(
                    job,
                    Level::Filesystem,
                    Indication::ApplicationStepFailed,
                    why,
                ) {
                    abort(prepared).await;
                    return Err(refused);
                }
                return self
                    .start_plain(env, job, vm.as_ref(), prepared, freeze)
                    .await;
            }
        };
        let started = self
            .absorb_started(job, env, vm.as_ref(), &mut attempt)
            .await?;
        if !workflow_report.application_steps_ok && self.report.achieved >= Level::Application {
            let why = format!(
                "not every recipe step before the capture succeeded{}",
                workflow_report
                    .stopped_at
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            );
            if let Err(refused) = self.fall_short(
                job,
                Level::Filesystem,
                Indication::ApplicationStepFailed,
                why,
            ) {
                if let Err(error) = started.finish(false).await {
                    tracing::warn!("releasing the capture failed: {}", error_chain(&error));
                }
                return Err(refused);
            }
        }
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
                full_reason: full_read_reason(
                    &planned.mode,
                    job.force_full,
                    self.unused_parent.as_deref(),
                ),
                bitmap: Some(planned.new_bitmap.clone()),
                ..Default::default()
            };
            let began = Instant::now();
            let result = copy_disk(env, job, session, disk).await;
            let step = format!("copy {}", entry.id);
            match result {
                Ok((back, stats)) => {
                    session = back;
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
/// only changed ones for an incremental (the rest keeps the parent's chunks unread). Takes the
/// session and hands it back: the writer runs on a blocking thread (`spawn_blocking`, which
/// every runtime flavour has; `block_in_place` panics on a current-thread runtime) and reads
/// the capture through this runtime's handle. On error the session is dropped: nothing of it
/// is published, its stored chunks stay for the next backup.
async fn copy_disk(
    env: &BackupEnv,
    job: &BackupJob,
    mut session: stillpoint_repo::BackupSession,
    disk: Arc<dyn CapturedDisk>,
) -> Result<(stillpoint_repo::BackupSession, stillpoint_repo::DiskStats)> {
    failpoints::check(failpoints::DURING_COPY)?;
    let id = disk.id().to_string();
    let source = CapturedDiskSource::new(disk.clone(), tokio::runtime::Handle::current())
        .await
        .map_err(platform)?;
    let changed = source.changed_extents().await.map_err(platform)?;
    let vm = job.vm.clone();
    // The writer reports every byte of the disk as it passes it, read or skipped.
    env.progress.disk_started(&vm, &id, disk.size());
    let progress = env.progress.clone();
    let name = id.clone();
    let written = tokio::task::spawn_blocking(move || {
        let advance = |bytes: u64| progress.advanced(&vm, &name, bytes);
        let result = session.write_disk(
            DiskInput {
                name: name.clone(),
                source: &source,
                changed,
            },
            Some(&advance),
        );
        result.map(|stats| (session, stats))
    })
    .await;
    env.progress.disk_finished(&job.vm, &id);
    match written {
        Ok(result) => result.map_err(|error| copy_error(&job.vm, &id, error)),
        Err(join) => Err(EngineError::new(
            EngineErrorKind::Repository,
            format!("VM `{}`, disk {id}: the repository writer panicked", job.vm),
        )
        .with_source(join)),
    }
}

/// A failed copy as an engine error: a capture that broke under the copy (copy-before-write
/// could not save old data, scratch space ran out) is a capture failure and says so; the
/// rest is the repository's.
fn copy_error(vm: &str, disk: &str, error: stillpoint_repo::Error) -> EngineError {
    if capture_broke(&error) {
        EngineError::new(
            EngineErrorKind::CaptureBroken,
            format!(
                "VM `{vm}`, disk {disk}: the capture broke while it was copied (copy-before-write \
                 could not keep the old data: scratch space?); the guest kept running and writing, \
                 nothing was published"
            ),
        )
        .with_source(error)
    } else {
        repository(error)
    }
}

/// Why a disk was read in full, as the report says it. A full read asked for (`--full`) says
/// so, naming the parent it did not use, rather than the platform's "no parent snapshot"
/// (the platform was given none because of `--full`).
pub fn full_read_reason(
    mode: &CaptureMode,
    force_full: bool,
    unused_parent: Option<&str>,
) -> Option<String> {
    let CaptureMode::Full { reason } = mode else {
        return None;
    };
    Some(match (reason, force_full, unused_parent) {
        (FullReason::NoParent, true, Some(parent)) => {
            format!("a full read was asked for (--full); parent snapshot {parent} was not used")
        }
        (FullReason::NoParent, true, None) => {
            "a full read was asked for (--full); there is no parent snapshot either".to_string()
        }
        (reason, _, _) => reason.to_string(),
    })
}

/// How long a recipe's capture step (sync → guarded freeze → capture start → thaw) may take
/// before the executor drops it. Two bounds meet here:
/// - below the guardian's deadline (freeze timeout + hold limit from the lease, written after
///   the step began), so the executor gives up — and the step's guards thaw — before the
///   guardian would stop this process;
/// - beyond the freeze call's own timeout with room for the guest's `sync` and the guardian's
///   start, so a freeze that hangs ends as a freeze timeout (`QuiesceTimeout`, the thaw handed
///   to the guardian) rather than being dropped mid-call.
///
/// Half the hold limit past the freeze timeout sits between them; the plan's default caps it.
pub fn recipe_capture_timeout(freeze_timeout: Duration, hold_limit: Duration) -> Duration {
    stillpoint_recipe::plan::DEFAULT_CAPTURE_TIMEOUT.min(freeze_timeout + hold_limit / 2)
}

/// What the workflow report says about its capture step (why it did not finish).
fn capture_step_error(report: &stillpoint_recipe::WorkflowReport) -> String {
    report
        .steps
        .iter()
        .find(|step| step.kind == stillpoint_recipe::executor::StepKind::Capture)
        .map(|step| {
            format!(
                "{}: {}",
                step.name,
                step.error.as_deref().unwrap_or("no error recorded")
            )
        })
        .unwrap_or_else(|| "the workflow has no capture step".to_string())
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

use stillpoint_os::names::file_name as sanitize;

fn platform(error: stillpoint_platform::PlatformError) -> EngineError {
    EngineError::new(EngineErrorKind::Platform, "the platform failed").with_source(error)
}

fn repository(error: stillpoint_repo::Error) -> EngineError {
    EngineError::new(EngineErrorKind::Repository, "the repository failed").with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_full_read_says_so_and_names_the_unused_parent() {
        let no_parent = CaptureMode::Full {
            reason: FullReason::NoParent,
        };
        assert_eq!(
            full_read_reason(&no_parent, true, Some("20260101-000000-abcd")).as_deref(),
            Some(
                "a full read was asked for (--full); parent snapshot 20260101-000000-abcd was not used"
            )
        );
        assert!(
            full_read_reason(&no_parent, true, None)
                .unwrap()
                .contains("--full")
        );
        assert_eq!(
            full_read_reason(&no_parent, false, None).as_deref(),
            Some("no parent snapshot")
        );
        let incremental = CaptureMode::Incremental {
            parent_bitmap: "stillpoint-x".into(),
        };
        assert_eq!(full_read_reason(&incremental, true, Some("p")), None);
    }

    #[test]
    fn the_recipe_capture_timeout_outlasts_the_freeze_call_and_ends_before_the_guardian() {
        let (freeze, hold) = (Duration::from_secs(60), Duration::from_secs(60));
        let timeout = recipe_capture_timeout(freeze, hold);
        assert_eq!(timeout, Duration::from_secs(90));
        assert!(timeout > freeze && timeout < freeze + hold);
        assert_eq!(
            recipe_capture_timeout(Duration::from_secs(10), Duration::from_secs(40)),
            Duration::from_secs(30)
        );
        assert_eq!(
            recipe_capture_timeout(Duration::from_secs(600), Duration::from_secs(600)),
            stillpoint_recipe::plan::DEFAULT_CAPTURE_TIMEOUT
        );
    }
}
