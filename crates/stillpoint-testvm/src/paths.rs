//! Where things live on the host: the runtime root of launched VMs, the guest image cache,
//! and the host tools found on `PATH`.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Environment variable that overrides the runtime root.
pub use stillpoint_os::runtime::RUNTIME_DIR_ENV;
/// Environment variable that overrides the guest image cache directory.
pub const GUEST_DIR_ENV: &str = "STILLPOINT_GUEST_DIR";

/// The runtime root for VMs: `$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`,
/// else `/tmp/stillpoint-<uid>` (the rule's one home is `stillpoint_os::runtime`; launching a
/// VM creates the root private, see [`crate::LaunchedVm`]). Each VM gets `<root>/vms/<name>/`.
pub fn default_runtime_root() -> PathBuf {
    stillpoint_os::runtime::runtime_root()
}

/// The directory of one VM under a runtime root.
pub use stillpoint_os::runtime::vm_dir;

/// Creates the runtime root private (0700) or refuses one that is not (see
/// `stillpoint_os::runtime::ensure_private`).
pub(crate) fn ensure_private_root(root: &Path) -> Result<()> {
    stillpoint_os::runtime::ensure_private(root)
        .map_err(|error| Error::new(ErrorKind::Io, error.to_string()).with_path(root))
}

/// The guest image cache: `$STILLPOINT_GUEST_DIR`, else `<workspace>/target/stillpoint-guest`
/// (the workspace this crate was built in, or `$CARGO_TARGET_DIR` when set at run time), else
/// `$XDG_CACHE_HOME/stillpoint/guest` or `~/.cache/stillpoint/guest` for a binary that runs
/// away from its source tree.
pub fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(GUEST_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("stillpoint-guest");
    }
    // This crate sits at <workspace>/crates/stillpoint-testvm.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("Cargo.toml").is_file() {
        let workspace = workspace.canonicalize().unwrap_or(workspace);
        return workspace.join("target").join("stillpoint-guest");
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("stillpoint/guest");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/stillpoint/guest")
}

/// Finds an executable on `PATH` (a few lines, so not worth the `which` crate), with an error
/// that says which Debian package provides it.
pub(crate) fn find_tool(name: &str, debian_package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(Error::new(
        ErrorKind::ToolMissing,
        format!(
            "`{name}` is not on PATH; install the Debian package `{debian_package}` \
             (scripts/install-deps.sh does)"
        ),
    ))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Checks a VM name: it becomes a directory name, part of socket paths and QEMU's `-name`.
/// The rule's one home is `stillpoint_os::names::validate_name`.
pub(crate) fn validate_vm_name(name: &str) -> Result<()> {
    stillpoint_os::names::validate_name("VM name", name)
        .map_err(|error| Error::new(ErrorKind::InvalidConfig, error.to_string()))
}

/// Longest path a Unix socket can have (`sun_path` is 108 bytes including the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_checked() {
        for good in ["demo", "vm-1", "a.b_c", "9"] {
            assert!(validate_vm_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "../x", "a/b", "a b", "é", &"x".repeat(65)] {
            let error = validate_vm_name(bad).expect_err(bad);
            assert_eq!(error.kind(), ErrorKind::InvalidConfig);
            assert!(error.to_string().contains("VM name"), "{error}");
        }
    }

    #[test]
    fn missing_tool_names_the_package() {
        let error = find_tool("stillpoint-no-such-tool", "no-such-pkg").expect_err("missing");
        assert_eq!(error.kind(), ErrorKind::ToolMissing);
        assert!(error.to_string().contains("no-such-pkg"), "{error}");
    }
}
