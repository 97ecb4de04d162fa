//! QEMU's block state as a capture sees it, read in one go, and the VM's disks found in it
//! (pure, so it is unit-tested against replies recorded from QEMU 7.2).

use stillpoint_qmp::{BlockExportInfo, BlockInfo, BlockNodeInfo, Qmp, StatusInfo};

use crate::capture::{BITMAP_PREFIX, BitmapHealth, DiskInfo};
use crate::qemu::capture::names;
use crate::qemu::vm::device_of;

/// What `query-status`, `query-block`, `query-named-block-nodes` and `query-block-exports`
/// said, together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    pub status: StatusInfo,
    pub devices: Vec<BlockInfo>,
    pub nodes: Vec<BlockNodeInfo>,
    pub exports: Vec<BlockExportInfo>,
}

impl BlockState {
    /// Reads the state (the four queries are pipelined on the one monitor connection).
    pub async fn query(qmp: &Qmp) -> stillpoint_qmp::Result<Self> {
        let (status, devices, nodes, exports) = tokio::try_join!(
            qmp.query_status(),
            qmp.query_block(),
            qmp.query_named_block_nodes(),
            qmp.query_block_exports(),
        )?;
        Ok(Self {
            status,
            devices,
            nodes,
            exports,
        })
    }

    pub fn node(&self, name: &str) -> Option<&BlockNodeInfo> {
        self.nodes.iter().find(|n| n.node_name == name)
    }
}

/// One device that carries a writable disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDisk {
    pub info: DiskInfo,
    /// The node attached to the device now: the disk node, or a capture's filter over it.
    pub attached: String,
}

/// The writable disks of the VM, in QEMU's device order. A device whose root node is a
/// capture's filter is reported with the disk node beneath it. Read-only devices (CD-ROMs)
/// and empty drives are not disks to back up.
pub fn device_disks(state: &BlockState) -> Vec<DeviceDisk> {
    state
        .devices
        .iter()
        .filter_map(|device| {
            let qdev = device.qdev.as_deref()?;
            let inserted = device.inserted.as_ref()?;
            if inserted.ro {
                return None;
            }
            let attached = inserted.node_name.clone();
            let disk_node = names::disk_node_of(&attached, names::FILTER)
                .unwrap_or(&attached)
                .to_string();
            let node = state.node(&disk_node).unwrap_or(inserted);
            // The same id the rest of the driver uses (`DiskIdentity`), so the engine can
            // match captured disks with the filesystems a freeze covered.
            let (id, _) = device_of(qdev);
            Some(DeviceDisk {
                info: DiskInfo {
                    id,
                    node: disk_node.clone(),
                    device: qdev.to_string(),
                    virtual_size: node.image.virtual_size,
                    image: node.file.clone(),
                    format: node.drv.clone(),
                    bitmaps: stillpoint_bitmaps(node),
                },
                attached,
            })
        })
        .collect()
}

