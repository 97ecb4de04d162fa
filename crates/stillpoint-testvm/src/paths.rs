//! Where things live on the host: the runtime root of launched VMs, the guest image cache,
//! and the host tools found on `PATH`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Environment variable that overrides the runtime root.
pub const RUNTIME_DIR_ENV: &str = "STILLPOINT_RUNTIME_DIR";
/// Environment variable that overrides the guest image cache directory.
pub const GUEST_DIR_ENV: &str = "STILLPOINT_GUEST_DIR";

/// The runtime root for VMs: `$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`,
/// else `/tmp/stillpoint-<uid>`. Each VM gets `<root>/vms/<name>/`.
pub fn default_runtime_root() -> PathBuf {
    runtime_root_from(
        std::env::var_os(RUNTIME_DIR_ENV).as_deref(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        nix::unistd::getuid().as_raw(),
    )
}

fn runtime_root_from(explicit: Option<&OsStr>, xdg: Option<&OsStr>, uid: u32) -> PathBuf {
    if let Some(dir) = explicit.filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = xdg.filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("stillpoint");
    }
    PathBuf::from(format!("/tmp/stillpoint-{uid}"))
}

/// The directory of one VM under a runtime root.
pub fn vm_dir(root: &Path, name: &str) -> PathBuf {
    root.join("vms").join(name)
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
pub(crate) fn validate_vm_name(name: &str) -> Result<()> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 64 || !valid_chars || !starts_well {
        return Err(Error::invalid(
            "VM name",
            format!(
                "`{name}` must be 1 to 64 characters of letters, digits, `-`, `_` or `.`, \
                 starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Longest path a Unix socket can have (`sun_path` is 108 bytes including the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_root_prefers_explicit_then_xdg_then_tmp() {
        let explicit = OsStr::new("/srv/sp");
        let xdg = OsStr::new("/run/user/7");
        assert_eq!(
            runtime_root_from(Some(explicit), Some(xdg), 7),
            PathBuf::from("/srv/sp")
        );
        assert_eq!(
            runtime_root_from(Some(OsStr::new("")), Some(xdg), 7),
            PathBuf::from("/run/user/7/stillpoint")
        );
        assert_eq!(
            runtime_root_from(None, None, 7),
            PathBuf::from("/tmp/stillpoint-7")
        );
    }

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
