//! Typed helpers for the commands a pull-mode capture needs.
//!
//! Argument types serialize to exactly the QEMU 7.2 wire shape (kebab-case
//! keys, optional keys left out); reply types read only the fields capture
//! uses and ignore the rest, so a newer QEMU that adds fields still parses.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::Qmp;
use crate::codec::Event;
use crate::error::Result;
use crate::events::{JobStatus, JobStatusChange};

/// A dirty bitmap, as `query-named-block-nodes` / `query-block` report it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmapInfo {
    /// Absent for QEMU's internal bitmaps (e.g. a backup job's copy bitmap).
    #[serde(default)]
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u32,
    /// Whether writes are being recorded (enabled).
    pub recording: bool,
    /// In use by an operation (an export, a job); cannot be changed meanwhile.
    pub busy: bool,
    /// Stored in the qcow2 image when it closes.
    pub persistent: bool,
    /// Left `in-use` by an unclean exit; cannot be used, only removed.
    #[serde(default)]
    pub inconsistent: bool,
}

/// Image facts of a block node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageSummary {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The image file name (or a json: pseudo-filename).
    pub filename: String,
    /// The driver of the node, e.g. `qcow2`.
    pub format: String,
    /// Host bytes allocated, when known.
    #[serde(default)]
    pub actual_size: Option<u64>,
}

/// One block node (`BlockDeviceInfo` in the schema), as far as capture needs it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockNodeInfo {
    /// The node name (`#blockNNN` for auto-named nodes).
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The driver, e.g. `qcow2`, `file`, `copy-before-write`.
    pub drv: String,
    /// The file name of the node's image.
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// The backing file name, if the node has one.
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Image facts.
    pub image: ImageSummary,
    /// Bitmaps on this node (named and internal).
    #[serde(default, rename = "dirty-bitmaps")]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

impl BlockNodeInfo {
    /// The named bitmap on this node, if any.
    pub fn bitmap(&self, name: &str) -> Option<&DirtyBitmapInfo> {
        self.dirty_bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
    }
}

/// One block device (`BlockInfo`), as `query-block` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockInfo {
    /// The legacy drive id (empty for `-blockdev` + `-device`).
    pub device: String,
    /// The qdev id or path of the device that owns this block backend.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The root node currently attached, absent for an empty drive.
    #[serde(default)]
    pub inserted: Option<BlockNodeInfo>,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// vCPUs are running.
    pub running: bool,
    /// The run state, e.g. `running`, `paused`, `io-error`, `prelaunch`.
    pub status: String,
}

/// One job from `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Current state.
    pub status: JobStatus,
    /// Progress so far (bytes for block jobs).
    pub current_progress: u64,
    /// Estimated total.
    pub total_progress: u64,
    /// Why the job failed, once it has concluded with an error.
    #[serde(default)]
    pub error: Option<String>,
}

/// One export from `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type, e.g. `nbd`.
    #[serde(rename = "type")]
    pub export_type: String,
    /// Exported node.
    pub node_name: String,
    /// Removal requested, waiting for clients to go.
    pub shutting_down: bool,
}

/// A bitmap named either on the export's own node chain (`Local`, a plain
/// string) or on an explicit node (`{node, name}`, required e.g. for a
/// `snapshot-access` export or an enabled bitmap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BitmapRef {
    /// Found by name on the exported node or its backing chain.
    Local(String),
    /// A bitmap on a named node.
    Node {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
}

impl BitmapRef {
    /// `{node, name}` form.
    pub fn on(node: impl Into<String>, name: impl Into<String>) -> Self {
        BitmapRef::Node {
            node: node.into(),
            name: name.into(),
        }
    }
}

/// How `block-export-del` treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportRemoveMode {
    /// Fail while a client is connected.
    Safe,
    /// Disconnect clients (use this when aborting).
    Hard,
}

