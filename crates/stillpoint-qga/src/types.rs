//! Typed arguments and replies of the agent commands stillpoint uses.
//!
//! Written by hand from `qga/qapi-schema.json` (see the crate doc for why not `qapi-qga`).
//! Every enum-like field the agent may extend in a newer version (bus types, OS ids) is kept as
//! a string, and optional members are `Option`/defaulted, so a newer or older agent than the
//! one we test with still decodes.

use serde::{Deserialize, Serialize};

/// `guest-info`: the agent's version and the commands it has.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentInfo {
    /// qemu-ga version, e.g. `7.2.22`.
    pub version: String,
    /// Every command the agent knows, with whether it is enabled right now.
    pub supported_commands: Vec<CommandInfo>,
}

impl AgentInfo {
    /// The entry for `name`, if the agent knows that command.
    pub fn command(&self, name: &str) -> Option<&CommandInfo> {
        self.supported_commands.iter().find(|c| c.name == name)
    }

    /// True if the agent knows `name` and it is enabled (not blocked, not disabled by a freeze).
    pub fn is_enabled(&self, name: &str) -> bool {
        self.command(name).is_some_and(|c| c.enabled)
    }
}

/// One entry of [`AgentInfo::supported_commands`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CommandInfo {
    /// Command name, e.g. `guest-fsfreeze-freeze`.
    pub name: String,
    /// False when disabled by `--block-rpcs`/`--allow-rpcs` or, temporarily, by a freeze.
    pub enabled: bool,
    /// False for commands that never reply (`guest-shutdown`, `guest-suspend-*`).
    #[serde(rename = "success-response")]
    pub success_response: bool,
}

/// `guest-get-osinfo`. Every member is optional in the schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// `uname -r`, e.g. `6.1.0-28-cloud-amd64`.
    pub kernel_release: Option<String>,
    /// `uname -v`.
    pub kernel_version: Option<String>,
    /// `uname -m`, e.g. `x86_64`.
    pub machine: Option<String>,
    /// os-release `ID` (`debian`, `mswindows`, …).
    pub id: Option<String>,
    /// os-release `NAME`.
    pub name: Option<String>,
    /// os-release `PRETTY_NAME`.
    pub pretty_name: Option<String>,
    /// os-release `VERSION`.
    pub version: Option<String>,
    /// os-release `VERSION_ID`.
    pub version_id: Option<String>,
    /// os-release `VARIANT`.
    pub variant: Option<String>,
    /// os-release `VARIANT_ID`.
    pub variant_id: Option<String>,
}

/// One mounted filesystem from `guest-get-fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FsInfo {
    /// Device name as the guest sees it, e.g. `vda`.
    pub name: String,
    /// Where it is mounted, e.g. `/data`.
    pub mountpoint: String,
    /// Filesystem type, e.g. `ext4`.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes in use (QEMU ≥ 3.0; absent when the agent could not statvfs it).
    pub used_bytes: Option<u64>,
    /// Size in bytes, as seen by unprivileged users.
    pub total_bytes: Option<u64>,
    /// The disks under it (several for LVM/RAID, none for a virtual filesystem).
    #[serde(rename = "disk", default)]
    pub disks: Vec<DiskAddress>,
}

/// A disk backing a filesystem, as `guest-get-fsinfo` locates it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskAddress {
    /// `virtio`, `scsi`, `ide`, `sata`, `nvme`, … (kept as text: newer agents add values).
    pub bus_type: String,
    /// Bus number on its controller.
    pub bus: i64,
    /// Target number.
    pub target: i64,
    /// Unit (LUN) number.
    pub unit: i64,
    /// PCI address of the controller, when on PCI.
    pub pci_controller: Option<PciAddress>,
    /// Disk serial number (the `serial=` of the QEMU drive), when set.
    pub serial: Option<String>,
    /// Device node in the guest, e.g. `/dev/vda`.
    pub dev: Option<String>,
}

/// A PCI address `domain:bus:slot.function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PciAddress {
    /// PCI domain.
    pub domain: i64,
    /// PCI bus.
    pub bus: i64,
    /// PCI slot.
    pub slot: i64,
    /// PCI function.
    pub function: i64,
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// No filesystem is frozen by the agent.
    Thawed,
    /// The agent froze the guest's filesystems and awaits a thaw.
    Frozen,
}

