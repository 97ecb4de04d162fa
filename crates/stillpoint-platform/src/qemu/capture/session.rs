//! The prepared and started states of one QEMU capture: `start`, `export`, `finish`, and the
//! background release when one of them is dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use stillpoint_nbd::NbdClient;
use stillpoint_qmp::{BitmapRef, NbdExport, Qmp};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::capture::{
    CaptureMode, CapturePlan, CapturedDisk, FinishReport, PreparedCapture, StartReport,
    StartedCapture,
};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::qemu::capture::bitmaps::{Settle, rotation, settlement};
use crate::qemu::capture::cleanup::{Scope, plan_cleanup, run_cleanup};
use crate::qemu::capture::names;
use crate::qemu::capture::state::BlockState;
use crate::qemu::capture::view::{QemuCapturedDisk, bitmap_context};

/// What every state of a capture holds: the monitor, the VM's name for messages, the wait
/// limit for QEMU's events, and the capture lock of the VM (held until the capture is fully
/// released, also when that happens in the background after a drop).
pub(crate) struct Ctx {
    pub qmp: Qmp,
    pub vm: String,
    pub timeout: Duration,
    pub _lock: OwnedMutexGuard<()>,
}

impl Ctx {
    pub fn error(&self, kind: PlatformErrorKind, what: impl std::fmt::Display) -> PlatformError {
        PlatformError::new(kind, format!("VM `{}`: {what}", self.vm))
    }

    pub fn qmp_error(
        &self,
        what: impl std::fmt::Display,
        error: stillpoint_qmp::Error,
    ) -> PlatformError {
        self.error(PlatformErrorKind::Capture, what)
            .with_source(error)
    }
}

/// Everything of a capture from `prepare` on.
pub(crate) struct Session {
    pub ctx: Ctx,
    pub plan: CapturePlan,
    pub socket: PathBuf,
    /// Deletes the pause marker after `cont`, off the frozen path.
    marker_removal: Option<JoinHandle<stillpoint_qmp::Result<()>>>,
    server_started: bool,
    views: Option<Vec<Arc<QemuCapturedDisk>>>,
    broken: Arc<AtomicBool>,
}

impl Session {
    pub fn new(ctx: Ctx, plan: CapturePlan, socket: PathBuf) -> Self {
        Self {
            ctx,
            plan,
            socket,
            marker_removal: None,
            server_started: false,
            views: None,
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Takes everything apart (see `cleanup`) and settles the bitmaps. Every step is tried;
    /// failures of the nodes' clean-up become warnings, unless they keep the bitmaps from
    /// being settled, which is an error (the next `prepare` recovers either way).
    async fn release(mut self, settle: Settle) -> Result<FinishReport> {
        if let Some(views) = self.views.take() {
            for view in views {
                // Closes our connection (other holders' reads then fail as closed).
                let _ = view.client.clone().disconnect().await;
            }
        }
        let mut warnings = Vec::new();
        if let Some(removal) = self.marker_removal.take() {
            match removal.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warnings.push(format!(
                    "could not delete the pause marker node: {error} (removed with the other nodes)"
                )),
                Err(error) => warnings.push(format!("deleting the pause marker node: {error}")),
            }
        }
        let ctx = &self.ctx;
        match BlockState::query(&ctx.qmp).await {
            Ok(state) => {
                let steps = plan_cleanup(
                    &state,
                    Scope::Release {
                        server_started: self.server_started,
                    },
                );
                for failure in run_cleanup(&ctx.qmp, &steps, ctx.timeout).await {
                    warnings.push(failure.to_string());
                }
            }
            Err(error) => warnings.push(format!(
                "could not read QEMU's block state to clean up: {error}"
            )),
        }
        if let Err(error) = std::fs::remove_file(&self.socket)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warnings.push(format!(
                "could not delete the NBD socket {}: {error}",
                self.socket.display()
            ));
        }

        let (actions, bitmaps) = settlement(&self.plan.disks, settle);
        if !actions.is_empty() {
            ctx.qmp.transaction(actions).await.map_err(|error| {
                ctx.qmp_error(
                    format!(
                        "settling the dirty bitmaps as a {} failed; the next capture recovers \
                         them{}",
                        if settle == Settle::Success {
                            "success"
                        } else {
                            "failure"
                        },
                        if warnings.is_empty() {
                            String::new()
                        } else {
                            format!(" (clean-up problems before: {})", warnings.join("; "))
                        }
                    ),
                    error,
                )
            })?;
        }
        info!(vm = %ctx.vm, capture = %self.plan.capture_id, ?settle, "capture released");
        Ok(FinishReport {
            success: settle == Settle::Success,
            bitmaps,
            warnings,
        })
    }

