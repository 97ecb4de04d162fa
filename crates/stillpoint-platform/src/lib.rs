//! Platform drivers: how stillpoint reaches a VM's guest agent, how it takes a point-in-time
//! capture of the VM's disks and how it reads that capture.
//!
//! A platform is the hypervisor stack a VM lives on: plain QEMU now (the embedded default and
//! the test bed), libvirt and KubeVirt later. Drivers are built from small capability traits
//! (agent access, capture, capture reading) held as `Arc<dyn …>`, so the engine composes them
//! without knowing which platform it talks to, and a platform may lack a capability (a VM with
//! no agent channel simply has no agent).
//!
//! VM references are `NAME` (the default platform, `qemu`) or `PLATFORM:NAME`.

pub mod error;
pub mod qemu;
pub mod runtime;

pub use error::{PlatformError, PlatformErrorKind, Result};
