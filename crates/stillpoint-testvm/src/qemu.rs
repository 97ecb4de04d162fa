//! The QEMU command line of a VM (pure: paths in, arguments out).
//!
//! Disks are `-blockdev` format nodes (qcow2, or raw when the disk's spec says so) named
//! `diskN` on `virtio-blk-pci` devices with ids `vdN`: the capture code addresses them by
//! exactly these names. The guest agent channel exists
//! only when the agent is on.

use std::path::{Path, PathBuf};

use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::paths::MAX_SOCKET_PATH;

/// Environment variable choosing the accelerator: `kvm`, or `tcg` (the default).
pub const ACCEL_ENV: &str = "STILLPOINT_ACCEL";

/// The serial of data disk `index` as the guest sees it; `/init` mounts by it.
pub(crate) fn disk_serial(index: usize) -> String {
    format!("stillpoint-disk{index}")
}

/// How the guest CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation, one host thread per vCPU. Works everywhere; the default.
    Tcg,
    /// Hardware virtualisation. Only on request: on these machines /dev/kvm exists but
    /// cannot run a stock kernel (see the lab notes).
    Kvm,
}

impl Accel {
    /// The accelerator asked for by `STILLPOINT_ACCEL`.
    pub fn from_env() -> Result<Self> {
        Self::from_setting(std::env::var(ACCEL_ENV).ok().as_deref())
    }

    fn from_setting(value: Option<&str>) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("" | "tcg") => Ok(Self::Tcg),
            Some("kvm") => Ok(Self::Kvm),
            Some(other) => Err(Error::invalid(
                ACCEL_ENV,
                format!("`{other}`; use `tcg` (default) or `kvm`"),
            )),
        }
    }
}

/// The files a VM's command line refers to.
#[derive(Debug, Clone)]
pub(crate) struct VmFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub qga_socket: Option<PathBuf>,
    pub disks: Vec<PathBuf>,
}

/// The kernel command line: serial console, quiet, and power off (with `-no-reboot`) on panic
/// so that a broken guest ends QEMU instead of hanging.
pub(crate) const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// QEMU's arguments (without the program) for `config`.
pub(crate) fn qemu_args(config: &VmConfig, files: &VmFiles, accel: Accel) -> Result<Vec<String>> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|item| (*item).to_owned()));
    push(&["-name", &config.name]);
    match accel {
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    let memory = config.memory_mib.to_string();
    push(&[
        "-m",
        &memory,
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ]);
    let console = option_path("console log", &files.console_log)?;
    push(&["-serial", &format!("file:{console}")]);
    push(&["-kernel", plain_path("kernel", &files.kernel)?]);
    push(&["-initrd", option_path("initramfs", &files.initrd)?]);
    push(&["-append", KERNEL_CMDLINE]);
    if files.disks.len() != config.data_disks.len() {
        return Err(Error::invalid(
            "data disks",
            format!(
                "{} image files for {} configured disks",
                files.disks.len(),
                config.data_disks.len()
            ),
        ));
    }
    for (index, (disk, spec)) in files.disks.iter().zip(&config.data_disks).enumerate() {
        // Written out (not a JSON map) to keep the documented key order; the file name is
        // JSON-escaped.
        let filename = serde_json::Value::from(plain_path("disk image", disk)?);
        let driver = spec.format.driver();
        let blockdev = format!(
            r#"{{"driver":"{driver}","node-name":"disk{index}","file":{{"driver":"file","filename":{filename}}}}}"#
        );
        push(&["-blockdev", &blockdev]);
        let device = format!(
            "virtio-blk-pci,drive=disk{index},id=vd{index},serial={}",
            disk_serial(index)
        );
        push(&["-device", &device]);
    }
    if let Some(socket) = &files.qga_socket {
        let socket = socket_path("guest agent socket", socket)?;
        push(&[
            "-chardev",
            &format!("socket,path={socket},server=on,wait=off,id=qga0"),
        ]);
        push(&["-device", "virtio-serial"]);
        push(&[
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
    let qmp = socket_path("QMP socket", &files.qmp_socket)?;
    push(&["-qmp", &format!("unix:{qmp},server=on,wait=off")]);
    Ok(args)
}

/// A path as UTF-8 text.
fn plain_path<'a>(what: &str, path: &'a Path) -> Result<&'a str> {
    path.to_str()
        .ok_or_else(|| Error::invalid(what, format!("path `{}` is not UTF-8", path.display())))
}

/// A path that goes inside a QEMU `key=value,…` option, where a comma would split it.
fn option_path<'a>(what: &str, path: &'a Path) -> Result<&'a str> {
    let text = plain_path(what, path)?;
    if text.contains(',') {
        return Err(Error::invalid(
            what,
            format!("path `{text}` contains a comma, which QEMU's option syntax cannot take here"),
        ));
    }
    Ok(text)
}

