//! `stillpoint recipe`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// validate FILE
    pub action: Vec<String>,
}

pub async fn run(_ctx: &Context, _args: RecipeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint recipe` is not implemented yet")
}
