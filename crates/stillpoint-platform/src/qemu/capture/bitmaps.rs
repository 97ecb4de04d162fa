//! The dirty-bitmap transactions of a capture, as pure functions of its plan (see the
//! rotation table in `crate::capture` and docs/capture.md).

use std::collections::BTreeMap;

use stillpoint_qmp::{Action, BitmapRef};

use crate::capture::{CaptureMode, FullReason, PlannedDisk};

/// How the bitmaps are left when a capture is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The capture never reached its instant: no bitmap was changed.
    Untouched,
    Success,
    Failure,
}

/// The `start` transaction: per disk, the new bitmap starts recording and the parent of an
/// incremental stops — at the same instant for every disk. The new bitmap is persistent only
/// where the image can store it (qcow2 v3): QEMU refuses `persistent` on a raw or qcow2 v2
/// node, and that refusal would fail the whole transaction. On those images it lives in
/// QEMU's memory, exact for as long as the process runs.
pub fn rotation(disks: &[PlannedDisk]) -> Vec<Action> {
    let mut actions = Vec::new();
    for disk in disks {
        let node = &disk.disk.node;
        actions.push(Action::bitmap_add(
            node,
            &disk.new_bitmap,
            disk.disk.persistent_bitmaps,
        ));
        if let CaptureMode::Incremental { parent_bitmap } = &disk.mode {
            actions.push(Action::bitmap_disable(node, parent_bitmap));
        }
    }
    actions
}

/// The release transaction and, per disk id, the bitmap that afterwards records every change
/// since the last successful capture's instant (`None`: there is none, the next is full).
pub fn settlement(
    disks: &[PlannedDisk],
    settle: Settle,
) -> (Vec<Action>, BTreeMap<String, Option<String>>) {
    let mut actions = Vec::new();
    let mut tracking = BTreeMap::new();
    for disk in disks {
        let node = &disk.disk.node;
        let new = &disk.new_bitmap;
        let bitmap = match (&disk.mode, settle) {
            (CaptureMode::Incremental { parent_bitmap }, Settle::Untouched) => {
                Some(parent_bitmap.clone())
            }
            (CaptureMode::Full { .. }, Settle::Untouched) => None,
            (_, Settle::Success) => {
                // The new bitmap now tracks every change since this capture: every older
                // stillpoint bitmap on the disk is superseded (the parent, a parent that could
                // not serve a resized disk, the bitmap a full backup started over from). Left
                // alone they would record every guest write forever. Busy ones belong to a
                // running operation, and those `prepare` removed are gone already.
                for old in superseded(disk) {
                    actions.push(Action::bitmap_remove(node, old));
                }
                Some(new.clone())
            }
            (CaptureMode::Incremental { parent_bitmap }, Settle::Failure) => {
                // Into the parent, not the other way round: the name the last manifest
                // recorded stays valid and now covers both periods.
                actions.push(Action::bitmap_merge(
                    node,
                    parent_bitmap,
                    vec![BitmapRef::Local(new.clone())],
                ));
                actions.push(Action::bitmap_enable(node, parent_bitmap));
                actions.push(Action::bitmap_remove(node, new));
                Some(parent_bitmap.clone())
            }
            (CaptureMode::Full { .. }, Settle::Failure) => {
                actions.push(Action::bitmap_remove(node, new));
                None
            }
        };
        tracking.insert(disk.disk.id.clone(), bitmap);
    }
    (actions, tracking)
}

