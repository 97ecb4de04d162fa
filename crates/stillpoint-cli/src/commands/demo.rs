//! `stillpoint demo`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct DemoArgs {}

pub async fn run(_ctx: &Context, _args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint demo` is not implemented yet")
}
