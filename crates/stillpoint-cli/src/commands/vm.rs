//! `stillpoint vm`: launch, list and stop local QEMU VMs running the test/demo guest.
//!
//! The work is done by `stillpoint-testvm`; this module parses flags and prints results.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Serialize;
use stillpoint_testvm::{
    BOOT_TIMEOUT, DiskSpec, GuestImage, LaunchOptions, LaunchedVm, StopOutcome, VmConfig, VmRecord,
};

use crate::context::Context;
use crate::output;

/// What `stillpoint vm --help` explains beyond the one-line summary (used in main.rs).
pub const VM_LONG_ABOUT: &str = "\
Launch, list and stop local QEMU VMs with guest agent and monitor sockets.

The VMs run the stillpoint test/demo guest: a Debian 12 cloud kernel, busybox, the real qemu-ga \
and sqlite3, with ext4 data disks mounted at /data, /data1, ... Each VM lives in \
<runtime root>/vms/<NAME>/ (qmp.sock, qga.sock, console.log, the disks, vm.json). The runtime \
root is runtime_dir from stillpoint.toml, else $STILLPOINT_RUNTIME_DIR, else \
$XDG_RUNTIME_DIR/stillpoint, else /tmp/stillpoint-<uid>; it is created 0700 and refused when \
another user owns it or group/others may write it. NAME is 1 to 64 letters, digits, -, _ or ., \
starting with a letter or digit. Other stillpoint commands (check, backup, freeze) find these VMs \
by NAME.

QEMU runs under TCG (software emulation); set STILLPOINT_ACCEL=kvm to use KVM.";

/// `stillpoint vm`: a group of subcommands.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start a VM in the background and print its sockets.
    ///
    /// With no flags this is the demo guest: one 256 MiB data disk at /data and the guest
    /// agent on. Returns once QEMU is up (the guest boots in a few seconds; add --wait to wait
    /// for it). The VM keeps running after this command exits; end it with `vm stop NAME`.
    Run(RunArgs),
    /// List the VMs under the runtime root: name, pid, running or stale, sockets.
    List,
    /// Stop a VM (QMP quit, then SIGTERM, then SIGKILL) and remove its runtime directory.
    Stop(StopArgs),
    /// Build (or find in the cache) the guest image and print where it is.
    ///
    /// Downloads the Debian packages with apt-get (no root needed) on first use. The image is
    /// cached in $STILLPOINT_GUEST_DIR, else <workspace>/target/stillpoint-guest.
    BuildGuest,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM name (letters, digits, `-`, `_`, `.`).
    pub name: String,

    /// Number of data disks (ext4, mounted at /data, /data1, …).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub disks: usize,

    /// Size of each data disk: bytes, or with a binary suffix K, M, G, T.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_size)]
    pub disk_size: u64,

    /// Run no guest agent: the VM then has no agent channel at all.
    #[arg(long)]
    pub no_agent: bool,

    /// An extra qemu-ga argument (repeat for several), e.g.
    /// `--qga-arg=--block-rpcs --qga-arg=guest-fsfreeze-freeze`.
    #[arg(long = "qga-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qga_args: Vec<String>,

    /// A script qemu-ga runs as its fsfreeze hook (with `freeze` or `thaw`); it needs a `#!`
    /// line and runs in the guest's busybox.
    #[arg(long, value_name = "FILE")]
    pub fsfreeze_hook: Option<PathBuf>,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = stillpoint_testvm::DEFAULT_MEMORY_MIB, value_name = "MIB")]
    pub memory: u32,

    /// Wait until the guest is ready (the agent answers; with --no-agent, /init says so).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM name.
    pub name: String,
}

fn parse_size(text: &str) -> Result<u64, String> {
    stillpoint_testvm::parse_disk_size(text).map_err(|error| error.to_string())
}

pub async fn run(ctx: &Context, args: VmArgs) -> anyhow::Result<ExitCode> {
    // The same root the qemu platform driver looks in (stillpoint.toml's runtime_dir, else
    // the environment rule of docs/local-vms.md).
    let root = ctx.runtime_root.clone();
    match args.command {
        VmCommand::Run(run) => run_vm(ctx, &root, run).await,
        VmCommand::List => list(ctx, &root),
        VmCommand::Stop(stop) => stop_vm(ctx, &root, &stop.name).await,
        VmCommand::BuildGuest => build_guest(ctx).await,
    }
}

async fn run_vm(ctx: &Context, root: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = VmConfig::new(&args.name);
    config.data_disks = vec![DiskSpec::qcow2(args.disk_size); args.disks];
    config.agent = !args.no_agent;
    config.qga_args = args.qga_args;
    config.memory_mib = args.memory;
    if let Some(path) = &args.fsfreeze_hook {
        let script = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the fsfreeze hook `{}`", path.display()))?;
        config.fsfreeze_hook = Some(script);
    }
    let options = LaunchOptions::detached(root, "stillpoint vm run");
    let vm = LaunchedVm::launch(config, &options).await?;
    if args.wait {
        vm.wait_until_ready(BOOT_TIMEOUT).await.with_context(|| {
            format!(
                "VM `{}` is running but not ready; see its console, or `stillpoint vm stop {}`",
                args.name, args.name
            )
        })?;
    }
    let record = vm.record();
    if ctx.global.json {
        output::print_json(record)?;
    } else {
        print_record(record, vm.dir(), args.wait);
    }
    Ok(ExitCode::from(output::EXIT_OK))
}