    /// Runs `release` in the background (for drops); the capture lock goes with it.
    fn release_in_background(self, settle: Settle) {
        let vm = self.ctx.vm.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                warn!(
                    vm,
                    ?settle,
                    "capture dropped unfinished: releasing it in the background"
                );
                handle.spawn(async move {
                    if let Err(error) = self.release(settle).await {
                        warn!(vm, %error, "background release of a dropped capture failed");
                    }
                });
            }
            Err(_) => warn!(
                vm,
                "capture dropped outside a tokio runtime: left for the next prepare to recover"
            ),
        }
    }
}

/// [`PreparedCapture`] on QEMU.
pub struct QemuPrepared {
    plan: CapturePlan,
    session: Option<Session>,
}

impl QemuPrepared {
    pub(crate) fn new(session: Session) -> Self {
        Self {
            plan: session.plan.clone(),
            session: Some(session),
        }
    }
}

impl Drop for QemuPrepared {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.release_in_background(Settle::Untouched);
        }
    }
}

/// How far `start` got, for rolling back.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    stopped: bool,
    resumed: bool,
    rotated: bool,
}

/// `start` in progress. If its future is dropped half-way, this resumes the VM and releases
/// the capture in the background.
struct Starting {
    session: Option<Session>,
    progress: Progress,
}

impl Drop for Starting {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let progress = self.progress;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            warn!(
                vm = session.ctx.vm,
                "capture start abandoned outside a runtime"
            );
            return;
        };
        handle.spawn(async move {
            let _ = roll_back(session, progress).await;
        });
    }
}

/// Undoes a `start` that failed or was abandoned: resume first (the guest waits), then
/// release as a failure (if the bitmaps were rotated) or untouched.
async fn roll_back(session: Session, progress: Progress) -> Vec<String> {
    let mut problems = Vec::new();
    if progress.stopped
        && !progress.resumed
        && let Err(error) = session.ctx.qmp.cont().await
    {
        problems.push(format!(
            "the VM could not be resumed ({error}); a guardian calling \
             resume_if_paused_by_capture will"
        ));
    }
    let settle = if progress.rotated {
        Settle::Failure
    } else {
        Settle::Untouched
    };
    match session.release(settle).await {
        Ok(report) => problems.extend(report.warnings),
        Err(error) => problems.push(stillpoint_os::error_chain(&error)),
    }
    problems
}

