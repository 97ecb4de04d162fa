//! Recipes as users really write them for IBM Fusion and RamenDR (templates with `${NAME}`,
//! scale hooks, named workflows, resource-only backups, multi-document files, volume groups
//! apart): each `tests/realistic/NAME.yaml` must validate, and its warnings are exactly those
//! in `NAME.expected` (`NAME.yaml:LINE:COLUMN: warning: …`). A first-line comment
//! `# platform: kubevirt` gives the platform. `BLESS=1` rewrites the expected files after
//! reviewing a deliberate change. The tests below the corpus check what the plan makes of them.

mod golden;

use std::path::{Path, PathBuf};

use stillpoint_recipe::{
    Parameters, PlanOptions, PlannedStep, Pos, Recipe, Severity, ValidateOptions, WorkflowPlan,
    check_source_with, plan_workflow,
};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/realistic")
}

fn options_for(source: &str) -> ValidateOptions {
    ValidateOptions {
        platform: golden::header_platform(source),
        ..ValidateOptions::default()
    }
}

fn load(name: &str, parameters: &Parameters) -> (Recipe, Vec<stillpoint_recipe::Diagnostic>) {
    let source = std::fs::read_to_string(corpus().join(name)).unwrap();
    let (recipe, diagnostics) = check_source_with(&source, &options_for(&source), parameters);
    let recipe = recipe.unwrap_or_else(|| panic!("{name} must validate: {diagnostics:#?}"));
    (recipe, diagnostics)
}

fn plan(recipe: &Recipe, workflow: &str) -> WorkflowPlan {
    plan_workflow(recipe, workflow, &PlanOptions::default()).unwrap()
}

fn step_ids(plan: &WorkflowPlan) -> Vec<&str> {
    plan.steps.iter().map(PlannedStep::id).collect()
}

#[test]
fn every_realistic_recipe_validates_with_exactly_its_expected_warnings() {
    let mut golden = golden::Golden::new();
    for file in golden::yaml_files(&corpus(), 6) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let (_, diagnostics) = load(&name, &Parameters::new());
        for d in &diagnostics {
            assert_eq!(d.severity, Severity::Warning, "{name}: {d:?}");
            assert!(d.pos.line >= 1 && d.pos.column >= 1, "{name}: {d:?}");
        }
        let actual: String = diagnostics
            .iter()
            .map(|d| format!("{}\n", d.render(&name)))
            .collect();
        golden.check(&file, &actual);
    }
    golden.finish();
}

#[test]
fn unfilled_parameters_are_warned_at_their_place_and_stop_a_plan() {
    let (recipe, diagnostics) = load("parameters.yaml", &Parameters::new());
    let at = |line, column| {
        diagnostics
            .iter()
            .find(|d| d.pos == Pos::new(line, column))
            .unwrap_or_else(|| panic!("no warning at {line}:{column}: {diagnostics:#?}"))
    };
    // `  name: ${APP_NAME}-backup-restore-recipe`: the `$` is column 9.
    assert!(at(6, 9).message.contains("`${APP_NAME}`"));
    // `    labelSelector: app=${APP_NAME}`: inside the selector, column 24.
    assert!(at(13, 24).message.contains("`${APP_NAME}`"));
    // The second placeholder of `app=${APP_NAME},role=primary` is not hidden by the first.
    assert!(at(22, 24).message.contains("`${APP_NAME}`"));
    // The shell's `${PGUSER}` in a command is never a parameter.
    assert!(
        !diagnostics.iter().any(|d| d.message.contains("PGUSER")),
        "{diagnostics:#?}"
    );
    let error = plan_workflow(&recipe, "backup", &PlanOptions::default()).unwrap_err();
    let message = error.to_string();
    for name in [
        "${APP_NAME}",
        "${APP_NAMESPACE}",
        "${FUSION_NAMESPACE}",
        "${HOOK_TIMEOUT}",
    ] {
        assert!(message.contains(name), "{message}");
    }
    assert!(message.contains("6:9"), "{message}");
}

