//! Guarded freeze and thaw of a VM's filesystems.
//!
//! Every freeze stillpoint makes is covered by a lease and a guardian process (see
//! [`crate::guardian`]) started **before** the freeze is asked for, so that no path — an
//! error, a timeout, SIGKILL of the freezer — leaves the guest frozen:
//! - [`freeze_vm`] / [`unfreeze_vm`]: the `stillpoint freeze` / `unfreeze` commands, with
//!   KubeVirt virt-freezer's semantics (no agent or not running → nothing to do, success;
//!   freezing a frozen guest does not stack; the guardian thaws after the unfreeze timeout).
//! - [`GuardedFreeze`]: the freeze a backup holds across the capture start only; its guardian
//!   thaws at once if the backup process dies.
//! - [`CaptureGuard`]: a backup's capture, covered from before `prepare` to after `finish`;
//!   its guardian releases the capture through the platform once the backup is gone.
//! - [`thaw_attempt`]: what a guardian does when its time has come.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use stillpoint_platform::{GuestAgent, RunState, Vm};
use stillpoint_qga::{DisabledReason, ErrorKind as AgentErrorKind, FreezeStatus};

use crate::error::error_chain;
use crate::error::{EngineError, EngineErrorKind, Result};
use crate::guardian::{self, GuardianCommand, Lease, ThawAttempt};

/// Where leases live and how to start a guardian; the same for every freeze of one process.
#[derive(Debug, Clone)]
pub struct GuardContext {
    pub runtime_root: PathBuf,
    /// The configuration file in use, handed to the guardian so it finds the VM the same way.
    pub config: Option<PathBuf>,
    pub guardian: GuardianCommand,
}

impl GuardContext {
    /// A lease on `vm` held by this process: watched (thaw at once if we die), with a deadline
    /// `deadline` from now (`None`: none), thawing a freeze and/or resuming a paused VM.
    fn lease(
        &self,
        vm: &dyn Vm,
        deadline: Option<Duration>,
        thaw: bool,
        resume_if_paused: bool,
    ) -> (PathBuf, Lease) {
        let reference = vm.reference().to_string();
        let path = guardian::lease_path(&self.runtime_root, &reference);
        let now = guardian::now_ms();
        let lease = Lease {
            vm: reference,
            config: self.config.clone(),
            runtime_root: self.runtime_root.clone(),
            token: guardian::new_token(),
            holder_pid: std::process::id(),
            watch_holder: true,
            frozen_at_ms: now,
            deadline_ms: deadline.map(|d| now + d.as_millis() as u64),
            thaw_now: false,
            guardian_pid: None,
            thaw,
            resume_if_paused,
            release_capture: false,
        };
        (path, lease)
    }

    /// Writes the lease unless another live one is there ([`guardian::lease_is_live`]): a
    /// lease another process still holds, or whose guardian still watches a freeze, is never
    /// overwritten (that would silently end its protection). A stale one is replaced.
    fn claim(&self, path: &std::path::Path, lease: &Lease) -> Result<()> {
        if let Some(other) = guardian::read_lease(path)?
            && other.token != lease.token
        {
            let guardian_alive = other.guardian_pid.is_some_and(guardian::process_alive);
            let holder_alive = guardian::process_alive(other.holder_pid);
            if guardian::lease_is_live(&other, holder_alive, guardian_alive) {
                let (held_by, then) = if other.release_capture {
                    ("a capture of another backup", "wait until that backup ends")
                } else {
                    ("another freeze", "unfreeze it first, or wait until it ends")
                };
                return Err(EngineError::guardian(format!(
                    "VM `{}` is held by {held_by} (lease {}, holder pid {}, guardian pid {}): \
                     {then}",
                    lease.vm,
                    path.display(),
                    other.holder_pid,
                    other
                        .guardian_pid
                        .map(|pid| pid.to_string())
                        .unwrap_or_else(|| "-".into())
                )));
            }
        }
        guardian::write_lease(path, lease)
    }

