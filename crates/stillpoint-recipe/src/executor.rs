//! Runs a [`WorkflowPlan`] over a [`StepRunner`] — the trait the engine implements for a
//! platform (guest-exec through the agent, host commands, the capture). The semantics live here
//! and are unit-tested with a scripted runner; the runner only does I/O.
//!
//! Semantics (DESIGN.md "Recipes"):
//! - Steps run in order. A step fails when its command exits non-zero, times out, or the runner
//!   errs. With `onError: continue` the failure is recorded and the workflow goes on; with
//!   `fail` the workflow's `failOn` decides: `any-error` stops, `essential-error` stops when the
//!   step is essential, `full-error` never stops.
//! - When the workflow stops, the remaining steps are recorded as skipped and the `inverseOp` of
//!   every op that had succeeded (and was not already undone by a later step) runs, in reverse
//!   order: compensation. Background ops still running are then ended (graceful wait, then
//!   kill) — on success too, at the end.
//! - A check polls: it runs its command every `interval` and evaluates its condition until the
//!   condition holds or its timeout passes.
//! - The capture step is one runner call (freeze → capture start → thaw), so no guest command
//!   can run while frozen. Just before it, every background op is polled: one that already
//!   exited no longer holds what it was started to hold, so it counts as failed. If the capture
//!   errs, times out, or reports a freeze without a thaw, the executor calls
//!   [`StepRunner::ensure_thawed`] and records that it did.
//! - Timeouts are enforced by the runner, which kills a timed-out command in the guest and says
//!   so (`timed_out`); the executor adds a backstop so a hung runner cannot hang the workflow.

use std::future::Future;
use std::time::Duration;
use stillpoint_os::error_chain;

use serde::Serialize;
use serde_json::{Value as Json, json};
use tokio::time::Instant;

use crate::model::{FailOn, OnError, Target};
use crate::plan::{CaptureStep, CheckStep, ExecStep, PlannedStep, WorkflowPlan};

/// One command to run on the guest or the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExecRequest {
    /// `hook/op` or `hook/check`, for logs.
    pub id: String,
    pub target: Target,
    pub container: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<String>,
    /// The runner must stop (kill) the command when this passes and report `timed_out`.
    pub timeout: Duration,
}

/// What a finished command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExecOutcome {
    /// `None` when killed by a signal or by the timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The timeout passed and the runner killed the command.
    pub timed_out: bool,
}

impl ExecOutcome {
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// The document a check's condition is evaluated against.
    pub fn check_document(&self) -> Json {
        let stdout = self.stdout.trim();
        json!({
            "exitCode": self.exit_code,
            "stdout": stdout,
            "stderr": self.stderr.trim(),
            "json": serde_json::from_str::<Json>(stdout).unwrap_or(Json::Null),
        })
    }
}

/// A background op's state when polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackgroundState {
    Running,
    Exited(ExecOutcome),
}

/// How a background op ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackgroundEnd {
    pub outcome: ExecOutcome,
    /// It did not exit within the grace period and was killed.
    pub killed: bool,
}

/// What the capture did: the disks captured and, when a freeze was asked for, what happened to
/// it. The thaw is part of the capture; reporting it makes "thaw always" visible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CaptureOutcome {
    pub disks: Vec<String>,
    pub freeze: Option<FreezeTrace>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreezeTrace {
    /// The freeze succeeded (the capture start happened frozen).
    pub frozen: bool,
    /// The guest was thawed afterwards.
    pub thawed: bool,
    /// How long the guest stayed frozen.
    #[serde(rename = "frozen_ms", serialize_with = "opt_millis")]
    pub frozen_for: Option<Duration>,
    /// Why the freeze or thaw failed.
    pub error: Option<String>,
}