/// The bitmaps of `node` that stillpoint made.
pub fn stillpoint_bitmaps(node: &BlockNodeInfo) -> Vec<BitmapHealth> {
    node.dirty_bitmaps
        .iter()
        .filter_map(|b| {
            let name = b.name.as_deref()?;
            name.starts_with(BITMAP_PREFIX).then(|| BitmapHealth {
                name: name.to_string(),
                recording: b.recording,
                inconsistent: b.inconsistent,
                persistent: b.persistent,
                busy: b.busy,
                count: b.count,
                granularity: b.granularity,
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! QEMU 7.2.22 replies (trimmed to the fields read), for building states in unit tests.
    use serde_json::{Value, json};
    use stillpoint_qmp::{BlockExportInfo, BlockInfo, BlockNodeInfo, StatusInfo};

    use super::BlockState;

    pub fn status(status: &str) -> StatusInfo {
        serde_json::from_value(json!({"status": status, "singlestep": false,
                                      "running": status == "running"}))
        .unwrap()
    }

    /// A `query-named-block-nodes` entry; `bitmaps` as QEMU lists them.
    pub fn node(name: &str, drv: &str, file: &str, bitmaps: Value) -> BlockNodeInfo {
        serde_json::from_value(json!({
            "iops_rd": 0, "detect_zeroes": "off",
            "image": {"virtual-size": 268435456, "filename": file, "cluster-size": 65536,
                      "format": drv, "actual-size": 200704, "dirty-flag": false},
            "ro": false, "node-name": name, "backing_file_depth": 0, "drv": drv,
            "dirty-bitmaps": bitmaps, "encrypted": false, "file": file
        }))
        .unwrap()
    }

    /// A persistent bitmap as QEMU reports it.
    pub fn bitmap(name: &str, recording: bool, inconsistent: bool) -> Value {
        let mut b = json!({"name": name, "recording": recording, "persistent": true,
                           "busy": false, "granularity": 65536, "count": 131072});
        if inconsistent {
            b["inconsistent"] = json!(true);
        }
        b
    }

    /// A `query-block` entry of a virtio-blk device `id` with `attached` as its root node.
    pub fn device(id: &str, attached: &BlockNodeInfo) -> BlockInfo {
        let inserted = json!({
            "iops_rd": 0, "detect_zeroes": "off",
            "image": {"virtual-size": attached.image.virtual_size,
                      "filename": attached.file, "format": attached.drv},
            "ro": attached.ro, "node-name": attached.node_name, "backing_file_depth": 0,
            "drv": attached.drv, "encrypted": false, "file": attached.file
        });
        serde_json::from_value(json!({
            "io-status": "ok", "device": "", "locked": false, "removable": false,
            "inserted": inserted,
            "qdev": format!("/machine/peripheral/{id}/virtio-backend"), "type": "unknown"
        }))
        .unwrap()
    }

    pub fn export(id: &str, node: &str) -> BlockExportInfo {
        serde_json::from_value(json!({"type": "nbd", "id": id, "node-name": node,
                                      "shutting-down": false}))
        .unwrap()
    }

    /// A VM with disk0 on vd0 and disk1 on vd1, nothing of a capture in it.
    pub fn clean_vm() -> BlockState {
        let disk0 = node("disk0", "qcow2", "/vm/disk0.qcow2", json!([]));
        let disk1 = node("disk1", "qcow2", "/vm/disk1.qcow2", json!([]));
        BlockState {
            status: status("running"),
            devices: vec![device("vd0", &disk0), device("vd1", &disk1)],
            nodes: vec![
                disk0,
                node("#block010", "file", "/vm/disk0.qcow2", json!([])),
                disk1,
                node("#block210", "file", "/vm/disk1.qcow2", json!([])),
            ],
            exports: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::fixtures::*;
    use super::*;

    #[test]
    fn disks_are_devices_with_writable_media_and_only_stillpoint_bitmaps_are_listed() {
        let mut state = clean_vm();
        state.nodes[0] = node(
            "disk0",
            "qcow2",
            "/vm/disk0.qcow2",
            json!([
                bitmap("stillpoint-1764158400123-deadbeef", true, false),
                bitmap("user-bitmap", true, false),
                // QEMU's internal bitmaps have no name.
                {"recording": false, "persistent": false, "busy": false,
                 "granularity": 65536, "count": 0}
            ]),
        );
        let mut cdrom = node("cd0", "raw", "/iso/debian.iso", json!([]));
        cdrom.ro = true;
        state.devices.push(device("ide0-cd0", &cdrom));
        let disks = device_disks(&state);
        assert_eq!(disks.len(), 2);
        let vd0 = &disks[0];
        assert_eq!(
            (
                vd0.info.id.as_str(),
                vd0.info.node.as_str(),
                vd0.attached.as_str()
            ),
            ("vd0", "disk0", "disk0")
        );
        assert_eq!(vd0.info.device, "/machine/peripheral/vd0/virtio-backend");
        assert_eq!(vd0.info.virtual_size, 256 << 20);
        assert_eq!(vd0.info.image, "/vm/disk0.qcow2");
        assert_eq!(vd0.info.format, "qcow2");
        let names: Vec<&str> = vd0.info.bitmaps.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["stillpoint-1764158400123-deadbeef"]);
        assert_eq!(vd0.info.bitmaps[0].count, 131072);
    }

    #[test]
    fn a_device_left_on_a_capture_filter_is_reported_with_its_disk_node() {
        let mut state = clean_vm();
        let filter = node(
            "sp-cbw-disk1",
            "copy-before-write",
            "/vm/disk1.qcow2",
            json!([]),
        );
        state.devices[1] = device("vd1", &filter);
        state.nodes.push(filter);
        let disks = device_disks(&state);
        assert_eq!(disks[1].info.node, "disk1");
        assert_eq!(disks[1].info.format, "qcow2");
        assert_eq!(disks[1].attached, "sp-cbw-disk1");
    }
}