    /// Claims the lease, starts its guardian and records the guardian's pid in it. On error
    /// the lease is removed again.
    async fn start_guardian(&self, path: &std::path::Path, lease: &mut Lease) -> Result<()> {
        self.claim(path, lease)?;
        match self.guardian.spawn(path).await {
            Ok(pid) => lease.guardian_pid = Some(pid),
            Err(error) => {
                let _ = guardian::remove_lease(path, &lease.token);
                return Err(error);
            }
        }
        guardian::write_lease(path, lease)
    }
}

/// What `stillpoint freeze` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum FreezeOutcome {
    Frozen {
        filesystems: u32,
        /// How long the agent's freeze call took.
        took_ms: u64,
        /// When the guardian thaws on its own (ms since the Unix epoch); `None`: never.
        auto_thaw_at_ms: Option<u64>,
        guardian_pid: Option<u32>,
    },
    /// The guest was frozen already; nothing was stacked and no timer was reset.
    AlreadyFrozen,
    /// No agent to freeze with (no channel, or nothing answers): nothing to do.
    NoAgent { reason: String },
    /// The VM does not run: nothing to do.
    NotRunning { detail: String },
}

/// What `stillpoint unfreeze` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum UnfreezeOutcome {
    Thawed {
        filesystems: u32,
        took_ms: u64,
    },
    /// The guest was not frozen; unfreezing it is a success.
    WasNotFrozen,
    NoAgent {
        reason: String,
    },
    NotRunning {
        detail: String,
    },
}

/// Whether to go on with an agent, or why there is nothing to do (virt-freezer's exit-0 cases).
enum AgentReach {
    Ready(std::sync::Arc<dyn GuestAgent>),
    NoAgent(String),
    NotRunning(String),
}

async fn reach_agent(vm: &dyn Vm) -> Result<AgentReach> {
    let status = vm.status().await.map_err(platform_error)?;
    if status.state == RunState::NotRunning {
        return Ok(AgentReach::NotRunning(status.detail));
    }
    if status.state == RunState::Paused {
        return Ok(AgentReach::NotRunning(format!(
            "the VM is {}, no need to freeze or thaw",
            status.detail
        )));
    }
    let Some(agent) = vm.agent() else {
        return Ok(AgentReach::NoAgent(
            "the VM has no guest agent channel".into(),
        ));
    };
    match agent.ping().await {
        Ok(()) => Ok(AgentReach::Ready(agent)),
        Err(error)
            if matches!(
                error.kind(),
                AgentErrorKind::NotAnswering { .. } | AgentErrorKind::Connect
            ) =>
        {
            agent.release().await;
            Ok(AgentReach::NoAgent(format!(
                "the guest agent does not answer: {}",
                error_chain(&error)
            )))
        }
        Err(error) => Err(agent_error(vm, "ping failed", error)),
    }
}

/// `stillpoint freeze`: freeze the guest's filesystems, with a guardian that thaws after
/// `unfreeze_timeout` (`None`: stays frozen until `unfreeze`).
pub async fn freeze_vm(
    vm: &dyn Vm,
    guard: &GuardContext,
    unfreeze_timeout: Option<Duration>,
    freeze_timeout: Duration,
) -> Result<FreezeOutcome> {
    let agent = match reach_agent(vm).await? {
        AgentReach::Ready(agent) => agent,
        AgentReach::NoAgent(reason) => return Ok(FreezeOutcome::NoAgent { reason }),
        AgentReach::NotRunning(detail) => return Ok(FreezeOutcome::NotRunning { detail }),
    };
    let outcome =
        freeze_with_lease(vm, agent.as_ref(), guard, unfreeze_timeout, freeze_timeout).await;
    agent.release().await;
    outcome
}