/// The I/O a workflow needs, implemented by the engine for each platform.
pub trait StepRunner: Sync {
    /// A running background command (e.g. the guest PID of a held `sqlite3` session).
    type Background: Send + Sync;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs a command to completion (or kills it at its timeout and says so).
    fn exec(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<ExecOutcome, Self::Error>> + Send;

    /// Starts a command and returns at once, leaving it running.
    fn start_background(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<Self::Background, Self::Error>> + Send;

    /// Whether a background command still runs.
    fn background_status(
        &self,
        handle: &Self::Background,
    ) -> impl Future<Output = Result<BackgroundState, Self::Error>> + Send;

    /// Waits up to `grace` for the command to exit, then kills it.
    fn end_background(
        &self,
        handle: &Self::Background,
        grace: Duration,
    ) -> impl Future<Output = Result<BackgroundEnd, Self::Error>> + Send;

    /// Freeze (when `step.freeze`), start the point-in-time capture of the selected disks, thaw.
    fn capture(
        &self,
        step: &CaptureStep,
    ) -> impl Future<Output = Result<CaptureOutcome, Self::Error>> + Send;

    /// Thaws the guest if it is frozen (idempotent). Called when a capture did not prove a thaw.
    fn ensure_thawed(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The objects a check without a command is evaluated against (KubeVirt). `Ok(None)`: this
    /// platform cannot; the check fails with a clear message.
    fn check_objects(
        &self,
        _check: &CheckStep,
    ) -> impl Future<Output = Result<Option<Vec<Json>>, Self::Error>> + Send {
        async { Ok(None) }
    }
}

/// Executor settings that are not part of the recipe.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// How long a background op that no op ended is given to exit at the end before it is killed.
    pub background_grace: Duration,
    /// Extra time the runner gets beyond a step's own timeout before the executor gives up on it.
    pub backstop: Duration,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            background_grace: Duration::from_secs(5),
            backstop: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Ok,
    Failed,
    TimedOut,
    Skipped,
    /// It succeeded, and its `inverseOp` later undid it because the workflow stopped.
    Compensated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    Exec,
    Background,
    Check,
    Capture,
    Compensation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    BeforeCapture,
    Capture,
    AfterCapture,
    Compensation,
}

/// How a background op ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndRecord {
    /// `op HOOK/OP`, `end of workflow`, or `exited on its own`.
    pub by: String,
    pub killed: bool,
    pub exit_code: Option<i32>,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    pub error: Option<String>,
}

/// One step as it ran: what the backup report and the manifest record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    pub name: String,
    pub kind: StepKind,
    pub target: Option<Target>,
    pub phase: Phase,
    pub outcome: StepOutcome,
    pub essential: bool,
    /// The step failed but its `onError: continue` let the workflow go on.
    pub continued: bool,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    pub exit_code: Option<i32>,
    /// A short excerpt of stdout/stderr.
    pub output: Option<String>,
    pub error: Option<String>,
    /// Checks: how many times the condition was evaluated.
    pub attempts: Option<u32>,
    /// Capture: the disks captured and the freeze/thaw trace.
    pub disks: Vec<String>,
    pub freeze: Option<FreezeTrace>,
    /// Capture: the executor had to thaw because the capture did not prove a thaw.
    pub thawed_by_executor: bool,
    /// Background ops: how they ended.
    pub ended: Option<EndRecord>,
}

impl StepRecord {
    fn new(
        name: &str,
        kind: StepKind,
        target: Option<Target>,
        phase: Phase,
        essential: bool,
    ) -> Self {
        StepRecord {
            name: name.to_owned(),
            kind,
            target,
            phase,
            outcome: StepOutcome::Ok,
            essential,
            continued: false,
            duration: Duration::ZERO,
            exit_code: None,
            output: None,
            error: None,
            attempts: None,
            disks: Vec::new(),
            freeze: None,
            thawed_by_executor: false,
            ended: None,
        }
    }

    fn ok(&self) -> bool {
        self.outcome == StepOutcome::Ok
    }
}

/// The result of a workflow run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkflowReport {
    pub workflow: String,
    /// Every step ran and succeeded (failures with `onError: continue` excepted).
    pub succeeded: bool,
    /// The step whose failure stopped the workflow.
    pub stopped_at: Option<String>,
    /// The capture ran and succeeded.
    pub captured: bool,
    /// Every essential step before the capture succeeded, every background op still held at
    /// the capture, and the capture succeeded (frozen, when a freeze was asked for): what
    /// `application` consistency requires.
    pub application_steps_ok: bool,
    pub steps: Vec<StepRecord>,
    /// What the plan changed from the workflow as written (steps skipped on a VM, volume
    /// groups captured together, a capture added), carried over from [`WorkflowPlan::notes`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<crate::plan::PlanNote>,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
}

