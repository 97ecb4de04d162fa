//! `stillpoint demo`: the embedded default — stillpoint's main job, end to end, on the demo VM
//! and a local repository, with proof of what each consistency level gives.
//!
//! 1. Boots the demo VM (the test guest with the real qemu-ga, under QEMU) and checks which
//!    consistency it can reach.
//! 2. Starts two workloads in the guest: a writer appending to `/data` (it reports every append
//!    on the serial console, so its stalls are measured from inside the guest) and an SQLite
//!    application committing transactions to `/data/app.db`.
//! 3. Backs the VM up, while they run, at `crash`, `filesystem` and `application` level (the
//!    last with the SQLite recipe of `examples/recipes/sqlite-demo.yaml`), then once more
//!    (an incremental).
//! 4. Restores each snapshot and checks it from the host: `e2fsck`, the journal's
//!    `needs_recovery` flag, and for the database `PRAGMA integrity_check` and whether a hot
//!    journal would have to be rolled back. Boot-tests the filesystem-level restore.
//! 5. Prints what it proved; exits non-zero when a proof fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use stillpoint_engine::backup::{self, BackupEnv, BackupJob, NoProgress, RecipeInput};
use stillpoint_engine::consistency::{self, Level, OnQuiesceFailure};
use stillpoint_engine::freeze::GuardContext;
use stillpoint_engine::guardian::GuardianCommand;
use stillpoint_engine::preflight;
use stillpoint_engine::report::BackupReport;
use stillpoint_engine::restore::{self, NoRestoreProgress, RestoreRequest};
use stillpoint_platform::Platforms;
use stillpoint_platform::qemu::QemuInventory;
use stillpoint_repo::{ImageFormat, InitOptions, Repository};
use stillpoint_testvm::{Ext4Health, LaunchOptions, LaunchedVm, VmConfig};

use crate::context::Context;
use crate::output::{EXIT_ERROR, EXIT_OK, print_json};

const DEMO_VM: &str = "demo";
/// The demo's recipe: the one users read in the repository.
const SQLITE_RECIPE: &str = include_str!("../../../../examples/recipes/sqlite-demo.yaml");
/// The demo repository's passphrase when `STILLPOINT_PASSWORD` is not set (it is a demo).
const DEMO_PASSPHRASE: &str = "stillpoint-demo";

/// An application in the guest: SQLite transactions that each insert a batch of rows and stay
/// open for a moment (so a capture that does not coordinate with it lands inside one).
const SQLITE_WORKLOAD: &str = "/usr/bin/sqlite3 /data/app.db \
    'CREATE TABLE IF NOT EXISTS t(seq INTEGER PRIMARY KEY, payload TEXT NOT NULL)'; \
    while :; do /usr/bin/sqlite3 /data/app.db '.timeout 20000' 'BEGIN IMMEDIATE;' \
    'INSERT INTO t(payload) SELECT hex(randomblob(256)) FROM (WITH RECURSIVE c(x) AS \
    (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<40) SELECT x FROM c);' \
    '.shell sleep 0.3' 'COMMIT;' >/dev/null 2>&1; done";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's directory (repository, restores, VM sockets, guardian logs).
    #[arg(long)]
    pub keep: bool,
}

/// What one level's backup and restore showed.
#[derive(Debug, Serialize)]
struct LevelProof {
    requested: Level,
    achieved: Level,
    snapshot: Option<String>,
    frozen_ms: Option<f64>,
    capture_start_ms: Option<f64>,
    writer_stall_ms: f64,
    bytes_read: u64,
    ext4: Option<Ext4Health>,
    /// `PRAGMA integrity_check` of the restored database (`ok` when intact).
    db_integrity: Option<String>,
    /// The restored database has a non-empty rollback journal: a transaction was caught half-way
    /// and must be rolled back on first open.
    db_hot_journal: Option<bool>,
    rows: Option<u64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    vm: String,
    repository: PathBuf,
    achievable: Level,
    levels: Vec<LevelProof>,
    incremental_bytes_read: Option<u64>,
    disk_size: u64,
    boot_test_passed: Option<bool>,
    seconds_to_agent: Option<f64>,
    proofs_hold: bool,
}

