//! `stillpoint repo init|stats|verify|prune|gc`, and the progress bars shared by the commands
//! that move many bytes (backup-image, restore, verify).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use stillpoint_repo::{InitOptions, KeepRules, Repository};

use crate::context::Context;
use crate::output::{EXIT_ERROR, EXIT_OK, print_json};
use crate::password::{open_repository, passphrase};

#[derive(Debug, Args)]
pub struct RepoArgs {
    #[command(subcommand)]
    pub command: RepoCommand,
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository (encrypted unless --unencrypted).
    Init(InitArgs),
    /// Show snapshot, chunk and byte counts.
    Stats,
    /// Re-read and authenticate everything (or, with --quick, check that every chunk exists).
    Verify(VerifyArgs),
    /// Delete snapshots that no retention rule keeps (per VM). Chunks go with `gc`.
    Prune(PruneArgs),
    /// Delete chunks and indexes no snapshot references (safe beside running backups).
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Store data unencrypted (explicit opt-out; no passphrase is asked).
    #[arg(long)]
    pub unencrypted: bool,
    /// Fixed chunk size, a power of two between 64KiB and 64MiB.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// How long unreferenced chunks are kept before gc may delete them.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,
    /// zstd level for chunks.
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only check that every referenced chunk exists (no read-back).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Keep the N newest snapshots of each VM.
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the last N days (UTC) with snapshots.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    /// Same per ISO week.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    /// Same per month.
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    /// Show what would go, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Count what would go, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size like 4MiB or 2GiB: {e}"))
}

/// A byte progress bar on a terminal (none with `--json` or when stderr is not a terminal).
pub(crate) fn progress_bar(ctx: &Context, total: u64, what: &str) -> Option<ProgressBar> {
    if ctx.global.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    Some(bar)
}

pub async fn run(ctx: &Context, args: RepoArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        RepoCommand::Init(a) => init(ctx, a),
        RepoCommand::Stats => stats(ctx),
        RepoCommand::Verify(a) => verify(ctx, a),
        RepoCommand::Prune(a) => prune(ctx, a),
        RepoCommand::Gc(a) => gc(ctx, a),
    }
}

fn init(ctx: &Context, args: InitArgs) -> anyhow::Result<ExitCode> {
    let chunk_size = u32::try_from(args.chunk_size)
        .map_err(|_| anyhow::anyhow!("chunk size {} is too large", args.chunk_size))?;
    let passphrase = if args.unencrypted {
        None
    } else {
        Some(passphrase(ctx, true)?)
    };
    let path = ctx.repo_path();
    let repo = Repository::init_local(
        &path,
        &InitOptions {
            chunk_size,
            passphrase,
            gc_grace: args.gc_grace,
            zstd_level: args.zstd_level,
            ..Default::default()
        },
    )?;
    if ctx.global.json {
        print_json(&serde_json::json!({
            "repository": path,
            "id": repo.config().id,
            "chunk_size": chunk_size,
            "encryption": repo.config().encryption,
        }))?;
    } else {
        println!(
            "created {} repository {} at {} (chunk size {})",
            if args.unencrypted {
                "an unencrypted"
            } else {
                "an encrypted"
            },
            repo.config().id,
            path.display(),
            bytesize::ByteSize(u64::from(chunk_size))
        );
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn stats(ctx: &Context) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let stats = repo.stats()?;
    if ctx.global.json {
        print_json(&stats)?;
    } else {
        let b = bytesize::ByteSize;
        println!("snapshots:      {} of {} VMs", stats.snapshots, stats.vms);
        println!("logical size:   {}", b(stats.logical_bytes));
        println!(
            "chunks:         {} ({})",
            stats.chunks,
            b(stats.chunk_bytes)
        );
        println!("repository:     {}", b(stats.total_bytes));
        if stats.total_bytes > 0 {
            println!(
                "ratio:          {:.2}x",
                stats.logical_bytes as f64 / stats.total_bytes as f64
            );
        }
        println!("chunk size:     {}", b(u64::from(stats.chunk_size)));
        println!("encrypted:      {}", stats.encrypted);
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn verify(ctx: &Context, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let bar = progress_bar(ctx, 0, "verify");
    if let Some(bar) = &bar {
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} chunks eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
    }
    let progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let report = repo.verify(args.quick, Some(&progress))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if ctx.global.json {
        print_json(&report)?;
    } else {
        for problem in &report.problems {
            println!("DAMAGED {problem}");
        }
        println!(
            "{} snapshots, {} disks, {} chunks {}: {}",
            report.snapshots,
            report.disks,
            report.chunks_checked,
            if report.quick {
                "checked for existence"
            } else {
                "read and authenticated"
            },
            if report.is_ok() {
                "no problems".to_string()
            } else {
                format!("{} problems", report.problems.len())
            }
        );
    }
    Ok(ExitCode::from(if report.is_ok() {
        EXIT_OK
    } else {
        EXIT_ERROR
    }))
}

fn prune(ctx: &Context, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let rules = KeepRules {
        last: args.keep_last,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
    };
    if rules == KeepRules::default() {
        bail!("give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly");
    }
    let repo = open_repository(ctx)?;
    let report = repo.prune(&rules, args.dry_run)?;
    if ctx.global.json {
        print_json(&report)?;
    } else {
        for d in &report.plan.decisions {
            let action = if d.keep {
                format!("keep ({})", d.reasons.join(", "))
            } else if report.kept_in_use.contains(&d.id) {
                "keep (parent of a running backup)".to_string()
            } else if args.dry_run {
                "would delete".to_string()
            } else {
                "delete".to_string()
            };
            println!(
                "{}  {}  {:<20}  {action}",
                d.id,
                d.time.format("%Y-%m-%d %H:%M:%S"),
                d.vm
            );
        }
        println!(
            "{} snapshots {}; run `stillpoint repo gc` to free their chunks",
            if args.dry_run {
                report.plan.to_delete().len()
            } else {
                report.deleted.len()
            },
            if args.dry_run {
                "would be deleted"
            } else {
                "deleted"
            }
        );
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn gc(ctx: &Context, args: GcArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let report = repo.gc(args.dry_run)?;
    if ctx.global.json {
        print_json(&report)?;
    } else {
        println!(
            "{} chunks referenced; {} unreferenced chunks {} ({}), {} kept within the grace period; {} orphaned indexes, {} stale locks, {} temp files removed",
            report.referenced_chunks,
            report.deleted_chunks,
            if args.dry_run {
                "would be deleted"
            } else {
                "deleted"
            },
            bytesize::ByteSize(report.deleted_bytes),
            report.kept_young_chunks,
            report.deleted_indexes,
            report.removed_stale_locks,
            report.removed_temp_files
        );
    }
    Ok(ExitCode::from(EXIT_OK))
}
