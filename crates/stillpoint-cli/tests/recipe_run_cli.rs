//! `stillpoint recipe run` without a VM: the commands `stillpoint annotations` writes into the
//! Velero hooks are accepted as they are, a missing VM is an error naming it (exit 1, not a
//! usage error), and the test recipes of `vm_application.rs` stay valid. The runs against a
//! real guest are in `vm_application.rs`.

mod support;

use std::path::Path;
use std::process::Output;
use support::{stillpoint_command, text, workspace};

fn stillpoint(runtime: &Path, args: &[&str]) -> Output {
    stillpoint_command()
        .args(args)
        .env("STILLPOINT_RUNTIME_DIR", runtime)
        .current_dir(workspace())
        .output()
        .expect("run stillpoint")
}

/// The argv of a hook `annotations --json` wrote (`pre` or `post`).
fn hook_argv(suggested: &serde_json::Value, hook: &str) -> Vec<String> {
    let key = format!("{hook}.hook.backup.velero.io/command");
    let argv: Vec<String> = serde_json::from_str(
        suggested["annotations"][&key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key}: {suggested:#}")),
    )
    .expect("a JSON argv");
    assert_eq!(argv[..3], ["stillpoint", "recipe", "run"], "{argv:?}");
    argv
}

/// Runs a hook's command line (without the `stillpoint` word): no such VM here, so it is
/// accepted, past every check of the recipe, and the VM is looked up and not found.
fn runs_as_recipe_run(runtime: &Path, hook: &str, argv: &[String]) {
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let run = stillpoint(runtime, &args);
    assert_eq!(run.status.code(), Some(1), "{hook}: {}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("unknown VM `demo-vm`"), "{hook}: {stderr}");
}

#[test]
fn the_annotations_hook_commands_run_as_recipe_run() {
    let runtime = tempfile::tempdir().unwrap();
    let recipe = workspace().join("examples/recipes/sqlite-demo.yaml");
    let recipe = recipe.to_str().unwrap();
    let output = stillpoint(
        runtime.path(),
        &[
            "annotations",
            "prod/demo-vm",
            "--consistency",
            "application",
            "--recipe",
            recipe,
            "--recipe-in-pod",
            recipe,
            "--json",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let suggested: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for hook in ["pre", "post"] {
        runs_as_recipe_run(runtime.path(), hook, &hook_argv(&suggested, hook));
    }
}

/// A shared template whose workflow is named for a suite: the hooks `annotations` writes name
/// that workflow and carry the parameters it was filled with, and `recipe run` takes them.
#[test]
fn annotations_of_a_template_pass_its_workflow_and_parameters_on_to_recipe_run() {
    let runtime = tempfile::tempdir().unwrap();
    let demo =
        std::fs::read_to_string(workspace().join("examples/recipes/sqlite-demo.yaml")).unwrap();
    let template = demo
        .replace("name: sqlite-demo", "name: ${APP}-demo")
        .replace("app-db", "${APP}-db")
        .replace("  - name: backup\n", "  - name: ${APP}-backup-resources\n");
    assert!(template.contains("${APP}-backup-resources"), "the template");
    let recipe = runtime.path().join("template.yaml");
    std::fs::write(&recipe, template).unwrap();
    let recipe = recipe.to_str().unwrap();
    let annotations = |extra: &[&str]| {
        let mut args = vec![
            "annotations",
            "prod/demo-vm",
            "--consistency",
            "application",
            "--recipe",
            recipe,
            "--recipe-in-pod",
            recipe,
            "--json",
        ];
        args.extend_from_slice(extra);
        stillpoint(runtime.path(), &args)
    };

    // Unfilled, there is nothing to plan: refused naming the parameter.
    let unfilled = annotations(&["--workflow", "shop-backup-resources"]);
    assert_eq!(unfilled.status.code(), Some(1), "{}", text(&unfilled));
    // With --json the error is the JSON document on stdout.
    assert!(
        text(&unfilled).contains("template parameter(s) not set: ${APP}"),
        "{}",
        text(&unfilled)
    );

    let output = annotations(&["--workflow", "shop-backup-resources", "--set", "APP=shop"]);
    assert!(output.status.success(), "{}", text(&output));
    let suggested: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for hook in ["pre", "post"] {
        let argv = hook_argv(&suggested, hook);
        let tail: Vec<&str> = argv[argv.len() - 4..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            ["--workflow", "shop-backup-resources", "--set", "APP=shop"],
            "{argv:?}"
        );
        runs_as_recipe_run(runtime.path(), hook, &argv);
    }
}

#[test]
fn recipe_run_needs_a_phase_and_a_vm() {
    let runtime = tempfile::tempdir().unwrap();
    let recipe = "examples/recipes/sqlite-demo.yaml";
    let no_vm = stillpoint(runtime.path(), &["recipe", "run", recipe, "--phase", "pre"]);
    assert_eq!(no_vm.status.code(), Some(2), "{}", text(&no_vm));
    let bad_phase = stillpoint(
        runtime.path(),
        &["recipe", "run", recipe, "--phase", "during", "--vm", "x"],
    );
    assert_eq!(bad_phase.status.code(), Some(2), "{}", text(&bad_phase));
    let zero_timeout = stillpoint(
        runtime.path(),
        &[
            "recipe",
            "run",
            recipe,
            "--phase",
            "pre",
            "--vm",
            "x",
            "--unfreezeTimeoutSeconds",
            "0",
        ],
    );
    assert_eq!(
        zero_timeout.status.code(),
        Some(2),
        "a freeze left for the platform must be bounded: {}",
        text(&zero_timeout)
    );
}

#[test]
fn the_application_test_recipes_validate() {
    let runtime = tempfile::tempdir().unwrap();
    for recipe in ["sqlite-check-never-holds.yaml", "sqlite-op-timeout.yaml"] {
        let path = format!("crates/stillpoint-cli/tests/recipes/{recipe}");
        let output = stillpoint(runtime.path(), &["recipe", "validate", &path]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("(0 warning(s))"),
            "{}",
            text(&output)
        );
    }
}
