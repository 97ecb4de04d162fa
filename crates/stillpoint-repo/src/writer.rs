//! Backup sessions: write the disks of one VM, then publish its manifest.
//!
//! Per disk, the writer first plans every chunk without reading anything: a chunk untouched
//! by the changed ranges of an incremental keeps its parent's digest; a chunk outside the
//! source's data extents is zero. The remaining chunks go through a pool of worker threads,
//! each running read → zero check → keyed BLAKE3 → dedup lookup → zstd → AES-GCM → put for one
//! chunk at a time. Memory is bounded by `workers × 3 × chunk size` whatever the disk size;
//! there is no reordering buffer because index entries are written by position. What grows
//! with the disk is the index itself (32 bytes per chunk) and a list of chunk numbers (4 bytes
//! per chunk): 36 MiB for a 4 TiB disk at 4 MiB chunks.
//!
//! Reuse and gc (see the crate doc for the proof sketch): an existing chunk is reused only if
//! its backend time is at least `session start − grace/2`; an older one is written again
//! (refreshing its time). After each disk, if a gc ran during the session, every chunk the disk
//! stored or reused is checked again and written again from the source if gc took it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::blob::BlobEncoder;
use crate::error::{Error, ErrorKind, Result};
use crate::format::CHUNK_BLOB_MAGIC;
use crate::format::keys::GC;
use crate::index::{DiskIndex, chunk_count};
use crate::lock::{LockGuard, LockKind, live_locks};
use crate::manifest::{
    DiskEntry, DiskStats, MANIFEST_VERSION, Manifest, SnapshotInfo, new_snapshot_id,
};
use crate::repository::{DEFAULT_LOCK_WAIT, Repository, chunk_key, index_key};
use crate::source::{DiskSource, Extent, normalize};

/// Called with the number of bytes of the disk just dealt with (read, carried over or zero).
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// Options of [`Repository::begin_backup`].
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// The VM (or image) name the snapshot is filed under.
    pub vm: String,
    /// Snapshot whose indexes an incremental starts from (see [`BackupSession::write_disk`]).
    pub parent: Option<String>,
    /// Worker threads (default: twice the number of CPUs, at least 2).
    pub workers: Option<usize>,
}

/// One disk to write.
pub struct DiskInput<'a> {
    /// Disk name (unique within the snapshot).
    pub name: String,
    /// Where to read it.
    pub source: &'a dyn DiskSource,
    /// For an incremental: the byte ranges changed since the parent snapshot. Chunks outside
    /// them keep the parent's digest and are not read. `None` reads every data extent.
    pub changed: Option<Vec<Extent>>,
}

/// A backup in progress. Holds a `Backup` lock; dropping it without [`Self::publish`] leaves
/// no snapshot, and the chunks already stored stay reusable.
pub struct BackupSession {
    repo: Repository,
    lock: LockGuard,
    id: String,
    vm: String,
    began: DateTime<Utc>,
    parent: Option<Manifest>,
    disks: Vec<DiskEntry>,
    workers: usize,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("id", &self.id)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// Begins a backup session for a VM: takes the shared backup lock (naming the parent, so
    /// prune keeps it and gc keeps its chunks), then re-checks that the parent still exists.
    pub fn begin_backup(&self, options: BackupOptions) -> Result<BackupSession> {
        if options.vm.is_empty() || options.vm.contains(['\n', '\0']) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the VM name is empty or has control characters",
            ));
        }
        let lock = LockGuard::acquire(
            self.backend.clone(),
            LockKind::Backup,
            &format!("backup {}", options.vm),
            options.parent.iter().cloned().collect(),
            DEFAULT_LOCK_WAIT,
        )?;
        // Loaded after the lock is written: from here on, a prune sees our lock and keeps the
        // parent, and a gc either sees our lock or saw the parent's manifest.
        let parent = match &options.parent {
            Some(id) => Some(self.load_manifest(id).map_err(|e| e.with_vm(&options.vm))?),
            None => None,
        };
        let began = Utc::now();
        let workers = options.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(2)
                .max(2)
        });
        info!(vm = options.vm, parent = ?options.parent, "backup session started");
        Ok(BackupSession {
            repo: self.clone(),
            lock,
            id: new_snapshot_id(began),
            vm: options.vm,
            began,
            parent,
            disks: Vec::new(),
            workers,
        })
    }
}

