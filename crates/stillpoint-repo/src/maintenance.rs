//! `prune` (carry out a retention plan) and `gc` (mark and sweep), plus `stats`.
//!
//! gc's safety beside running backups (the proof sketch is in the crate doc):
//! - mark: chunks of every published snapshot's indexes, and of the indexes of every snapshot
//!   a live backup names as its parent (even if pruned meanwhile);
//! - sweep: only unreferenced objects whose backend time is older than
//!   `min(gc start, start of the oldest live backup) − grace`;
//! - a record `gc/<id>` is written after deleting anything, before the lock is released, so
//!   that backups that reused old chunks check them again.

use std::collections::HashSet;
use std::time::SystemTime;

use chrono::Utc;
use serde::Serialize;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::format::keys::{CHUNKS, GC, INDEXES};
use crate::index::{Digest, is_continuation_segment};
use crate::lock::{LockKind, is_stale, list_locks};
use crate::repository::{Repository, chunk_key, snapshot_key};
use crate::retention::{KeepRules, RetentionPlan, SnapshotSummary, plan_retention};

/// What `prune` did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// The retention plan.
    pub plan: RetentionPlan,
    /// Snapshots deleted (empty on a dry run).
    pub deleted: Vec<String>,
    /// Snapshots the plan would delete but a running backup uses as its parent.
    pub kept_in_use: Vec<String>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Distinct chunks referenced.
    pub referenced_chunks: u64,
    /// Unreferenced chunks deleted (or that would be, on a dry run).
    pub deleted_chunks: u64,
    /// Their stored bytes.
    pub deleted_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the cutoff.
    pub kept_young_chunks: u64,
    /// Orphaned indexes deleted.
    pub deleted_indexes: u64,
    /// Stale lock objects removed.
    pub removed_stale_locks: u64,
    /// Temp files of killed writers removed.
    pub removed_temp_files: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Repository statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoStats {
    /// Snapshots.
    pub snapshots: u64,
    /// Distinct VMs.
    pub vms: u64,
    /// Sum of all snapshots' disk sizes.
    pub logical_bytes: u64,
    /// Stored chunks.
    pub chunks: u64,
    /// Bytes of stored chunks.
    pub chunk_bytes: u64,
    /// Bytes of all objects (chunks, indexes, manifests, keys, …).
    pub total_bytes: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Whether encrypted.
    pub encrypted: bool,
}

impl Repository {
    /// Applies retention rules per VM. Deletes manifests only (indexes and chunks go with gc).
    pub fn prune(&self, rules: &KeepRules, dry_run: bool) -> Result<PruneReport> {
        let lock = self.lock(LockKind::Exclusive, "prune")?;
        let manifests = self.snapshots(None)?;
        let summaries: Vec<SnapshotSummary> = manifests
            .iter()
            .map(|m| SnapshotSummary {
                id: m.id.clone(),
                vm: m.vm.clone(),
                time: m.time,
            })
            .collect();
        let plan = plan_retention(&summaries, rules, Utc::now())?;
        let host = crate::lock::hostname();
        let in_use: HashSet<String> = list_locks(self.backend.as_ref())?
            .into_iter()
            .filter(|l| l.record.kind == LockKind::Backup && !is_stale(l, lock.start(), &host))
            .flat_map(|l| l.record.parents)
            .collect();
        let mut report = PruneReport {
            plan,
            deleted: Vec::new(),
            kept_in_use: Vec::new(),
            dry_run,
        };
        for id in report.plan.to_delete() {
            if in_use.contains(id) {
                report.kept_in_use.push(id.to_string());
                continue;
            }
            if !dry_run {
                self.backend.delete(&snapshot_key(id))?;
                info!(snapshot = id, "snapshot pruned");
            }
            report.deleted.push(id.to_string());
        }
        if dry_run {
            report.deleted.clear();
        }
        Ok(report)
    }

