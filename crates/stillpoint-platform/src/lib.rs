//! Platform drivers: how stillpoint reaches a VM's guest agent, how it takes a point-in-time
//! capture of the VM's disks and how it reads that capture, and how a restored VM is defined
//! and boot-tested.
//!
//! A platform is the hypervisor stack a VM lives on: plain QEMU now (the embedded default and
//! the test bed), libvirt and KubeVirt later. Drivers are built from small capability traits
//! (agent access, capture, capture reading, restore) held as `Arc<dyn …>`, so the engine
//! composes them without knowing which platform it talks to, and a platform may lack a
//! capability (a VM with no agent channel simply has no agent). The restore capability is
//! reached from the platform that wrote a snapshot's VM definition
//! ([`PlatformKind::restorer`]), since a restore has no running VM to ask.
//!
//! VM references are `NAME` (the default platform, `qemu`) or `PLATFORM:NAME`.

pub mod agent;
pub mod capture;
pub mod error;
pub mod qemu;
pub mod restore;
pub mod runtime;
pub mod vm;

pub use agent::GuestAgent;
pub use capture::{
    Capture, CaptureMode, CaptureRequest, CapturedDisk, FinishReport, PreparedCapture,
    StartedCapture,
};
pub use error::{PlatformError, PlatformErrorKind, Result};
pub use restore::{VmRestore, restorer_for};
pub use vm::{
    DefinedDisk, DiskIdentity, PlatformKind, RunState, Vm, VmDefinition, VmRef, VmStatus,
};

use std::sync::Arc;

/// Every platform driver this build has, ready to resolve VM references.
#[derive(Debug, Clone)]
pub struct Platforms {
    pub qemu: qemu::QemuInventory,
    /// Timeouts for guest agent calls (the freeze timeout is given per call).
    pub agent_timeouts: stillpoint_qga::Timeouts,
}

impl Platforms {
    pub fn new(qemu: qemu::QemuInventory) -> Self {
        Self {
            qemu,
            agent_timeouts: stillpoint_qga::Timeouts::default(),
        }
    }

    /// Finds the VM a reference (`NAME` or `PLATFORM:NAME`) names.
    pub fn resolve(&self, reference: &str) -> Result<Arc<dyn Vm>> {
        let vm_ref = VmRef::parse(reference)?;
        match vm_ref.platform {
            PlatformKind::Qemu => {
                let spec = self.qemu.find(&vm_ref.name)?;
                Ok(Arc::new(qemu::QemuVm::new(spec, self.agent_timeouts)))
            }
            other => Err(PlatformError::new(
                PlatformErrorKind::UnsupportedPlatform,
                format!(
                    "VM `{reference}`: the {} driver is not part of this build yet (only qemu is)",
                    other.as_str()
                ),
            )),
        }
    }
}
