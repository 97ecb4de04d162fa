//! Snapshot manifests: what one snapshot is (VM, time, disks, consistency, report), stored as
//! a JSON document inside a blob under `snapshots/<id>`. The manifest is written last, in one
//! atomic put: a snapshot exists exactly when its manifest does.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Manifest schema version.
pub const MANIFEST_VERSION: u32 = 1;

/// Statistics of one disk's backup, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks stored by this backup.
    pub chunks_new: u64,
    /// Chunks that already existed (or were carried over from the parent unread).
    pub chunks_reused: u64,
    /// Of the reused chunks, those carried over from the parent index without reading.
    pub chunks_unchanged: u64,
    /// All-zero chunks (recorded, not stored).
    pub chunks_zero: u64,
    /// Bytes written to the repository for new chunks (after compression and encryption).
    pub bytes_stored: u64,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// The disk's name (e.g. `vda`, or the image file name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size of its index.
    pub chunk_size: u32,
    /// The index object's key (its first segment's, when segmented).
    pub index: String,
    /// Stored size in bytes of each index blob (segment 0 first), so that a truncated index
    /// is reported as such. Empty in manifests of builds before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index_sizes: Vec<u64>,
    /// What the backup of this disk did.
    pub stats: DiskStats,
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Schema version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// The snapshot id (16 hex digits).
    pub id: String,
    /// The VM (or image) name.
    pub vm: String,
    /// Platform and reference, if any (`qemu:NAME`, `image:PATH` …).
    #[serde(default)]
    pub platform: Option<String>,
    /// When the capture was taken.
    pub time: DateTime<Utc>,
    /// The host that wrote it.
    pub hostname: String,
    /// The parent snapshot an incremental was based on.
    #[serde(default)]
    pub parent: Option<String>,
    /// The disks.
    pub disks: Vec<DiskEntry>,
    /// Requested consistency level.
    #[serde(default)]
    pub requested: Option<String>,
    /// Achieved consistency level.
    #[serde(default)]
    pub achieved: Option<String>,
    /// Why the achieved level is what it is (`GuestAgent`, `QuiesceFailed`, …).
    #[serde(default)]
    pub indications: Vec<String>,
    /// Free-form report (step timings, bytes …).
    #[serde(default)]
    pub report: serde_json::Value,
}

/// What the caller tells `publish` about a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotInfo {
    /// Platform and reference.
    pub platform: Option<String>,
    /// Capture time (default: when the session began).
    pub time: Option<DateTime<Utc>>,
    /// Requested consistency level.
    pub requested: Option<String>,
    /// Achieved consistency level.
    pub achieved: Option<String>,
    /// Indications.
    pub indications: Vec<String>,
    /// Free-form report.
    pub report: serde_json::Value,
}

impl Manifest {
    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Result<&DiskEntry> {
        self.disks.iter().find(|d| d.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
            Error::new(
                ErrorKind::DiskNotFound,
                format!("no disk named `{name}` (it has: {})", names.join(", ")),
            )
            .with_snapshot(&self.id)
        })
    }

    /// Total size of all disks.
    pub fn total_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    pub(crate) fn from_json(bytes: &[u8], key: &str) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt("manifest is not valid JSON of the expected shape")
                .with_path(key)
                .with_source(e)
        })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "manifest has schema version {}, this build reads {MANIFEST_VERSION}",
                    manifest.version
                ),
            )
            .with_path(key));
        }
        Ok(manifest)
    }
}

/// A new snapshot id: 4 bytes of Unix time (big-endian, so ids sort by time) and 4 random bytes.
pub(crate) fn new_snapshot_id(now: DateTime<Utc>) -> String {
    let secs = now.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
    let random: [u8; 4] = crate::keys::random_bytes();
    format!("{}{}", hex::encode(secs.to_be_bytes()), hex::encode(random))
}

/// Whether `s` looks like a (possibly abbreviated) snapshot id.
pub(crate) fn is_id_prefix(s: &str) -> bool {
    !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_unique() {
        let t1 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let t2 = DateTime::from_timestamp(1_700_000_001, 0).unwrap();
        let a = new_snapshot_id(t1);
        let b = new_snapshot_id(t2);
        assert_eq!(a.len(), 16);
        assert!(a < b);
        assert_ne!(new_snapshot_id(t1), new_snapshot_id(t1));
        assert!(is_id_prefix(&a[..6]));
        assert!(!is_id_prefix("vm:latest"));
    }

    #[test]
    fn wrong_schema_version_is_named() {
        let json = br#"{"version":7,"id":"00","vm":"a","time":"2026-01-01T00:00:00Z","hostname":"h","disks":[]}"#;
        let err = Manifest::from_json(json, "snapshots/00").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnsupportedVersion);
        assert!(err.to_string().contains("version 7"));
    }
}