    /// Mark and sweep. Safe beside running backups; excludes restores, verify and prune.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let lock = self.lock(LockKind::Exclusive, "gc")?;
        let gc_start = lock.start();
        let host = crate::lock::hostname();
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };

        let locks = list_locks(self.backend.as_ref())?;
        let mut oldest_backup = gc_start;
        let mut parents = Vec::new();
        for l in &locks {
            if is_stale(l, gc_start, &host) {
                if !dry_run {
                    self.backend.delete(&l.meta.key)?;
                }
                report.removed_stale_locks += 1;
            } else if l.record.kind == LockKind::Backup {
                oldest_backup = oldest_backup.min(l.start);
                parents.extend(l.record.parents.iter().cloned());
            }
        }
        let cutoff = oldest_backup
            .checked_sub(self.gc_grace())
            .unwrap_or(SystemTime::UNIX_EPOCH);

        // Mark.
        let mut referenced: HashSet<Digest> = HashSet::new();
        let mut live_indexes: HashSet<String> = HashSet::new();
        let snapshot_ids: HashSet<String> = self.snapshot_ids()?.into_iter().collect();
        for id in &snapshot_ids {
            let manifest = match self.load_manifest(id) {
                Ok(m) => m,
                Err(e) => {
                    return Err(Error::new(
                        e.kind(),
                        "gc stops: a manifest cannot be read, so its chunks cannot be told apart from garbage (run `repo verify`)",
                    )
                    .with_snapshot(id)
                    .with_source(e));
                }
            };
            for disk in &manifest.disks {
                let index = self.load_index(&manifest, &disk.name).map_err(|e| {
                    Error::new(
                        e.kind(),
                        "gc stops: an index cannot be read (run `repo verify`)",
                    )
                    .with_snapshot(id)
                    .with_disk(&disk.name)
                    .with_source(e)
                })?;
                live_indexes.insert(disk.index.clone());
                referenced.extend(index.entries().iter().copied());
            }
        }
        for parent in &parents {
            for meta in self.backend.list(&format!("{INDEXES}{parent}/"))? {
                if is_continuation_segment(&meta.key) {
                    // Read with its first segment; kept as part of the parent's indexes.
                    live_indexes.insert(meta.key.clone());
                    continue;
                }
                let index = self.load_index_key(&meta.key, &[]).map_err(|e| {
                    Error::new(
                        e.kind(),
                        "gc stops: the parent index of a running backup cannot be read",
                    )
                    .with_snapshot(parent)
                    .with_source(e)
                })?;
                live_indexes.insert(meta.key.clone());
                referenced.extend(index.entries().iter().copied());
            }
        }
        referenced.remove(&crate::format::ZERO_CHUNK_DIGEST);
        report.referenced_chunks = referenced.len() as u64;
        let referenced_keys: HashSet<String> = referenced.iter().map(chunk_key).collect();

        // Sweep.
        for meta in self.backend.list(CHUNKS)? {
            if referenced_keys.contains(&meta.key) {
                continue;
            }
            if meta.modified >= cutoff {
                report.kept_young_chunks += 1;
                continue;
            }
            if !dry_run {
                self.backend.delete(&meta.key)?;
            }
            report.deleted_chunks += 1;
            report.deleted_bytes += meta.size;
        }
        for meta in self.backend.list(INDEXES)? {
            let snapshot = meta.key[INDEXES.len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            if live_indexes.contains(&meta.key)
                || snapshot_ids.contains(snapshot)
                || meta.modified >= cutoff
            {
                continue;
            }
            if !dry_run {
                self.backend.delete(&meta.key)?;
            }
            report.deleted_indexes += 1;
        }
        if !dry_run {
            report.removed_temp_files = self.backend.clean_temp(cutoff)? as u64;
            if report.deleted_chunks > 0 {
                let id: [u8; 8] = crate::keys::random_bytes();
                let record = serde_json::json!({
                    "finished": Utc::now(),
                    "deleted_chunks": report.deleted_chunks,
                    "deleted_bytes": report.deleted_bytes,
                });
                self.backend.put(
                    &format!("{GC}{}", hex::encode(id)),
                    record.to_string().as_bytes(),
                )?;
                self.trim_gc_records()?;
            }
        }
        info!(?report, "gc finished");
        drop(lock);
        Ok(report)
    }

    fn trim_gc_records(&self) -> Result<()> {
        let mut records = self.backend.list(GC)?;
        records.sort_by_key(|m| m.modified);
        let excess = records.len().saturating_sub(100);
        for meta in &records[..excess] {
            if let Err(e) = self.backend.delete(&meta.key) {
                warn!(error = %e, "cannot delete an old gc record");
            }
        }
        Ok(())
    }

    /// Counts snapshots, chunks and bytes. Takes no lock.
    pub fn stats(&self) -> Result<RepoStats> {
        let manifests = self.snapshots(None)?;
        let vms: HashSet<&str> = manifests.iter().map(|m| m.vm.as_str()).collect();
        let mut stats = RepoStats {
            snapshots: manifests.len() as u64,
            vms: vms.len() as u64,
            logical_bytes: manifests.iter().map(|m| m.total_size()).sum(),
            chunk_size: self.config.chunk_size,
            encrypted: self.keys.encrypted(),
            ..Default::default()
        };
        for meta in self.backend.list("")? {
            stats.total_bytes += meta.size;
            if meta.key.starts_with(CHUNKS) {
                stats.chunks += 1;
                stats.chunk_bytes += meta.size;
            }
        }
        Ok(stats)
    }
}
