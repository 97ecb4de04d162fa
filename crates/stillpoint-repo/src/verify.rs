//! `verify`: every snapshot's manifest and indexes are authenticated; then every referenced
//! chunk is read back and authenticated (full), or only checked to exist (`quick`).
//! Problems name the snapshot, disk and offset they affect.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::error::{ErrorKind, Result};
use crate::format::keys::CHUNKS;
use crate::index::Digest;
use crate::lock::LockKind;
use crate::repository::{Repository, chunk_key};

/// One thing wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Affected snapshot.
    pub snapshot: String,
    /// Affected disk, if the problem is in a disk.
    pub disk: Option<String>,
    /// Affected byte offset in that disk, if the problem is a chunk.
    pub offset: Option<u64>,
    /// The damaged object's key.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "snapshot {}", self.snapshot)?;
        if let Some(disk) = &self.disk {
            write!(f, ", disk {disk}")?;
        }
        if let Some(offset) = self.offset {
            write!(f, ", offset {offset}")?;
        }
        write!(f, ": {} ({})", self.message, self.object)
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Snapshots looked at.
    pub snapshots: u64,
    /// Disks looked at.
    pub disks: u64,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Whether chunks were only checked for existence.
    pub quick: bool,
    /// Everything wrong, sorted by snapshot, disk, offset.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

type Refs = HashMap<Digest, Vec<(String, String, u64)>>;

impl Repository {
    /// Verifies the repository. `progress` gets the number of chunks checked so far, and the
    /// total, as chunks are done.
    pub fn verify(
        &self,
        quick: bool,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<VerifyReport> {
        let _lock = self.lock(LockKind::Read, "verify")?;
        let mut report = VerifyReport {
            quick,
            ..Default::default()
        };
        let mut refs: Refs = HashMap::new();
        for id in self.snapshot_ids()? {
            report.snapshots += 1;
            let manifest = match self.load_manifest(&id) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::SnapshotNotFound => continue,
                Err(e) => {
                    report.problems.push(Problem {
                        snapshot: id.clone(),
                        disk: None,
                        offset: None,
                        object: crate::repository::snapshot_key(&id),
                        message: e.message().to_string(),
                    });
                    continue;
                }
            };
            for disk in &manifest.disks {
                report.disks += 1;
                match self.load_index(&manifest, &disk.name) {
                    Ok(index) => {
                        for (i, digest) in index.entries().iter().enumerate() {
                            if !index.is_zero(i) {
                                refs.entry(*digest).or_default().push((
                                    id.clone(),
                                    disk.name.clone(),
                                    index.chunk_range(i).0,
                                ));
                            }
                        }
                    }
                    Err(e) => report.problems.push(Problem {
                        snapshot: id.clone(),
                        disk: Some(disk.name.clone()),
                        offset: None,
                        object: disk.index.clone(),
                        message: e.message().to_string(),
                    }),
                }
            }
        }
        let digests: Vec<&Digest> = refs.keys().collect();
        let total = digests.len() as u64;
        report.chunks_checked = total;
        let bad: Mutex<Vec<(Digest, String)>> = Mutex::new(Vec::new());
        if quick {
            let present: HashSet<String> = self
                .backend
                .list(CHUNKS)?
                .into_iter()
                .map(|m| m.key)
                .collect();
            for (n, digest) in digests.iter().enumerate() {
                if !present.contains(&chunk_key(digest)) {
                    bad.lock()
                        .expect("poisoned")
                        .push((**digest, "chunk is missing".into()));
                }
                if let Some(progress) = progress {
                    progress(n as u64 + 1, total);
                }
            }
        } else {
            let next = AtomicUsize::new(0);
            let done = AtomicUsize::new(0);
            let workers = std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(2);
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(|| {
                        let mut buf = Vec::new();
                        while let Some(digest) = digests.get(next.fetch_add(1, Ordering::Relaxed)) {
                            if let Err(e) = self.read_chunk(digest, &mut buf) {
                                bad.lock()
                                    .expect("poisoned")
                                    .push((**digest, e.message().to_string()));
                            }
                            let n = done.fetch_add(1, Ordering::Relaxed) as u64 + 1;
                            if let Some(progress) = progress {
                                progress(n, total);
                            }
                        }
                    });
                }
            });
        }
        for (digest, message) in bad.into_inner().expect("poisoned") {
            for (snapshot, disk, offset) in &refs[&digest] {
                report.problems.push(Problem {
                    snapshot: snapshot.clone(),
                    disk: Some(disk.clone()),
                    offset: Some(*offset),
                    object: chunk_key(&digest),
                    message: message.clone(),
                });
            }
        }
        report.problems.sort_by(|a, b| {
            (&a.snapshot, &a.disk, a.offset).cmp(&(&b.snapshot, &b.disk, b.offset))
        });
        Ok(report)
    }
}