impl WorkflowReport {
    pub fn step(&self, name: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// Runs workflows over a runner.
pub struct Executor<'r, R: StepRunner> {
    runner: &'r R,
    options: ExecOptions,
}

struct Running<H> {
    id: String,
    handle: H,
    record: usize,
    grace: Duration,
}

/// An inverse op owed because the op `key` stands for succeeded.
#[derive(Debug, Clone)]
pub struct Owed<K> {
    pub key: K,
    pub inverse: ExecStep,
}

/// The compensation rule, one home for the executor and for runs split over two processes
/// (the engine's `recipe run --phase pre|post`): once op `op` succeeded as a step, every owed
/// inverse of its name is settled (running an undo as a normal step settles the ops it
/// undoes), and `op`'s own inverse, if it has one, is owed from then on under `key`. Owed
/// inverses run newest first when a workflow stops.
pub fn owe_after_success<K>(owed: &mut Vec<Owed<K>>, key: K, op: &ExecStep) {
    settle_owed(owed, &op.id);
    if let Some(inverse) = &op.inverse {
        owed.push(Owed {
            key,
            inverse: (**inverse).clone(),
        });
    }
}

/// The half of [`owe_after_success`] for an op whose own inverse is tracked elsewhere: the
/// owed inverses named `op_id` are settled by its success.
pub fn settle_owed<K>(owed: &mut Vec<Owed<K>>, op_id: &str) {
    owed.retain(|o| o.inverse.id != op_id);
}

type Compensation = Owed<usize>;

impl<'r, R: StepRunner> Executor<'r, R> {
    pub fn new(runner: &'r R, options: ExecOptions) -> Self {
        Executor { runner, options }
    }

