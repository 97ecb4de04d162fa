//! Taking a capture apart again — at its end, and after a stillpoint that died mid-capture.
//!
//! [`plan_cleanup`] is a pure function of QEMU's [`BlockState`]: it finds everything a
//! capture adds (by the names of [`names`]) and returns the steps that remove it, in the one
//! order QEMU accepts (docs/capture.md, "Taking it apart"):
//!
//! 1. resume the VM, if a capture paused it (recovery only; first, to end the pause soonest)
//! 2. delete the exports (`mode: hard`, then wait for `BLOCK_EXPORT_DELETED`) — a filter is
//!    never removed while its view is still read
//! 3. stop the NBD server
//! 4. delete the `snapshot-access` nodes
//! 5. give each device its disk node back (`qom-set drive`) — only where the filter is
//!    attached: setting the node already attached aborts QEMU
//! 6. delete the filters, then their scratch nodes, then the scratch files
//! 7. delete the pause marker
//! 8. reconcile the bitmaps (recovery only): a disabled stillpoint bitmap is the parent of an
//!    interrupted capture; the newest enabled one was created at that capture's instant. The
//!    new one is merged into the parent, the parent records again, the new one is removed —
//!    exactly what a failed capture's `finish` does. A disabled bitmap with no newer partner
//!    has missed writes for good and is removed.
//!
//! [`run_cleanup`] carries a plan out. Steps whose object is already gone count as done, and a
//! failed step does not stop the ones after it (each later step re-checks what it touches), so
//! a plan may be run again after a partial failure.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use stillpoint_qmp::{Action, BitmapRef, ExportRemoveMode, Qmp};
use tracing::{debug, warn};

use crate::capture::{BITMAP_PREFIX, bitmap_created_ms};
use crate::qemu::capture::names;
use crate::qemu::capture::state::BlockState;

/// One step of taking a capture apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupStep {
    /// `cont`: the VM is paused and the pause marker says a capture paused it.
    ResumeVm,
    /// `block-export-del` (hard) and wait until it is gone.
    DeleteExport { id: String },
    /// `nbd-server-stop`.
    StopNbdServer,
    /// `qom-set <device> drive <node>`: give the device its disk node back.
    ReattachDevice { device: String, node: String },
    /// `blockdev-del`.
    DeleteNode { node: String },
    /// Delete a scratch file on the host.
    RemoveFile { path: PathBuf },
    /// One transaction: merge `from` into each of `into`, enable them, remove `from`.
    ReconcileBitmaps {
        node: String,
        into: Vec<String>,
        from: String,
    },
    /// `block-dirty-bitmap-remove`.
    RemoveBitmap { node: String, bitmap: String },
}

impl fmt::Display for CleanupStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CleanupStep::ResumeVm => write!(f, "resume the VM a capture left paused"),
            CleanupStep::DeleteExport { id } => write!(f, "delete the NBD export `{id}`"),
            CleanupStep::StopNbdServer => write!(f, "stop the NBD server"),
            CleanupStep::ReattachDevice { device, node } => {
                write!(f, "give device {device} its disk node `{node}` back")
            }
            CleanupStep::DeleteNode { node } => write!(f, "delete the block node `{node}`"),
            CleanupStep::RemoveFile { path } => {
                write!(f, "delete the scratch file {}", path.display())
            }
            CleanupStep::ReconcileBitmaps { node, into, from } => write!(
                f,
                "merge dirty bitmap `{from}` into `{}` on node `{node}`, re-enable, remove `{from}`",
                into.join("`, `")
            ),
            CleanupStep::RemoveBitmap { node, bitmap } => write!(
                f,
                "remove dirty bitmap `{bitmap}` from node `{node}` (it stopped recording outside a capture)"
            ),
        }
    }
}

/// Which cleanup to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything any interrupted capture may have left, bitmaps and a paused VM included.
    Recovery,
    /// The end of one capture that this process ran: its nodes and exports; bitmaps are
    /// settled by the caller, who knows the outcome.
    Release {
        /// This capture started the NBD server (so it stops it).
        server_started: bool,
    },
}