/// A Unix socket path: also limited to 107 bytes by `sun_path`.
fn socket_path<'a>(what: &str, path: &'a Path) -> Result<&'a str> {
    let text = option_path(what, path)?;
    if text.len() > MAX_SOCKET_PATH {
        return Err(Error::invalid(
            what,
            format!(
                "path `{text}` is {} bytes, more than the {MAX_SOCKET_PATH} a Unix socket can \
                 have; use a shorter runtime directory ($STILLPOINT_RUNTIME_DIR)",
                text.len()
            ),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskSpec;

    fn files(dir: &str, disks: usize, agent: bool) -> VmFiles {
        let dir = PathBuf::from(dir);
        VmFiles {
            kernel: PathBuf::from("/cache/vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            console_log: dir.join("console.log"),
            qmp_socket: dir.join("qmp.sock"),
            qga_socket: agent.then(|| dir.join("qga.sock")),
            disks: (0..disks)
                .map(|i| dir.join(format!("disk{i}.qcow2")))
                .collect(),
        }
    }

    #[test]
    fn demo_vm_command_line() {
        let config = VmConfig::new("demo");
        let args = qemu_args(&config, &files("/r/vms/demo", 1, true), Accel::Tcg).expect("args");
        let expected = [
            "-name",
            "demo",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "file:/r/vms/demo/console.log",
            "-kernel",
            "/cache/vmlinuz",
            "-initrd",
            "/r/vms/demo/initramfs.cpio.gz",
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"/r/vms/demo/disk0.qcow2"}}"#,
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0,serial=stillpoint-disk0",
            "-chardev",
            "socket,path=/r/vms/demo/qga.sock,server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp",
            "unix:/r/vms/demo/qmp.sock,server=on,wait=off",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn agent_off_has_no_channel_and_disks_are_numbered() {
        let config = VmConfig::new("x").without_agent().with_disks(3, 64 << 20);
        let args = qemu_args(&config, &files("/r", 3, false), Accel::Kvm).expect("args");
        let joined = args.join(" ");
        assert!(!joined.contains("virtserialport"), "{joined}");
        assert!(!joined.contains("virtio-serial"), "{joined}");
        assert!(!joined.contains("chardev"), "{joined}");
        assert!(joined.contains("-accel kvm -cpu host"), "{joined}");
        for i in 0..3 {
            assert!(
                joined.contains(&format!("\"node-name\":\"disk{i}\"")),
                "{joined}"
            );
            assert!(
                joined.contains(&format!("drive=disk{i},id=vd{i},serial=stillpoint-disk{i}")),
                "{joined}"
            );
        }
    }

    #[test]
    fn each_disk_gets_the_driver_of_its_format() {
        let config = VmConfig::new("x").with_data_disks([
            DiskSpec::raw(64 << 20),
            DiskSpec::qcow2_v2(64 << 20),
            DiskSpec::qcow2(64 << 20),
        ]);
        let mut disk_files = files("/r", 3, true);
        disk_files.disks[0] = PathBuf::from("/r/disk0.raw");
        let args = qemu_args(&config, &disk_files, Accel::Tcg).expect("args");
        let blockdevs: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-blockdev")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(
            blockdevs,
            [
                r#"{"driver":"raw","node-name":"disk0","file":{"driver":"file","filename":"/r/disk0.raw"}}"#,
                r#"{"driver":"qcow2","node-name":"disk1","file":{"driver":"file","filename":"/r/disk1.qcow2"}}"#,
                r#"{"driver":"qcow2","node-name":"disk2","file":{"driver":"file","filename":"/r/disk2.qcow2"}}"#,
            ]
        );
        let error =
            qemu_args(&config, &files("/r", 2, true), Accel::Tcg).expect_err("a file per disk");
        assert!(error.to_string().contains("2 image files for 3"), "{error}");
    }

    #[test]
    fn unusable_paths_are_refused_with_the_reason() {
        let config = VmConfig::new("x");
        let comma = qemu_args(&config, &files("/r/a,b", 1, true), Accel::Tcg).expect_err("comma");
        assert!(comma.to_string().contains("comma"), "{comma}");
        let long = format!("/{}", "d".repeat(100));
        let error = qemu_args(&config, &files(&long, 1, true), Accel::Tcg).expect_err("long");
        assert!(error.to_string().contains("Unix socket"), "{error}");
    }

    #[test]
    fn accel_setting() {
        assert_eq!(Accel::from_setting(None).expect("default"), Accel::Tcg);
        assert_eq!(Accel::from_setting(Some("kvm")).expect("kvm"), Accel::Kvm);
        assert_eq!(Accel::from_setting(Some("tcg")).expect("tcg"), Accel::Tcg);
        let error = Accel::from_setting(Some("hvf")).expect_err("unknown");
        assert!(error.to_string().contains("STILLPOINT_ACCEL"), "{error}");
    }
}
