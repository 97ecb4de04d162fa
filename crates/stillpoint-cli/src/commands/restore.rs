//! `stillpoint restore`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot to restore.
    pub snapshot: String,
    /// Directory to write the disks into.
    #[arg(long)]
    pub to: std::path::PathBuf,
}

pub async fn run(_ctx: &Context, _args: RestoreArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint restore` is not implemented yet")
}