struct Shared<'a> {
    session: &'a BackupSession,
    source: &'a dyn DiskSource,
    disk: &'a str,
    index_len: u64,
    chunk_size: u32,
    disk_size: u64,
    extents: &'a [Extent],
    work: &'a [u32],
    next: AtomicUsize,
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    index: Mutex<DiskIndex>,
    /// Chunks this disk stored or reused from the store (for the check after a gc).
    touched: Mutex<Vec<u32>>,
    bytes_read: AtomicU64,
    new: AtomicU64,
    reused: AtomicU64,
    zero: AtomicU64,
    stored: AtomicU64,
    progress: Option<Progress<'a>>,
    reuse_after: SystemTime,
}

fn is_all_zero(buf: &[u8]) -> bool {
    // Compare 64-byte blocks against a zero block: the compiler turns this into wide loads.
    const ZERO: [u8; 64] = [0; 64];
    let mut blocks = buf.chunks_exact(64);
    blocks.all(|b| b == ZERO) && blocks.remainder().iter().all(|&b| b == 0)
}

impl Shared<'_> {
    fn chunk_range(&self, i: usize) -> (u64, usize) {
        let off = i as u64 * u64::from(self.chunk_size);
        (
            off,
            (self.disk_size - off).min(u64::from(self.chunk_size)) as usize,
        )
    }

    /// Reads chunk `i` into `buf`, reading only its data extents (holes stay zero).
    fn read_chunk(&self, i: usize, buf: &mut Vec<u8>) -> Result<()> {
        let (off, len) = self.chunk_range(i);
        buf.clear();
        buf.resize(len, 0);
        let end = off + len as u64;
        let first = self.extents.partition_point(|e| e.end() <= off);
        for e in &self.extents[first..] {
            if e.offset >= end {
                break;
            }
            let s = e.offset.max(off);
            let t = e.end().min(end);
            self.source
                .read_at(s, &mut buf[(s - off) as usize..(t - off) as usize])
                .map_err(|err| err.with_disk(self.disk).with_vm(&self.session.vm))?;
            self.bytes_read.fetch_add(t - s, Ordering::Relaxed);
        }
        Ok(())
    }

    fn worker(&self) -> Result<()> {
        let repo = &self.session.repo;
        let mut encoder = BlobEncoder::new(repo.config.zstd_level)?;
        let mut buf = Vec::with_capacity(self.chunk_size as usize);
        let mut blob = Vec::new();
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let w = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = self.work.get(w) else {
                return Ok(());
            };
            let i = i as usize;
            self.read_chunk(i, &mut buf)?;
            let (off, len) = self.chunk_range(i);
            let digest = if is_all_zero(&buf) {
                self.zero.fetch_add(1, Ordering::Relaxed);
                crate::format::ZERO_CHUNK_DIGEST
            } else {
                let digest = repo.keys.chunk_id(&buf);
                let key = chunk_key(&digest);
                match repo.backend.stat(&key)? {
                    // Present and young enough that no gc can take it (see the crate doc).
                    Some(meta) if meta.modified >= self.reuse_after => {
                        self.reused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        encoder.encode(
                            &repo.keys,
                            CHUNK_BLOB_MAGIC,
                            &digest,
                            &buf,
                            true,
                            &mut blob,
                        )?;
                        repo.backend.put(&key, &blob).map_err(|e| {
                            e.with_disk(self.disk)
                                .with_offset(off)
                                .with_vm(&self.session.vm)
                        })?;
                        self.new.fetch_add(1, Ordering::Relaxed);
                        self.stored.fetch_add(blob.len() as u64, Ordering::Relaxed);
                    }
                }
                self.touched.lock().expect("poisoned").push(i as u32);
                digest
            };
            self.index.lock().expect("poisoned").set(i, digest);
            if let Some(progress) = self.progress {
                progress(len as u64);
            }
        }
    }
}

impl BackupSession {
    /// The snapshot id this session will publish.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The parent snapshot, if one was given and still exists.
    pub fn parent(&self) -> Option<&Manifest> {
        self.parent.as_ref()
    }

