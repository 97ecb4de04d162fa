//! Recipes run against a real guest (QEMU TCG, the real qemu-ga, busybox, sqlite3) through
//! `QemuStepRunner` and the recipe executor: the SQLite demo recipe holds a real write lock
//! across a real guarded freeze, failures compensate in the guest, timed-out commands are
//! killed in the guest, a failed capture leaves the guest thawed and unlocked, host ops run
//! as local processes. A VM that cannot boot fails the test.
#![cfg(feature = "vm-tests")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_engine::freeze::GuardContext;
use stillpoint_engine::freeze::GuardedFreeze;
use stillpoint_engine::guardian::{self, GuardianCommand};
use stillpoint_engine::recipe_runner::{CaptureHook, QemuStepRunner};
use stillpoint_engine::{EngineError, EngineErrorKind};
use stillpoint_platform::qemu::{QemuInventory, QemuVm};
use stillpoint_platform::{GuestAgent, Vm};
use stillpoint_qga::{ExecRequest, ExecStatus, FreezeStatus};
use stillpoint_recipe::{
    CaptureOutcome, DiskInfo, ExecOptions, Executor, PlanOptions, StepOutcome, StepRunner,
    ValidateOptions, WorkflowPlan, WorkflowReport, check_source, load_recipe, plan_workflow,
};
use stillpoint_testvm::{LaunchedVm, VmConfig, wait_until};

const DB: &str = "/data/app.db";

/// The application: a writer that inserts two rows per transaction, waiting (up to 60 s) for
/// the write lock rather than failing, as an application behind a held lock would.
const WORKLOAD: &str = "i=0; while :; do i=$((i+1)); \
    sqlite3 /data/app.db '.timeout 60000' \"BEGIN IMMEDIATE; INSERT INTO rows(v) VALUES($i); INSERT INTO rows(v) VALUES($i); COMMIT;\" \
    || echo \"workload: insert $i failed\" >&2; sleep 0.05; done";

/// A second writer with a 1 s busy timeout: the workload's transactions last milliseconds,
/// so being refused for a whole second means a lock is *held*.
const PROBE_INSERT: &str =
    "sqlite3 -bail /data/app.db '.timeout 1000' 'INSERT INTO rows(v) VALUES(-1);'";

struct Guest {
    launched: LaunchedVm,
    vm: Arc<dyn Vm>,
    runtime_root: PathBuf,
}

impl Guest {
    async fn boot(name: &str) -> Guest {
        let launched = LaunchedVm::boot_for_test(VmConfig::new(name))
            .await
            .unwrap_or_else(|error| panic!("the test VM must boot: {error}"));
        let runtime_root = launched.runtime_root().to_path_buf();
        let spec = QemuInventory::new(Vec::new(), runtime_root.clone())
            .find(name)
            .expect("the launched VM is in the inventory");
        let vm: Arc<dyn Vm> = Arc::new(QemuVm::new(spec, stillpoint_qga::Timeouts::default()));
        Guest {
            launched,
            vm,
            runtime_root,
        }
    }

    fn agent(&self) -> Arc<dyn GuestAgent> {
        self.vm.agent().expect("the test VM has an agent")
    }

    /// Runs a shell line in the guest (the test's own inspection, not a recipe step).
    async fn sh(&self, script: &str) -> ExecStatus {
        self.agent()
            .run(
                &ExecRequest::new("sh", ["-c", script]),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|error| panic!("guest `{script}`: {error}"))
    }

    async fn sh_ok(&self, script: &str) -> String {
        let status = self.sh(script).await;
        assert!(
            status.success(),
            "guest `{script}` failed: {status:?} {}",
            status.stderr_text()
        );
        status.stdout_text()
    }

    fn disks(&self) -> Vec<DiskInfo> {
        self.launched
            .disks()
            .iter()
            .map(|d| DiskInfo {
                name: d.device_id.clone(),
                labels: Default::default(),
            })
            .collect()
    }

    fn guard(&self) -> GuardContext {
        GuardContext {
            runtime_root: self.runtime_root.clone(),
            config: None,
            guardian: GuardianCommand {
                program: PathBuf::from(env!("CARGO_BIN_EXE_stillpoint-engine-test-guardian")),
                args: Vec::new(),
            },
        }
    }

    fn freeze_only(&self) -> FreezeOnlyCapture {
        FreezeOnlyCapture {
            vm: self.vm.clone(),
            guard: self.guard(),
        }
    }