async fn freeze_with_lease(
    vm: &dyn Vm,
    agent: &dyn GuestAgent,
    guard: &GuardContext,
    unfreeze_timeout: Option<Duration>,
    freeze_timeout: Duration,
) -> Result<FreezeOutcome> {
    if agent
        .freeze_status()
        .await
        .map_err(|e| agent_error(vm, "fsfreeze-status failed", e))?
        == FreezeStatus::Frozen
    {
        return Ok(FreezeOutcome::AlreadyFrozen);
    }
    // Until the freeze call returns, a dead freezer means nobody will report the freeze: the
    // guardian thaws at once. Afterwards the freezer may exit (virt-freezer does) and the
    // deadline takes over. The provisional deadline covers a freeze that hangs, too.
    let (lease_path, mut lease) = guard.lease(
        vm,
        unfreeze_timeout.map(|t| freeze_timeout + t),
        true,
        false,
    );
    match unfreeze_timeout {
        Some(_) => guard.start_guardian(&lease_path, &mut lease).await?,
        None => guard.claim(&lease_path, &lease)?,
    }
    let started = Instant::now();
    match agent.freeze(freeze_timeout).await {
        Ok(filesystems) => {
            lease.frozen_at_ms = guardian::now_ms();
            lease.deadline_ms = unfreeze_timeout.map(|t| lease.frozen_at_ms + t.as_millis() as u64);
            lease.watch_holder = false;
            guardian::write_lease(&lease_path, &lease)?;
            Ok(FreezeOutcome::Frozen {
                filesystems,
                took_ms: started.elapsed().as_millis() as u64,
                auto_thaw_at_ms: lease.deadline_ms,
                guardian_pid: lease.guardian_pid,
            })
        }
        Err(error) => Err(freeze_failed(vm, agent, guard, &lease_path, lease, error).await),
    }
}

/// After a failed freeze: make sure the guest ends up thawed, and say what happened.
async fn freeze_failed(
    vm: &dyn Vm,
    agent: &dyn GuestAgent,
    guard: &GuardContext,
    lease_path: &std::path::Path,
    mut lease: Lease,
    error: stillpoint_qga::Error,
) -> EngineError {
    if let AgentErrorKind::Timeout { after } = error.kind() {
        // The agent is still busy with the freeze (a hook hangs). Hand the thaw to a guardian,
        // which thaws as soon as the agent answers again; we must let go of the channel.
        let after = *after;
        lease.thaw_now = true;
        let handed_over = async {
            guardian::write_lease(lease_path, &lease)?;
            if lease.guardian_pid.is_none() {
                guard.guardian.spawn(lease_path).await?;
            }
            Ok::<(), EngineError>(())
        }
        .await;
        agent.release().await;
        let message = format!(
            "VM `{}`: the freeze did not complete within {} s (a freeze hook in the guest may hang); {}",
            vm.reference(),
            after.as_secs(),
            match handed_over {
                Ok(()) =>
                    "the guardian thaws the guest as soon as the agent answers again".to_string(),
                Err(handover) => format!(
                    "starting a guardian to thaw it failed too: {}",
                    error_chain(&handover)
                ),
            }
        );
        return EngineError::new(EngineErrorKind::Agent, message).with_source(error);
    }
    // The agent thaws everything itself when a freeze fails; thaw again to be sure.
    let thawed = agent.thaw().await;
    let _ = guardian::remove_lease(lease_path, &lease.token);
    let what = match error.kind() {
        AgentErrorKind::CommandDisabled {
            reason: DisabledReason::Policy { .. },
        } => "guest-fsfreeze-freeze is disabled in the guest agent (e.g. --block-rpcs)".to_string(),
        _ => "the freeze failed".to_string(),
    };
    let what = match thawed {
        Ok(_) => what,
        Err(thaw_error) => format!(
            "{what}, and the thaw after it failed too ({})",
            error_chain(&thaw_error)
        ),
    };
    agent_error(vm, &what, error)
}

