//! QEMU's block state as a capture sees it, read in one go, and the VM's disks found in it
//! (pure, so it is unit-tested against replies recorded from QEMU 7.2).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
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
    /// Per qcow2 node name, its `compat` level (`0.10`: version 2, `1.1`: version 3), from the
    /// same `query-named-block-nodes` reply (`image.format-specific.data.compat`).
    pub qcow2_compat: BTreeMap<String, String>,
    pub exports: Vec<BlockExportInfo>,
}

impl BlockState {
    /// Reads the state (the four queries are pipelined on the one monitor connection).
    pub async fn query(qmp: &Qmp) -> stillpoint_qmp::Result<Self> {
        let (status, devices, named, exports) = tokio::try_join!(
            qmp.query_status(),
            qmp.query_block(),
            qmp.execute_as::<Vec<NamedNode>>(
                "query-named-block-nodes",
                Some(json!({"flat": true}))
            ),
            qmp.query_block_exports(),
        )?;
        let mut nodes = Vec::with_capacity(named.len());
        let mut qcow2_compat = BTreeMap::new();
        for node in named {
            if let Some(compat) = node.qcow2_compat {
                qcow2_compat.insert(node.info.node_name.clone(), compat);
            }
            nodes.push(node.info);
        }
        Ok(Self {
            status,
            devices,
            nodes,
            qcow2_compat,
            exports,
        })
    }

    pub fn node(&self, name: &str) -> Option<&BlockNodeInfo> {
        self.nodes.iter().find(|n| n.node_name == name)
    }
}

/// One `query-named-block-nodes` entry: what [`BlockNodeInfo`] reads, and the qcow2 `compat`
/// level, which it does not carry. Read from one reply so both describe the same moment.
struct NamedNode {
    info: BlockNodeInfo,
    qcow2_compat: Option<String>,
}

impl<'de> Deserialize<'de> for NamedNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entry = Value::deserialize(deserializer)?;
        let qcow2_compat = qcow2_compat(&entry).map(str::to_string);
        let info = BlockNodeInfo::deserialize(entry).map_err(serde::de::Error::custom)?;
        Ok(Self { info, qcow2_compat })
    }
}

/// The `compat` level of a qcow2 node's `query-named-block-nodes` entry (`None` for other
/// formats, or if QEMU does not say).
pub fn qcow2_compat(entry: &Value) -> Option<&str> {
    // `image.format-specific` is a union tagged by `type`; qcow2's member is
    // `ImageInfoSpecificQCow2`, whose `compat` is the version as `qemu-img create -o compat`
    // takes it.
    let specific = entry.get("image")?.get("format-specific")?;
    if specific.get("type")?.as_str()? != "qcow2" {
        return None;
    }
    specific.get("data")?.get("compat")?.as_str()
}

