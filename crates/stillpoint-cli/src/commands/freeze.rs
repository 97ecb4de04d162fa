//! `stillpoint freeze` / `unfreeze`, with KubeVirt virt-freezer's flags and exit codes, and the
//! hidden guardian process that thaws a guest whose freezer died.
//!
//! Like virt-freezer, both exit 0 when the VM has no guest agent or is not running (saying
//! so), so they can replace it in Velero hook annotations; 1 on any error.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use stillpoint_engine::freeze::{self, FreezeOutcome, UnfreezeOutcome};
use stillpoint_engine::guardian::{self, GUARDIAN_READY, GuardianOutcome};
use stillpoint_platform::Platforms;
use stillpoint_platform::qemu::QemuInventory;

use crate::config::LoadedConfig;
use crate::context::Context;
use crate::output::{self, EXIT_OK};

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 frozen (also: already frozen, no guest agent, VM not running — \
    nothing to do, as with virt-freezer); 1 error. A guardian process thaws the guest after \
    --unfreezeTimeoutSeconds, also if this command is killed; 0 disables that."
)]
pub struct FreezeArgs {
    /// The VM (virt-freezer: the VMI name).
    #[arg(long)]
    pub name: String,
    /// Namespace (KubeVirt); not used on local platforms.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Thaw automatically after this many seconds unless `unfreeze` came first; 0 disables.
    #[arg(
        long = "unfreezeTimeoutSeconds",
        default_value_t = 300,
        value_name = "N"
    )]
    pub unfreeze_timeout_seconds: u64,
    /// How long the agent's freeze call may take (a guest fsfreeze hook may flush an
    /// application); past it the freeze is abandoned and the guest thawed as soon as possible.
    #[arg(long = "freezeTimeoutSeconds", default_value_t = 60, value_name = "N")]
    pub freeze_timeout_seconds: u64,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 thawed (also: was not frozen, no guest agent, VM not running); 1 error."
)]
pub struct UnfreezeArgs {
    /// The VM (virt-freezer: the VMI name).
    #[arg(long)]
    pub name: String,
    /// Namespace (KubeVirt); not used on local platforms.
    #[arg(long)]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct GuardianArgs {
    /// The lease file the guardian watches.
    #[arg(long)]
    pub lease: std::path::PathBuf,
}

/// The VM a virt-freezer style `--name`/`--namespace` pair names. Only KubeVirt has
/// namespaces, and its driver is not in this build: on local platforms the name alone
/// identifies the VM and the namespace is accepted (so hook annotations work) but unused.
fn vm_reference(name: &str, namespace: Option<&str>) -> String {
    if let Some(namespace) = namespace {
        tracing::debug!("--namespace {namespace} is not used on local platforms");
    }
    name.to_string()
}

