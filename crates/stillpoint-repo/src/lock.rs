//! Repository locks as objects (`locks/<random id>`), so that they work the same on a local
//! directory and on an object store (no flock, no rename needed).
//!
//! A lock is a JSON record (kind, host, pid, purpose, start time, parent snapshots of a backup).
//! Acquiring = put the record, then list `locks/`: if a live lock of a conflicting kind is there,
//! delete ours and retry until the deadline. Two contenders may both back off; they never both
//! win. A holder re-puts its record every [`REFRESH_INTERVAL`]; a record not refreshed for
//! [`STALE_AFTER`], or one of a dead process on this host, is stale and ignored (and removed
//! by maintenance). The lock's *start* time is the backend's timestamp of its first put, so gc
//! compares backend times with backend times even when clocks differ between hosts.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
// A zombie counts as dead: it refreshes no lock any more.
use stillpoint_os::process::process_alive;
use tracing::{debug, warn};

use crate::backend::{Backend, ObjectMeta};
use crate::error::{Error, ErrorKind, Result};
use crate::format::keys::LOCKS;

/// How often a held lock is refreshed.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(1800);

/// What a lock allows beside it (see the locking table in the crate doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// A backup session: adds chunks, indexes and one manifest. Coexists with everything;
    /// gc and prune honour it (start time, parent snapshots).
    Backup,
    /// Reads published snapshots (restore, verify): excludes prune and gc, which delete.
    Read,
    /// Deletes (prune, gc): excludes readers and other deleters, runs beside backups.
    Exclusive,
}

impl LockKind {
    /// Whether a holder of `self` may run beside a holder of `other`.
    pub fn compatible_with(self, other: LockKind) -> bool {
        use LockKind::*;
        !matches!(
            (self, other),
            (Read, Exclusive) | (Exclusive, Read) | (Exclusive, Exclusive)
        )
    }
}

/// The stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRecord {
    /// The kind.
    pub kind: LockKind,
    /// Host name of the holder.
    pub hostname: String,
    /// Process id of the holder.
    pub pid: u32,
    /// What it is doing (`backup vm1`, `gc` …).
    pub purpose: String,
    /// Backend time of the first put, nanoseconds since the epoch; written by refreshes (until
    /// the first refresh the object's modification time is the start).
    #[serde(default)]
    pub start_ns: Option<u128>,
    /// Snapshots a backup carries chunks over from (gc keeps their indexes' chunks).
    #[serde(default)]
    pub parents: Vec<String>,
}

/// A lock seen in the repository.
#[derive(Debug, Clone)]
pub struct LiveLock {
    /// Object metadata (key, last refresh time).
    pub meta: ObjectMeta,
    /// The record.
    pub record: LockRecord,
    /// Its start time (backend clock).
    pub start: SystemTime,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether a lock is stale: not refreshed for [`STALE_AFTER`] (by `now`, backend clock) or
/// held by a process of this host that no longer exists.
pub(crate) fn is_stale(lock: &LiveLock, now: SystemTime, this_host: &str) -> bool {
    let age = now.duration_since(lock.meta.modified).unwrap_or_default();
    if age > STALE_AFTER {
        return true;
    }
    lock.record.hostname == this_host && !process_alive(lock.record.pid)
}

/// Every lock record in the repository, stale or not (unreadable ones are skipped with a warning).
pub(crate) fn list_locks(backend: &dyn Backend) -> Result<Vec<LiveLock>> {
    let mut out = Vec::new();
    for meta in backend.list(LOCKS)? {
        let bytes = match backend.get(&meta.key) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::Missing => continue, // released meanwhile
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<LockRecord>(&bytes) {
            Ok(record) => {
                let start = record
                    .start_ns
                    .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as u128) as u64))
                    .unwrap_or(meta.modified);
                out.push(LiveLock {
                    meta,
                    record,
                    start,
                });
            }
            Err(e) => warn!(key = %meta.key, error = %e, "ignoring an unreadable lock object"),
        }
    }
    Ok(out)
}

/// The live (not stale) locks, with the backend's notion of "now" taken from `now_probe`.
pub(crate) fn live_locks(backend: &dyn Backend, now: SystemTime) -> Result<Vec<LiveLock>> {
    let host = hostname();
    Ok(list_locks(backend)?
        .into_iter()
        .filter(|l| !is_stale(l, now, &host))
        .collect())
}

/// A held lock; released (its object deleted) on drop.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    key: String,
    start: SystemTime,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("key", &self.key).finish()
    }
}

