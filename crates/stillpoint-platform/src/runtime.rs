//! Where local state lives: sockets of VMs launched by `stillpoint vm run`, freeze leases.
//!
//! The root is `$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`, else
//! `/tmp/stillpoint-<uid>` — the same rule `stillpoint-testvm` follows when it launches VMs
//! (see docs/local-vms.md).

use std::path::PathBuf;

/// The runtime root, from the environment.
pub fn runtime_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("STILLPOINT_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("stillpoint");
    }
    PathBuf::from(format!("/tmp/stillpoint-{}", nix::unistd::getuid()))
}
