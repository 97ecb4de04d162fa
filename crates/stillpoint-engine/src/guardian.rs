//! The freeze guardian: whatever froze a guest, something thaws it — also when the process
//! that froze it is killed (SIGKILL included).
//!
//! Before a freeze, the freezer writes a **lease** (`<runtime>/leases/<vm>.json`) and starts a
//! guardian: a small detached process (`stillpoint __guardian --lease FILE`, in its own session
//! so a signal to the freezer's process group does not reach it). The guardian polls the lease:
//!
//! | lease state                                   | guardian does                              |
//! |-----------------------------------------------|--------------------------------------------|
//! | gone, or its token changed                    | exits: someone thawed (or a new freeze owns it) |
//! | `thaw_now` set (a freeze call timed out)      | thaws as soon as the agent answers         |
//! | `watch_holder` and the holder process is dead | thaws at once (a backup died while frozen) |
//! | deadline passed                               | stops a still-living holder, then thaws    |
//! | otherwise                                     | waits                                      |
//!
//! A lease may also (or only) guard a pause: the capture start pauses the vCPUs for a few ms;
//! a guardian whose lease says `resume_if_paused` resumes a VM it finds paused first.
//!
//! A third kind guards a **capture's whole life** (`release_capture`, its own lease file
//! `<vm>.capture.json`, written before the capture is prepared and removed once it is
//! finished): a backup killed at any point leaves the capture in the hypervisor (on QEMU a
//! copy-before-write filter, an NBD export and a scratch file that grows with every guest
//! write). Its guardian watches the backup only — no deadline, a copy may take hours — and once
//! the backup is gone calls the platform's release of a dead capture
//! (`stillpoint_platform::capture::DeadCaptureRelease`), the same recovery the next backup's
//! prepare would run. A living backup is never disturbed: the guardian acts only after its
//! holder died (and on QEMU the living backup holds the monitor, so nothing else could talk to
//! QEMU anyway).
//!
//! Thawing retries until the agent answers (the agent's channel takes one client at a time, and
//! a freeze stuck in a guest hook keeps the agent busy until the hook returns), then verifies
//! the guest reports `thawed`, removes the lease and exits. The decision is the pure function
//! [`decide`]; the loop around it is [`watch`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::{EngineError, Result};

/// How often the guardian looks at its lease and the holder.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the guardian keeps trying to thaw before it gives up (a hook that never returns).
pub const THAW_GIVE_UP: Duration = Duration::from_secs(3600);

/// The contract between a freezer and its guardian, stored as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The VM reference, as the user gave it.
    pub vm: String,
    /// The configuration file the freezer used, so the guardian resolves the VM the same way.
    pub config: Option<PathBuf>,
    /// The runtime root the freezer used (launched VMs and leases live there).
    pub runtime_root: PathBuf,
    /// Identifies one freeze; a lease with another token belongs to someone else.
    pub token: String,
    /// The process that froze the guest.
    pub holder_pid: u32,
    /// Thaw as soon as the holder dies (backups); `false` for `stillpoint freeze`, whose
    /// process exits right after freezing.
    pub watch_holder: bool,
    /// When the guest was frozen (or the freeze was asked for), in ms since the Unix epoch.
    pub frozen_at_ms: u64,
    /// Thaw at this time (ms since the Unix epoch); `None`: never on its own.
    pub deadline_ms: Option<u64>,
    /// Thaw as soon as possible (set when a freeze call timed out).
    pub thaw_now: bool,
    /// The guardian watching this lease, once it runs.
    pub guardian_pid: Option<u32>,
    /// The guest may be frozen: thaw it (`false` for a lease that only guards a pause).
    #[serde(default = "yes")]
    pub thaw: bool,
    /// The holder may pause the VM's vCPUs (the capture start does, for a few ms): resume a
    /// VM found paused before thawing (a paused guest cannot answer its agent).
    #[serde(default)]
    pub resume_if_paused: bool,
    /// The holder keeps a capture of the VM: release it once the holder is dead (the lease
    /// guards the capture's whole life, not a freeze).
    #[serde(default)]
    pub release_capture: bool,
}

fn yes() -> bool {
    true
}

