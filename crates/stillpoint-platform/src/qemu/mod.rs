//! The plain-QEMU driver: VMs reached through their QMP and guest agent unix sockets.

pub mod capture;
pub mod inventory;
pub mod restore;
pub mod vm;

pub use inventory::{QemuInventory, QemuVmSpec, SpecOrigin};
pub use vm::QemuVm;
