//! `stillpoint recipe run --phase pre|post`: a recipe's backup workflow split in two around a
//! capture that someone else takes — on KubeVirt, the volume snapshot Velero has the CSI
//! driver take between the pod's pre and post backup hooks.
//!
//! ```text
//!  pre  (one process)      steps before the capture ─► background ops polled ─► freeze, left
//!                          frozen (a guardian thaws after the unfreeze timeout) ─► the running
//!                          background ops are handed over: guest PIDs + the inverse ops still
//!                          owed ─► state file ─► exit 0          (any failure: undone, exit 1)
//!        [the platform snapshots the volumes]
//!  post (another process)  thaw, first and always ─► adopt the handed-over ops ─► steps after
//!                          the capture (an op that `ends` a handed-over op ends it) ─► if the
//!                          workflow stops: the inverse ops still owed, both phases' ─► end
//!                          what still runs ─► remove the state file
//! ```
//!
//! Why the executor needs glue here: [`Executor::run`] holds background ops in memory, ends
//! them when the run ends and compensates within the run — one process, one run. Each phase is
//! therefore one executor run over its part of the plan (so ordering, checks, timeouts,
//! `failOn`, compensation within a phase are the executor's, tested there), and what has to
//! cross the process boundary is carried by the state file and applied here, mirroring the
//! executor's rules: a handed-over op is ended by the post op that names it in `ends` (after
//! that op succeeded) or at the end; a pre op's inverse is owed until an op with that inverse's
//! name succeeds, and runs, newest first, if the post phase stops.
//!
//! What it keeps:
//! - **The freeze is guarded by time, not by this process**: the pre hook must exit while the
//!   guest stays frozen, so its freeze is `stillpoint freeze`'s (virt-freezer's semantics): a
//!   guardian thaws after the unfreeze timeout unless the post phase thawed first.
//! - **Thaw always**: the post phase thaws before anything else, even without a state file.
//! - **Nothing asks the guest while frozen**: handing over is local bookkeeping; adopted ops
//!   are only polled after the thaw.
//! - **A failed pre phase leaves nothing behind**: the executor compensates and ends its
//!   background ops; if a failure comes after the freeze (a handover, the state file), this
//!   module thaws, runs the owed inverse ops and ends the handed-over commands.
//!
//! Limits:
//! - Host background ops die with the pre process (`PR_SET_PDEATHSIG`), so a workflow whose
//!   host background op runs across the capture is refused before anything runs.
//! - If the post hook never comes, the guardian thaws at the unfreeze timeout, but nothing on
//!   the host is left to end the held guest sessions: they run until their own bound (the demo
//!   recipe's `timeout 600`), or until a late post phase ends them.
//! - The post phase re-plans the recipe file; if the workflow's steps differ from what the pre
//!   phase planned, it only ends the handed-over commands and reports the mismatch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use stillpoint_platform::Vm;
use stillpoint_recipe::executor::{
    EndRecord, Owed, Phase as StepPhase, StepKind, owe_after_success, settle_owed,
};
use stillpoint_recipe::model::Target;
use stillpoint_recipe::plan::{CaptureStep, CheckStep, ExecStep};
use stillpoint_recipe::{
    BackgroundEnd, BackgroundState, CaptureOutcome, ExecOptions, ExecOutcome, ExecRequest,
    Executor, FreezeTrace, PlanOptions, PlannedStep, StepOutcome, StepRecord, StepRunner,
    WorkflowPlan, WorkflowReport,
};
use tokio::time::Instant;

use crate::backup::RecipeInput;
use crate::error::error_chain;
use crate::error::{EngineError, EngineErrorKind, Result};
use crate::freeze::{self, FreezeOutcome, GuardContext, UnfreezeOutcome};
use crate::recipe_runner::{BackgroundProcess, CaptureHook, HandedOver, QemuStepRunner};

/// The workflow the phases split (the one Velero's backup hooks stand for).
pub const WORKFLOW: &str = "backup";
/// The version of the state file's format.
const STATE_VERSION: u32 = 1;

/// What both phases need besides the VM and the recipe.
#[derive(Debug, Clone)]
pub struct PhaseEnv {
    pub guard: GuardContext,
    /// Where the state file goes (`<runtime root>/recipe-runs/<vm>.json`).
    pub runtime_root: PathBuf,
    /// How long the agent's freeze call may take.
    pub freeze_timeout: Duration,
    /// After the pre phase froze the guest, the guardian thaws it this long after the freeze
    /// unless the post phase thawed first.
    pub unfreeze_timeout: Duration,
}

/// Which half of the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The steps before the capture, then the freeze.
    Pre,
    /// The thaw, then the steps after the capture.
    Post,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        })
    }
}

/// A handed-over background op as the post phase saw it end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdoptedOp {
    /// `hook/op`.
    pub id: String,
    /// Its PID in the guest.
    pub pid: i64,
    pub ended: EndRecord,
}