/// What the guardian should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do: the lease is gone or belongs to another freeze.
    Exit,
    Wait,
    Thaw {
        reason: ThawReason,
        stop_holder: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThawReason {
    FreezeTimedOut,
    HolderDied,
    DeadlinePassed,
    /// The backup that held a capture died (a capture lease).
    CaptureHolderDied,
}

impl std::fmt::Display for ThawReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThawReason::FreezeTimedOut => "the freeze call timed out",
            ThawReason::HolderDied => "the process that froze the guest died",
            ThawReason::DeadlinePassed => "the unfreeze timeout passed without an unfreeze",
            ThawReason::CaptureHolderDied => "the backup that held the capture died",
        })
    }
}

/// The guardian's decision, from the lease as it is now, the token it guards, the time and
/// whether the holder process still lives.
pub fn decide(lease: Option<&Lease>, token: &str, now_ms: u64, holder_alive: bool) -> Decision {
    let Some(lease) = lease.filter(|lease| lease.token == token) else {
        return Decision::Exit;
    };
    if lease.thaw_now {
        return Decision::Thaw {
            reason: ThawReason::FreezeTimedOut,
            stop_holder: false,
        };
    }
    if lease.watch_holder && !holder_alive {
        return Decision::Thaw {
            reason: if lease.release_capture {
                ThawReason::CaptureHolderDied
            } else {
                ThawReason::HolderDied
            },
            stop_holder: false,
        };
    }
    match lease.deadline_ms {
        Some(deadline) if now_ms >= deadline => Decision::Thaw {
            reason: ThawReason::DeadlinePassed,
            stop_holder: lease.watch_holder && holder_alive,
        },
        _ => Decision::Wait,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the lease of a VM lives.
pub fn lease_path(runtime_root: &Path, vm: &str) -> PathBuf {
    let file = stillpoint_os::names::file_name(vm);
    runtime_root.join("leases").join(format!("{file}.json"))
}

/// Where the lease guarding a capture start's pause (no freeze) of a VM lives: apart from
/// the freeze lease, so that guarding a pause never disturbs a freeze someone else holds.
pub fn pause_lease_path(runtime_root: &Path, vm: &str) -> PathBuf {
    lease_path(runtime_root, vm).with_extension("pause.json")
}

/// Where the lease guarding a capture's whole life (from before `prepare` to after `finish`)
/// of a VM lives: apart from the freeze and pause leases, which come and go inside it.
pub fn capture_lease_path(runtime_root: &Path, vm: &str) -> PathBuf {
    lease_path(runtime_root, vm).with_extension("capture.json")
}

/// Whether a lease found where a new one is to be written still protects something, so that
/// writing over it would silently end that protection. A freeze lease lives while its holder
/// is watched and alive or its guardian still runs (`stillpoint freeze` exits right after the
/// freeze and leaves the guest to its guardian). A capture lease lives only while its backup
/// does: once the backup is dead, its guardian's release and the new backup's recovery do the
/// same work, so a new backup need not wait for the old guardian.
pub fn lease_is_live(lease: &Lease, holder_alive: bool, guardian_alive: bool) -> bool {
    let holder_live = lease.watch_holder && holder_alive;
    if lease.release_capture {
        holder_live
    } else {
        holder_live || guardian_alive
    }
}

/// Reads a lease; `Ok(None)` when there is none.
pub fn read_lease(path: &Path) -> Result<Option<Lease>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| EngineError::lease(path, format!("malformed lease: {error}"))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(EngineError::lease(path, "cannot read the lease").with_source(error)),
    }
}

/// Writes a lease atomically (temp file + rename), so the guardian never reads half of one.
pub fn write_lease(path: &Path, lease: &Lease) -> Result<()> {
    let dir = path.parent().expect("lease paths have a parent");
    std::fs::create_dir_all(dir).map_err(|error| {
        EngineError::lease(dir, "cannot create the lease directory").with_source(error)
    })?;
    let bytes = serde_json::to_vec_pretty(lease).expect("a lease always serialises");
    stillpoint_os::fs::write_atomically(path, &bytes)
        .map_err(|error| EngineError::lease(path, "cannot write the lease").with_source(error))
}

/// Removes a lease if it still carries `token` (never someone else's).
pub fn remove_lease(path: &Path, token: &str) -> Result<bool> {
    match read_lease(path)? {
        Some(lease) if lease.token == token => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => {
                Err(EngineError::lease(path, "cannot remove the lease").with_source(error))
            }
        },
        _ => Ok(false),
    }
}

/// Whether a process lives (a zombie counts as dead: it froze nothing any more).
pub use stillpoint_os::process::process_alive;