/// The steps that take apart every capture node, export and (for recovery) bitmap leftover in
/// `state`, in the order QEMU accepts. Empty when there is nothing to do.
pub fn plan_cleanup(state: &BlockState, scope: Scope) -> Vec<CleanupStep> {
    let mut steps = Vec::new();
    let has_node = |prefix: &str| state.nodes.iter().any(|n| n.node_name.starts_with(prefix));
    let marker = state.node(names::PAUSE_MARKER).is_some();
    if scope == Scope::Recovery && marker && state.status.status == "paused" {
        steps.push(CleanupStep::ResumeVm);
    }
    let (ours, foreign): (Vec<_>, Vec<_>) = state
        .exports
        .iter()
        .partition(|e| e.id.starts_with(names::EXPORT));
    for export in &ours {
        steps.push(CleanupStep::DeleteExport {
            id: export.id.clone(),
        });
    }
    let stop_server = match scope {
        Scope::Release { server_started } => server_started,
        // QEMU has one NBD server and no query for it: stop it when a capture's leftovers are
        // there and nobody else exports anything through it.
        Scope::Recovery => {
            foreign.is_empty()
                && (!ours.is_empty() || has_node(names::SNAPSHOT) || has_node(names::FILTER))
        }
    };
    if stop_server {
        steps.push(CleanupStep::StopNbdServer);
    }
    for node in &state.nodes {
        if node.node_name.starts_with(names::SNAPSHOT) {
            steps.push(CleanupStep::DeleteNode {
                node: node.node_name.clone(),
            });
        }
    }
    for device in &state.devices {
        let (Some(qdev), Some(inserted)) = (&device.qdev, &device.inserted) else {
            continue;
        };
        if let Some(node) = names::disk_node_of(&inserted.node_name, names::FILTER) {
            steps.push(CleanupStep::ReattachDevice {
                device: qdev.clone(),
                node: node.to_string(),
            });
        }
    }
    for prefix in [names::FILTER, names::SCRATCH] {
        for node in &state.nodes {
            if node.node_name.starts_with(prefix) {
                steps.push(CleanupStep::DeleteNode {
                    node: node.node_name.clone(),
                });
            }
        }
    }
    for node in &state.nodes {
        let path = PathBuf::from(&node.file);
        if node.node_name.starts_with(names::SCRATCH) && names::is_scratch_file(&path) {
            steps.push(CleanupStep::RemoveFile { path });
        }
    }
    if marker {
        steps.push(CleanupStep::DeleteNode {
            node: names::PAUSE_MARKER.to_string(),
        });
    }
    if scope == Scope::Recovery {
        steps.extend(plan_bitmap_recovery(state));
    }
    steps
}

/// Step 8 of the module doc, per node. Inconsistent bitmaps are left alone here (they cannot
/// be merged); the mode decision reports and removes them.
fn plan_bitmap_recovery(state: &BlockState) -> Vec<CleanupStep> {
    let mut steps = Vec::new();
    for node in &state.nodes {
        let ours: Vec<_> = node
            .dirty_bitmaps
            .iter()
            .filter(|b| !b.inconsistent)
            .filter_map(|b| {
                let name = b.name.as_deref()?;
                name.starts_with(BITMAP_PREFIX)
                    .then_some((name, b.recording))
            })
            .collect();
        let newest_recording = ours
            .iter()
            .filter(|(_, recording)| *recording)
            .filter_map(|(name, _)| Some((bitmap_created_ms(name)?, *name)))
            .max();
        let mut into = Vec::new();
        for (name, recording) in &ours {
            if *recording {
                continue;
            }
            let created = bitmap_created_ms(name);
            match newest_recording {
                Some((newest, from)) if created.is_some_and(|c| c <= newest) && from != *name => {
                    into.push(name.to_string())
                }
                _ => steps.push(CleanupStep::RemoveBitmap {
                    node: node.node_name.clone(),
                    bitmap: name.to_string(),
                }),
            }
        }
        if let (false, Some((_, from))) = (into.is_empty(), newest_recording) {
            steps.push(CleanupStep::ReconcileBitmaps {
                node: node.node_name.clone(),
                into,
                from: from.to_string(),
            });
        }
    }
    steps
}

