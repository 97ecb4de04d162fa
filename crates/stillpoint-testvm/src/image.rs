//! Looking into restored ext4 disk images from the host, without mounting them: is the
//! filesystem clean (`e2fsck -fn`), does it need journal recovery (`needs_recovery`), and
//! what do its files hold (`debugfs`). Used by the demo and by tests that check restores.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, ErrorKind, Result};

/// What the host tools say about an ext4 image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ext4Health {
    /// `e2fsck -fn` found nothing to fix (exit code 0).
    pub fsck_clean: bool,
    /// The journal must be replayed before mounting: what a power cut leaves, and what a
    /// frozen (filesystem-consistent) capture never has.
    pub needs_recovery: bool,
    /// `e2fsck`'s exit code and the start of its output, for reports.
    pub fsck_exit: i32,
    pub fsck_output: String,
}

/// Checks an ext4 image read-only.
pub fn ext4_health(image: &Path) -> Result<Ext4Health> {
    let fsck = run("e2fsck", &["-fn"], image)?;
    let header = run("dumpe2fs", &["-h"], image)?;
    if !header.status.success() {
        return Err(tool_failed("dumpe2fs -h", image, &header));
    }
    let features = String::from_utf8_lossy(&header.stdout)
        .lines()
        .find(|line| line.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string();
    let mut output = String::from_utf8_lossy(&fsck.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&fsck.stderr));
    output.truncate(2000);
    Ok(Ext4Health {
        fsck_clean: fsck.status.code() == Some(0),
        needs_recovery: features
            .split_whitespace()
            .any(|feature| feature == "needs_recovery"),
        fsck_exit: fsck.status.code().unwrap_or(-1),
        fsck_output: output,
    })
}

/// Copies the file at `path` (absolute, inside the filesystem) out of the image to `dest`.
/// `Ok(false)` when the image has no such file.
pub fn ext4_extract(image: &Path, path: &str, dest: &Path) -> Result<bool> {
    let request = format!("dump -p {path} {}", dest.display());
    let output = Command::new("debugfs")
        .args(["-R", &request])
        .arg(image)
        .output()
        .map_err(|e| Error::io("run debugfs on", image, e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("File not found") {
        return Ok(false);
    }
    if !output.status.success() || !dest.exists() {
        return Err(tool_failed(
            &format!("debugfs -R '{request}'"),
            image,
            &output,
        ));
    }
    Ok(true)
}

/// The size of the file at `path` inside the image, `None` when it does not exist.
pub fn ext4_file_size(image: &Path, path: &str) -> Result<Option<u64>> {
    let output = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .map_err(|e| Error::io("run debugfs on", image, e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if String::from_utf8_lossy(&output.stderr).contains("File not found") {
        return Ok(None);
    }
    // "User:     0   Group:     0   Project: …   Size: 4096"
    Ok(text
        .split_whitespace()
        .skip_while(|word| *word != "Size:")
        .nth(1)
        .and_then(|size| size.parse().ok()))
}

fn run(tool: &str, args: &[&str], image: &Path) -> Result<std::process::Output> {
    Command::new(tool)
        .args(args)
        .arg(image)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorKind::ToolMissing,
                    format!("`{tool}` is not installed (Debian package e2fsprogs)"),
                )
            } else {
                Error::io(format!("run {tool} on"), image, e)
            }
        })
}

fn tool_failed(what: &str, image: &Path, output: &std::process::Output) -> Error {
    Error::new(
        ErrorKind::ToolFailed,
        format!(
            "`{what}` failed on {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_ext4(dir: &Path) -> std::path::PathBuf {
        let image = dir.join("fs.img");
        std::fs::write(&image, vec![0u8; 16 << 20]).unwrap();
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(status.success());
        image
    }

    #[test]
    fn fresh_filesystem_is_clean_and_missing_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let image = make_ext4(dir.path());
        let health = ext4_health(&image).unwrap();
        assert!(health.fsck_clean, "{health:?}");
        assert!(!health.needs_recovery);
        assert!(!ext4_extract(&image, "/nope", &dir.path().join("out")).unwrap());
        assert_eq!(ext4_file_size(&image, "/nope").unwrap(), None);
        assert!(
            ext4_file_size(&image, "/lost+found")
                .unwrap()
                .is_some_and(|size| size > 0)
        );
    }

    #[test]
    fn a_set_needs_recovery_flag_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let image = make_ext4(dir.path());
        // What a power cut leaves behind: the journal marked as needing replay.
        let status = Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        assert!(ext4_health(&image).unwrap().needs_recovery);
    }

    #[test]
    fn garbage_is_not_clean() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("garbage.img");
        std::fs::write(&image, vec![0xAB; 4 << 20]).unwrap();
        match ext4_health(&image) {
            Err(error) => assert_eq!(error.kind(), ErrorKind::ToolFailed),
            Ok(health) => assert!(!health.fsck_clean, "{health:?}"),
        }
    }
}
