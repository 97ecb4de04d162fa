//! The staging directory a restore writes into before it renames its files into place, and
//! the removal of those that killed restores left behind.
//!
//! A restore that fails removes its staging directory; one killed outright (SIGKILL, a power
//! cut) cannot, and its directory holds whole disk images. So a staging directory says
//! whether its restore still runs: the restore holds an exclusive `flock` on the directory
//! for as long as it lives, and the kernel drops that lock when the process dies, however it
//! dies. A restore into the same target first removes ([`sweep_abandoned`]) every staging
//! directory whose lock it can take — never one whose restore still runs, whatever its PID
//! or age.
//!
//! The owner takes the lock *before* it writes the [`OWNER_FILE`] marker, and the sweep only
//! removes a directory that has the marker: a directory created a moment ago whose owner has
//! not locked it yet has no marker, so it is left alone (and so is a staging directory of an
//! older stillpoint, which wrote no marker). Removal happens while the sweep holds the lock.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Every staging directory's name starts with this.
pub const PREFIX: &str = ".stillpoint-restore-";
/// Written into a staging directory once its restore holds the lock: the restore's PID.
pub const OWNER_FILE: &str = ".stillpoint-owner";

/// A staging directory, locked while this value lives; removed (with what is still in it)
/// when it drops.
pub struct Staging {
    // Dropped in this order: the directory goes while the lock is still held.
    dir: tempfile::TempDir,
    _lock: File,
}

impl Staging {
    /// Creates and locks a fresh staging directory in `target`.
    pub fn create(target: &Path) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix(PREFIX).tempdir_in(target)?;
        let lock = File::open(dir.path())?;
        // Blocks only while a sweep looks at the new directory (it finds no marker and lets
        // go at once).
        lock.lock()?;
        let mut owner = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.path().join(OWNER_FILE))?;
        writeln!(owner, "{}", std::process::id())?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// One staging directory a sweep found abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    pub path: PathBuf,
    /// Bytes its files took on disk.
    pub bytes: u64,
    /// Why it could not be removed; `None`: it was removed.
    pub error: Option<String>,
}

/// Removes the staging directories in `target` whose restore is gone (see the module doc).
/// `Err` only when `target` cannot be listed; a directory that cannot be removed is reported
/// in its [`Abandoned::error`].
pub fn sweep_abandoned(target: &Path) -> std::io::Result<Vec<Abandoned>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(target)? {
        let entry = entry?;
        let is_staging = entry.file_name().to_string_lossy().starts_with(PREFIX)
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_staging {
            continue;
        }
        let path = entry.path();
        let Ok(lock) = File::open(&path) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // its restore runs (or the lock cannot be taken: leave it)
        }
        if std::fs::symlink_metadata(path.join(OWNER_FILE)).is_err() {
            continue; // not claimed yet, or not one this stillpoint can tell about
        }
        let bytes = allocated_bytes(&path);
        let error = std::fs::remove_dir_all(&path)
            .err()
            .map(|error| error.to_string());
        drop(lock);
        found.push(Abandoned { path, bytes, error });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// What the files below `dir` take on disk (sparse images count what they hold).
fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok())
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => allocated_bytes(&entry.path()),
            _ => entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a killed restore leaves: a claimed staging directory nobody holds a lock on.
    fn abandoned_in(target: &Path, name: &str) -> PathBuf {
        let path = target.join(format!("{PREFIX}{name}"));
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join(OWNER_FILE), "4242\n").expect("owner");
        std::fs::write(path.join("vd0.raw"), vec![1u8; 64 << 10]).expect("image");
        path
    }

    #[test]
    fn a_killed_restores_staging_directory_is_removed() {
        let target = tempfile::tempdir().expect("temp dir");
        let left = abandoned_in(target.path(), "killed");
        let swept = sweep_abandoned(target.path()).expect("sweep");
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert_eq!(swept[0].path, left);
        assert!(swept[0].bytes >= 64 << 10, "{swept:?}");
        assert_eq!(swept[0].error, None);
        assert!(!left.exists());
    }

    #[test]
    fn a_running_restores_staging_directory_is_left_alone() {
        let target = tempfile::tempdir().expect("temp dir");
        let running = Staging::create(target.path()).expect("staging");
        std::fs::write(running.path().join("vd0.raw"), b"being written").expect("write");
        assert!(
            running.path().join(OWNER_FILE).exists(),
            "the owner claims it"
        );
        let swept = sweep_abandoned(target.path()).expect("sweep");
        assert!(swept.is_empty(), "{swept:?}");
        assert!(running.path().join("vd0.raw").exists());
        let path = running.path().to_path_buf();
        drop(running);
        assert!(!path.exists(), "a finished restore removes its own");
    }

    #[test]
    fn unclaimed_directories_and_other_entries_are_left_alone() {
        let target = tempfile::tempdir().expect("temp dir");
        // Created a moment ago by a restore that has not locked it yet (or by an older
        // stillpoint): no owner marker.
        let fresh = target.path().join(format!("{PREFIX}fresh"));
        std::fs::create_dir(&fresh).expect("mkdir");
        // Not staging directories at all.
        let mine = target.path().join("my-dir");
        std::fs::create_dir(&mine).expect("mkdir");
        std::fs::write(mine.join(OWNER_FILE), "1\n").expect("write");
        let file = target.path().join(format!("{PREFIX}file"));
        std::fs::write(&file, "x").expect("write");
        let swept = sweep_abandoned(target.path()).expect("sweep");
        assert!(swept.is_empty(), "{swept:?}");
        assert!(fresh.exists() && mine.exists() && file.exists());
    }
}