/// What one phase did.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub vm: String,
    pub phase: Phase,
    pub recipe: PathBuf,
    /// The phase did all it had to, every step succeeded (failures with `onError: continue`
    /// excepted), and it left nothing behind it should not have.
    pub succeeded: bool,
    /// Post: the guest was no longer frozen when the phase began, so the platform's snapshot
    /// may not have been taken frozen. Why, in a sentence.
    pub degraded_because: Option<String>,
    /// The executor's report of this phase's part of the workflow. In the pre phase its
    /// capture step is the freeze left in place for the platform.
    pub workflow: WorkflowReport,
    /// Pre: the freeze (`None` when the phase stopped before it).
    pub freeze: Option<FreezeOutcome>,
    /// Post: the thaw that opened the phase (`None` when it failed: see `error`).
    pub thaw: Option<UnfreezeOutcome>,
    /// Pre: the background ops left running for the post phase.
    pub handed_over: Vec<HandedOver>,
    /// Post (or a pre phase undoing itself): how the handed-over ops ended.
    pub adopted: Vec<AdoptedOp>,
    /// Inverse ops owed by the other phase that ran because this one stopped.
    pub compensation: Vec<StepRecord>,
    /// The state file written (pre) or consumed (post).
    pub state_file: PathBuf,
    /// Why the phase failed, beyond the steps' own errors.
    pub error: Option<String>,
}

impl PhaseReport {
    fn new(vm: &str, phase: Phase, recipe: &Path, state_file: PathBuf) -> Self {
        PhaseReport {
            vm: vm.to_owned(),
            phase,
            recipe: recipe.to_owned(),
            succeeded: false,
            degraded_because: None,
            workflow: WorkflowReport {
                workflow: WORKFLOW.to_owned(),
                succeeded: false,
                stopped_at: None,
                captured: false,
                application_steps_ok: false,
                steps: Vec::new(),
                notes: Vec::new(),
                duration: Duration::ZERO,
            },
            freeze: None,
            thaw: None,
            handed_over: Vec::new(),
            adopted: Vec::new(),
            compensation: Vec::new(),
            state_file,
            error: None,
        }
    }

    fn fail(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.error = Some(match self.error.take() {
            Some(previous) => format!("{previous}; {message}"),
            None => message,
        });
        self.succeeded = false;
    }
}

/// What the pre phase leaves for the post phase, in `<runtime root>/recipe-runs/<vm>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseState {
    pub version: u32,
    pub vm: String,
    pub recipe: PathBuf,
    pub workflow: String,
    /// The planned steps' names, so the post phase can tell it planned the same workflow.
    pub steps: Vec<String>,
    /// The pre phase's process (gone by the time the post phase reads this).
    pub pre_pid: u32,
    /// When the guest was frozen, and when the guardian thaws it (ms since the Unix epoch).
    pub frozen_at_ms: u64,
    pub auto_thaw_at_ms: Option<u64>,
    /// Background ops still running in the guest.
    pub handed_over: Vec<HandedOver>,
    /// Pre-phase ops that succeeded and whose inverse op has not run yet, oldest first.
    pub owed_inverse_of: Vec<String>,
}

/// Where the state file of `vm` lives.
pub fn state_path(runtime_root: &Path, vm: &str) -> PathBuf {
    let file = stillpoint_os::names::file_name(vm);
    runtime_root
        .join("recipe-runs")
        .join(format!("{file}.json"))
}

/// Reads a state file; `Ok(None)` when there is none.
pub fn read_state(path: &Path) -> Result<Option<PhaseState>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(state_error(path, "cannot read the recipe phase state").with_source(error));
        }
    };
    let state: PhaseState = serde_json::from_slice(&bytes).map_err(|error| {
        state_error(path, "the recipe phase state is malformed").with_source(error)
    })?;
    if state.version != STATE_VERSION {
        return Err(state_error(
            path,
            format!(
                "the recipe phase state has version {}, this stillpoint reads version {STATE_VERSION}",
                state.version
            ),
        ));
    }
    Ok(Some(state))
}

/// Writes a state file atomically (temporary file + rename).
fn write_state(path: &Path, state: &PhaseState) -> Result<()> {
    let dir = path.parent().expect("state paths have a parent");
    std::fs::create_dir_all(dir).map_err(|error| {
        state_error(dir, "cannot create the recipe phase directory").with_source(error)
    })?;
    let bytes = serde_json::to_vec_pretty(state).expect("a phase state always serialises");
    stillpoint_os::fs::write_atomically(path, &bytes).map_err(|error| {
        state_error(path, "cannot write the recipe phase state").with_source(error)
    })
}

fn state_error(path: &Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::new(
        EngineErrorKind::Recipe,
        format!("{what} ({})", path.display()),
    )
}

/// The backup workflow and where its capture step is.
struct Split {
    plan: WorkflowPlan,
    capture: usize,
}

