//! Application consistency end to end, through the real `stillpoint` binary against a real
//! guest (QEMU TCG, the real qemu-ga, busybox, sqlite3) running an SQLite application: the
//! testvm's SQLite writer, which inserts a batch of rows per transaction into `/data/app.db`
//! (rollback journal) and reports on the serial console when it asks for the write lock, gets
//! it, has written its rows, and committed. Restored databases are read on the host with the
//! real sqlite3 (the guest's version), extracted from the restored ext4 image with `debugfs`.
//!
//! - `application` with the demo recipe: the restored database needs no recovery and holds
//!   exactly the transactions committed before the recipe took its lock;
//! - `crash` taken inside a transaction: the restored database needs a rollback (a hot journal);
//! - failures — a check that never holds, an op that times out, a capture that fails after the
//!   lock — each with both `--on-quiesce-failure` policies where they differ: the lock is
//!   released, the guest thawed, the outcome follows the policy, nothing half-written is
//!   published;
//! - `stillpoint recipe run --phase pre|post`, the Velero hooks: the lock and the freeze held
//!   across two processes while something else takes the snapshot;
//! - a template of the demo recipe (`${APP}` in its names, a suite-style workflow name): refused
//!   before anything happens while unfilled, `application` once `--set` fills it.
#![cfg(feature = "vm-tests")]

mod backup_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use backup_support::{Bench, MIB, e2fsck, needs_recovery, snapshot_of, text};
use serde_json::Value;
use stillpoint_qga::FreezeStatus;
use stillpoint_testvm::{
    SQLITE_BEGIN_MARK, SQLITE_COMMITTED_MARK, SqliteScan, SqliteWriter, VmConfig,
    parse_sqlite_journal_header, scan_sqlite_database, wait_until,
};

/// The example recipe users are pointed at.
const DEMO_RECIPE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/recipes/sqlite-demo.yaml"
);

fn test_recipe(name: &str) -> String {
    format!("{}/tests/recipes/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What the demo recipe's lock session (and the test recipes', which copy it) has in its
/// command lines and nothing else has: the FIFO it waits on, the marker it holds.
const LOCK_SESSION_MARKS: [&str; 2] = ["stillpoint-sqlite.fifo", "stillpoint-sqlite.locked"];

const WAIT: Duration = Duration::from_secs(120);

/// Boots a VM with one 128 MiB data disk and starts the SQLite writer on it.
async fn boot_with_writer(name: &str) -> Bench {
    let bench = Bench::boot(VmConfig::new(name).with_disks(1, 128 * MIB)).await;
    bench
        .vm
        .start_sqlite_writer(&SqliteWriter::default())
        .await
        .expect("the SQLite writer starts");
    bench
}

/// The guest's processes whose command line contains one of `needles`, as `PID ARGS`.
async fn guest_processes(bench: &Bench, needles: &[&str]) -> Vec<String> {
    bench
        .sh("ps -o pid,args")
        .await
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.contains("ps -o pid,args"))
        .filter(|line| needles.iter().any(|needle| line.contains(needle)))
        .map(str::to_owned)
        .collect()
}

/// After a backup or a phase that took the lock: the guest is thawed, the lock session is
/// gone (no process, no marker), another writer gets the lock, and the application commits
/// again.
async fn assert_released_and_thawed(bench: &Bench, context: &str) {
    assert_eq!(
        bench.freeze_status().await,
        Some(FreezeStatus::Thawed),
        "{context}: the guest must be thawed"
    );
    // Waited for, not looked at once: busybox `timeout` (which bounds the session's wait on
    // its FIFO) execs the command and leaves a watcher process that notices the command's end
    // on its next one-second tick.
    let gone = wait_until(Duration::from_secs(30), || async {
        guest_processes(bench, &LOCK_SESSION_MARKS).await.is_empty()
    })
    .await;
    assert!(
        gone,
        "{context}: the recipe's lock session still runs: {:?}",
        guest_processes(bench, &LOCK_SESSION_MARKS).await
    );
    let marker = bench
        .sh("[ -e /run/stillpoint-sqlite.locked ] && echo held || echo free")
        .await;
    assert_eq!(marker.trim(), "free", "{context}: the lock marker is left");
    // A write of its own (its own table, so the writer's batches stay 1..N): it gets the lock.
    bench
        .sh("sqlite3 -bail /data/app.db '.timeout 30000' \
             'CREATE TABLE IF NOT EXISTS probe(t INTEGER);' 'INSERT INTO probe VALUES(1);'")
        .await;
    let committed = bench.vm.sqlite_committed();
    bench
        .vm
        .wait_for_mark(SQLITE_COMMITTED_MARK, committed + 2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{context}: the application does not commit again: {e}"));
}

fn indications(report: &Value) -> Vec<String> {
    report["indications"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The recipe workflow's step `name` in a backup report.
fn recipe_step<'r>(report: &'r Value, name: &str) -> &'r Value {
    report["recipe"]["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no recipe step `{name}` in the report: {report:#}"))
}

/// The recipe's compensation steps that ran.
fn compensations(report: &Value) -> Vec<&Value> {
    report["recipe"]["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s["kind"] == "compensation")
                .collect()
        })
        .unwrap_or_default()
}

