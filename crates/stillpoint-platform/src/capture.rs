//! The capture capability: an atomic point-in-time view of all of a VM's disks, taken in one
//! step while the VM keeps running, read afterwards, released at the end.
//!
//! # Lifecycle
//! ```text
//! Capture::inspect()             disks, their stillpoint bitmaps and health, leftovers
//! Capture::prepare(request)      recovers leftovers of an interrupted capture, decides per disk
//!    │                            full or incremental, sets up everything the guest cannot see
//!    ▼                            (scratch targets, filter nodes) — before any freeze
//! PreparedCapture::start()       THE point in time, for all disks at once; the only step that
//!    │                            runs while the guest is frozen; a few ms, flat in disk size
//!    ▼                            and count
//! StartedCapture::export()       after the thaw: per disk a readable view (size, allocation,
//!    │                            changes since the parent bitmap, positioned reads)
//!    ▼
//! StartedCapture::finish(ok)     releases everything and settles the dirty bitmaps
//! ```
//! The states are separate types and `start`/`finish` consume them, so steps cannot run out of
//! order. Dropping a prepared or started capture without `abort`/`finish` releases it as a
//! failure in the background (best effort, needs a tokio runtime); whatever that misses, the
//! next `prepare` recovers.
//!
//! # Dirty bitmaps: no change is ever lost
//! Each capture creates a new bitmap named [`BITMAP_PREFIX`]`<capture id>` at its point in
//! time — persistent where the image can store bitmaps ([`DiskInfo::persistent_bitmaps`]:
//! qcow2 version 3), in the hypervisor's memory only otherwise (raw, qcow2 version 2); an
//! incremental capture also stops its parent bitmap at that same instant and offers the
//! parent's content as the disk's changes. At the end:
//! - success: the parent is removed; the new bitmap (returned by `finish`, recorded in the
//!   snapshot's manifest) holds every change since this capture's instant;
//! - failure: the new bitmap is merged into the parent, the parent records again, the new
//!   bitmap is removed — all in one atomic step. The parent then holds every change since the
//!   *parent's* instant, so the name the last published manifest recorded stays valid and the
//!   next incremental covers both periods. (Merging in this direction rather than "old into
//!   new" is equivalent for the changes kept, and keeps the name the manifest knows.)
//!
//! A parent bitmap is used only if it exists, is consistent (QEMU did not exit uncleanly since
//! it was saved), records, is not busy and the disk kept its size; otherwise the disk is
//! captured in full and the reason ([`FullReason`]) goes into the report. Whether the parent is
//! persistent does not matter: a bitmap that exists was created at the parent's instant, in
//! this hypervisor process or (persistent) in an earlier one that closed the image cleanly,
//! and has recorded every write since. A memory-only bitmap simply does not exist after a
//! restart, so the incrementals of a raw or qcow2 v2 disk last as long as its QEMU process and
//! the next capture after a restart is full ([`FullReason::BitmapMissing`] says why).
//!
//! # Reading
//! [`CapturedDisk`] is shared (`Arc`) and its reads may run from many tasks or threads at once;
//! each read is one or more requests pipelined on the platform's transport.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Every dirty bitmap stillpoint creates is named with this prefix; bitmaps without it are
/// never touched.
pub const BITMAP_PREFIX: &str = "stillpoint-";

/// How long copy-before-write may take to save old data before it gives up on the capture
/// (never on the guest's write): the value verified in the reference runs.
pub const DEFAULT_CBW_TIMEOUT: Duration = Duration::from_secs(60);

/// A dirty bitmap on a disk, as the platform reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapHealth {
    pub name: String,
    /// Writes are being recorded.
    pub recording: bool,
    /// Left "in use" by an unclean exit of the hypervisor: it may miss writes and cannot be
    /// used, only removed.
    pub inconsistent: bool,
    /// Survives a clean restart of the hypervisor.
    pub persistent: bool,
    /// In use by an operation (an export, a job).
    pub busy: bool,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u32,
}

