//! Every example in `examples/recipes/` passes validation, and the demo recipe plans into the
//! steps the demo relies on.

use std::path::{Path, PathBuf};

use stillpoint_recipe::plan::PlannedStep;
use stillpoint_recipe::{
    PlanOptions, Platform, Target, ValidateOptions, check_any_source, load_recipe, plan_workflow,
};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_validates_without_errors_or_warnings() {
    let files = examples();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "sqlite-demo.yaml",
        "postgresql-vm.yaml",
        "mysql-vm.yaml",
        "velero-annotations.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing example {expected}: {names:?}"
        );
    }
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for platform in [Platform::Qemu, Platform::Libvirt, Platform::Kubevirt] {
            let (recipe, diagnostics) = check_any_source(
                &source,
                &ValidateOptions {
                    platform,
                    disks: None,
                },
            );
            assert!(
                diagnostics.is_empty(),
                "{} on {platform}: {diagnostics:#?}",
                file.display()
            );
            let recipe = recipe.unwrap();
            plan_workflow(&recipe, "backup", &PlanOptions::default()).unwrap();
        }
    }
}

#[test]
fn the_sqlite_demo_holds_the_lock_checks_it_captures_and_releases() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes/sqlite-demo.yaml");
    let valid = load_recipe(&path, &ValidateOptions::default()).unwrap();
    let plan = plan_workflow(&valid.recipe, "backup", &PlanOptions::default()).unwrap();
    let ids: Vec<&str> = plan.steps.iter().map(PlannedStep::id).collect();
    assert_eq!(
        ids,
        [
            "app-db/hold-write-lock",
            "app-db-checks/write-lock-held",
            "group:vm-disks",
            "app-db/release-write-lock"
        ]
    );
    let PlannedStep::Exec(hold) = &plan.steps[0] else {
        panic!()
    };
    assert!(hold.background && hold.target == Target::Guest);
    assert_eq!(
        hold.argv[..2],
        ["/bin/sh", "-c"],
        "the recipe runs its own shell; stillpoint never adds one"
    );
    assert!(hold.argv[2].contains("BEGIN IMMEDIATE") && hold.argv[2].contains("/usr/bin/sqlite3"));
    assert_eq!(
        hold.inverse.as_ref().unwrap().id,
        "app-db/release-write-lock"
    );
    let PlannedStep::Capture(capture) = &plan.steps[2] else {
        panic!()
    };
    assert!(capture.freeze);
    let PlannedStep::Exec(release) = &plan.steps[3] else {
        panic!()
    };
    assert_eq!(release.ends.as_deref(), Some("app-db/hold-write-lock"));
}