impl Split {
    fn of(recipe: &RecipeInput) -> Result<Split> {
        let options = PlanOptions {
            freeze: true,
            ..PlanOptions::default()
        };
        let plan = stillpoint_recipe::plan_workflow(&recipe.recipe, &recipe.workflow, &options)
            .map_err(|error| {
                EngineError::new(
                    EngineErrorKind::Recipe,
                    format!("recipe {} cannot be planned", recipe.path.display()),
                )
                .with_source(error)
            })?;
        let capture = plan.capture_index().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::Recipe,
                format!(
                    "recipe {}: the `{}` workflow has no capture step, so nothing says where the platform's snapshot goes between the phases",
                    recipe.path.display(),
                    recipe.workflow
                ),
            )
        })?;
        Ok(Split { plan, capture })
    }

    fn step_names(&self) -> Vec<String> {
        self.plan.steps.iter().map(|s| s.id().to_owned()).collect()
    }

    /// The pre phase's plan: the steps before the capture and the capture step, which the
    /// phase runner carries out as the freeze left in place (so the executor is not asked to
    /// prove a thaw: `freeze` is off in the step, on in the runner).
    fn pre_plan(&self) -> WorkflowPlan {
        let mut plan = self.plan.clone();
        plan.steps.truncate(self.capture + 1);
        if let Some(PlannedStep::Capture(step)) = plan.steps.last_mut() {
            step.freeze = false;
        }
        plan
    }

    fn post_plan(&self) -> WorkflowPlan {
        let mut plan = self.plan.clone();
        plan.steps.drain(..=self.capture);
        plan
    }

    /// The op `id` of the whole plan.
    fn op(&self, id: &str) -> Option<&ExecStep> {
        self.plan.steps.iter().find_map(|step| match step {
            PlannedStep::Exec(exec) if exec.id == id => Some(exec),
            _ => None,
        })
    }

    /// A host background op that would still run at the capture cannot be handed over.
    fn refuse_host_background(&self, recipe: &Path) -> Result<()> {
        let before = &self.plan.steps[..self.capture];
        for (index, step) in before.iter().enumerate() {
            let PlannedStep::Exec(exec) = step else {
                continue;
            };
            if !exec.background || exec.target != Target::Host {
                continue;
            }
            let ended_before_capture = before[index + 1..].iter().any(|later| {
                matches!(later, PlannedStep::Exec(e) if e.ends.as_deref() == Some(exec.id.as_str()))
            });
            if !ended_before_capture {
                return Err(EngineError::new(
                    EngineErrorKind::Recipe,
                    format!(
                        "recipe {}: background op `{}` runs on the host across the capture; split into Velero hooks it would die with the pre hook's process (run it in the guest, or end it before the capture)",
                        recipe.display(),
                        exec.id
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The inverse ops still owed after `records` ran `plan`'s steps, oldest first: the executor's
/// compensation rule (an op's inverse is owed once the op succeeded, and settled when an op
/// of the inverse's name succeeds as a step).
fn owed_inverses(plan: &WorkflowPlan, records: &[StepRecord]) -> Vec<String> {
    let mut owed: Vec<Owed<String>> = Vec::new();
    for (step, record) in plan.steps.iter().zip(records) {
        if let PlannedStep::Exec(exec) = step
            && record.outcome == StepOutcome::Ok
        {
            owe_after_success(&mut owed, exec.id.clone(), exec);
        }
    }
    owed.into_iter().map(|o| o.key).collect()
}

/// The capture hook the step runner is built with; the phase runner takes the capture step
/// itself, so this is never called.
struct NoCapture;

#[async_trait]
impl CaptureHook for NoCapture {
    async fn capture(&self, _disks: &[String], _freeze: bool) -> Result<CaptureOutcome> {
        Err(EngineError::new(
            EngineErrorKind::Capture,
            "split into phases, the capture is the platform's",
        ))
    }
}

/// A handed-over background op, adopted.
struct Adopted {
    handed: HandedOver,
    handle: BackgroundProcess,
    /// How long it may take to exit once ended (the op's timeout, as in the executor).
    grace: Duration,
}

/// What crosses from the pre phase: the adopted ops and the owed inverse ops.
#[derive(Default)]
struct Carried {
    adopted: Vec<Adopted>,
    /// `(op, its inverse)`, oldest first.
    owed: Vec<Owed<String>>,
    /// Post-phase op → the adopted op it ends.
    enders: HashMap<String, String>,
    ended: Vec<AdoptedOp>,
}

/// What the pre phase's runner records while the executor runs.
#[derive(Default)]
struct PreRecord {
    frozen: Mutex<Option<FreezeOutcome>>,
    handed: Mutex<Vec<HandedOver>>,
    handover_errors: Mutex<Vec<String>>,
}

enum Mode<'m> {
    Pre(&'m PreRecord),
    Post(&'m tokio::sync::Mutex<Carried>),
}

/// The [`QemuStepRunner`] with the phase's differences: in the pre phase the capture is a
/// freeze left in place and background ops still running at the end are handed over instead
/// of ended; in the post phase a successful op settles what the pre phase left.
struct PhaseRunner<'e> {
    inner: &'e QemuStepRunner,
    vm: Arc<dyn Vm>,
    env: &'e PhaseEnv,
    mode: Mode<'e>,
}

impl PhaseRunner<'_> {
    fn vm_name(&self) -> String {
        self.vm.reference().to_string()
    }

    /// Post: after op `id` succeeded, its inverse is no longer owed, and the adopted op it
    /// `ends` is ended.
    async fn settle(&self, carried: &tokio::sync::Mutex<Carried>, id: &str) {
        let to_end = {
            let mut carried = carried.lock().await;
            settle_owed(&mut carried.owed, id);
            match carried.enders.get(id).cloned() {
                Some(target) => carried
                    .adopted
                    .iter()
                    .position(|a| a.handed.id == target)
                    .map(|at| carried.adopted.remove(at)),
                None => None,
            }
        };
        if let Some(adopted) = to_end {
            let ended = end_adopted(self.inner, &adopted, adopted.grace, format!("op {id}")).await;
            carried.lock().await.ended.push(ended);
        }
    }
}

impl StepRunner for PhaseRunner<'_> {
    type Background = BackgroundProcess;
    type Error = EngineError;

    async fn exec(&self, request: &ExecRequest) -> Result<ExecOutcome> {
        let outcome = self.inner.exec(request).await?;
        if let Mode::Post(carried) = self.mode
            && outcome.succeeded()
        {
            self.settle(carried, &request.id).await;
        }
        Ok(outcome)
    }

    async fn start_background(&self, request: &ExecRequest) -> Result<BackgroundProcess> {
        self.inner.start_background(request).await
    }

    async fn background_status(&self, handle: &BackgroundProcess) -> Result<BackgroundState> {
        self.inner.background_status(handle).await
    }

    async fn end_background(
        &self,
        handle: &BackgroundProcess,
        grace: Duration,
    ) -> Result<BackgroundEnd> {
        if let Mode::Pre(record) = self.mode
            && record.frozen.lock().expect("not poisoned").is_some()
        {
            // The workflow's end in the pre phase is the platform's snapshot, not the end of
            // the held sessions: leave them running for the post phase.
            match handle.hand_over().await {
                Ok(over) => {
                    tracing::info!(vm = %self.vm_name(), step = %over.id, pid = over.pid, "background op handed over to the post phase");
                    record.handed.lock().expect("not poisoned").push(over);
                    return Ok(BackgroundEnd {
                        outcome: ExecOutcome::default(),
                        killed: false,
                    });
                }
                Err(error) => record
                    .handover_errors
                    .lock()
                    .expect("not poisoned")
                    .push(error_chain(&error)),
            }
        }
        self.inner.end_background(handle, grace).await
    }

    async fn capture(&self, step: &CaptureStep) -> Result<CaptureOutcome> {
        let Mode::Pre(record) = self.mode else {
            return Err(EngineError::new(
                EngineErrorKind::Capture,
                format!(
                    "`{}`: the post phase has no capture step; it was the platform's",
                    step.id
                ),
            ));
        };
        let vm = self.vm_name();
        let outcome = freeze::freeze_vm(
            self.vm.as_ref(),
            &self.env.guard,
            Some(self.env.unfreeze_timeout),
            self.env.freeze_timeout,
        )
        .await
        .map_err(|error| {
            EngineError::new(
                EngineErrorKind::Capture,
                format!("VM `{vm}`: the freeze before the platform's snapshot failed"),
            )
            .with_source(error)
        })?;
        let refusal = match &outcome {
            FreezeOutcome::Frozen { .. } => {
                *record.frozen.lock().expect("not poisoned") = Some(outcome);
                return Ok(CaptureOutcome {
                    disks: Vec::new(),
                    freeze: None,
                });
            }
            FreezeOutcome::AlreadyFrozen => "it is already frozen by someone else (a `stillpoint freeze`, another hook); this phase does not stack on a freeze it did not make".to_owned(),
            FreezeOutcome::NoAgent { reason } => format!("it cannot be frozen: {reason}"),
            FreezeOutcome::NotRunning { detail } => format!("it is not running ({detail})"),
        };
        Err(EngineError::new(
            EngineErrorKind::Capture,
            format!("VM `{vm}`: {refusal}"),
        ))
    }

    async fn ensure_thawed(&self) -> Result<()> {
        self.inner.ensure_thawed().await
    }

    async fn check_objects(&self, check: &CheckStep) -> Result<Option<Vec<Json>>> {
        self.inner.check_objects(check).await
    }
}

/// How long an adopted op that no op ended may take to exit at the end (the executor's
/// default for background ops nobody ended).
fn end_of_workflow_grace() -> Duration {
    ExecOptions::default().background_grace
}

/// Ends an adopted op: waits up to `grace`, then TERM, then KILL (the runner's rules).
async fn end_adopted(
    runner: &QemuStepRunner,
    adopted: &Adopted,
    grace: Duration,
    by: String,
) -> AdoptedOp {
    let started = Instant::now();
    let backstop = ExecOptions::default().backstop;
    let result = tokio::time::timeout(
        grace + backstop,
        runner.end_background(&adopted.handle, grace),
    )
    .await;
    let (killed, exit_code, error) = match result {
        Ok(Ok(end)) => (end.killed, end.outcome.exit_code, None),
        Ok(Err(error)) => (false, None, Some(error_chain(&error))),
        Err(_) => (
            false,
            None,
            Some(format!(
                "not ended within {} s",
                (grace + backstop).as_secs()
            )),
        ),
    };
    AdoptedOp {
        id: adopted.handed.id.clone(),
        pid: adopted.handed.pid,
        ended: EndRecord {
            by,
            killed,
            exit_code,
            duration: started.elapsed(),
            error,
        },
    }
}

/// Runs owed inverse ops, newest first, as compensation steps.
async fn compensate(runner: &QemuStepRunner, owed: Vec<Owed<String>>) -> Vec<StepRecord> {
    let backstop = ExecOptions::default().backstop;
    let mut records = Vec::new();
    for Owed { key: op, inverse } in owed.into_iter().rev() {
        let started = Instant::now();
        let request = ExecRequest {
            id: inverse.id.clone(),
            target: inverse.target,
            container: inverse.container.clone(),
            argv: inverse.argv.clone(),
            env: inverse.env.clone(),
            stdin: inverse.stdin.clone(),
            timeout: inverse.timeout,
        };
        let result = tokio::time::timeout(inverse.timeout + backstop, runner.exec(&request)).await;
        let (outcome, exit_code, error) = match result {
            Ok(Ok(done)) if done.succeeded() => (StepOutcome::Ok, done.exit_code, None),
            Ok(Ok(done)) if done.timed_out => (
                StepOutcome::TimedOut,
                None,
                Some(format!(
                    "timed out after {} s and was killed",
                    inverse.timeout.as_secs()
                )),
            ),
            Ok(Ok(done)) => (
                StepOutcome::Failed,
                done.exit_code,
                Some(match done.exit_code {
                    Some(code) => format!("exited with code {code}"),
                    None => "was killed by a signal".to_owned(),
                }),
            ),
            Ok(Err(error)) => (StepOutcome::Failed, None, Some(error_chain(&error))),
            Err(_) => (
                StepOutcome::TimedOut,
                None,
                Some("the step runner did not return".to_owned()),
            ),
        };
        records.push(StepRecord {
            name: format!("{} (undo {op}, owed by the pre phase)", inverse.id),
            kind: StepKind::Compensation,
            target: Some(inverse.target),
            phase: StepPhase::Compensation,
            outcome,
            essential: inverse.essential,
            continued: false,
            duration: started.elapsed(),
            exit_code,
            output: None,
            error,
            attempts: None,
            disks: Vec::new(),
            freeze: None,
            thawed_by_executor: false,
            ended: None,
        });
    }
    records
}

fn runner_for(vm: &Arc<dyn Vm>) -> QemuStepRunner {
    QemuStepRunner::new(vm.clone(), Vec::new(), Arc::new(NoCapture))
}

/// The pre phase: runs the steps before the capture step, freezes the guest and leaves it
/// frozen (the guardian thaws after [`PhaseEnv::unfreeze_timeout`]), hands the background ops
/// still running over to the post phase through the state file. `Err` when nothing could be
/// run (the recipe does not split, a pre phase is already pending); a phase that ran and
/// failed is `Ok` with `succeeded: false`, having undone what it did.
pub async fn run_pre(vm: Arc<dyn Vm>, recipe: &RecipeInput, env: &PhaseEnv) -> Result<PhaseReport> {
    let name = vm.reference().to_string();
    let path = state_path(&env.runtime_root, &name);
    let split = Split::of(recipe)?;
    split.refuse_host_background(&recipe.path)?;
    if let Some(pending) = read_state(&path)? {
        return Err(EngineError::new(
            EngineErrorKind::Recipe,
            format!(
                "VM `{name}`: a pre phase (process {}) already froze the guest and waits for its post phase ({}); run `stillpoint recipe run {} --phase post --name {name}` first",
                pending.pre_pid,
                path.display(),
                pending.recipe.display()
            ),
        ));
    }
    let mut report = PhaseReport::new(&name, Phase::Pre, &recipe.path, path.clone());
    let plan = split.pre_plan();
    let inner = runner_for(&vm);
    let record = PreRecord::default();
    let runner = PhaseRunner {
        inner: &inner,
        vm: vm.clone(),
        env,
        mode: Mode::Pre(&record),
    };
    report.workflow = Executor::new(&runner, ExecOptions::default())
        .run(&plan)
        .await;
    report.freeze = record.frozen.into_inner().expect("not poisoned");
    report.handed_over = record.handed.into_inner().expect("not poisoned");
    let handover_errors = record.handover_errors.into_inner().expect("not poisoned");
    let Some(FreezeOutcome::Frozen {
        auto_thaw_at_ms, ..
    }) = report.freeze.clone()
    else {
        // Stopped before the freeze: the executor compensated and ended what it started.
        report.fail(format!(
            "the pre phase stopped at {}; what it did was undone",
            report
                .workflow
                .stopped_at
                .as_deref()
                .unwrap_or("a failed step")
        ));
        return Ok(report);
    };
    mark_frozen_capture(&mut report, auto_thaw_at_ms);
    let owed = owed_inverses(&plan, &report.workflow.steps);
    let state = PhaseState {
        version: STATE_VERSION,
        vm: name.clone(),
        recipe: recipe.path.clone(),
        workflow: recipe.workflow.clone(),
        steps: split.step_names(),
        pre_pid: std::process::id(),
        frozen_at_ms: crate::guardian::now_ms(),
        auto_thaw_at_ms,
        handed_over: report.handed_over.clone(),
        owed_inverse_of: owed.clone(),
    };
    let written = if handover_errors.is_empty() {
        write_state(&path, &state)
    } else {
        Err(EngineError::new(
            EngineErrorKind::Recipe,
            format!(
                "the pre phase could not hand its background ops over ({})",
                handover_errors.join("; ")
            ),
        ))
    };
    match written {
        Ok(()) => {
            report.succeeded = report.workflow.succeeded;
            if !report.workflow.application_steps_ok {
                report.degraded_because = Some(
                    "not every essential step before the capture succeeded (a step with `onError: continue` failed): the snapshot between the phases is only filesystem-consistent".to_owned(),
                );
            }
            Ok(report)
        }
        Err(error) => {
            // After the freeze: thaw, pay what is owed, end what was handed over.
            report.fail(error_chain(&error));
            undo_after_freeze(&vm, &inner, &split, env, &state, &mut report).await;
            Ok(report)
        }
    }
}

/// The pre phase's capture record says what really happened: frozen, and left so.
fn mark_frozen_capture(report: &mut PhaseReport, auto_thaw_at_ms: Option<u64>) {
    let handed: HashMap<&str, i64> = report
        .handed_over
        .iter()
        .map(|h| (h.id.as_str(), h.pid))
        .collect();
    for record in &mut report.workflow.steps {
        if record.kind == StepKind::Capture && record.outcome == StepOutcome::Ok {
            record.freeze = Some(FreezeTrace {
                frozen: true,
                thawed: false,
                frozen_for: None,
                error: None,
            });
            record.output = Some(match auto_thaw_at_ms {
                Some(at) => format!(
                    "frozen and left frozen for the platform's snapshot; the post phase thaws it, or the guardian in {} s",
                    at.saturating_sub(crate::guardian::now_ms()).div_ceil(1000)
                ),
                None => "frozen and left frozen for the platform's snapshot; only the post phase thaws it".to_owned(),
            });
        }
        if let (Some(pid), Some(ended)) = (handed.get(record.name.as_str()), &mut record.ended) {
            ended.by = format!("handed over to the post phase (guest pid {pid})");
        }
    }
}

/// A pre phase that failed after its freeze: thaw, run the owed inverse ops, end the handed-over
/// commands.
async fn undo_after_freeze(
    vm: &Arc<dyn Vm>,
    runner: &QemuStepRunner,
    split: &Split,
    env: &PhaseEnv,
    state: &PhaseState,
    report: &mut PhaseReport,
) {
    match freeze::unfreeze_vm(vm.as_ref(), &env.guard).await {
        Ok(outcome) => report.thaw = Some(outcome),
        Err(error) => report.fail(format!("the thaw failed: {}", error_chain(&error))),
    }
    let carried = carry(runner, split, state, report);
    let owed = carried.owed;
    report.compensation = compensate(runner, owed).await;
    for adopted in carried.adopted {
        let ended = end_adopted(
            runner,
            &adopted,
            end_of_workflow_grace(),
            "the pre phase undoing itself".to_owned(),
        )
        .await;
        report.adopted.push(ended);
    }
}

/// Adopts the handed-over ops of `state` and finds the owed inverse ops in the plan. What
/// cannot be found is reported on `report` (and not run).
fn carry(
    runner: &QemuStepRunner,
    split: &Split,
    state: &PhaseState,
    report: &mut PhaseReport,
) -> Carried {
    let mut carried = Carried::default();
    for handed in &state.handed_over {
        let grace = split
            .op(&handed.id)
            .map(|op| op.timeout)
            .unwrap_or_else(end_of_workflow_grace);
        match runner.adopt(handed) {
            Ok(handle) => carried.adopted.push(Adopted {
                handed: handed.clone(),
                handle,
                grace,
            }),
            Err(error) => report.fail(format!(
                "cannot adopt `{}` (guest pid {}): {}",
                handed.id,
                handed.pid,
                error_chain(&error)
            )),
        }
    }
    for op in &state.owed_inverse_of {
        match split.op(op).and_then(|exec| exec.inverse.as_deref()) {
            Some(inverse) => carried.owed.push(Owed {
                key: op.clone(),
                inverse: inverse.clone(),
            }),
            None => report.fail(format!(
                "the recipe no longer has op `{op}` or its inverse op, which the pre phase left owed"
            )),
        }
    }
    carried
}

/// The post phase: thaws the guest (first, always), adopts the background ops the pre phase
/// handed over, runs the steps after the capture step, then ends what still runs and removes
/// the state file. Always returns a report; `succeeded` says whether all of it went right.
pub async fn run_post(vm: Arc<dyn Vm>, recipe: &RecipeInput, env: &PhaseEnv) -> PhaseReport {
    let name = vm.reference().to_string();
    let path = state_path(&env.runtime_root, &name);
    let mut report = PhaseReport::new(&name, Phase::Post, &recipe.path, path.clone());

    match freeze::unfreeze_vm(vm.as_ref(), &env.guard).await {
        Ok(outcome) => {
            if outcome == UnfreezeOutcome::WasNotFrozen {
                report.degraded_because = Some(
                    "the guest was no longer frozen when the post phase began (the guardian thaws at the unfreeze timeout, or someone else thawed it): the platform's snapshot may have been taken unfrozen".to_owned(),
                );
            }
            let usable = matches!(
                outcome,
                UnfreezeOutcome::Thawed { .. } | UnfreezeOutcome::WasNotFrozen
            );
            let stopped = matches!(outcome, UnfreezeOutcome::NotRunning { .. });
            report.thaw = Some(outcome);
            if !usable {
                if stopped {
                    // Its guest processes are gone with it: nothing is left to hand over.
                    remove_state(&path, &mut report);
                }
                report.fail(format!(
                    "VM `{name}` cannot run the recipe's steps after the capture (see the thaw outcome){}",
                    if stopped { "" } else { "; the state file is kept for another try" }
                ));
                return report;
            }
        }
        Err(error) => {
            report.fail(format!(
                "the thaw failed, so no step can run (the guardian keeps its timer; the state file is kept): {}",
                error_chain(&error)
            ));
            return report;
        }
    }

    let state = match read_state(&path) {
        Ok(Some(state)) => state,
        Ok(None) => {
            report.fail(format!(
                "no pre phase is recorded for VM `{name}` ({}): nothing to hand over; the guest is thawed",
                path.display()
            ));
            return report;
        }
        Err(error) => {
            report.fail(error_chain(&error));
            return report;
        }
    };
    let runner = runner_for(&vm);
    let split = match Split::of(recipe) {
        Ok(split) if split.step_names() == state.steps => split,
        planned => {
            let why = match planned {
                Ok(_) => format!(
                    "recipe {} no longer plans the steps the pre phase ran ({})",
                    recipe.path.display(),
                    state.steps.join(", ")
                ),
                Err(error) => error_chain(&error),
            };
            report.fail(format!(
                "{why}; the handed-over commands are ended without the post steps"
            ));
            end_handed_over_blindly(&runner, &state, &mut report).await;
            remove_state(&path, &mut report);
            return report;
        }
    };

    let mut carried = carry(&runner, &split, &state, &mut report);
    let plan = split.post_plan();
    for step in &plan.steps {
        if let PlannedStep::Exec(exec) = step
            && let Some(target) = &exec.ends
            && carried.adopted.iter().any(|a| &a.handed.id == target)
        {
            carried.enders.insert(exec.id.clone(), target.clone());
        }
    }
    let carried = tokio::sync::Mutex::new(carried);
    let phase_runner = PhaseRunner {
        inner: &runner,
        vm: vm.clone(),
        env,
        mode: Mode::Post(&carried),
    };
    report.workflow = Executor::new(&phase_runner, ExecOptions::default())
        .run(&plan)
        .await;
    let carried = carried.into_inner();
    report.adopted = carried.ended;
    if report.workflow.stopped_at.is_some() {
        report.compensation = compensate(&runner, carried.owed).await;
    }
    for adopted in carried.adopted {
        let ended = end_adopted(
            &runner,
            &adopted,
            end_of_workflow_grace(),
            "end of workflow".to_owned(),
        )
        .await;
        report.adopted.push(ended);
    }
    remove_state(&path, &mut report);

    let ends_ok = report.adopted.iter().all(|a| a.ended.error.is_none());
    let compensation_ok = report
        .compensation
        .iter()
        .all(|r| r.outcome == StepOutcome::Ok);
    if !report.workflow.succeeded {
        report.fail(format!(
            "the post phase stopped at {}",
            report
                .workflow
                .stopped_at
                .as_deref()
                .unwrap_or("a failed step")
        ));
    } else if report.error.is_none() && ends_ok && compensation_ok {
        report.succeeded = true;
    }
    if !ends_ok {
        report.fail("a handed-over command could not be ended (see `adopted`)");
    }
    report
}

/// The recipe changed under a pending pre phase: its step names cannot be trusted, so the
/// handed-over commands are ended (grace: the end-of-workflow default) and nothing else runs.
async fn end_handed_over_blindly(
    runner: &QemuStepRunner,
    state: &PhaseState,
    report: &mut PhaseReport,
) {
    for handed in &state.handed_over {
        match runner.adopt(handed) {
            Ok(handle) => {
                let adopted = Adopted {
                    handed: handed.clone(),
                    handle,
                    grace: end_of_workflow_grace(),
                };
                let ended = end_adopted(
                    runner,
                    &adopted,
                    adopted.grace,
                    "the recipe changed between the phases".to_owned(),
                )
                .await;
                report.adopted.push(ended);
            }
            Err(error) => report.fail(error_chain(&error)),
        }
    }
}

fn remove_state(path: &Path, report: &mut PhaseReport) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => report.fail(format!(
            "cannot remove the recipe phase state {}: {error}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_recipe::{ValidateOptions, check_source};

    fn recipe(yaml: &str) -> RecipeInput {
        let (recipe, diagnostics) = check_source(yaml, &ValidateOptions::default());
        RecipeInput {
            path: PathBuf::from("test.yaml"),
            recipe: recipe.unwrap_or_else(|| panic!("invalid test recipe: {diagnostics:#?}")),
            workflow: WORKFLOW.to_owned(),
        }
    }

    const LOCK: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata: {name: lock}
spec:
  groups:
  - {name: disks, type: volume}
  hooks:
  - name: db
    type: exec
    ops:
    - {name: hold, background: true, timeout: 7, inverseOp: release, command: [sleep, "60"]}
    - {name: release, ends: hold, command: ["true"]}
    - {name: flush, inverseOp: unflush, command: ["true"]}
    - {name: unflush, command: ["true"]}
  workflows:
  - name: backup
    sequence:
    - hook: db/hold
    - hook: db/flush
    - group: disks
    - hook: db/release
"#;

    #[test]
    fn the_plan_splits_at_the_capture_and_the_pre_half_leaves_the_freeze_to_the_runner() {
        let split = Split::of(&recipe(LOCK)).unwrap();
        assert_eq!(split.capture, 2);
        let pre = split.pre_plan();
        let names: Vec<&str> = pre.steps.iter().map(|s| s.id()).collect();
        assert_eq!(names, ["db/hold", "db/flush", "group:disks"]);
        match pre.steps.last() {
            Some(PlannedStep::Capture(step)) => assert!(!step.freeze),
            other => panic!("the pre plan ends with the capture: {other:?}"),
        }
        let post = split.post_plan();
        let names: Vec<&str> = post.steps.iter().map(|s| s.id()).collect();
        assert_eq!(names, ["db/release"]);
        assert_eq!(split.op("db/hold").map(|op| op.timeout.as_secs()), Some(7));
    }

    fn record(name: &str, outcome: StepOutcome) -> StepRecord {
        StepRecord {
            name: name.to_owned(),
            kind: StepKind::Exec,
            target: Some(Target::Guest),
            phase: StepPhase::BeforeCapture,
            outcome,
            essential: true,
            continued: false,
            duration: Duration::ZERO,
            exit_code: Some(0),
            output: None,
            error: None,
            attempts: None,
            disks: Vec::new(),
            freeze: None,
            thawed_by_executor: false,
            ended: None,
        }
    }

    #[test]
    fn inverses_are_owed_for_ops_that_succeeded_until_an_op_of_that_name_succeeds() {
        let split = Split::of(&recipe(LOCK)).unwrap();
        let pre = split.pre_plan();
        let ok = [
            record("db/hold", StepOutcome::Ok),
            record("db/flush", StepOutcome::Ok),
        ];
        assert_eq!(owed_inverses(&pre, &ok), ["db/hold", "db/flush"]);
        let failed = [
            record("db/hold", StepOutcome::Ok),
            record("db/flush", StepOutcome::Failed),
        ];
        assert_eq!(owed_inverses(&pre, &failed), ["db/hold"]);

        // An op that is another's inverse settles it when it succeeds as a step.
        let settling = recipe(&LOCK.replace(
            "    - hook: db/flush\n    - group: disks\n    - hook: db/release",
            "    - hook: db/flush\n    - hook: db/release\n    - group: disks",
        ));
        let split = Split::of(&settling).unwrap();
        let pre = split.pre_plan();
        let records = [
            record("db/hold", StepOutcome::Ok),
            record("db/flush", StepOutcome::Ok),
            record("db/release", StepOutcome::Ok),
        ];
        assert_eq!(owed_inverses(&pre, &records), ["db/flush"]);
    }

    #[test]
    fn a_host_background_op_across_the_capture_is_refused_before_anything_runs() {
        let host = recipe(&LOCK.replace(
            "  - name: db\n    type: exec\n",
            "  - name: db\n    type: exec\n    target: host\n",
        ));
        let error = Split::of(&host)
            .unwrap()
            .refuse_host_background(Path::new("host.yaml"))
            .unwrap_err();
        assert_eq!(error.kind(), EngineErrorKind::Recipe);
        assert!(
            error.to_string().starts_with(
                "recipe host.yaml: background op `db/hold` runs on the host across the capture"
            ),
            "{error}"
        );
        // Ended before the capture: nothing crosses.
        let ended_early = recipe(
            &LOCK
                .replace(
                    "  - name: db\n    type: exec\n",
                    "  - name: db\n    type: exec\n    target: host\n",
                )
                .replace(
                    "    - hook: db/flush\n    - group: disks\n    - hook: db/release",
                    "    - hook: db/release\n    - group: disks\n    - hook: db/flush",
                ),
        );
        Split::of(&ended_early)
            .unwrap()
            .refuse_host_background(Path::new("host.yaml"))
            .expect("nothing runs on the host across the capture");
    }

    #[test]
    fn a_resource_only_workflow_splits_after_its_last_step() {
        // No volume group: the plan captures every disk after the last step, so the pre
        // phase runs every step and the post phase has none left.
        let no_capture = LOCK.replace("    - group: disks\n", "");
        let input = recipe(&no_capture);
        let split = Split::of(&input).expect("the added capture splits the workflow");
        assert_eq!(split.capture + 1, split.plan.steps.len());
        assert!(split.post_plan().steps.is_empty());
    }

    #[test]
    fn state_files_round_trip_and_bad_ones_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "kubevirt:ns/vm 1");
        assert_eq!(
            path,
            dir.path().join("recipe-runs/kubevirt%3Ans%2Fvm%201.json")
        );
        assert_eq!(read_state(&path).unwrap(), None);
        let state = PhaseState {
            version: STATE_VERSION,
            vm: "vm".into(),
            recipe: "r.yaml".into(),
            workflow: WORKFLOW.into(),
            steps: vec!["db/hold".into(), "group:disks".into()],
            pre_pid: 42,
            frozen_at_ms: 1,
            auto_thaw_at_ms: Some(2),
            handed_over: vec![HandedOver {
                id: "db/hold".into(),
                pid: 321,
                grouped: true,
            }],
            owed_inverse_of: vec!["db/hold".into()],
        };
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(state));

        std::fs::write(&path, b"{not json").unwrap();
        let error = read_state(&path).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the recipe phase state is malformed ("),
            "{error}"
        );
        assert!(
            error.to_string().contains("kubevirt%3Ans%2Fvm%201.json"),
            "{error}"
        );
        std::fs::write(&path, br#"{"version": 9}"#).unwrap();
        assert!(read_state(&path).is_err());
    }
}