/// Arguments of `guest-exec`: a program and its argv, never a shell line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program to run; a bare name is looked up in the agent's `PATH`.
    pub path: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`. When non-empty it *replaces* the agent's environment.
    pub env: Vec<String>,
    /// Bytes written to the process's stdin (then closed).
    pub input: Option<Vec<u8>>,
    /// Capture stdout and stderr (returned by `guest-exec-status` once exited).
    pub capture_output: bool,
}

impl ExecRequest {
    /// Runs `path` with `args`, capturing output.
    pub fn new<I, A>(path: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        Self {
            path: path.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            input: None,
            capture_output: true,
        }
    }

    /// Sets one `KEY=VALUE` environment entry (see [`ExecRequest::env`]).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Feeds `input` to the process's stdin.
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.input = Some(input.into());
        self
    }

    /// Whether to capture stdout/stderr.
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture_output = capture;
        self
    }

    /// The `guest-exec` arguments object. `capture-output` is sent as a bool, which every
    /// agent accepts (QEMU ≥ 8.0 also takes a mode enum; 7.2 rejects it).
    pub(crate) fn to_arguments(&self) -> serde_json::Value {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Wire<'a> {
            path: &'a str,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            arg: &'a [String],
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            env: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            input_data: Option<String>,
            capture_output: bool,
        }
        use base64::Engine as _;
        let wire = Wire {
            path: &self.path,
            arg: &self.args,
            env: &self.env,
            input_data: self
                .input
                .as_deref()
                .map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes)),
            capture_output: self.capture_output,
        };
        serde_json::to_value(wire).expect("strings and a bool always serialise")
    }
}

/// `guest-exec`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct ExecStarted {
    pub pid: i64,
}

/// `guest-exec-status` as sent on the wire (output still base64).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct ExecStatusWire {
    pub exited: bool,
    pub exitcode: Option<i32>,
    pub signal: Option<i32>,
    pub out_data: Option<String>,
    pub err_data: Option<String>,
    #[serde(default)]
    pub out_truncated: bool,
    #[serde(default)]
    pub err_truncated: bool,
}

/// State of a process started with `guest-exec`, output decoded.
///
/// Once `exited` is true the agent has reaped the process and forgotten its PID: asking again
/// is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecStatus {
    /// The process has ended.
    pub exited: bool,
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Captured stdout (empty without capture).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty without capture).
    pub stderr: Vec<u8>,
    /// The agent cut stdout at its 16 MiB capture limit.
    pub stdout_truncated: bool,
    /// The agent cut stderr at its 16 MiB capture limit.
    pub stderr_truncated: bool,
}

impl ExecStatus {
    /// Exited normally with code 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == Some(0) && self.signal.is_none()
    }

    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (lossy).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_fsinfo_from_qemu_7_2() {
        // One entry as qemu-ga 7.2 prints it for the test guest's data disk.
        let reply = json!([{
            "name": "vda",                 // kernel device name
            "total-bytes": 249_830_400u64,  // statvfs f_blocks × f_frsize (unprivileged view)
            "mountpoint": "/data",
            "disk": [{
                "serial": "data0",          // -device …,serial=
                "bus-type": "virtio",
                "bus": 0, "unit": 0, "target": 0,
                "pci-controller": {"bus": 0, "slot": 3, "domain": 0, "function": 0},
                "dev": "/dev/vda"
            }],
            "used-bytes": 14_336u64,
            "type": "ext4"
        }]);
        let fs: Vec<FsInfo> = serde_json::from_value(reply).unwrap();
        assert_eq!(fs[0].mountpoint, "/data");
        assert_eq!(fs[0].fs_type, "ext4");
        assert_eq!(fs[0].used_bytes, Some(14_336));
        let disk = &fs[0].disks[0];
        assert_eq!(disk.bus_type, "virtio");
        assert_eq!(disk.serial.as_deref(), Some("data0"));
        assert_eq!(disk.dev.as_deref(), Some("/dev/vda"));
        assert_eq!(disk.pci_controller.unwrap().slot, 3);
    }

    #[test]
    fn decodes_unknown_bus_type_and_missing_optionals() {
        let reply = json!([{
            "name": "x", "mountpoint": "/", "type": "xfs",
            "disk": [{"bus-type": "some-future-bus", "bus": 0, "unit": 0, "target": 0}]
        }]);
        let fs: Vec<FsInfo> = serde_json::from_value(reply).unwrap();
        assert_eq!(fs[0].disks[0].bus_type, "some-future-bus");
        assert_eq!(fs[0].total_bytes, None);
    }

    #[test]
    fn exec_arguments_encode_stdin_as_base64_and_capture_as_bool() {
        let req = ExecRequest::new("cat", ["-"])
            .env("A", "1")
            .stdin(b"hi\n".to_vec());
        assert_eq!(
            req.to_arguments(),
            json!({
                "path": "cat",
                "arg": ["-"],
                "env": ["A=1"],
                "input-data": "aGkK",     // base64 of "hi\n"
                "capture-output": true    // bool: accepted by every qemu-ga version
            })
        );
        let bare = ExecRequest::new("true", Vec::<String>::new()).capture_output(false);
        assert_eq!(
            bare.to_arguments(),
            json!({"path": "true", "capture-output": false})
        );
    }

    #[test]
    fn agent_info_lookup() {
        let info: AgentInfo = serde_json::from_value(json!({
            "version": "7.2.22",
            "supported_commands": [
                {"name": "guest-fsfreeze-freeze", "enabled": false, "success-response": true},
                {"name": "guest-ping", "enabled": true, "success-response": true}
            ]
        }))
        .unwrap();
        assert!(info.is_enabled("guest-ping"));
        assert!(!info.is_enabled("guest-fsfreeze-freeze"));
        assert!(!info.is_enabled("guest-nonexistent"));
    }
}
