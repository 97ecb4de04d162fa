//! `stillpoint backup`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The VMs to back up (NAME or PLATFORM:REF).
    #[arg(required = true)]
    pub vms: Vec<String>,
}

pub async fn run(_ctx: &Context, _args: BackupArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint backup` is not implemented yet")
}