    pub async fn run(&self, plan: &WorkflowPlan) -> WorkflowReport {
        let started = Instant::now();
        let capture_index = plan.capture_index();
        let mut records: Vec<StepRecord> = Vec::new();
        let mut background: Vec<Running<R::Background>> = Vec::new();
        let mut compensation: Vec<Compensation> = Vec::new();
        let mut stopped_at: Option<String> = None;
        let mut succeeded = true;
        let mut captured = false;
        let mut application_steps_ok = false;

        for (index, step) in plan.steps.iter().enumerate() {
            let phase = match capture_index {
                Some(c) if index < c => Phase::BeforeCapture,
                Some(c) if index == c => Phase::Capture,
                Some(_) => Phase::AfterCapture,
                None => Phase::BeforeCapture,
            };
            if stopped_at.is_some() {
                records.push(skipped(step, phase));
                continue;
            }
            if let PlannedStep::Capture(capture) = step {
                // A background op that already exited no longer holds its lock.
                for running in &background {
                    if let Some(failure) = self.lost_before_capture(running).await {
                        // Not running any more: nothing to undo, nothing to end.
                        compensation.retain(|c| c.key != running.record);
                        let record = &mut records[running.record];
                        record.outcome = StepOutcome::Failed;
                        record.error = Some(failure.0);
                        record.exit_code = failure.1;
                        record.ended = Some(EndRecord {
                            by: "exited on its own before the capture".to_owned(),
                            killed: false,
                            exit_code: failure.1,
                            duration: Duration::ZERO,
                            error: None,
                        });
                        if stopped_at.is_none()
                            && self.stops(plan.fail_on, record.essential, OnError::Fail)
                        {
                            stopped_at = Some(record.name.clone());
                        }
                    }
                }
                background.retain(|r| records[r.record].ok());
                if stopped_at.is_some() {
                    succeeded = false;
                    records.push(skipped(step, phase));
                    continue;
                }
                let record = self.capture(capture).await;
                captured = record.ok();
                // A capture asked to freeze that reports no freeze (a platform that degraded to
                // an unfrozen capture) is not application-consistent, however it succeeded.
                let froze_as_asked =
                    !capture.freeze || record.freeze.as_ref().is_some_and(|f| f.frozen);
                application_steps_ok = captured
                    && froze_as_asked
                    && records
                        .iter()
                        .filter(|r| r.phase == Phase::BeforeCapture && r.essential)
                        .all(StepRecord::ok);
                let failed = !record.ok();
                let name = record.name.clone();
                records.push(record);
                if failed {
                    succeeded = false;
                    if self.stops(plan.fail_on, capture.essential, OnError::Fail) {
                        stopped_at = Some(name);
                    }
                }
                continue;
            }
            let (record, on_error) = match step {
                PlannedStep::Exec(exec) if exec.background => {
                    let (record, handle) = self.start_background(exec, phase).await;
                    if let Some(handle) = handle {
                        background.push(Running {
                            id: exec.id.clone(),
                            handle,
                            record: records.len(),
                            grace: exec.timeout,
                        });
                    }
                    (record, exec.on_error)
                }
                PlannedStep::Exec(exec) => {
                    (self.exec(exec, StepKind::Exec, phase).await, exec.on_error)
                }
                PlannedStep::Check(check) => (self.check(check, phase).await, check.on_error),
                // Handled above.
                PlannedStep::Capture(_) => continue,
            };
            let index_of_record = records.len();
            let ok = record.ok();
            let essential = record.essential;
            let name = record.name.clone();
            records.push(record);
            if let PlannedStep::Exec(exec) = step
                && ok
            {
                // Running an undo as a normal step settles the ops it undoes.
                owe_after_success(&mut compensation, index_of_record, exec);
                if let Some(ended) = &exec.ends
                    && let Some(position) = background.iter().position(|r| &r.id == ended)
                {
                    let running = background.remove(position);
                    let end = self
                        .end_background(&running, running.grace, format!("op {}", exec.id))
                        .await;
                    records[running.record].ended = Some(end);
                }
            }
            if !ok {
                if on_error == OnError::Continue {
                    // Still recorded as failed, so `application_steps_ok` sees it.
                    records[index_of_record].continued = true;
                    continue;
                }
                succeeded = false;
                if self.stops(plan.fail_on, essential, on_error) {
                    stopped_at = Some(name);
                }
            }
        }

        if stopped_at.is_some() {
            succeeded = false;
            while let Some(undo) = compensation.pop() {
                let mut record = self
                    .exec(&undo.inverse, StepKind::Compensation, Phase::Compensation)
                    .await;
                record.name = format!("{} (undo {})", undo.inverse.id, records[undo.key].name);
                if record.ok() {
                    records[undo.key].outcome = StepOutcome::Compensated;
                }
                records.push(record);
            }
        }
        // Background ops nobody ended: end them now, newest first.
        while let Some(running) = background.pop() {
            let end = self
                .end_background(
                    &running,
                    self.options.background_grace,
                    "end of workflow".to_owned(),
                )
                .await;
            records[running.record].ended = Some(end);
        }
        if capture_index.is_none() {
            application_steps_ok = false;
        }
        if records
            .iter()
            .any(|r| !r.ok() && !r.continued && r.outcome != StepOutcome::Compensated)
        {
            succeeded = false;
        }
        WorkflowReport {
            workflow: plan.workflow.clone(),
            succeeded,
            stopped_at,
            captured,
            application_steps_ok,
            steps: records,
            notes: plan.notes.clone(),
            duration: started.elapsed(),
        }
    }

    fn stops(&self, fail_on: FailOn, essential: bool, on_error: OnError) -> bool {
        on_error == OnError::Fail
            && match fail_on {
                FailOn::AnyError => true,
                FailOn::EssentialError => essential,
                FailOn::FullError => false,
            }
    }

