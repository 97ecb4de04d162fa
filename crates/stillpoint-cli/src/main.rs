//! The `stillpoint` command line.
//!
//! Each command group lives in its own module under `commands/`, which owns its clap
//! arguments and its `run` function; this file only wires them together, sets up logging
//! and turns errors into messages and exit codes (see `docs/exit-codes.md`).

mod commands;
mod config;
mod context;
#[cfg(feature = "failpoints")]
mod failpoints;
mod output;
mod password;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::context::{Context, GlobalArgs};

/// Consistent backups of running virtual machines.
///
/// stillpoint plans the consistency level (crash, filesystem, application), checks the guest,
/// runs the application's quiesce steps, freezes the guest only while the capture starts,
/// copies the data into a deduplicating, encrypted repository and records what it achieved.
#[derive(Debug, Parser)]
#[command(
    name = "stillpoint",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tell which consistency level a VM can reach, and why not the others.
    Check(commands::check::CheckArgs),
    /// Back up one or more VMs at the requested consistency level.
    Backup(commands::backup::BackupArgs),
    /// List the snapshots in the repository with their achieved consistency.
    Snapshots(commands::snapshots::SnapshotsArgs),
    /// Restore a snapshot's disks (and what is needed to start the VM) into a directory.
    Restore(commands::restore::RestoreArgs),
    /// Freeze a VM's filesystems through its guest agent (virt-freezer compatible flags).
    Freeze(commands::freeze::FreezeArgs),
    /// Thaw a VM's filesystems (virt-freezer compatible flags).
    Unfreeze(commands::freeze::UnfreezeArgs),
    /// Manage the repository: init, verify, prune, gc, stats.
    Repo(commands::repo::RepoArgs),
    /// Work with recipes (application-consistency workflows).
    Recipe(commands::recipe::RecipeArgs),
    /// Launch, list and stop local QEMU VMs with agent and monitor sockets.
    #[command(long_about = commands::vm::VM_LONG_ABOUT)]
    Vm(commands::vm::VmArgs),
    /// Print the Velero hook annotations to put on a virt-launcher pod for a consistency level.
    Annotations(commands::annotations::AnnotationsArgs),
    /// Back up a plain disk image file.
    BackupImage(commands::backup_image::BackupImageArgs),
    /// Benchmarks that print ratios against peers measured in the same run.
    Bench(commands::bench::BenchArgs),
    /// The embedded default: back up the demo VM at every level while workloads run in it,
    /// restore, verify from the host, boot-test, and print what it proved.
    Demo(commands::demo::DemoArgs),
    /// Internal: the freeze guardian process (started by `freeze` and `backup`).
    #[command(hide = true, name = "__guardian")]
    Guardian(commands::freeze::GuardianArgs),
}

fn main() -> ExitCode {
    // SAFETY: nothing else runs yet — `main` starts single-threaded and the async runtime (the
    // first thread besides this one) is built below — so no thread can read the environment
    // while it changes.
    #[allow(unsafe_code)]
    let secrets = unsafe { stillpoint_os::secrets::take_from_environment() };
    password::keep_environment_secrets(secrets);
    let cli = Cli::parse();
    context::init_logging(&cli.global);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    #[cfg(feature = "failpoints")]
    let _failpoints = failpoints::setup(&runtime);
    let json = cli.global.json;
    let result = runtime.block_on(async move {
        let ctx = Context::new(cli.global)?;
        match cli.command {
            Command::Check(args) => commands::check::run(&ctx, args).await,
            Command::Backup(args) => commands::backup::run(&ctx, args).await,
            Command::Snapshots(args) => commands::snapshots::run(&ctx, args).await,
            Command::Restore(args) => commands::restore::run(&ctx, args).await,
            Command::Freeze(args) => commands::freeze::run_freeze(&ctx, args).await,
            Command::Unfreeze(args) => commands::freeze::run_unfreeze(&ctx, args).await,
            Command::Repo(args) => commands::repo::run(&ctx, args).await,
            Command::Recipe(args) => commands::recipe::run(&ctx, args).await,
            Command::Vm(args) => commands::vm::run(&ctx, args).await,
            Command::Annotations(args) => commands::annotations::run(&ctx, args).await,
            Command::BackupImage(args) => commands::backup_image::run(&ctx, args).await,
            Command::Bench(args) => commands::bench::run(&ctx, args).await,
            Command::Demo(args) => commands::demo::run(&ctx, args).await,
            Command::Guardian(args) => commands::freeze::run_guardian(&ctx, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            output::print_error(&error, json);
            ExitCode::from(output::EXIT_ERROR)
        }
    }
}
