//! Data disks: ext4 made by `mkfs.ext4` on a sparse raw file, kept as it is for a raw disk or
//! converted to qcow2 (version 3 by default; version 2 on request, `compat=0.10`). Where the
//! dirty bitmaps of a capture can live depends on it: only qcow2 version 3 stores them.
//!
//! A prefilled disk gets its data file from `mkfs.ext4 -d DIR` (which copies a host directory
//! into the new file system): the file system stays valid and the guest sees a regular file,
//! which it can read and modify like any other.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{DiskFormat, DiskSpec, VmConfig};
use crate::error::{Error, Result};
use crate::paths::find_tool;
use crate::tool;

/// What goes into a data disk's file system before boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefill<'a> {
    /// Bytes of [`VmConfig::PREFILL_FILE`].
    pub bytes: u64,
    /// Makes the content distinct per VM (with the disk index).
    pub seed: &'a str,
}

impl<'a> Prefill<'a> {
    /// `percent` of `spec.size`, rounded down to whole 4 KiB blocks; `None` for nothing.
    pub(crate) fn of(spec: DiskSpec, percent: u8, seed: &'a str) -> Option<Self> {
        // No overflow: sizes are at most 1 TiB (checked by `VmConfig::validate`).
        let bytes = spec.size * u64::from(percent) / 100 / 4096 * 4096;
        (bytes > 0).then_some(Self { bytes, seed })
    }
}

/// The file system label of data disk `index`: `data`, `data1`, `data2`, …
pub(crate) fn disk_label(index: usize) -> String {
    if index == 0 {
        "data".to_owned()
    } else {
        format!("data{index}")
    }
}

/// Writes `bytes` of pseudo-random data to `path`: the BLAKE3 extendable output of a key
/// derived from `seed` and `index` — incompressible, deterministic, and fast enough to fill
/// gigabytes (a cryptographic stream is more than needed, but it is already a dependency).
fn write_pseudo_random(path: &Path, bytes: u64, seed: &str, index: usize) -> Result<()> {
    let mut stream = blake3::Hasher::new_derive_key("stillpoint-testvm prefill v1")
        .update(seed.as_bytes())
        .update(&(index as u64).to_le_bytes())
        .finalize_xof();
    let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let take = left.min(block.len() as u64) as usize;
        stream.fill(&mut block[..take]);
        out.write_all(&block[..take])
            .map_err(|e| Error::io("write", path, e))?;
        left -= take as u64;
    }
    out.flush().map_err(|e| Error::io("write", path, e))
}