    async fn freeze_status(&self) -> FreezeStatus {
        self.agent().freeze_status().await.expect("fsfreeze-status")
    }

    /// User processes (kernel threads and the `ps` itself left out), by PID.
    async fn processes(&self) -> BTreeMap<u32, String> {
        let listing = self
            .agent()
            .run(
                &ExecRequest::new("ps", ["-o", "pid,args"]),
                Duration::from_secs(30),
            )
            .await
            .expect("ps");
        listing
            .stdout_text()
            .lines()
            .skip(1)
            .filter_map(|line| {
                let (pid, args) = line.trim().split_once(' ')?;
                let args = args.trim();
                (!args.starts_with('[') && args != "ps -o pid,args")
                    .then(|| Some((pid.parse().ok()?, args.to_owned())))
                    .flatten()
            })
            .collect()
    }

    async fn create_db(&self) {
        self.sh_ok(&format!(
            "sqlite3 {DB} 'CREATE TABLE IF NOT EXISTS rows(id INTEGER PRIMARY KEY, v INTEGER)'"
        ))
        .await;
    }

    async fn rows(&self) -> u64 {
        self.sh_ok(&format!(
            "sqlite3 {DB} '.timeout 5000' 'SELECT count(*) FROM rows'"
        ))
        .await
        .trim()
        .parse()
        .expect("a row count")
    }

    /// Starts the workload in a process group of its own (so the test can end all of it) and
    /// waits until it writes.
    async fn start_workload(&self) -> Workload {
        let pid = self
            .agent()
            .exec_start(&ExecRequest::new("setsid", ["sh", "-c", WORKLOAD]))
            .await
            .expect("the workload starts");
        let before = self.rows().await;
        assert!(
            wait_until(Duration::from_secs(60), || async {
                self.rows().await >= before + 6
            })
            .await,
            "the workload does not write"
        );
        Workload { pid }
    }

    /// Whether a second writer gets through; `Err` with its error text when refused.
    async fn probe_insert(&self) -> Result<(), String> {
        let status = self.sh(PROBE_INSERT).await;
        if status.success() {
            Ok(())
        } else {
            Err(status.stderr_text())
        }
    }

    async fn stop_workload(&self, workload: Workload) {
        self.sh_ok(&format!("kill -KILL -{}", workload.pid)).await;
        let agent = self.agent();
        assert!(
            wait_until(Duration::from_secs(20), || async {
                agent
                    .exec_status(workload.pid)
                    .await
                    .is_ok_and(|s| s.exited)
            })
            .await,
            "the workload did not end"
        );
    }
}

/// The tests' capture hook: the guarded freeze (lease + guardian) and thaw around no capture
/// at all — these tests look at the recipe's steps around the capture, not at disks.
struct FreezeOnlyCapture {
    vm: Arc<dyn Vm>,
    guard: GuardContext,
}

#[async_trait]
impl CaptureHook for FreezeOnlyCapture {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome, EngineError> {
        if !freeze {
            return Ok(CaptureOutcome {
                disks: disks.to_vec(),
                freeze: None,
            });
        }
        let agent = self.vm.agent().expect("the test VM has an agent");
        let frozen = GuardedFreeze::freeze(
            self.vm.as_ref(),
            agent,
            &self.guard,
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
        .await?;
        let (window, thawed) = frozen.thaw().await;
        Ok(CaptureOutcome {
            disks: disks.to_vec(),
            freeze: Some(stillpoint_recipe::FreezeTrace {
                frozen: true,
                thawed: thawed.is_ok(),
                frozen_for: Some(Duration::from_secs_f64(window.frozen_ms / 1000.0)),
                error: thawed.err().map(|e| e.to_string()),
            }),
        })
    }
}

struct Workload {
    pid: i64,
}

fn demo_recipe_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes/sqlite-demo.yaml")
}

fn backup_plan_from_file(path: &Path) -> WorkflowPlan {
    let valid = load_recipe(path, &ValidateOptions::default())
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    plan_workflow(&valid.recipe, "backup", &PlanOptions::default()).expect("a backup plan")
}

fn backup_plan(yaml: &str) -> WorkflowPlan {
    let (recipe, diagnostics) = check_source(yaml, &ValidateOptions::default());
    let recipe = recipe.unwrap_or_else(|| panic!("invalid test recipe: {diagnostics:#?}"));
    plan_workflow(&recipe, "backup", &PlanOptions::default()).expect("a backup plan")
}

