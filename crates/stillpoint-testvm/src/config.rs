//! What a VM should look like: [`VmConfig`] and [`DiskSpec`], with their checks.

use crate::error::{Error, Result};
use crate::paths::validate_vm_name;

/// One MiB.
const MIB: u64 = 1 << 20;
/// Smallest data disk: mkfs.ext4 needs room for its journal.
pub const MIN_DISK_SIZE: u64 = 16 * MIB;
/// Largest data disk (the image is sparse, but a typo should not ask for a petabyte).
pub const MAX_DISK_SIZE: u64 = 1 << 40;
/// Most data disks per VM (mount points /data, /data1 … /data15).
pub const MAX_DISKS: usize = 16;
/// Default size of a data disk.
pub const DEFAULT_DISK_SIZE: u64 = 256 * MIB;
/// Default guest memory: the lab's figure, ~250 MiB of host memory per VM under TCG.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// One data disk: an ext4 file system on a fresh image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpec {
    /// Virtual size in bytes (a multiple of 512, at least 16 MiB).
    pub size: u64,
    /// The image format.
    pub format: DiskFormat,
}

/// The format of a data disk's image, and so of its `-blockdev` format node. Which one decides
/// where QEMU can keep dirty bitmaps: only qcow2 version 3 stores them in the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 version 3 (`compat=1.1`, `qemu-img`'s default): stores persistent dirty bitmaps.
    #[default]
    Qcow2,
    /// qcow2 version 2 (`compat=0.10`): QEMU cannot store dirty bitmaps in it.
    Qcow2V2,
    /// A plain raw file (sparse): no metadata at all, so no stored bitmaps either.
    Raw,
}

impl DiskFormat {
    /// The QEMU block driver of the format node (`-blockdev driver=…`; `DiskRecord::format`).
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 | DiskFormat::Qcow2V2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl DiskSpec {
    /// A qcow2 (version 3) disk of `size` bytes.
    pub const fn qcow2(size: u64) -> Self {
        Self {
            size,
            format: DiskFormat::Qcow2,
        }
    }

    /// A qcow2 version 2 (`compat=0.10`) disk of `size` bytes.
    pub const fn qcow2_v2(size: u64) -> Self {
        Self {
            size,
            format: DiskFormat::Qcow2V2,
        }
    }

    /// A raw disk of `size` bytes.
    pub const fn raw(size: u64) -> Self {
        Self {
            size,
            format: DiskFormat::Raw,
        }
    }
}

impl Default for DiskSpec {
    fn default() -> Self {
        Self::qcow2(DEFAULT_DISK_SIZE)
    }
}

/// A VM to launch. Start from [`VmConfig::new`] and adjust fields or use the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmConfig {
    /// The VM name: 1–64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
    pub name: String,
    /// Data disks; the first is mounted at `/data`, the next at `/data1`, `/data2`, …
    pub data_disks: Vec<DiskSpec>,
    /// Whether the guest runs qemu-ga. When off, the VM has no agent channel at all.
    pub agent: bool,
    /// Extra qemu-ga arguments, one argv element each (e.g. `--block-rpcs`, `guest-fsfreeze-freeze`).
    pub qga_args: Vec<String>,
    /// A script (with its `#!` line) qemu-ga runs as its fsfreeze hook, with `freeze` or `thaw`.
    pub fsfreeze_hook: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Percent of every data disk filled with data before boot (see [`VmConfig::with_prefill`]);
    /// 0: fresh, empty file systems.
    pub prefill_percent: u8,
}

impl VmConfig {
    /// Most of a data disk that [`VmConfig::with_prefill`] may fill: ext4 needs the rest for
    /// its journal and metadata on the smallest disks.
    pub const MAX_PREFILL_PERCENT: u8 = 80;
    /// The file [`VmConfig::with_prefill`] puts in the root of every data disk's file system
    /// (`/data/prefill.bin`, `/data1/prefill.bin`, …).
    pub const PREFILL_FILE: &'static str = "prefill.bin";