pub async fn run_freeze(ctx: &Context, args: FreezeArgs) -> anyhow::Result<ExitCode> {
    crate::context::check_vm_argument("--name", &args.name)?;
    let reference = vm_reference(&args.name, args.namespace.as_deref());
    let vm = ctx.platforms().resolve(&reference)?;
    let unfreeze_timeout = (args.unfreeze_timeout_seconds > 0)
        .then(|| Duration::from_secs(args.unfreeze_timeout_seconds));
    let outcome = freeze::freeze_vm(
        vm.as_ref(),
        &ctx.guard_context()?,
        unfreeze_timeout,
        Duration::from_secs(args.freeze_timeout_seconds),
    )
    .await
    .with_context(|| format!("cannot freeze VM `{reference}`"))?;
    if ctx.global.json {
        output::print_json(&serde_json::json!({ "vm": reference, "result": outcome }))?;
    } else {
        match &outcome {
            FreezeOutcome::Frozen {
                filesystems,
                took_ms,
                auto_thaw_at_ms,
                guardian_pid,
            } => {
                println!("Froze {filesystems} filesystem(s) of VM {reference} in {took_ms} ms.");
                match (auto_thaw_at_ms, guardian_pid) {
                    (Some(at), Some(pid)) => println!(
                        "The guardian (pid {pid}) thaws it in {} s unless `stillpoint unfreeze --name {}` comes first.",
                        at.saturating_sub(guardian::now_ms()).div_ceil(1000),
                        args.name
                    ),
                    _ => println!(
                        "No automatic thaw (--unfreezeTimeoutSeconds 0): it stays frozen until `stillpoint unfreeze --name {}`.",
                        args.name
                    ),
                }
            }
            FreezeOutcome::AlreadyFrozen => {
                println!(
                    "VM {reference} is already frozen; nothing was stacked and no timer was reset."
                )
            }
            FreezeOutcome::NoAgent { reason } => {
                println!("No guest agent on VM {reference} ({reason}): nothing to freeze.")
            }
            FreezeOutcome::NotRunning { detail } => {
                println!("VM {reference} is not running ({detail}): no need to freeze.")
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

pub async fn run_unfreeze(ctx: &Context, args: UnfreezeArgs) -> anyhow::Result<ExitCode> {
    crate::context::check_vm_argument("--name", &args.name)?;
    let reference = vm_reference(&args.name, args.namespace.as_deref());
    let vm = ctx.platforms().resolve(&reference)?;
    let outcome = freeze::unfreeze_vm(vm.as_ref(), &ctx.guard_context()?)
        .await
        .with_context(|| format!("cannot unfreeze VM `{reference}`"))?;
    if ctx.global.json {
        output::print_json(&serde_json::json!({ "vm": reference, "result": outcome }))?;
    } else {
        match &outcome {
            UnfreezeOutcome::Thawed {
                filesystems,
                took_ms,
            } => {
                println!("Thawed {filesystems} filesystem(s) of VM {reference} in {took_ms} ms.")
            }
            UnfreezeOutcome::WasNotFrozen => {
                println!("VM {reference} was not frozen; nothing to thaw.")
            }
            UnfreezeOutcome::NoAgent { reason } => {
                println!("No guest agent on VM {reference} ({reason}): nothing to thaw.")
            }
            UnfreezeOutcome::NotRunning { detail } => {
                println!("VM {reference} is not running ({detail}): nothing to thaw.")
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// The guardian process: detaches into its own session, reports ready, then watches its
/// lease until it is released or the guest must be thawed. Its log is the lease's
/// `.guardian.log` (stderr).
pub async fn run_guardian(_ctx: &Context, args: GuardianArgs) -> anyhow::Result<ExitCode> {
    // A new session: signals to the freezer's process group or terminal do not reach us.
    let _ = nix::unistd::setsid();
    let lease = guardian::read_lease(&args.lease)?
        .with_context(|| format!("no lease at {}", args.lease.display()))?;
    let config = LoadedConfig::load(lease.config.as_deref())?;
    let platforms = Platforms::new(QemuInventory::new(
        config.qemu_vms(),
        lease.runtime_root.clone(),
    ));
    let vm = platforms.resolve(&lease.vm)?;

    println!("{GUARDIAN_READY}");
    // Nobody reads our stdout after this line; make later writes harmless.
    redirect_stdout_to_null();
    eprintln!(
        "{} guardian {} watches {} of VM {} (holder pid {}, deadline {:?})",
        timestamp(),
        std::process::id(),
        if lease.release_capture {
            "the capture"
        } else if lease.thaw {
            "the freeze"
        } else {
            "the pause"
        },
        lease.vm,
        lease.holder_pid,
        lease.deadline_ms
    );

    let outcome = freeze::guard(&args.lease, &lease, vm.as_ref()).await;
    match outcome {
        Ok(GuardianOutcome::Released) => eprintln!("{} released: nothing to do", timestamp()),
        Ok(GuardianOutcome::Thawed {
            reason,
            filesystems,
        }) => {
            eprintln!(
                "{} thawed {filesystems} filesystem(s) of VM {}: {reason}",
                timestamp(),
                lease.vm
            )
        }
        Ok(GuardianOutcome::NothingToThaw { reason, detail }) => {
            eprintln!("{} {reason}, but nothing to do: {detail}", timestamp())
        }
        Ok(GuardianOutcome::CaptureReleased { reason, steps }) => {
            eprintln!(
                "{} released the capture of VM {}: {reason}; {} step(s){}",
                timestamp(),
                lease.vm,
                steps.len(),
                steps
                    .iter()
                    .map(|step| format!("\n  {step}"))
                    .collect::<String>()
            )
        }
        Err(error) => {
            eprintln!("{} {error:#}", timestamp());
            return Ok(ExitCode::from(output::EXIT_ERROR));
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn redirect_stdout_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