/// A fresh random token for a lease.
pub fn new_token() -> String {
    format!("{:016x}{:08x}", rand::random::<u64>(), std::process::id())
}

/// How to start the guardian process: the program and the arguments before `--lease FILE`.
#[derive(Debug, Clone)]
pub struct GuardianCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl GuardianCommand {
    /// The running `stillpoint` binary's hidden `__guardian` command.
    pub fn current_exe() -> Result<Self> {
        let program = std::env::current_exe().map_err(|error| {
            EngineError::guardian("cannot find the stillpoint executable").with_source(error)
        })?;
        Ok(Self {
            program,
            args: vec!["__guardian".into()],
        })
    }

    /// Starts a guardian for the lease at `lease` and waits until it reports that it watches.
    pub async fn spawn(&self, lease: &Path) -> Result<u32> {
        let log = lease.with_extension("guardian.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|error| {
                EngineError::lease(&log, "cannot open the guardian log").with_source(error)
            })?;
        let mut child = tokio::process::Command::from(stillpoint_os::child::command(&self.program))
            .args(&self.args)
            .arg("--lease")
            .arg(lease)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(false)
            .spawn()
            .map_err(|error| {
                EngineError::guardian(format!(
                    "cannot start the guardian {}",
                    self.program.display()
                ))
                .with_source(error)
            })?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line.trim() == GUARDIAN_READY => {
                // The guardian lives on in its own session; reap it in the background so it
                // never lingers as a zombie of ours.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                Ok(pid)
            }
            other => {
                let _ = child.start_kill();
                Err(EngineError::guardian(format!(
                    "the guardian did not report ready ({other:?}); see {}",
                    log.display()
                )))
            }
        }
    }
}

/// The line a guardian prints on stdout once it watches its lease.
pub const GUARDIAN_READY: &str = "stillpoint-guardian: watching";

/// What a finished guardian did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardianOutcome {
    /// The lease went away or changed hands: nothing to do.
    Released,
    /// The guardian thawed the guest.
    Thawed {
        reason: ThawReason,
        filesystems: u32,
    },
    /// The guest was no longer frozen (or the VM was gone) when the guardian acted.
    NothingToThaw { reason: ThawReason, detail: String },
    /// The guardian released the capture of a dead backup: what it did, a sentence a step
    /// (empty: the hypervisor kept nothing of it).
    CaptureReleased {
        reason: ThawReason,
        steps: Vec<String>,
    },
}

/// One attempt to thaw, as the caller performs it against the real agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThawAttempt {
    /// Thawed this many filesystems and the agent reports `thawed`.
    Thawed(u32),
    /// The guest was not frozen, or the VM is gone: nothing to do.
    NotFrozen(String),
    /// Released the capture of a dead backup (capture leases): the steps done.
    Released(Vec<String>),
    /// Try again later (agent busy, channel held by another client, …).
    Retry(String),
}

