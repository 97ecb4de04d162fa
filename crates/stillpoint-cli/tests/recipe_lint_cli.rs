//! `stillpoint recipe lint` (and its findings in `recipe validate`), run as the real binary over
//! the lint corpus (`crates/stillpoint-recipe/tests/lint/`) and the examples.

mod support;

use support::{stdout, stillpoint_in_workspace as stillpoint, text};

const ONE_SHOT_FTWRL: &str = "crates/stillpoint-recipe/tests/lint/fusion-mysql-one-shot.yaml";

#[test]
fn a_one_shot_flush_tables_with_read_lock_exits_3_naming_file_line_column_and_rule() {
    let output = stillpoint(&["recipe", "lint", ONE_SHOT_FTWRL, "--platform", "kubevirt"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let out = stdout(&output);
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{ONE_SHOT_FTWRL}:26:9: warning: ")))
        .unwrap_or_else(|| panic!("no finding at the op's command:\n{}", text(&output)));
    assert!(line.ends_with("[session-lock-not-held]"), "{line}");
    assert!(
        line.contains("`mysql-pod-exec/flush-tables-with-read-lock`")
            && line.contains("background: true"),
        "{line}"
    );
    // Only the lock is flagged, not the op that unlocks.
    assert!(out.contains("1 lint finding(s)"), "{}", text(&output));
}

#[test]
fn the_mysql_example_holding_its_lock_in_a_background_session_has_no_findings() {
    for example in ["mysql-vm.yaml", "postgresql-vm.yaml", "sqlite-demo.yaml"] {
        let path = format!("examples/recipes/{example}");
        let output = stillpoint(&["recipe", "lint", &path]);
        assert_eq!(output.status.code(), Some(0), "{path}: {}", text(&output));
        assert_eq!(
            stdout(&output),
            format!("{path}: 0 lint finding(s)\n"),
            "{}",
            text(&output)
        );
    }
}

#[test]
fn lint_json_lists_each_finding_with_its_rule_op_and_position() {
    let path = "crates/stillpoint-recipe/tests/lint/postgresql-one-shot.yaml";
    let output = stillpoint(&["--json", "recipe", "lint", path]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let findings = json["findings"].as_array().expect("findings");
    let summary: Vec<(String, String, u64, u64)> = findings
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_owned(),
                f["op"].as_str().unwrap().to_owned(),
                f["pos"]["line"].as_u64().unwrap(),
                f["pos"]["column"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "backup-session-not-held".into(),
                "pg/backup-start".into(),
                18,
                16
            ),
            (
                "backup-session-not-held".into(),
                "pg/old-backup-start".into(),
                21,
                9
            ),
        ],
        "{}",
        text(&output)
    );
}

#[test]
fn lint_of_a_missing_or_invalid_file_exits_1() {
    let output = stillpoint(&["recipe", "lint", "does/not/exist.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("does/not/exist.yaml"),
        "{}",
        text(&output)
    );
    let broken = "crates/stillpoint-recipe/tests/broken/references.yaml";
    let output = stillpoint(&["recipe", "lint", broken]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{broken}:16:13: error:"))
            && stderr.contains("is not a valid recipe"),
        "{}",
        text(&output)
    );
}

#[test]
fn validate_reports_the_findings_as_warnings_and_still_exits_0() {
    let path = "crates/stillpoint-recipe/tests/lint/fsfreeze-ops.yaml";
    let output = stillpoint(&["recipe", "validate", path]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let out = stdout(&output);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{path}:17:16: warning: "))
                && l.ends_with("[filesystem-frozen-by-recipe]")),
        "{}",
        text(&output)
    );
    assert!(
        out.contains("valid for platform qemu (2 warning(s))"),
        "{}",
        text(&output)
    );
}
