//! `stillpoint annotations`: the Velero hook annotations to put on a VM's virt-launcher pod for
//! a consistency level.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use stillpoint_recipe::velero::{Level, RecipeRef, suggest_annotations};
use stillpoint_recipe::{PlanOptions, Platform, ValidateOptions, load_recipe_with, plan_workflow};

use crate::commands::recipe::ParameterArgs;
use crate::context::Context;
use crate::output::{EXIT_OK, print_json};

#[derive(Debug, Args)]
pub struct AnnotationsArgs {
    /// The VM (NAME, NAMESPACE/NAME, or kubevirt:NAMESPACE/NAME).
    pub vm: String,
    /// The consistency level the Velero backup should reach.
    #[arg(long, value_enum)]
    pub consistency: LevelArg,
    /// The recipe (required for application).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Where the recipe is mounted inside the launcher pod (default /etc/stillpoint/recipes/FILE-NAME).
    #[arg(long, value_name = "PATH")]
    pub recipe_in_pod: Option<String>,
    /// The VM's namespace (default: from NAMESPACE/NAME, else `default`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print only the annotations, as YAML (no comments).
    #[arg(long, conflicts_with = "json")]
    pub yaml: bool,
    /// The recipe's workflow the hooks run (passed on to `recipe run`).
    #[arg(long, value_name = "NAME", default_value = "backup")]
    pub workflow: String,
    /// Template parameters of the recipe: filled here to plan the hooks, and passed on to
    /// `recipe run` as `--set NAME=VALUE` (so the pod needs only the recipe file).
    #[command(flatten)]
    pub parameters: ParameterArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    Crash,
    Filesystem,
    Application,
}

pub async fn run(ctx: &Context, args: AnnotationsArgs) -> anyhow::Result<ExitCode> {
    let reference = args.vm.strip_prefix("kubevirt:").unwrap_or(&args.vm);
    let (namespace, name) = match reference.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => ("default".to_owned(), reference.to_owned()),
    };
    let namespace = args.namespace.clone().unwrap_or(namespace);
    if name.is_empty() || namespace.is_empty() {
        anyhow::bail!(
            "`{}` does not name a VM; write NAME or NAMESPACE/NAME",
            args.vm
        );
    }
    let level = match args.consistency {
        LevelArg::Crash => Level::Crash,
        LevelArg::Filesystem => Level::Filesystem,
        LevelArg::Application => Level::Application,
    };
    let loaded = match (&args.recipe, level) {
        (Some(file), Level::Application) => {
            let parameters = args.parameters.parameters()?;
            let valid = load_recipe_with(
                file,
                &ValidateOptions {
                    platform: Platform::Kubevirt,
                    disks: None,
                },
                &parameters,
            )?;
            let plan = plan_workflow(&valid.recipe, &args.workflow, &PlanOptions::default())?;
            let mut run_args = Vec::new();
            if args.workflow != "backup" {
                run_args.extend(["--workflow".to_owned(), args.workflow.clone()]);
            }
            for (name, value) in parameters.iter() {
                run_args.extend(["--set".to_owned(), format!("{name}={value}")]);
            }
            let in_pod = args.recipe_in_pod.clone().unwrap_or_else(|| {
                let file_name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "recipe.yaml".into());
                format!("/etc/stillpoint/recipes/{file_name}")
            });
            Some((in_pod, plan, run_args))
        }
        (None, Level::Application) => {
            anyhow::bail!("--consistency application needs --recipe FILE")
        }
        (Some(_), _) => anyhow::bail!("--recipe is only used with --consistency application"),
        (None, _) => None,
    };
    let recipe = loaded.as_ref().map(|(path, plan, run_args)| RecipeRef {
        path,
        plan,
        run_args,
    });
    let suggested = suggest_annotations(&name, &namespace, level, recipe)?;
    if ctx.global.json {
        print_json(&suggested)?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    if !args.yaml {
        for note in &suggested.notes {
            println!("# {note}");
        }
    }
    if suggested.annotations.is_empty() {
        if args.yaml {
            println!("{{}}");
        }
        return Ok(ExitCode::from(EXIT_OK));
    }
    if !args.yaml {
        println!("metadata:\n  annotations:");
    }
    let indent = if args.yaml { "" } else { "    " };
    for (key, value) in &suggested.annotations {
        // YAML single quotes keep the JSON commands readable; only `'` needs doubling.
        println!("{indent}{key}: '{}'", value.replace('\'', "''"));
    }
    Ok(ExitCode::from(EXIT_OK))
}
