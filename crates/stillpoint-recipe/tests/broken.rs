//! The validator against a corpus of broken recipes: each `tests/broken/NAME.yaml` has beside it
//! `NAME.expected`, the exact diagnostics (`NAME.yaml:LINE:COLUMN: severity: message`) that
//! `validate` must print. A first-line comment `# disks: a, b` gives the VM's disks and
//! `# platform: kubevirt` the platform. Set `BLESS=1` to rewrite the expected files after
//! reviewing a deliberate change.

mod golden;

use std::path::Path;

use stillpoint_recipe::{DiskInfo, ValidateOptions, check_any_source, diagnostic::has_errors};

fn options_for(source: &str) -> ValidateOptions {
    let mut options = ValidateOptions::default();
    for line in source.lines().take_while(|l| l.starts_with('#')) {
        if let Some(disks) = line.strip_prefix("# disks:") {
            options.disks = Some(
                disks
                    .split(',')
                    .map(|d| DiskInfo {
                        name: d.trim().into(),
                        labels: Default::default(),
                    })
                    .collect(),
            );
        }
    }
    options.platform = golden::header_platform(source);
    options
}

#[test]
fn every_broken_recipe_reports_its_errors_with_line_and_column() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut golden = golden::Golden::new();
    for file in golden::yaml_files(&dir, 10) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&file).unwrap();
        let (recipe, diagnostics) = check_any_source(&source, &options_for(&source));
        assert!(
            recipe.is_none() && has_errors(&diagnostics),
            "{name} must be rejected, got {diagnostics:#?}"
        );
        for d in &diagnostics {
            assert!(
                d.pos.line >= 1 && d.pos.column >= 1,
                "{name}: diagnostic without a position: {d:?}"
            );
        }
        let actual: String = diagnostics
            .iter()
            .map(|d| format!("{}\n", d.render(&name)))
            .collect();
        golden.check(&file, &actual);
    }
    golden.finish();
}