async fn run(runner: &QemuStepRunner, plan: &WorkflowPlan) -> WorkflowReport {
    let report = Executor::new(runner, ExecOptions::default())
        .run(plan)
        .await;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("reports serialise")
    );
    report
}

fn step<'r>(report: &'r WorkflowReport, name: &str) -> &'r stillpoint_recipe::StepRecord {
    report
        .step(name)
        .unwrap_or_else(|| panic!("no step `{name}` in the report"))
}

/// The test's capture: before handing over to the guarded freeze, it checks from inside the
/// guest that a second writer is refused — the lock is held when the capture starts (the
/// agent refuses guest-exec once frozen, so this is the last moment to look).
struct LockCheckingCapture {
    inner: FreezeOnlyCapture,
    agent: Arc<dyn GuestAgent>,
    refused_writer: Mutex<Option<Result<(), String>>>,
}

#[async_trait]
impl CaptureHook for LockCheckingCapture {
    async fn capture(&self, disks: &[String], freeze: bool) -> Result<CaptureOutcome, EngineError> {
        let status = self
            .agent
            .run(
                &ExecRequest::new("sh", ["-c", PROBE_INSERT]),
                Duration::from_secs(30),
            )
            .await
            .expect("the probe insert runs");
        *self.refused_writer.lock().unwrap() = Some(if status.success() {
            Ok(())
        } else {
            Err(status.stderr_text())
        });
        self.inner.capture(disks, freeze).await
    }
}

/// A capture backend that froze the guest and then failed, without thawing.
struct FreezeThenFail {
    agent: Arc<dyn GuestAgent>,
}

#[async_trait]
impl CaptureHook for FreezeThenFail {
    async fn capture(
        &self,
        _disks: &[String],
        _freeze: bool,
    ) -> Result<CaptureOutcome, EngineError> {
        let frozen = self
            .agent
            .freeze(Duration::from_secs(30))
            .await
            .expect("the guest freezes");
        assert!(frozen >= 1, "at least /data froze");
        Err(EngineError::new(
            EngineErrorKind::Capture,
            "the capture target refused the fleecing image (test)",
        ))
    }
}

#[tokio::test]
async fn sqlite_demo_recipe_holds_the_lock_across_the_guarded_freeze() {
    let guest = Guest::boot("recipe-demo").await;
    guest.create_db().await;
    let baseline = guest.processes().await;
    let workload = guest.start_workload().await;

    let capture = Arc::new(LockCheckingCapture {
        inner: guest.freeze_only(),
        agent: guest.agent(),
        refused_writer: Mutex::new(None),
    });
    let runner = QemuStepRunner::new(guest.vm.clone(), guest.disks(), capture.clone());
    let report = run(&runner, &backup_plan_from_file(&demo_recipe_path())).await;

    assert!(report.succeeded, "stopped at {:?}", report.stopped_at);
    assert!(report.captured);
    assert!(report.application_steps_ok);
    let refused = capture.refused_writer.lock().unwrap().clone();
    let refusal = refused
        .expect("the capture hook ran")
        .expect_err("a second writer is refused right before the freeze");
    assert!(refusal.contains("database is locked"), "{refusal}");

    let check = step(&report, "app-db-checks/write-lock-held");
    assert_eq!(check.outcome, StepOutcome::Ok);
    let capture_step = step(&report, "group:vm-disks");
    assert_eq!(capture_step.disks, vec!["vd0".to_owned()]);
    let freeze = capture_step.freeze.as_ref().expect("a freeze trace");
    assert!(freeze.frozen && freeze.thawed, "{freeze:?}");
    assert!(freeze.frozen_for.is_some());
    assert!(!capture_step.thawed_by_executor);
    let hold = step(&report, "app-db/hold-write-lock");
    let ended = hold.ended.as_ref().expect("the held session ended");
    assert_eq!(ended.by, "op app-db/release-write-lock");
    assert!(!ended.killed, "the session exited on its own once released");
    assert_eq!(ended.exit_code, Some(0));

    // Afterwards: thawed, the guardian's lease gone, writers get through again, the
    // application goes on, and the recipe left no process behind.
    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
    assert!(!guardian::lease_path(&guest.runtime_root, guest.launched.name()).exists());
    guest
        .probe_insert()
        .await
        .expect("a writer gets through after the run");
    let rows = guest.rows().await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            guest.rows().await > rows
        })
        .await,
        "the workload goes on after the run"
    );
    guest.stop_workload(workload).await;
    let after = guest.processes().await;
    let left: Vec<&String> = after
        .iter()
        .filter(|(pid, _)| !baseline.contains_key(pid))
        .map(|(_, args)| args)
        .collect();
    assert!(left.is_empty(), "processes left in the guest: {left:?}");
}