/// A step that failed, and why.
#[derive(Debug)]
pub struct StepFailure {
    pub step: CleanupStep,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not {}: {}", self.step, self.error)?;
        let mut source = self.error.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// QEMU's words for "that object does not exist (any more)": the step's work is done.
fn already_gone(error: &stillpoint_qmp::Error) -> bool {
    error.qemu_desc().is_some_and(|desc| {
        desc.contains("not found")
            || desc.contains("Failed to find")
            || desc.contains("not running")
    })
}

/// Carries out `steps` in order; returns the steps that failed. `timeout` bounds each wait
/// for an export to go.
pub async fn run_cleanup(qmp: &Qmp, steps: &[CleanupStep], timeout: Duration) -> Vec<StepFailure> {
    let mut failures = Vec::new();
    for step in steps {
        debug!(%step, "capture cleanup");
        if let Err(error) = run_step(qmp, step, timeout).await {
            let failure = StepFailure {
                step: step.clone(),
                error,
            };
            warn!(%failure, "capture cleanup step failed");
            failures.push(failure);
        }
    }
    failures
}

async fn run_step(
    qmp: &Qmp,
    step: &CleanupStep,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tolerate = |result: stillpoint_qmp::Result<()>| match result {
        Err(error) if already_gone(&error) => Ok(()),
        other => other,
    };
    match step {
        CleanupStep::ResumeVm => {
            // Re-checked: resume only a VM that is still paused.
            if qmp.query_status().await?.status == "paused" {
                qmp.cont().await?;
            }
        }
        CleanupStep::DeleteExport { id } => tolerate(
            qmp.block_export_del_and_wait(id, ExportRemoveMode::Hard, timeout)
                .await
                .map(drop),
        )?,
        CleanupStep::StopNbdServer => tolerate(qmp.nbd_server_stop().await)?,
        CleanupStep::ReattachDevice { device, node } => {
            // Setting the node that is already attached aborts QEMU: look first.
            let attached = qmp.qom_get(device, "drive").await?;
            if attached.as_str() == Some(names::filter(node).as_str()) {
                qmp.qom_set(device, "drive", json!(node)).await?;
            }
        }
        CleanupStep::DeleteNode { node } => tolerate(qmp.blockdev_del(node).await)?,
        CleanupStep::RemoveFile { path } => match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        },
        CleanupStep::ReconcileBitmaps { node, into, from } => {
            let mut actions = Vec::new();
            for target in into {
                actions.push(Action::bitmap_merge(
                    node,
                    target,
                    vec![BitmapRef::Local(from.clone())],
                ));
                actions.push(Action::bitmap_enable(node, target));
            }
            actions.push(Action::bitmap_remove(node, from));
            qmp.transaction(actions).await?;
        }
        CleanupStep::RemoveBitmap { node, bitmap } => tolerate(
            qmp.transaction(vec![Action::bitmap_remove(node, bitmap)])
                .await,
        )?,
    }
    Ok(())
}

/// What [`resume_if_paused_by_capture`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// The VM was paused by a capture and is running again.
    Resumed,
    /// A capture's marker was there but the VM was not paused (QEMU's state is given); the
    /// marker was removed.
    NotPaused { state: String },
    /// No capture had paused the VM; nothing was done.
    NoCaptureMarker,
}

