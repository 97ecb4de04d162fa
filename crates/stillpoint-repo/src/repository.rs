//! Opening and creating repositories, and reading what they hold (snapshots, indexes, chunks).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use secrecy::SecretString;

use crate::backend::{Backend, LocalBackend};
use crate::blob::{self, BlobEncoder};
use crate::config::{Config, Encryption};
use crate::error::{Error, ErrorKind, Result};
use crate::format::keys::{CHUNKS, CONFIG, INDEXES, KEYS, SNAPSHOTS};
use crate::format::{
    BLOB_HEADER_LEN, CHUNK_BLOB_MAGIC, CONFIG_FORMAT_NAME, DEFAULT_CHUNK_SIZE, ENCRYPTION_NONE,
    INDEX_BLOB_MAGIC, INDEX_SEGMENT_ENTRIES, MANIFEST_BLOB_MAGIC, MAX_JSON_OBJECT_LEN,
    REPO_FORMAT_VERSION,
};
use crate::index::{Digest, DiskIndex, segment_key};
use crate::keys::{KdfParams, KeyFile, Keys, random_bytes};
use crate::lock::{LockGuard, LockKind};
use crate::manifest::{Manifest, is_id_prefix};

/// Options of [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Fixed chunk size (power of two, 64 KiB – 64 MiB).
    pub chunk_size: u32,
    /// `Some(passphrase)` for an encrypted repository, `None` for an unencrypted one.
    pub passphrase: Option<SecretString>,
    /// Argon2id costs.
    pub kdf: KdfParams,
    /// zstd level.
    pub zstd_level: i32,
    /// gc grace period.
    pub gc_grace: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            passphrase: None,
            kdf: KdfParams::default(),
            zstd_level: 1,
            gc_grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// What [`Repository::list_snapshots`] found.
#[derive(Debug, Clone, Default)]
pub struct SnapshotListing {
    /// The snapshots that could be read.
    pub snapshots: Vec<Manifest>,
    /// The snapshots whose manifest cannot be read (of any VM: their VM is unknown).
    pub unreadable: Vec<UnreadableSnapshot>,
}

/// A snapshot whose manifest cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnreadableSnapshot {
    /// The snapshot id (from the object's key).
    pub id: String,
    /// The manifest object's key.
    pub object: String,
    /// What is wrong with it.
    pub message: String,
}

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: Config,
    pub(crate) keys: Arc<Keys>,
}

/// How long operations wait for a conflicting lock before giving up.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(30);

pub(crate) fn chunk_key(digest: &Digest) -> String {
    let hex = hex::encode(digest);
    format!("{CHUNKS}{}/{hex}", &hex[..2])
}

pub(crate) fn snapshot_key(id: &str) -> String {
    format!("{SNAPSHOTS}{id}")
}

pub(crate) fn index_key(snapshot: &str, position: usize) -> String {
    format!("{INDEXES}{snapshot}/{position}")
}

