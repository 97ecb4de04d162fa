//! The capture capability of the plain-QEMU driver: copy-before-write fleecing with QEMU's
//! standalone `copy-before-write` filter and `snapshot-access`, read over QEMU's NBD server.
//!
//! # Why this variant
//! QEMU 7.2 offers three ways to get a point-in-time view (docs/capture.md, "What QEMU
//! 7.2 does"). The backup job's
//! built-in filter — a classic fleecing overlay or `blockdev-backup` with `filter-node-name` —
//! pauses the VM when the scratch image cannot be written (ENOSPC → `io-error`). The
//! standalone filter with `on-cbw-error: break-snapshot` and a `cbw-timeout` gives up on the
//! *capture* instead: the guest's write succeeds and reads of the view fail. Invariant 8 (a
//! backup never harms the guest, the VM is never left paused) decides for the standalone
//! filter.
//!
//! # The sequence (per VM, all disks together)
//! `prepare` (before any freeze): recover leftovers; remove inconsistent stillpoint bitmaps;
//! per disk `qemu-img create` a scratch qcow2 of the disk's size (no backing), `blockdev-add`
//! it as `sp-fl-<node>` and a `copy-before-write` node `sp-cbw-<node>` over the disk node with
//! that target. Nothing is attached yet, so the guest sees nothing.
//!
//! `start` (the guest is frozen): `query-status` + `query-block` (every device must still
//! have its disk node: `qom-set` of the node already attached aborts QEMU), then, for a
//! running VM, add the pause marker and `stop`; one `transaction` (per disk: add the new
//! bitmap — persistent where the image can store it, qcow2 v3; in QEMU's memory on raw and
//! qcow2 v2 images, which refuse persistent ones — and disable the parent);
//! `qom-set <device> drive sp-cbw-<node>` for every
//! disk — this is the point in time; `cont` (only if the VM ran before: a paused VM is never
//! resumed). Any error after `stop` resumes the VM first, then rolls back.
//!
//! `export` (after the thaw): `snapshot-access` node `sp-snap-<node>` over each filter,
//! `nbd-server-start` on a unix socket in the scratch directory, one read-only export
//! `sp-exp-<node>` per disk named after the disk id, offering `base:allocation` and, for an
//! incremental, the parent bitmap as `qemu:dirty-bitmap:<parent>` (`{node, name}` form).
//!
//! `finish`: the clean-up order of [`cleanup`], then one bitmap transaction (see
//! [`crate::capture`]).
//!
//! The disk node may be any format node QEMU reads (qcow2 of either version, raw): the filter,
//! the scratch image and `snapshot-access` sit above it and do not depend on its format; only
//! where the bitmaps live does (the image's version is read from QEMU, never from the file
//! name).
//!
//! # Guardian contract
//! A stillpoint that dies between `stop` and `cont` leaves the VM paused with the node
//! [`names::PAUSE_MARKER`] present. [`resume_if_paused_by_capture`] (for the freeze guardian,
//! once the capturing process is gone) resumes the VM only in that case; the next `prepare`
//! does the same as part of its recovery.
//!
//! A stillpoint that dies at any point of a capture leaves the rest (filters, exports, the
//! scratch file that grows with every guest write): the engine's capture guardian, once the
//! backup process is gone, calls [`DeadCaptureRelease`] (implemented by [`QemuCapture`] with
//! the same recovery `prepare` runs), so they go at once rather than with the next backup.
//!
//! # One capture at a time
//! QEMU's QMP socket serves one client, so while a [`QemuCapture`] holds the monitor nobody
//! else can talk to it (`QemuVm::status` waits, then fails). Captures made from one
//! [`QemuCapture`] are serialised by a lock that a dropped capture holds until its background
//! release is done.

pub mod bitmaps;
pub mod cleanup;
pub mod names;
pub mod session;
pub mod state;
pub mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::json;
use stillpoint_qmp::{Action, Qmp};
use tokio::sync::{Mutex, OnceCell};
use tracing::{info, warn};

use crate::capture::{
    Capture, CaptureInventory, CapturePlan, CaptureRequest, DeadCaptureRelease, PlannedDisk,
    PreparedCapture, bitmap_name, decide_mode, new_capture_id, unusable_bitmaps,
};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::qemu::{QemuVm, QemuVmSpec};