/// The entries of the root directory of an ext4 image, name → size, read with `debugfs`.
fn image_root(image: &Path) -> BTreeMap<String, u64> {
    let output = Command::new("debugfs")
        .arg("-R")
        .arg("ls -p /")
        .arg(image)
        .output()
        .expect("debugfs runs (e2fsprogs)");
    // `-p`: one entry per line, `/inode/mode/uid/gid/name/size/`.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('/').collect();
            match fields.as_slice() {
                ["", _inode, _mode, _uid, _gid, name, size, ""] => {
                    Some(((*name).to_owned(), size.parse().unwrap_or(0)))
                }
                _ => None,
            }
        })
        .collect()
}

/// Copies `/app.db` and, when the image has them, `/app.db-journal` and `/app.db-wal` out of
/// an ext4 image (no mount, no journal replay) into a fresh directory: the database as a
/// host process opening the restored disk would find it.
fn extract_database(image: &Path) -> (tempfile::TempDir, BTreeMap<String, u64>) {
    let root = image_root(image);
    let dir = tempfile::tempdir().unwrap();
    for name in ["app.db", "app.db-journal", "app.db-wal"] {
        if !root.contains_key(name) {
            continue;
        }
        let to = dir.path().join(name);
        let output = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{name} {}", to.display()))
            .arg(image)
            .output()
            .expect("debugfs runs");
        assert!(
            to.exists(),
            "debugfs could not dump /{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (dir, root)
}

/// `sqlite3 DATABASE SQL` on the host.
fn sqlite3(database: &str, sql: &str) -> Output {
    Command::new("sqlite3")
        .arg(database)
        .arg(sql)
        .output()
        .expect("the host's sqlite3 runs")
}

fn uri(path: &Path, mode: &str) -> String {
    format!("file:{}?{mode}", path.display())
}

fn scan(database: &str) -> SqliteScan {
    scan_sqlite_database(database, SqliteWriter::default().rows_per_transaction)
        .unwrap_or_else(|e| panic!("scanning {database}: {e}"))
}

/// The application level with the example recipe, the writer running. The backup is held for
/// a moment in its frozen window (fail point `backup::after-freeze`, a pause only): at that
/// instant the recipe's lock is held, so the writer's console says exactly which transaction
/// it committed last and that it waits for the next one's lock. The restored database must
/// hold precisely transactions 1..=that one, and nothing to roll back:
/// - the restored file system has no `app.db-wal` and no `app.db-journal` with a live header
///   (absent, empty, or zeroed), and its ext4 needs no journal replay;
/// - the database, extracted with whatever journal sits beside it, opens **read-only** (SQLite
///   refuses that when a hot journal must be rolled back) and `PRAGMA integrity_check` says ok;
/// - every batch 1..=N is whole (row count, check values, payloads, totals) and N is the last
///   transaction the writer reported committed before the lock.
#[tokio::test(flavor = "multi_thread")]
async fn application_backup_restores_exactly_the_transactions_committed_before_the_lock() {
    let bench = boot_with_writer("app-sqlite").await;
    let committed_before_backup = bench.vm.sqlite_committed();
    let mut backup = bench.spawn_backup(
        "backup::after-freeze=pause",
        &["--consistency", "application", "--recipe", DEMO_RECIPE],
    );
    backup.wait_for_failpoint("backup::after-freeze");
    let waiting = wait_until(WAIT, || async {
        bench.vm.sqlite_progress().waiting_for_lock()
    })
    .await;
    let at_capture = bench.vm.sqlite_progress();
    backup.release();
    let (code, report, stderr) = backup.finish();
    assert!(
        waiting,
        "while the capture starts, the writer should wait for the lock of its next \
         transaction: {at_capture:?}\n{}",
        bench.vm.console_tail(20)
    );
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    assert_eq!(report["achieved"], "application", "{report:#}");
    assert!(indications(&report).contains(&"GuestAgent".to_owned()));
    assert!(!indications(&report).contains(&"ApplicationStepFailed".to_owned()));
    assert_eq!(report["recipe"]["application_steps_ok"], true, "{report:#}");
    let hold = recipe_step(&report, "app-db/hold-write-lock");
    assert_eq!(hold["outcome"], "ok");
    assert_eq!(hold["ended"]["by"], "op app-db/release-write-lock");
    assert_eq!(
        hold["ended"]["exit_code"], 0,
        "the session committed and exited"
    );
    let capture = recipe_step(&report, "group:vm-disks");
    assert_eq!(capture["freeze"]["frozen"], true);
    assert_eq!(capture["freeze"]["thawed"], true);
    assert!(at_capture.committed >= committed_before_backup);

    // The writer's next transaction got the lock only after the recipe released it.
    bench
        .vm
        .wait_for_mark(SQLITE_BEGIN_MARK, at_capture.committed + 1, WAIT)
        .await
        .expect("the writer goes on after the lock is released");
    assert_released_and_thawed(&bench, "after the application backup").await;

    let image = bench.restore(&snapshot_of(&report), "vd0");
    let (fsck, log) = e2fsck(&image);
    assert_eq!(fsck, 0, "e2fsck -fn of the restored file system:\n{log}");
    assert!(
        !needs_recovery(&image),
        "a frozen ext4 needs no journal replay"
    );
    let (dir, root) = extract_database(&image);
    assert!(!root.contains_key("app.db-wal"), "{root:?}");
    let journal = dir.path().join("app.db-journal");
    if journal.exists() {
        let bytes = std::fs::read(&journal).unwrap();
        assert_eq!(
            parse_sqlite_journal_header(&bytes),
            None,
            "the restored app.db-journal ({} bytes) is hot: a transaction was open",
            bytes.len()
        );
    }
    let database = dir.path().join("app.db");
    let check = sqlite3(&uri(&database, "mode=ro"), "PRAGMA integrity_check;");
    assert!(
        check.status.success(),
        "the restored database does not open read-only (a hot journal?): {}",
        text(&check)
    );
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");
    let restored = scan(&uri(&database, "mode=ro"));
    assert!(
        restored.is_clean_prefix(),
        "the restored database: {:?}",
        restored.problems
    );
    assert_eq!(
        restored.newest(),
        at_capture.committed,
        "the restored database must hold exactly the transactions committed before the lock"
    );
    eprintln!(
        "application backup: restored batches 1..={} = committed before the lock ({} committed \
         when the backup started); recipe steps: {}; frozen {} ms",
        restored.newest(),
        committed_before_backup,
        step_timings(&report),
        report["freeze"]["frozen_ms"]
    );
}

fn step_timings(report: &Value) -> String {
    report["recipe"]["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| format!("{} {} {} ms", s["name"], s["outcome"], s["duration_ms"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// A crash-level backup taken while the writer is inside transaction N (the writer's gate
/// holds N open after its rows and journal reached the disk). What the restored database
/// shows, asserted where SQLite makes it deterministic:
/// - `app.db-journal` is there with a live header and saved pages: a hot journal;
/// - so the database does **not** open read-only (SQLite must roll back first);
/// - the database file on its own (journal ignored, `immutable=1`) holds N's batch row without
///   N's rows — part of an uncommitted transaction;
/// - opened normally, SQLite rolls the journal back and the database holds exactly 1..=N-1,
///   whole, with `integrity_check` ok.
///
/// The ext4 journal replay that mounting would do is run first (`e2fsck -fy`), as the restore
/// of a crash-consistent disk needs.
#[tokio::test(flavor = "multi_thread")]
async fn crash_backup_inside_a_transaction_restores_a_hot_journal_that_must_be_rolled_back() {
    let bench = boot_with_writer("crash-sqlite").await;
    let gate = SqliteWriter::default().gate;
    bench.sh(&format!("touch {gate}")).await;
    let at_gate = bench.vm.sqlite_progress();
    let held = wait_until(WAIT, || async {
        let now = bench.vm.sqlite_progress();
        now.open > at_gate.open && now.open > now.committed
    })
    .await;
    let inside = bench.vm.sqlite_progress();
    let backup = if held {
        Some(bench.backup(&["--consistency", "crash"]))
    } else {
        None
    };
    bench.sh(&format!("rm -f {gate}")).await;
    assert!(held, "no transaction was held open: {inside:?}");
    let (code, report, output) = backup.expect("taken while held");
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(report["achieved"], "crash", "{report:#}");
    let open = inside.open;
    assert_eq!(inside.committed, open - 1, "{inside:?}");
    bench
        .vm
        .wait_for_mark(SQLITE_COMMITTED_MARK, open, WAIT)
        .await
        .expect("the held transaction commits once the gate is gone");

    let image = bench.restore(&snapshot_of(&report), "vd0");
    let ext4_recovery = needs_recovery(&image);
    let replay = Command::new("e2fsck")
        .arg("-fy")
        .arg(&image)
        .output()
        .expect("e2fsck runs");
    let (fsck, log) = e2fsck(&image);
    assert_eq!(
        fsck,
        0,
        "the restored ext4 is damaged after its journal replay (e2fsck -fy: {})\n{log}",
        String::from_utf8_lossy(&replay.stdout)
    );
    let (dir, root) = extract_database(&image);
    let journal_path = dir.path().join("app.db-journal");
    let journal = std::fs::read(&journal_path)
        .unwrap_or_else(|_| panic!("no app.db-journal in the restored file system: {root:?}"));
    let header = parse_sqlite_journal_header(&journal).unwrap_or_else(|| {
        panic!(
            "app.db-journal ({} bytes) has no live header",
            journal.len()
        )
    });
    assert!(
        header.records.is_some_and(|n| n > 0),
        "the journal saved no pages: {header:?}"
    );
    let database = dir.path().join("app.db");
    let read_only = sqlite3(&uri(&database, "mode=ro"), "SELECT count(*) FROM batches;");
    assert!(
        !read_only.status.success()
            && String::from_utf8_lossy(&read_only.stderr).contains("readonly"),
        "a database with a hot journal must refuse a read-only open: {}",
        text(&read_only)
    );
    let raw = scan(&uri(&database, "immutable=1"));
    assert_eq!(
        raw.newest(),
        open,
        "the database file alone holds transaction {open}'s batch row: {raw:?}"
    );
    assert!(
        !raw.is_clean_prefix(),
        "without its journal, the database file holds a torn transaction"
    );
    let rolled_back = scan(&database.display().to_string());
    assert!(
        rolled_back.is_clean_prefix(),
        "after the rollback: {:?}",
        rolled_back.problems
    );
    assert_eq!(rolled_back.newest(), open - 1);
    assert!(!journal_path.exists(), "the rollback consumed the journal");
    let check = sqlite3(&database.display().to_string(), "PRAGMA integrity_check;");
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");
    eprintln!(
        "crash backup inside transaction {open}: ext4 needs_recovery={ext4_recovery} (e2fsck -fy \
         exited {:?}); app.db-journal {} bytes, {:?} page records, database was {} pages before \
         the transaction; read-only open refused ({}); the file alone shows batches up to {} \
         with problems {:?}; after the rollback batches 1..={}",
        replay.status.code(),
        journal.len(),
        header.records,
        header.initial_pages,
        String::from_utf8_lossy(&read_only.stderr).trim(),
        raw.newest(),
        raw.problems,
        rolled_back.newest()
    );
}

/// A failing application step under both policies, in one VM: `fail` first (exit 1, the
/// report says why, nothing published), then `degrade` (exit 3, a published snapshot at the
/// filesystem level with `ApplicationStepFailed`). After each: released and thawed. Returns
/// the two reports.
async fn fail_then_degrade(bench: &Bench, recipe: &str) -> (Value, Value) {
    let published = bench.snapshots().len();
    let (code, failed, output) = bench.backup(&[
        "--consistency",
        "application",
        "--recipe",
        recipe,
        "--on-quiesce-failure",
        "fail",
    ]);
    assert_eq!(code, Some(1), "{}", text(&output));
    assert!(failed["snapshot"].is_null(), "{failed:#}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing was backed up")),
        "{failed:#}"
    );
    assert_eq!(
        bench.snapshots().len(),
        published,
        "--on-quiesce-failure fail published a snapshot"
    );
    assert_released_and_thawed(bench, "after the failed backup").await;

    let (code, degraded, output) =
        bench.backup(&["--consistency", "application", "--recipe", recipe]);
    assert_eq!(code, Some(3), "{}", text(&output));
    assert_eq!(degraded["requested"], "application", "{degraded:#}");
    assert_eq!(degraded["achieved"], "filesystem", "{degraded:#}");
    assert!(
        indications(&degraded).contains(&"ApplicationStepFailed".to_owned()),
        "{degraded:#}"
    );
    let snapshots = bench.snapshots();
    assert_eq!(snapshots.len(), published + 1);
    assert_eq!(
        snapshots.last().map(|s| &s["achieved"]),
        Some(&Value::from("filesystem")),
        "{snapshots:#?}"
    );
    assert_released_and_thawed(bench, "after the degraded backup").await;
    (failed, degraded)
}

/// The recipe stopped before its capture, and undid its lock: the failed step, the inverse
/// op that released the lock, the lock session ended by the executor.
fn assert_undone_before_capture(report: &Value, failed_step: &str, outcome: &str) {
    assert_eq!(report["recipe"]["stopped_at"], failed_step, "{report:#}");
    assert_eq!(recipe_step(report, failed_step)["outcome"], outcome);
    assert_eq!(recipe_step(report, "group:vm-disks")["outcome"], "skipped");
    let hold = recipe_step(report, "app-db/hold-write-lock");
    assert_eq!(hold["outcome"], "compensated", "{report:#}");
    let undo = compensations(report);
    assert_eq!(undo.len(), 1, "{report:#}");
    assert_eq!(
        undo[0]["name"],
        "app-db/release-write-lock (undo app-db/hold-write-lock)"
    );
    assert_eq!(undo[0]["outcome"], "ok");
    assert!(
        hold["ended"]["by"].is_string(),
        "the session was ended: {hold:#}"
    );
}

/// A check that can never hold: the workflow stops at it, before the capture.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_that_never_holds_degrades_or_fails_and_releases_the_lock() {
    let bench = boot_with_writer("app-check").await;
    let recipe = test_recipe("sqlite-check-never-holds.yaml");
    let (failed, degraded) = fail_then_degrade(&bench, &recipe).await;
    for report in [&failed, &degraded] {
        assert_undone_before_capture(report, "app-checks/replica-caught-up", "timed-out");
        let check = recipe_step(report, "app-checks/replica-caught-up");
        assert!(
            check["attempts"].as_u64().is_some_and(|n| n >= 2),
            "{check:#}"
        );
    }
    assert!(
        degraded["degraded_because"]
            .to_string()
            .contains("app-checks/replica-caught-up"),
        "{degraded:#}"
    );
}

/// An op that hangs past its timeout: the runner kills it in the guest (the `sleep` its shell
/// started included), the inverse op releases the lock.
#[tokio::test(flavor = "multi_thread")]
async fn an_op_that_times_out_is_killed_in_the_guest_and_the_lock_released() {
    let bench = boot_with_writer("app-timeout").await;
    let recipe = test_recipe("sqlite-op-timeout.yaml");
    let (failed, degraded) = fail_then_degrade(&bench, &recipe).await;
    for report in [&failed, &degraded] {
        assert_undone_before_capture(report, "app-db/flush-that-hangs", "timed-out");
    }
    // It really ran, and nothing of it is left.
    let started = bench
        .sh("[ -e /run/stillpoint-test-flush.started ] && echo yes || echo no")
        .await;
    assert_eq!(started.trim(), "yes", "the op never started");
    let left = guest_processes(&bench, &["sleep 297", "stillpoint-test-flush"]).await;
    assert!(left.is_empty(), "the timed-out op left processes: {left:?}");
}

/// The capture step fails after the lock was taken and checked: the fault-injection point
/// `backup::capture-start` fails the start just where QEMU would refuse it (the guest frozen,
/// the capture prepared), and the engine must handle it as a real start failure. The
/// workflow stops at its capture, the guest is thawed, the inverse op releases the lock, the
/// prepared capture is released (no capture node, scratch file or bitmap left in QEMU), and
/// the backup fails under either policy (a failed capture is not a quiesce failure to degrade
/// from): exit 1, nothing published, the VM running.
///
/// (This used to be a real refusal — a qcow2 v2 data disk cannot store persistent bitmaps —
/// until the capture learned to keep such a disk's bitmaps in memory; no real fault at the
/// capture start is left that a test can produce on demand.)
#[tokio::test(flavor = "multi_thread")]
async fn a_capture_that_fails_after_the_lock_releases_it_and_publishes_nothing() {
    let bench = boot_with_writer("app-capture").await;
    let scratch = bench.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for policy in ["degrade", "fail"] {
        let mut running = bench.spawn_backup(
            "backup::capture-start=return(refused by the test)",
            &[
                "--consistency",
                "application",
                "--recipe",
                DEMO_RECIPE,
                "--on-quiesce-failure",
                policy,
                "--scratch-dir",
                scratch.to_str().unwrap(),
            ],
        );
        running.wait_for_failpoint("backup::capture-start");
        let (code, report, stderr) = running.finish();
        assert_eq!(code, Some(1), "{policy}: {report:#}\n{stderr}");
        assert!(report["snapshot"].is_null(), "{policy}: {report:#}");
        let error = report["error"].as_str().unwrap_or_default();
        eprintln!("capture failure under --on-quiesce-failure {policy}: {error}");
        assert!(
            error.contains(
                "the capture did not start: fault injected at failpoint backup::capture-start: \
                 refused by the test"
            ),
            "{policy}: the error carries the failed start: {report:#}"
        );
        assert_eq!(
            report["recipe"]["stopped_at"], "group:vm-disks",
            "{report:#}"
        );
        let capture = recipe_step(&report, "group:vm-disks");
        assert_eq!(capture["outcome"], "failed", "{capture:#}");
        assert!(
            report["freeze"]["frozen_ms"].is_number(),
            "the start failed inside the frozen window: {report:#}"
        );
        assert_eq!(
            recipe_step(&report, "app-db-checks/write-lock-held")["outcome"],
            "ok",
            "the lock was taken and checked before the capture"
        );
        assert_eq!(
            recipe_step(&report, "app-db/hold-write-lock")["outcome"],
            "compensated",
            "{report:#}"
        );
        assert_eq!(
            compensations(&report).first().map(|s| &s["outcome"]),
            Some(&Value::from("ok"))
        );
        assert!(
            bench.snapshots().is_empty(),
            "{policy}: nothing is published"
        );
        assert_eq!(bench.run_state().await, "running", "{policy}");
        assert_capture_released(&bench, &scratch, policy).await;
        assert_released_and_thawed(&bench, policy).await;
    }
}

/// Nothing of a capture is left in QEMU (the driver's own view: no leftover node, export or
/// pause, no stillpoint bitmap — none was ever settled as a success) nor in the scratch area.
async fn assert_capture_released(bench: &Bench, scratch: &Path, context: &str) {
    let inventory = bench.capture_inventory().await;
    assert!(
        inventory.leftovers.is_empty(),
        "{context}: capture leftovers: {:?}",
        inventory.leftovers
    );
    for disk in &inventory.disks {
        assert!(
            disk.bitmaps.is_empty(),
            "{context}: bitmaps left on {}: {:?}",
            disk.id,
            disk.bitmaps
        );
    }
    // The backup keeps one scratch directory per VM.
    let vm_scratch = scratch.join(bench.name());
    let left: Vec<_> = std::fs::read_dir(&vm_scratch)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{context}: scratch files left: {left:?}");
}

/// `stillpoint recipe run FILE --phase pre|post --name VM` as Velero would run the hooks.
fn recipe_run(bench: &Bench, phase: &str, extra: &[&str]) -> (Option<i32>, Value, Output) {
    let mut args = vec![
        "recipe",
        "run",
        DEMO_RECIPE,
        "--phase",
        phase,
        "--name",
        bench.name(),
        "--namespace",
        "default",
        "--json",
    ];
    args.extend_from_slice(extra);
    let output = bench.run(&args);
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("recipe run --json printed no JSON ({e}): {}", text(&output)));
    (output.status.code(), report, output)
}