/// Creates `<dir>/disk<index>.qcow2` (or `.raw` for a raw disk), a fresh ext4 file system of
/// `spec.size` bytes in `spec.format`, holding [`VmConfig::PREFILL_FILE`] when `prefill` says
/// so.
pub(crate) fn create_data_disk(
    dir: &Path,
    index: usize,
    spec: DiskSpec,
    prefill: Option<Prefill<'_>>,
) -> Result<PathBuf> {
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    let raw = dir.join(format!("disk{index}.raw"));
    let content = dir.join(format!("disk{index}.content"));
    let file = std::fs::File::create(&raw).map_err(|e| Error::io("create", &raw, e))?;
    file.set_len(spec.size)
        .map_err(|e| Error::io("size", &raw, e))?;
    drop(file);
    let label = disk_label(index);
    let mut mkfs = Command::new(mkfs);
    mkfs.args(["-F", "-q", "-L", &label]);
    let filled = match prefill {
        None => Ok(()),
        Some(prefill) => std::fs::create_dir_all(&content)
            .map_err(|e| Error::io("create", &content, e))
            .and_then(|()| {
                write_pseudo_random(
                    &content.join(VmConfig::PREFILL_FILE),
                    prefill.bytes,
                    prefill.seed,
                    index,
                )
            })
            .map(|()| {
                mkfs.arg("-d").arg(&content);
            }),
    };
    let made = filled.and_then(|()| {
        tool::run(
            mkfs.arg(&raw),
            &format!("making the ext4 file system of data disk {index}"),
        )
        .map(drop)
    });
    let _ = std::fs::remove_dir_all(&content);
    let compat = match spec.format {
        DiskFormat::Raw => {
            if made.is_err() {
                let _ = std::fs::remove_file(&raw);
            }
            return made.map(|()| raw);
        }
        DiskFormat::Qcow2 => "compat=1.1",
        DiskFormat::Qcow2V2 => "compat=0.10",
    };
    let qcow2 = dir.join(format!("disk{index}.qcow2"));
    let result = made.and_then(|()| {
        tool::run(
            Command::new(find_tool("qemu-img", "qemu-utils")?)
                .args(["convert", "-f", "raw", "-O", "qcow2", "-o", compat])
                .arg(&raw)
                .arg(&qcow2),
            &format!("converting data disk {index} to qcow2 ({compat})"),
        )
    });
    let _ = std::fs::remove_file(&raw);
    result?;
    Ok(qcow2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uses the real mkfs.ext4, e2fsck, debugfs and qemu-img.
    #[test]
    fn prefilled_disk_holds_the_file_in_a_valid_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = DiskSpec::qcow2(32 << 20);
        let prefill = Prefill::of(spec, 50, "vm-a").expect("50 % of 32 MiB");
        assert_eq!(prefill.bytes, 16 << 20);
        let path = create_data_disk(dir.path(), 0, spec, Some(prefill)).expect("create");
        assert!(
            !dir.path().join("disk0.content").exists(),
            "the host copy of the content is removed"
        );
        let raw = dir.path().join("check.raw");
        let status = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&path)
            .arg(&raw)
            .status()
            .expect("convert");
        assert!(status.success());
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&raw)
            .output()
            .expect("e2fsck");
        assert!(
            fsck.status.success(),
            "the file system must stay valid: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        // The guest's file holds exactly the generated bytes.
        let dumped = dir.path().join("dumped");
        let dump = Command::new("debugfs")
            .arg("-R")
            .arg(format!(
                "dump /{} {}",
                VmConfig::PREFILL_FILE,
                dumped.display()
            ))
            .arg(&raw)
            .output()
            .expect("debugfs");
        assert!(dump.status.success());
        let expected = dir.path().join("expected");
        write_pseudo_random(&expected, 16 << 20, "vm-a", 0).expect("generate");
        let dumped = std::fs::read(&dumped).expect("dumped file");
        assert_eq!(dumped.len(), 16 << 20);
        assert!(dumped == std::fs::read(&expected).expect("expected"));
        // Allocated in the image, not a hole.
        let map = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&map.stdout).expect("json");
        assert!(info["actual-size"].as_u64().expect("actual-size") >= 16 << 20);
    }

    #[test]
    fn prefill_content_is_distinct_per_seed_and_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let read = |seed: &str, index: usize| {
            let path = dir.path().join(format!("{seed}-{index}"));
            write_pseudo_random(&path, 8192, seed, index).expect("generate");
            std::fs::read(path).expect("read")
        };
        let a0 = read("a", 0);
        assert_eq!(a0.len(), 8192);
        assert_eq!(a0, read("a", 0), "deterministic");
        assert_ne!(a0, read("a", 1));
        assert_ne!(a0, read("b", 0));
        assert_eq!(Prefill::of(DiskSpec::qcow2(16 << 20), 0, "a"), None);
    }

    #[test]
    fn labels() {
        assert_eq!(disk_label(0), "data");
        assert_eq!(disk_label(2), "data2");
    }

    /// `qemu-img info --output=json` of an image.
    fn image_info(path: &Path) -> serde_json::Value {
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(path)
            .output()
            .expect("qemu-img info");
        assert!(info.status.success(), "qemu-img info {}", path.display());
        serde_json::from_slice(&info.stdout).expect("json")
    }

    /// Every format holds the same kind of file system; qemu-img reads the format (and the
    /// qcow2 version) back from the image itself.
    #[test]
    fn raw_and_qcow2_v2_disks_are_made_in_their_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = create_data_disk(dir.path(), 0, DiskSpec::raw(32 << 20), None).expect("raw");
        assert_eq!(raw, dir.path().join("disk0.raw"));
        let v2 = create_data_disk(dir.path(), 1, DiskSpec::qcow2_v2(32 << 20), None).expect("v2");
        assert_eq!(v2, dir.path().join("disk1.qcow2"));
        assert!(
            !dir.path().join("disk1.raw").exists(),
            "the raw file is removed"
        );
        let v3 = create_data_disk(dir.path(), 2, DiskSpec::qcow2(32 << 20), None).expect("v3");

        let info = image_info(&raw);
        assert_eq!(info["format"], "raw");
        assert_eq!(info["virtual-size"], 32 << 20);
        assert!(
            info["actual-size"].as_u64().expect("actual-size") < 16 << 20,
            "the raw file stays sparse: {info}"
        );
        let info = image_info(&v2);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
        assert_eq!(image_info(&v3)["format-specific"]["data"]["compat"], "1.1");
        let (fsck, label) = (
            Command::new("e2fsck")
                .arg("-fn")
                .arg(&raw)
                .output()
                .expect("e2fsck"),
            Command::new("e2label").arg(&raw).output().expect("e2label"),
        );
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "data");
    }

    /// Uses the real mkfs.ext4 and qemu-img (installed by scripts/install-deps.sh).
    #[test]
    fn data_disk_is_qcow2_with_ext4_of_the_requested_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            create_data_disk(dir.path(), 1, DiskSpec::qcow2(32 << 20), None).expect("create");
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