/// One disk of a VM, as capture sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk's stable name: the device id (`vd0`), or the node name for anonymous devices.
    /// Requests and reports use it.
    pub id: String,
    /// The block node that holds the data and the bitmaps (`disk0`).
    pub node: String,
    /// The device the guest sees the disk through (a QOM path on QEMU).
    pub device: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The image file.
    pub image: String,
    /// The image format: the driver of the disk node (`qcow2`, `raw`).
    pub format: String,
    /// The format's version where it has one, as the hypervisor reports it: qcow2's `compat`
    /// level (`0.10` is version 2, `1.1` version 3).
    pub format_version: Option<String>,
    /// Whether the image can store dirty bitmaps, so that they survive a clean restart of the
    /// hypervisor (qcow2 version 3). Capture bitmaps of other images (raw, qcow2 version 2)
    /// are kept in the hypervisor's memory: exact while its process lives, gone after.
    pub persistent_bitmaps: bool,
    /// Bitmaps named with [`BITMAP_PREFIX`]; other bitmaps are not listed.
    pub bitmaps: Vec<BitmapHealth>,
}

impl DiskInfo {
    /// The stillpoint bitmap `name`, if the disk has it.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapHealth> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    /// The image's kind as users name it: `raw`, `qcow2 v2`, `qcow2 v3`.
    pub fn image_kind(&self) -> String {
        match (self.format.as_str(), self.format_version.as_deref()) {
            ("qcow2", Some("0.10")) => "qcow2 v2".to_string(),
            ("qcow2", Some("1.1")) => "qcow2 v3".to_string(),
            ("qcow2", Some(compat)) => format!("qcow2 (compat {compat})"),
            (format, _) => format.to_string(),
        }
    }
}

/// What [`Capture::inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureInventory {
    pub vm: String,
    pub disks: Vec<DiskInfo>,
    /// Leftovers of an interrupted capture, one sentence each (empty when clean). The next
    /// `prepare` cleans them up.
    pub leftovers: Vec<String>,
}

/// The bitmap a disk's parent snapshot recorded, and the disk's size then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentBitmap {
    pub bitmap: String,
    pub disk_size: u64,
}

/// What to capture and where the scratch data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    /// Per disk id: the bitmap of the parent snapshot. A disk without an entry is captured in
    /// full.
    pub parents: BTreeMap<String, ParentBitmap>,
    /// Where copy-before-write keeps the old data the guest overwrites during the capture (one
    /// sparse file per disk), and where the export's socket lives. Its free space bounds how
    /// much the guest may overwrite before the capture (never the guest) fails.
    pub scratch_dir: PathBuf,
    /// Capture only these disk ids; `None` captures every writable disk.
    pub disks: Option<Vec<String>>,
    /// How long saving old data may take before the capture is given up.
    pub cbw_timeout: Duration,
}

impl CaptureRequest {
    /// A full capture of every disk, scratch data in `scratch_dir`.
    pub fn new(scratch_dir: impl Into<PathBuf>) -> Self {
        Self {
            parents: BTreeMap::new(),
            scratch_dir: scratch_dir.into(),
            disks: None,
            cbw_timeout: DEFAULT_CBW_TIMEOUT,
        }
    }

    /// Asks for an incremental capture of `disk` against `bitmap` (recorded with its parent
    /// snapshot, when the disk was `disk_size` bytes).
    pub fn with_parent(
        mut self,
        disk: impl Into<String>,
        bitmap: impl Into<String>,
        disk_size: u64,
    ) -> Self {
        self.parents.insert(
            disk.into(),
            ParentBitmap {
                bitmap: bitmap.into(),
                disk_size,
            },
        );
        self
    }

    /// Captures only these disks.
    pub fn only(mut self, disks: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.disks = Some(disks.into_iter().map(Into::into).collect());
        self
    }
}

/// Why a disk is captured in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum FullReason {
    /// No parent snapshot was named for the disk.
    NoParent,
    /// The parent's bitmap does not exist. `memory_only` names the image kind (`raw`,
    /// `qcow2 v2`) when the image cannot store bitmaps: the bitmap lived in the hypervisor's
    /// memory and a restart of the hypervisor dropped it (or it was removed). Otherwise it was
    /// created after the hypervisor's last start and lost in an unclean exit, removed, or
    /// never created on this VM.
    BitmapMissing {
        bitmap: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_only: Option<String>,
    },
    /// The parent's bitmap was left inconsistent by an unclean exit; it is removed.
    BitmapInconsistent { bitmap: String },
    /// The parent's bitmap does not record writes, so it misses changes.
    BitmapNotRecording { bitmap: String },
    /// The parent's bitmap is in use by another operation.
    BitmapBusy { bitmap: String },
    /// The disk's size changed since the parent snapshot.
    DiskResized { bitmap: String, was: u64, now: u64 },
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullReason::NoParent => write!(f, "no parent snapshot"),
            FullReason::BitmapMissing {
                bitmap,
                memory_only: None,
            } => write!(
                f,
                "the parent's dirty bitmap `{bitmap}` is missing (lost in an unclean QEMU exit, or removed)"
            ),
            FullReason::BitmapMissing {
                bitmap,
                memory_only: Some(kind),
            } => write!(
                f,
                "the parent's dirty bitmap `{bitmap}` is missing: the non-persistent bitmap of a \
                 {kind} image is lost when QEMU restarts (or it was removed)"
            ),
            FullReason::BitmapInconsistent { bitmap } => write!(
                f,
                "the parent's dirty bitmap `{bitmap}` is inconsistent after an unclean QEMU exit"
            ),
            FullReason::BitmapNotRecording { bitmap } => write!(
                f,
                "the parent's dirty bitmap `{bitmap}` does not record writes"
            ),
            FullReason::BitmapBusy { bitmap } => write!(
                f,
                "the parent's dirty bitmap `{bitmap}` is in use by another operation"
            ),
            FullReason::DiskResized { was, now, .. } => {
                write!(f, "the disk was resized from {was} to {now} bytes")
            }
        }
    }
}

