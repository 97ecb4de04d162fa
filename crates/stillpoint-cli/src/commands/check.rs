//! `stillpoint check VM`: which consistency level a VM can reach now, and why not the others.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use stillpoint_engine::backup::RecipeInput;
use stillpoint_engine::consistency::{self, AgentFacts, Assessment, RecipeFacts};
use stillpoint_engine::preflight::{self, PreflightReport};
use stillpoint_platform::RunState;

use crate::context::Context;
use crate::output::{self, EXIT_OK};

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 the check ran (the achievable level is in the output); 1 the VM \
    could not be looked at (unknown VM, not running — e.g. its monitor socket does not exist —, \
    monitor not answering)."
)]
pub struct CheckArgs {
    /// The VM (NAME or PLATFORM:NAME).
    pub vm: String,
    /// A recipe to assess the application level with (without one, application is out of reach).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
}

pub async fn run(ctx: &Context, args: CheckArgs) -> anyhow::Result<ExitCode> {
    crate::context::check_vm_argument("VM", &args.vm)?;
    let recipe = match &args.recipe {
        Some(path) => Some(recipe_facts(path)?),
        None => None,
    };
    let vm = ctx.platforms().resolve(&args.vm)?;
    let report = preflight::gather_with_leases(vm.as_ref(), recipe, Some(&ctx.runtime_root))
        .await
        .with_context(|| format!("cannot check VM `{}`", args.vm))?;
    // A VM that does not run cannot be backed up at any level (`backup` fails on it): saying
    // that crash consistency is reachable would be a lie.
    if report.facts.run_state == RunState::NotRunning {
        anyhow::bail!(
            "cannot check VM `{}`: it is not running ({}); nothing can be captured",
            args.vm,
            report.status_detail
        );
    }
    let assessment = consistency::assess(&report.facts);
    if ctx.global.json {
        output::print_json(&serde_json::json!({
            "vm": args.vm,
            "state": report.facts.run_state,
            "state_detail": report.status_detail,
            "agent": report.facts.agent,
            "achievable": assessment.achievable,
            "levels": assessment.levels,
            "indication": assessment.indication,
            "notes": assessment.notes,
        }))?;
    } else {
        print_human(&args.vm, &report, &assessment);
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// Loads and validates a recipe (every problem at once, with file:line:column).
pub fn load_recipe(path: &std::path::Path) -> anyhow::Result<RecipeInput> {
    load_recipe_with(path, &Default::default(), "backup")
}

/// [`load_recipe`] with template parameters filled and the workflow to run chosen.
pub fn load_recipe_with(
    path: &std::path::Path,
    parameters: &stillpoint_recipe::Parameters,
    workflow: &str,
) -> anyhow::Result<RecipeInput> {
    let valid = stillpoint_recipe::load_recipe_with(path, &Default::default(), parameters)
        .with_context(|| format!("recipe {} is not usable", path.display()))?;
    // Refused here, before any VM is touched.
    if let Some(message) = stillpoint_recipe::params::unset_message(&valid.recipe.parameters_unset)
    {
        anyhow::bail!("recipe {}: {message}", path.display());
    }
    for warning in &valid.warnings {
        tracing::warn!("{}", warning.render(&path.display().to_string()));
    }
    Ok(RecipeInput {
        path: path.to_path_buf(),
        recipe: valid.recipe,
        workflow: workflow.to_owned(),
    })
}

/// What the consistency decision needs to know about a recipe.
pub fn recipe_facts(path: &std::path::Path) -> anyhow::Result<RecipeFacts> {
    Ok(load_recipe(path)?.facts())
}

fn yes_no(value: bool) -> &'static str {
    if value { "enabled" } else { "DISABLED" }
}

fn print_human(vm: &str, report: &PreflightReport, assessment: &Assessment) {
    println!("VM {vm}: {}", report.status_detail);
    match &report.facts.agent {
        AgentFacts::NoChannel => println!("Guest agent: none (the VM has no agent channel)"),
        AgentFacts::Unreachable { reason } => println!("Guest agent: not answering ({reason})"),
        AgentFacts::Reachable(agent) => {
            println!("Guest agent: qemu-ga {}", agent.version);
            println!(
                "  freeze {}, freeze of listed mounts {}, thaw {}, guest-exec {}",
                yes_no(agent.freeze_enabled),
                yes_no(agent.freeze_list_enabled),
                yes_no(agent.thaw_enabled),
                yes_no(agent.exec_enabled)
            );
            if agent.already_frozen {
                println!("  the guest is FROZEN now");
            }
            match &agent.os {
                Some(os) => println!(
                    "Guest OS: {} ({}{})",
                    os.pretty_name.as_deref().unwrap_or("unknown"),
                    os.id,
                    os.kernel_release
                        .as_deref()
                        .map(|k| format!(", kernel {k}"))
                        .unwrap_or_default()
                ),
                None => println!("Guest OS: unknown (guest-get-osinfo failed)"),
            }
            if let Some(selinux) = &agent.selinux {
                println!("SELinux: {selinux}");
            }
            println!("Filesystems a freeze covers:");
            if agent.covered_filesystems.is_empty() {
                println!("  none reported by the agent");
            }
            for fs in &agent.covered_filesystems {
                println!("  {:<20} {:<8} {}", fs.mountpoint, fs.fs_type, fs.source);
            }
            match &agent.uncovered_filesystems {
                Some(uncovered) if uncovered.is_empty() => {
                    println!("Filesystems a freeze cannot cover (network, FUSE): none")
                }
                Some(uncovered) => {
                    println!("Filesystems a freeze cannot cover (network, FUSE):");
                    for fs in uncovered {
                        println!("  {:<20} {:<8} {}", fs.mountpoint, fs.fs_type, fs.source);
                    }
                }
                None => {
                    println!("Filesystems a freeze cannot cover: unknown (guest-exec unavailable)")
                }
            }
        }
    }
    println!("Achievable consistency: {}", assessment.achievable);
    for verdict in &assessment.levels {
        if verdict.achievable {
            println!("  {:<12} yes", verdict.level.as_str());
        } else {
            println!(
                "  {:<12} no: {}",
                verdict.level.as_str(),
                verdict.reasons.join("; ")
            );
        }
    }
    for note in &assessment.notes {
        println!("Note: {note}");
    }
}
