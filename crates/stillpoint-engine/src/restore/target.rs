//! The target directory: whether a restore may write its files there.

use std::path::Path;

use crate::error::{EngineError, EngineErrorKind, Result};

/// Checks that `dir` (existing or not) can take files `names` without overwriting anything,
/// or, with `force`, that every name that exists is a file that may be replaced.
pub(crate) fn check_target(dir: &Path, names: &[String], force: bool) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(restore_error(format!(
                "the restore target {} exists and is not a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(restore_error(format!(
                "cannot look at the restore target {}",
                dir.display()
            ))
            .with_source(error));
        }
    }
    let mut existing = Vec::new();
    for name in names {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(restore_error(format!(
                    "{} is a directory where the restore writes a file; move it away",
                    path.display()
                )));
            }
            Ok(_) => existing.push(name.as_str()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(
                    restore_error(format!("cannot look at {}", path.display())).with_source(error)
                );
            }
        }
    }
    if !existing.is_empty() && !force {
        return Err(restore_error(format!(
            "the restore target {} already holds {}; restore into another directory or pass \
             --force to replace them",
            dir.display(),
            existing.join(", ")
        )));
    }
    Ok(())
}

fn restore_error(message: String) -> EngineError {
    EngineError::new(EngineErrorKind::Restore, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_missing_or_empty_directory_is_fine() {
        let dir = tempfile::tempdir().expect("temp dir");
        check_target(&dir.path().join("new"), &names(&["vd0.raw"]), false).expect("missing");
        check_target(dir.path(), &names(&["vd0.raw"]), false).expect("empty");
        // Files the restore does not write are left alone and do not block it.
        std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
        check_target(dir.path(), &names(&["vd0.raw"]), false).expect("unrelated file");
    }

    #[test]
    fn files_that_would_be_overwritten_are_refused_unless_forced() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("vd0.raw"), "old").expect("write");
        std::fs::write(dir.path().join("snapshot.json"), "{}").expect("write");
        let wanted = names(&["vd0.raw", "vd1.raw", "snapshot.json"]);
        let error = check_target(dir.path(), &wanted, false).expect_err("refused");
        let text = error.to_string();
        assert_eq!(error.kind(), EngineErrorKind::Restore);
        assert!(text.contains("vd0.raw, snapshot.json"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("--force"), "{text}");
        check_target(dir.path(), &wanted, true).expect("forced");
    }

    #[test]
    fn a_file_as_target_or_a_directory_in_the_way_is_refused_even_when_forced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").expect("write");
        let error = check_target(&file, &names(&["vd0.raw"]), true).expect_err("not a dir");
        assert!(error.to_string().contains("not a directory"), "{error}");
        std::fs::create_dir(dir.path().join("vd0.raw")).expect("mkdir");
        let error = check_target(dir.path(), &names(&["vd0.raw"]), true).expect_err("dir");
        assert!(error.to_string().contains("is a directory"), "{error}");
    }
}