    /// The demo guest: one 256 MiB data disk, agent on, 256 MiB of memory.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            data_disks: vec![DiskSpec::default()],
            agent: true,
            qga_args: Vec::new(),
            fsfreeze_hook: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            prefill_percent: 0,
        }
    }

    /// `count` qcow2 data disks of `size` bytes each.
    pub fn with_disks(mut self, count: usize, size: u64) -> Self {
        self.data_disks = vec![DiskSpec::qcow2(size); count];
        self
    }

    /// These data disks, in order (`vd0` first), e.g.
    /// `[DiskSpec::raw(size), DiskSpec::qcow2_v2(size), DiskSpec::qcow2(size)]`.
    pub fn with_data_disks(mut self, disks: impl IntoIterator<Item = DiskSpec>) -> Self {
        self.data_disks = disks.into_iter().collect();
        self
    }

    /// No guest agent and no agent channel.
    pub fn without_agent(mut self) -> Self {
        self.agent = false;
        self
    }

    /// Adds one qemu-ga argument.
    pub fn with_qga_arg(mut self, arg: impl Into<String>) -> Self {
        self.qga_args.push(arg.into());
        self
    }

    /// Installs `script` as qemu-ga's fsfreeze hook.
    pub fn with_fsfreeze_hook(mut self, script: impl Into<String>) -> Self {
        self.fsfreeze_hook = Some(script.into());
        self
    }

    /// Sets the guest memory.
    pub fn with_memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Fills `percent` of every data disk before boot with one regular file,
    /// [`Self::PREFILL_FILE`] in the root of its file system, of incompressible pseudo-random bytes
    /// (distinct per VM name and disk, the same on every launch). The file is written on the
    /// host while the file system is made (`mkfs.ext4 -d`), so the file system stays valid and
    /// the disk image holds that much allocated data — what copy benchmarks need, without
    /// writing gigabytes through a TCG guest.
    pub fn with_prefill(mut self, percent: u8) -> Self {
        self.prefill_percent = percent;
        self
    }

    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        validate_vm_name(&self.name)?;
        if self.data_disks.len() > MAX_DISKS {
            return Err(Error::invalid(
                "number of data disks",
                format!("{} is more than {MAX_DISKS}", self.data_disks.len()),
            ));
        }
        for (index, disk) in self.data_disks.iter().enumerate() {
            if disk.size < MIN_DISK_SIZE || disk.size > MAX_DISK_SIZE || disk.size % 512 != 0 {
                return Err(Error::invalid(
                    &format!("size of data disk {index}"),
                    format!(
                        "{} bytes; it must be a multiple of 512 between {} MiB and {} TiB",
                        disk.size,
                        MIN_DISK_SIZE / MIB,
                        MAX_DISK_SIZE >> 40
                    ),
                ));
            }
        }
        for (index, arg) in self.qga_args.iter().enumerate() {
            if arg.is_empty() || arg.contains(['\n', '\0']) {
                return Err(Error::invalid(
                    &format!("qemu-ga argument {index}"),
                    format!("{arg:?} is empty or holds a newline or NUL"),
                ));
            }
        }
        if !self.agent && (!self.qga_args.is_empty() || self.fsfreeze_hook.is_some()) {
            return Err(Error::invalid(
                "agent settings",
                "qemu-ga arguments or an fsfreeze hook were given, but the agent is off",
            ));
        }
        if let Some(hook) = &self.fsfreeze_hook
            && !hook.starts_with("#!")
        {
            return Err(Error::invalid(
                "fsfreeze hook",
                "the script must start with a `#!` line (e.g. `#!/bin/sh`)",
            ));
        }
        if self.prefill_percent > Self::MAX_PREFILL_PERCENT {
            return Err(Error::invalid(
                "prefill",
                format!(
                    "{} %; at most {} % of a disk can be filled",
                    self.prefill_percent,
                    Self::MAX_PREFILL_PERCENT
                ),
            ));
        }
        if !(64..=16384).contains(&self.memory_mib) {
            return Err(Error::invalid(
                "memory",
                format!("{} MiB; it must be between 64 and 16384", self.memory_mib),
            ));
        }
        Ok(())
    }
}

/// Parses a disk size the way `qemu-img` and `truncate` read it: a number with an optional
/// binary suffix `K`, `M`, `G`, `T` (also `KiB`, `MB`, … — all binary), bytes without one.
/// Hand-written because size crates read `M` as 10⁶, which is not what users of disk tools mean.
pub fn parse_disk_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let bad = || {
        Error::invalid(
            "disk size",
            format!("`{text}`; write a number of bytes or use K, M, G, T (binary), e.g. 256M"),
        )
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_disk_size("256M").expect("256M"), 256 << 20);
        assert_eq!(parse_disk_size("1G").expect("1G"), 1 << 30);
        assert_eq!(parse_disk_size("1GiB").expect("1GiB"), 1 << 30);
        assert_eq!(parse_disk_size("64 MB").expect("64 MB"), 64 << 20);
        assert_eq!(parse_disk_size("4096").expect("bytes"), 4096);
        for bad in ["", "M", "12X", "-1M", "1.5G", "99999999999999T"] {
            let error = parse_disk_size(bad).expect_err(bad);
            assert!(error.to_string().contains("disk size"), "{error}");
        }
    }

    #[test]
    fn defaults_are_the_demo_guest() {
        let config = VmConfig::new("demo");
        assert_eq!(config.data_disks, [DiskSpec::qcow2(256 << 20)]);
        assert_eq!(config.data_disks[0].format.driver(), "qcow2");
        assert!(config.agent);
        assert_eq!(config.memory_mib, 256);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (VmConfig::new("a/b"), "VM name"),
            (
                VmConfig::new("x").with_disks(17, 256 << 20),
                "number of data disks",
            ),
            (
                VmConfig::new("x").with_disks(1, 1 << 20),
                "size of data disk 0",
            ),
            (
                VmConfig::new("x").with_disks(1, (256 << 20) + 1),
                "size of data disk 0",
            ),
            (
                VmConfig::new("x").with_qga_arg("a\nb"),
                "qemu-ga argument 0",
            ),
            (
                VmConfig::new("x").without_agent().with_qga_arg("-v"),
                "agent settings",
            ),
            (
                VmConfig::new("x").with_fsfreeze_hook("echo hi"),
                "fsfreeze hook",
            ),
            (VmConfig::new("x").with_memory_mib(16), "memory"),
            (VmConfig::new("x").with_prefill(81), "prefill"),
        ];
        for (config, field) in cases {
            let error = config.validate().expect_err(field);
            assert_eq!(error.kind(), ErrorKind::InvalidConfig);
            assert!(
                error.to_string().contains(field),
                "{error} should name {field}"
            );
        }
    }
}
