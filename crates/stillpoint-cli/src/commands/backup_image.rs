//! `stillpoint backup-image`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct BackupImageArgs {
    /// The disk image file to back up.
    pub file: std::path::PathBuf,
    /// The name the snapshot is filed under (as a VM name).
    #[arg(long)]
    pub name: String,
}

pub async fn run(_ctx: &Context, _args: BackupImageArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint backup-image` is not implemented yet")
}