    /// Writes one disk and its index. Returns what it did (bytes read, chunks new / reused /
    /// zero, bytes stored) for the backup report.
    pub fn write_disk(
        &mut self,
        input: DiskInput<'_>,
        progress: Option<Progress<'_>>,
    ) -> Result<DiskStats> {
        let name = input.name;
        if self.disks.iter().any(|d| d.name == name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "two disks of one snapshot have the same name",
            )
            .with_disk(&name));
        }
        let chunk_size = self.repo.config.chunk_size;
        let disk_size = input.source.size();
        // Refuses a disk with more chunks than an index holds (chunk numbers below are u32).
        let mut index = DiskIndex::new_zeroed(disk_size, chunk_size)
            .map_err(|e| e.with_disk(&name).with_vm(&self.vm))?;
        let n = chunk_count(disk_size, chunk_size) as usize;
        let extents = normalize(
            input
                .source
                .data_extents()
                .map_err(|e| e.with_disk(&name))?,
            disk_size,
        );

        // Plan every chunk before reading anything.
        let parent_index = match (&input.changed, &self.parent) {
            (Some(_), Some(parent)) => match parent.disk(&name) {
                Ok(entry) if entry.chunk_size == chunk_size => {
                    Some(self.repo.load_index(parent, &name)?)
                }
                _ => {
                    warn!(
                        disk = name,
                        "the parent snapshot has no usable index for this disk: reading it whole"
                    );
                    None
                }
            },
            (Some(_), None) => {
                warn!(
                    disk = name,
                    "changed ranges given without a parent snapshot: reading the disk whole"
                );
                None
            }
            _ => None,
        };
        let changed = input
            .changed
            .map(|c| normalize(c, disk_size))
            .unwrap_or_default();
        // Carried-over and zero chunks go straight into the index; the rest is work.
        let mut stats = DiskStats::default();
        let mut work: Vec<u32> = Vec::new();
        let mut skipped_bytes = 0u64;
        let (mut ci, mut ei) = (0usize, 0usize);
        for i in 0..n {
            let off = i as u64 * u64::from(chunk_size);
            let end = (off + u64::from(chunk_size)).min(disk_size);
            while ci < changed.len() && changed[ci].end() <= off {
                ci += 1;
            }
            while ei < extents.len() && extents[ei].end() <= off {
                ei += 1;
            }
            let touched = ci < changed.len() && changed[ci].offset < end;
            let has_data = ei < extents.len() && extents[ei].offset < end;
            let carried = parent_index.as_ref().and_then(|p| {
                // Only a parent chunk of the same length can stand for this one.
                (!touched && i < p.entries().len() && p.chunk_range(i).1 as u64 == end - off)
                    .then(|| p.entries()[i])
            });
            if let Some(digest) = carried {
                index.set(i, digest);
                stats.chunks_unchanged += 1;
                if digest == crate::format::ZERO_CHUNK_DIGEST {
                    stats.chunks_zero += 1;
                } else {
                    stats.chunks_reused += 1;
                }
                skipped_bytes += end - off;
            } else if !has_data {
                stats.chunks_zero += 1;
                skipped_bytes += end - off;
            } else {
                work.push(i as u32);
            }
        }
        drop(parent_index);
        if let Some(progress) = progress {
            progress(skipped_bytes);
        }
        debug!(
            disk = name,
            chunks = n,
            to_read = work.len(),
            "disk planned"
        );

        let reuse_after = self.lock.start() - self.repo.gc_grace() / 2;
        let shared = Shared {
            session: self,
            source: input.source,
            disk: &name,
            index_len: n as u64,
            chunk_size,
            disk_size,
            extents: &extents,
            work: &work,
            next: AtomicUsize::new(0),
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            index: Mutex::new(index),
            touched: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
            new: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            progress,
            reuse_after,
        };
        let workers = self.workers.min(work.len()).max(1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    if let Err(e) = shared.worker() {
                        shared.abort.store(true, Ordering::Relaxed);
                        shared.error.lock().expect("poisoned").get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = shared.error.lock().expect("poisoned").take() {
            return Err(e);
        }
        debug_assert_eq!(shared.index_len, n as u64);
        stats.bytes_read = shared.bytes_read.load(Ordering::Relaxed);
        stats.chunks_new = shared.new.load(Ordering::Relaxed);
        stats.chunks_reused += shared.reused.load(Ordering::Relaxed);
        stats.chunks_zero += shared.zero.load(Ordering::Relaxed);
        stats.bytes_stored = shared.stored.load(Ordering::Relaxed);
        let touched = std::mem::take(&mut *shared.touched.lock().expect("poisoned"));
        let rewritten = self.recheck_after_gc(&shared, &touched)?;
        stats.chunks_new += rewritten.0;
        stats.bytes_stored += rewritten.1;
        let index = shared.index.into_inner().expect("poisoned");

        let key = index_key(&self.id, self.disks.len());
        let index_sizes = self
            .repo
            .store_index(&key, &index)
            .map_err(|e| e.with_disk(&name))?;
        info!(disk = name, ?stats, "disk written");
        self.disks.push(DiskEntry {
            name,
            size: disk_size,
            chunk_size,
            index: key,
            index_sizes,
            stats: stats.clone(),
        });
        Ok(stats)
    }

    /// If a gc ran during this session, makes sure every chunk this disk stored or reused is
    /// still there (gc may have listed an old copy of a key before we wrote it again), and
    /// writes again from the source those it deleted. Returns (chunks, bytes) rewritten.
    fn recheck_after_gc(&self, shared: &Shared<'_>, touched: &[u32]) -> Result<(u64, u64)> {
        if touched.is_empty() {
            return Ok((0, 0));
        }
        let backend = self.repo.backend.as_ref();
        // Wait for the deleters running now to finish, so that all their deletions are visible.
        // A gc that starts later sees our lock and spares everything we wrote or reused.
        // (A deleter that dies turns stale and stops being waited for.)
        let running_deleters = || -> Result<Vec<String>> {
            Ok(live_locks(backend, SystemTime::now())?
                .into_iter()
                .filter(|l| l.record.kind == LockKind::Exclusive)
                .map(|l| l.meta.key)
                .collect())
        };
        let mut waiting_for = running_deleters()?;
        while !waiting_for.is_empty() {
            debug!(locks = ?waiting_for, "waiting for a running gc/prune before checking chunks");
            std::thread::sleep(Duration::from_millis(100));
            let still = running_deleters()?;
            waiting_for.retain(|key| still.contains(key));
        }
        let gc_ran = backend
            .list(GC)?
            .iter()
            .any(|m| m.modified >= self.lock.start());
        if !gc_ran {
            return Ok((0, 0));
        }
        let mut encoder = BlobEncoder::new(self.repo.config.zstd_level)?;
        let (mut buf, mut blob) = (Vec::new(), Vec::new());
        let (mut chunks, mut bytes) = (0, 0);
        let index = shared.index.lock().expect("poisoned").clone();
        for &i in touched {
            let i = i as usize;
            let digest = &index.entries()[i];
            let key = chunk_key(digest);
            if backend.stat(&key)?.is_some() {
                continue;
            }
            warn!(
                chunk = key,
                "a concurrent gc removed a reused chunk: writing it again"
            );
            shared.read_chunk(i, &mut buf)?;
            if self.repo.keys.chunk_id(&buf) != *digest {
                return Err(Error::new(
                    ErrorKind::Source,
                    "the source changed while it was being backed up",
                )
                .with_disk(shared.disk)
                .with_offset(shared.chunk_range(i).0));
            }
            encoder.encode(
                &self.repo.keys,
                CHUNK_BLOB_MAGIC,
                digest,
                &buf,
                true,
                &mut blob,
            )?;
            backend.put(&key, &blob)?;
            chunks += 1;
            bytes += blob.len() as u64;
        }
        Ok((chunks, bytes))
    }

    /// Publishes the manifest (atomically, last): from now on the snapshot exists.
    pub fn publish(self, info: SnapshotInfo) -> Result<Manifest> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: self.id.clone(),
            vm: self.vm.clone(),
            platform: info.platform,
            time: info.time.unwrap_or(self.began),
            hostname: crate::lock::hostname(),
            parent: self.parent.as_ref().map(|p| p.id.clone()),
            disks: self.disks.clone(),
            requested: info.requested,
            achieved: info.achieved,
            indications: info.indications,
            report: info.report,
        };
        self.repo
            .store_manifest(&manifest)
            .map_err(|e| e.with_snapshot(&self.id).with_vm(&self.vm))?;
        info!(id = manifest.id, vm = manifest.vm, "snapshot published");
        drop(self.lock);
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_all_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }
}