fn state_file(bench: &Bench) -> PathBuf {
    bench
        .root
        .join("recipe-runs")
        .join(format!("{}.json", bench.name()))
}

/// Whether guest PID `pid` exists (`kill -0`).
async fn guest_pid_alive(bench: &Bench, pid: i64) -> bool {
    bench
        .sh(&format!(
            "kill -0 {pid} 2>/dev/null && echo alive || echo gone"
        ))
        .await
        .trim()
        == "alive"
}

/// The pre phase as Velero's pre hook with the example recipe: it exits 0 with the guest frozen,
/// the lock session still running in the guest (its PID in the state file) and the writer
/// stopped in front of the lock. The platform's snapshot is taken between the hooks — here a
/// crash-level `stillpoint backup`, which does not touch the agent. The post phase thaws, ends
/// the session through the recipe's release op and leaves nothing behind. The snapshot taken
/// between the hooks restores like an application-level one: no hot journal, exactly the
/// transactions committed before the lock.
#[tokio::test(flavor = "multi_thread")]
async fn recipe_run_pre_and_post_hold_the_lock_and_the_freeze_across_a_platform_snapshot() {
    let bench = boot_with_writer("hooks-sqlite").await;

    let (code, pre, output) = recipe_run(&bench, "pre", &[]);
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(pre["succeeded"], true, "{pre:#}");
    assert_eq!(pre["freeze"]["outcome"], "frozen", "{pre:#}");
    let handed = pre["handed_over"].as_array().expect("a list");
    assert_eq!(handed.len(), 1, "{pre:#}");
    assert_eq!(handed[0]["id"], "app-db/hold-write-lock");
    let pid = handed[0]["pid"].as_i64().expect("a guest pid");
    let state: Value =
        serde_json::from_slice(&std::fs::read(state_file(&bench)).expect("the state file"))
            .expect("JSON");
    assert_eq!(state["handed_over"][0]["pid"], pid);
    assert_eq!(
        state["owed_inverse_of"],
        serde_json::json!(["app-db/hold-write-lock"])
    );
    assert!(bench.lease().exists(), "a guardian lease guards the freeze");

    // Between the hooks: frozen (the agent refuses guest-exec), the writer in front of the lock.
    assert_eq!(bench.freeze_status().await, Some(FreezeStatus::Frozen));
    let refused = bench
        .vm
        .guest_exec(&["true"], Duration::from_secs(20))
        .await;
    assert!(refused.is_err(), "guest-exec must be refused while frozen");
    let waiting = wait_until(WAIT, || async {
        bench.vm.sqlite_progress().waiting_for_lock()
    })
    .await;
    let at_snapshot = bench.vm.sqlite_progress();
    let (code, snapshot, output) = bench.backup(&["--consistency", "crash"]);
    let lease_after_snapshot = bench.lease().exists();

    let (post_code, post, post_output) = recipe_run(&bench, "post", &[]);
    assert!(
        waiting,
        "the writer is not stopped by the lock: {at_snapshot:?}"
    );
    assert_eq!(code, Some(0), "the platform's snapshot: {}", text(&output));
    assert_eq!(post_code, Some(0), "{}", text(&post_output));
    assert_eq!(post["succeeded"], true, "{post:#}");
    assert_eq!(post["thaw"]["outcome"], "thawed", "{post:#}");
    assert!(post["degraded_because"].is_null(), "{post:#}");
    let adopted = post["adopted"].as_array().expect("a list");
    assert_eq!(adopted.len(), 1, "{post:#}");
    assert_eq!(adopted[0]["pid"], pid);
    assert_eq!(adopted[0]["ended"]["by"], "op app-db/release-write-lock");
    assert_eq!(adopted[0]["ended"]["killed"], false);
    assert_eq!(
        adopted[0]["ended"]["exit_code"], 0,
        "the session committed and exited"
    );
    assert!(
        !state_file(&bench).exists(),
        "the post phase removes the state"
    );
    assert!(!bench.lease().exists(), "the unfreeze removes the lease");

    assert!(
        !guest_pid_alive(&bench, pid).await,
        "the lock session {pid} still runs"
    );
    bench
        .vm
        .wait_for_mark(SQLITE_BEGIN_MARK, at_snapshot.committed + 1, WAIT)
        .await
        .expect("the writer goes on after the post phase");
    assert_released_and_thawed(&bench, "after the post phase").await;

    let image = bench.restore(&snapshot_of(&snapshot), "vd0");
    assert!(
        !needs_recovery(&image),
        "the guest was frozen at the snapshot"
    );
    let (dir, root) = extract_database(&image);
    assert!(!root.contains_key("app.db-wal"), "{root:?}");
    if let Ok(journal) = std::fs::read(dir.path().join("app.db-journal")) {
        assert_eq!(parse_sqlite_journal_header(&journal), None, "a hot journal");
    }
    let restored = scan(&uri(&dir.path().join("app.db"), "mode=ro"));
    assert!(restored.is_clean_prefix(), "{:?}", restored.problems);
    assert_eq!(restored.newest(), at_snapshot.committed);
    eprintln!(
        "recipe run: pre {} ms of steps, lock session pid {pid}, snapshot between the hooks holds \
         batches 1..={}; the freeze's lease {} the crash-level backup taken between the hooks; \
         post {} ms of steps",
        pre["workflow"]["duration_ms"],
        restored.newest(),
        if lease_after_snapshot {
            "survived"
        } else {
            "did NOT survive"
        },
        post["workflow"]["duration_ms"]
    );
}