/// The demo recipe with a check that looks at the wrong database: the lock on app.db is
/// held, but the check cannot see it and fails.
const WRONG_CHECK: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata: {name: wrong-check}
spec:
  groups:
  - {name: vm-disks, type: volume}
  hooks:
  - name: app-db
    type: exec
    timeout: 20
    ops:
    - name: hold-write-lock
      background: true
      timeout: 10
      inverseOp: release-write-lock
      command: [/bin/sh, -c, "rm -f /run/sp.fifo && mkfifo /run/sp.fifo && exec sqlite3 -bail /data/app.db '.timeout 5000' 'BEGIN IMMEDIATE;' '.shell head -n 1 /run/sp.fifo' 'COMMIT;'"]
    - name: release-write-lock
      ends: hold-write-lock
      timeout: 10
      command: [/bin/sh, -c, "echo release 1<> /run/sp.fifo"]
  - name: app-db-checks
    type: check
    chks:
    - name: write-lock-held
      timeout: 3
      interval: 1
      command: [/bin/sh, -c, "sqlite3 -bail /data/other.db '.timeout 100' 'BEGIN IMMEDIATE;' 'ROLLBACK;' 2>&1 | grep -c 'database is locked'"]
      condition: "{$.stdout} == 1"
  workflows:
  - name: backup
    sequence:
    - hook: app-db/hold-write-lock
    - hook: app-db-checks/write-lock-held
    - group: vm-disks
    - hook: app-db/release-write-lock
"#;

#[tokio::test]
async fn a_failing_check_stops_before_the_capture_and_releases_the_lock() {
    let guest = Guest::boot("recipe-check").await;
    guest.create_db().await;
    let baseline = guest.processes().await;
    let capture = Arc::new(LockCheckingCapture {
        inner: guest.freeze_only(),
        agent: guest.agent(),
        refused_writer: Mutex::new(None),
    });
    let runner = QemuStepRunner::new(guest.vm.clone(), guest.disks(), capture.clone());
    let report = run(&runner, &backup_plan(WRONG_CHECK)).await;

    assert!(!report.succeeded);
    assert!(!report.captured);
    assert!(!report.application_steps_ok);
    assert_eq!(
        report.stopped_at.as_deref(),
        Some("app-db-checks/write-lock-held")
    );
    let check = step(&report, "app-db-checks/write-lock-held");
    assert_eq!(check.outcome, StepOutcome::TimedOut);
    assert!(
        check.attempts.unwrap_or(0) >= 2,
        "the check polled: {check:?}"
    );
    assert_eq!(
        step(&report, "group:vm-disks").outcome,
        StepOutcome::Skipped
    );
    assert!(
        capture.refused_writer.lock().unwrap().is_none(),
        "the capture never ran"
    );
    let undo = step(
        &report,
        "app-db/release-write-lock (undo app-db/hold-write-lock)",
    );
    assert_eq!(undo.outcome, StepOutcome::Ok, "{undo:?}");
    let hold = step(&report, "app-db/hold-write-lock");
    assert_eq!(hold.outcome, StepOutcome::Compensated);
    let ended = hold.ended.as_ref().expect("the held session ended");
    assert!(!ended.killed, "released by the undo, not killed: {ended:?}");

    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
    guest
        .probe_insert()
        .await
        .expect("the lock is released after the compensation");
    let after = guest.processes().await;
    let left: Vec<&String> = after
        .iter()
        .filter(|(pid, _)| !baseline.contains_key(pid))
        .map(|(_, args)| args)
        .collect();
    assert!(left.is_empty(), "processes left in the guest: {left:?}");
}

const SLOW_OP: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata: {name: slow-op}
spec:
  groups:
  - {name: vm-disks, type: volume}
  hooks:
  - name: app
    type: exec
    ops:
    - name: mark
      command: [touch, /run/stillpoint-marked]
      inverseOp: unmark
    - name: unmark
      command: [rm, -f, /run/stillpoint-marked]
    - name: hold
      background: true
      timeout: 1
      command: [/bin/sh, -c, "sleep 401; echo never"]
    - name: slow
      timeout: 2
      command: [/bin/sh, -c, "echo started; sleep 402; echo never"]
  workflows:
  - name: backup
    sequence:
    - hook: app/mark
    - hook: app/hold
    - hook: app/slow
    - group: vm-disks