/// Whether QEMU can store persistent dirty bitmaps in a node of format `driver` with qcow2
/// compat level `compat`. Only qcow2 implements it (`bdrv_co_can_store_new_dirty_bitmap`),
/// and only from version 3 on ("Cannot store dirty bitmaps in qcow2 v2 files"); a raw node
/// refuses with "Can't store persistent bitmaps to …". A qcow2 node whose version is not
/// known is treated as unable: a bitmap kept in memory costs incrementals after a restart,
/// a refused persistent one fails the capture.
pub fn stores_persistent_bitmaps(driver: &str, compat: Option<&str>) -> bool {
    driver == "qcow2" && compat.is_some_and(|c| c != "0.10")
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
            let compat = state.qcow2_compat.get(&disk_node).cloned();
            Some(DeviceDisk {
                info: DiskInfo {
                    id,
                    node: disk_node.clone(),
                    device: qdev.to_string(),
                    virtual_size: node.image.virtual_size,
                    image: node.file.clone(),
                    format: node.drv.clone(),
                    persistent_bitmaps: stores_persistent_bitmaps(&node.drv, compat.as_deref()),
                    format_version: compat,
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

    /// A VM with disk0 on vd0 and disk1 on vd1 (qcow2 v3), nothing of a capture in it.
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
            qcow2_compat: [("disk0", "1.1"), ("disk1", "1.1")]
                .into_iter()
                .map(|(n, c)| (n.to_string(), c.to_string()))
                .collect(),
            exports: vec![],
        }
    }

    /// `query-named-block-nodes {flat: true}` of QEMU 7.2.22 with a qcow2 v3 (`disk2`), a
    /// qcow2 v2 (`disk1`, `qemu-img create -o compat=0.10`) and a raw (`disk0`) image, each
    /// over its file node; trimmed to the fields read.
    pub fn three_formats_reply() -> Value {
        let image = |format: &str, file: &str, specific: Value| {
            let mut image = json!({"virtual-size": 16777216, "filename": file,
                                   "format": format, "actual-size": 200704, "dirty-flag": false});
            if !specific.is_null() {
                image["format-specific"] = specific;
            }
            image
        };
        let entry = |name: &str, drv: &str, file: &str, specific: Value| {
            json!({"iops_rd": 0, "detect_zeroes": "off", "image": image(drv, file, specific),
                   "ro": false, "node-name": name, "backing_file_depth": 0, "drv": drv,
                   "encrypted": false, "file": file})
        };
        json!([
            // ImageInfoSpecificQCow2 of a version 3 image: compat, and the v3-only fields.
            entry(
                "disk2",
                "qcow2",
                "/vm/v3.qcow2",
                json!({"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
                         "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false,
                         "extended-l2": false}})
            ),
            // A file node has no format-specific facts.
            entry("#block214", "file", "/vm/v3.qcow2", Value::Null),
            // Version 2: `compat` 0.10, no lazy-refcounts / corrupt / extended-l2.
            entry(
                "disk1",
                "qcow2",
                "/vm/v2.qcow2",
                json!({"type": "qcow2", "data": {"compat": "0.10",
                         "compression-type": "zlib", "refcount-bits": 16}})
            ),
            entry("#block175", "file", "/vm/v2.qcow2", Value::Null),
            // Raw has none either.
            entry("disk0", "raw", "/vm/r.img", Value::Null),
            entry("#block098", "file", "/vm/r.img", Value::Null),
        ])
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
    fn the_qcow2_version_is_read_from_the_reply_and_decides_where_bitmaps_can_live() {
        let reply = three_formats_reply();
        let entries = reply.as_array().unwrap();
        let compat: Vec<(&str, Option<&str>)> = entries
            .iter()
            .map(|e| (e["node-name"].as_str().unwrap(), qcow2_compat(e)))
            .collect();
        assert_eq!(
            compat,
            [
                ("disk2", Some("1.1")),
                ("#block214", None),
                ("disk1", Some("0.10")),
                ("#block175", None),
                ("disk0", None),
                ("#block098", None),
            ]
        );
        // Another format's union member is not read as qcow2's.
        let mut other = entries[0].clone();
        other["image"]["format-specific"]["type"] = json!("vmdk");
        assert_eq!(qcow2_compat(&other), None);

        // One reply gives both the node and its version.
        let named: Vec<NamedNode> = serde_json::from_value(reply.clone()).unwrap();
        assert_eq!(named[0].info.node_name, "disk2");
        assert_eq!(named[0].qcow2_compat.as_deref(), Some("1.1"));
        assert_eq!(named[4].info.drv, "raw");

        assert!(stores_persistent_bitmaps("qcow2", Some("1.1")));
        assert!(!stores_persistent_bitmaps("qcow2", Some("0.10")));
        assert!(
            !stores_persistent_bitmaps("qcow2", None),
            "unknown: in memory"
        );
        assert!(!stores_persistent_bitmaps("raw", None));

        // The disks of a VM with these three nodes on vd0..vd2.
        let nodes: Vec<BlockNodeInfo> = named.iter().map(|n| n.info.clone()).collect();
        let by_name = |name: &str| nodes.iter().find(|n| n.node_name == name).unwrap();
        let state = BlockState {
            status: status("running"),
            devices: vec![
                device("vd0", by_name("disk0")),
                device("vd1", by_name("disk1")),
                device("vd2", by_name("disk2")),
            ],
            qcow2_compat: named
                .iter()
                .filter_map(|n| Some((n.info.node_name.clone(), n.qcow2_compat.clone()?)))
                .collect(),
            nodes,
            exports: vec![],
        };
        let disks: Vec<(String, String, Option<String>, bool, String)> = device_disks(&state)
            .into_iter()
            .map(|d| {
                let kind = d.info.image_kind();
                (
                    d.info.id,
                    d.info.format,
                    d.info.format_version,
                    d.info.persistent_bitmaps,
                    kind,
                )
            })
            .collect();
        assert_eq!(
            disks,
            [
                ("vd0".into(), "raw".into(), None, false, "raw".into()),
                (
                    "vd1".into(),
                    "qcow2".into(),
                    Some("0.10".into()),
                    false,
                    "qcow2 v2".into()
                ),
                (
                    "vd2".into(),
                    "qcow2".into(),
                    Some("1.1".into()),
                    true,
                    "qcow2 v3".into()
                ),
            ]
        );
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
