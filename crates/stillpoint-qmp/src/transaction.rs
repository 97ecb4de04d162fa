//! Builders for `transaction` actions.
//!
//! In QEMU 7.2 every bitmap rotation step and the start of a fleecing job can
//! be one atomic `transaction`; `blockdev-add` and `qom-set` cannot.

use serde::Serialize;
use serde_json::{Value, json};

use crate::commands::BitmapRef;

/// One action of a `transaction`: `{"type": …, "data": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Action {
    #[serde(rename = "type")]
    action_type: &'static str,
    data: Value,
}

/// `sync` mode of a backup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Copy only what the guest is about to overwrite (copy-before-write):
    /// the target becomes a point-in-time view. This is fleecing.
    None,
    /// Copy everything.
    Full,
    /// Copy what a bitmap marks.
    Bitmap,
    /// Copy what is allocated in the top layer.
    Top,
}

/// `blockdev-backup` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// Job id.
    pub job_id: String,
    /// Source node (or device).
    pub device: String,
    /// Target node.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// `false` keeps the concluded job until `job-dismiss`, so its end state
    /// can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Names the job's copy-before-write filter node, so a `snapshot-access`
    /// node can be put on top of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
}

impl BlockdevBackup {
    /// A fleecing job: `sync: none`, `auto-dismiss: false`.
    pub fn fleece(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        BlockdevBackup {
            job_id: job_id.into(),
            device: device.into(),
            target: target.into(),
            sync: SyncMode::None,
            auto_dismiss: Some(false),
            filter_node_name: None,
        }
    }

    /// Names the job's filter node.
    pub fn filter_node_name(mut self, name: impl Into<String>) -> Self {
        self.filter_node_name = Some(name.into());
        self
    }
}

impl Action {
    /// `block-dirty-bitmap-add` of an enabled bitmap with QEMU's default
    /// granularity (the image's cluster size, 64 KiB for qcow2 defaults).
    pub fn bitmap_add(node: &str, name: &str, persistent: bool) -> Action {
        Action {
            action_type: "block-dirty-bitmap-add",
            data: json!({"node": node, "name": name, "persistent": persistent}),
        }
    }

    /// `block-dirty-bitmap-add` with an explicit granularity (a power of two).
    pub fn bitmap_add_with_granularity(
        node: &str,
        name: &str,
        persistent: bool,
        granularity: u32,
    ) -> Action {
        Action {
            action_type: "block-dirty-bitmap-add",
            data: json!({"node": node, "name": name, "persistent": persistent,
                         "granularity": granularity}),
        }
    }

    /// `block-dirty-bitmap-disable`: stop recording (freeze the old bitmap).
    pub fn bitmap_disable(node: &str, name: &str) -> Action {
        Self::bitmap_op("block-dirty-bitmap-disable", node, name)
    }

    /// `block-dirty-bitmap-enable`.
    pub fn bitmap_enable(node: &str, name: &str) -> Action {
        Self::bitmap_op("block-dirty-bitmap-enable", node, name)
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(node: &str, name: &str) -> Action {
        Self::bitmap_op("block-dirty-bitmap-remove", node, name)
    }

    /// `block-dirty-bitmap-clear`.
    pub fn bitmap_clear(node: &str, name: &str) -> Action {
        Self::bitmap_op("block-dirty-bitmap-clear", node, name)
    }

    /// `block-dirty-bitmap-merge`: OR `sources` into `target` (on `node`).
    pub fn bitmap_merge(node: &str, target: &str, sources: Vec<BitmapRef>) -> Action {
        Action {
            action_type: "block-dirty-bitmap-merge",
            data: json!({"node": node, "target": target, "bitmaps": sources}),
        }
    }

    /// `blockdev-backup`.
    pub fn blockdev_backup(backup: BlockdevBackup) -> Action {
        Action {
            action_type: "blockdev-backup",
            data: serde_json::to_value(backup).expect("BlockdevBackup serializes"),
        }
    }

    fn bitmap_op(action_type: &'static str, node: &str, name: &str) -> Action {
        Action {
            action_type,
            data: json!({"node": node, "name": name}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_rotation_and_backup_job_serialize_as_qemu_7_2_takes_them() {
        // The wire shape QEMU 7.2 accepted when it was verified (docs/capture.md).
        let actions = vec![
            Action::bitmap_add("disk1", "b2", true),
            Action::bitmap_disable("disk1", "b1"),
            Action::blockdev_backup(BlockdevBackup::fleece("fleece1", "disk1", "fl1")),
        ];
        assert_eq!(
            serde_json::to_value(&actions).unwrap(),
            json!([
                {"type":"block-dirty-bitmap-add","data":{"node":"disk1","name":"b2","persistent":true}},
                {"type":"block-dirty-bitmap-disable","data":{"node":"disk1","name":"b1"}},
                {"type":"blockdev-backup","data":{"device":"disk1","target":"fl1","sync":"none",
                                                  "job-id":"fleece1","auto-dismiss":false}}
            ])
        );
    }

    #[test]
    fn merge_and_filter_node_serialize() {
        let merge = Action::bitmap_merge("disk1", "b2", vec![BitmapRef::Local("b1".into())]);
        assert_eq!(
            serde_json::to_value(&merge).unwrap(),
            json!({"type":"block-dirty-bitmap-merge","data":{"node":"disk1","target":"b2","bitmaps":["b1"]}})
        );
        let b = BlockdevBackup::fleece("j", "d", "t").filter_node_name("cbwjob1");
        assert_eq!(
            serde_json::to_value(Action::blockdev_backup(b)).unwrap()["data"]["filter-node-name"],
            json!("cbwjob1")
        );
    }
}
