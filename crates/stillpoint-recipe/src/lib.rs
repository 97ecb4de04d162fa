//! Recipes (Recipe CR) and Velero hook annotations: parse, validate, run workflows over a step runner.
//!
//! This crate is the application-consistency room of stillpoint. It knows nothing about QEMU:
//! everything that touches a VM goes through the [`StepRunner`] trait, which the engine
//! implements per platform.
//!
//! ```text
//!  recipe.yaml ──parse──► Recipe (positioned model) ──validate──► diagnostics (file:line:col)
//!                                      │
//!  Velero pod annotations ──velero::──►┘  plan_workflow ──► WorkflowPlan ──Executor::run(runner)──► WorkflowReport
//! ```
//!
//! Invariants this crate keeps:
//! - **Every problem at once, with its position.** Parsing goes through a positioned YAML tree
//!   ([`yaml`]), so unknown fields, wrong types, bad references, conditions and selectors are
//!   all reported with `file:line:column`, never only the first. Unknown fields are errors.
//! - **Never a panic on input** (invariant 7): the parser is fuzzed (`fuzz/`) and property-tested.
//! - **Commands are argv arrays** (invariant 6): JSON-array strings, shell-like splitting or YAML
//!   lists — no shell is ever started unless the recipe runs one itself.
//! - **Nothing runs while the guest is frozen**: the capture is one indivisible runner call
//!   (freeze → capture → thaw); [`validate`] rejects recipes that would need a guest command
//!   inside it, and the executor thaws (and records it) whenever a capture did not prove a thaw.
//! - **Undo what was done** when a workflow stops: inverse ops in reverse order; background ops
//!   (held sessions) are always ended, on success and on failure.
//! - **The report does not overstate**: [`WorkflowReport::application_steps_ok`] is true only if
//!   every essential step before the capture succeeded, every background op still ran at the
//!   capture, and the capture succeeded (invariant 5).
//! - **Plan, then execute**: [`plan_workflow`] applies every default (timeout op/check → hook →
//!   30 s, `onError` fail, `failOn` any-error, `essential` true) in pure code.
//!
//! The YAML form and the semantics are documented for users in `docs/recipes.md`.

pub mod command;
pub mod condition;
pub mod diagnostic;
pub mod duration;
mod error;
pub mod executor;
pub mod jsonpath;
pub mod lint;
pub mod model;
pub mod params;
pub mod parse;
pub mod plan;
pub mod selector;
pub mod validate;
pub mod velero;
pub mod yaml;

use std::path::Path;

pub use crate::diagnostic::{Diagnostic, Pos, Severity};
pub use crate::error::{RecipeError, RecipeErrorKind};
pub use crate::executor::{
    BackgroundEnd, BackgroundState, CaptureOutcome, ExecOptions, ExecOutcome, ExecRequest,
    Executor, FreezeTrace, StepOutcome, StepRecord, StepRunner, WorkflowReport,
};
pub use crate::model::{Recipe, Target};
pub use crate::params::Parameters;
pub use crate::parse::parse_recipe;
pub use crate::plan::{PlanNote, PlanOptions, PlannedStep, WorkflowPlan, plan_workflow};
pub use crate::selector::DiskInfo;
pub use crate::validate::{
    Platform, ValidRecipe, ValidateOptions, check_source, check_source_with, validate,
};

/// Reads, parses and validates a recipe file. `Err` (kind [`RecipeErrorKind::Invalid`]) carries
/// every positioned diagnostic; `Ok` carries the warnings.
pub fn load_recipe(path: &Path, options: &ValidateOptions) -> Result<ValidRecipe, RecipeError> {
    load_recipe_with(path, options, &Parameters::new())
}

/// [`load_recipe`] with template parameters (`${NAME}`) filled from `parameters`; one left
/// unfilled is a warning here, and [`plan_workflow`] refuses to plan the recipe.
pub fn load_recipe_with(
    path: &Path,
    options: &ValidateOptions,
    parameters: &Parameters,
) -> Result<ValidRecipe, RecipeError> {
    let source = std::fs::read_to_string(path).map_err(|error| {
        RecipeError::new(RecipeErrorKind::Read)
            .with_path(path)
            .with_source(error)
    })?;
    let (recipe, diagnostics) = check_source_with(&source, options, parameters);
    match recipe {
        Some(recipe) => Ok(ValidRecipe {
            recipe,
            warnings: diagnostics,
        }),
        None => Err(RecipeError::new(RecipeErrorKind::Invalid)
            .with_path(path)
            .with_diagnostics(diagnostics)),
    }
}

/// Validates either a recipe or a Pod manifest carrying Velero hook annotations (recognised by
/// `kind: Pod`) — what `stillpoint recipe validate` accepts.
pub fn check_any_source(
    source: &str,
    options: &ValidateOptions,
) -> (Option<Recipe>, Vec<Diagnostic>) {
    check_any_source_with(source, options, &Parameters::new())
}

/// [`check_any_source`] with template parameters filled from `parameters` (recipes only).
pub fn check_any_source_with(
    source: &str,
    options: &ValidateOptions,
    parameters: &Parameters,
) -> (Option<Recipe>, Vec<Diagnostic>) {
    let is_pod =
        yaml::parse_document(source).is_ok_and(|root| parse::document_kind(&root) == Some("Pod"));
    if is_pod {
        velero::check_pod_source(source)
    } else {
        check_source_with(source, options, parameters)
    }
}
