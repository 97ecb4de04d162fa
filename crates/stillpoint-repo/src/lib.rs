//! stillpoint's backup repository: content-addressed, deduplicated, compressed and encrypted
//! storage of disk images, with per-disk indexes and per-snapshot manifests.
//!
//! # What it is for
//! The engine writes the disks of a point-in-time capture into a [`BackupSession`] and
//! publishes a manifest; restore, verify, prune and gc work on what was published. The byte
//! format is specified in `docs/repository-format.md`; every magic number is in [`format`].
//!
//! ```
//! use stillpoint_repo::*;
//! # fn main() -> Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("disk.img"), vec![7u8; 100_000]).unwrap();
//! let options = InitOptions { passphrase: Some(SecretString::from("secret")), kdf: KdfParams::for_tests(), ..Default::default() };
//! let repo = Repository::init_local(dir.path().join("repo"), &options)?;
//!
//! // The engine's side: one session per VM, N disks, then publish (atomic, last).
//! let source = FileSource::open(dir.path().join("disk.img"))?;
//! let mut session = repo.begin_backup(BackupOptions { vm: "web".into(), ..Default::default() })?;
//! let stats = session.write_disk(DiskInput { name: "vda".into(), source: &source, changed: None }, None)?;
//! assert_eq!(stats.bytes_read, 100_000);
//! let snapshot = session.publish(SnapshotInfo { achieved: Some("crash".into()), ..Default::default() })?;
//!
//! // Read side: find, restore, verify.
//! let latest = repo.find_snapshot("web:latest")?;
//! assert_eq!(latest.id, snapshot.id);
//! let out = dir.path().join("vda.raw");
//! repo.restore_disk(&latest, "vda", &out, ImageFormat::Raw, RestoreOptions::default(), None)?;
//! assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 100_000]);
//! assert!(repo.verify(false, None)?.is_ok());
//! # Ok(()) }
//! ```
//!
//! # Design
//! - **Fixed-size chunks aligned to disk offsets** (default 4 MiB, chosen at init): a dirty
//!   bitmap maps straight onto chunks, so an incremental reads only changed chunks and the rest
//!   keep their parent's digests without being read ([`DiskInput::changed`]).
//! - **Chunk ids** are keyed BLAKE3 of the plaintext; all-zero chunks are recorded with the
//!   zero digest and never stored; zero detection runs before any other stage.
//! - **Blobs**: zstd level 1 when it saves at least 1/32, otherwise raw; then AES-256-GCM
//!   (`ring`) with a random nonce and the header plus the object's identity as associated
//!   data. The master key is random and wrapped by an Argon2id key from a passphrase, or the
//!   repository is explicitly unencrypted (a BLAKE3 checksum still guards every blob).
//! - **The encryption mode comes from the key material**: `config` is unauthenticated JSON,
//!   so a repository is encrypted exactly when it has key files; a config saying otherwise is
//!   refused (no downgrade to clear writes by editing it).
//! - **Secrets** (passphrases as [`SecretString`], master and derived keys as `zeroize`
//!   buffers) are wiped on drop and never printable; the AES key schedule stays inside `ring`.
//! - **Bounds**: everything read is bounded before it is allocated or run — Argon2id costs
//!   and key/config sizes, zstd level, index header arithmetic, blob lengths — and an index
//!   of more than 2^20 chunks is split into 32 MiB segments, so valid disks of any size up to
//!   2^32 − 1 chunks back up.
//! - **Compatibility**: `tests/fixtures/v1` holds repositories written by the first format-1
//!   code; every build reads them back byte-exact.
//! - **Pipeline**: per disk, `workers` threads each take the next chunk to read and carry it
//!   through read → zero check → hash → dedup → compress → encrypt → put. Buffers take
//!   `workers × 3 × chunk size` (≈ 50 MiB at 4 workers and 4 MiB chunks) at any disk size;
//!   the index in memory adds 36 bytes per chunk (36 MiB for 4 TiB).
//! - **Backends** implement the object-store-shaped [`Backend`] trait; [`LocalBackend`] writes
//!   temp file + fsync + rename + directory fsync.
//!
//! # Invariants
//! 1. A snapshot exists iff its manifest exists; the manifest is written last, in one put.
//!    A killed backup leaves chunks (reusable) and maybe indexes (removed by gc), no snapshot.
//! 2. Everything read back is authenticated (AES-GCM tag or checksum) and chunks are also
//!    checked against their digest; failures name snapshot, disk, offset and object.
//! 3. gc never deletes a chunk that a published snapshot or a running backup references.
//!
//! # Locking
//! Locks are objects under `locks/` (see [`lock`]), so they work on object stores too.
//!
//! | operation            | lock      | beside backup | beside restore/verify | beside prune/gc |
//! |----------------------|-----------|---------------|-----------------------|-----------------|
//! | backup (session)     | Backup    | yes           | yes                   | yes             |
//! | restore, verify      | Read      | yes           | yes                   | no (waits)      |
//! | prune, gc            | Exclusive | yes           | no (waits)            | no (waits)      |
//! | snapshots, stats     | none      | yes           | yes                   | yes (tolerates vanishing snapshots) |
//! | init                 | none      | creates `config` only if absent (put-if-absent) |
//!
//! # Why gc is safe beside running backups
//! Let `S` be a backup's start (backend time of its lock), `G` gc's start, `g` the grace
//! period from `config`. A backup reuses an existing chunk only if its time is `≥ S − g/2`,
//! and writes it again otherwise. gc deletes only unreferenced objects older than
//! `min(G, oldest live backup start) − g`.
//! - If gc saw the backup's lock, its cutoff is `≤ S − g`: it spares everything the backup
//!   wrote (time `≥ S`) or reused (time `≥ S − g/2`).
//! - If gc did not see the lock, the lock was written after gc listed locks, so `S > G` and
//!   gc's cutoff `G − g < S − g/2`: it spares them too.
//! - Chunks carried over from a parent are marked through the parent's indexes: the lock names
//!   the parent, prune keeps a snapshot named by a live lock, and indexes are removed only by
//!   gc, so the parent's index is still there to mark (the backup re-reads the parent manifest
//!   after writing its lock, closing the race with a prune that listed locks just before).
//! - Remaining race: gc listed an old chunk before another writer rewrote it. So after each
//!   disk a backup waits for running gc/prune to finish and, if a gc record newer than `S`
//!   exists, checks every chunk it stored or reused and writes missing ones again from the
//!   source.
//!   All times compared are backend times.