/// `stillpoint unfreeze`: stop any guardian's timer and thaw.
pub async fn unfreeze_vm(vm: &dyn Vm, guard: &GuardContext) -> Result<UnfreezeOutcome> {
    let reference = vm.reference().to_string();
    let lease_path = guardian::lease_path(&guard.runtime_root, &reference);
    let agent = match reach_agent(vm).await? {
        AgentReach::Ready(agent) => agent,
        AgentReach::NoAgent(reason) => return Ok(UnfreezeOutcome::NoAgent { reason }),
        AgentReach::NotRunning(detail) => {
            release_lease(&lease_path);
            return Ok(UnfreezeOutcome::NotRunning { detail });
        }
    };
    let result = async {
        let status = agent
            .freeze_status()
            .await
            .map_err(|e| agent_error(vm, "fsfreeze-status failed", e))?;
        if status == FreezeStatus::Thawed {
            release_lease(&lease_path);
            return Ok(UnfreezeOutcome::WasNotFrozen);
        }
        let started = Instant::now();
        let filesystems = agent
            .thaw()
            .await
            .map_err(|e| agent_error(vm, "the thaw failed", e))?;
        release_lease(&lease_path);
        Ok(UnfreezeOutcome::Thawed {
            filesystems,
            took_ms: started.elapsed().as_millis() as u64,
        })
    }
    .await;
    agent.release().await;
    result
}

/// Removes a VM's lease whoever holds it: an unfreeze ends every freeze of the guest.
fn release_lease(lease_path: &std::path::Path) {
    if let Ok(Some(lease)) = guardian::read_lease(lease_path) {
        let _ = guardian::remove_lease(lease_path, &lease.token);
    }
}

/// One guardian attempt to put a VM back as it was: resume it if the lease says the holder
/// may have paused it, then thaw it if the lease guards a freeze. `Thawed` only when the agent
/// then reports `thawed`.
pub async fn thaw_attempt(vm: &dyn Vm, lease: &Lease) -> ThawAttempt {
    let status = match vm.status().await {
        Ok(status) => status,
        Err(error) => return ThawAttempt::Retry(error_chain(&error)),
    };
    if status.state == RunState::NotRunning {
        return ThawAttempt::NotFrozen(format!("the VM is not running ({})", status.detail));
    }
    if lease.release_capture {
        return release_attempt(vm).await;
    }
    let mut resumed = false;
    if lease.resume_if_paused && status.state == RunState::Paused {
        match vm.resume_if_paused().await {
            Ok(did) => resumed = did,
            Err(error) => return ThawAttempt::Retry(error_chain(&error)),
        }
    }
    if !lease.thaw {
        return ThawAttempt::NotFrozen(if resumed {
            "nothing was frozen; the VM was resumed".into()
        } else {
            "nothing was frozen or paused".into()
        });
    }
    let Some(agent) = vm.agent() else {
        return ThawAttempt::NotFrozen("the VM has no guest agent channel".into());
    };
    let attempt = async {
        match agent.freeze_status().await {
            Ok(FreezeStatus::Thawed) => {
                return ThawAttempt::NotFrozen("the guest is already thawed".into());
            }
            Ok(FreezeStatus::Frozen) => {}
            Err(error) => return ThawAttempt::Retry(error_chain(&error)),
        }
        let thawed = match agent.thaw().await {
            Ok(count) => count,
            Err(error) => return ThawAttempt::Retry(error_chain(&error)),
        };
        match agent.freeze_status().await {
            Ok(FreezeStatus::Thawed) => ThawAttempt::Thawed(thawed),
            Ok(FreezeStatus::Frozen) => {
                ThawAttempt::Retry("the guest still reports frozen after the thaw".into())
            }
            Err(error) => ThawAttempt::Retry(error_chain(&error)),
        }
    }
    .await;
    agent.release().await;
    attempt
}

