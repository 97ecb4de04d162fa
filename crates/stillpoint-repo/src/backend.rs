//! Storage backends: one object-store-shaped trait and the local directory implementation.
//!
//! The trait has exactly the operations an object store offers (put a whole object, create it
//! only if absent, get it or a range of it, stat, list a prefix, delete), so an S3 backend
//! fits behind it unchanged. It is synchronous: the writer pipeline calls it from its own
//! worker threads, and an async store bridges with `tokio::runtime::Handle::block_on` there.
//! Object keys are `/`-separated relative names such as `chunks/ab/ab12…`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::random_bytes;

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, by the backend's clock.
    pub modified: SystemTime,
}

/// An object store: the only way the repository touches storage.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Where the repository lives, for messages.
    fn location(&self) -> String;
    /// Stores `data` under `key`, replacing any object there; atomic and durable on return.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Stores `data` under `key` only if no object is there; `Ok(false)` if one was.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Reads a whole object; [`ErrorKind::Missing`] if absent.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset` of an object.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Metadata of an object, `None` if absent.
    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`).
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Removes an object; removing an absent object is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Removes leftovers of interrupted writes older than `older_than`; returns how many.
    /// Stores whose puts are atomic by themselves have none.
    fn clean_temp(&self, older_than: SystemTime) -> Result<usize> {
        let _ = older_than;
        Ok(0)
    }
}

/// A repository in a local directory.
///
/// Writes go to `tmp/<random>` first, are fsynced, renamed into place (or hard-linked for
/// [`Backend::put_new`], which fails atomically if the target exists) and the directory is
/// fsynced, so a reader never sees a half-written object even after a crash or kill -9.
/// Leftover temp files of killed writers are removed by `gc`.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

const TMP_DIR: &str = "tmp";

impl LocalBackend {
    /// A backend rooted at `root` (which need not exist yet: `init` creates it).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(Error::new(ErrorKind::InvalidInput, "invalid object key").with_path(key));
        }
        Ok(self.root.join(key))
    }

    /// Writes `data` into a fresh fsynced temp file and returns its path.
    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let dir = self.root.join(TMP_DIR);
        let name: [u8; 12] = random_bytes();
        let path = dir.join(format!("{}.tmp", hex::encode(name)));
        let write = || -> std::io::Result<()> {
            let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == IoKind::NotFound => {
                    fs::create_dir_all(&dir)?;
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)?
                }
                Err(e) => return Err(e),
            };
            file.write_all(data)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&path);
            return Err(Error::io("cannot write a temporary file", e).with_path(&path));
        }
        Ok(path)
    }

    /// Moves a temp file into place with `op` (rename or link), creating the parent directory
    /// if needed, then fsyncs the parent directory.
    fn install(
        &self,
        tmp: &Path,
        target: &Path,
        op: impl Fn(&Path, &Path) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let parent = target.parent().expect("object paths have a parent");
        match op(tmp, target) {
            Err(e) if e.kind() == IoKind::NotFound => {
                fs::create_dir_all(parent)?;
                op(tmp, target)?;
                // New directories are durable only once their own parents are synced.
                let mut dir = parent;
                while let Some(up) = dir.parent() {
                    File::open(up)?.sync_all()?;
                    if up == self.root || !up.starts_with(&self.root) {
                        break;
                    }
                    dir = up;
                }
            }
            other => other?,
        }
        File::open(parent)?.sync_all()
    }
}

fn meta_of(key: String, meta: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key,
        size: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let target = self.path_of(key)?;
        let tmp = self.write_temp(data)?;
        self.install(&tmp, &target, |from, to| fs::rename(from, to))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                Error::io("cannot store an object", e).with_path(&target)
            })
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        let target = self.path_of(key)?;
        let tmp = self.write_temp(data)?;
        let result = self.install(&tmp, &target, |from, to| fs::hard_link(from, to));
        let _ = fs::remove_file(&tmp);
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == IoKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io("cannot store an object", e).with_path(&target)),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        fs::read(&path).map_err(|e| read_error(e, &path))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut out = Vec::new();
            file.take(len).read_to_end(&mut out)?;
            Ok(out)
        };
        read().map_err(|e| read_error(e, &path))
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta_of(key.to_string(), &meta))),
            Err(e) if e.kind() == IoKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot stat an object", e).with_path(&path)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == IoKind::NotFound => continue,
                Err(e) => return Err(Error::io("cannot list a directory", e).with_path(&dir)),
            };
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::io("cannot list a directory", e).with_path(&dir))?;
                let path = entry.path();
                let rel = path
                    .strip_prefix(&self.root)
                    .expect("listed below the root")
                    .to_string_lossy()
                    .into_owned();
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Deleted between readdir and stat (a concurrent gc): not there any more.
                    Err(e) if e.kind() == IoKind::NotFound => continue,
                    Err(e) => return Err(Error::io("cannot stat a file", e).with_path(&path)),
                };
                if meta.is_dir() {
                    if (rel.clone() + "/").starts_with(prefix) || prefix.starts_with(&rel) {
                        stack.push(path);
                    }
                } else if rel.starts_with(prefix) && !rel.starts_with("tmp/") {
                    out.push(meta_of(rel, &meta));
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn clean_temp(&self, older_than: SystemTime) -> Result<usize> {
        self.clean_temp_files(older_than)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == IoKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("cannot delete an object", e).with_path(&path)),
        }
    }
}

fn read_error(e: std::io::Error, path: &Path) -> Error {
    if e.kind() == IoKind::NotFound {
        Error::new(ErrorKind::Missing, "object is missing")
            .with_path(path)
            .with_source(e)
    } else {
        Error::io("cannot read an object", e).with_path(path)
    }
}

impl LocalBackend {
    fn clean_temp_files(&self, older_than: SystemTime) -> Result<usize> {
        let dir = self.root.join(TMP_DIR);
        let mut removed = 0;
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("cannot list a directory", e).with_path(&dir)),
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|m| m < older_than)
                .unwrap_or(false);
            if old && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path());
        backend.put("chunks/ab/abcd", b"data").unwrap();
        backend.put("chunks/ab/abcd", b"data2").unwrap();
        assert_eq!(backend.get("chunks/ab/abcd").unwrap(), b"data2");
        assert_eq!(backend.get_range("chunks/ab/abcd", 1, 2).unwrap(), b"at");
        assert!(backend.put_new("locks/x", b"1").unwrap());
        assert!(!backend.put_new("locks/x", b"2").unwrap());
        assert_eq!(backend.get("locks/x").unwrap(), b"1");
        let keys: Vec<String> = backend
            .list("chunks/")
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec!["chunks/ab/abcd".to_string()]);
        assert!(backend.list("snapshots/").unwrap().is_empty());
        backend.delete("chunks/ab/abcd").unwrap();
        backend.delete("chunks/ab/abcd").unwrap();
        let err = backend.get("chunks/ab/abcd").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Missing);
        assert!(err.to_string().contains("chunks/ab/abcd"));
        // No temp files are left behind by successful writes.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn keys_cannot_escape_the_root() {
        let backend = LocalBackend::new("/nonexistent");
        assert_eq!(
            backend.get("../etc/passwd").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
