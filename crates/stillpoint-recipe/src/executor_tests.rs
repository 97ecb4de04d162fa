//! Unit tests of the executor's semantics with a scripted runner: pure logic, no VM. The runner
//! plays back outcomes per step id and logs every call, so each test asserts what was run, in
//! which order, and what the report says.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::plan::{PlanOptions, plan_workflow};
use crate::validate::{ValidateOptions, check_source};

#[derive(Debug)]
struct ScriptError(String);

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

#[derive(Clone)]
enum Scripted {
    Exit(i32, &'static str),
    TimedOut,
    RunnerError(&'static str),
    Hang,
}

#[derive(Default)]
struct ScriptedRunner {
    exec: Mutex<HashMap<String, VecDeque<Scripted>>>,
    exited_background: Mutex<HashSet<String>>,
    capture: Mutex<Option<Result<CaptureOutcome, String>>>,
    log: Mutex<Vec<String>>,
}

impl ScriptedRunner {
    fn script(self, id: &str, outcomes: Vec<Scripted>) -> Self {
        self.exec
            .lock()
            .unwrap()
            .insert(id.to_owned(), outcomes.into());
        self
    }

    fn background_exits(self, id: &str) -> Self {
        self.exited_background.lock().unwrap().insert(id.to_owned());
        self
    }

    fn capture_result(self, result: Result<CaptureOutcome, String>) -> Self {
        *self.capture.lock().unwrap() = Some(result);
        self
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn note(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
}

impl StepRunner for ScriptedRunner {
    type Background = String;
    type Error = ScriptError;

    async fn exec(&self, request: &ExecRequest) -> Result<ExecOutcome, ScriptError> {
        self.note(format!(
            "exec {} {}s",
            request.id,
            request.timeout.as_secs()
        ));
        let next = self
            .exec
            .lock()
            .unwrap()
            .get_mut(&request.id)
            .and_then(VecDeque::pop_front);
        match next.unwrap_or(Scripted::Exit(0, "")) {
            Scripted::Exit(code, stdout) => Ok(ExecOutcome {
                exit_code: Some(code),
                stdout: stdout.into(),
                stderr: String::new(),
                timed_out: false,
            }),
            Scripted::TimedOut => Ok(ExecOutcome {
                exit_code: None,
                timed_out: true,
                ..Default::default()
            }),
            Scripted::RunnerError(message) => Err(ScriptError(message.into())),
            Scripted::Hang => std::future::pending().await,
        }
    }

    async fn start_background(&self, request: &ExecRequest) -> Result<String, ScriptError> {
        self.note(format!("start {}", request.id));
        Ok(request.id.clone())
    }

    async fn background_status(&self, handle: &String) -> Result<BackgroundState, ScriptError> {
        self.note(format!("status {handle}"));
        if self.exited_background.lock().unwrap().contains(handle) {
            Ok(BackgroundState::Exited(ExecOutcome {
                exit_code: Some(5),
                stderr: "database is locked".into(),
                ..Default::default()
            }))
        } else {
            Ok(BackgroundState::Running)
        }
    }

    async fn end_background(
        &self,
        handle: &String,
        grace: Duration,
    ) -> Result<BackgroundEnd, ScriptError> {
        self.note(format!("end {handle} {}s", grace.as_secs()));
        Ok(BackgroundEnd {
            outcome: ExecOutcome {
                exit_code: Some(0),
                ..Default::default()
            },
            killed: false,
        })
    }

    async fn capture(&self, step: &CaptureStep) -> Result<CaptureOutcome, ScriptError> {
        self.note(format!("capture {} freeze={}", step.id, step.freeze));
        match self.capture.lock().unwrap().clone() {
            Some(Ok(outcome)) => Ok(outcome),
            Some(Err(message)) => Err(ScriptError(message)),
            None => Ok(CaptureOutcome {
                disks: vec!["vda".into()],
                freeze: step.freeze.then(|| FreezeTrace {
                    frozen: true,
                    thawed: true,
                    frozen_for: Some(Duration::from_millis(50)),
                    error: None,
                }),
            }),
        }
    }

    async fn ensure_thawed(&self) -> Result<(), ScriptError> {
        self.note("ensure_thawed".into());
        Ok(())
    }
}

const HEADER: &str = "apiVersion: ramendr.openshift.io/v1alpha1\nkind: Recipe\nmetadata: {name: t}\nspec:\n  groups: [{name: disks, type: volume}]\n";

/// A plan from the `hooks:` and `workflows:` part of a recipe (validated first).
fn plan(body: &str) -> WorkflowPlan {
    let source = format!("{HEADER}{body}");
    let (recipe, diagnostics) = check_source(&source, &ValidateOptions::default());
    let recipe =
        recipe.unwrap_or_else(|| panic!("test recipe invalid: {diagnostics:#?}\n{source}"));
    plan_workflow(&recipe, "backup", &PlanOptions::default()).unwrap()
}

async fn run(plan: &WorkflowPlan, runner: &ScriptedRunner) -> WorkflowReport {
    Executor::new(runner, ExecOptions::default())
        .run(plan)
        .await
}

fn outcomes(report: &WorkflowReport) -> Vec<(String, StepOutcome)> {
    report
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.outcome))
        .collect()
}

const LOCK_RECIPE: &str = "  hooks:
  - name: db
    type: exec
    ops:
    - {name: flush, command: [sync]}
    - {name: lock, command: [lock], inverseOp: unlock}
    - {name: unlock, command: [unlock]}
    - {name: note, command: [note], inverseOp: unnote}
    - {name: unnote, command: [unnote]}
  workflows:
  - name: backup
    sequence:
    - hook: db/flush
    - hook: db/note
    - hook: db/lock
    - group: disks
    - hook: db/unlock
";

#[tokio::test]
async fn steps_run_in_sequence_and_the_capture_freezes() {
    let runner = ScriptedRunner::default();
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    assert_eq!(
        runner.log(),
        [
            "exec db/flush 30s",
            "exec db/note 30s",
            "exec db/lock 30s",
            "capture group:disks freeze=true",
            "exec db/unlock 30s"
        ]
    );
    assert!(
        report.succeeded && report.captured && report.application_steps_ok,
        "{report:#?}"
    );
    let capture = report.step("group:disks").unwrap();
    assert_eq!(capture.phase, Phase::Capture);
    assert_eq!(
        capture.freeze.as_ref().map(|f| (f.frozen, f.thawed)),
        Some((true, true))
    );
    assert_eq!(report.step("db/unlock").unwrap().phase, Phase::AfterCapture);
}

#[tokio::test]
async fn a_resource_only_workflow_runs_its_steps_then_captures_every_disk_and_says_so() {
    let runner = ScriptedRunner::default();
    let plan = plan(
        "  hooks:\n  - name: db\n    type: exec\n    ops:\n    - {name: flush, command: [sync]}\n  \
         workflows:\n  - name: backup\n    sequence:\n    - hook: db/flush\n",
    );
    let report = run(&plan, &runner).await;
    assert_eq!(
        runner.log(),
        [
            "exec db/flush 30s",
            "capture capture:every-disk freeze=true"
        ]
    );
    assert!(
        report.captured && report.application_steps_ok,
        "{report:#?}"
    );
    // The report carries what the plan did differently from the workflow as written.
    assert_eq!(report.notes, plan.notes);
    assert_eq!(report.notes.len(), 1);
    assert!(report.notes[0].message.contains("after its last step"));
}

#[tokio::test]
async fn timeout_precedence_is_op_then_hook_then_30_seconds() {
    let plan = plan(
        "  hooks:
  - name: a
    type: exec
    timeout: 7
    ops:
    - {name: own, command: [x], timeout: 5}
    - {name: inherited, command: [x]}
  - name: b
    type: exec
    ops:
    - {name: default, command: [x]}
  workflows:
  - name: backup
    sequence: [{hook: a/own}, {hook: a/inherited}, {hook: b/default}, {group: disks}]
",
    );
    let runner = ScriptedRunner::default();
    run(&plan, &runner).await;
    assert_eq!(
        runner.log()[..3],
        ["exec a/own 5s", "exec a/inherited 7s", "exec b/default 30s"]
    );
}

#[tokio::test]
async fn on_error_continue_records_the_failure_and_goes_on_but_denies_application_level() {
    let plan = plan(
        "  hooks:
  - name: db
    type: exec
    onError: continue
    ops:
    - {name: flush, command: [sync]}
  workflows:
  - name: backup
    sequence: [{hook: db/flush}, {group: disks}]
",
    );
    let runner = ScriptedRunner::default().script("db/flush", vec![Scripted::Exit(1, "no")]);
    let report = run(&plan, &runner).await;
    let flush = report.step("db/flush").unwrap();
    assert_eq!(
        (flush.outcome, flush.continued, flush.exit_code),
        (StepOutcome::Failed, true, Some(1))
    );
    assert!(report.captured);
    assert!(report.stopped_at.is_none());
    assert!(
        !report.application_steps_ok,
        "an essential step before the capture failed"
    );
}

#[tokio::test]
async fn any_error_stops_skips_the_rest_and_compensates_in_reverse_order() {
    let runner = ScriptedRunner::default()
        .script("db/lock", vec![Scripted::Exit(0, "")])
        .capture_result(Err("no space for the scratch image".into()));
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    assert_eq!(
        runner.log(),
        [
            "exec db/flush 30s",
            "exec db/note 30s",
            "exec db/lock 30s",
            "capture group:disks freeze=true",
            "ensure_thawed",
            "exec db/unlock 30s",
            "exec db/unnote 30s",
        ],
        "unlock (inverse of the later op) runs before unnote"
    );
    assert_eq!(report.stopped_at.as_deref(), Some("group:disks"));
    assert_eq!(
        outcomes(&report),
        [
            ("db/flush".into(), StepOutcome::Ok),
            ("db/note".into(), StepOutcome::Compensated),
            ("db/lock".into(), StepOutcome::Compensated),
            ("group:disks".into(), StepOutcome::Failed),
            ("db/unlock".into(), StepOutcome::Skipped),
            ("db/unlock (undo db/lock)".into(), StepOutcome::Ok),
            ("db/unnote (undo db/note)".into(), StepOutcome::Ok),
        ]
    );
    let capture = report.step("group:disks").unwrap();
    assert!(
        capture.thawed_by_executor,
        "a failed capture is followed by a thaw"
    );
    assert!(
        capture
            .error
            .as_deref()
            .unwrap()
            .contains("no space for the scratch image")
    );
    assert!(!report.succeeded && !report.captured && !report.application_steps_ok);
}

#[tokio::test]
async fn an_undo_already_run_as_a_step_is_not_repeated_by_compensation() {
    let plan = plan(
        "  hooks:
  - name: db
    type: exec
    ops:
    - {name: lock, command: [lock], inverseOp: unlock}
    - {name: unlock, command: [unlock]}
    - {name: after, command: [after]}
  workflows:
  - name: backup
    sequence: [{hook: db/lock}, {group: disks}, {hook: db/unlock}, {hook: db/after}]
",
    );
    let runner = ScriptedRunner::default().script("db/after", vec![Scripted::Exit(2, "")]);
    let report = run(&plan, &runner).await;
    assert_eq!(
        runner.log().iter().filter(|l| l.contains("unlock")).count(),
        1,
        "{:?}",
        runner.log()
    );
    assert_eq!(report.stopped_at.as_deref(), Some("db/after"));
    assert!(
        report.application_steps_ok,
        "everything before the capture held"
    );
    assert!(!report.succeeded);
}

#[tokio::test]
async fn essential_error_stops_only_on_essential_steps_and_essential_defaults_to_true() {
    let body = |essential: &str| {
        format!(
            "  hooks:
  - name: opt
    type: exec
    essential: false
    ops: [{{name: a, command: [a]}}]
  - name: req
    type: exec{essential}
    ops: [{{name: b, command: [b]}}]
  workflows:
  - name: backup
    failOn: essential-error
    sequence: [{{hook: opt/a}}, {{hook: req/b}}, {{group: disks}}]
"
        )
    };
    // Non-essential failure: recorded, not stopping.
    let runner = ScriptedRunner::default().script("opt/a", vec![Scripted::Exit(1, "")]);
    let report = run(&plan(&body("")), &runner).await;
    assert!(report.stopped_at.is_none() && report.captured);
    assert!(
        report.application_steps_ok,
        "non-essential failures do not count against the level"
    );
    // `req` has no `essential`: it defaults to true, so its failure stops the workflow.
    let runner = ScriptedRunner::default().script("req/b", vec![Scripted::Exit(1, "")]);
    let report = run(&plan(&body("")), &runner).await;
    assert_eq!(report.stopped_at.as_deref(), Some("req/b"));
    assert_eq!(
        report.step("group:disks").unwrap().outcome,
        StepOutcome::Skipped
    );
}

#[tokio::test]
async fn full_error_never_stops() {
    let plan = plan(
        "  hooks:
  - name: db
    type: exec
    ops: [{name: a, command: [a]}, {name: b, command: [b]}]
  workflows:
  - name: backup
    failOn: full-error
    sequence: [{hook: db/a}, {group: disks}, {hook: db/b}]
",
    );
    let runner = ScriptedRunner::default().script("db/a", vec![Scripted::Exit(1, "")]);
    let report = run(&plan, &runner).await;
    assert!(report.stopped_at.is_none());
    assert_eq!(runner.log().len(), 3, "{:?}", runner.log());
    assert!(!report.succeeded && report.captured && !report.application_steps_ok);
}

const BACKGROUND_RECIPE: &str = "  hooks:
  - name: db
    type: exec
    ops:
    - {name: hold, command: [hold], background: true, timeout: 9, inverseOp: release}
    - {name: release, command: [release], ends: hold}
    - {name: other, command: [other], background: true}
  - name: verify
    type: check
    chks:
    - {name: locked, command: [probe], condition: '{$.exitCode} != 0', timeout: 5}
  workflows:
  - name: backup
    sequence: [{hook: db/hold}, {hook: db/other}, {hook: verify/locked}, {group: disks}, {hook: db/release}]
";

#[tokio::test(start_paused = true)]
async fn background_ops_are_ended_by_their_op_or_at_the_end() {
    let runner = ScriptedRunner::default().script(
        "verify/locked",
        vec![Scripted::Exit(5, "database is locked")],
    );
    let report = run(&plan(BACKGROUND_RECIPE), &runner).await;
    assert_eq!(
        runner.log(),
        [
            "start db/hold",
            "start db/other",
            "exec verify/locked 5s",
            "status db/hold",
            "status db/other",
            "capture group:disks freeze=true",
            "exec db/release 30s",
            "end db/hold 9s",
            "end db/other 5s",
        ]
    );
    assert!(report.application_steps_ok, "{report:#?}");
    assert_eq!(
        report.step("db/hold").unwrap().ended.as_ref().unwrap().by,
        "op db/release"
    );
    assert_eq!(
        report.step("db/other").unwrap().ended.as_ref().unwrap().by,
        "end of workflow"
    );
}

#[tokio::test]
async fn a_background_op_that_exited_before_the_capture_fails_and_stops_the_workflow() {
    let runner = ScriptedRunner::default()
        .script("verify/locked", vec![Scripted::Exit(5, "")])
        .background_exits("db/hold");
    tokio::time::pause();
    let report = run(&plan(BACKGROUND_RECIPE), &runner).await;
    let hold = report.step("db/hold").unwrap();
    assert_eq!(hold.outcome, StepOutcome::Failed);
    assert!(
        hold.error
            .as_deref()
            .unwrap()
            .contains("exited before the capture"),
        "{:?}",
        hold.error
    );
    assert_eq!(
        report.step("group:disks").unwrap().outcome,
        StepOutcome::Skipped
    );
    assert!(
        !runner.log().iter().any(|l| l.starts_with("capture")),
        "no capture without the lock"
    );
    assert!(
        runner.log().contains(&"end db/other 5s".to_owned()),
        "the other session is still ended"
    );
    assert!(
        !runner.log().contains(&"exec db/release 30s".to_owned()),
        "nothing to release: it already exited"
    );
    assert_eq!(
        hold.ended.as_ref().unwrap().by,
        "exited on its own before the capture"
    );
    assert!(!report.application_steps_ok);
}

#[tokio::test]
async fn background_ops_are_ended_when_a_later_step_fails() {
    let runner = ScriptedRunner::default().script("verify/locked", vec![Scripted::Exit(0, "")]);
    // exit 0 means the probe could write: the lock does not hold, the check never passes.
    tokio::time::pause();
    let report = run(&plan(BACKGROUND_RECIPE), &runner).await;
    assert_eq!(report.stopped_at.as_deref(), Some("verify/locked"));
    let log = runner.log();
    let release = log
        .iter()
        .position(|l| l == "exec db/release 30s")
        .expect("compensation releases the lock");
    let end_hold = log
        .iter()
        .position(|l| l == "end db/hold 5s")
        .expect("the held session is ended");
    assert!(release < end_hold, "{log:?}");
    assert!(log.contains(&"end db/other 5s".to_owned()));
    assert_eq!(
        report.step("db/hold").unwrap().outcome,
        StepOutcome::Compensated
    );
}

const POLL_RECIPE: &str = "  hooks:
  - name: verify
    type: check
    chks:
    - {name: ready, command: [probe], condition: '{$.json.ready} == true', timeout: 10, interval: 2}
  workflows:
  - name: backup
    sequence: [{hook: verify/ready}, {group: disks}]
";

#[tokio::test(start_paused = true)]
async fn checks_poll_until_the_condition_holds() {
    let runner = ScriptedRunner::default().script(
        "verify/ready",
        vec![
            Scripted::Exit(0, r#"{"ready": false}"#),
            Scripted::Exit(0, "not json"),
            Scripted::Exit(0, r#"{"ready": true}"#),
        ],
    );
    let report = run(&plan(POLL_RECIPE), &runner).await;
    let check = report.step("verify/ready").unwrap();
    assert_eq!((check.outcome, check.attempts), (StepOutcome::Ok, Some(3)));
    assert!(report.captured);
}

#[tokio::test(start_paused = true)]
async fn a_check_that_never_holds_times_out_and_stops_the_workflow() {
    let runner = ScriptedRunner::default().script(
        "verify/ready",
        vec![Scripted::Exit(0, r#"{"ready": false}"#); 100],
    );
    let report = run(&plan(POLL_RECIPE), &runner).await;
    let check = report.step("verify/ready").unwrap();
    assert_eq!(check.outcome, StepOutcome::TimedOut);
    // 10 s timeout, 2 s interval: evaluated at 0, 2, 4, 6 s; at 8 s the next wait would pass the deadline.
    assert_eq!(check.attempts, Some(5));
    assert!(
        check
            .error
            .as_deref()
            .unwrap()
            .contains("did not hold within 10s"),
        "{:?}",
        check.error
    );
    assert_eq!(report.stopped_at.as_deref(), Some("verify/ready"));
    assert!(!runner.log().iter().any(|l| l.starts_with("capture")));
}

#[tokio::test]
async fn a_timed_out_op_is_reported_as_timed_out() {
    let runner = ScriptedRunner::default().script("db/flush", vec![Scripted::TimedOut]);
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    let flush = report.step("db/flush").unwrap();
    assert_eq!(flush.outcome, StepOutcome::TimedOut);
    assert_eq!(
        flush.error.as_deref(),
        Some("timed out after 30s and was killed")
    );
    assert_eq!(report.stopped_at.as_deref(), Some("db/flush"));
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_never_returns_hits_the_backstop() {
    let runner = ScriptedRunner::default().script("db/flush", vec![Scripted::Hang]);
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    let flush = report.step("db/flush").unwrap();
    assert_eq!(flush.outcome, StepOutcome::TimedOut);
    assert!(
        flush
            .error
            .as_deref()
            .unwrap()
            .contains("may still be running"),
        "{:?}",
        flush.error
    );
}

#[tokio::test]
async fn runner_errors_fail_the_step_with_their_message() {
    let runner = ScriptedRunner::default().script(
        "db/flush",
        vec![Scripted::RunnerError("guest agent not connected")],
    );
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    assert_eq!(
        report.step("db/flush").unwrap().error.as_deref(),
        Some("guest agent not connected")
    );
}

#[tokio::test]
async fn a_capture_that_reports_a_freeze_without_a_thaw_is_thawed_by_the_executor() {
    let runner = ScriptedRunner::default().capture_result(Ok(CaptureOutcome {
        disks: vec!["vda".into()],
        freeze: Some(FreezeTrace {
            frozen: true,
            thawed: false,
            frozen_for: None,
            error: Some("thaw timed out".into()),
        }),
    }));
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    assert!(runner.log().contains(&"ensure_thawed".to_owned()));
    let capture = report.step("group:disks").unwrap();
    assert!(capture.thawed_by_executor);
    assert_eq!(capture.freeze.as_ref().map(|f| f.thawed), Some(true));
}

#[tokio::test]
async fn a_capture_that_did_not_freeze_as_asked_is_not_application_consistent() {
    for freeze in [
        None,
        Some(FreezeTrace {
            frozen: false,
            thawed: false,
            frozen_for: None,
            error: Some("guest-fsfreeze-freeze is disabled".into()),
        }),
    ] {
        let runner = ScriptedRunner::default().capture_result(Ok(CaptureOutcome {
            disks: vec!["vda".into()],
            freeze,
        }));
        let report = run(&plan(LOCK_RECIPE), &runner).await;
        assert!(report.captured, "the capture itself succeeded");
        assert!(
            !report.application_steps_ok,
            "an unfrozen capture is never application-consistent"
        );
    }
}

#[tokio::test]
async fn the_report_serializes_with_durations_in_milliseconds() {
    let runner = ScriptedRunner::default();
    let report = run(&plan(LOCK_RECIPE), &runner).await;
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["steps"][3]["kind"], "capture");
    assert_eq!(json["steps"][3]["freeze"]["frozen_ms"], 50);
    assert!(json["steps"][0]["duration_ms"].is_u64());
    assert_eq!(json["steps"][0]["outcome"], "ok");
    assert_eq!(json["application_steps_ok"], true);
}
