//! `vm.json`: what a launched VM's runtime directory says about it.
//!
//! This is a contract: the qemu platform driver reads the same file with its own struct, so
//! the field names never change (see docs/local-vms.md). `qga_socket` is `null` when the VM
//! has no agent channel.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The file name of the record inside a VM's runtime directory.
pub const RECORD_FILE: &str = "vm.json";

/// The contents of `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM name (also its directory name).
    pub name: String,
    /// The QEMU process id.
    pub pid: u32,
    /// QMP monitor socket (absolute).
    pub qmp_socket: PathBuf,
    /// Guest agent socket (absolute), `None` (`null`) when the agent is off.
    pub qga_socket: Option<PathBuf>,
    /// The guest's serial console, written by QEMU (absolute).
    pub console_log: PathBuf,
    /// Data disks in order: `vd0`/`disk0` is mounted at `/data` in the guest.
    pub disks: Vec<DiskRecord>,
    /// When QEMU was started (RFC 3339, UTC).
    pub started_at: String,
    /// Who launched it (`stillpoint vm run`, `stillpoint-testvm test harness`, ...).
    pub launched_by: String,
}

/// One data disk of a launched VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The QEMU device id (`vd0`), `-device virtio-blk-pci,id=…`.
    pub device_id: String,
    /// The QEMU block node name (`disk0`) of the format node, `-blockdev …,node-name=…`.
    pub node_name: String,
    /// The image file (absolute).
    pub path: PathBuf,
    /// The image format: the driver of the format node (`qcow2`, `raw`).
    pub format: String,
    /// The disk's size as the guest sees it, in bytes.
    pub virtual_size: u64,
}

impl VmRecord {
    /// Reads `<vm_dir>/vm.json`.
    pub fn read(vm_dir: &Path) -> Result<Self> {
        let path = vm_dir.join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
            Error::new(kind, format!("cannot read `{}`", path.display()))
                .with_path(&path)
                .with_source(e)
        })?;
        Self::parse(&text).map_err(|e| e.with_path(&path))
    }

    /// Parses the JSON text of a record.
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::Record,
                format!(
                    "malformed {RECORD_FILE} at line {}, column {}",
                    e.line(),
                    e.column()
                ),
            )
            .with_source(e)
        })
    }

    /// Writes `<vm_dir>/vm.json` atomically (a reader never sees half a file).
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        let path = vm_dir.join(RECORD_FILE);
        let staging = vm_dir.join(format!(".{RECORD_FILE}.tmp"));
        let json = serde_json::to_string_pretty(self).map_err(|e| {
            Error::new(ErrorKind::Record, "cannot encode the VM record").with_source(e)
        })?;
        std::fs::write(&staging, json + "\n").map_err(|e| Error::io("write", &staging, e))?;
        std::fs::rename(&staging, &path).map_err(|e| Error::io("rename into place", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the contract, verbatim.
    const CONTRACT_EXAMPLE: &str = r#"{"name":"demo","pid":12345,"qmp_socket":"/abs/qmp.sock","qga_socket":"/abs/qga.sock",
 "console_log":"/abs/console.log",
 "disks":[{"device_id":"vd0","node_name":"disk0","path":"/abs/disk0.qcow2","format":"qcow2","virtual_size":268435456}],
 "started_at":"2026-11-26T12:00:00Z","launched_by":"stillpoint vm run"}"#;

    #[test]
    fn contract_example_parses() {
        let record = VmRecord::parse(CONTRACT_EXAMPLE).expect("parse");
        assert_eq!(record.name, "demo");
        assert_eq!(record.pid, 12345);
        assert_eq!(
            record.qga_socket.as_deref(),
            Some(Path::new("/abs/qga.sock"))
        );
        assert_eq!(record.disks[0].device_id, "vd0");
        assert_eq!(record.disks[0].node_name, "disk0");
        assert_eq!(record.disks[0].virtual_size, 268_435_456);
        assert_eq!(record.launched_by, "stillpoint vm run");
    }

    #[test]
    fn round_trip_keeps_field_names_and_null_agent() {
        let mut record = VmRecord::parse(CONTRACT_EXAMPLE).expect("parse");
        record.qga_socket = None;
        let dir = tempfile::tempdir().expect("tempdir");
        record.write(dir.path()).expect("write");
        let text = std::fs::read_to_string(dir.path().join(RECORD_FILE)).expect("read");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["qga_socket"], serde_json::Value::Null);
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "console_log",
                "disks",
                "launched_by",
                "name",
                "pid",
                "qga_socket",
                "qmp_socket",
                "started_at"
            ]
        );
        let mut disk_keys: Vec<&str> = value["disks"][0]
            .as_object()
            .expect("disk")
            .keys()
            .map(String::as_str)
            .collect();
        disk_keys.sort_unstable();
        assert_eq!(
            disk_keys,
            ["device_id", "format", "node_name", "path", "virtual_size"]
        );
        assert_eq!(VmRecord::read(dir.path()).expect("read back"), record);
    }

    #[test]
    fn malformed_record_names_line_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(RECORD_FILE), "{\n\"name\": 5\n}").expect("write");
        let error = VmRecord::read(dir.path()).expect_err("malformed");
        assert_eq!(error.kind(), ErrorKind::Record);
        assert!(error.to_string().contains("line 2"), "{error}");
        assert_eq!(error.path(), Some(dir.path().join(RECORD_FILE).as_path()));
        let missing = VmRecord::read(&dir.path().join("nope")).expect_err("missing");
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }
}
