//! Data disks: ext4 made by `mkfs.ext4` on a sparse raw file, converted to qcow2 (persistent
//! dirty bitmaps, which incremental captures need, exist only in qcow2).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::DiskSpec;
use crate::error::{Error, Result};
use crate::paths::find_tool;
use crate::tool;

/// The file system label of data disk `index`: `data`, `data1`, `data2`, …
pub(crate) fn disk_label(index: usize) -> String {
    if index == 0 {
        "data".to_owned()
    } else {
        format!("data{index}")
    }
}

/// Creates `<dir>/disk<index>.qcow2`, a fresh ext4 file system of `spec.size` bytes.
pub(crate) fn create_data_disk(dir: &Path, index: usize, spec: DiskSpec) -> Result<PathBuf> {
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let raw = dir.join(format!("disk{index}.raw"));
    let qcow2 = dir.join(format!("disk{index}.qcow2"));
    let file = std::fs::File::create(&raw).map_err(|e| Error::io("create", &raw, e))?;
    file.set_len(spec.size)
        .map_err(|e| Error::io("size", &raw, e))?;
    drop(file);
    let label = disk_label(index);
    let result = tool::run(
        Command::new(mkfs)
            .args(["-F", "-q", "-L", &label])
            .arg(&raw),
        &format!("making the ext4 file system of data disk {index}"),
    )
    .and_then(|_| {
        tool::run(
            Command::new(qemu_img)
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&qcow2),
            &format!("converting data disk {index} to qcow2"),
        )
    });
    let _ = std::fs::remove_file(&raw);
    result?;
    Ok(qcow2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(disk_label(0), "data");
        assert_eq!(disk_label(2), "data2");
    }

    /// Uses the real mkfs.ext4 and qemu-img (installed by scripts/install-deps.sh).
    #[test]
    fn data_disk_is_qcow2_with_ext4_of_the_requested_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create_data_disk(dir.path(), 1, DiskSpec { size: 32 << 20 }).expect("create");
        assert_eq!(path, dir.path().join("disk1.qcow2"));
        assert!(
            !dir.path().join("disk1.raw").exists(),
            "the raw file is removed"
        );
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 32 << 20);
        // Back to raw, the file system must carry the label.
        let raw = dir.path().join("check.raw");
        let status = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&path)
            .arg(&raw)
            .status()
            .expect("convert");
        assert!(status.success());
        let label = Command::new("e2label").arg(&raw).output().expect("e2label");
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "data1");
    }
}
