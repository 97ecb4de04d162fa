//! `stillpoint restore SNAPSHOT --to DIR [--format raw|qcow2] [--disk ID]... [--boot-test]`.
//!
//! The restore itself (disks, the restored VM definition's files, `snapshot.json`) and the
//! boot test are `stillpoint_engine::restore`, which calls the restore capability of the
//! platform that wrote the snapshot's VM definition (`stillpoint_platform::restore`); this
//! module is flags, progress bars and output. docs/restore.md describes what a restore
//! writes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use stillpoint_engine::restore::{
    self, BootAccel, BootTestReport, BootTestRequest, RestoreOutcome, RestoreProgress,
    RestoreRequest,
};
use stillpoint_repo::ImageFormat;

use crate::commands::repo::progress_bar;
use crate::context::Context;
use crate::output::{EXIT_DEGRADED, EXIT_ERROR, EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 restored (and booted, with --boot-test); 3 restored with damaged \
    chunks zero-filled (--zero-fill-damaged); 1 failed, or the boot test failed."
)]
pub struct RestoreArgs {
    /// The snapshot: an id, a unique id prefix, or VM:latest.
    pub snapshot: String,
    /// Directory to write the disks into (created if missing).
    #[arg(long)]
    pub to: PathBuf,
    /// Image format of the restored disks.
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Only this disk; repeat for several (default: every disk of the snapshot).
    #[arg(long = "disk", value_name = "ID")]
    pub disks: Vec<String>,
    /// Fill damaged or missing chunks with zeros and report their offsets instead of failing.
    #[arg(long)]
    pub zero_fill_damaged: bool,
    /// Replace files that an earlier restore left in the target directory.
    #[arg(long)]
    pub force: bool,
    /// Then start the restored VM once (on scratch overlays: the restored files stay
    /// untouched, TCG unless STILLPOINT_ACCEL=kvm) and check that it runs and its guest
    /// agent answers.
    #[arg(long)]
    pub boot_test: bool,
    /// How long the boot test waits for the guest agent to answer.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub boot_timeout: u64,
}

pub async fn run(ctx: &Context, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let manifest = repo.find_snapshot(&args.snapshot)?;
    let request = RestoreRequest {
        target: args.to.clone(),
        format: match args.format {
            Format::Raw => ImageFormat::Raw,
            Format::Qcow2 => ImageFormat::Qcow2,
        },
        disks: args.disks.clone(),
        force: args.force,
        zero_fill_damaged: args.zero_fill_damaged,
    };
    let bars = Bars {
        ctx,
        bars: Mutex::new(HashMap::new()),
    };
    // The disk restores block on their worker threads.
    let outcome = tokio::task::block_in_place(|| {
        restore::restore_snapshot(&repo, &manifest, &request, &bars)
    })?;
    if !ctx.global.json {
        print_restore(&outcome);
    }

    let boot = if args.boot_test {
        let report = run_boot_test(&outcome, Duration::from_secs(args.boot_timeout)).await?;
        if !ctx.global.json {
            print_boot_test(&report);
        }
        Some(report)
    } else {
        None
    };

    if ctx.global.json {
        print_json(&serde_json::json!({
            "snapshot": outcome.snapshot.id,
            "vm": outcome.snapshot.vm,
            "target": outcome.target,
            "disks": outcome.disks,
            "definition": outcome.definition_file,
            "script": outcome.script_file,
            "snapshot_file": outcome.snapshot_file,
            "notes": outcome.notes,
            "boot_test": boot,
        }))?;
    }
    if let Some(report) = &boot
        && !report.passed
    {
        let failure = report.failure.as_deref().unwrap_or("it failed");
        if ctx.global.json {
            return Ok(ExitCode::from(EXIT_ERROR));
        }
        anyhow::bail!(
            "the boot test of VM {} (snapshot {}) failed: {failure}\n{}",
            outcome.snapshot.vm,
            outcome.snapshot.id,
            report.console_tail.as_deref().unwrap_or_default()
        );
    }
    // Zero-filled damage is a degraded restore: exit 3, so scripts notice.
    Ok(ExitCode::from(if outcome.damaged_chunks() > 0 {
        EXIT_DEGRADED
    } else {
        EXIT_OK
    }))
}