impl Starting {
    /// The point in time. Returns the report; `self.progress` says how far it got.
    async fn run(&mut self) -> Result<StartReport> {
        let began = Instant::now();
        let session = self.session.as_ref().expect("present until start ends");
        let ctx = &session.ctx;
        let qmp = &ctx.qmp;
        let (status, devices) = tokio::try_join!(qmp.query_status(), qmp.query_block())
            .map_err(|e| ctx.qmp_error("reading the VM's state before the capture failed", e))?;
        // qom-set to the node already attached aborts QEMU: make sure every device still
        // has its disk node (and not, say, a filter) before touching any.
        for disk in &session.plan.disks {
            let attached = devices
                .iter()
                .find(|d| d.qdev.as_deref() == Some(disk.disk.device.as_str()))
                .and_then(|d| d.inserted.as_ref())
                .map(|n| n.node_name.as_str());
            if attached != Some(disk.disk.node.as_str()) {
                return Err(ctx.error(
                    PlatformErrorKind::Capture,
                    format!(
                        "disk {}: device {} has {} attached instead of its disk node `{}`; \
                         the capture was not started",
                        disk.disk.id,
                        disk.disk.device,
                        attached.map_or("nothing".to_string(), |n| format!("node `{n}`")),
                        disk.disk.node
                    ),
                ));
            }
        }

        let running = status.running;
        if running {
            // The marker first, so that a guardian finds it if we die while the VM is paused;
            // both commands are pipelined.
            let (marker, stopped) = tokio::join!(
                qmp.blockdev_add(json!({"driver": "null-co", "node-name": names::PAUSE_MARKER})),
                qmp.stop()
            );
            self.progress.stopped = stopped.is_ok();
            marker.map_err(|e| ctx.qmp_error("adding the pause marker node failed", e))?;
            stopped.map_err(|e| ctx.qmp_error("pausing the VM (`stop`) failed", e))?;
        }
        let paused_at = Instant::now();

        // One transaction for all disks: the new bitmaps start recording and the parents stop,
        // at the same instant. It comes before the filters are attached: a write between the
        // two is then in the new bitmap (docs/capture.md, "The ordering trap").
        let actions = rotation(&session.plan.disks);
        qmp.transaction(actions).await.map_err(|e| {
            ctx.qmp_error(
                "the capture transaction (dirty bitmap rotation) failed; no bitmap changed",
                e,
            )
        })?;
        self.progress.rotated = true;

        let attaches = session.plan.disks.iter().map(|disk| async move {
            qmp.qom_set(
                &disk.disk.device,
                "drive",
                json!(names::filter(&disk.disk.node)),
            )
            .await
            .map_err(|e| {
                ctx.qmp_error(
                    format!(
                        "disk {}: attaching the copy-before-write filter `{}` to device {} \
                             failed",
                        disk.disk.id,
                        names::filter(&disk.disk.node),
                        disk.disk.device
                    ),
                    e,
                )
            })
        });
        for result in futures::future::join_all(attaches).await {
            result?;
        }

        if running {
            qmp.cont().await.map_err(|e| {
                ctx.qmp_error("resuming the VM (`cont`) after the capture failed", e)
            })?;
            self.progress.resumed = true;
        }
        let paused = if running {
            paused_at.elapsed()
        } else {
            Duration::ZERO
        };
        let report = StartReport {
            was_running: running,
            run_state: status.status,
            paused,
            total: began.elapsed(),
        };
        if running {
            let qmp = qmp.clone();
            let removal = tokio::spawn(async move { qmp.blockdev_del(names::PAUSE_MARKER).await });
            self.session.as_mut().expect("present").marker_removal = Some(removal);
        }
        Ok(report)
    }
}

#[async_trait]
impl PreparedCapture for QemuPrepared {
    fn plan(&self) -> &CapturePlan {
        &self.plan
    }

    async fn start(mut self: Box<Self>) -> Result<Box<dyn StartedCapture>> {
        let mut starting = Starting {
            session: self.session.take(),
            progress: Progress::default(),
        };
        match starting.run().await {
            Ok(report) => {
                let session = starting.session.take().expect("present");
                info!(vm = %session.ctx.vm, capture = %session.plan.capture_id,
                      paused_us = report.paused.as_micros() as u64,
                      total_us = report.total.as_micros() as u64, "capture started");
                Ok(Box::new(QemuStarted {
                    plan: self.plan.clone(),
                    report,
                    session: Some(session),
                }))
            }
            Err(error) => {
                let session = starting.session.take().expect("present");
                let problems = roll_back(session, starting.progress).await;
                for problem in &problems {
                    warn!(%problem, "rolling back a failed capture start");
                }
                Err(error)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        let session = self.session.take().expect("present until consumed");
        session.release(Settle::Untouched).await.map(drop)
    }
}

/// [`StartedCapture`] on QEMU.
pub struct QemuStarted {
    plan: CapturePlan,
    report: StartReport,
    session: Option<Session>,
}

impl Drop for QemuStarted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.release_in_background(Settle::Failure);
        }
    }
}

