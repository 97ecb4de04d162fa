//! The restore capability: define the restored VM (its recorded definition pointed at the
//! restored disks) and boot-test it. One implementation per platform, beside capture.
//!
//! A snapshot records how its VM was started ([`VmDefinition`], written by the platform the
//! VM ran on; its `kind` names that platform). At restore the engine writes the disks, then
//! picks the implementation by that name ([`restorer_for`], or [`PlatformKind::restorer`])
//! and holds it as `Arc<dyn VmRestore>`; it never looks inside a definition. Each platform
//! decides what "defined" means for it:
//!
//! | platform | [`VmRestore::define`] writes | [`VmRestore::boot_test`] boots |
//! |---|---|---|
//! | `qemu` ([`crate::qemu::restore`]) | `vm-definition.json` (the recorded command line rewritten for the restored files, sockets and logs under `DIR/run/`) and `start-vm.sh` | the rewritten line on qcow2 overlays, TCG, networks cut off; waits for QMP `running` and the agent |
//! | `libvirt` (later) | the domain XML rewritten to the restored files, with a new name, UUID and MACs, and what `--define`s it | a transient domain on overlays; waits for the agent |
//! | `kubevirt` (later) | a `VirtualMachine` manifest naming volumes for the restored disks | the VM in a scratch namespace; waits for the agent |
//!
//! Invariants every implementation keeps:
//! - [`VmRestore::define`] is pure (paths in, file contents out); the engine writes the files
//!   it returns into its staging directory and renames them with the disks, so nothing
//!   half-written carries a final name.
//! - A definition that cannot be used is an `Err` of kind
//!   [`PlatformErrorKind::VmDefinition`] saying why; the engine then restores the disks only
//!   and reports the reason.
//! - The boot test never writes to the restored files (the guest runs on overlays) and leaves
//!   no process and no temporary file behind; a guest that does not come up is a report with
//!   `passed: false`, an `Err` only says the test could not be set up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::vm::{DefinedDisk, PlatformKind, VmDefinition};

/// Where one restored disk now is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDisk {
    /// The disk id of the definition (`vd0`).
    pub id: String,
    /// The restored image (absolute).
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// Which snapshot a restore comes from, for the headers and comments of the files a
/// definition writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOrigin {
    pub vm: String,
    pub snapshot: String,
    /// Capture time, RFC 3339.
    pub time: String,
    /// The consistency level the snapshot achieved, when it recorded one.
    pub achieved: Option<String>,
}

/// What [`VmRestore::define`] works from.
#[derive(Debug, Clone, Copy)]
pub struct DefineRequest<'a> {
    /// The definition as the snapshot recorded it.
    pub recorded: &'a VmDefinition,
    /// The restored disks (all of the definition's, or those the user chose).
    pub disks: &'a [TargetDisk],
    /// The absolute target directory the disks and the definition's files go to.
    pub target: &'a Path,
    pub origin: &'a RestoreOrigin,
}

/// What a definition file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileRole {
    /// The restored definition itself (a command line, a domain XML, a manifest).
    Definition,
    /// What starts (or defines) the restored VM: a script the user runs.
    Start,
}

/// One file a definition puts into the target directory, beside the disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DefinitionFile {
    /// A plain file name (no directories).
    pub name: String,
    pub role: FileRole,
    /// Mode 0755 instead of 0644.
    pub executable: bool,
    #[serde(skip)]
    pub contents: Vec<u8>,
}

/// The recorded definition pointed at the restored disks, as its platform wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredDefinition {
    /// The platform that wrote (and rewrote) the definition.
    pub platform: PlatformKind,
    /// Disk id → image, as the restored definition uses them.
    pub disks: Vec<DefinedDisk>,
    /// Disks of the definition that were not restored: it still uses their original images.
    pub unrestored_disks: Vec<String>,
    /// What the rewrite changed that the user should know.
    pub notes: Vec<String>,
    /// The files to write into the target directory, complete.
    pub files: Vec<DefinitionFile>,
    /// Directories below the target the restored VM needs (created empty, after the files).
    pub directories: Vec<String>,
    /// The platform's own description of the restored definition (QEMU: the rewritten
    /// command line, its sockets, logs and external files), for reports and tests.
    pub details: serde_json::Value,
}

impl RestoredDefinition {
    /// The file with `role`, when the definition writes one.
    pub fn file(&self, role: FileRole) -> Option<&DefinitionFile> {
        self.files.iter().find(|f| f.role == role)
    }
}