/// Full or incremental, decided per disk at `prepare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum CaptureMode {
    Full {
        reason: FullReason,
    },
    /// The changes since `parent_bitmap`'s instant are offered by [`CapturedDisk::changes`].
    Incremental {
        parent_bitmap: String,
    },
}

impl CaptureMode {
    pub fn is_incremental(&self) -> bool {
        matches!(self, CaptureMode::Incremental { .. })
    }
}

/// One disk of a prepared capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDisk {
    pub disk: DiskInfo,
    pub mode: CaptureMode,
    /// The bitmap this capture creates at its instant; the manifest records it on success.
    pub new_bitmap: String,
    /// Unusable (inconsistent) stillpoint bitmaps that `prepare` removed from this disk.
    pub removed_bitmaps: Vec<String>,
    /// The scratch file copy-before-write saves old data to.
    pub scratch: PathBuf,
}

/// What `prepare` decided and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturePlan {
    pub vm: String,
    /// Unique per capture; the new bitmaps are named after it.
    pub capture_id: String,
    pub disks: Vec<PlannedDisk>,
    /// What was cleaned up from an interrupted earlier capture, one sentence each.
    pub recovered: Vec<String>,
}

impl CapturePlan {
    pub fn disk(&self, id: &str) -> Option<&PlannedDisk> {
        self.disks.iter().find(|d| d.disk.id == id)
    }
}

/// What `start` did, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartReport {
    /// The VM ran before the capture (so it was paused and resumed around it); a VM that was
    /// not running is left as it was.
    pub was_running: bool,
    /// The hypervisor's run state before the capture (`running`, `paused`, …).
    pub run_state: String,
    /// How long the vCPUs were paused (zero when the VM was not running).
    pub paused: Duration,
    /// The whole `start` call: what a frozen guest waits for.
    pub total: Duration,
}

/// What `finish` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FinishReport {
    /// Whether the bitmaps were settled as a success.
    pub success: bool,
    /// Per disk id: the bitmap that now records every change since the instant of the last
    /// *successful* capture of that disk — on success the new one (record it in the
    /// manifest); on failure the parent of an incremental; `None` after a failed full capture.
    pub bitmaps: BTreeMap<String, Option<String>>,
    /// Clean-up steps that failed without harm (a scratch file that could not be deleted, …);
    /// the next `prepare` retries them.
    pub warnings: Vec<String>,
}

/// A byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The capture capability of one VM.
#[async_trait]
pub trait Capture: Send + Sync {
    /// The VM's disks with their stillpoint bitmaps, and leftovers of an interrupted capture.
    async fn inspect(&self) -> Result<CaptureInventory>;
    /// Recovers leftovers, decides full or incremental per disk and sets up everything that
    /// can be set up before the freeze. Nothing changes for the guest.
    async fn prepare(&self, request: CaptureRequest) -> Result<Box<dyn PreparedCapture>>;
}

/// Releasing the capture of a backup that died: what a guardian (a process that outlives
/// the backup) calls once the backup holding a capture is gone, so that the capture's filters,
/// exports and scratch data — which grows with every guest write for as long as the capture
/// lives — do not wait for the next backup of the VM.
///
/// The release is the recovery the next `prepare` runs anyway (it finds the same leftovers and
/// settles the dirty bitmaps as a failed capture's `finish(false)` does: the new bitmap merged
/// into the parent, which records again), so whichever runs first, no change is lost and the
/// other finds nothing to do.
#[async_trait]
pub trait DeadCaptureRelease: Send + Sync {
    /// Takes apart every capture the hypervisor still carries for the VM and settles its
    /// bitmaps. Call it only once the process that held the capture is gone: it releases any
    /// capture it finds. Returns what it did, one sentence a step (empty: nothing was left).
    async fn release_dead_capture(&self) -> Result<Vec<String>>;
}