    async fn exec(&self, step: &ExecStep, kind: StepKind, phase: Phase) -> StepRecord {
        let mut record = StepRecord::new(&step.id, kind, Some(step.target), phase, step.essential);
        let started = Instant::now();
        let request = exec_request(step);
        let budget = step.timeout + self.options.backstop;
        match tokio::time::timeout(budget, self.runner.exec(&request)).await {
            Ok(Ok(outcome)) => apply_outcome(&mut record, &outcome, step.timeout),
            Ok(Err(error)) => {
                record.outcome = StepOutcome::Failed;
                record.error = Some(error_chain(&error));
            }
            Err(_) => {
                record.outcome = StepOutcome::TimedOut;
                record.error = Some(format!(
                    "the step runner did not return within {} (timeout {} plus {} grace); the command may still be running",
                    secs(budget),
                    secs(step.timeout),
                    secs(self.options.backstop)
                ));
            }
        }
        record.duration = started.elapsed();
        tracing::info!(step = %record.name, outcome = ?record.outcome, duration_ms = record.duration.as_millis() as u64, "recipe step");
        record
    }

    async fn start_background(
        &self,
        step: &ExecStep,
        phase: Phase,
    ) -> (StepRecord, Option<R::Background>) {
        let mut record = StepRecord::new(
            &step.id,
            StepKind::Background,
            Some(step.target),
            phase,
            step.essential,
        );
        let started = Instant::now();
        let request = exec_request(step);
        let handle = match tokio::time::timeout(
            self.options.backstop,
            self.runner.start_background(&request),
        )
        .await
        {
            Ok(Ok(handle)) => Some(handle),
            Ok(Err(error)) => {
                record.outcome = StepOutcome::Failed;
                record.error = Some(format!(
                    "could not start the background command: {}",
                    error_chain(&error)
                ));
                None
            }
            Err(_) => {
                record.outcome = StepOutcome::TimedOut;
                record.error = Some(format!(
                    "starting the background command took longer than {}",
                    secs(self.options.backstop)
                ));
                None
            }
        };
        record.duration = started.elapsed();
        (record, handle)
    }

    /// `Some((why, exit code))` when a background op is no longer running before the capture.
    async fn lost_before_capture(
        &self,
        running: &Running<R::Background>,
    ) -> Option<(String, Option<i32>)> {
        match tokio::time::timeout(
            self.options.backstop,
            self.runner.background_status(&running.handle),
        )
        .await
        {
            Ok(Ok(BackgroundState::Running)) => None,
            Ok(Ok(BackgroundState::Exited(outcome))) => Some((
                format!(
                    "background op `{}` exited before the capture (exit code {}), so what it held was released{}",
                    running.id,
                    outcome
                        .exit_code
                        .map_or("none".to_owned(), |c| c.to_string()),
                    excerpt(&outcome)
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                outcome.exit_code,
            )),
            Ok(Err(error)) => Some((
                format!(
                    "could not tell whether background op `{}` still runs: {}",
                    running.id,
                    error_chain(&error)
                ),
                None,
            )),
            Err(_) => Some((
                format!(
                    "could not tell whether background op `{}` still runs: no answer within {}",
                    running.id,
                    secs(self.options.backstop)
                ),
                None,
            )),
        }
    }

    async fn end_background(
        &self,
        running: &Running<R::Background>,
        grace: Duration,
        by: String,
    ) -> EndRecord {
        let started = Instant::now();
        let result = tokio::time::timeout(
            grace + self.options.backstop,
            self.runner.end_background(&running.handle, grace),
        )
        .await;
        let (killed, exit_code, error) = match result {
            Ok(Ok(end)) => (end.killed, end.outcome.exit_code, None),
            Ok(Err(error)) => (false, None, Some(error_chain(&error))),
            Err(_) => (
                false,
                None,
                Some(format!(
                    "the runner did not end it within {}",
                    secs(grace + self.options.backstop)
                )),
            ),
        };
        EndRecord {
            by,
            killed,
            exit_code,
            duration: started.elapsed(),
            error,
        }
    }

    async fn check(&self, check: &CheckStep, phase: Phase) -> StepRecord {
        let mut record = StepRecord::new(
            &check.id,
            StepKind::Check,
            Some(check.target),
            phase,
            check.essential,
        );
        let started = Instant::now();
        let deadline = started + check.timeout;
        let mut attempts = 0u32;
        let last = loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let documents: Result<Vec<Json>, String> = match &check.argv {
                Some(argv) => {
                    let request = ExecRequest {
                        id: check.id.clone(),
                        target: check.target,
                        container: check.container.clone(),
                        argv: argv.clone(),
                        env: Vec::new(),
                        stdin: None,
                        timeout: remaining.max(Duration::from_secs(1)),
                    };
                    match tokio::time::timeout(
                        request.timeout + self.options.backstop,
                        self.runner.exec(&request),
                    )
                    .await
                    {
                        Ok(Ok(outcome)) => {
                            record.exit_code = outcome.exit_code;
                            record.output = excerpt(&outcome);
                            Ok(vec![outcome.check_document()])
                        }
                        Ok(Err(error)) => Err(error_chain(&error)),
                        Err(_) => Err("the step runner did not return".to_owned()),
                    }
                }
                None => match self.runner.check_objects(check).await {
                    Ok(Some(objects)) if objects.is_empty() => {
                        Err("no object matched the hook's selector yet".to_owned())
                    }
                    Ok(Some(objects)) => Ok(objects),
                    Ok(None) => {
                        record.outcome = StepOutcome::Failed;
                        record.error = Some("this platform evaluates checks only against a command's result; the check has no `command`".to_owned());
                        record.attempts = Some(attempts);
                        record.duration = started.elapsed();
                        return record;
                    }
                    Err(error) => Err(error_chain(&error)),
                },
            };
            let verdict = documents.and_then(|docs| {
                docs.iter().try_fold(true, |all, doc| {
                    check.condition.evaluate(doc).map(|holds| all && holds)
                })
            });
            match verdict {
                Ok(true) => {
                    record.attempts = Some(attempts);
                    record.duration = started.elapsed();
                    record.error = None;
                    return record;
                }
                Ok(false) if Instant::now() + check.interval >= deadline => {
                    break format!("condition `{}` did not hold", check.condition.source);
                }
                Err(reason) if Instant::now() + check.interval >= deadline => break reason,
                Ok(false) | Err(_) => {}
            }
            tokio::time::sleep(check.interval).await;
        };
        record.outcome = StepOutcome::TimedOut;
        record.attempts = Some(attempts);
        record.error = Some(format!(
            "condition `{}` did not hold within {} ({attempts} attempt(s)); last: {}",
            check.condition.source,
            secs(check.timeout),
            last
        ));
        record.duration = started.elapsed();
        record
    }

