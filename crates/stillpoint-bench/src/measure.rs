//! The hidden `stillpoint bench measure` helper: runs one command and reports its wall time
//! and peak RSS, so that stillpoint, restic and borg are all measured the same way.
//!
//! The helper runs as its own process (the `stillpoint` binary, started by
//! [`crate::repo`]'s runner) because `getrusage(RUSAGE_CHILDREN)` is per process: in a fresh
//! helper whose only child is the measured command, the peak RSS it reports is exactly that
//! command's.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The `stillpoint` arguments that reach [`measure`] (the CLI routes them here).
pub const MEASURE_ARGS: [&str; 2] = ["bench", "measure"];

/// What the helper reports, as one line of JSON on stdout.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Measurement {
    pub seconds: f64,
    pub max_rss_kib: u64,
    pub success: bool,
}

/// One command to measure.
#[derive(Debug, Clone)]
pub struct MeasureCommand {
    /// Where the command's stdout and stderr go.
    pub log: PathBuf,
    /// The command's working directory.
    pub cwd: PathBuf,
    /// Include a sync(2) after the command in its time (restores: time until durable).
    pub sync_after: bool,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Runs the command and measures it. Must run in a process that waits for no other child.
pub fn measure(args: &MeasureCommand) -> anyhow::Result<Measurement> {
    let program = args.command.first().context("no command to measure")?;
    let log = File::create(&args.log)
        .with_context(|| format!("cannot create the log {}", args.log.display()))?;
    let started = Instant::now();
    let status = Command::new(program)
        .args(&args.command[1..])
        .current_dir(&args.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if args.sync_after {
        nix::unistd::sync();
    }
    let seconds = started.elapsed().as_secs_f64();
    // The only child this process ever waited for is the command: its peak RSS is this.
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    Ok(Measurement {
        seconds,
        max_rss_kib: usage.max_rss() as u64,
        success: status.success(),
    })
}