/// One guardian attempt to release the capture of a dead backup through the platform (the VM
/// runs: a hypervisor that is gone took its capture with it).
async fn release_attempt(vm: &dyn Vm) -> ThawAttempt {
    let Some(release) = vm.dead_capture_release() else {
        return ThawAttempt::NotFrozen(
            "the platform keeps nothing of a capture beyond its process".into(),
        );
    };
    match release.release_dead_capture().await {
        Ok(steps) => ThawAttempt::Released(steps),
        Err(error) => ThawAttempt::Retry(error_chain(&error)),
    }
}

/// The guardian process's work: watch `lease` (already read from `lease_file`) and, when its
/// time has come, stop a holder that outlived its deadline and put `vm` back as it was.
pub async fn guard(
    lease_file: &std::path::Path,
    lease: &Lease,
    vm: &dyn Vm,
) -> Result<guardian::GuardianOutcome> {
    guardian::watch(
        lease_file,
        || thaw_attempt(vm, lease),
        |holder| {
            tracing::warn!("stopping the holder {holder}: it outlived its deadline");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(holder as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        },
    )
    .await
}

/// A backup's freeze, held only across the capture start. Its guardian watches this
/// process: if it dies while frozen, the guest is thawed at once; if the capture outlives
/// `hold_limit`, the guardian stops this process and thaws.
pub struct GuardedFreeze {
    agent: std::sync::Arc<dyn GuestAgent>,
    lease_path: PathBuf,
    token: String,
    frozen_at: Instant,
    /// How many filesystems the agent froze.
    pub filesystems: u32,
    /// How long the freeze call took.
    pub freeze_took: Duration,
}

/// What a guarded freeze recorded once thawed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FreezeWindow {
    pub filesystems: u32,
    pub freeze_ms: f64,
    /// From the end of the freeze call to the end of the thaw call: the time writers in the
    /// guest were blocked (plus the freeze call's own flush).
    pub frozen_ms: f64,
    pub thaw_ms: f64,
    pub thawed_filesystems: u32,
}

impl GuardedFreeze {
    /// Starts a guardian, then freezes. On error nothing stays frozen.
    pub async fn freeze(
        vm: &dyn Vm,
        agent: std::sync::Arc<dyn GuestAgent>,
        guard: &GuardContext,
        freeze_timeout: Duration,
        hold_limit: Duration,
    ) -> Result<Self> {
        // The capture start pauses the vCPUs while the guest is frozen: resume them too.
        let (lease_path, mut lease) =
            guard.lease(vm, Some(freeze_timeout + hold_limit), true, true);
        guard.start_guardian(&lease_path, &mut lease).await?;
        let started = Instant::now();
        let in_flight = FreezeCallInFlight {
            lease_path: lease_path.clone(),
            token: lease.token.clone(),
            agent: Some(agent.clone()),
        };
        let frozen = agent.freeze(freeze_timeout).await;
        in_flight.disarm();
        match frozen {
            Ok(filesystems) => Ok(Self {
                agent,
                lease_path,
                token: lease.token,
                frozen_at: Instant::now(),
                filesystems,
                freeze_took: started.elapsed(),
            }),
            Err(error) => {
                Err(freeze_failed(vm, agent.as_ref(), guard, &lease_path, lease, error).await)
            }
        }
    }

