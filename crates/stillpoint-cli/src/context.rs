//! Global options, logging set-up and what every command receives (`Context`).

use std::path::PathBuf;

use clap::{ArgAction, Args};
use stillpoint_engine::freeze::GuardContext;
use stillpoint_engine::guardian::GuardianCommand;
use stillpoint_platform::Platforms;
use stillpoint_platform::qemu::QemuInventory;

use crate::config::LoadedConfig;

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Repository location (default: `repo` from stillpoint.toml, else ./stillpoint-repo).
    #[arg(long, global = true, env = "STILLPOINT_REPO", value_name = "PATH")]
    pub repo: Option<PathBuf>,

    /// Configuration file (default: ./stillpoint.toml if present).
    #[arg(long, global = true, env = "STILLPOINT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Read the repository passphrase from this file (else STILLPOINT_PASSWORD, else a prompt).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of human text; no progress bars.
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
}

/// What every command receives: the global options and the configuration, resolved.
#[derive(Debug)]
pub struct Context {
    pub global: GlobalArgs,
    pub config: LoadedConfig,
    /// Where launched VMs and freeze leases live.
    pub runtime_root: PathBuf,
}

impl Context {
    pub fn new(global: GlobalArgs) -> anyhow::Result<Self> {
        let config = LoadedConfig::load(global.config.as_deref())?;
        let runtime_root = config
            .config
            .runtime_dir
            .clone()
            .unwrap_or_else(stillpoint_platform::runtime::runtime_root);
        // It holds leases, agent and monitor sockets and scratch images with guest data in
        // clear: private to this user, or refused (docs/local-vms.md).
        stillpoint_platform::runtime::ensure_private(&runtime_root)?;
        Ok(Self {
            global,
            config,
            runtime_root,
        })
    }

    /// The repository: `--repo`, else `repo` from stillpoint.toml, else ./stillpoint-repo.
    #[allow(dead_code)]
    pub fn repo_path(&self) -> PathBuf {
        self.global
            .repo
            .clone()
            .or_else(|| self.config.config.repo.clone())
            .unwrap_or_else(|| PathBuf::from("stillpoint-repo"))
    }

    /// Every QEMU VM known by name (configured and launched).
    pub fn qemu_inventory(&self) -> QemuInventory {
        QemuInventory::new(self.config.qemu_vms(), self.runtime_root.clone())
    }

    /// The platform drivers, ready to resolve VM references.
    pub fn platforms(&self) -> Platforms {
        Platforms::new(self.qemu_inventory())
    }

    /// Where freeze leases live and how to start the guardian (this very binary).
    pub fn guard_context(&self) -> anyhow::Result<GuardContext> {
        Ok(GuardContext {
            runtime_root: self.runtime_root.clone(),
            config: self.config.path.clone(),
            guardian: GuardianCommand::current_exe()?,
        })
    }
}

/// Checks the VM that command-line argument `argument` (`VM`, `--name` …) names: the name
/// part of the reference becomes directory, socket and lease paths and the snapshot's VM name,
/// so it must pass the one name rule (`stillpoint_os::names::validate_name`) — `../x` never
/// reaches a path. A reference with an unknown platform is left to the resolver's error.
pub fn check_vm_argument(argument: &str, reference: &str) -> anyhow::Result<()> {
    if let Ok(vm) = stillpoint_platform::VmRef::parse(reference) {
        stillpoint_os::names::validate_name(argument, &vm.name)?;
    }
    Ok(())
}

/// Logs go to stderr so that stdout stays clean for `--json`.
pub fn init_logging(global: &GlobalArgs) {
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(crate::output::colour_on_stderr())
        .with_target(false)
        .init();
}
