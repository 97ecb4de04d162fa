//! stillpoint's benchmarks: the harnesses behind `stillpoint bench freeze|repo|capture`.
//!
//! # Design
//!
//! - **One room for measuring.** Each harness ([`freeze`], [`repo`], [`capture`]) takes plain
//!   options, runs real components (the test guest under QEMU, qemu-ga, the engine, restic,
//!   borg, qemu-img) and returns a report: `Serialize` for `--json` (the whole result, every
//!   round included) and `Display` for the human table. The CLI parses arguments, calls the
//!   harness and prints the report; it holds no measuring code.
//! - **Peers in the same run.** Every benchmark measures stillpoint side by side with a peer
//!   (restic and borg; the naive freeze → copy → thaw sequence; `backup-image`) and reports
//!   ratios, so that a slow or busy machine moves both sides alike.
//! - **One table of targets.** The targets printed beside the figures live in one table in
//!   `docs/benchmarks.md`, embedded at build time and parsed when a benchmark starts
//!   ([`targets`]); the code holds no copy of the numbers, only which figure each target
//!   judges, in which unit and direction.
//! - **Inside the `stillpoint` binary.** The harnesses start the running executable again
//!   (`std::env::current_exe`): as the [`measure`] helper (`stillpoint bench measure`, which
//!   times exactly one command and its peak RSS), as `backup-image`, and as the engine's freeze
//!   guardian. So they are called from the `stillpoint` binary only, which routes those
//!   commands.
//! - **Timings are reported, never judged by tests.** Tests check that each benchmark runs
//!   and reports every number; `met` / `MISSED` is for the person reading the output.
//! - The benchmark repositories use a fixed passphrase ([`PASSWORD`]), passed to child
//!   `stillpoint`, restic and borg processes in their environment on purpose: it protects
//!   nothing.
//!
//! Errors: the harnesses return `anyhow::Result` with context (see [`error`] for why); the
//! targets table has the typed [`TargetsError`].

pub mod capture;
pub mod error;
pub mod freeze;
pub mod measure;
pub mod repo;
pub mod stats;
pub mod targets;

pub use error::TargetsError;

/// The passphrase of the benchmarks' repositories (encrypted, as users run them; not a secret).
pub const PASSWORD: &str = "bench-passphrase-not-secret";

/// Where a harness reports progress while it runs, one line at a time.
pub trait Progress: Send + Sync {
    fn line(&self, line: &str);
}

/// Progress lines on stderr.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Progress for Stderr {
    fn line(&self, line: &str) {
        eprintln!("{line}");
    }
}

/// No progress lines (`--json` runs that keep stderr quiet).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn line(&self, _line: &str) {}
}