"#;

#[tokio::test]
async fn a_timed_out_guest_command_is_killed_with_its_children_and_compensated() {
    let guest = Guest::boot("recipe-timeout").await;
    let capture = Arc::new(guest.freeze_only());
    let runner = QemuStepRunner::new(guest.vm.clone(), guest.disks(), capture);
    let report = run(&runner, &backup_plan(SLOW_OP)).await;

    assert_eq!(report.stopped_at.as_deref(), Some("app/slow"));
    assert!(!report.application_steps_ok);
    let slow = step(&report, "app/slow");
    assert_eq!(slow.outcome, StepOutcome::TimedOut);
    assert_eq!(slow.exit_code, None);
    assert!(
        slow.output
            .as_deref()
            .is_some_and(|o| o.contains("started")),
        "the output written before the kill is kept: {slow:?}"
    );
    // Compensation ran in the guest: the marker is gone.
    assert_eq!(step(&report, "app/mark").outcome, StepOutcome::Compensated);
    assert_eq!(
        guest
            .sh("test -e /run/stillpoint-marked && echo present || echo absent")
            .await
            .stdout_text()
            .trim(),
        "absent"
    );
    // The background op nobody ended was ended at the end of the workflow: SIGTERM after
    // its grace.
    let hold = step(&report, "app/hold");
    let ended = hold.ended.as_ref().expect("ended");
    assert_eq!(ended.by, "end of workflow");
    assert!(ended.killed, "{ended:?}");
    // Neither the shells nor their `sleep` children (the group) are left.
    let left: Vec<String> = guest
        .processes()
        .await
        .into_values()
        .filter(|args| args.contains("sleep 40"))
        .collect();
    assert!(left.is_empty(), "killed commands still run: {left:?}");
}

#[tokio::test]
async fn a_capture_that_fails_frozen_leaves_the_guest_thawed_and_unlocked() {
    let guest = Guest::boot("recipe-capfail").await;
    guest.create_db().await;
    let capture = Arc::new(FreezeThenFail {
        agent: guest.agent(),
    });
    let runner = QemuStepRunner::new(guest.vm.clone(), guest.disks(), capture);
    let report = run(&runner, &backup_plan_from_file(&demo_recipe_path())).await;

    assert!(!report.captured);
    assert!(!report.application_steps_ok);
    assert_eq!(report.stopped_at.as_deref(), Some("group:vm-disks"));
    let capture_step = step(&report, "group:vm-disks");
    assert_eq!(capture_step.outcome, StepOutcome::Failed);
    assert!(capture_step.thawed_by_executor, "{capture_step:?}");
    let error = capture_step.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("the capture target refused the fleecing image"),
        "{error}"
    );
    assert_eq!(
        step(&report, "app-db/hold-write-lock").outcome,
        StepOutcome::Compensated
    );
    assert_eq!(
        step(&report, "app-db/release-write-lock").outcome,
        StepOutcome::Skipped
    );

    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
    guest
        .probe_insert()
        .await
        .expect("the lock is released after the failed capture");
}

const HOST_OPS: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata: {name: host-ops}
spec:
  groups:
  - {name: vm-disks, type: volume}
  hooks:
  - name: local
    type: exec
    target: host
    ops:
    - name: literal
      command: [echo, "a  b; $(id -u) *"]
    - name: env-and-stdin
      env: {STILLPOINT_GREETING: hello}
      stdin: "from stdin"
      command: [sh, -c, "printf '%s ' \"$STILLPOINT_GREETING\"; cat"]
    - name: session
      background: true
      stdin: "held\n"
      command: [cat]
  - name: inside
    type: exec
    ops:
    - name: write
      env: {STILLPOINT_WHO: guest}
      command: [sh, -c, "echo \"$STILLPOINT_WHO\" > /run/stillpoint-who; cat /run/stillpoint-who"]
  workflows:
  - name: backup
    sequence:
    - hook: local/session
    - hook: local/literal
    - hook: local/env-and-stdin
    - hook: inside/write
    - group: vm-disks
"#;