pub async fn run(ctx: &Context, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let human = !ctx.global.json;
    let say = |line: String| {
        if human {
            println!("{line}");
        }
    };
    let root = tempfile::Builder::new()
        .prefix("stillpoint-demo-")
        .tempdir()?;
    say("▶ Booting the demo VM (Debian cloud kernel, busybox, the real qemu-ga, sqlite3) under QEMU…".into());
    let vm = LaunchedVm::launch(
        VmConfig::new(DEMO_VM),
        &LaunchOptions::attached(root.path()),
    )
    .await
    .context("cannot launch the demo VM")?;
    vm.wait_until_ready(stillpoint_testvm::BOOT_TIMEOUT).await?;
    let disk_size = vm.disks().iter().map(|d| d.virtual_size).sum();

    let platforms = Platforms::new(QemuInventory::new(vec![], root.path().to_path_buf()));
    let handle = platforms.resolve(DEMO_VM)?;
    let recipe = demo_recipe(root.path())?;

    say("▶ stillpoint check demo --recipe examples/recipes/sqlite-demo.yaml".into());
    let facts = preflight::gather(handle.as_ref(), Some(recipe.facts())).await?;
    let assessment = consistency::assess(&facts.facts);
    for verdict in &assessment.levels {
        let why = if verdict.achievable {
            "reachable".into()
        } else {
            format!("no: {}", verdict.reasons.join("; "))
        };
        say(format!("  {:<12} {why}", verdict.level.as_str()));
    }

    let repo_path = root.path().join("repo");
    let passphrase = crate::password::environment_secret(crate::password::PASSWORD_ENV)
        .map_or_else(
            || DEMO_PASSPHRASE.to_string(),
            |pass| secrecy::ExposeSecret::expose_secret(pass).to_owned(),
        );
    let repo = Repository::init_local(
        &repo_path,
        &InitOptions {
            passphrase: Some(passphrase.into()),
            ..Default::default()
        },
    )
    .context("cannot create the demo repository")?;
    say(format!("▶ Encrypted repository at {}", repo_path.display()));

    say("▶ Workloads in the guest: a writer appending to /data, an SQLite application committing to /data/app.db".into());
    vm.start_stall_writer("/data/demo-writer").await?;
    vm.agent_command(
        "guest-exec",
        Some(serde_json::json!({"path": "/bin/sh", "arg": ["-c", SQLITE_WORKLOAD]})),
        Duration::from_secs(10),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let the application commit a few batches

    let env = BackupEnv {
        platforms,
        repo: repo.clone(),
        guard: GuardContext {
            runtime_root: root.path().to_path_buf(),
            config: None,
            guardian: GuardianCommand::current_exe()?,
        },
        scratch_root: root.path().join("captures"),
        freeze_timeout: Duration::from_secs(60),
        hold_limit: Duration::from_secs(60),
        progress: Arc::new(NoProgress),
    };
    let mut levels = Vec::new();
    let mut snapshots = Vec::new();
    for level in Level::ALL {
        say(format!(
            "▶ stillpoint backup demo --consistency {level}{}",
            if level == Level::Application {
                " --recipe examples/recipes/sqlite-demo.yaml"
            } else {
                ""
            }
        ));
        let before = vm.writer_samples().last().map_or(0, |s| s.seq);
        let job = BackupJob {
            vm: DEMO_VM.into(),
            requested: level,
            policy: OnQuiesceFailure::Degrade,
            recipe: (level == Level::Application).then(|| recipe.clone()),
            force_full: false,
        };
        let outcome = backup::backup_vm(&env, job).await;
        tokio::time::sleep(Duration::from_millis(500)).await; // let the writer report its stall
        let stall = vm.longest_writer_latency_since(before);
        let proof = level_proof(level, &outcome.report, stall);
        say(describe_backup(&proof, &outcome.report));
        snapshots.push(outcome.manifest);
        levels.push(proof);
    }

    say("▶ stillpoint backup demo (again: an incremental)".into());
    let again = backup::backup_vm(
        &env,
        BackupJob {
            vm: DEMO_VM.into(),
            requested: Level::Filesystem,
            policy: OnQuiesceFailure::Degrade,
            recipe: None,
            force_full: false,
        },
    )
    .await;
    let incremental_bytes_read = again.manifest.as_ref().map(|_| again.report.bytes_read);
    if let Some(bytes) = incremental_bytes_read {
        say(format!(
            "  read {} of the {} disk (only the blocks changed since the last backup)",
            bytesize::ByteSize(bytes),
            bytesize::ByteSize(disk_size)
        ));
    }

    say("▶ Restoring each snapshot and looking inside from the host".into());
    for (proof, manifest) in levels.iter_mut().zip(&snapshots) {
        let Some(manifest) = manifest else { continue };
        let target = root.path().join(format!("restore-{}", proof.requested));
        let outcome = restore_to(&repo, manifest, &target, ImageFormat::Raw).await?;
        let image = &outcome.disks[0].path;
        inspect_restore(proof, image, &target)?;
        say(describe_restore(proof));
    }

    say("▶ stillpoint restore <filesystem snapshot> --format qcow2 --boot-test".into());
    let mut boot = None;
    if let Some(manifest) = &snapshots[1] {
        let outcome = restore_to(
            &repo,
            manifest,
            &root.path().join("boot"),
            ImageFormat::Qcow2,
        )
        .await?;
        let report =
            crate::commands::restore::run_boot_test(&outcome, Duration::from_secs(120)).await?;
        say(match &report.failure {
            None => format!(
                "  the restored VM booted; its guest agent answered after {}; filesystems: {}",
                report
                    .seconds_to_agent
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or("-".into()),
                report
                    .filesystems
                    .iter()
                    .map(|f| format!("{} {}", f.mountpoint, f.fs_type))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(failure) => format!("  the restored VM FAILED its boot test: {failure}"),
        });
        boot = Some(report);
    }
    // The original VM ran until now: the restored one boots with its kernel and initramfs,
    // which live beside the running VM (external kernels are not part of a disk snapshot).
    vm.stop().await?;

    let proofs_hold = levels
        .iter()
        .all(|p| p.achieved == p.requested && p.snapshot.is_some())
        && levels
            .iter()
            .filter(|p| p.requested >= Level::Filesystem)
            .all(|p| {
                p.ext4
                    .as_ref()
                    .is_some_and(|e| e.fsck_clean && !e.needs_recovery)
            })
        && levels
            .iter()
            .filter(|p| p.requested == Level::Application)
            .all(|p| p.db_integrity.as_deref() == Some("ok") && p.db_hot_journal == Some(false))
        && boot.as_ref().is_some_and(|b| b.passed);
    let report = DemoReport {
        vm: DEMO_VM.into(),
        repository: repo_path,
        achievable: assessment.achievable,
        levels,
        incremental_bytes_read,
        disk_size,
        boot_test_passed: boot.as_ref().map(|b| b.passed),
        seconds_to_agent: boot.as_ref().and_then(|b| b.seconds_to_agent),
        proofs_hold,
    };
    if args.keep {
        let kept = root.keep();
        say(format!("▶ Kept everything under {}", kept.display()));
    }
    if ctx.global.json {
        print_json(&report)?;
    } else {
        print_conclusion(&report);
    }
    Ok(ExitCode::from(if proofs_hold {
        EXIT_OK
    } else {
        EXIT_ERROR
    }))
}

/// Restores every disk of a snapshot into `target`.
async fn restore_to(
    repo: &Repository,
    manifest: &stillpoint_repo::Manifest,
    target: &Path,
    format: ImageFormat,
) -> anyhow::Result<restore::RestoreOutcome> {
    let request = RestoreRequest {
        target: target.to_path_buf(),
        format,
        disks: vec![],
        force: false,
        zero_fill_damaged: false,
    };
    let (repo, manifest) = (repo.clone(), manifest.clone());
    Ok(tokio::task::spawn_blocking(move || {
        restore::restore_snapshot(&repo, &manifest, &request, &NoRestoreProgress)
    })
    .await??)
}

fn demo_recipe(dir: &Path) -> anyhow::Result<Arc<RecipeInput>> {
    let path = dir.join("sqlite-demo.yaml");
    std::fs::write(&path, SQLITE_RECIPE)?;
    Ok(Arc::new(crate::commands::check::load_recipe(&path)?))
}

fn level_proof(requested: Level, report: &BackupReport, stall: Duration) -> LevelProof {
    LevelProof {
        requested,
        achieved: report.achieved,
        snapshot: report.snapshot.clone(),
        frozen_ms: report.freeze.as_ref().map(|f| f.frozen_ms),
        capture_start_ms: report.capture.as_ref().map(|c| c.start_ms),
        writer_stall_ms: stall.as_secs_f64() * 1000.0,
        bytes_read: report.bytes_read,
        ext4: None,
        db_integrity: None,
        db_hot_journal: None,
        rows: None,
        error: report.error.clone(),
    }
}

fn describe_backup(proof: &LevelProof, report: &BackupReport) -> String {
    match &proof.snapshot {
        None => format!(
            "  FAILED: {}",
            proof.error.as_deref().unwrap_or("unknown error")
        ),
        Some(id) => format!(
            "  snapshot {id}: {} consistency{}, capture start {:.1} ms, writer's worst append {:.1} ms, read {}",
            report.achieved,
            proof
                .frozen_ms
                .map(|f| format!(", guest frozen {f:.1} ms"))
                .unwrap_or_else(|| ", no freeze".into()),
            proof.capture_start_ms.unwrap_or_default(),
            proof.writer_stall_ms,
            bytesize::ByteSize(proof.bytes_read)
        ),
    }
}

/// Checks the restored image from the host, and the database inside it. An image whose
/// journal needs recovery is looked into after replaying the journal on a copy, as a mount
/// (or the guest's next boot) would.
fn inspect_restore(proof: &mut LevelProof, image: &Path, dir: &Path) -> anyhow::Result<()> {
    let health = stillpoint_testvm::ext4_health(image)?;
    let replayed;
    let image = if health.needs_recovery {
        replayed = dir.join("replayed.img");
        std::fs::copy(image, &replayed)?;
        // Exit codes 0–2: nothing wrong, or errors fixed (the journal replayed).
        let status = std::process::Command::new("e2fsck")
            .arg("-fy")
            .arg(&replayed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.code().is_some_and(|c| c <= 2),
            "e2fsck could not replay the journal of {}",
            image.display()
        );
        replayed.as_path()
    } else {
        image
    };
    proof.ext4 = Some(health);
    let db = dir.join("app.db");
    if stillpoint_testvm::ext4_extract(image, "/app.db", &db)? {
        proof.db_hot_journal = Some(
            stillpoint_testvm::ext4_file_size(image, "/app.db-journal")?
                .is_some_and(|size| size > 0),
        );
        // Read-only and immutable: look at the file exactly as restored, without SQLite
        // rolling a hot journal back first (the journal is not beside it anyway).
        let uri = format!("file:{}?immutable=1", db.display());
        let sqlite = |sql: &str| -> anyhow::Result<String> {
            let output = std::process::Command::new("sqlite3")
                .arg(&uri)
                .arg(sql)
                .output()
                .context("cannot run sqlite3 on the host")?;
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string()
                + String::from_utf8_lossy(&output.stderr).trim())
        };
        proof.db_integrity = Some(sqlite("PRAGMA integrity_check;")?);
        proof.rows = sqlite("SELECT count(*) FROM t;")?.parse().ok();
    }
    Ok(())
}

fn describe_restore(proof: &LevelProof) -> String {
    let ext4 = match &proof.ext4 {
        Some(e) => format!(
            "e2fsck {}, journal {}",
            if e.fsck_clean {
                "clean"
            } else {
                "FOUND PROBLEMS"
            },
            if e.needs_recovery {
                "needs recovery (as after a power cut)"
            } else {
                "clean"
            }
        ),
        None => "not checked".into(),
    };
    let replayed = if proof.ext4.as_ref().is_some_and(|e| e.needs_recovery) {
        " (after replaying the journal)"
    } else {
        ""
    };
    let db = match (&proof.db_integrity, proof.db_hot_journal) {
        (Some(integrity), Some(hot)) => format!(
            ";{replayed} app.db integrity {integrity}, {} rows, {}",
            proof.rows.map(|r| r.to_string()).unwrap_or("?".into()),
            if hot {
                "a half-done transaction to roll back"
            } else {
                "no transaction to roll back"
            }
        ),
        _ => String::new(),
    };
    format!("  {:<12} {ext4}{db}", proof.requested.as_str())
}

fn print_conclusion(report: &DemoReport) {
    println!("▶ What this demo proved");
    for proof in &report.levels {
        let line = match proof.requested {
            Level::Crash => "crash: one atomic point in time for the disk, no guest interaction; the filesystem is as after a power cut".to_string(),
            Level::Filesystem => "filesystem: the guest was frozen only for the capture start, and the restored ext4 needs no recovery".to_string(),
            Level::Application => "application: the SQLite write lock was held across the capture, and the restored database has no half-done transaction".to_string(),
        };
        let held = proof.achieved == proof.requested && proof.snapshot.is_some();
        println!("  {} {line}", if held { "✔" } else { "✘" });
    }
    if let Some(bytes) = report.incremental_bytes_read {
        println!(
            "  ✔ incremental: the next backup read {} of {}",
            bytesize::ByteSize(bytes),
            bytesize::ByteSize(report.disk_size)
        );
    }
    match report.boot_test_passed {
        Some(true) => {
            println!("  ✔ restore: the filesystem-level snapshot boots and its guest agent answers")
        }
        _ => println!("  ✘ restore: the boot test did not pass"),
    }
    println!(
        "  repository: {} (passphrase from STILLPOINT_PASSWORD, else `{DEMO_PASSPHRASE}`)",
        report.repository.display()
    );
    println!(
        "{}",
        if report.proofs_hold {
            "All proofs hold."
        } else {
            "SOME PROOFS FAILED (see above)."
        }
    );
}
