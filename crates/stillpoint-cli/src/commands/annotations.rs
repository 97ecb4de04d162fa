//! `stillpoint annotations`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct AnnotationsArgs {
    /// The VM (NAME or PLATFORM:REF).
    pub vm: String,
}

pub async fn run(_ctx: &Context, _args: AnnotationsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`stillpoint annotations` is not implemented yet")
}
