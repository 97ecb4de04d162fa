//! `stillpoint recipe validate|plan` and `stillpoint annotations`, run as the real binary.

mod support;

use support::{stdout, stillpoint_command, stillpoint_in_workspace as stillpoint, workspace};

#[test]
fn every_example_recipe_validates_with_exit_0() {
    for example in [
        "sqlite-demo.yaml",
        "postgresql-vm.yaml",
        "mysql-vm.yaml",
        "velero-annotations.yaml",
    ] {
        let path = format!("examples/recipes/{example}");
        let output = stillpoint(&["recipe", "validate", &path]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{path}: {}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout(&output).contains("valid for platform qemu (0 warning(s))"),
            "{}",
            stdout(&output)
        );
    }
}

#[test]
fn a_broken_recipe_prints_every_error_with_file_line_column_and_exits_1() {
    let path = "crates/stillpoint-recipe/tests/broken/references.yaml";
    let output = stillpoint(&["recipe", "validate", path]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains(&format!(
            "{path}:16:13: error: hook `db` has no op `lokc` (defined: lock)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{path}:21:7: error: unknown step kind `hok`")),
        "{text}"
    );
    assert!(text.contains("7 error(s), 0 warning(s)"), "{text}");
}

#[test]
fn validate_json_lists_diagnostics_with_positions() {
    let output = stillpoint(&[
        "--json",
        "recipe",
        "validate",
        "crates/stillpoint-recipe/tests/broken/platform-qemu.yaml",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["errors"], 4);
    let first_error = json["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["severity"] == "error")
        .unwrap();
    assert_eq!(
        (
            first_error["pos"]["line"].as_u64(),
            first_error["pos"]["column"].as_u64()
        ),
        (Some(13), Some(11))
    );
    // The same recipe's scale hook and resource group are fine on KubeVirt.
    let output = stillpoint(&[
        "--json",
        "recipe",
        "validate",
        "--platform",
        "kubevirt",
        "crates/stillpoint-recipe/tests/broken/platform-qemu.yaml",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["errors"], 1, "only the job hook remains: {json:#}");
}

#[test]
fn validate_with_the_vm_disks_rejects_a_group_that_selects_none() {
    let output = stillpoint(&[
        "recipe",
        "validate",
        "--disk",
        "vda",
        "examples/recipes/postgresql-vm.yaml",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let output = stillpoint(&[
        "recipe",
        "validate",
        "--disk",
        "sda",
        "examples/recipes/postgresql-vm.yaml",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("volume group `pg-disks` selects none of the VM's disks (sda)"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let output = stillpoint(&["recipe", "validate", "no/such/recipe.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read no/such/recipe.yaml"));
}

#[test]
fn plan_shows_the_resolved_steps_and_crash_level_does_not_freeze() {
    let output = stillpoint(&[
        "--json",
        "recipe",
        "plan",
        "--consistency",
        "crash",
        "examples/recipes/sqlite-demo.yaml",
    ]);
    assert_eq!(output.status.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let steps = plan["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[0]["background"], true);
    assert_eq!(steps[2]["kind"], "capture");
    assert_eq!(steps[2]["freeze"], false);
}

#[test]
fn annotations_for_each_level() {
    let crash = stillpoint(&["--json", "annotations", "vm1", "--consistency", "crash"]);
    let crash: serde_json::Value = serde_json::from_slice(&crash.stdout).unwrap();
    assert_eq!(crash["annotations"], serde_json::json!({}));

    let fs = stillpoint(&[
        "annotations",
        "vms/vm1",
        "--consistency",
        "filesystem",
        "--yaml",
    ]);
    assert_eq!(fs.status.code(), Some(0));
    let text = stdout(&fs);
    assert!(text.contains(r#"pre.hook.backup.velero.io/command: '["stillpoint","freeze","--name","vm1","--namespace","vms"]'"#), "{text}");
    assert!(
        text.contains("pre.hook.backup.velero.io/timeout: '60s'"),
        "{text}"
    );
    assert!(text.contains(r#"post.hook.backup.velero.io/command: '["stillpoint","unfreeze","--name","vm1","--namespace","vms"]'"#), "{text}");

    let app = stillpoint(&[
        "--json",
        "annotations",
        "vm1",
        "--namespace",
        "db",
        "--consistency",
        "application",
        "--recipe",
        "examples/recipes/sqlite-demo.yaml",
    ]);
    assert_eq!(
        app.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&app.stderr)
    );
    let app: serde_json::Value = serde_json::from_slice(&app.stdout).unwrap();
    let pre: Vec<String> = serde_json::from_str(
        app["annotations"]["pre.hook.backup.velero.io/command"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pre[..3], ["stillpoint", "recipe", "run"]);
    assert!(pre.contains(&"pre".to_owned()) && pre.contains(&"db".to_owned()));

    let missing = stillpoint(&["annotations", "vm1", "--consistency", "application"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("needs --recipe FILE"));
}

const TEMPLATE: &str = "crates/stillpoint-recipe/tests/realistic/parameters.yaml";
const VM_TEMPLATE: &str = "crates/stillpoint-recipe/tests/realistic/vm-template.yaml";

#[test]
fn a_template_validates_with_a_warning_per_parameter_and_cleanly_once_filled() {
    let output = stillpoint(&["recipe", "validate", "--platform", "kubevirt", TEMPLATE]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(
        text.contains(&format!(
            "{TEMPLATE}:6:9: warning: template parameter `${{APP_NAME}}` is not set"
        )),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("shop.env");
    std::fs::write(
        &values,
        "# filled as envsubst would\nAPP_NAME=pg\nexport APP_NAMESPACE=\"shop\"\nHOOK_TIMEOUT=45\n",
    )
    .unwrap();
    let output = stillpoint(&[
        "recipe",
        "validate",
        "--platform",
        "kubevirt",
        "--values",
        values.to_str().unwrap(),
        "--set",
        "FUSION_NAMESPACE=ibm-spectrum-fusion-ns",
        TEMPLATE,
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(!text.contains("template parameter"), "{text}");
    assert!(text.contains("valid for platform kubevirt"), "{text}");
    // Filled, it plans: the hook's name and its timeout come from the values.
    let output = stillpoint(&[
        "recipe",
        "plan",
        "--platform",
        "kubevirt",
        "--values",
        values.to_str().unwrap(),
        "--set",
        "FUSION_NAMESPACE=x",
        TEMPLATE,
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("exec pg-db/checkpoint"), "{text}");
    assert!(text.contains("timeout 45s"), "{text}");
    assert!(text.contains("note: group:pg-resources: skipped"), "{text}");
}

#[test]
fn a_run_with_an_unfilled_parameter_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().to_str().unwrap();
    // Partly filled: the refusal names what is left, before any VM is looked up.
    for args in [
        vec![
            "backup",
            "--recipe",
            VM_TEMPLATE,
            "--set",
            "DB=pg",
            "no-such-vm",
        ],
        vec![
            "recipe",
            "run",
            VM_TEMPLATE,
            "--phase",
            "pre",
            "--name",
            "no-such-vm",
            "--set",
            "DB=pg",
        ],
        vec!["recipe", "plan", "--set", "DB=pg", VM_TEMPLATE],
    ] {
        let output = stillpoint_command()
            .args(&args)
            .env("STILLPOINT_RUNTIME_DIR", runtime)
            .current_dir(workspace())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(
                "template parameter(s) not set: ${DATA_DISK}, ${HOOK_TIMEOUT} (first at 10:19)"
            ),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("${DB}"), "{args:?}: {stderr}");
        assert!(!stderr.contains("no-such-vm"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_bad_values_file_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("bad.env");
    std::fs::write(&values, "APP_NAME=pg\nthis is not an assignment\n").unwrap();
    let output = stillpoint(&[
        "recipe",
        "validate",
        "--values",
        values.to_str().unwrap(),
        TEMPLATE,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2: ", values.display())),
        "{stderr}"
    );
}

#[test]
fn plan_chooses_a_named_workflow() {
    let path = "crates/stillpoint-recipe/tests/realistic/named-workflows.yaml";
    let output = stillpoint(&[
        "recipe",
        "plan",
        "--platform",
        "kubevirt",
        "--workflow",
        "suite-backup-resources",
        path,
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("workflow suite-backup-resources"), "{text}");
    assert!(text.contains("check suite-api/ready"), "{text}");
    // The default, `backup`, is not there: the error lists the workflows the recipe has.
    let output = stillpoint(&["recipe", "plan", "--platform", "kubevirt", path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "no workflow `backup` (it has: suite-backup-resources, suite-restore-resources)"
        ),
        "{stderr}"
    );
}
