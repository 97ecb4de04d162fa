//! `stillpoint check`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The VM (NAME or PLATFORM:REF).
    pub vm: String,
}

pub async fn run(_ctx: &Context, _args: CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint check` is not implemented yet")
}