#[test]
fn filled_parameters_validate_and_plan_like_the_envsubst_output() {
    let mut parameters = Parameters::new();
    parameters
        .insert_file_text(
            "APP_NAME=pg\nAPP_NAMESPACE=shop\nFUSION_NAMESPACE=ibm-spectrum-fusion-ns\n",
        )
        .unwrap();
    parameters.insert_assignment("HOOK_TIMEOUT=45").unwrap();
    let (recipe, diagnostics) = load("parameters.yaml", &parameters);
    assert!(
        !diagnostics
            .iter()
            .any(|d| d.message.contains("template parameter")),
        "{diagnostics:#?}"
    );
    assert_eq!(recipe.name.as_deref(), Some("pg-backup-restore-recipe"));
    let plan = plan(&recipe, "backup");
    assert_eq!(step_ids(&plan), ["pg-db/checkpoint", "group:pg-volumes"]);
    let PlannedStep::Exec(exec) = &plan.steps[0] else {
        panic!("{plan:?}")
    };
    // `timeout: ${HOOK_TIMEOUT}` became the number 45; the command's `${PGUSER}` stayed.
    assert_eq!(exec.timeout.as_secs(), 45);
    assert_eq!(exec.argv[2], "psql -U ${PGUSER} -c CHECKPOINT");
    let PlannedStep::Capture(capture) = &plan.steps[1] else {
        panic!("{plan:?}")
    };
    let labels = [("app".to_owned(), "pg".to_owned())].into_iter().collect();
    assert!(capture.selectors[0].selects(&stillpoint_recipe::DiskInfo {
        name: "vda".into(),
        labels,
    }));
    assert_eq!(plan.notes.len(), 1, "the resource group: {:?}", plan.notes);
}

#[test]
fn scale_steps_are_skipped_and_recorded() {
    let (recipe, _) = load("scale-hooks.yaml", &Parameters::new());
    let plan = plan(&recipe, "backup");
    assert_eq!(step_ids(&plan), ["group:rabbitmq-volumes"]);
    let skipped: Vec<&str> = plan.notes.iter().map(|n| n.step.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "rabbitmq-operator/down",
            "rabbitmq-server/down",
            "rabbitmq-server/sync",
            "rabbitmq-server/up",
            "rabbitmq-operator/up"
        ]
    );
    assert!(plan.notes[0].message.starts_with("skipped:"));
}

#[test]
fn a_named_backup_workflow_is_planned_by_its_name() {
    let (recipe, _) = load("named-workflows.yaml", &Parameters::new());
    let plan = plan(&recipe, "suite-backup-resources");
    assert_eq!(step_ids(&plan), ["suite-api/ready", "group:suite-data"]);
    let error = plan_workflow(&recipe, "backup", &PlanOptions::default()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("suite-backup-resources, suite-restore-resources"),
        "{error}"
    );
}

#[test]
fn a_resource_only_backup_captures_every_disk_after_its_last_step() {
    let (recipe, _) = load("resource-only.yaml", &Parameters::new());
    let plan = plan(&recipe, "backup");
    assert_eq!(step_ids(&plan), ["capture:every-disk"]);
    let PlannedStep::Capture(capture) = &plan.steps[0] else {
        panic!("{plan:?}")
    };
    assert!(capture.selectors.iter().all(|s| s.selects_everything()));
    assert_eq!(plan.notes.last().unwrap().step, "capture");
}

#[test]
fn the_recipe_of_a_multi_document_file_keeps_its_positions() {
    let (recipe, _) = load("multi-document.yaml", &Parameters::new());
    assert_eq!(recipe.name.as_deref(), Some("minio-recipe"));
    // The Recipe is the third document, starting on line 14 of the file.
    assert_eq!(recipe.pos, Pos::new(14, 1));
    assert_eq!(recipe.hooks[0].name.pos, Pos::new(26, 11));
    assert_eq!(
        step_ids(&plan(&recipe, "backup")),
        ["minio/sync", "group:minio-data"]
    );
}

#[test]
fn volume_groups_apart_become_one_capture_at_the_first() {
    let (recipe, _) = load("groups-apart.yaml", &Parameters::new());
    let plan = plan(&recipe, "backup");
    assert_eq!(
        step_ids(&plan),
        [
            "orders/freeze",
            "group:orders-volumes+catalog-volumes",
            "orders/thaw",
            "catalog/flush"
        ]
    );
    assert_eq!(plan.notes.len(), 1);
    assert_eq!(plan.notes[0].step, "group:catalog-volumes");
}