/// The stillpoint bitmaps a successful capture of `disk` supersedes.
fn superseded(disk: &PlannedDisk) -> Vec<&str> {
    let mut names: Vec<&str> = disk
        .disk
        .bitmaps
        .iter()
        .filter(|b| b.name != disk.new_bitmap && !b.busy)
        .filter(|b| !disk.removed_bitmaps.contains(&b.name))
        .map(|b| b.name.as_str())
        .collect();
    // The parent is listed even when the inventory missed it (it was read before `prepare`).
    if let CaptureMode::Incremental { parent_bitmap } = &disk.mode
        && !names.contains(&parent_bitmap.as_str())
    {
        names.push(parent_bitmap);
    }
    if let CaptureMode::Full {
        reason: FullReason::DiskResized { bitmap, .. },
    } = &disk.mode
        && !names.contains(&bitmap.as_str())
    {
        names.push(bitmap);
    }
    names
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::capture::DiskInfo;

    fn planned(id: &str, node: &str, mode: CaptureMode) -> PlannedDisk {
        PlannedDisk {
            disk: DiskInfo {
                id: id.into(),
                node: node.into(),
                device: format!("/machine/peripheral/{id}/virtio-backend"),
                virtual_size: 64 << 20,
                image: format!("/vm/{node}.qcow2"),
                format: "qcow2".into(),
                format_version: Some("1.1".into()),
                persistent_bitmaps: true,
                bitmaps: vec![],
            },
            mode,
            new_bitmap: "N".into(),
            removed_bitmaps: vec![],
            scratch: "/scratch/x.qcow2".into(),
        }
    }

    fn incremental() -> CaptureMode {
        CaptureMode::Incremental {
            parent_bitmap: "P".into(),
        }
    }

    fn full(reason: FullReason) -> CaptureMode {
        CaptureMode::Full { reason }
    }

    fn wire(actions: &[Action]) -> Value {
        serde_json::to_value(actions).unwrap()
    }

    /// `planned` on an image that cannot store bitmaps (raw, qcow2 v2).
    fn memory_only(
        id: &str,
        node: &str,
        format: &str,
        version: Option<&str>,
        mode: CaptureMode,
    ) -> PlannedDisk {
        let mut disk = planned(id, node, mode);
        disk.disk.format = format.into();
        disk.disk.format_version = version.map(Into::into);
        disk.disk.persistent_bitmaps = false;
        disk
    }

    #[test]
    fn the_start_transaction_adds_every_new_bitmap_and_stops_every_parent() {
        let disks = [
            planned("vd0", "disk0", incremental()),
            memory_only("vd1", "disk1", "raw", None, full(FullReason::NoParent)),
            memory_only("vd2", "disk2", "qcow2", Some("0.10"), incremental()),
        ];
        // Persistent only on the qcow2 v3 image; the parent of an incremental on a raw or
        // qcow2 v2 image (itself in memory) stops like any other.
        assert_eq!(
            wire(&rotation(&disks)),
            json!([
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": "N", "persistent": true}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "P"}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk1", "name": "N", "persistent": false}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk2", "name": "N", "persistent": false}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk2", "name": "P"}},
            ])
        );
    }

    #[test]
    fn memory_only_bitmaps_settle_like_persistent_ones() {
        let disks = [memory_only("vd0", "disk0", "raw", None, incremental())];
        let (actions, tracking) = settlement(&disks, Settle::Success);
        assert_eq!(
            wire(&actions),
            json!([{"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "P"}}])
        );
        assert_eq!(tracking["vd0"].as_deref(), Some("N"));
        let (actions, tracking) = settlement(&disks, Settle::Failure);
        assert_eq!(
            wire(&actions),
            json!([
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "disk0", "target": "P", "bitmaps": ["N"]}},
                {"type": "block-dirty-bitmap-enable", "data": {"node": "disk0", "name": "P"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "N"}},
            ])
        );
        assert_eq!(tracking["vd0"].as_deref(), Some("P"));
    }

    #[test]
    fn success_keeps_the_new_bitmap_failure_folds_it_back_into_the_parent() {
        let disks = [
            planned("vd0", "disk0", incremental()),
            planned("vd1", "disk1", full(FullReason::NoParent)),
        ];
        let (actions, tracking) = settlement(&disks, Settle::Success);
        assert_eq!(
            wire(&actions),
            json!([{"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "P"}}])
        );
        assert_eq!(tracking["vd0"].as_deref(), Some("N"));
        assert_eq!(tracking["vd1"].as_deref(), Some("N"));

        let (actions, tracking) = settlement(&disks, Settle::Failure);
        assert_eq!(
            wire(&actions),
            json!([
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "disk0", "target": "P", "bitmaps": ["N"]}},
                {"type": "block-dirty-bitmap-enable", "data": {"node": "disk0", "name": "P"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "N"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "disk1", "name": "N"}},
            ])
        );
        assert_eq!(tracking["vd0"].as_deref(), Some("P"));
        assert_eq!(tracking["vd1"], None);

        let (actions, tracking) = settlement(&disks, Settle::Untouched);
        assert!(actions.is_empty());
        assert_eq!(tracking["vd0"].as_deref(), Some("P"));
    }

    #[test]
    fn a_superseded_parent_goes_on_success_a_foreign_use_is_left_alone() {
        let resized = planned(
            "vd0",
            "disk0",
            full(FullReason::DiskResized {
                bitmap: "P".into(),
                was: 1,
                now: 2,
            }),
        );
        let busy = planned(
            "vd1",
            "disk1",
            full(FullReason::BitmapBusy { bitmap: "Q".into() }),
        );
        let (actions, _) = settlement(&[resized.clone(), busy.clone()], Settle::Success);
        assert_eq!(
            wire(&actions),
            json!([{"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "P"}}])
        );
        let (actions, _) = settlement(&[resized, busy], Settle::Failure);
        assert_eq!(
            wire(&actions),
            json!([
                {"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "N"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "disk1", "name": "N"}},
            ])
        );
    }

    fn health(name: &str, busy: bool) -> crate::capture::BitmapHealth {
        crate::capture::BitmapHealth {
            name: name.into(),
            recording: true,
            inconsistent: false,
            persistent: true,
            busy,
            count: 0,
            granularity: 65536,
        }
    }

    #[test]
    fn a_successful_capture_removes_every_superseded_stillpoint_bitmap_but_busy_ones() {
        // A full backup (e.g. --full, or into a new repository) over a disk that still has
        // the bitmap of an earlier chain, one taken by a running operation, one `prepare`
        // removed already (inconsistent), and the new one.
        let mut disk = planned("vd0", "disk0", full(FullReason::NoParent));
        disk.disk.bitmaps = vec![
            health("OLD", false),
            health("BUSY", true),
            health("GONE", false),
            health("N", false),
        ];
        disk.removed_bitmaps = vec!["GONE".into()];
        let (actions, tracking) = settlement(std::slice::from_ref(&disk), Settle::Success);
        assert_eq!(
            wire(&actions),
            json!([{"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "OLD"}}])
        );
        assert_eq!(tracking["vd0"].as_deref(), Some("N"));
        // A failed full capture leaves the others as they were and drops only its own.
        let (actions, tracking) = settlement(&[disk], Settle::Failure);
        assert_eq!(
            wire(&actions),
            json!([{"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "N"}}])
        );
        assert_eq!(tracking["vd0"], None);
    }
}
