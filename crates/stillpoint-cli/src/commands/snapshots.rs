//! `stillpoint snapshots [VM]`.

use std::process::ExitCode;

use clap::Args;

use crate::context::Context;
use crate::output::{EXIT_ERROR, EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only this VM.
    pub vm: Option<String>,
}

/// Lists what can be read; a manifest that cannot be read is named on stderr and makes the
/// command exit 1 (docs/exit-codes.md), after the readable snapshots are listed.
pub async fn run(ctx: &Context, args: SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let listing = repo.list_snapshots(args.vm.as_deref())?;
    let snapshots = &listing.snapshots;
    if ctx.global.json {
        print_json(snapshots)?;
    } else if snapshots.is_empty() {
        println!("no snapshots");
    } else {
        println!(
            "{:<16}  {:<19}  {:<20}  {:>10}  {:<11}  {:<11}  DISKS",
            "ID", "TIME (UTC)", "VM", "SIZE", "REQUESTED", "ACHIEVED"
        );
        for m in snapshots {
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
    }
    for bad in &listing.unreadable {
        eprintln!(
            "error: snapshot {} cannot be read: {} [object {}] (run `stillpoint repo verify`)",
            bad.id, bad.message, bad.object
        );
    }
    Ok(ExitCode::from(if listing.unreadable.is_empty() {
        EXIT_OK
    } else {
        EXIT_ERROR
    }))
}
