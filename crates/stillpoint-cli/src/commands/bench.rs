//! `stillpoint bench freeze|repo|capture`: the arguments of the benchmarks, which live in the
//! `stillpoint-bench` crate (docs/benchmarks.md), and the printing of their reports.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use stillpoint_bench::capture::{CaptureBench, WriterOn};
use stillpoint_bench::freeze::FreezeBench;
use stillpoint_bench::measure::{self, MeasureCommand};
use stillpoint_bench::repo::RepoBench;
use stillpoint_bench::{Progress, Silent, Stderr};

use crate::commands::repo::parse_size;
use crate::context::Context;
use crate::output::{EXIT_OK, print_json};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Freeze and thaw latency, and the stall a writer in the guest sees, over many rounds.
    Freeze(FreezeBenchArgs),
    /// Repository throughput, memory and size against restic and borg.
    Repo(RepoBenchArgs),
    /// The stall a guest writer sees during a backup against freeze → copy → thaw, copy
    /// throughput against backup-image, and a 1 % incremental against a full backup.
    Capture(CaptureBenchArgs),
    /// Internal: run a command, print its wall time and peak RSS as JSON.
    #[command(hide = true)]
    Measure(MeasureArgs),
}

#[derive(Debug, Args)]
pub struct FreezeBenchArgs {
    /// Freeze → thaw rounds per phase.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Pause between rounds, in milliseconds (lets the writer dirty some data again).
    #[arg(long, default_value_t = 300)]
    pub gap_ms: u64,
}

#[derive(Debug, Args)]
pub struct RepoBenchArgs {
    /// Image size.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub size: u64,
    /// Working directory (default: a fresh temporary directory under /var/tmp, removed after).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Skip restic and borg (for a quick look at our own numbers).
    #[arg(long)]
    pub only_ours: bool,
}

#[derive(Debug, Args)]
pub struct CaptureBenchArgs {
    /// Data disk sizes, comma-separated (each configuration boots a VM with disks of one size).
    #[arg(long, value_delimiter = ',', default_value = "256MiB,4GiB", value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Data disk counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub disks: Vec<usize>,
    /// Rounds per configuration, of our backup and of the naive sequence each.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Percent of every data disk filled with incompressible data before boot.
    #[arg(long, default_value_t = 50)]
    pub fill_percent: u8,
    /// Pause between rounds, in milliseconds (the writer dirties data again).
    #[arg(long, default_value_t = 300)]
    pub gap_ms: u64,
    /// Rounds of the copy phase (full, 1 % incremental, backup-image), at most --rounds.
    #[arg(long, default_value_t = 3)]
    pub copy_rounds: usize,
    /// Where the stall writer appends: `data` — /data only (the first disk); `all-disks` — one
    /// loop appending to a file on every data disk in turn, so it also meets the file systems
    /// the agent freezes first and thaws last.
    #[arg(long, value_enum, default_value_t = WriterOnArg::Data)]
    pub writer_on: WriterOnArg,
    /// Working directory, kept short (default: a fresh directory under /var/tmp, removed after).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// `--writer-on` (the CLI's spelling of [`WriterOn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriterOnArg {
    Data,
    AllDisks,
}

impl From<WriterOnArg> for WriterOn {
    fn from(arg: WriterOnArg) -> Self {
        match arg {
            WriterOnArg::Data => WriterOn::Data,
            WriterOnArg::AllDisks => WriterOn::AllDisks,
        }
    }
}

#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Where the command's stdout and stderr go.
    #[arg(long)]
    pub log: PathBuf,
    /// Working directory of the command.
    #[arg(long)]
    pub cwd: PathBuf,
    /// Include a sync(2) after the command in its time (restores: time until durable).
    #[arg(long)]
    pub sync_after: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(ctx: &Context, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let json = ctx.global.json;
    // With --json the VM benches keep stderr quiet; `bench repo` always shows its steps.
    let progress: &dyn Progress = if json { &Silent } else { &Stderr };
    match args.command {
        BenchCommand::Freeze(a) => {
            let bench = FreezeBench {
                rounds: a.rounds,
                gap: Duration::from_millis(a.gap_ms),
            };
            let report = stillpoint_bench::freeze::run(&bench, progress).await?;
            print_report(json, &report)
        }
        BenchCommand::Capture(a) => {
            let bench = CaptureBench {
                sizes: a.sizes,
                disks: a.disks,
                rounds: a.rounds,
                fill_percent: a.fill_percent,
                gap: Duration::from_millis(a.gap_ms),
                copy_rounds: a.copy_rounds,
                writer_on: a.writer_on.into(),
                workdir: a.workdir,
            };
            let report = stillpoint_bench::capture::run(&bench, progress).await?;
            print_report(json, &report)
        }
        BenchCommand::Repo(a) => {
            let bench = RepoBench {
                size: a.size,
                workdir: a.workdir,
                only_ours: a.only_ours,
            };
            let report = stillpoint_bench::repo::run(&bench, &Stderr)?;
            print_report(json, &report)
        }
        BenchCommand::Measure(a) => {
            let measured = measure::measure(&MeasureCommand {
                log: a.log,
                cwd: a.cwd,
                sync_after: a.sync_after,
                command: a.command,
            })?;
            // One line: the parent reads it back (`stillpoint_bench::repo`).
            println!("{}", serde_json::to_string(&measured)?);
            Ok(ExitCode::from(EXIT_OK))
        }
    }
}

/// The whole report as JSON, or the human one.
fn print_report<R: serde::Serialize + std::fmt::Display>(
    json: bool,
    report: &R,
) -> anyhow::Result<ExitCode> {
    if json {
        print_json(report)?;
    } else {
        print!("{report}");
    }
    Ok(ExitCode::from(EXIT_OK))
}