pub mod backend;
mod blob;
mod config;
mod error;
pub mod format;
mod index;
mod keys;
pub mod lock;
mod maintenance;
mod manifest;
mod repository;
mod restore;
mod retention;
mod source;
mod verify;
mod writer;

pub use crate::backend::{Backend, LocalBackend, ObjectMeta};
pub use crate::config::{Config, Encryption};
pub use crate::error::{Error, ErrorContext, ErrorKind, Result};
pub use crate::index::{Digest, DiskIndex, chunk_count};
pub use crate::keys::KdfParams;
pub use crate::lock::{LockGuard, LockKind};
pub use crate::maintenance::{GcReport, PruneReport, RepoStats};
pub use crate::manifest::{DiskEntry, DiskStats, MANIFEST_VERSION, Manifest, SnapshotInfo};
pub use crate::repository::{
    DEFAULT_LOCK_WAIT, InitOptions, Repository, SnapshotListing, UnreadableSnapshot,
};
pub use crate::restore::{ImageFormat, RestoreOptions, RestoreStats};
pub use crate::retention::{Decision, KeepRules, RetentionPlan, SnapshotSummary, plan_retention};
pub use crate::source::{AsyncDiskSource, BlockingBridge, DiskSource, Extent, FileSource};
pub use crate::verify::{Problem, VerifyReport};
pub use crate::writer::{BackupOptions, BackupSession, DiskInput, Progress};
/// The passphrase type of [`Repository::init`] and [`Repository::open`] (wiped on drop,
/// printed as `[REDACTED]`).
pub use secrecy::{ExposeSecret, SecretString};
