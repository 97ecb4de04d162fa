//! `stillpoint backup VM...`: consistent backups of running VMs into the repository.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use stillpoint_engine::backup::{
    self, BackupEnv, BackupJob, BackupOutcome, CopyProgress, NoProgress,
};
use stillpoint_engine::consistency::{Level, OnQuiesceFailure};
use stillpoint_engine::report::BackupReport;

use crate::context::Context;
use crate::output::{EXIT_DEGRADED, EXIT_ERROR, EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 every VM backed up at the requested level; 3 every VM backed up, \
    at least one at a lower level (--on-quiesce-failure degrade); 1 at least one VM failed (nothing \
    was published for it). The report of each VM says the achieved level and why (indications)."
)]
pub struct BackupArgs {
    /// The VMs to back up (NAME or PLATFORM:NAME).
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Consistency to reach: crash, filesystem or application (default: [backup] consistency
    /// in stillpoint.toml, else application with --recipe, else filesystem).
    #[arg(long, value_name = "LEVEL")]
    pub consistency: Option<Level>,
    /// The recipe (Recipe CR YAML) that quiesces the application.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// The recipe's workflow to run around the capture.
    #[arg(
        long,
        default_value = "backup",
        value_name = "NAME",
        requires = "recipe"
    )]
    pub workflow: String,
    #[command(flatten)]
    pub parameters: crate::commands::recipe::ParameterArgs,
    /// When the level cannot be reached: degrade (back up at the level reached, exit 3) or fail
    /// (back up nothing, exit 1).
    #[arg(long, value_name = "POLICY")]
    pub on_quiesce_failure: Option<OnQuiesceFailure>,
    /// How many VMs to back up at once.
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Read every disk in full, even when an incremental would be possible.
    #[arg(long)]
    pub full: bool,
    /// Scratch space for copy-before-write while the backup runs (default: the runtime
    /// directory). If it fills up, the backup fails — never the guest's writes.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// How long the guest agent's freeze call may take.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub freeze_timeout: u64,
}

pub async fn run(ctx: &Context, args: BackupArgs) -> anyhow::Result<ExitCode> {
    for vm in &args.vms {
        crate::context::check_vm_argument("VM", vm)?;
    }
    let defaults = &ctx.config.config.backup;
    let requested = match args.consistency {
        Some(level) => level,
        None => defaults
            .consistency
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?
            // A recipe given without a level asks for what only a recipe can give.
            .unwrap_or(if args.recipe.is_some() {
                Level::Application
            } else {
                Level::Filesystem
            }),
    };
    let policy = match args.on_quiesce_failure {
        Some(policy) => policy,
        None => defaults
            .on_quiesce_failure
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?
            .unwrap_or_default(),
    };
    let recipe = match &args.recipe {
        Some(path) => Some(Arc::new(crate::commands::check::load_recipe_with(
            path,
            &args.parameters.parameters()?,
            &args.workflow,
        )?)),
        None => None,
    };
    let parallel = args.parallel.or(defaults.parallel).unwrap_or(2).max(1);
    let repo = open_repository(ctx).context("cannot open the repository")?;
    let progress: Arc<dyn CopyProgress> = if ctx.global.json {
        Arc::new(NoProgress)
    } else {
        Arc::new(Bars::new())
    };
    let env = BackupEnv {
        platforms: ctx.platforms(),
        repo,
        guard: ctx.guard_context()?,
        scratch_root: args
            .scratch_dir
            .clone()
            .unwrap_or_else(|| ctx.runtime_root.join("captures")),
        freeze_timeout: Duration::from_secs(args.freeze_timeout),
        hold_limit: Duration::from_secs(60),
        progress,
    };

    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for vm in &args.vms {
        let job = BackupJob {
            vm: vm.clone(),
            requested,
            policy,
            recipe: recipe.clone(),
            force_full: args.full,
        };
        let env = env.clone();
        let semaphore = semaphore.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            backup::backup_vm(&env, job).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.context("a backup task panicked")?);
    }

    if ctx.global.json {
        let reports: Vec<&BackupReport> = outcomes.iter().map(|o| &o.report).collect();
        print_json(&reports)?;
    } else {
        for outcome in &outcomes {
            print_human(outcome);
        }
    }
    let code = if outcomes.iter().any(|o| o.manifest.is_none()) {
        EXIT_ERROR
    } else if outcomes.iter().all(BackupOutcome::achieved_requested) {
        EXIT_OK
    } else {
        EXIT_DEGRADED
    };
    Ok(ExitCode::from(code))
}

fn print_human(outcome: &BackupOutcome) {
    let report = &outcome.report;
    match &outcome.manifest {
        Some(manifest) => println!(
            "VM {}: snapshot {} — {} consistency (requested {})",
            report.vm, manifest.id, report.achieved, report.requested
        ),
        None => println!("VM {}: FAILED, nothing was published", report.vm),
    }
    if !report.indications.is_empty() {
        let names: Vec<String> = report
            .indications
            .iter()
            .map(|i| format!("{i:?}"))
            .collect();
        println!("  indications: {}", names.join(", "));
    }
    for why in &report.degraded_because {
        println!("  lower than requested because {why}");
    }
    if let Some(freeze) = &report.freeze {
        println!(
            "  frozen {:.1} ms ({} filesystem(s); freeze call {:.1} ms, thaw call {:.1} ms)",
            freeze.frozen_ms, freeze.filesystems, freeze.freeze_ms, freeze.thaw_ms
        );
    }
    if let Some(capture) = &report.capture {
        println!(
            "  capture start {:.1} ms, vCPUs paused {:.1} ms",
            capture.start_ms, capture.paused_ms
        );
        for recovered in &capture.recovered {
            println!("  recovered: {recovered}");
        }
    }
    for disk in &report.disks {
        println!(
            "  disk {}: {}{}, read {}, stored {} ({} new, {} reused, {} unchanged, {} zero chunks)",
            disk.id,
            disk.mode,
            disk.full_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            bytesize::ByteSize(disk.bytes_read),
            bytesize::ByteSize(disk.bytes_stored),
            disk.chunks_new,
            disk.chunks_reused,
            disk.chunks_unchanged,
            disk.chunks_zero
        );
    }
    for note in &report.notes {
        println!("  note: {note}");
    }
    println!("  steps:");
    for step in &report.steps {
        println!(
            "    {:<18} {:>9.1} ms  {}{}",
            step.name,
            step.duration_ms,
            step.outcome,
            step.detail
                .as_deref()
                .map(|d| format!(" — {d}"))
                .unwrap_or_default()
        );
    }
    if let Some(error) = &report.error {
        eprintln!("error: VM {}: {error}", report.vm);
    }
}

/// One progress bar per disk being copied, on stderr, only on a terminal.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<(String, String), ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
        }
    }
}

impl CopyProgress for Bars {
    fn disk_started(&self, vm: &str, disk: &str, disk_size: u64) {
        let bar = self.multi.add(ProgressBar::new(disk_size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{vm}/{disk}"));
        self.bars
            .lock()
            .expect("not poisoned")
            .insert((vm.into(), disk.into()), bar);
    }

    fn advanced(&self, vm: &str, disk: &str, bytes: u64) {
        if let Some(bar) = self
            .bars
            .lock()
            .expect("not poisoned")
            .get(&(vm.to_string(), disk.to_string()))
        {
            bar.inc(bytes);
        }
    }

    fn disk_finished(&self, vm: &str, disk: &str) {
        if let Some(bar) = self
            .bars
            .lock()
            .expect("not poisoned")
            .remove(&(vm.to_string(), disk.to_string()))
        {
            bar.finish_and_clear();
        }
    }
}