/// A capture set up and ready to start.
#[async_trait]
pub trait PreparedCapture: Send {
    fn plan(&self) -> &CapturePlan;
    /// Takes the point in time of every disk at once. Runs while the guest is frozen: it is
    /// fast and does not grow with disk size. A VM that was not running stays as it was; a
    /// running VM is running again when this returns, on every path. On error everything set
    /// up is released and no bitmap is changed for good.
    async fn start(self: Box<Self>) -> Result<Box<dyn StartedCapture>>;
    /// Releases what `prepare` set up, without capturing.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// A capture whose point in time is taken.
#[async_trait]
pub trait StartedCapture: Send {
    fn plan(&self) -> &CapturePlan;
    fn start_report(&self) -> &StartReport;
    /// Makes every disk readable (call after the thaw; calling again returns the same views).
    /// After an error, call `finish(false)`.
    async fn export(&mut self) -> Result<Vec<Arc<dyn CapturedDisk>>>;
    /// Releases everything and settles the bitmaps (see the module doc). Views handed out by
    /// `export` stop working.
    async fn finish(self: Box<Self>, success: bool) -> Result<FinishReport>;
}

/// A readable point-in-time view of one disk.
#[async_trait]
pub trait CapturedDisk: Send + Sync {
    /// The disk id ([`DiskInfo::id`]).
    fn id(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    fn mode(&self) -> &CaptureMode;
    /// Sorted ranges that may hold data; everything else reads as zeros.
    async fn allocation(&self) -> Result<Vec<ByteRange>>;
    /// For an incremental: the sorted ranges changed since the parent's instant (at the
    /// bitmap's granularity). `None` for a full capture.
    async fn changes(&self) -> Result<Option<Vec<ByteRange>>>;
    /// Fills `buf` with the bytes at `offset` as they were at the capture's instant.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A new capture id: the creation time in ms since the Unix epoch (zero-padded, so ids sort
/// by age as text too) and a random suffix.
pub fn new_capture_id(unix_ms: u64, random: u32) -> String {
    format!("{unix_ms:013}-{random:08x}")
}

/// The bitmap a capture creates.
pub fn bitmap_name(capture_id: &str) -> String {
    format!("{BITMAP_PREFIX}{capture_id}")
}

/// When the stillpoint bitmap `name` was created (ms since the Unix epoch), if `name` is one
/// of ours in the current form.
pub fn bitmap_created_ms(name: &str) -> Option<u64> {
    let id = name.strip_prefix(BITMAP_PREFIX)?;
    let (ms, suffix) = id.split_once('-')?;
    if ms.len() != 13 || suffix.len() != 8 || !suffix.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    ms.parse().ok()
}

/// Full or incremental for `disk`, given the parent the engine asked for (pure; see the
/// module doc for the rule). A parent bitmap that is not persistent is as good as one that is:
/// if it exists, it has recorded every write since the parent's instant.
pub fn decide_mode(disk: &DiskInfo, parent: Option<&ParentBitmap>) -> CaptureMode {
    let Some(parent) = parent else {
        return CaptureMode::Full {
            reason: FullReason::NoParent,
        };
    };
    let bitmap = parent.bitmap.clone();
    let reason = match disk.bitmap(&parent.bitmap) {
        None => FullReason::BitmapMissing {
            bitmap,
            memory_only: (!disk.persistent_bitmaps).then(|| disk.image_kind()),
        },
        Some(b) if b.inconsistent => FullReason::BitmapInconsistent { bitmap },
        Some(b) if !b.recording => FullReason::BitmapNotRecording { bitmap },
        Some(b) if b.busy => FullReason::BitmapBusy { bitmap },
        Some(_) if parent.disk_size != disk.virtual_size => FullReason::DiskResized {
            bitmap,
            was: parent.disk_size,
            now: disk.virtual_size,
        },
        Some(_) => {
            return CaptureMode::Incremental {
                parent_bitmap: parent.bitmap.clone(),
            };
        }
    };
    CaptureMode::Full { reason }
}

/// Stillpoint bitmaps of `disk` that can only be removed (left inconsistent by an unclean
/// exit of the hypervisor).
pub fn unusable_bitmaps(disk: &DiskInfo) -> Vec<String> {
    disk.bitmaps
        .iter()
        .filter(|b| b.inconsistent)
        .map(|b| b.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(name: &str) -> BitmapHealth {
        BitmapHealth {
            name: name.into(),
            recording: true,
            inconsistent: false,
            persistent: true,
            busy: false,
            count: 0,
            granularity: 65536,
        }
    }

    fn disk(bitmaps: Vec<BitmapHealth>) -> DiskInfo {
        DiskInfo {
            id: "vd0".into(),
            node: "disk0".into(),
            device: "/machine/peripheral/vd0/virtio-backend".into(),
            virtual_size: 256 << 20,
            image: "/vm/disk0.qcow2".into(),
            format: "qcow2".into(),
            format_version: Some("1.1".into()),
            persistent_bitmaps: true,
            bitmaps,
        }
    }

    /// A disk whose image cannot store bitmaps, with its capture bitmaps in memory.
    fn memory_only_disk(
        format: &str,
        version: Option<&str>,
        bitmaps: Vec<BitmapHealth>,
    ) -> DiskInfo {
        let bitmaps = bitmaps
            .into_iter()
            .map(|b| BitmapHealth {
                persistent: false,
                ..b
            })
            .collect();
        DiskInfo {
            image: format!("/vm/disk0.{format}"),
            format: format.into(),
            format_version: version.map(Into::into),
            persistent_bitmaps: false,
            ..disk(bitmaps)
        }
    }

    fn parent(name: &str, size: u64) -> ParentBitmap {
        ParentBitmap {
            bitmap: name.into(),
            disk_size: size,
        }
    }

    fn full(reason: FullReason) -> CaptureMode {
        CaptureMode::Full { reason }
    }

    #[test]
    fn incremental_only_with_a_healthy_parent_bitmap_of_the_same_disk_size() {
        let b = "stillpoint-0000000000001-0000000a";
        let size = 256 << 20;
        assert_eq!(
            decide_mode(&disk(vec![bitmap(b)]), Some(&parent(b, size))),
            CaptureMode::Incremental {
                parent_bitmap: b.into()
            }
        );
        assert_eq!(
            decide_mode(&disk(vec![bitmap(b)]), None),
            full(FullReason::NoParent)
        );
        assert_eq!(
            decide_mode(&disk(vec![]), Some(&parent(b, size))),
            full(FullReason::BitmapMissing {
                bitmap: b.into(),
                memory_only: None
            })
        );
        let case = |change: fn(&mut BitmapHealth)| {
            let mut health = bitmap(b);
            change(&mut health);
            decide_mode(&disk(vec![health]), Some(&parent(b, size)))
        };
        assert_eq!(
            case(|h| {
                h.inconsistent = true;
                h.recording = false;
            }),
            full(FullReason::BitmapInconsistent { bitmap: b.into() })
        );
        assert_eq!(
            case(|h| h.persistent = false),
            CaptureMode::Incremental {
                parent_bitmap: b.into()
            },
            "a bitmap that exists has recorded every write, persistent or not"
        );
        assert_eq!(
            case(|h| h.recording = false),
            full(FullReason::BitmapNotRecording { bitmap: b.into() })
        );
        assert_eq!(
            case(|h| h.busy = true),
            full(FullReason::BitmapBusy { bitmap: b.into() })
        );
        assert_eq!(
            decide_mode(&disk(vec![bitmap(b)]), Some(&parent(b, 128 << 20))),
            full(FullReason::DiskResized {
                bitmap: b.into(),
                was: 128 << 20,
                now: 256 << 20
            })
        );
    }

    #[test]
    fn a_memory_only_bitmap_serves_incrementals_while_it_exists_and_its_loss_is_explained() {
        let b = "stillpoint-0000000000001-0000000a";
        let size = 256 << 20;
        for (format, version, kind) in [("raw", None, "raw"), ("qcow2", Some("0.10"), "qcow2 v2")] {
            let live = memory_only_disk(format, version, vec![bitmap(b)]);
            assert_eq!(live.image_kind(), kind);
            assert_eq!(
                decide_mode(&live, Some(&parent(b, size))),
                CaptureMode::Incremental {
                    parent_bitmap: b.into()
                },
                "{kind}: the bitmap exists in the running QEMU"
            );
            // Every other rule still holds for a memory-only bitmap.
            let mut idle = live.clone();
            idle.bitmaps[0].recording = false;
            assert_eq!(
                decide_mode(&idle, Some(&parent(b, size))),
                full(FullReason::BitmapNotRecording { bitmap: b.into() })
            );
            let mut busy = live.clone();
            busy.bitmaps[0].busy = true;
            assert_eq!(
                decide_mode(&busy, Some(&parent(b, size))),
                full(FullReason::BitmapBusy { bitmap: b.into() })
            );
            assert!(matches!(
                decide_mode(&live, Some(&parent(b, size / 2))),
                CaptureMode::Full {
                    reason: FullReason::DiskResized { .. }
                }
            ));
            // After a restart of QEMU it is gone, and the reason says why.
            let restarted = memory_only_disk(format, version, vec![]);
            let mode = decide_mode(&restarted, Some(&parent(b, size)));
            assert_eq!(
                mode,
                full(FullReason::BitmapMissing {
                    bitmap: b.into(),
                    memory_only: Some(kind.into())
                })
            );
            let CaptureMode::Full { reason } = mode else {
                unreachable!()
            };
            assert_eq!(
                reason.to_string(),
                format!(
                    "the parent's dirty bitmap `{b}` is missing: the non-persistent bitmap of a \
                     {kind} image is lost when QEMU restarts (or it was removed)"
                )
            );
        }
    }

    #[test]
    fn image_kinds_name_the_qcow2_version() {
        let kind = |format: &str, version: Option<&str>| {
            let mut info = disk(vec![]);
            info.format = format.into();
            info.format_version = version.map(Into::into);
            info.image_kind()
        };
        assert_eq!(kind("qcow2", Some("1.1")), "qcow2 v3");
        assert_eq!(kind("qcow2", Some("0.10")), "qcow2 v2");
        assert_eq!(kind("qcow2", Some("2.0")), "qcow2 (compat 2.0)");
        assert_eq!(kind("qcow2", None), "qcow2");
        assert_eq!(kind("raw", None), "raw");
    }

    #[test]
    fn full_reasons_read_as_report_sentences() {
        let text = FullReason::BitmapInconsistent {
            bitmap: "stillpoint-x".into(),
        }
        .to_string();
        assert_eq!(
            text,
            "the parent's dirty bitmap `stillpoint-x` is inconsistent after an unclean QEMU exit"
        );
        assert_eq!(
            FullReason::DiskResized {
                bitmap: "b".into(),
                was: 1,
                now: 2
            }
            .to_string(),
            "the disk was resized from 1 to 2 bytes"
        );
        // The report serializes the reason with its facts.
        let json = serde_json::to_value(full(FullReason::BitmapMissing {
            bitmap: "stillpoint-y".into(),
            memory_only: None,
        }))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"mode": "full", "reason": {"reason": "bitmap-missing", "bitmap": "stillpoint-y"}})
        );
        let json = serde_json::to_value(full(FullReason::BitmapMissing {
            bitmap: "stillpoint-z".into(),
            memory_only: Some("raw".into()),
        }))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"mode": "full", "reason": {"reason": "bitmap-missing",
                                "bitmap": "stillpoint-z", "memory_only": "raw"}})
        );
    }

    #[test]
    fn bitmap_names_carry_their_creation_time_and_sort_by_it() {
        let id = new_capture_id(1_764_158_400_123, 0xdead_beef);
        assert_eq!(id, "1764158400123-deadbeef");
        let name = bitmap_name(&id);
        assert_eq!(name, "stillpoint-1764158400123-deadbeef");
        assert_eq!(bitmap_created_ms(&name), Some(1_764_158_400_123));
        let older = bitmap_name(&new_capture_id(999, 1));
        assert_eq!(older, "stillpoint-0000000000999-00000001");
        assert!(older < name, "text order is age order");
        for foreign in [
            "b1",
            "stillpoint-",
            "stillpoint-123-deadbeef",
            "stillpoint-1764158400123-xyz",
            "stillpoint-1764158400123",
            "other-1764158400123-deadbeef",
        ] {
            assert_eq!(bitmap_created_ms(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn only_inconsistent_bitmaps_are_unusable() {
        let mut bad = bitmap("stillpoint-bad");
        bad.inconsistent = true;
        let mut idle = bitmap("stillpoint-idle");
        idle.recording = false;
        assert_eq!(
            unusable_bitmaps(&disk(vec![bitmap("stillpoint-ok"), bad, idle])),
            vec!["stillpoint-bad".to_string()]
        );
    }
}