    /// Thaws and releases the guardian. Consumes the freeze: it cannot be thawed twice.
    pub async fn thaw(self) -> (FreezeWindow, Result<()>) {
        let started = Instant::now();
        let result = self.agent.thaw().await;
        let thaw_took = started.elapsed();
        let frozen = self.frozen_at.elapsed();
        let window = |thawed| FreezeWindow {
            filesystems: self.filesystems,
            freeze_ms: ms(self.freeze_took),
            frozen_ms: ms(frozen),
            thaw_ms: ms(thaw_took),
            thawed_filesystems: thawed,
        };
        match result {
            Ok(thawed) => {
                let _ = guardian::remove_lease(&self.lease_path, &self.token);
                // The agent channel takes one client at a time: holding it through the copy
                // would lock every other agent user out for as long as the backup runs.
                self.agent.release().await;
                (window(thawed), Ok(()))
            }
            Err(error) => {
                // Leave the lease to the guardian, which keeps trying; tell it to act now.
                if let Ok(Some(mut lease)) = guardian::read_lease(&self.lease_path)
                    && lease.token == self.token
                {
                    lease.thaw_now = true;
                    let _ = guardian::write_lease(&self.lease_path, &lease);
                }
                self.agent.release().await;
                (
                    window(0),
                    Err(EngineError::new(
                        EngineErrorKind::Agent,
                        "the thaw after the capture failed; the guardian keeps trying to thaw",
                    )
                    .with_source(error)),
                )
            }
        }
    }
}

/// The agent's freeze call of [`GuardedFreeze::freeze`], while it runs. If the future is
/// dropped meanwhile (a caller's timeout cancels it), the guest may be frozen with nobody left
/// to thaw it but the guardian — which would otherwise wait for the lease's deadline and then
/// stop this process. So the drop hands the thaw over at once (`thaw_now`, as a freeze call
/// that timed out does) and lets go of the agent channel, which the guardian needs.
struct FreezeCallInFlight {
    lease_path: PathBuf,
    token: String,
    agent: Option<std::sync::Arc<dyn GuestAgent>>,
}

impl FreezeCallInFlight {
    /// The call returned: its result decides what happens next.
    fn disarm(mut self) {
        self.agent = None;
    }
}

impl Drop for FreezeCallInFlight {
    fn drop(&mut self) {
        let Some(agent) = self.agent.take() else {
            return;
        };
        if let Ok(Some(mut lease)) = guardian::read_lease(&self.lease_path)
            && lease.token == self.token
        {
            lease.thaw_now = true;
            let _ = guardian::write_lease(&self.lease_path, &lease);
        }
        tracing::warn!(
            "the freeze call was abandoned while it ran; the guardian thaws as soon as the agent answers"
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { agent.release().await });
        }
    }
}

/// Covers a capture start without a freeze (crash level): the start pauses the vCPUs for a
/// few ms, and a guardian resumes the VM if this process dies in between.
pub struct PauseGuard {
    lease_path: PathBuf,
    token: String,
}

impl PauseGuard {
    /// Starts a guardian that resumes the VM if this process dies or outlives `hold_limit`.
    pub async fn start(vm: &dyn Vm, guard: &GuardContext, hold_limit: Duration) -> Result<Self> {
        let (_, mut lease) = guard.lease(vm, Some(hold_limit), false, true);
        // Its own lease file: a pause guard never touches the lease of a freeze.
        let lease_path = guardian::pause_lease_path(&guard.runtime_root, &lease.vm);
        guard.start_guardian(&lease_path, &mut lease).await?;
        Ok(Self {
            lease_path,
            token: lease.token,
        })
    }

    /// The capture start is over: the guardian can go.
    pub fn release(self) {
        let _ = guardian::remove_lease(&self.lease_path, &self.token);
    }
}

/// Covers a backup's capture for its whole life, from before `prepare` (nothing exists yet
/// that could be left behind) to after `finish`: if the backup dies anywhere in between
/// (SIGKILL included), its guardian releases what the capture left in the hypervisor at once
/// — on QEMU the copy-before-write filters, the NBD export and the scratch files, which grow
/// with every guest write until released — and settles the dirty bitmaps as a failed capture
/// does, so the next backup loses no change. Dropping the guard (every return path of the
/// backup, after the capture is finished or aborted) releases the guardian.
pub struct CaptureGuard {
    lease_path: PathBuf,
    token: String,
}