impl LockGuard {
    /// Takes a lock of `kind`, waiting up to `wait` for conflicting holders to go.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        kind: LockKind,
        purpose: &str,
        parents: Vec<String>,
        wait: Duration,
    ) -> Result<Self> {
        let deadline = std::time::Instant::now() + wait;
        let id: [u8; 8] = crate::keys::random_bytes();
        let key = format!("{LOCKS}{}", hex::encode(id));
        let mut record = LockRecord {
            kind,
            hostname: hostname(),
            pid: std::process::id(),
            purpose: purpose.to_string(),
            start_ns: None,
            parents,
        };
        let mut attempt = 0u32;
        loop {
            record.start_ns = None;
            backend.put(&key, &serde_json::to_vec(&record).expect("lock record"))?;
            let meta = backend.stat(&key)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Io,
                    "lock object vanished right after it was written",
                )
                .with_path(&key)
            })?;
            let now = meta.modified;
            let conflict = live_locks(backend.as_ref(), now)?
                .into_iter()
                .find(|l| l.meta.key != key && !kind.compatible_with(l.record.kind));
            match conflict {
                None => {
                    record.start_ns = Some(
                        meta.modified
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_nanos(),
                    );
                    // Stored with the first refresh: until then the object's own time is
                    // the start (see `list_locks`), which saves a second durable put.
                    let bytes = serde_json::to_vec(&record).expect("lock record");
                    debug!(key, ?kind, purpose, "lock acquired");
                    let stop = Arc::new((Mutex::new(false), Condvar::new()));
                    let refresher =
                        spawn_refresher(backend.clone(), key.clone(), bytes, stop.clone());
                    return Ok(Self {
                        backend,
                        key,
                        start: meta.modified,
                        stop,
                        refresher: Some(refresher),
                    });
                }
                Some(holder) => {
                    backend.delete(&key)?;
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::new(
                            ErrorKind::Locked,
                            format!(
                                "the repository is locked by `{}` ({:?} lock of pid {} on {}); {purpose} cannot run beside it",
                                holder.record.purpose,
                                holder.record.kind,
                                holder.record.pid,
                                holder.record.hostname
                            ),
                        )
                        .with_path(&holder.meta.key));
                    }
                    attempt += 1;
                    let jitter = u64::from(crate::keys::random_bytes::<1>()[0]);
                    std::thread::sleep(Duration::from_millis(
                        (100 * u64::from(attempt.min(10))) + jitter,
                    ));
                }
            }
        }
    }

    /// When the lock was taken (backend clock).
    pub fn start(&self) -> SystemTime {
        self.start
    }

    /// The lock object's key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

fn spawn_refresher(
    backend: Arc<dyn Backend>,
    key: String,
    bytes: Vec<u8>,
    stop: Arc<(Mutex<bool>, Condvar)>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (lock, cvar) = &*stop;
        let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !*stopped {
            let (guard, timeout) = cvar
                .wait_timeout(stopped, REFRESH_INTERVAL)
                .unwrap_or_else(|p| p.into_inner());
            stopped = guard;
            if !*stopped
                && timeout.timed_out()
                && let Err(e) = backend.put(&key, &bytes)
            {
                warn!(key, error = %e, "cannot refresh a repository lock");
            }
        }
    })
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        {
            let (lock, cvar) = &*self.stop;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cvar.notify_all();
        }
        if let Some(handle) = self.refresher.take() {
            let _ = handle.join();
        }
        if let Err(e) = self.backend.delete(&self.key) {
            warn!(key = self.key, error = %e, "cannot release a repository lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[rstest::rstest]
    #[case(LockKind::Backup, LockKind::Backup, true)]
    #[case(LockKind::Backup, LockKind::Read, true)]
    #[case(LockKind::Backup, LockKind::Exclusive, true)]
    #[case(LockKind::Read, LockKind::Read, true)]
    #[case(LockKind::Read, LockKind::Exclusive, false)]
    #[case(LockKind::Exclusive, LockKind::Exclusive, false)]
    fn compatibility_table(#[case] a: LockKind, #[case] b: LockKind, #[case] ok: bool) {
        assert_eq!(a.compatible_with(b), ok);
        assert_eq!(b.compatible_with(a), ok);
    }

    #[test]
    fn exclusive_waits_out_readers_and_stale_locks_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()));
        let read = LockGuard::acquire(
            backend.clone(),
            LockKind::Read,
            "verify",
            vec![],
            Duration::ZERO,
        )
        .unwrap();
        let backup = LockGuard::acquire(
            backend.clone(),
            LockKind::Backup,
            "backup",
            vec![],
            Duration::ZERO,
        )
        .unwrap();
        let err = LockGuard::acquire(
            backend.clone(),
            LockKind::Exclusive,
            "gc",
            vec![],
            Duration::ZERO,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked);
        assert!(err.to_string().contains("verify"), "{err}");
        drop(read);
        let gc = LockGuard::acquire(
            backend.clone(),
            LockKind::Exclusive,
            "gc",
            vec![],
            Duration::ZERO,
        )
        .unwrap();
        drop(gc);
        drop(backup);
        assert!(
            backend.list(LOCKS).unwrap().is_empty(),
            "locks are released"
        );

        // A lock of a dead process on this host is stale: it blocks nothing.
        let dead = LockRecord {
            kind: LockKind::Exclusive,
            hostname: hostname(),
            pid: 0x7fff_fff0,
            purpose: "killed gc".into(),
            start_ns: None,
            parents: vec![],
        };
        backend
            .put("locks/dead", &serde_json::to_vec(&dead).unwrap())
            .unwrap();
        LockGuard::acquire(backend, LockKind::Read, "restore", vec![], Duration::ZERO).unwrap();
    }
}