impl QemuStarted {
    async fn set_up_exports(session: &mut Session) -> Result<Vec<Arc<QemuCapturedDisk>>> {
        if let Some(removal) = session.marker_removal.take() {
            match removal.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    warn!(%error, "deleting the pause marker failed; retried at the end")
                }
                Err(error) => warn!(%error, "deleting the pause marker panicked"),
            }
        }
        let ctx = &session.ctx;
        let qmp = &ctx.qmp;
        for disk in &session.plan.disks {
            let node = &disk.disk.node;
            qmp.blockdev_add(json!({"driver": "snapshot-access",
                                    "node-name": names::snapshot(node),
                                    "file": names::filter(node)}))
                .await
                .map_err(|e| {
                    ctx.qmp_error(
                        format!(
                            "disk {}: adding the snapshot-access node failed",
                            disk.disk.id
                        ),
                        e,
                    )
                })?;
        }
        if let Err(error) = qmp.nbd_server_start_unix(&session.socket).await {
            let running = error
                .qemu_desc()
                .is_some_and(|d| d.contains("already running"));
            let exports = qmp.query_block_exports().await.unwrap_or_default();
            if !running || !exports.is_empty() {
                return Err(ctx.qmp_error(
                    format!(
                        "starting QEMU's NBD server on {} failed{}",
                        session.socket.display(),
                        if running {
                            " (it already runs, exporting something else)"
                        } else {
                            ""
                        }
                    ),
                    error,
                ));
            }
            // A server with no exports: left by a capture killed between starting it and
            // exporting. Take it over.
            warn!(
                vm = ctx.vm,
                "an NBD server without exports was running; restarting it"
            );
            qmp.nbd_server_stop()
                .await
                .map_err(|e| ctx.qmp_error("stopping a stale NBD server failed", e))?;
            qmp.nbd_server_start_unix(&session.socket)
                .await
                .map_err(|e| ctx.qmp_error("starting QEMU's NBD server failed", e))?;
        }
        session.server_started = true;
        let ctx = &session.ctx;
        let qmp = &ctx.qmp;
        let mut views = Vec::new();
        for disk in &session.plan.disks {
            let node = &disk.disk.node;
            let mut contexts = vec!["base:allocation".to_string()];
            let mut export = NbdExport::new(names::export(node), names::snapshot(node))
                .name(disk.disk.id.clone());
            if let CaptureMode::Incremental { parent_bitmap } = &disk.mode {
                // The `{node, name}` form: the bitmap lives on the disk node, not on the
                // snapshot-access node that is exported (docs/capture.md, "Exports and bitmaps").
                export = export.bitmaps(vec![BitmapRef::on(node.clone(), parent_bitmap.clone())]);
                contexts.push(bitmap_context(parent_bitmap));
            }
            qmp.block_export_add_nbd(&export).await.map_err(|e| {
                ctx.qmp_error(
                    format!("disk {}: adding the NBD export failed", disk.disk.id),
                    e,
                )
            })?;
            let contexts: Vec<&str> = contexts.iter().map(String::as_str).collect();
            let client = NbdClient::connect_unix(&session.socket, &disk.disk.id, &contexts)
                .await
                .map_err(|e| {
                    ctx.error(
                        PlatformErrorKind::Capture,
                        format!(
                            "disk {}: connecting to the capture's NBD export failed",
                            disk.disk.id
                        ),
                    )
                    .with_source(e)
                })?;
            debug!(disk = disk.disk.id, info = ?client.info(), "capture exported");
            views.push(Arc::new(QemuCapturedDisk {
                vm: ctx.vm.clone(),
                id: disk.disk.id.clone(),
                node: node.clone(),
                mode: disk.mode.clone(),
                client,
                scratch: disk.scratch.clone(),
                broken: session.broken.clone(),
            }));
        }
        Ok(views)
    }
}

#[async_trait]
impl StartedCapture for QemuStarted {
    fn plan(&self) -> &CapturePlan {
        &self.plan
    }

    fn start_report(&self) -> &StartReport {
        &self.report
    }

    async fn export(&mut self) -> Result<Vec<Arc<dyn CapturedDisk>>> {
        let session = self.session.as_mut().expect("present until consumed");
        if session.views.is_none() {
            session.views = Some(Self::set_up_exports(session).await?);
        }
        Ok(session
            .views
            .iter()
            .flatten()
            .map(|v| v.clone() as Arc<dyn CapturedDisk>)
            .collect())
    }

    async fn finish(mut self: Box<Self>, success: bool) -> Result<FinishReport> {
        let session = self.session.take().expect("present until consumed");
        let broken = session.broken.load(Ordering::Relaxed);
        let ctx_vm = session.ctx.vm.clone();
        let settle = if success && !broken {
            Settle::Success
        } else {
            Settle::Failure
        };
        let report = session.release(settle).await?;
        if success && broken {
            return Err(PlatformError::new(
                PlatformErrorKind::CaptureBroken,
                format!(
                    "VM `{ctx_vm}`: the capture broke while it was read (copy-before-write ran out \
                     of scratch space or failed), so it was released as a failure: no change is \
                     lost, and the next incremental covers this period too"
                ),
            ));
        }
        Ok(report)
    }
}