pub(crate) async fn run_boot_test(
    outcome: &RestoreOutcome,
    agent_timeout: Duration,
) -> anyhow::Result<BootTestReport> {
    let (Some(recorded), Some(_)) = (&outcome.recorded_definition, &outcome.definition) else {
        anyhow::bail!(
            "--boot-test needs the VM's recorded definition, and snapshot {} has none that \
             fits the restored disks: {}",
            outcome.snapshot.id,
            outcome.notes.join("; ")
        );
    };
    let accel = match stillpoint_testvm::Accel::from_env()? {
        stillpoint_testvm::Accel::Tcg => BootAccel::Tcg,
        stillpoint_testvm::Accel::Kvm => BootAccel::AsRecorded,
    };
    let mut request = BootTestRequest::new(
        outcome.snapshot.vm.clone(),
        recorded.clone(),
        outcome.target_disks(),
    );
    request.accel = accel;
    request.agent_timeout = agent_timeout;
    restore::boot_test(&request)
        .await
        .with_context(|| format!("cannot run the boot test of VM {}", outcome.snapshot.vm))
}

fn print_restore(outcome: &RestoreOutcome) {
    for disk in &outcome.disks {
        for offset in &disk.stats.damaged_offsets {
            eprintln!(
                "warning: snapshot {} disk {}: damaged chunk at offset {offset} was zero-filled",
                outcome.snapshot.id, disk.id
            );
        }
        println!(
            "restored disk {} of snapshot {} to {} ({}, {:.1}s)",
            disk.id,
            outcome.snapshot.id,
            disk.path.display(),
            bytesize::ByteSize(disk.stats.size),
            disk.seconds
        );
    }
    if let Some(script) = &outcome.script_file {
        println!("start the restored VM with {}", script.display());
    }
    if let Some(definition) = &outcome.definition_file {
        println!("its command line is in {}", definition.display());
    }
    for note in &outcome.notes {
        println!("note: {note}");
    }
}

fn print_boot_test(report: &BootTestReport) {
    let seconds = |s: Option<f64>| s.map(|s| format!("{s:.1} s")).unwrap_or("-".into());
    println!(
        "boot test: {} — running after {}, guest agent {}",
        if report.passed { "PASSED" } else { "FAILED" },
        seconds(report.seconds_to_running),
        if !report.agent_channel {
            "not configured".to_string()
        } else if report.agent_answered {
            format!("answered after {}", seconds(report.seconds_to_agent))
        } else {
            "did not answer".to_string()
        }
    );
    if let Some(os) = &report.os {
        println!("  guest OS: {os}");
    }
    for fs in &report.filesystems {
        println!(
            "  filesystem {} ({}) on {}",
            fs.mountpoint, fs.fs_type, fs.device
        );
    }
    println!(
        "  restored images {}",
        if report.restored_images_untouched {
            "untouched (the guest ran on overlays, now removed)"
        } else {
            "CHANGED"
        }
    );
    for note in &report.notes {
        println!("  note: {note}");
    }
}

/// One progress bar per disk, on a terminal only.
struct Bars<'a> {
    ctx: &'a Context,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars<'_> {
    fn with_bar(&self, disk: &str, action: impl FnOnce(&ProgressBar)) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bar) = bars.get(disk) {
            action(bar);
        }
    }
}

impl RestoreProgress for Bars<'_> {
    fn disk_started(&self, disk: &str, size: u64) {
        if let Some(bar) = progress_bar(self.ctx, size, &format!("restore {disk}")) {
            self.bars
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(disk.to_string(), bar);
        }
    }

    fn advanced(&self, disk: &str, bytes: u64) {
        self.with_bar(disk, |bar| bar.inc(bytes));
    }

    fn disk_finished(&self, disk: &str) {
        let bar = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(disk);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
}