#[tokio::test]
async fn host_ops_run_as_local_processes_beside_guest_ops() {
    let guest = Guest::boot("recipe-host").await;
    let runner = QemuStepRunner::new(
        guest.vm.clone(),
        guest.disks(),
        Arc::new(guest.freeze_only()),
    );
    let report = run(&runner, &backup_plan(HOST_OPS)).await;
    assert!(report.succeeded, "stopped at {:?}", report.stopped_at);
    assert!(report.application_steps_ok);

    let literal = step(&report, "local/literal");
    assert_eq!(
        literal.output.as_deref(),
        Some("stdout: a  b; $(id -u) *"),
        "one argument, no shell expansion"
    );
    assert_eq!(
        step(&report, "local/env-and-stdin").output.as_deref(),
        Some("stdout: hello from stdin")
    );
    // The guest op ran in the guest (its file is there), with env (and a PATH added).
    assert_eq!(
        step(&report, "inside/write").output.as_deref(),
        Some("stdout: guest")
    );
    assert_eq!(guest.sh_ok("cat /run/stillpoint-who").await.trim(), "guest");
    // The host session held stdin open until the end of the workflow closed it.
    let ended = step(&report, "local/session")
        .ended
        .as_ref()
        .expect("ended");
    assert_eq!(ended.by, "end of workflow");
    assert!(!ended.killed, "closing stdin ended it: {ended:?}");
    assert_eq!(ended.exit_code, Some(0));
}

#[tokio::test]
async fn a_lock_held_by_the_application_is_not_taken_for_the_recipes_own() {
    let guest = Guest::boot("recipe-busy").await;
    guest.create_db().await;
    // The application sits in a long write transaction (longer than the recipe's 5 s busy
    // timeout and its 15 s check), so the recipe's BEGIN IMMEDIATE cannot get the lock.
    let application = guest
        .agent()
        .exec_start(&ExecRequest::new(
            "setsid",
            [
                "sqlite3",
                DB,
                "BEGIN IMMEDIATE;",
                ".shell sleep 40",
                "COMMIT;",
            ],
        ))
        .await
        .expect("the long transaction starts");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            guest.probe_insert().await.is_err()
        })
        .await,
        "the application holds the write lock"
    );
    let capture = Arc::new(LockCheckingCapture {
        inner: guest.freeze_only(),
        agent: guest.agent(),
        refused_writer: Mutex::new(None),
    });
    let runner = QemuStepRunner::new(guest.vm.clone(), guest.disks(), capture.clone());
    let report = run(&runner, &backup_plan_from_file(&demo_recipe_path())).await;

    // A writer was refused the whole time — by the application. The recipe must not take
    // that for its own lock.
    assert!(!report.application_steps_ok);
    assert!(!report.captured);
    assert!(
        capture.refused_writer.lock().unwrap().is_none(),
        "no capture"
    );
    assert_eq!(
        report.stopped_at.as_deref(),
        Some("app-db-checks/write-lock-held")
    );
    let hold = step(&report, "app-db/hold-write-lock");
    let ended = hold.ended.as_ref().expect("ended");
    assert_eq!(
        ended.exit_code,
        Some(5),
        "sqlite3 gave up: SQLITE_BUSY ({ended:?})"
    );
    assert!(!ended.killed);
    let undo = step(
        &report,
        "app-db/release-write-lock (undo app-db/hold-write-lock)",
    );
    assert_eq!(
        undo.outcome,
        StepOutcome::Ok,
        "releasing a lock never taken is a no-op"
    );

    guest.sh_ok(&format!("kill -KILL -{application}")).await;
    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
}

const HANGING: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata: {name: hanging}
spec:
  groups:
  - {name: vm-disks, type: volume}
  hooks:
  - name: app
    type: exec
    ops:
    - name: hold
      background: true
      command: [/bin/sh, -c, "sleep 404; echo never"]
    - name: hang
      timeout: 300
      command: [/bin/sh, -c, "sleep 405; echo never"]
  workflows:
  - name: backup
    sequence:
    - hook: app/hold
    - hook: app/hang
    - group: vm-disks
"#;

#[tokio::test]
async fn a_cancelled_run_kills_what_its_steps_still_run_in_the_guest() {
    let guest = Guest::boot("recipe-cancel").await;
    let runner = QemuStepRunner::new(
        guest.vm.clone(),
        guest.disks(),
        Arc::new(guest.freeze_only()),
    );
    let plan = backup_plan(HANGING);
    let running = |guest: &Guest| {
        let agent = guest.agent();
        async move {
            let listing = agent
                .run(
                    &ExecRequest::new("ps", ["-o", "args"]),
                    Duration::from_secs(30),
                )
                .await
                .expect("ps")
                .stdout_text();
            ["sleep 404", "sleep 405"]
                .into_iter()
                .filter(|command| listing.lines().any(|l| l.trim() == *command))
                .count()
        }
    };
    {
        let executor = Executor::new(&runner, ExecOptions::default());
        let run = executor.run(&plan);
        tokio::pin!(run);
        // Drive the run until both commands run in the guest, then drop it (cancel).
        let started = tokio::select! {
            _ = &mut run => panic!("the run cannot finish: its step hangs for 300 s"),
            started = wait_until(Duration::from_secs(60), || async { running(&guest).await == 2 }) => started,
        };
        assert!(started, "both commands run in the guest");
    }
    assert!(
        wait_until(Duration::from_secs(30), || async {
            running(&guest).await == 0
        })
        .await,
        "the cancelled run's guest commands were killed"
    );
}