    async fn capture(&self, step: &CaptureStep) -> StepRecord {
        let mut record = StepRecord::new(
            &step.id,
            StepKind::Capture,
            None,
            Phase::Capture,
            step.essential,
        );
        let started = Instant::now();
        let mut thaw_unproven = step.freeze;
        match tokio::time::timeout(step.timeout, self.runner.capture(step)).await {
            Ok(Ok(outcome)) => {
                record.disks = outcome.disks.clone();
                if let Some(freeze) = &outcome.freeze {
                    thaw_unproven = freeze.frozen && !freeze.thawed;
                } else {
                    thaw_unproven = false;
                }
                record.freeze = outcome.freeze;
            }
            Ok(Err(error)) => {
                record.outcome = StepOutcome::Failed;
                record.error = Some(format!("the capture failed: {}", error_chain(&error)));
            }
            Err(_) => {
                record.outcome = StepOutcome::TimedOut;
                record.error = Some(format!(
                    "the capture did not finish within {}",
                    secs(step.timeout)
                ));
            }
        }
        if thaw_unproven {
            // Thaw always: the runner did not prove it thawed, so make sure.
            record.thawed_by_executor = true;
            match tokio::time::timeout(self.options.backstop, self.runner.ensure_thawed()).await {
                Ok(Ok(())) => {
                    if let Some(freeze) = &mut record.freeze {
                        freeze.thawed = true;
                    }
                }
                Ok(Err(error)) => {
                    record.outcome = StepOutcome::Failed;
                    append_error(
                        &mut record,
                        format!("thawing the guest failed: {}", error_chain(&error)),
                    );
                }
                Err(_) => {
                    record.outcome = StepOutcome::Failed;
                    append_error(
                        &mut record,
                        format!(
                            "thawing the guest did not finish within {}",
                            secs(self.options.backstop)
                        ),
                    );
                }
            }
        }
        record.duration = started.elapsed();
        tracing::info!(step = %record.name, outcome = ?record.outcome, "recipe capture");
        record
    }
}

fn skipped(step: &PlannedStep, phase: Phase) -> StepRecord {
    let (kind, target) = match step {
        PlannedStep::Exec(e) if e.background => (StepKind::Background, Some(e.target)),
        PlannedStep::Exec(e) => (StepKind::Exec, Some(e.target)),
        PlannedStep::Check(c) => (StepKind::Check, Some(c.target)),
        PlannedStep::Capture(_) => (StepKind::Capture, None),
    };
    let mut record = StepRecord::new(step.id(), kind, target, phase, step.essential());
    record.outcome = StepOutcome::Skipped;
    record
}

fn exec_request(step: &ExecStep) -> ExecRequest {
    ExecRequest {
        id: step.id.clone(),
        target: step.target,
        container: step.container.clone(),
        argv: step.argv.clone(),
        env: step.env.clone(),
        stdin: step.stdin.clone(),
        timeout: step.timeout,
    }
}

fn apply_outcome(record: &mut StepRecord, outcome: &ExecOutcome, timeout: Duration) {
    record.exit_code = outcome.exit_code;
    record.output = excerpt(outcome);
    if outcome.timed_out {
        record.outcome = StepOutcome::TimedOut;
        record.error = Some(format!("timed out after {} and was killed", secs(timeout)));
    } else if outcome.exit_code != Some(0) {
        record.outcome = StepOutcome::Failed;
        record.error = Some(match outcome.exit_code {
            Some(code) => format!("exited with code {code}"),
            None => "was killed by a signal".to_owned(),
        });
    }
}

fn append_error(record: &mut StepRecord, message: String) {
    record.error = Some(match record.error.take() {
        Some(previous) => format!("{previous}; {message}"),
        None => message,
    });
}

const EXCERPT_CHARS: usize = 300;

fn excerpt(outcome: &ExecOutcome) -> Option<String> {
    let cut = |text: &str| -> String {
        let text = text.trim();
        if text.chars().count() <= EXCERPT_CHARS {
            text.to_owned()
        } else {
            let tail: String = text
                .chars()
                .rev()
                .take(EXCERPT_CHARS)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("…{tail}")
        }
    };
    let parts: Vec<String> = [("stdout", &outcome.stdout), ("stderr", &outcome.stderr)]
        .into_iter()
        .filter(|(_, text)| !text.trim().is_empty())
        .map(|(name, text)| format!("{name}: {}", cut(text)))
        .collect();
    (!parts.is_empty()).then(|| parts.join(" | "))
}

fn secs(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

fn millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn opt_millis<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(d) => millis(d, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;

#[cfg(test)]
mod compensation_rule_tests {
    use super::*;
    use crate::model::{OnError, Target};

    fn op(id: &str, inverse: Option<&str>) -> ExecStep {
        ExecStep {
            id: id.into(),
            target: Target::Guest,
            container: None,
            argv: vec!["true".into()],
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(1),
            on_error: OnError::Fail,
            essential: true,
            background: false,
            ends: None,
            inverse: inverse.map(|i| Box::new(op(i, None))),
        }
    }

    #[test]
    fn an_inverse_is_owed_after_its_op_succeeded_until_an_op_of_its_name_succeeds() {
        let mut owed: Vec<Owed<&'static str>> = Vec::new();
        owe_after_success(&mut owed, "lock", &op("db/lock", Some("db/unlock")));
        owe_after_success(&mut owed, "flush", &op("db/flush", Some("db/unflush")));
        owe_after_success(&mut owed, "plain", &op("db/plain", None));
        fn keys(owed: &[Owed<&'static str>]) -> Vec<&'static str> {
            owed.iter().map(|o| o.key).collect()
        }
        assert_eq!(
            keys(&owed),
            ["lock", "flush"],
            "oldest first; no inverse, nothing owed"
        );
        // Running the undo as a step settles it.
        owe_after_success(&mut owed, "unlock", &op("db/unlock", None));
        assert_eq!(keys(&owed), ["flush"]);
        settle_owed(&mut owed, "db/unflush");
        assert!(owed.is_empty());
    }
}
