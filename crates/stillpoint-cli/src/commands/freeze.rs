//! `stillpoint freeze` / `unfreeze`, with KubeVirt virt-freezer's flags and exit codes, and the
//! hidden guardian process that thaws a guest whose freezer died.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct FreezeArgs {
    /// The VM (virt-freezer: the VMI name).
    #[arg(long)]
    pub name: String,
    /// Namespace (KubeVirt); ignored on local platforms.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Thaw automatically after this many seconds unless `unfreeze` came first; 0 disables.
    #[arg(long = "unfreezeTimeoutSeconds", default_value_t = 300)]
    pub unfreeze_timeout_seconds: u64,
}

#[derive(Debug, Args)]
pub struct UnfreezeArgs {
    /// The VM (virt-freezer: the VMI name).
    #[arg(long)]
    pub name: String,
    /// Namespace (KubeVirt); ignored on local platforms.
    #[arg(long)]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct GuardianArgs {
    /// The lease file the guardian watches.
    #[arg(long)]
    pub lease: std::path::PathBuf,
}

pub async fn run_freeze(_ctx: &Context, _args: FreezeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint freeze` is not implemented yet")
}

pub async fn run_unfreeze(_ctx: &Context, _args: UnfreezeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint unfreeze` is not implemented yet")
}

pub async fn run_guardian(_ctx: &Context, _args: GuardianArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the freeze guardian is not implemented yet")
}
