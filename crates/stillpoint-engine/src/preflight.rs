//! Preflight: gather the facts the consistency decision needs from a live VM.
//!
//! The I/O is here; what the facts mean is decided by [`crate::consistency::assess`]. Parsing
//! of guest output (`/proc/mounts`) is pure and unit-tested.

use std::path::Path;
use std::time::Duration;

use stillpoint_platform::{GuestAgent, RunState, Vm};
use stillpoint_qga::{ExecRequest, FreezeStatus};

use crate::consistency::{
    AgentFacts, FrozenBy, GuestFilesystem, GuestOs, Preflight, ReachableAgent, RecipeFacts,
};
use crate::error::error_chain;
use crate::guardian;

/// How long a preflight guest command may take (it only reads `/proc` and `/sys`).
const GUEST_READ_LIMIT: Duration = Duration::from_secs(10);

/// Everything `check` prints beyond the assessment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PreflightReport {
    pub facts: Preflight,
    /// The platform's word for the VM's state (`running`, `paused`, …).
    pub status_detail: String,
}

/// Looks at the VM and its agent. Never fails because of the guest: an agent that does not
/// answer is a fact (`Unreachable`), not an error. Only a VM that cannot be looked at (its
/// monitor refuses) is an error.
pub async fn gather(
    vm: &dyn Vm,
    recipe: Option<RecipeFacts>,
) -> stillpoint_platform::Result<PreflightReport> {
    gather_with_leases(vm, recipe, None).await
}

/// [`gather`], and for a guest found frozen, who froze it: read from stillpoint's freeze lease
/// of the VM under `runtime_root` (read only; `None`: who is not looked up).
pub async fn gather_with_leases(
    vm: &dyn Vm,
    recipe: Option<RecipeFacts>,
    runtime_root: Option<&Path>,
) -> stillpoint_platform::Result<PreflightReport> {
    let status = vm.status().await?;
    let agent = match (status.state, vm.agent()) {
        (_, None) => AgentFacts::NoChannel,
        (RunState::NotRunning, Some(_)) => AgentFacts::Unreachable {
            reason: "the VM is not running".into(),
        },
        (_, Some(agent)) => {
            let mut facts = agent_facts(agent.as_ref()).await;
            if let (AgentFacts::Reachable(agent), Some(root)) = (&mut facts, runtime_root)
                && agent.already_frozen
            {
                agent.frozen_by = Some(frozen_by(root, &vm.reference().to_string()));
            }
            // Let go of the channel: it takes one client at a time.
            agent.release().await;
            facts
        }
    };
    Ok(PreflightReport {
        facts: Preflight {
            run_state: status.state,
            agent,
            recipe,
        },
        status_detail: status.detail,
    })
}

/// Who froze the VM, from its stillpoint freeze lease (a pause lease is not a freeze).
fn frozen_by(runtime_root: &Path, vm: &str) -> FrozenBy {
    match guardian::read_lease(&guardian::lease_path(runtime_root, vm)) {
        Ok(Some(lease)) if lease.thaw => {
            let now = guardian::now_ms();
            FrozenBy::Stillpoint {
                holder_pid: lease.holder_pid,
                guardian_pid: lease.guardian_pid,
                frozen_for_ms: now.saturating_sub(lease.frozen_at_ms),
                thaws_in_ms: lease
                    .deadline_ms
                    .map(|deadline| deadline.saturating_sub(now)),
            }
        }
        Ok(_) => FrozenBy::NotStillpoint,
        Err(error) => {
            tracing::warn!(
                "cannot read the freeze lease of `{vm}`: {}",
                error_chain(&error)
            );
            FrozenBy::NotStillpoint
        }
    }
}

