//! `stillpoint recipe`: check a recipe (every problem, with `file:line:column`), show the
//! plan a workflow resolves to, and run the two halves of its backup workflow as Velero's
//! pre and post backup hooks (`recipe run --phase pre|post`, what `stillpoint annotations`
//! writes for the application level).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use stillpoint_engine::recipe_phase::{self, Phase, PhaseEnv, PhaseReport};
use stillpoint_recipe::diagnostic::has_errors;
use stillpoint_recipe::{
    DiskInfo, Parameters, PlanOptions, Platform, Severity, ValidateOptions, check_any_source,
    check_any_source_with, plan_workflow,
};

use crate::context::Context;
use crate::output::{EXIT_DEGRADED, EXIT_ERROR, EXIT_OK, print_json};

#[derive(Debug, Args)]
pub struct RecipeArgs {
    #[command(subcommand)]
    pub command: RecipeCommand,
}

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Check a recipe, or a Pod manifest with Velero hook annotations: prints every problem as
    /// FILE:LINE:COLUMN and exits 1 when there is an error.
    Validate(ValidateArgs),
    /// Print the steps a workflow runs, with every default (timeouts, onError, essential) applied.
    Plan(PlanArgs),
    /// Run half of a recipe's backup workflow, as a Velero backup hook: `--phase pre` runs the
    /// steps before the capture and leaves the guest frozen for the platform's snapshot,
    /// `--phase post` thaws and runs the rest.
    Run(RunArgs),
    /// Find locks that do not hold: ops that take a session-scoped lock (FLUSH TABLES WITH READ
    /// LOCK, pg_backup_start …) or freeze a filesystem in a one-shot command. Exits 3 when it
    /// finds one, 1 when the file cannot be read or is not a valid recipe.
    Lint(LintArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "The pre phase runs the backup workflow's steps before its capture step \
    (e.g. take and check a database lock, held by a background op), then freezes the guest and \
    exits with the guest frozen and the background ops still running in the guest; their guest \
    PIDs and the inverse ops still owed go to a state file under the runtime directory. A \
    guardian thaws the guest after --unfreezeTimeoutSeconds if the post phase does not come. \
    The post phase thaws first (always, even without a state file), then runs the steps after \
    the capture step, ends the handed-over ops, and undoes what is owed if a step fails.\n\n\
    Exit codes: 0 done; 1 a step failed or nothing could run (a failed pre phase has undone \
    what it did); 3 (post) done, but the guest was no longer frozen when the post phase came, \
    so the snapshot may not be application-consistent."
)]
pub struct RunArgs {
    /// The recipe.
    pub file: PathBuf,
    /// The workflow whose halves run (any name the recipe gives its backup workflow).
    #[arg(long, default_value = "backup", value_name = "NAME")]
    pub workflow: String,
    #[command(flatten)]
    pub parameters: ParameterArgs,
    /// Which half: `pre` (steps before the capture, then freeze) or `post` (thaw, then the
    /// steps after the capture).
    #[arg(long, value_enum)]
    pub phase: PhaseArg,
    /// The VM (virt-freezer's and the annotations' `--name`).
    #[arg(long, visible_alias = "vm", value_name = "VM")]
    pub name: String,
    /// Namespace (KubeVirt); not used on local platforms.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Pre: thaw automatically this many seconds after the freeze unless the post phase came
    /// first.
    #[arg(
        long = "unfreezeTimeoutSeconds",
        default_value_t = 300,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub unfreeze_timeout_seconds: u64,
    /// Pre: how long the agent's freeze call may take.
    #[arg(long = "freezeTimeoutSeconds", default_value_t = 60, value_name = "N")]
    pub freeze_timeout_seconds: u64,
}

/// Values for a recipe's template parameters (`${NAME}` in names, namespaces and selectors).
#[derive(Debug, Clone, Default, Args)]
pub struct ParameterArgs {
    /// Fill the template parameter `${NAME}` with VALUE (repeatable; wins over --values).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Fill template parameters from FILE: one NAME=VALUE a line (`#` comments, blank lines
    /// and a leading `export` allowed, as in the .env files envsubst users keep).
    #[arg(long = "values", value_name = "FILE")]
    pub values: Option<PathBuf>,
}

