//! `stillpoint bench`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: freeze, repo or capture.
    pub what: String,
}

pub async fn run(_ctx: &Context, _args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint bench` is not implemented yet")
}