fn print_record(record: &VmRecord, dir: &Path, ready: bool) {
    let state = if ready { "ready" } else { "booting" };
    println!(
        "VM {} started (pid {}), guest {state}",
        record.name, record.pid
    );
    println!("  runtime dir   {}", dir.display());
    println!("  QMP socket    {}", record.qmp_socket.display());
    match &record.qga_socket {
        Some(socket) => println!("  agent socket  {}", socket.display()),
        None => println!("  agent socket  (none: agent off)"),
    }
    println!("  console       {}", record.console_log.display());
    for disk in &record.disks {
        println!(
            "  disk {:<8} {} ({} MiB, node {})",
            disk.device_id,
            disk.path.display(),
            disk.virtual_size >> 20,
            disk.node_name
        );
    }
    println!("Stop it with: stillpoint vm stop {}", record.name);
}

/// One line of `vm list --json`.
#[derive(Debug, Serialize)]
struct ListEntry {
    name: String,
    pid: Option<u32>,
    state: &'static str,
    qmp_socket: Option<PathBuf>,
    qga_socket: Option<PathBuf>,
    console_log: Option<PathBuf>,
    started_at: Option<String>,
    runtime_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

fn list(ctx: &Context, root: &Path) -> anyhow::Result<ExitCode> {
    let entries: Vec<ListEntry> = stillpoint_testvm::list_vms(root)?
        .into_iter()
        .map(|vm| ListEntry {
            state: if vm.running { "running" } else { "stale" },
            pid: vm.record.as_ref().map(|r| r.pid),
            qmp_socket: vm.record.as_ref().map(|r| r.qmp_socket.clone()),
            qga_socket: vm.record.as_ref().and_then(|r| r.qga_socket.clone()),
            console_log: vm.record.as_ref().map(|r| r.console_log.clone()),
            started_at: vm.record.as_ref().map(|r| r.started_at.clone()),
            name: vm.name,
            runtime_dir: vm.dir,
            problem: vm.problem,
        })
        .collect();
    if ctx.global.json {
        output::print_json(&entries)?;
        return Ok(ExitCode::from(output::EXIT_OK));
    }
    if entries.is_empty() {
        println!("no VMs under {}", root.join("vms").display());
        return Ok(ExitCode::from(output::EXIT_OK));
    }
    println!(
        "{:<16} {:>8} {:<8} {:<44} AGENT SOCKET",
        "NAME", "PID", "STATE", "QMP SOCKET"
    );
    let show = |path: &Option<PathBuf>| {
        path.as_ref()
            .map_or_else(|| "-".to_owned(), |path| path.display().to_string())
    };
    for entry in &entries {
        let pid = entry
            .pid
            .map_or_else(|| "-".to_owned(), |pid| pid.to_string());
        println!(
            "{:<16} {:>8} {:<8} {:<44} {}",
            entry.name,
            pid,
            entry.state,
            show(&entry.qmp_socket),
            show(&entry.qga_socket)
        );
        if let Some(problem) = &entry.problem {
            println!("  ({problem})");
        }
    }
    if entries.iter().any(|entry| entry.state == "stale") {
        println!("stale: QEMU is gone; `stillpoint vm stop NAME` removes the leftovers");
    }
    Ok(ExitCode::from(output::EXIT_OK))
}

async fn stop_vm(ctx: &Context, root: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let outcome = stillpoint_testvm::stop_vm(root, name).await?;
    let how = match outcome {
        StopOutcome::Quit => "quit",
        StopOutcome::Terminated => "terminated",
        StopOutcome::Killed => "killed",
        StopOutcome::WasNotRunning => "was-not-running",
    };
    if ctx.global.json {
        output::print_json(&serde_json::json!({ "name": name, "outcome": how }))?;
    } else {
        let text = match outcome {
            StopOutcome::Quit => "stopped (quit over QMP)",
            StopOutcome::Terminated => "stopped (needed SIGTERM)",
            StopOutcome::Killed => "stopped (needed SIGKILL)",
            StopOutcome::WasNotRunning => "was not running; leftovers removed",
        };
        println!("VM {name} {text}");
    }
    Ok(ExitCode::from(output::EXIT_OK))
}

async fn build_guest(ctx: &Context) -> anyhow::Result<ExitCode> {
    let image = tokio::task::spawn_blocking(GuestImage::ensure)
        .await
        .context("the guest build task failed")??;
    let manifest = image.manifest();
    if ctx.global.json {
        output::print_json(&serde_json::json!({
            "dir": image.dir(),
            "kernel": image.kernel(),
            "initramfs": image.initramfs(),
            "manifest": manifest,
        }))?;
    } else {
        println!(
            "guest image {} (built {})",
            image.dir().display(),
            manifest.built_at
        );
        println!(
            "  kernel     {} ({})",
            image.kernel().display(),
            manifest.kernel_release
        );
        println!(
            "  initramfs  {} ({} KiB)",
            image.initramfs().display(),
            manifest.initramfs_bytes >> 10
        );
        let versions = ["qemu-guest-agent", "busybox-static", "sqlite3"]
            .iter()
            .filter_map(|name| manifest.packages.get(*name).map(|v| format!("{name} {v}")))
            .collect::<Vec<_>>()
            .join(", ");
        println!("  packages   {versions}");
    }
    Ok(ExitCode::from(output::EXIT_OK))
}
