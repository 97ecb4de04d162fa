//! The VM capability every platform provides: its identity, whether it runs, its agent.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::agent::GuestAgent;
use crate::error::{PlatformError, PlatformErrorKind, Result};

/// The platforms a VM reference may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformKind {
    Qemu,
    Libvirt,
    Kubevirt,
}

impl PlatformKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformKind::Qemu => "qemu",
            PlatformKind::Libvirt => "libvirt",
            PlatformKind::Kubevirt => "kubevirt",
        }
    }

    /// The platform named `name` (`qemu`, `libvirt`, `kubevirt`).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Qemu, Self::Libvirt, Self::Kubevirt]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// `NAME` (on the default platform, qemu) or `PLATFORM:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmRef {
    pub platform: PlatformKind,
    pub name: String,
}

impl VmRef {
    pub fn parse(reference: &str) -> Result<Self> {
        let (platform, name) = match reference.split_once(':') {
            None => (PlatformKind::Qemu, reference),
            Some(("qemu", name)) => (PlatformKind::Qemu, name),
            Some(("libvirt", name)) => (PlatformKind::Libvirt, name),
            Some(("kubevirt", name)) => (PlatformKind::Kubevirt, name),
            Some((other, _)) => {
                return Err(PlatformError::new(
                    PlatformErrorKind::UnsupportedPlatform,
                    format!(
                        "VM reference `{reference}`: unknown platform `{other}` (expected qemu, libvirt or kubevirt)"
                    ),
                ));
            }
        };
        if name.is_empty() {
            return Err(PlatformError::new(
                PlatformErrorKind::VmNotFound,
                format!("VM reference `{reference}` has no VM name"),
            ));
        }
        Ok(Self {
            platform,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.platform {
            PlatformKind::Qemu => f.write_str(&self.name),
            other => write!(f, "{}:{}", other.as_str(), self.name),
        }
    }
}

/// Whether the VM runs, as its platform reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    /// The VM exists but its vCPUs do not run (paused, io-error, migrating…).
    Paused,
    /// The VM's process is not there (stopped, shut down or never started).
    NotRunning,
}

/// What the platform says about the VM's state, with the platform's own word for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: RunState,
    /// E.g. QEMU's `running`, `paused`, `io-error`; or why the VM is not running.
    pub detail: String,
}

/// How the guest can recognise one of the VM's disks in the guest agent's
/// `guest-get-fsinfo` (which filesystems a freeze covers on which disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The disk's stable id (the device id, e.g. `vd0`).
    pub id: String,
    /// The serial number the guest sees, when the disk has one.
    pub serial: Option<String>,
    /// The PCI address (bus, slot, function) of the disk's own device (virtio-blk).
    pub pci: Option<(i64, i64, i64)>,
}

/// What is needed to start the VM again: recorded with every snapshot, rewritten at restore
/// (disk images → the restored files, sockets → new ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    /// The platform that wrote it (`qemu`; `libvirt`, `kubevirt` later): it picks the
    /// restore implementation ([`crate::restore::restorer_for`]).
    pub kind: String,
    /// The hypervisor's command line, as it runs now.
    pub argv: Vec<String>,
    /// Disk id → the image file the command line refers to.
    pub disks: Vec<DefinedDisk>,
}

impl VmDefinition {
    /// The platform that wrote it, when this build knows that platform.
    pub fn platform(&self) -> Option<PlatformKind> {
        PlatformKind::from_name(&self.kind)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinedDisk {
    pub id: String,
    pub image: String,
    pub format: String,
}

/// One VM on some platform.
#[async_trait]
pub trait Vm: Send + Sync {
    fn reference(&self) -> &VmRef;
    async fn status(&self) -> Result<VmStatus>;
    /// The guest agent, when the VM has an agent channel at all.
    fn agent(&self) -> Option<Arc<dyn GuestAgent>>;
    /// How the guest sees each of the VM's disks (for matching frozen filesystems to disks).
    async fn disk_identities(&self) -> Result<Vec<DiskIdentity>>;
    /// The capture capability, when the platform can take point-in-time captures. A capture
    /// holds the VM's monitor while it lives (QEMU's takes one client at a time): look at the
    /// VM (`status`, `disk_identities`) before preparing one, or after dropping it.
    fn capture(&self) -> Option<Arc<dyn crate::capture::Capture>>;
    /// What is needed to start the VM again, when the platform can tell.
    async fn definition(&self) -> Result<Option<VmDefinition>>;
    /// Resumes the VM if a capture start paused it and did not resume it (the process died in
    /// between); a VM the user paused is left alone. Returns whether it resumed the VM. The
    /// guardian uses it.
    async fn resume_if_paused(&self) -> Result<bool>;
    /// How to release the capture of a backup that died, when the platform keeps anything of
    /// a capture beyond its process (the capture guardian uses it).
    fn dead_capture_release(&self) -> Option<Arc<dyn crate::capture::DeadCaptureRelease>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_default_platform() {
        assert_eq!(
            VmRef::parse("demo").unwrap(),
            VmRef {
                platform: PlatformKind::Qemu,
                name: "demo".into()
            }
        );
        assert_eq!(VmRef::parse("qemu:demo").unwrap().to_string(), "demo");
        assert_eq!(
            VmRef::parse("kubevirt:ns/vm").unwrap().to_string(),
            "kubevirt:ns/vm"
        );
        let error = VmRef::parse("xen:vm").unwrap_err();
        assert_eq!(error.kind(), PlatformErrorKind::UnsupportedPlatform);
        assert!(error.to_string().contains("unknown platform `xen`"));
        assert!(VmRef::parse("qemu:").is_err());
    }
}
