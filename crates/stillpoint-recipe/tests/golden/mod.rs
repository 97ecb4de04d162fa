//! The corpus tests' one way of comparing what a recipe gives with its committed `.expected`
//! file: every file of a corpus is checked and every mismatch reported at once; `BLESS=1`
//! rewrites the expected files instead (then review the diff).

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::{Path, PathBuf};

/// The `*.yaml` files of a corpus directory, sorted; fails when fewer than `at_least` are
/// there (a corpus that went missing must not pass).
pub fn yaml_files(dir: &Path, at_least: usize) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= at_least,
        "the corpus went missing: {files:?}"
    );
    files
}

/// Collects mismatches against `<file>.expected` over a whole corpus.
pub struct Golden {
    bless: bool,
    mismatches: Vec<String>,
}

impl Golden {
    pub fn new() -> Self {
        Golden {
            bless: std::env::var_os("BLESS").is_some(),
            mismatches: Vec::new(),
        }
    }

    /// Compares `actual` with the file's `.expected` sibling (or writes it, under `BLESS`).
    pub fn check(&mut self, file: &Path, actual: &str) {
        let expected_path = file.with_extension("expected");
        if self.bless {
            std::fs::write(&expected_path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if actual != expected {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            self.mismatches.push(format!(
                "--- {name}: expected\n{expected}--- {name}: actual\n{actual}"
            ));
        }
    }

    /// Fails with every mismatch found.
    pub fn finish(self) {
        assert!(self.mismatches.is_empty(), "{}", self.mismatches.join("\n"));
    }
}

/// The platform a corpus file names in a leading comment `# platform: NAME` (default qemu).
pub fn header_platform(source: &str) -> stillpoint_recipe::Platform {
    source
        .lines()
        .take_while(|line| line.starts_with('#'))
        .find_map(|line| line.strip_prefix("# platform:"))
        .map_or(stillpoint_recipe::Platform::Qemu, |name| {
            name.trim()
                .parse()
                .unwrap_or_else(|e| panic!("# platform: {name}: {e}"))
        })
}