/// For the freeze guardian, once the process that ran a capture is gone: resumes the VM if,
/// and only if, a capture paused it (its pause marker node exists) and it is still paused;
/// then removes the marker. Never resumes a VM a user paused. The monitor takes one client at
/// a time, so call this only after the capturing process has closed its connection.
pub async fn resume_if_paused_by_capture(qmp: &Qmp) -> stillpoint_qmp::Result<ResumeOutcome> {
    let nodes = qmp.query_named_block_nodes().await?;
    if !nodes.iter().any(|n| n.node_name == names::PAUSE_MARKER) {
        return Ok(ResumeOutcome::NoCaptureMarker);
    }
    let status = qmp.query_status().await?;
    let outcome = if status.status == "paused" {
        qmp.cont().await?;
        ResumeOutcome::Resumed
    } else {
        ResumeOutcome::NotPaused {
            state: status.status,
        }
    };
    match qmp.blockdev_del(names::PAUSE_MARKER).await {
        Err(error) if !already_gone(&error) => return Err(error),
        _ => {}
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qemu::capture::state::fixtures::*;

    const OLD: &str = "stillpoint-1764158400000-0000000a";
    const NEW: &str = "stillpoint-1764158460000-0000000b";

    /// disk0/vd0 and disk1/vd1 as a stillpoint killed after `export` leaves them: filters
    /// attached, views exported, the parent bitmap disabled and the new one recording.
    fn killed_after_export() -> BlockState {
        let mut state = clean_vm();
        for (i, disk) in ["disk0", "disk1"].into_iter().enumerate() {
            state.nodes[i * 2] = node(
                disk,
                "qcow2",
                &format!("/vm/{disk}.qcow2"),
                json!([bitmap(NEW, true, false), bitmap(OLD, false, false)]),
            );
            let filter = node(
                &names::filter(disk),
                "copy-before-write",
                &format!("/vm/{disk}.qcow2"),
                json!([]),
            );
            state.devices[i] = device(&format!("vd{i}"), &filter);
            state.nodes.push(filter);
            state.nodes.push(node(
                &names::scratch(disk),
                "qcow2",
                &format!("/scratch/sp-scratch-vm-{disk}-1764158460000-0000000b.qcow2"),
                json!([]),
            ));
            state.nodes.push(node(
                &names::snapshot(disk),
                "snapshot-access",
                &format!("/vm/{disk}.qcow2"),
                json!([]),
            ));
            state
                .exports
                .push(export(&names::export(disk), &names::snapshot(disk)));
        }
        state
    }

    #[test]
    fn a_clean_vm_needs_nothing() {
        assert!(plan_cleanup(&clean_vm(), Scope::Recovery).is_empty());
        assert!(
            plan_cleanup(
                &clean_vm(),
                Scope::Release {
                    server_started: false
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn recovery_after_a_kill_follows_the_reference_order_and_reconciles_bitmaps() {
        let plan = plan_cleanup(&killed_after_export(), Scope::Recovery);
        let del = |node: &str| CleanupStep::DeleteNode { node: node.into() };
        let reattach = |i: usize, node: &str| CleanupStep::ReattachDevice {
            device: format!("/machine/peripheral/vd{i}/virtio-backend"),
            node: node.into(),
        };
        let reconcile = |node: &str| CleanupStep::ReconcileBitmaps {
            node: node.into(),
            into: vec![OLD.into()],
            from: NEW.into(),
        };
        assert_eq!(
            plan,
            vec![
                CleanupStep::DeleteExport {
                    id: "sp-exp-disk0".into()
                },
                CleanupStep::DeleteExport {
                    id: "sp-exp-disk1".into()
                },
                CleanupStep::StopNbdServer,
                del("sp-snap-disk0"),
                del("sp-snap-disk1"),
                reattach(0, "disk0"),
                reattach(1, "disk1"),
                del("sp-cbw-disk0"),
                del("sp-cbw-disk1"),
                del("sp-fl-disk0"),
                del("sp-fl-disk1"),
                CleanupStep::RemoveFile {
                    path: "/scratch/sp-scratch-vm-disk0-1764158460000-0000000b.qcow2".into()
                },
                CleanupStep::RemoveFile {
                    path: "/scratch/sp-scratch-vm-disk1-1764158460000-0000000b.qcow2".into()
                },
                reconcile("disk0"),
                reconcile("disk1"),
            ]
        );
    }

    #[test]
    fn release_leaves_bitmaps_to_the_caller_and_stops_only_its_own_server() {
        let state = killed_after_export();
        let plan = plan_cleanup(
            &state,
            Scope::Release {
                server_started: true,
            },
        );
        assert!(plan.contains(&CleanupStep::StopNbdServer));
        assert!(!plan.iter().any(|s| matches!(
            s,
            CleanupStep::ReconcileBitmaps { .. } | CleanupStep::RemoveBitmap { .. }
        )));
        let plan = plan_cleanup(
            &state,
            Scope::Release {
                server_started: false,
            },
        );
        assert!(!plan.contains(&CleanupStep::StopNbdServer));
    }

    #[test]
    fn a_foreign_export_keeps_the_nbd_server_running() {
        let mut state = killed_after_export();
        state.exports.push(export("user-export", "disk0"));
        let plan = plan_cleanup(&state, Scope::Recovery);
        assert!(!plan.contains(&CleanupStep::StopNbdServer));
        assert!(!plan.contains(&CleanupStep::DeleteExport {
            id: "user-export".into()
        }));
    }

    #[test]
    fn a_vm_paused_by_a_dead_capture_is_resumed_first_a_user_pause_is_kept() {
        let mut state = clean_vm();
        state.status = status("paused");
        assert!(
            plan_cleanup(&state, Scope::Recovery).is_empty(),
            "user pause"
        );
        state.nodes.push(node(
            names::PAUSE_MARKER,
            "null-co",
            "null-co://",
            json!([]),
        ));
        let plan = plan_cleanup(&state, Scope::Recovery);
        assert_eq!(
            plan,
            vec![
                CleanupStep::ResumeVm,
                CleanupStep::DeleteNode {
                    node: names::PAUSE_MARKER.into()
                }
            ]
        );
        // Releasing never resumes: only recovery acts on someone else's pause.
        let plan = plan_cleanup(
            &state,
            Scope::Release {
                server_started: false,
            },
        );
        assert_eq!(
            plan,
            vec![CleanupStep::DeleteNode {
                node: names::PAUSE_MARKER.into()
            }]
        );
        // Running with a stale marker: only the marker goes.
        state.status = status("running");
        assert_eq!(plan_cleanup(&state, Scope::Recovery).len(), 1);
    }

    #[test]
    fn bitmap_recovery_pairs_a_disabled_parent_with_the_newest_recording_bitmap() {
        let other = "stillpoint-1764158300000-0000000c"; // another chain, older than OLD
        let mut state = clean_vm();
        state.nodes[0] = node(
            "disk0",
            "qcow2",
            "/vm/disk0.qcow2",
            json!([
                bitmap(other, true, false),
                bitmap(NEW, true, false),
                bitmap(OLD, false, false),
                bitmap("user-disabled", false, false),
            ]),
        );
        assert_eq!(
            plan_cleanup(&state, Scope::Recovery),
            vec![CleanupStep::ReconcileBitmaps {
                node: "disk0".into(),
                into: vec![OLD.into()],
                from: NEW.into(),
            }]
        );
        // A clean QEMU quit during a capture leaves the same pair, nodes gone: same answer.
        // A disabled bitmap with no newer recording partner missed writes: removed.
        state.nodes[0] = node(
            "disk0",
            "qcow2",
            "/vm/disk0.qcow2",
            json!([bitmap(OLD, false, false), bitmap(other, true, false)]),
        );
        assert_eq!(
            plan_cleanup(&state, Scope::Recovery),
            vec![CleanupStep::RemoveBitmap {
                node: "disk0".into(),
                bitmap: OLD.into()
            }]
        );
        // Inconsistent bitmaps (after a QEMU crash) are not touched here.
        state.nodes[0] = node(
            "disk0",
            "qcow2",
            "/vm/disk0.qcow2",
            json!([bitmap(OLD, false, true), bitmap(NEW, false, true)]),
        );
        assert!(plan_cleanup(&state, Scope::Recovery).is_empty());
    }

    #[test]
    fn steps_read_as_sentences_for_the_report() {
        let step = CleanupStep::ReconcileBitmaps {
            node: "disk0".into(),
            into: vec![OLD.into()],
            from: NEW.into(),
        };
        assert_eq!(
            step.to_string(),
            format!(
                "merge dirty bitmap `{NEW}` into `{OLD}` on node `disk0`, re-enable, remove `{NEW}`"
            )
        );
        let failure = StepFailure {
            step: CleanupStep::StopNbdServer,
            error: "boom".into(),
        };
        assert_eq!(failure.to_string(), "could not stop the NBD server: boom");
    }
}
