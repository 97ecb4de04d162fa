//! `stillpoint recipe`: check a recipe (every problem, with `file:line:column`) and show the
//! plan a workflow resolves to.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use stillpoint_recipe::diagnostic::has_errors;
use stillpoint_recipe::{
    DiskInfo, PlanOptions, Platform, Severity, ValidateOptions, check_any_source, plan_workflow,
};

use crate::context::Context;
use crate::output::{EXIT_ERROR, EXIT_OK, print_json};

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
}

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse()
}

pub async fn run(ctx: &Context, args: RecipeArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        RecipeCommand::Validate(args) => validate(ctx, args),
        RecipeCommand::Plan(args) => plan(ctx, args),
    }
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
    let (_, diagnostics) = check_any_source(&source, &options);
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
    let (recipe, diagnostics) = check_any_source(
        &source,
        &ValidateOptions {
            platform: args.platform,
            disks: None,
        },
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
    Ok(ExitCode::from(EXIT_OK))
}