async fn agent_facts(agent: &dyn GuestAgent) -> AgentFacts {
    let info = match agent.info().await {
        Ok(info) => info,
        Err(error) => {
            return AgentFacts::Unreachable {
                reason: error_chain(&error),
            };
        }
    };
    let freeze_enabled = info.is_enabled("guest-fsfreeze-freeze");
    let exec_enabled = info.is_enabled("guest-exec") && info.is_enabled("guest-exec-status");
    let already_frozen = matches!(agent.freeze_status().await, Ok(FreezeStatus::Frozen));

    let os = agent.os_info().await.ok().map(|os| GuestOs {
        id: os.id.unwrap_or_else(|| "unknown".into()),
        pretty_name: os.pretty_name,
        kernel_release: os.kernel_release,
    });
    let covered_filesystems = match agent.fs_info().await {
        Ok(filesystems) => filesystems
            .into_iter()
            .map(|fs| GuestFilesystem {
                source: fs
                    .disks
                    .iter()
                    .filter_map(|disk| disk.dev.clone().or_else(|| disk.serial.clone()))
                    .next()
                    .unwrap_or(fs.name),
                mountpoint: fs.mountpoint,
                fs_type: fs.fs_type,
            })
            .collect(),
        Err(error) => {
            tracing::warn!("guest-get-fsinfo failed: {}", error_chain(&error));
            Vec::new()
        }
    };
    let is_linux = os.as_ref().is_none_or(|os| !os.is_windows());
    // Frozen guests refuse guest-exec; the extra facts are only read from a thawed guest.
    let can_read = exec_enabled && is_linux && !already_frozen;
    let uncovered_filesystems = if can_read {
        read_guest_file(agent, "/proc/mounts")
            .await
            .map(|mounts| uncovered_mounts(&mounts))
    } else {
        None
    };
    let selinux = if can_read {
        Some(
            match read_guest_file(agent, "/sys/fs/selinux/enforce").await {
                Some(text) if text.trim() == "1" => "enforcing".to_string(),
                Some(text) if text.trim() == "0" => "permissive".to_string(),
                _ => "disabled".to_string(),
            },
        )
    } else {
        None
    };
    AgentFacts::Reachable(Box::new(ReachableAgent {
        version: info.version.clone(),
        freeze_enabled,
        freeze_list_enabled: info.is_enabled("guest-fsfreeze-freeze-list"),
        thaw_enabled: info.is_enabled("guest-fsfreeze-thaw"),
        exec_enabled,
        already_frozen,
        frozen_by: None,
        os,
        covered_filesystems,
        uncovered_filesystems,
        selinux,
    }))
}

/// Reads a small file in the guest with `cat` (argv, no shell); `None` when it cannot be read.
async fn read_guest_file(agent: &dyn GuestAgent, path: &str) -> Option<String> {
    let request = ExecRequest::new("cat", [path]).capture_output(true);
    match agent.run(&request, GUEST_READ_LIMIT).await {
        Ok(status) if status.exit_code == Some(0) => {
            Some(String::from_utf8_lossy(&status.stdout).into_owned())
        }
        Ok(_) => None,
        Err(error) => {
            tracing::debug!(
                "reading {path} in the guest failed: {}",
                error_chain(&error)
            );
            None
        }
    }
}

/// Filesystem types that hold data a guest freeze does not cover: the agent skips network and
/// FUSE filesystems (their device major is 0), so their data is only crash-consistent.
const UNFREEZABLE_DATA_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "virtiofs",
    "ceph",
    "glusterfs",
    "fuseblk",
    "sshfs",
    "lustre",
];

/// The mounts in a `/proc/mounts` text whose data a freeze cannot cover.
pub fn uncovered_mounts(proc_mounts: &str) -> Vec<GuestFilesystem> {
    proc_mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next()?;
            let mountpoint = fields.next()?;
            let fs_type = fields.next()?;
            let unfreezable = UNFREEZABLE_DATA_FS.contains(&fs_type)
                || fs_type == "fuse"
                || fs_type.starts_with("fuse.");
            unfreezable.then(|| GuestFilesystem {
                mountpoint: unescape_mount_field(mountpoint),
                fs_type: fs_type.to_string(),
                source: unescape_mount_field(source),
            })
        })
        .collect()
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_mounts_are_uncovered_and_local_ones_are_not() {
        let mounts = "rootfs / rootfs rw 0 0\n\
                      proc /proc proc rw 0 0\n\
                      /dev/vda /data ext4 rw,relatime 0 0\n\
                      nas:/export /mnt/my\\040share nfs4 rw 0 0\n\
                      sshfs#me@host: /mnt/remote fuse.sshfs rw 0 0\n\
                      tmpfs /run tmpfs rw 0 0\n";
        let uncovered = uncovered_mounts(mounts);
        assert_eq!(
            uncovered,
            vec![
                GuestFilesystem {
                    mountpoint: "/mnt/my share".into(),
                    fs_type: "nfs4".into(),
                    source: "nas:/export".into()
                },
                GuestFilesystem {
                    mountpoint: "/mnt/remote".into(),
                    fs_type: "fuse.sshfs".into(),
                    source: "sshfs#me@host:".into()
                },
            ]
        );
    }

    #[test]
    fn truncated_lines_and_trailing_backslashes_do_not_panic() {
        assert!(uncovered_mounts("nfs-only-one-field\n\\\n").is_empty());
        assert_eq!(unescape_mount_field("a\\04"), "a\\04");
        assert_eq!(unescape_mount_field("tab\\011x"), "tab\tx");
    }
}
