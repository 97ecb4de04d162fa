//! `stillpoint repo`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct RepoArgs {
    /// init | verify | prune | gc | stats
    pub action: Vec<String>,
}

pub async fn run(_ctx: &Context, _args: RepoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint repo` is not implemented yet")
}
