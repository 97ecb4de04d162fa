//! `stillpoint vm`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct VmArgs {
    /// run | list | stop
    pub action: Vec<String>,
}

pub async fn run(_ctx: &Context, _args: VmArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint vm` is not implemented yet")
}