impl Repository {
    /// Creates a repository in `backend`; fails if one is there already.
    pub fn init(backend: Arc<dyn Backend>, options: &InitOptions) -> Result<Self> {
        Config::check_chunk_size(options.chunk_size)?;
        Config::check_zstd_level(options.zstd_level)?;
        Config::check_gc_grace(options.gc_grace.as_secs())?;
        let location = backend.location();
        if backend.stat(CONFIG)?.is_some() {
            return Err(
                Error::new(ErrorKind::AlreadyExists, "a repository already exists here")
                    .with_path(&location),
            );
        }
        let (keys, key_file, id_key) = match &options.passphrase {
            Some(passphrase) => {
                let (keys, master) = Keys::generate_encrypted();
                (
                    keys,
                    Some(Keys::wrap(&master, passphrase, options.kdf)?),
                    None,
                )
            }
            None => {
                let id_key: [u8; 32] = random_bytes();
                (Keys::unencrypted(id_key), None, Some(hex::encode(id_key)))
            }
        };
        let id: [u8; 8] = random_bytes();
        let config = Config {
            format: CONFIG_FORMAT_NAME.into(),
            version: REPO_FORMAT_VERSION,
            id: hex::encode(id),
            chunk_size: options.chunk_size,
            encryption: if key_file.is_some() {
                Encryption::Aes256Gcm
            } else {
                Encryption::None
            },
            zstd_level: options.zstd_level,
            gc_grace_seconds: options.gc_grace.as_secs(),
            id_key,
            created: Utc::now(),
        };
        // The key goes first: a config without its key would be a repository nobody can open.
        if let Some(key_file) = key_file {
            let name: [u8; 8] = random_bytes();
            backend.put(
                &format!("{KEYS}{}", hex::encode(name)),
                &serde_json::to_vec_pretty(&key_file).expect("key file"),
            )?;
        }
        let created =
            backend.put_new(CONFIG, &serde_json::to_vec_pretty(&config).expect("config"))?;
        if !created {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a repository was created here at the same time",
            )
            .with_path(&location));
        }
        Ok(Self {
            backend,
            config,
            keys: Arc::new(keys),
        })
    }

    /// Creates a repository in a local directory: a new path, or an empty directory. A
    /// directory holding anything else is refused (naming it), so that a repository is never
    /// mixed into unrelated files.
    pub fn init_local(path: impl Into<std::path::PathBuf>, options: &InitOptions) -> Result<Self> {
        let path = path.into();
        match std::fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() && !path.join(CONFIG).exists() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "the directory is not empty and holds no stillpoint repository: give a new path or an empty directory",
                    )
                    .with_path(&path));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    Error::io("cannot use this path for a new repository", e).with_path(&path)
                );
            }
        }
        Self::init(Arc::new(LocalBackend::new(path)), options)
    }

    /// Opens the repository in `backend`. `passphrase` is needed iff it is encrypted.
    pub fn open(backend: Arc<dyn Backend>, passphrase: Option<&SecretString>) -> Result<Self> {
        let location = backend.location();
        let config_path = format!("{location}/{CONFIG}");
        if let Some(meta) = backend.stat(CONFIG)?
            && meta.size > MAX_JSON_OBJECT_LEN
        {
            return Err(Error::corrupt(format!(
                "repository config is {} bytes, more than the {MAX_JSON_OBJECT_LEN} a config may have",
                meta.size
            ))
            .with_path(&config_path));
        }
        let bytes = match backend.get(CONFIG) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::Missing => {
                return Err(Error::new(
                    ErrorKind::NoRepository,
                    "there is no repository here (no config object); create one with `stillpoint repo init`",
                )
                .with_path(&location));
            }
            Err(e) => return Err(e),
        };
        let config = Config::from_json(&bytes, &location)?;
        // The encryption mode is bound to the key material: key files exist exactly when the
        // repository is encrypted. `config` is plain JSON that whoever can write to the
        // storage can edit; a config saying "none" beside key files (or encrypted snapshots)
        // is a downgrade attempt or damage, never a reason to write in clear.
        let key_objects = backend.list(KEYS)?;
        let keys = match config.encryption {
            Encryption::None => {
                Self::check_really_unencrypted(backend.as_ref(), &key_objects, &config_path)?;
                let id_key: [u8; 32] = config
                    .id_key
                    .as_deref()
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|k| k.try_into().ok())
                    .ok_or_else(|| {
                        Error::corrupt("unencrypted repository config lacks a valid id_key")
                            .with_path(&config_path)
                    })?;
                Keys::unencrypted(id_key)
            }
            Encryption::Aes256Gcm => {
                let passphrase = passphrase.ok_or_else(|| {
                    Error::new(
                        ErrorKind::PassphraseRequired,
                        "the repository is encrypted and no passphrase was given",
                    )
                    .with_path(&location)
                })?;
                Self::unlock(backend.as_ref(), key_objects, passphrase, &location)?
            }
        };
        Ok(Self {
            backend,
            config,
            keys: Arc::new(keys),
        })
    }

    /// Opens a repository in a local directory.
    pub fn open_local(
        path: impl Into<std::path::PathBuf>,
        passphrase: Option<&SecretString>,
    ) -> Result<Self> {
        let path = path.into();
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NoRepository,
                "there is no repository here (the directory does not exist); create one with `stillpoint repo init`",
            )
            .with_path(&path));
        }
        Self::open(Arc::new(LocalBackend::new(path)), passphrase)
    }

    /// Refuses a config that says "none" in a repository holding key files or encrypted
    /// snapshots (the first manifest's header tells, one ranged read).
    fn check_really_unencrypted(
        backend: &dyn Backend,
        key_objects: &[crate::backend::ObjectMeta],
        config_path: &str,
    ) -> Result<()> {
        let refuse = |evidence: String| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "repository config says \"encryption\": \"none\" but {evidence}: the config does not match the key material (edited or damaged); refusing to read or write in clear"
                ),
            )
            .with_path(config_path)
        };
        if let Some(key) = key_objects.first() {
            return Err(refuse(format!(
                "the repository has key files ({})",
                key.key
            )));
        }
        if let Some(first) = backend.list(SNAPSHOTS)?.first() {
            let header = backend.get_range(&first.key, 0, BLOB_HEADER_LEN as u64)?;
            if header.len() == BLOB_HEADER_LEN && header[9] != ENCRYPTION_NONE {
                return Err(refuse(format!("snapshot {} is encrypted", first.key)));
            }
        }
        Ok(())
    }

    fn unlock(
        backend: &dyn Backend,
        key_objects: Vec<crate::backend::ObjectMeta>,
        passphrase: &SecretString,
        location: &str,
    ) -> Result<Keys> {
        if key_objects.is_empty() {
            return Err(Error::corrupt(
                "the repository config says it is encrypted but there are no key files (keys/)",
            )
            .with_path(location));
        }
        for meta in key_objects {
            if meta.size > MAX_JSON_OBJECT_LEN {
                return Err(Error::corrupt(format!(
                    "key file is {} bytes, more than the {MAX_JSON_OBJECT_LEN} a key file may have",
                    meta.size
                ))
                .with_path(&meta.key));
            }
            let bytes = backend.get(&meta.key)?;
            let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| {
                Error::corrupt("key file is not valid JSON")
                    .with_path(&meta.key)
                    .with_source(e)
            })?;
            if let Some(keys) = Keys::unwrap(&file, passphrase, &meta.key)? {
                return Ok(keys);
            }
        }
        Err(Error::new(
            ErrorKind::WrongPassphrase,
            "wrong passphrase: it opens none of the repository's keys",
        )
        .with_path(location))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The gc grace period of this repository.
    pub fn gc_grace(&self) -> Duration {
        Duration::from_secs(self.config.gc_grace_seconds)
    }

    /// Takes a lock of `kind` (waits up to [`DEFAULT_LOCK_WAIT`]).
    pub fn lock(&self, kind: LockKind, purpose: &str) -> Result<LockGuard> {
        LockGuard::acquire(
            self.backend.clone(),
            kind,
            purpose,
            Vec::new(),
            DEFAULT_LOCK_WAIT,
        )
    }

    // ---- reading -------------------------------------------------------------------------

    /// Loads one manifest by full id.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let key = snapshot_key(id);
        let raw = self.backend.get(&key).map_err(|e| {
            if e.kind() == ErrorKind::Missing {
                Error::new(ErrorKind::SnapshotNotFound, "no such snapshot").with_snapshot(id)
            } else {
                e.with_snapshot(id)
            }
        })?;
        let mut plain = Vec::new();
        blob::decode(
            &self.keys,
            MANIFEST_BLOB_MAGIC,
            key.as_bytes(),
            raw,
            &mut plain,
        )
        .map_err(|e| e.prefixed("manifest: ").with_snapshot(id).with_path(&key))?;
        let manifest = Manifest::from_json(&plain, &key).map_err(|e| e.with_snapshot(id))?;
        if manifest.id != id {
            return Err(Error::corrupt(format!(
                "manifest stored as {id} says it is snapshot {}",
                manifest.id
            ))
            .with_snapshot(id)
            .with_path(&key));
        }
        Ok(manifest)
    }

    /// Ids of all published snapshots, sorted (ids sort by time).
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .backend
            .list(SNAPSHOTS)?
            .into_iter()
            .filter_map(|m| m.key.strip_prefix(SNAPSHOTS).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// All snapshots (of `vm` if given), oldest first by capture time. A manifest that cannot
    /// be read is skipped with a warning naming it (so one damaged snapshot does not hide the
    /// others); [`Self::list_snapshots`] returns them to the caller instead, `verify` reports
    /// them, gc refuses to run past them, prune keeps them.
    pub fn snapshots(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        let listing = self.list_snapshots(vm)?;
        for bad in &listing.unreadable {
            tracing::warn!(
                snapshot = bad.id,
                object = bad.object,
                error = bad.message,
                "skipping a snapshot whose manifest cannot be read (run `repo verify`)"
            );
        }
        Ok(listing.snapshots)
    }

    /// The snapshots (of `vm` if given) that can be read, oldest first by capture time, and
    /// the ones whose manifest cannot be read (damaged, or of an unsupported version).
    pub fn list_snapshots(&self, vm: Option<&str>) -> Result<SnapshotListing> {
        let mut listing = SnapshotListing::default();
        for id in self.snapshot_ids()? {
            let manifest = match self.load_manifest(&id) {
                Ok(m) => m,
                // Pruned between list and read.
                Err(e) if e.kind() == ErrorKind::SnapshotNotFound => continue,
                Err(e)
                    if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::UnsupportedVersion) =>
                {
                    listing.unreadable.push(UnreadableSnapshot {
                        object: snapshot_key(&id),
                        id,
                        message: e.message().to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            if vm.is_none_or(|vm| manifest.vm == vm) {
                listing.snapshots.push(manifest);
            }
        }
        listing
            .snapshots
            .sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok(listing)
    }

    /// The newest snapshot of `vm`, if any.
    pub fn latest_snapshot(&self, vm: &str) -> Result<Option<Manifest>> {
        Ok(self.snapshots(Some(vm))?.pop())
    }

    /// Resolves `spec`: a full id, a unique id prefix, or `VM:latest`.
    pub fn find_snapshot(&self, spec: &str) -> Result<Manifest> {
        if let Some(vm) = spec.strip_suffix(":latest") {
            return self.latest_snapshot(vm)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::SnapshotNotFound,
                    format!("VM `{vm}` has no snapshots"),
                )
                .with_vm(vm)
            });
        }
        if !is_id_prefix(spec) {
            return Err(Error::new(
                ErrorKind::SnapshotNotFound,
                format!("`{spec}` is neither a snapshot id (hex) nor VM:latest"),
            ));
        }
        let spec_lower = spec.to_ascii_lowercase();
        let matches: Vec<String> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.starts_with(&spec_lower))
            .collect();
        match matches.as_slice() {
            [one] => self.load_manifest(one),
            [] => Err(
                Error::new(ErrorKind::SnapshotNotFound, "no snapshot has this id")
                    .with_snapshot(spec),
            ),
            many => Err(Error::new(
                ErrorKind::AmbiguousSnapshot,
                format!(
                    "id prefix matches {} snapshots ({}); give more digits",
                    many.len(),
                    many.join(", ")
                ),
            )
            .with_snapshot(spec)),
        }
    }

    /// Loads the index of disk `disk` of `manifest`.
    pub fn load_index(&self, manifest: &Manifest, disk: &str) -> Result<DiskIndex> {
        let entry = manifest.disk(disk)?;
        self.load_index_key(&entry.index, &entry.index_sizes)
            .and_then(|index| {
                if index.disk_size() != entry.size || index.chunk_size() != entry.chunk_size {
                    Err(Error::corrupt(format!(
                        "index describes {} bytes in chunks of {}, the manifest says {} in chunks of {}",
                        index.disk_size(),
                        index.chunk_size(),
                        entry.size,
                        entry.chunk_size
                    ))
                    .with_path(&entry.index))
                } else {
                    Ok(index)
                }
            })
            .map_err(|e| e.with_snapshot(&manifest.id).with_disk(disk))
    }

    /// Reads one index blob (segment `k` of the index at `key`), checking its size against
    /// the one the manifest recorded (`sizes`, empty for snapshots of older builds) so that a
    /// truncated object is reported as truncated.
    fn load_index_blob(&self, key: &str, k: usize, sizes: &[u64]) -> Result<Vec<u8>> {
        let object = segment_key(key, k);
        let raw = self.backend.get(&object)?;
        if let Some(&recorded) = sizes.get(k)
            && raw.len() as u64 != recorded
        {
            let what = if (raw.len() as u64) < recorded {
                "truncated"
            } else {
                "longer than written"
            };
            return Err(Error::corrupt(format!(
                "index: object is {what}: {} bytes, the manifest recorded {recorded}",
                raw.len()
            ))
            .with_path(&object));
        }
        let mut plain = Vec::new();
        blob::decode(
            &self.keys,
            INDEX_BLOB_MAGIC,
            object.as_bytes(),
            raw,
            &mut plain,
        )
        .map_err(|e| e.prefixed("index: ").with_path(&object))?;
        Ok(plain)
    }

    /// Loads the index stored at `key` with all its segments.
    pub(crate) fn load_index_key(&self, key: &str, sizes: &[u64]) -> Result<DiskIndex> {
        let first = self.load_index_blob(key, 0, sizes)?;
        let mut head = DiskIndex::parse_head(&first).map_err(|e| e.with_path(key))?;
        drop(first);
        for k in 1..head.segments() {
            let bytes = self.load_index_blob(key, k, sizes)?;
            head.push_segment(k, &bytes)
                .map_err(|e| e.with_path(segment_key(key, k)))?;
        }
        head.finish().map_err(|e| e.with_path(key))
    }

    /// Stores `index` at `key` (segments `k ≥ 1` first, so that the first blob exists only
    /// once the rest does) and returns the stored size of each blob, for the manifest.
    pub(crate) fn store_index(&self, key: &str, index: &DiskIndex) -> Result<Vec<u64>> {
        let mut encoder = BlobEncoder::new(self.config.zstd_level)?;
        let mut out = Vec::new();
        let segments = index.segment_count(INDEX_SEGMENT_ENTRIES);
        let mut sizes = vec![0u64; segments];
        for k in (1..segments).chain([0]) {
            let object = segment_key(key, k);
            encoder.encode(
                &self.keys,
                INDEX_BLOB_MAGIC,
                object.as_bytes(),
                &index.segment_bytes(k, INDEX_SEGMENT_ENTRIES),
                true,
                &mut out,
            )?;
            self.backend.put(&object, &out)?;
            sizes[k] = out.len() as u64;
        }
        Ok(sizes)
    }

    pub(crate) fn store_manifest(&self, manifest: &Manifest) -> Result<()> {
        let key = snapshot_key(&manifest.id);
        let mut encoder = BlobEncoder::new(self.config.zstd_level)?;
        let mut out = Vec::new();
        encoder.encode(
            &self.keys,
            MANIFEST_BLOB_MAGIC,
            key.as_bytes(),
            &manifest.to_json(),
            true,
            &mut out,
        )?;
        self.backend.put(&key, &out)
    }

    /// Reads, authenticates and decompresses a chunk into `out`, and checks its digest.
    pub fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()> {
        let key = chunk_key(digest);
        let raw = self.backend.get(&key)?;
        blob::decode(&self.keys, CHUNK_BLOB_MAGIC, digest, raw, out)
            .map_err(|e| e.prefixed("chunk: ").with_path(&key))?;
        if self.keys.chunk_id(out) != *digest {
            return Err(Error::corrupt("chunk: content does not match its digest").with_path(&key));
        }
        Ok(())
    }
}