pub use cleanup::{CleanupStep, ResumeOutcome, Scope, plan_cleanup, resume_if_paused_by_capture};
pub use session::{QemuPrepared, QemuStarted};
pub use state::BlockState;
pub use view::QemuCapturedDisk;

use session::{Ctx, Session};
use state::{DeviceDisk, device_disks};

/// How long to wait for QEMU's events (an export going away) during clean-up.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for the monitor's greeting when connecting on first use: another client
/// may hold the monitor (it takes one at a time), and then nothing answers.
pub const MONITOR_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The capture capability of one QEMU VM, over its monitor.
pub struct QemuCapture {
    vm: String,
    /// Where to connect on first use (`None`: given connected).
    socket: Option<PathBuf>,
    qmp: OnceCell<Qmp>,
    lock: Arc<Mutex<()>>,
}

impl QemuCapture {
    /// Capture for the VM named `vm` (used in messages) through an open monitor.
    pub fn new(vm: impl Into<String>, qmp: Qmp) -> Self {
        Self {
            vm: vm.into(),
            socket: None,
            qmp: OnceCell::new_with(Some(qmp)),
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Capture for a VM of the inventory; its monitor is opened on first use and then held
    /// as long as this value lives (so `QemuVm::status` cannot reach the monitor meanwhile).
    pub fn for_spec(spec: &QemuVmSpec) -> Self {
        Self {
            vm: spec.name.clone(),
            socket: Some(spec.qmp_socket.clone()),
            qmp: OnceCell::new(),
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Opens the VM's monitor now and holds it for captures.
    pub async fn connect(vm: &QemuVm) -> Result<Self> {
        Ok(Self::new(vm.spec().name.clone(), vm.monitor().await?))
    }

    /// The monitor this capture uses (clones share the one connection), connected on first
    /// use.
    pub async fn monitor(&self) -> Result<&Qmp> {
        self.qmp
            .get_or_try_init(|| async {
                let socket = self.socket.as_deref().expect("a lazy capture has a socket");
                connect_monitor(&self.vm, socket, MONITOR_CONNECT_TIMEOUT).await
            })
            .await
    }

    fn error(&self, kind: PlatformErrorKind, what: impl std::fmt::Display) -> PlatformError {
        PlatformError::new(kind, format!("VM `{}`: {what}", self.vm))
    }

    async fn state(&self) -> Result<BlockState> {
        BlockState::query(self.monitor().await?).await.map_err(|e| {
            self.error(
                PlatformErrorKind::Monitor,
                "reading QEMU's block state failed",
            )
            .with_source(e)
        })
    }

    /// Cleans up what an interrupted capture left; returns what was done.
    async fn recover(&self) -> Result<Vec<String>> {
        let state = self.state().await?;
        let steps = plan_cleanup(&state, Scope::Recovery);
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        warn!(
            vm = self.vm,
            steps = steps.len(),
            "recovering leftovers of an interrupted capture"
        );
        let failures = cleanup::run_cleanup(self.monitor().await?, &steps, EVENT_TIMEOUT).await;
        if !failures.is_empty() {
            let text: Vec<String> = failures.iter().map(ToString::to_string).collect();
            return Err(self.error(
                PlatformErrorKind::Capture,
                format!(
                    "leftovers of an interrupted capture could not be cleaned up: {}",
                    text.join("; ")
                ),
            ));
        }
        Ok(steps.iter().map(ToString::to_string).collect())
    }

    fn select(&self, all: Vec<DeviceDisk>, wanted: Option<&[String]>) -> Result<Vec<DeviceDisk>> {
        let selected = match wanted {
            None => all,
            Some(wanted) => {
                let mut out = Vec::new();
                for id in wanted {
                    let disk = all.iter().find(|d| &d.info.id == id).ok_or_else(|| {
                        let known: Vec<&str> = all.iter().map(|d| d.info.id.as_str()).collect();
                        self.error(
                            PlatformErrorKind::Capture,
                            format!(
                                "no writable disk `{id}` (the VM has: {})",
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        )
                    })?;
                    out.push(disk.clone());
                }
                out
            }
        };
        if selected.is_empty() {
            return Err(self.error(
                PlatformErrorKind::Capture,
                "the VM has no writable disk to capture",
            ));
        }
        for disk in &selected {
            if !names::usable_disk_node(&disk.info.node) {
                return Err(self.error(
                    PlatformErrorKind::Capture,
                    format!(
                        "disk {}: its node name `{}` cannot carry capture node names; attach \
                         disks as -blockdev nodes named with a letter first, then letters, \
                         digits, `-`, `.`, `_`, at most {} characters",
                        disk.info.id,
                        disk.info.node,
                        names::MAX_DISK_NODE
                    ),
                ));
            }
            if disk.attached != disk.info.node {
                return Err(self.error(
                    PlatformErrorKind::Capture,
                    format!(
                        "disk {}: device {} has node `{}` attached, not its disk node `{}`",
                        disk.info.id, disk.info.device, disk.attached, disk.info.node
                    ),
                ));
            }
        }
        Ok(selected)
    }

    /// Per disk: scratch file, scratch node, filter node.
    async fn set_up(&self, plan: &CapturePlan, cbw_timeout: Duration) -> Result<()> {
        let qmp = self.monitor().await?;
        for disk in &plan.disks {
            let node = &disk.disk.node;
            create_scratch(&disk.scratch, disk.disk.virtual_size)
                .await
                .map_err(|e| {
                    self.error(
                        PlatformErrorKind::Capture,
                        format!(
                            "disk {}: creating the scratch image {} failed",
                            disk.disk.id,
                            disk.scratch.display()
                        ),
                    )
                    .with_source(e)
                })?;
            qmp.blockdev_add(json!({"driver": "qcow2", "node-name": names::scratch(node),
                                     "file": {"driver": "file", "filename": disk.scratch}}))
                .await
                .map_err(|e| {
                    self.error(
                        PlatformErrorKind::Capture,
                        format!("disk {}: adding the scratch node failed", disk.disk.id),
                    )
                    .with_source(e)
                })?;
            qmp.blockdev_add(json!({
                "driver": "copy-before-write", "node-name": names::filter(node),
                "file": node, "target": names::scratch(node),
                "on-cbw-error": "break-snapshot",
                "cbw-timeout": cbw_timeout.as_secs().clamp(1, u64::from(u32::MAX)),
            }))
            .await
            .map_err(|e| {
                self.error(
                    PlatformErrorKind::Capture,
                    format!(
                        "disk {}: adding the copy-before-write filter failed",
                        disk.disk.id
                    ),
                )
                .with_source(e)
            })?;
        }
        Ok(())
    }
}

/// `qemu-img create -f qcow2` of `size` bytes, no backing file (the standalone filter writes
/// the old data into it; docs/capture.md, "Three ways to a point-in-time view").
async fn create_scratch(path: &Path, size: u64) -> std::io::Result<()> {
    let output = tokio::process::Command::from(stillpoint_os::child::command("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "qemu-img create exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl Capture for QemuCapture {
    async fn inspect(&self) -> Result<CaptureInventory> {
        let state = self.state().await?;
        Ok(CaptureInventory {
            vm: self.vm.clone(),
            disks: device_disks(&state).into_iter().map(|d| d.info).collect(),
            leftovers: plan_cleanup(&state, Scope::Recovery)
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
    }

    async fn prepare(&self, request: CaptureRequest) -> Result<Box<dyn PreparedCapture>> {
        let lock = self.lock.clone().lock_owned().await;
        let dir = &request.scratch_dir;
        if !dir.is_dir() {
            return Err(self.error(
                PlatformErrorKind::Capture,
                format!("the scratch directory {} does not exist", dir.display()),
            ));
        }
        let recovered = self.recover().await?;
        let state = self.state().await?;
        let disks = self.select(device_disks(&state), request.disks.as_deref())?;
        for id in request.parents.keys() {
            if !disks.iter().any(|d| &d.info.id == id) {
                warn!(
                    vm = self.vm,
                    disk = id,
                    "a parent bitmap names a disk that is not captured"
                );
            }
        }
        let capture_id = new_capture_id(now_ms(), rand::random());
        let socket = names::nbd_socket(dir, &capture_id);
        if socket.as_os_str().len() > names::MAX_SOCKET_PATH {
            return Err(self.error(
                PlatformErrorKind::Capture,
                format!(
                    "the scratch directory {} is too long a path for the export's unix socket \
                     (at most {} bytes in all)",
                    dir.display(),
                    names::MAX_SOCKET_PATH
                ),
            ));
        }
        let planned: Vec<PlannedDisk> = disks
            .into_iter()
            .map(|d| PlannedDisk {
                mode: decide_mode(&d.info, request.parents.get(&d.info.id)),
                new_bitmap: bitmap_name(&capture_id),
                removed_bitmaps: unusable_bitmaps(&d.info),
                scratch: names::scratch_file(dir, &self.vm, &d.info.node, &capture_id),
                disk: d.info,
            })
            .collect();
        let removals: Vec<Action> = planned
            .iter()
            .flat_map(|d| {
                d.removed_bitmaps
                    .iter()
                    .map(|b| Action::bitmap_remove(&d.disk.node, b))
            })
            .collect();
        if !removals.is_empty() {
            self.monitor()
                .await?
                .transaction(removals)
                .await
                .map_err(|e| {
                    self.error(
                        PlatformErrorKind::Capture,
                        "removing dirty bitmaps left inconsistent by an unclean QEMU exit failed",
                    )
                    .with_source(e)
                })?;
        }
        let plan = CapturePlan {
            vm: self.vm.clone(),
            capture_id,
            disks: planned,
            recovered,
        };
        for disk in &plan.disks {
            info!(vm = self.vm, disk = disk.disk.id, mode = ?disk.mode, "capture planned");
        }
        let ctx = Ctx {
            qmp: self.monitor().await?.clone(),
            vm: self.vm.clone(),
            timeout: EVENT_TIMEOUT,
            _lock: lock,
        };
        if let Err(error) = self.set_up(&plan, request.cbw_timeout).await {
            // Take back what was added; the error says what failed.
            let session = Session::new(ctx, plan, socket);
            let prepared = QemuPrepared::new(session);
            if let Err(cleanup) = Box::new(prepared).abort().await {
                warn!(error = %stillpoint_os::error_chain(&cleanup), "cleaning up a failed prepare");
            }
            return Err(error);
        }
        Ok(Box::new(QemuPrepared::new(Session::new(ctx, plan, socket))))
    }
}

/// The release is [`QemuCapture::recover`], the recovery every `prepare` starts with: the
/// steps of [`plan_cleanup`] with [`Scope::Recovery`] (resume a VM the capture paused, delete
/// the exports, the NBD server, the `snapshot-access` nodes, give the devices their disk nodes
/// back, delete the filters, scratch nodes and scratch files, reconcile the bitmaps).
///
/// It is safe to release "every capture found" because QEMU's monitor serves one client at a
/// time and a live capture holds it from `prepare` to `finish`: while this holds the monitor,
/// no capture of a living process can exist. Whatever it finds belongs to a process that is
/// gone.
#[async_trait]
impl DeadCaptureRelease for QemuCapture {
    async fn release_dead_capture(&self) -> Result<Vec<String>> {
        let _lock = self.lock.clone().lock_owned().await;
        self.recover().await
    }
}

/// Connects to the VM's monitor (waiting at most `connect_timeout` for the greeting: another
/// client may still hold it) and runs [`resume_if_paused_by_capture`].
pub async fn resume_vm_if_paused_by_capture(
    vm: &QemuVm,
    connect_timeout: Duration,
) -> Result<ResumeOutcome> {
    let name = &vm.spec().name;
    let qmp = connect_monitor(name, &vm.spec().qmp_socket, connect_timeout).await?;
    resume_if_paused_by_capture(&qmp).await.map_err(|e| {
        PlatformError::new(
            PlatformErrorKind::Monitor,
            format!("VM `{name}`: resuming a VM paused by a capture failed"),
        )
        .with_source(e)
    })
}

/// Connects to a monitor, waiting at most `timeout` for its greeting.
async fn connect_monitor(vm: &str, socket: &Path, timeout: Duration) -> Result<Qmp> {
    tokio::time::timeout(timeout, Qmp::connect_unix(socket))
        .await
        .map_err(|_| {
            PlatformError::new(
                PlatformErrorKind::Monitor,
                format!(
                    "VM `{vm}`: the QMP monitor {} did not answer within {timeout:?} (another \
                     client may hold it)",
                    socket.display()
                ),
            )
        })?
        .map_err(|e| {
            PlatformError::new(
                PlatformErrorKind::Monitor,
                format!(
                    "VM `{vm}`: cannot open the QMP monitor {}",
                    socket.display()
                ),
            )
            .with_source(e)
        })
}