impl ParameterArgs {
    /// The parameters: the values file first, then each --set in order.
    pub fn parameters(&self) -> anyhow::Result<Parameters> {
        let mut parameters = Parameters::new();
        if let Some(file) = &self.values {
            let text = read(file)?;
            parameters
                .insert_file_text(&text)
                .map_err(|(line, message)| {
                    anyhow::anyhow!("{}:{line}: {message}", file.display())
                })?;
        }
        for assignment in &self.set {
            parameters
                .insert_assignment(assignment)
                .map_err(|message| anyhow::anyhow!("--set {assignment}: {message}"))?;
        }
        Ok(parameters)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PhaseArg {
    Pre,
    Post,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The recipe (kind: Recipe) or Pod manifest (kind: Pod) to check.
    pub file: PathBuf,
    /// The platform the recipe will run on: scale hooks and resource groups need kubevirt.
    #[arg(long, default_value = "qemu", value_parser = parse_platform)]
    pub platform: Platform,
    /// A disk of the VM (repeatable): then a volume group that selects none of them is an error.
    #[arg(long = "disk", value_name = "NAME")]
    pub disks: Vec<String>,
    #[command(flatten)]
    pub parameters: ParameterArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Consistency {
    Crash,
    Filesystem,
    Application,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub file: PathBuf,
    /// The workflow to plan.
    #[arg(long, default_value = "backup")]
    pub workflow: String,
    /// The consistency level: the capture freezes the guest for filesystem and application.
    #[arg(long, value_enum, default_value_t = Consistency::Application)]
    pub consistency: Consistency,
    #[arg(long, default_value = "qemu", value_parser = parse_platform)]
    pub platform: Platform,
    #[command(flatten)]
    pub parameters: ParameterArgs,
}

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse()
}

pub async fn run(ctx: &Context, args: RecipeArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        RecipeCommand::Validate(args) => validate(ctx, args),
        RecipeCommand::Plan(args) => plan(ctx, args),
        RecipeCommand::Run(args) => run_phase(ctx, args).await,
        RecipeCommand::Lint(args) => lint(ctx, args),
    }
}

async fn run_phase(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(namespace) = &args.namespace {
        tracing::debug!("--namespace {namespace} is not used on local platforms");
    }
    crate::context::check_vm_argument("--name", &args.name)?;
    // Loaded before the VM is looked at: a recipe that cannot run (a parameter not filled)
    // stops the pre phase before anything happens.
    let loaded = args.parameters.parameters().and_then(|parameters| {
        crate::commands::check::load_recipe_with(&args.file, &parameters, &args.workflow)
    });
    let loaded = match (loaded, args.phase) {
        (Err(error), PhaseArg::Pre) => return Err(error),
        (loaded, _) => loaded,
    };
    let vm = ctx.platforms().resolve(&args.name)?;
    let env = PhaseEnv {
        guard: ctx.guard_context()?,
        runtime_root: ctx.runtime_root.clone(),
        freeze_timeout: Duration::from_secs(args.freeze_timeout_seconds),
        unfreeze_timeout: Duration::from_secs(args.unfreeze_timeout_seconds),
    };
    let recipe = match loaded {
        Ok(recipe) => recipe,
        Err(error) => {
            if matches!(args.phase, PhaseArg::Post) {
                // Thaw always, even when the recipe cannot be read.
                let thawed = stillpoint_engine::freeze::unfreeze_vm(vm.as_ref(), &env.guard).await;
                return Err(error.context(match thawed {
                    Ok(outcome) => format!(
                        "the post phase cannot run its steps (the guest was thawed first: {})",
                        outcome_name(&outcome)
                    ),
                    Err(thaw) => format!(
                        "the post phase cannot run its steps, and the thaw failed too ({:#})",
                        anyhow::Error::new(thaw)
                    ),
                }));
            }
            return Err(error);
        }
    };
    let report = match args.phase {
        PhaseArg::Pre => recipe_phase::run_pre(vm, &recipe, &env)
            .await
            .with_context(|| format!("the pre phase of {} did not run", args.file.display()))?,
        PhaseArg::Post => recipe_phase::run_post(vm, &recipe, &env).await,
    };
    if ctx.global.json {
        print_json(&report)?;
    } else {
        print_phase(&report, &args);
    }
    Ok(ExitCode::from(
        match (report.succeeded, &report.degraded_because) {
            (true, None) => EXIT_OK,
            (true, Some(_)) => EXIT_DEGRADED,
            (false, _) => EXIT_ERROR,
        },
    ))
}

fn print_phase(report: &PhaseReport, args: &RunArgs) {
    println!(
        "Recipe {}, workflow {}, {} phase on VM {}:",
        report.recipe.display(),
        report.workflow.workflow,
        report.phase,
        report.vm
    );
    if let Some(thaw) = &report.thaw {
        println!("  thaw: {}", outcome_name(thaw));
    }
    let steps = report.workflow.steps.iter().chain(&report.compensation);
    for step in steps {
        let mut detail: Vec<String> = Vec::new();
        if let Some(ended) = &step.ended {
            detail.push(format!("end: {}", ended.by));
        }
        if let Some(attempts) = step.attempts {
            detail.push(format!("{attempts} attempt(s)"));
        }
        if let Some(output) = &step.output {
            detail.push(output.clone());
        }
        if let Some(error) = &step.error {
            detail.push(error.clone());
        }
        println!(
            "  {:<12} {:<12} {} ({} ms){}",
            serialized_name(&step.outcome),
            serialized_name(&step.kind),
            step.name,
            step.duration.as_millis(),
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {}", detail.join("; "))
            }
        );
    }
    for adopted in &report.adopted {
        println!(
            "  handed-over  {} (guest pid {}) end: {}{}{}",
            adopted.id,
            adopted.pid,
            adopted.ended.by,
            if adopted.ended.killed { ", killed" } else { "" },
            adopted
                .ended
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(why) = &report.degraded_because {
        println!("Degraded: {why}");
    }
    if !report.succeeded {
        eprintln!(
            "error: the {} phase failed: {}",
            report.phase,
            report.error.as_deref().unwrap_or("see the steps above")
        );
        return;
    }
    match report.phase {
        Phase::Pre => println!(
            "The guest is frozen with the application quiesced ({} background op(s) handed over; state in {}). Take the snapshot, then run `stillpoint recipe run {} --phase post --name {}`.",
            report.handed_over.len(),
            report.state_file.display(),
            args.file.display(),
            args.name
        ),
        Phase::Post => {
            println!("The guest is thawed and the recipe's steps after the capture ran.")
        }
    }
}

/// The name of an unfreeze outcome as the JSON output writes it (`thawed`, `was-not-frozen`…).
fn outcome_name(outcome: &stillpoint_engine::freeze::UnfreezeOutcome) -> String {
    serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v["outcome"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A unit enum's name as the JSON output writes it (`timed-out`, `compensation`…), so the
/// human and JSON outputs use the same words.
fn serialized_name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn read(file: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn validate(ctx: &Context, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let source = read(&args.file)?;
    let options = ValidateOptions {
        platform: args.platform,
        disks: (!args.disks.is_empty()).then(|| {
            args.disks
                .iter()
                .map(|name| DiskInfo {
                    name: name.clone(),
                    labels: Default::default(),
                })
                .collect()
        }),
    };
    let (_, diagnostics) = check_any_source_with(&source, &options, &args.parameters.parameters()?);
    let file = args.file.display().to_string();
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diagnostics.len() - errors;
    if ctx.global.json {
        print_json(&serde_json::json!({
            "file": file,
            "platform": args.platform,
            "valid": errors == 0,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": diagnostics,
        }))?;
    } else {
        for diagnostic in &diagnostics {
            println!("{}", diagnostic.render(&file));
        }
        if errors == 0 {
            println!(
                "{file}: valid for platform {} ({warnings} warning(s))",
                args.platform
            );
        } else {
            println!("{file}: {errors} error(s), {warnings} warning(s)");
        }
    }
    Ok(ExitCode::from(if has_errors(&diagnostics) {
        EXIT_ERROR
    } else {
        EXIT_OK
    }))
}

fn plan(ctx: &Context, args: PlanArgs) -> anyhow::Result<ExitCode> {
    let source = read(&args.file)?;
    let (recipe, diagnostics) = check_any_source_with(
        &source,
        &ValidateOptions {
            platform: args.platform,
            disks: None,
        },
        &args.parameters.parameters()?,
    );
    let file = args.file.display().to_string();
    let Some(recipe) = recipe else {
        for diagnostic in &diagnostics {
            eprintln!("{}", diagnostic.render(&file));
        }
        anyhow::bail!("{file} is invalid; run `stillpoint recipe validate {file}`");
    };
    let options = PlanOptions {
        freeze: !matches!(args.consistency, Consistency::Crash),
        ..PlanOptions::default()
    };
    let plan = plan_workflow(&recipe, &args.workflow, &options)?;
    if ctx.global.json {
        print_json(&plan)?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    println!("workflow {} (failOn {:?})", plan.workflow, plan.fail_on);
    for (index, step) in plan.steps.iter().enumerate() {
        use stillpoint_recipe::PlannedStep::*;
        let line = match step {
            Exec(e) => format!(
                "{} {} on {}: {:?} (timeout {}s, onError {:?}, essential {}){}{}",
                if e.background { "background" } else { "exec" },
                e.id,
                e.target.as_str(),
                e.argv,
                e.timeout.as_secs(),
                e.on_error,
                e.essential,
                e.ends
                    .as_ref()
                    .map(|b| format!(", ends {b}"))
                    .unwrap_or_default(),
                e.inverse
                    .as_ref()
                    .map(|i| format!(", undo {}", i.id))
                    .unwrap_or_default(),
            ),
            Check(c) => format!(
                "check {} on {}: `{}` every {}s for up to {}s (onError {:?})",
                c.id,
                c.target.as_str(),
                c.condition.source,
                c.interval.as_secs(),
                c.timeout.as_secs(),
                c.on_error
            ),
            Capture(c) => format!(
                "capture {} ({}) {}",
                c.id,
                if c.selectors.iter().all(|s| s.selects_everything()) {
                    "every disk"
                } else {
                    "selected disks"
                },
                if c.freeze {
                    "with freeze → capture start → thaw"
                } else {
                    "without freeze"
                }
            ),
        };
        println!("{:>3}. {line}", index + 1);
    }
    for note in &plan.notes {
        println!("note: {}: {}", note.step, note.message);
    }
    Ok(ExitCode::from(EXIT_OK))
}

#[derive(Debug, Args)]
#[command(
    after_help = "The rules (session-lock-not-held, backup-session-not-held, \
    filesystem-frozen-by-recipe) are described in docs/recipes.md, \"Lint: locks that do not hold\". \
    `recipe validate` reports the same findings as warnings.\n\n\
    Exit codes: 0 nothing found; 3 findings (the backups would not reach the consistency the \
    recipe aims for); 1 the file cannot be read or is not a valid recipe."
)]
pub struct LintArgs {
    /// The recipe (kind: Recipe) or Pod manifest (kind: Pod) to lint.
    pub file: PathBuf,
    /// The platform the recipe will run on (the recipe must be valid for it).
    #[arg(long, default_value = "qemu", value_parser = parse_platform)]
    pub platform: Platform,
}

/// `recipe lint`: the lint's findings only (validate's other warnings are `validate`'s job).
fn lint(ctx: &Context, args: LintArgs) -> anyhow::Result<ExitCode> {
    let source = read(&args.file)?;
    let options = ValidateOptions {
        platform: args.platform,
        disks: None,
    };
    let file = args.file.display().to_string();
    let (recipe, diagnostics) = check_any_source(&source, &options);
    let Some(recipe) = recipe else {
        for diagnostic in diagnostics.iter().filter(|d| d.severity == Severity::Error) {
            eprintln!("{}", diagnostic.render(&file));
        }
        anyhow::bail!("{file} is not a valid recipe; run `stillpoint recipe validate {file}`");
    };
    let findings = stillpoint_recipe::lint::lint(&recipe);
    if ctx.global.json {
        print_json(&serde_json::json!({ "file": file, "findings": findings }))?;
    } else {
        for finding in &findings {
            println!("{}", finding.diagnostic().render(&file));
        }
        println!("{file}: {} lint finding(s)", findings.len());
    }
    Ok(ExitCode::from(if findings.is_empty() {
        EXIT_OK
    } else {
        EXIT_DEGRADED
    }))
}