impl CaptureGuard {
    /// Starts the guardian of a capture of `vm`; `None` when the platform keeps nothing of a
    /// capture beyond the process that made it.
    pub async fn start(vm: &dyn Vm, guard: &GuardContext) -> Result<Option<Self>> {
        if vm.dead_capture_release().is_none() {
            return Ok(None);
        }
        // No deadline: the copy may take hours, and a living backup is never disturbed.
        let (_, mut lease) = guard.lease(vm, None, false, false);
        lease.release_capture = true;
        let lease_path = guardian::capture_lease_path(&guard.runtime_root, &lease.vm);
        guard.start_guardian(&lease_path, &mut lease).await?;
        Ok(Some(Self {
            lease_path,
            token: lease.token,
        }))
    }
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let _ = guardian::remove_lease(&self.lease_path, &self.token);
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn platform_error(error: stillpoint_platform::PlatformError) -> EngineError {
    EngineError::new(EngineErrorKind::Platform, "cannot look at the VM").with_source(error)
}

fn agent_error(vm: &dyn Vm, what: &str, error: stillpoint_qga::Error) -> EngineError {
    EngineError::new(
        EngineErrorKind::Agent,
        format!("VM `{}`: {what}", vm.reference()),
    )
    .with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(root: &std::path::Path) -> GuardContext {
        GuardContext {
            runtime_root: root.to_path_buf(),
            config: None,
            guardian: GuardianCommand {
                program: "/bin/false".into(),
                args: vec![],
            },
        }
    }

    fn lease(token: &str, holder_pid: u32) -> Lease {
        Lease {
            vm: "demo".into(),
            config: None,
            runtime_root: "/r".into(),
            token: token.into(),
            holder_pid,
            watch_holder: true,
            frozen_at_ms: 0,
            deadline_ms: None,
            thaw_now: false,
            guardian_pid: None,
            thaw: true,
            resume_if_paused: false,
            release_capture: false,
        }
    }

    #[test]
    fn a_live_lease_of_another_freeze_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let guard = context(dir.path());
        let path = guardian::lease_path(dir.path(), "demo");
        // Held by a living process (this one), under another token.
        guardian::write_lease(&path, &lease("theirs", std::process::id())).unwrap();
        let error = guard
            .claim(&path, &lease("ours", std::process::id()))
            .unwrap_err();
        assert!(
            error.to_string().contains("held by another freeze"),
            "{error}"
        );
        assert_eq!(
            guardian::read_lease(&path).unwrap().unwrap().token,
            "theirs"
        );
    }

    #[test]
    fn a_capture_lease_of_a_dead_backup_is_taken_over_even_while_its_guardian_runs() {
        let dir = tempfile::tempdir().unwrap();
        let guard = context(dir.path());
        let path = guardian::capture_lease_path(dir.path(), "demo");
        let mut dead = lease("dead", u32::MAX - 1);
        dead.release_capture = true;
        // Its guardian still runs (this process stands in for it).
        dead.guardian_pid = Some(std::process::id());
        guardian::write_lease(&path, &dead).unwrap();
        let mut ours = lease("ours", std::process::id());
        ours.release_capture = true;
        guard.claim(&path, &ours).unwrap();
        assert_eq!(guardian::read_lease(&path).unwrap().unwrap().token, "ours");

        // A living backup's capture lease is never taken over.
        let mut theirs = lease("theirs", std::process::id());
        theirs.release_capture = true;
        let error = guard.claim(&path, &theirs).unwrap_err();
        assert!(
            error.to_string().contains("a capture of another backup"),
            "{error}"
        );
    }

    #[test]
    fn a_stale_lease_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let guard = context(dir.path());
        let path = guardian::lease_path(dir.path(), "demo");
        guardian::write_lease(&path, &lease("dead", u32::MAX - 1)).unwrap();
        guard
            .claim(&path, &lease("ours", std::process::id()))
            .unwrap();
        assert_eq!(guardian::read_lease(&path).unwrap().unwrap().token, "ours");
    }
}
