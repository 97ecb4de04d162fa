//! The plain-QEMU driver: VMs reached through their QMP and guest agent unix sockets.

pub mod inventory;

pub use inventory::{QemuInventory, QemuVmSpec, SpecOrigin};