/// The post hook comes late: the guardian has thawed the guest at the unfreeze timeout. While
/// the guest is thawed between the phases, the lock session the pre phase handed over is still
/// alive and holds the lock (another writer is refused). The post phase still ends it and
/// releases the lock, and exits 3 saying the snapshot may not have been taken frozen.
#[tokio::test(flavor = "multi_thread")]
async fn recipe_run_post_after_the_guardian_thawed_still_releases_the_lock_and_says_so() {
    let bench = boot_with_writer("hooks-late").await;
    let (code, pre, output) = recipe_run(&bench, "pre", &["--unfreezeTimeoutSeconds", "3"]);
    assert_eq!(code, Some(0), "{}", text(&output));
    let pid = pre["handed_over"][0]["pid"]
        .as_i64()
        .expect("a handed-over pid");
    assert!(bench.wait_thawed().await, "the guardian did not thaw");
    assert!(
        bench.guardian_log().contains("unfreeze timeout passed"),
        "{}",
        bench.guardian_log()
    );
    assert!(
        guest_pid_alive(&bench, pid).await,
        "the lock session ended early"
    );
    let refused = bench
        .vm
        .guest_exec(
            &[
                "sh",
                "-c",
                "sqlite3 -bail /data/app.db '.timeout 1000' 'BEGIN IMMEDIATE;' 'ROLLBACK;'",
            ],
            Duration::from_secs(60),
        )
        .await
        .expect("guest-exec");
    assert_ne!(refused.exit_code, Some(0), "the lock is not held");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("database is locked"),
        "{refused:?}"
    );
    assert!(bench.vm.sqlite_progress().waiting_for_lock());

    let (code, post, output) = recipe_run(&bench, "post", &[]);
    assert_eq!(code, Some(3), "{}", text(&output));
    assert_eq!(post["thaw"]["outcome"], "was-not-frozen", "{post:#}");
    assert!(
        post["degraded_because"]
            .as_str()
            .is_some_and(|why| why.contains("no longer frozen")),
        "{post:#}"
    );
    assert_eq!(
        post["adopted"][0]["ended"]["by"],
        "op app-db/release-write-lock"
    );
    assert!(!guest_pid_alive(&bench, pid).await);
    assert_released_and_thawed(&bench, "after a late post phase").await;
}

