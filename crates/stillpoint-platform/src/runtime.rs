//! Where local state lives: sockets of VMs launched by `stillpoint vm run`, freeze leases.
//!
//! The rule (`$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`, else
//! `/tmp/stillpoint-<uid>`, created private) has one home, `stillpoint_os::runtime`, shared with
//! `stillpoint-testvm` (see docs/local-vms.md).

pub use stillpoint_os::runtime::{RUNTIME_DIR_ENV, ensure_private, runtime_root};
