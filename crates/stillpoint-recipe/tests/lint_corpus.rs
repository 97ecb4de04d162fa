//! The lint against a corpus of recipes that hold nothing: each `tests/lint/NAME.yaml` is a valid
//! recipe with beside it `NAME.expected`, the exact findings (`NAME.yaml:LINE:COLUMN: warning:
//! message [rule]`) the lint must report. A first-line comment `# platform: kubevirt` gives the
//! platform. A Pod manifest (Velero hook annotations) is linted the same way. Set `BLESS=1` to rewrite the expected files after reviewing a deliberate change.

mod golden;

use std::path::Path;

use stillpoint_recipe::lint::{LintRule, lint};
use stillpoint_recipe::{ValidateOptions, check_any_source, diagnostic::has_errors};

#[test]
fn every_lint_corpus_recipe_is_valid_and_reports_exactly_its_expected_findings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lint");
    let files = golden::yaml_files(&dir, 4);
    let mut golden = golden::Golden::new();
    let mut rules_seen = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(file).unwrap();
        let platform = golden::header_platform(&source);
        let (recipe, diagnostics) = check_any_source(
            &source,
            &ValidateOptions {
                platform,
                disks: None,
            },
        );
        assert!(!has_errors(&diagnostics), "{name}: {diagnostics:#?}");
        let findings = lint(&recipe.unwrap());
        rules_seen.extend(findings.iter().map(|f| f.rule));
        let actual: String = findings
            .iter()
            .map(|f| format!("{}\n", f.diagnostic().render(&name)))
            .collect();
        // `validate` reports the same findings among its warnings (for a recipe; a Pod's
        // annotations have no positions to report them at, so only `recipe lint` lists them).
        let is_pod = source.lines().any(|l| l == "kind: Pod");
        for line in actual.lines().filter(|_| !is_pod) {
            let rendered: Vec<String> = diagnostics.iter().map(|d| d.render(&name)).collect();
            assert!(
                rendered.iter().any(|r| r == line),
                "{name}: validate does not report {line}"
            );
        }
        golden.check(file, &actual);
    }
    golden.finish();
    for rule in LintRule::ALL {
        assert!(
            rules_seen.contains(&rule),
            "no corpus recipe shows rule {rule}"
        );
    }
}