/// Pre phases that fail undo themselves and exit 1:
/// - before the freeze (a check that never holds): no freeze, no state file, the executor's
///   inverse op released the lock;
/// - after the freeze (its state file cannot be written: the state directory is a symlink to
///   `/proc`, where no one can create a file, root included, while reading there finds no
///   pending state): the phase thaws, runs the owed inverse op and ends the lock session it had
///   already handed over.
///
/// A post phase without a pre phase thaws (nothing to thaw) and says there was nothing to hand
/// over.
#[tokio::test(flavor = "multi_thread")]
async fn failed_pre_phases_undo_themselves_and_a_lone_post_phase_only_thaws() {
    let bench = boot_with_writer("hooks-fail").await;
    let output = bench.run(&[
        "recipe",
        "run",
        &test_recipe("sqlite-check-never-holds.yaml"),
        "--phase",
        "pre",
        "--vm",
        bench.name(),
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let pre: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(pre["succeeded"], false);
    assert!(
        pre["freeze"].is_null(),
        "stopped before the freeze: {pre:#}"
    );
    assert_eq!(
        pre["workflow"]["stopped_at"],
        "app-checks/replica-caught-up"
    );
    assert_eq!(pre["handed_over"], serde_json::json!([]));
    assert!(!state_file(&bench).exists());
    assert!(!bench.lease().exists());
    assert_released_and_thawed(&bench, "after the failed pre phase").await;

    let unwritable = bench.root.join("recipe-runs");
    std::os::unix::fs::symlink("/proc", &unwritable).unwrap();
    let (code, pre, output) = recipe_run(&bench, "pre", &[]);
    std::fs::remove_file(&unwritable).unwrap();
    assert_eq!(code, Some(1), "{}", text(&output));
    assert_eq!(
        pre["freeze"]["outcome"], "frozen",
        "it got as far as the freeze: {pre:#}"
    );
    assert!(
        pre["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot write the recipe phase state")),
        "{pre:#}"
    );
    assert_eq!(pre["thaw"]["outcome"], "thawed", "{pre:#}");
    let undo = pre["compensation"].as_array().expect("a list");
    assert_eq!(undo.len(), 1, "{pre:#}");
    assert_eq!(undo[0]["outcome"], "ok");
    assert_eq!(
        pre["adopted"][0]["ended"]["by"], "the pre phase undoing itself",
        "{pre:#}"
    );
    assert_eq!(
        pre["adopted"][0]["ended"]["exit_code"], 0,
        "released, it exited"
    );
    assert!(!bench.lease().exists());
    assert_released_and_thawed(&bench, "after a pre phase that failed after its freeze").await;

    let (code, post, output) = recipe_run(&bench, "post", &[]);
    assert_eq!(code, Some(1), "{}", text(&output));
    assert_eq!(post["thaw"]["outcome"], "was-not-frozen");
    assert!(
        post["error"]
            .as_str()
            .is_some_and(|e| e.contains("no pre phase is recorded")),
        "{post:#}"
    );
}

/// The demo recipe as a shared template would have it: `${APP}` in the recipe's, hooks' and
/// workflow's names (and the references to them), the workflow named for a suite.
fn demo_recipe_as_a_template() -> String {
    let demo = std::fs::read_to_string(DEMO_RECIPE).unwrap();
    let template = demo
        .replace("name: sqlite-demo", "name: ${APP}-demo")
        .replace("app-db", "${APP}-db")
        .replace("  - name: backup\n", "  - name: ${APP}-backup-resources\n");
    assert_ne!(template, demo);
    assert!(template.contains("  - name: ${APP}-backup-resources\n"));
    template
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_recipe_with_a_named_workflow_runs_once_filled_and_not_before() {
    let bench = boot_with_writer("app-template").await;
    let path = bench.dir.path().join("template.yaml");
    std::fs::write(&path, demo_recipe_as_a_template()).unwrap();
    let recipe = path.to_str().unwrap();
    let common = [
        "--consistency",
        "application",
        "--recipe",
        recipe,
        "--workflow",
        "sqlite-backup-resources",
    ];

    // Not filled: refused before anything happens, naming the parameter.
    let output = bench.run(&[&["backup", bench.name(), "--json"][..], &common[..]].concat());
    // With --json the error is the JSON report's; both streams are searched.
    let all = text(&output);
    assert_eq!(output.status.code(), Some(1), "{all}");
    assert!(
        all.contains("template parameter(s) not set: ${APP}"),
        "{all}"
    );
    assert!(
        bench.snapshots().is_empty(),
        "a refused run published a snapshot"
    );
    assert_released_and_thawed(&bench, "after the refused run").await;

    // Filled with --set, the named workflow runs and reaches the application level.
    let (code, report, output) =
        bench.backup(&[&common[..], &["--set", "APP=sqlite"][..]].concat());
    assert_eq!(code, Some(0), "{}", text(&output));
    assert_eq!(report["achieved"], "application", "{report:#}");
    assert_eq!(report["recipe"]["workflow"], "sqlite-backup-resources");
    assert_eq!(
        recipe_step(&report, "sqlite-db/hold-write-lock")["ended"]["by"],
        "op sqlite-db/release-write-lock",
        "{report:#}"
    );
    assert_eq!(
        recipe_step(&report, "group:vm-disks")["freeze"]["frozen"],
        true
    );
    assert_eq!(bench.snapshots().len(), 1);
    assert_released_and_thawed(&bench, "after the backup").await;
}