#[tokio::test]
async fn a_guest_frozen_by_someone_else_is_explained_and_ensure_thawed_thaws_it() {
    let guest = Guest::boot("recipe-frozen").await;
    let runner = QemuStepRunner::new(
        guest.vm.clone(),
        guest.disks(),
        Arc::new(guest.freeze_only()),
    );
    let request = stillpoint_recipe::ExecRequest {
        id: "app/flush".to_owned(),
        target: stillpoint_recipe::Target::Guest,
        container: None,
        argv: vec!["sync".to_owned()],
        env: Vec::new(),
        stdin: None,
        timeout: Duration::from_secs(10),
    };
    let frozen = guest
        .agent()
        .freeze(Duration::from_secs(30))
        .await
        .expect("the test freezes the guest");
    assert!(frozen >= 1);

    let error = runner
        .exec(&request)
        .await
        .expect_err("guest-exec is refused while frozen");
    assert_eq!(error.kind(), EngineErrorKind::GuestCommand);
    let message = error.to_string();
    assert!(
        message.starts_with("VM `recipe-frozen`: cannot start `app/flush` in the guest while its filesystems are frozen"),
        "{message}"
    );

    runner.ensure_thawed().await.expect("ensure_thawed thaws");
    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
    runner.ensure_thawed().await.expect("and is idempotent");
    let outcome = runner.exec(&request).await.expect("runs once thawed");
    assert!(outcome.succeeded(), "{outcome:?}");
}

/// A recipe whose capture step is all there is between a guest op and its undo.
const MARK_RECIPE: &str = r#"
apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata:
  name: mark-around-capture
spec:
  groups:
  - name: vm-disks
    type: volume
  hooks:
  - name: marker
    type: exec
    target: guest
    timeout: 20
    ops:
    - name: mark
      command: [/bin/touch, /run/stillpoint-test.mark]
      inverseOp: unmark
    - name: unmark
      command: [/bin/rm, -f, /run/stillpoint-test.mark]
  workflows:
  - name: backup
    sequence:
    - hook: marker/mark
    - group: vm-disks
    - hook: marker/unmark
"#;

