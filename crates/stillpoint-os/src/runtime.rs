//! The runtime directory: where launched VMs (agent and monitor sockets, scratch images with
//! guest data in clear), freeze leases and recipe-run states live.
//!
//! The root is `$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`, else
//! `/tmp/stillpoint-<uid>` (see docs/local-vms.md). Under a shared `/tmp` anyone could create
//! that name first, so [`ensure_private`] creates the root 0700 and refuses one that someone
//! else owns or that group/others may write.

use std::ffi::OsStr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable that overrides the runtime root.
pub const RUNTIME_DIR_ENV: &str = "STILLPOINT_RUNTIME_DIR";

/// The runtime root from the environment (not created; see [`ensure_private`]).
pub fn runtime_root() -> PathBuf {
    runtime_root_from(
        std::env::var_os(RUNTIME_DIR_ENV).as_deref(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        nix::unistd::getuid().as_raw(),
    )
}

/// The rule itself: an explicit directory, else `<xdg>/stillpoint`, else
/// `/tmp/stillpoint-<uid>`; empty values count as unset.
pub fn runtime_root_from(explicit: Option<&OsStr>, xdg: Option<&OsStr>, uid: u32) -> PathBuf {
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

/// Makes `dir` a private directory of this user: creates it (and missing parents) with mode
/// 0700, refuses it when it (or a symlink standing for it) belongs to another user, is not a
/// directory, or group/others may write it; a directory of ours that others may only read
/// (made by an older stillpoint with default permissions) is narrowed to 0700.
pub fn ensure_private(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(source) => {
            // `recursive` reports an existing non-directory as AlreadyExists too: the checks
            // below say what is there.
            if source.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(Error::RuntimeDirIo {
                    path: dir.to_owned(),
                    action: "create it",
                    source,
                });
            }
        }
    }
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |problem: String| Error::RuntimeDir {
        path: dir.to_owned(),
        problem,
    };
    let link = std::fs::symlink_metadata(dir).map_err(|source| Error::RuntimeDirIo {
        path: dir.to_owned(),
        action: "inspect it",
        source,
    })?;
    if link.file_type().is_symlink() && link.uid() != me {
        return Err(refuse(format!(
            "it is a symbolic link owned by uid {}, not by you (uid {me}); remove it",
            link.uid()
        )));
    }
    let meta = std::fs::metadata(dir).map_err(|source| Error::RuntimeDirIo {
        path: dir.to_owned(),
        action: "inspect it",
        source,
    })?;
    check_private(&meta, me).map_err(refuse)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700)).map_err(
            |source| Error::RuntimeDirIo {
                path: dir.to_owned(),
                action: "make it private (chmod 0700)",
                source,
            },
        )?;
    }
    Ok(())
}

/// Why a directory with metadata `meta` must not be used by user `me` (`Err` names it).
fn check_private(meta: &std::fs::Metadata, me: u32) -> std::result::Result<(), String> {
    if !meta.is_dir() {
        return Err("it exists and is not a directory".into());
    }
    if meta.uid() != me {
        return Err(format!(
            "it is owned by uid {}, not by you (uid {me}); someone else may have created it \
             first — remove it or set {RUNTIME_DIR_ENV} to a directory of yours",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "group or others may write it (mode {mode:04o}); it holds sockets and guest data — \
             remove it, or `chmod 0700` it if you trust what is inside"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

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
            runtime_root_from(None, Some(OsStr::new("")), 7),
            PathBuf::from("/tmp/stillpoint-7")
        );
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_root_is_created_0700() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("stillpoint-1000");
        ensure_private(&root).expect("create");
        assert_eq!(mode(&root), 0o700);
        ensure_private(&root).expect("again");
    }

    #[test]
    fn a_readable_root_of_ours_is_narrowed() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("old");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private(&root).expect("narrowed");
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn a_root_others_may_write_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("shared");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let error = ensure_private(&root).expect_err("refused").to_string();
        assert!(error.contains(&root.display().to_string()), "{error}");
        assert!(error.contains("others may write"), "{error}");
        assert_eq!(mode(&root), 0o1777, "a refused directory is left alone");
    }

    #[test]
    fn a_file_in_the_way_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("file");
        std::fs::write(&root, b"").unwrap();
        let error = ensure_private(&root).expect_err("refused").to_string();
        assert!(error.contains("not a directory"), "{error}");
    }

    #[test]
    fn a_root_owned_by_someone_else_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("theirs");
        std::fs::create_dir(&root).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        if me == 0 {
            // As root, really hand it to someone else.
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
            let error = ensure_private(&root).expect_err("refused").to_string();
            assert!(error.contains("owned by uid 65534"), "{error}");
            assert!(error.contains(&root.display().to_string()), "{error}");
        }
        // Unprivileged, the rule itself is checked against the metadata with another `me`.
        let meta = std::fs::metadata(parent.path()).unwrap();
        let error = check_private(&meta, meta.uid().wrapping_add(1)).expect_err("refused");
        assert!(error.contains("not by you"), "{error}");
    }

    #[test]
    fn a_symlink_planted_by_someone_else_is_refused() {
        if nix::unistd::geteuid().as_raw() != 0 {
            return; // only root can give a symlink away; the owner rule is tested above
        }
        let parent = tempfile::tempdir().unwrap();
        let target = parent.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = parent.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let error = ensure_private(&link).expect_err("refused").to_string();
        assert!(
            error.contains("symbolic link owned by uid 65534"),
            "{error}"
        );
    }
}