/// How the boot test runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootAccel {
    /// Software emulation: works everywhere.
    Tcg,
    /// Whatever the recorded definition asks for (KVM): only where KVM runs guests.
    AsRecorded,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootTestRequest {
    /// The VM's name (for messages and the test VM's name).
    pub vm: String,
    /// The definition as the snapshot recorded it.
    pub recorded: VmDefinition,
    /// The restored disks (every disk of the definition).
    pub disks: Vec<TargetDisk>,
    pub accel: BootAccel,
    /// Until the platform says the VM runs.
    pub start_timeout: Duration,
    /// Until the agent answers (a TCG guest needs ~4 s; slow hosts and real OSes more).
    pub agent_timeout: Duration,
    /// Where the temporary directory (overlays, sockets, logs) goes; default: the system's
    /// temporary directory. Keep it short: unix socket paths end at 107 bytes.
    pub scratch_parent: Option<PathBuf>,
}

impl BootTestRequest {
    pub fn new(vm: String, recorded: VmDefinition, disks: Vec<TargetDisk>) -> Self {
        Self {
            vm,
            recorded,
            disks,
            accel: BootAccel::Tcg,
            start_timeout: Duration::from_secs(30),
            agent_timeout: Duration::from_secs(120),
            scratch_parent: None,
        }
    }
}

/// One filesystem the restored guest's agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootFilesystem {
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    /// The guest's device name (`vda`).
    pub device: String,
}

/// What the boot test saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTestReport {
    /// Every check held.
    pub passed: bool,
    /// The platform reported the VM running (QEMU: QMP `running`).
    pub booted: bool,
    /// The definition has a guest agent channel the test could reach.
    pub agent_channel: bool,
    pub agent_answered: bool,
    pub seconds_to_running: Option<f64>,
    /// From the VM's start to the first answered `guest-ping`.
    pub seconds_to_agent: Option<f64>,
    pub filesystems: Vec<BootFilesystem>,
    /// The guest OS as its agent names it.
    pub os: Option<String>,
    pub restored_images_untouched: bool,
    /// Why it failed.
    pub failure: Option<String>,
    /// The guest console's (or the hypervisor's output's) last lines, on failure.
    pub console_tail: Option<String>,
    /// The command line the test ran (empty where the platform runs none itself).
    pub argv: Vec<String>,
    pub notes: Vec<String>,
}

/// The restore capability of one platform (see the module doc).
#[async_trait]
pub trait VmRestore: Send + Sync {
    /// The platform whose recorded definitions this restores.
    fn platform(&self) -> PlatformKind;

    /// Every file name [`define`](Self::define) may put into the target directory, known
    /// before there is one (so a restore can refuse to overwrite before it creates anything).
    fn file_names(&self) -> Vec<String>;

    /// The recorded definition pointed at the restored disks. Pure.
    fn define(&self, request: &DefineRequest<'_>) -> Result<RestoredDefinition>;

    /// Starts the restored VM once on overlays of the restored disks and sees whether it
    /// comes up.
    async fn boot_test(&self, request: &BootTestRequest) -> Result<BootTestReport>;
}

impl PlatformKind {
    /// This platform's restore capability, when this build has one.
    pub fn restorer(self) -> Option<Arc<dyn VmRestore>> {
        match self {
            PlatformKind::Qemu => Some(Arc::new(crate::qemu::restore::QemuRestore)),
            PlatformKind::Libvirt | PlatformKind::Kubevirt => None,
        }
    }
}

/// The restore capability for `recorded`, picked by the platform that wrote it (its `kind`).
/// `Err` (kind [`PlatformErrorKind::VmDefinition`]) names a platform this build cannot
/// restore.
pub fn restorer_for(recorded: &VmDefinition) -> Result<Arc<dyn VmRestore>> {
    let unusable = |why: String| PlatformError::new(PlatformErrorKind::VmDefinition, why);
    let Some(platform) = recorded.platform() else {
        return Err(unusable(format!(
            "the recorded definition is of kind `{}`, which no platform of this build wrote \
             (it restores qemu definitions)",
            recorded.kind
        )));
    };
    platform.restorer().ok_or_else(|| {
        unusable(format!(
            "the recorded definition was written by the {} platform, whose restore is not part \
             of this build yet (only qemu's is)",
            platform.as_str()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(kind: &str) -> VmDefinition {
        VmDefinition {
            kind: kind.into(),
            argv: vec![],
            disks: vec![],
        }
    }

    #[test]
    fn the_platform_that_wrote_a_definition_picks_its_restore() {
        let qemu = restorer_for(&recorded("qemu")).expect("qemu restores");
        assert_eq!(qemu.platform(), PlatformKind::Qemu);

        let error = restorer_for(&recorded("libvirt")).err().expect("not yet");
        assert_eq!(error.kind(), PlatformErrorKind::VmDefinition);
        assert!(
            error
                .to_string()
                .contains("written by the libvirt platform"),
            "{error}"
        );

        let error = restorer_for(&recorded("cloud-hypervisor"))
            .err()
            .expect("unknown");
        assert!(
            error.to_string().contains("kind `cloud-hypervisor`"),
            "{error}"
        );
    }
}