/// `block-export-add` of type `nbd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdExport {
    /// Export id (for `block-export-del` and `BLOCK_EXPORT_DELETED`).
    pub id: String,
    /// The node to export.
    pub node_name: String,
    /// NBD export name clients ask for; defaults to the node name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Allow clients to write. Captures are exported read-only.
    pub writable: bool,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME` contexts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<BitmapRef>,
}

impl NbdExport {
    /// A read-only export of `node_name` under id `id`, named like the node.
    pub fn new(id: impl Into<String>, node_name: impl Into<String>) -> Self {
        NbdExport {
            id: id.into(),
            node_name: node_name.into(),
            name: None,
            writable: false,
            bitmaps: Vec::new(),
        }
    }

    /// Sets the NBD export name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Offers these bitmaps as metadata contexts.
    pub fn bitmaps(mut self, bitmaps: Vec<BitmapRef>) -> Self {
        self.bitmaps = bitmaps;
        self
    }

    /// Makes the export writable.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }
}

impl Qmp {
    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute_as("query-status", None).await
    }

    /// `stop`: pause the vCPUs (drains and flushes block I/O).
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resume the vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// `quit`: QEMU closes images (writing persistent bitmaps) and exits.
    /// A connection that closes before the reply counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == &crate::ErrorKind::Closed => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `query-block`: block devices and their attached root nodes.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.execute_as("query-block", None).await
    }

    /// `query-named-block-nodes {flat: true}`: every node, with its bitmaps.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNodeInfo>> {
        self.execute_as("query-named-block-nodes", Some(json!({"flat": true})))
            .await
    }

    /// `blockdev-add` with the options as QEMU takes them, e.g.
    /// `{"driver":"qcow2","node-name":"fl0","file":{…},"backing":"disk0"}`.
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", Some(options)).await.map(drop)
    }

    /// `blockdev-del` of a node added with `blockdev-add`.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", Some(json!({"node-name": node_name})))
            .await
            .map(drop)
    }

    /// `transaction`: all actions happen atomically, or none does.
    pub async fn transaction(&self, actions: Vec<crate::Action>) -> Result<()> {
        self.execute("transaction", Some(json!({"actions": actions})))
            .await
            .map(drop)
    }

    /// `nbd-server-start` listening on a unix socket.
    pub async fn nbd_server_start_unix(&self, socket: &Path) -> Result<()> {
        let path = socket.to_str().ok_or_else(|| {
            crate::Error::new(crate::ErrorKind::InvalidArgument)
                .with_command("nbd-server-start")
                .with_detail(format!("socket path {} is not UTF-8", socket.display()))
        })?;
        self.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": path}}})),
        )
        .await
        .map(drop)
    }

    /// `nbd-server-stop` (also deletes remaining exports).
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.execute("nbd-server-stop", None).await.map(drop)
    }

    /// `block-export-add` of type `nbd`.
    pub async fn block_export_add_nbd(&self, export: &NbdExport) -> Result<()> {
        let mut args = serde_json::to_value(export).expect("NbdExport serializes");
        args["type"] = json!("nbd");
        self.execute("block-export-add", Some(args)).await.map(drop)
    }

    /// `block-export-del`. The export is really gone at `BLOCK_EXPORT_DELETED`;
    /// see [`Qmp::block_export_del_and_wait`].
    pub async fn block_export_del(&self, id: &str, mode: ExportRemoveMode) -> Result<()> {
        self.execute("block-export-del", Some(json!({"id": id, "mode": mode})))
            .await
            .map(drop)
    }

    /// `block-export-del`, then waits for its `BLOCK_EXPORT_DELETED`
    /// (subscribed before the command, so the event cannot be missed).
    pub async fn block_export_del_and_wait(
        &self,
        id: &str,
        mode: ExportRemoveMode,
        timeout: Duration,
    ) -> Result<Event> {
        let mut events = self.subscribe();
        self.block_export_del(id, mode).await?;
        events.wait_block_export_deleted(id, timeout).await
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExportInfo>> {
        self.execute_as("query-block-exports", None).await
    }

    /// `block-job-cancel` (not forced).
    pub async fn block_job_cancel(&self, job_id: &str) -> Result<()> {
        self.execute("block-job-cancel", Some(json!({"device": job_id})))
            .await
            .map(drop)
    }

    /// `block-job-cancel`, then waits until the job is `concluded` (or `null`).
    pub async fn block_job_cancel_and_wait(
        &self,
        job_id: &str,
        timeout: Duration,
    ) -> Result<JobStatusChange> {
        let mut events = self.subscribe();
        self.block_job_cancel(job_id).await?;
        events
            .wait_job_status(job_id, JobStatus::Concluded, timeout)
            .await
    }

    /// `job-dismiss` of a concluded job.
    pub async fn job_dismiss(&self, job_id: &str) -> Result<()> {
        self.execute("job-dismiss", Some(json!({"id": job_id})))
            .await
            .map(drop)
    }

    /// `query-jobs`.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.execute_as("query-jobs", None).await
    }

    /// `qom-set`, e.g. `("/machine/peripheral/vd1", "drive", "cbw1")`.
    pub async fn qom_set(&self, path: &str, property: &str, value: Value) -> Result<()> {
        self.execute(
            "qom-set",
            Some(json!({"path": path, "property": property, "value": value})),
        )
        .await
        .map(drop)
    }

    /// `qom-get`.
    pub async fn qom_get(&self, path: &str, property: &str) -> Result<Value> {
        self.execute("qom-get", Some(json!({"path": path, "property": property})))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_export_serializes_to_the_72_wire_shape() {
        let e = NbdExport::new("exp1", "fl1").name("disk1").bitmaps(vec![
            BitmapRef::Local("b1".into()),
            BitmapRef::on("disk1", "c5"),
        ]);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"id": "exp1", "node-name": "fl1", "name": "disk1", "writable": false,
                   "bitmaps": ["b1", {"node": "disk1", "name": "c5"}]})
        );
        // A full backup exports no bitmap: the key is left out.
        assert_eq!(
            serde_json::to_value(NbdExport::new("e", "n")).unwrap(),
            json!({"id": "e", "node-name": "n", "writable": false})
        );
    }

    #[test]
    fn block_node_info_reads_a_72_reply() {
        // Trimmed `query-named-block-nodes` entry from QEMU 7.2.22, while a
        // fleecing job ran: one internal (unnamed) bitmap and two named ones.
        let node: BlockNodeInfo = serde_json::from_value(json!({
            "iops_rd": 0, "detect_zeroes": "off",
            "image": {"virtual-size": 67108864, "filename": "/tmp/a.qcow2",
                      "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
                      "dirty-flag": false},
            "ro": false, "node-name": "disk0", "backing_file_depth": 0, "drv": "qcow2",
            "dirty-bitmaps": [
                {"recording": false, "persistent": false, "busy": false, "granularity": 65536, "count": 67108864},
                {"name": "b2", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0},
                {"name": "b1", "recording": false, "persistent": true, "busy": false, "granularity": 65536, "count": 0}],
            "encrypted": false, "file": "/tmp/a.qcow2"
        }))
        .unwrap();
        assert_eq!(node.node_name, "disk0");
        assert_eq!(node.image.virtual_size, 64 << 20);
        assert_eq!(node.dirty_bitmaps.len(), 3);
        let b1 = node.bitmap("b1").unwrap();
        assert!(!b1.recording && b1.persistent && !b1.inconsistent);
        assert!(node.bitmap("b2").unwrap().recording);
        assert!(node.bitmap("nope").is_none());
    }
}