/// The guardian's loop: watch the lease, and when [`decide`] says so, call `thaw` until it
/// succeeds (or [`THAW_GIVE_UP`] passes). `stop_holder` is called when the holder must be
/// stopped first (a deadline passed while it still lives).
pub async fn watch<T, F>(
    lease_file: &Path,
    mut thaw: T,
    stop_holder: impl Fn(u32),
) -> Result<GuardianOutcome>
where
    T: FnMut() -> F,
    F: Future<Output = ThawAttempt>,
{
    let first = read_lease(lease_file)?
        .ok_or_else(|| EngineError::lease(lease_file, "there is no lease to guard"))?;
    let token = first.token.clone();
    let (reason, holder) = loop {
        let lease = read_lease(lease_file).unwrap_or_else(|error| {
            // A lease we cannot read must not make the guardian give up its guest.
            tracing::warn!("{error}; keeping the last lease read");
            Some(first.clone())
        });
        let holder_alive = lease
            .as_ref()
            .is_some_and(|lease| process_alive(lease.holder_pid));
        match decide(lease.as_ref(), &token, now_ms(), holder_alive) {
            Decision::Exit => return Ok(GuardianOutcome::Released),
            Decision::Wait => tokio::time::sleep(POLL_INTERVAL).await,
            Decision::Thaw {
                reason,
                stop_holder: stop,
            } => {
                let holder = lease.map(|lease| lease.holder_pid).unwrap_or(0);
                if stop {
                    stop_holder(holder);
                }
                break (reason, holder);
            }
        }
    };
    tracing::warn!("acting: {reason} (holder pid {holder})");
    let give_up = tokio::time::Instant::now() + THAW_GIVE_UP;
    loop {
        match thaw().await {
            ThawAttempt::Thawed(filesystems) => {
                remove_lease(lease_file, &token)?;
                return Ok(GuardianOutcome::Thawed {
                    reason,
                    filesystems,
                });
            }
            ThawAttempt::NotFrozen(detail) => {
                remove_lease(lease_file, &token)?;
                return Ok(GuardianOutcome::NothingToThaw { reason, detail });
            }
            ThawAttempt::Released(steps) => {
                remove_lease(lease_file, &token)?;
                return Ok(GuardianOutcome::CaptureReleased { reason, steps });
            }
            ThawAttempt::Retry(why) => {
                if tokio::time::Instant::now() >= give_up {
                    return Err(EngineError::guardian(format!(
                        "gave up thawing after {} s: {why}",
                        THAW_GIVE_UP.as_secs()
                    )));
                }
                tracing::info!("thaw not possible yet: {why}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            vm: "demo".into(),
            config: None,
            runtime_root: "/run/sp".into(),
            token: "t1".into(),
            holder_pid: 10,
            watch_holder: false,
            frozen_at_ms: 1_000,
            deadline_ms: Some(301_000),
            thaw_now: false,
            guardian_pid: None,
            thaw: true,
            resume_if_paused: false,
            release_capture: false,
        }
    }

    fn capture_lease() -> Lease {
        Lease {
            watch_holder: true,
            deadline_ms: None,
            thaw: false,
            release_capture: true,
            ..lease()
        }
    }

    #[test]
    fn a_capture_lease_waits_as_long_as_its_backup_lives_and_releases_once_it_died() {
        let lease = capture_lease();
        // No deadline: a copy may take hours, and a living backup is never disturbed.
        assert_eq!(decide(Some(&lease), "t1", u64::MAX, true), Decision::Wait);
        assert_eq!(
            decide(Some(&lease), "t1", 2_000, false),
            Decision::Thaw {
                reason: ThawReason::CaptureHolderDied,
                stop_holder: false
            }
        );
        assert_eq!(
            ThawReason::CaptureHolderDied.to_string(),
            "the backup that held the capture died"
        );
    }

    #[test]
    fn a_capture_lease_is_live_only_while_its_backup_is() {
        let capture = capture_lease();
        assert!(lease_is_live(&capture, true, true));
        assert!(lease_is_live(&capture, true, false));
        // The backup died; its guardian may still be releasing — the next backup's recovery
        // does the same work, so the lease may be taken over.
        assert!(!lease_is_live(&capture, false, true));
        assert!(!lease_is_live(&capture, false, false));

        let mut freeze = lease();
        // `stillpoint freeze` exited (not watched): its guardian holds the guest.
        assert!(lease_is_live(&freeze, false, true));
        assert!(!lease_is_live(&freeze, false, false));
        freeze.watch_holder = true;
        assert!(lease_is_live(&freeze, true, false));
    }

    #[test]
    fn an_older_lease_without_the_capture_field_reads_as_a_freeze_lease() {
        let mut value = serde_json::to_value(lease()).unwrap();
        value.as_object_mut().unwrap().remove("release_capture");
        let read: Lease = serde_json::from_value(value).unwrap();
        assert!(!read.release_capture);
    }

    #[tokio::test]
    async fn watch_releases_a_dead_backups_capture_and_removes_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = capture_lease_path(dir.path(), "demo");
        let mut lease = capture_lease();
        lease.holder_pid = u32::MAX - 1; // no such process: the backup is dead
        write_lease(&path, &lease).unwrap();
        let mut attempts = 0;
        let outcome = watch(
            &path,
            || {
                attempts += 1;
                let attempt = attempts;
                async move {
                    if attempt < 2 {
                        ThawAttempt::Retry("the monitor is busy".into())
                    } else {
                        ThawAttempt::Released(vec!["delete the NBD export `sp-exp-disk0`".into()])
                    }
                }
            },
            |_| panic!("a dead holder is not stopped"),
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            GuardianOutcome::CaptureReleased {
                reason: ThawReason::CaptureHolderDied,
                steps: vec!["delete the NBD export `sp-exp-disk0`".into()]
            }
        );
        assert_eq!(attempts, 2);
        assert!(!path.exists(), "the lease is removed after the release");
    }

    #[test]
    fn gone_or_foreign_lease_means_exit() {
        assert_eq!(decide(None, "t1", 0, true), Decision::Exit);
        let mut other = lease();
        other.token = "t2".into();
        assert_eq!(decide(Some(&other), "t1", 0, true), Decision::Exit);
    }

    #[test]
    fn waits_until_deadline_even_when_freeze_command_exited() {
        let lease = lease();
        assert_eq!(decide(Some(&lease), "t1", 300_999, false), Decision::Wait);
        assert_eq!(
            decide(Some(&lease), "t1", 301_000, false),
            Decision::Thaw {
                reason: ThawReason::DeadlinePassed,
                stop_holder: false
            }
        );
    }

    #[test]
    fn no_deadline_waits_forever() {
        let mut lease = lease();
        lease.deadline_ms = None;
        assert_eq!(decide(Some(&lease), "t1", u64::MAX, false), Decision::Wait);
    }

    #[test]
    fn watched_holder_death_thaws_at_once() {
        let mut lease = lease();
        lease.watch_holder = true;
        assert_eq!(decide(Some(&lease), "t1", 2_000, true), Decision::Wait);
        assert_eq!(
            decide(Some(&lease), "t1", 2_000, false),
            Decision::Thaw {
                reason: ThawReason::HolderDied,
                stop_holder: false
            }
        );
    }

    #[test]
    fn deadline_with_living_watched_holder_stops_it_first() {
        let mut lease = lease();
        lease.watch_holder = true;
        assert_eq!(
            decide(Some(&lease), "t1", 400_000, true),
            Decision::Thaw {
                reason: ThawReason::DeadlinePassed,
                stop_holder: true
            }
        );
    }

    #[test]
    fn timed_out_freeze_thaws_now() {
        let mut lease = lease();
        lease.thaw_now = true;
        assert_eq!(
            decide(Some(&lease), "t1", 0, true),
            Decision::Thaw {
                reason: ThawReason::FreezeTimedOut,
                stop_holder: false
            }
        );
    }

    #[test]
    fn lease_round_trip_and_token_guarded_removal() {
        let dir = tempfile::tempdir().unwrap();
        let path = lease_path(dir.path(), "qemu:demo vm");
        // Escaped injectively (`qemu:demo_vm` gets another file).
        assert!(path.ends_with("leases/qemu%3Ademo%20vm.json"), "{path:?}");
        assert_ne!(path, lease_path(dir.path(), "qemu:demo_vm"));
        assert!(pause_lease_path(dir.path(), "demo").ends_with("leases/demo.pause.json"));
        assert!(capture_lease_path(dir.path(), "demo").ends_with("leases/demo.capture.json"));
        assert_eq!(read_lease(&path).unwrap(), None);
        write_lease(&path, &lease()).unwrap();
        assert_eq!(read_lease(&path).unwrap(), Some(lease()));
        assert!(!remove_lease(&path, "other").unwrap());
        assert!(path.exists());
        assert!(remove_lease(&path, "t1").unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn malformed_lease_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{not json").unwrap();
        let message = read_lease(&path).unwrap_err().to_string();
        assert!(message.contains("bad.json"), "{message}");
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }

    #[tokio::test]
    async fn watch_thaws_after_holder_death_and_retries_until_agent_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        let mut lease = lease();
        lease.watch_holder = true;
        lease.holder_pid = u32::MAX - 1; // no such process: the holder is dead
        write_lease(&path, &lease).unwrap();
        let mut attempts = 0;
        let outcome = watch(
            &path,
            || {
                attempts += 1;
                let attempt = attempts;
                async move {
                    if attempt < 3 {
                        ThawAttempt::Retry("busy".into())
                    } else {
                        ThawAttempt::Thawed(1)
                    }
                }
            },
            |_| panic!("a dead holder is not stopped"),
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            GuardianOutcome::Thawed {
                reason: ThawReason::HolderDied,
                filesystems: 1
            }
        );
        assert_eq!(attempts, 3);
        assert!(!path.exists(), "the lease is removed after the thaw");
    }

    #[tokio::test]
    async fn watch_exits_when_lease_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        let mut lease = lease();
        lease.deadline_ms = None;
        write_lease(&path, &lease).unwrap();
        let release = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                remove_lease(&path, "t1").unwrap();
            })
        };
        let outcome = watch(&path, || async { ThawAttempt::Thawed(0) }, |_| {})
            .await
            .unwrap();
        release.await.unwrap();
        assert_eq!(outcome, GuardianOutcome::Released);
    }
}
