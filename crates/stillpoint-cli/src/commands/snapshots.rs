//! `stillpoint snapshots`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only this VM.
    pub vm: Option<String>,
}

pub async fn run(_ctx: &Context, _args: SnapshotsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint snapshots` is not implemented yet")
}
