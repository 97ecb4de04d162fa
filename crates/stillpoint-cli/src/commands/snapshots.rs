//! `stillpoint snapshots [VM]`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;
use crate::output::{EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only this VM.
    pub vm: Option<String>,
}

pub async fn run(ctx: &Context, args: SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let snapshots = repo.snapshots(args.vm.as_deref())?;
    if ctx.global.json {
        print_json(&snapshots)?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    if snapshots.is_empty() {
        println!("no snapshots");
        return Ok(ExitCode::from(EXIT_OK));
    }
    println!(
        "{:<16}  {:<19}  {:<20}  {:>10}  {:<11}  {:<11}  DISKS",
        "ID", "TIME (UTC)", "VM", "SIZE", "REQUESTED", "ACHIEVED"
    );
    for m in &snapshots {
        let disks: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
        println!(
            "{:<16}  {:<19}  {:<20}  {:>10}  {:<11}  {:<11}  {}",
            m.id,
            m.time.format("%Y-%m-%d %H:%M:%S"),
            m.vm,
            bytesize::ByteSize(m.total_size()).to_string(),
            m.requested.as_deref().unwrap_or("-"),
            m.achieved.as_deref().unwrap_or("-"),
            disks.join(",")
        );
    }
    Ok(ExitCode::from(EXIT_OK))
}