/// Issue 8, item 1: the executor's capture timeout drops the recipe's capture step while the
/// guest is frozen (a fail point holds the step inside the frozen window past the timeout,
/// which the engine bounds by the hold limit). The backup must not panic, must thaw the guest,
/// leave the VM running and no lease behind, publish nothing — and the next backup must work.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_capture_step_that_times_out_thaws_publishes_nothing_and_the_next_backup_works() {
    use stillpoint_engine::backup::{
        BackupEnv, BackupJob, NoProgress, RecipeInput, backup_vm, recipe_capture_timeout,
    };
    use stillpoint_engine::consistency::{Level, OnQuiesceFailure};
    use stillpoint_platform::{Platforms, RunState};

    let guest = Guest::boot("recipe-capture-timeout").await;
    let name = guest.vm.reference().name.clone();
    let dir = tempfile::tempdir().unwrap();
    let repo = stillpoint_repo::Repository::init_local(
        dir.path().join("repo"),
        &stillpoint_repo::InitOptions::default(),
    )
    .unwrap();
    let recipe_path = dir.path().join("mark.yaml");
    std::fs::write(&recipe_path, MARK_RECIPE).unwrap();
    let valid = load_recipe(&recipe_path, &ValidateOptions::default()).expect("valid recipe");
    let recipe = Arc::new(RecipeInput {
        path: recipe_path,
        recipe: valid.recipe,
        workflow: "backup".to_owned(),
    });
    // Capture step timeout: 10 s + 40 s / 2 = 30 s; the guardian's deadline: 50 s after its
    // lease. The fail point holds the frozen window 35 s: past the one, well before the other.
    let freeze_timeout = Duration::from_secs(10);
    let hold_limit = Duration::from_secs(40);
    let env = BackupEnv {
        platforms: Platforms::new(QemuInventory::new(Vec::new(), guest.runtime_root.clone())),
        repo: repo.clone(),
        guard: guest.guard(),
        scratch_root: dir.path().join("scratch"),
        freeze_timeout,
        hold_limit,
        progress: Arc::new(NoProgress),
    };
    let job = BackupJob {
        vm: name.clone(),
        requested: Level::Application,
        policy: OnQuiesceFailure::Degrade,
        recipe: Some(recipe),
        force_full: false,
    };
    // Held inside the frozen window longer than the capture step may take; the guardian's
    // deadline (freeze timeout + hold limit) is further still, so the executor gives up first.
    let timeout = recipe_capture_timeout(freeze_timeout, hold_limit);
    fail::cfg(
        stillpoint_engine::failpoints::CAPTURE_START,
        &format!(
            "1*sleep({})->off",
            (timeout + Duration::from_secs(5)).as_millis()
        ),
    )
    .unwrap();

    let outcome = backup_vm(&env, job.clone()).await;
    fail::remove(stillpoint_engine::failpoints::CAPTURE_START);
    println!("{}", serde_json::to_string_pretty(&outcome.report).unwrap());
    let error = outcome
        .error
        .as_ref()
        .expect("the timed-out capture fails the backup");
    assert_eq!(error.kind(), EngineErrorKind::Capture, "{error}");
    assert!(
        error.to_string().contains("did not finish"),
        "the error says the capture step did not finish: {error}"
    );
    assert!(outcome.manifest.is_none());
    assert!(
        repo.snapshots(None).unwrap().is_empty(),
        "nothing is published"
    );
    let recipe_report = outcome.report.recipe.as_ref().expect("the workflow ran");
    assert_eq!(
        recipe_report["stopped_at"], "group:vm-disks",
        "{recipe_report:#}"
    );
    // Thawed when backup_vm returned (the step's guard thaws, and the backup waits for it).
    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
    assert_eq!(
        guest
            .sh_ok("[ -e /run/stillpoint-test.mark ] && echo left || echo undone")
            .await
            .trim(),
        "undone",
        "the op before the capture was undone"
    );
    // The platform resumes a VM the abandoned start paused, and releases the capture, in the
    // background: waited for, not looked at once. Through a handle of its own, dropped after
    // each look: the monitor takes one client at a time, and the next backup needs it.
    let look = || async {
        let vm = env.platforms.resolve(&name).expect("the VM resolves");
        let running = vm
            .status()
            .await
            .is_ok_and(|s| s.state == RunState::Running);
        let leftovers = match vm.capture().expect("the qemu VM captures").inspect().await {
            Ok(inventory) => inventory.leftovers,
            Err(error) => vec![error.to_string()],
        };
        (running, leftovers)
    };
    let settled = wait_until(Duration::from_secs(60), || async {
        let (running, leftovers) = look().await;
        running && leftovers.is_empty()
    })
    .await;
    assert!(
        settled,
        "the VM runs again and the capture is released: {:?}",
        look().await
    );
    guest.agent().release().await;
    let leases = guardian::lease_path(&guest.runtime_root, &name);
    let pause = guardian::pause_lease_path(&guest.runtime_root, &name);
    // A thaw that failed (a busy agent on a loaded machine) hands the lease to its guardian,
    // which thaws and removes it: waited for, not looked at once.
    let left = || -> Vec<String> {
        [&leases, &pause]
            .iter()
            .filter(|path| path.exists())
            .map(|path| {
                format!(
                    "{}: {}",
                    path.display(),
                    std::fs::read_to_string(path).unwrap_or_default()
                )
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || async { left().is_empty() }).await,
        "no lease is left for a guardian to act on: {:?}",
        left()
    );

    let next = backup_vm(&env, job).await;
    println!("{}", serde_json::to_string_pretty(&next.report).unwrap());
    assert!(
        next.error.is_none(),
        "the next backup works: {:?}",
        next.error
    );
    assert!(next.achieved_requested(), "{:#?}", next.report);
    assert_eq!(repo.snapshots(None).unwrap().len(), 1);
    assert!(
        !next.report.disks.is_empty() && next.report.disks.iter().all(|d| d.mode == "full"),
        "no bitmap of the abandoned capture was settled as a parent: {:?}",
        next.report.disks
    );
    assert_eq!(guest.freeze_status().await, FreezeStatus::Thawed);
}
