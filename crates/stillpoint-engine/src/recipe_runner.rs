//! The recipe step runner for VMs on the qemu platform: runs what a recipe's workflow asks
//! for ([`stillpoint_recipe::Executor`] decides *what* and *when*; this module only does it).
//!
//! ```text
//!  Executor::run(plan) ──► QemuStepRunner ──► guest: guest-exec / guest-exec-status / kill via guest-exec
//!                                          ├─► host: local process group (tokio::process)
//!                                          └─► capture: CaptureHook (the backup orchestration:
//!                                                 guarded freeze → capture start → thaw)
//! ```
//!
//! What it keeps:
//! - **argv, never a shell** (invariant 6). Guest commands go to `guest-exec` as program +
//!   arguments; host commands to `execve`. Only a recipe that names `/bin/sh -c` gets a shell.
//! - **A kill reaches everything a step started.** Host commands run in a process group of
//!   their own and are killed with `killpg`. Guest commands run under `setsid` when the guest
//!   has it (probed once per runner), so `kill -SIG -PID` through guest-exec reaches the
//!   pipeline a lock holder is made of; without `setsid` only the first process is signalled
//!   (logged once as a warning).
//! - **Timeouts are the step's.** A command still running at its timeout is killed (SIGKILL to
//!   its group) and reported `timed_out`, with whatever output it had written.
//! - **Background ops end gracefully first:** the runner waits `grace` (the recipe's op that
//!   ends it, e.g. writing a FIFO, has asked it to exit); a host process's stdin is closed
//!   first. Then SIGTERM, [`RunnerOptions::term_grace`], SIGKILL, and the process is reaped
//!   (`guest-exec-status` makes the agent forget it).
//! - **Nothing runs while frozen.** The capture is one [`CaptureHook`] call; a guest-exec the
//!   agent refuses because the guest is frozen becomes an error that says so.
//!   [`QemuStepRunner::ensure_thawed`] thaws through the agent when it reports `frozen`.
//! - **A held command can change hands.** [`BackgroundProcess::hand_over`] leaves a guest
//!   background command running beyond its handle, and [`QemuStepRunner::adopt`] takes it over
//!   in another process by its PID (the agent keeps a command's status for any client until its
//!   exit is read): how `stillpoint recipe run --phase pre` hands the lock session to
//!   `--phase post` (`crate::recipe_phase`).
//! - **Output is bounded** ([`RunnerOptions::output_limit`] per stream, the start kept, the
//!   cut said in the text); the agent itself keeps at most 16 MiB.
//!
//! Limits — what can still be left behind:
//! - A command is owned by its step future or its [`BackgroundProcess`] handle (the executor
//!   holds those inside `run`). Dropping either before the command ended — a cancelled or
//!   timed-out `Executor::run`, a step the executor's backstop gave up on — kills it: on the
//!   host synchronously (`killpg`), in the guest from a spawned task, which needs a live tokio
//!   runtime and an agent that answers.
//! - If stillpoint itself is killed (SIGKILL), host commands get SIGKILL from the kernel
//!   (`PR_SET_PDEATHSIG`, first process only), but guest commands keep running: the guest
//!   knows nothing about us. A recipe that holds a lock should bound it inside the guest
//!   (the demo recipe's holder gives up after `read -t`).
//! - A guest command that leaves its process group (its own `setsid`, a daemon) escapes the
//!   kill, as on any Unix.
//! - Guest `stdin` is written and closed at once (`guest-exec` input-data); only host
//!   background ops can hold stdin open.
//! - `env` on the guest *replaces* the agent's environment (qemu-ga's rule); the runner adds
//!   a default `PATH` when the recipe sets variables but no `PATH`. On the host it adds to
//!   ours.

mod capture;
mod guest;
mod host;

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value as Json;
use stillpoint_platform::{GuestAgent, Vm};
use stillpoint_qga::{ExecStatus, FreezeStatus};
use stillpoint_recipe::plan::{CaptureStep, CheckStep};
use stillpoint_recipe::{
    BackgroundEnd, BackgroundState, CaptureOutcome, DiskInfo, ExecOutcome, ExecRequest, StepRunner,
    Target,
};
use tokio::sync::{Mutex, OnceCell};

pub use self::capture::CaptureHook;
use self::guest::GuestProcess;
use self::host::HostProcess;
use crate::error::{EngineError, EngineErrorKind, Result};

/// How guest commands are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestProcessGroups {
    /// Under `setsid` when the guest has it (probed once), so kills reach the whole group.
    Setsid,
    /// As given; a kill reaches the first process only.
    Off,
}

/// Settings of the runner that are not part of the recipe.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub guest_process_groups: GuestProcessGroups,
    /// Bytes of stdout and of stderr kept per command (the start is kept).
    pub output_limit: usize,
    /// Between SIGTERM and SIGKILL when a background op is ended.
    pub term_grace: Duration,
    /// How long after SIGKILL the process may take to be reported gone.
    pub reap_limit: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            guest_process_groups: GuestProcessGroups::Setsid,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            term_grace: Duration::from_secs(2),
            reap_limit: Duration::from_secs(5),
        }
    }
}

/// 1 MiB per stream: a check's JSON document fits, a runaway command does not fill memory.
pub const DEFAULT_OUTPUT_LIMIT: usize = 1 << 20;

/// Runs recipe steps against one VM on the qemu platform (guest through its agent, host as
/// local processes), and captures through a [`CaptureHook`].
pub struct QemuStepRunner {
    vm: Arc<dyn Vm>,
    vm_name: String,
    disks: Vec<DiskInfo>,
    capture: Arc<dyn CaptureHook>,
    options: RunnerOptions,
    /// Whether guest commands run under `setsid` (decided on first use).
    setsid: OnceCell<bool>,
}

impl QemuStepRunner {
    /// `disks` are the VM's disks, which volume groups select from; `capture` does the capture.
    pub fn new(vm: Arc<dyn Vm>, disks: Vec<DiskInfo>, capture: Arc<dyn CaptureHook>) -> Self {
        let vm_name = vm.reference().to_string();
        QemuStepRunner {
            vm,
            vm_name,
            disks,
            capture,
            options: RunnerOptions::default(),
            setsid: OnceCell::new(),
        }
    }

    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// The VM the runner works on.
    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// Takes over a guest background command another process handed over
    /// ([`BackgroundProcess::hand_over`]): the handle polls, ends and (dropped while the
    /// command runs) kills it like one this runner started.
    pub fn adopt(&self, handed: &HandedOver) -> Result<BackgroundProcess> {
        let agent = self.agent(&handed.id)?;
        Ok(BackgroundProcess {
            id: handed.id.clone(),
            state: Mutex::new(Held::Guest(GuestProcess::adopt(
                agent,
                &self.vm_name,
                &handed.id,
                handed.pid,
                handed.grouped,
            ))),
        })
    }

    /// Lets go of the agent's channel (it takes one client at a time), e.g. before a guardian
    /// or another tool needs it. The next guest step reconnects.
    pub async fn release_agent(&self) {
        if let Some(agent) = self.vm.agent() {
            agent.release().await;
        }
    }

    fn agent(&self, step: &str) -> Result<Arc<dyn GuestAgent>> {
        self.vm.agent().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::GuestCommand,
                format!(
                    "VM `{}` has no guest agent channel, so guest step `{step}` cannot run",
                    self.vm_name
                ),
            )
        })
    }

    async fn grouped(&self, agent: &Arc<dyn GuestAgent>, step: &str) -> Result<bool> {
        match self.options.guest_process_groups {
            GuestProcessGroups::Off => Ok(false),
            GuestProcessGroups::Setsid => self
                .setsid
                .get_or_try_init(|| guest::probe_setsid(agent, &self.vm_name, step))
                .await
                .copied(),
        }
    }

    async fn start_guest(&self, request: &ExecRequest) -> Result<GuestProcess> {
        let agent = self.agent(&request.id)?;
        let grouped = self.grouped(&agent, &request.id).await?;
        if request.container.is_some() {
            tracing::warn!(step = %request.id, "`container` applies on KubeVirt only; ignored on the qemu platform");
        }
        let exec = guest::exec_request(
            &request.argv,
            &request.env,
            request.stdin.as_deref(),
            grouped,
        )
        .ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::GuestCommand,
                format!("`{}` has an empty command", request.id),
            )
        })?;
        GuestProcess::start(agent, &self.vm_name, &request.id, &exec, grouped).await
    }

    async fn guest_exec(&self, request: &ExecRequest) -> Result<ExecOutcome> {
        let mut process = self.start_guest(request).await?;
        if let Some(status) = process.wait(request.timeout).await? {
            return Ok(guest_outcome(&status, self.options.output_limit, false));
        }
        tracing::warn!(vm = %self.vm_name, step = %request.id, pid = process.pid(), timeout_s = request.timeout.as_secs(), "guest command timed out; killing it");
        let status = process.kill(self.options.reap_limit).await?;
        Ok(guest_outcome(&status, self.options.output_limit, true))
    }

    async fn host_exec(&self, request: &ExecRequest) -> Result<ExecOutcome> {
        let mut process = HostProcess::spawn(request, self.options.output_limit, false)?;
        let (status, timed_out) = match process.wait(request.timeout).await? {
            Some(status) => (status, false),
            None => {
                tracing::warn!(step = %request.id, timeout_s = request.timeout.as_secs(), "host command timed out; killing its process group");
                process.signal_group(Signal::SIGKILL);
                let status = process
                    .wait(self.options.reap_limit)
                    .await?
                    .ok_or_else(|| still_running(request, self.options.reap_limit))?;
                (status, true)
            }
        };
        let (stdout, stderr) = process.finish_output().await;
        Ok(ExecOutcome {
            exit_code: if timed_out { None } else { status.code() },
            stdout,
            stderr,
            timed_out,
        })
    }

    async fn end_guest(
        &self,
        process: &mut GuestProcess,
        grace: Duration,
    ) -> Result<(ExecStatus, bool)> {
        if let Some(status) = process.wait(grace).await? {
            return Ok((status, false));
        }
        let status = process
            .terminate(self.options.term_grace, self.options.reap_limit)
            .await?;
        Ok((status, true))
    }

    async fn end_host(
        &self,
        process: &mut HostProcess,
        grace: Duration,
    ) -> Result<(std::process::ExitStatus, bool)> {
        process.close_stdin();
        if let Some(status) = process.wait(grace).await? {
            return Ok((status, false));
        }
        process.signal_group(Signal::SIGTERM);
        if let Some(status) = process.wait(self.options.term_grace).await? {
            return Ok((status, true));
        }
        process.signal_group(Signal::SIGKILL);
        match process.wait(self.options.reap_limit).await? {
            Some(status) => Ok((status, true)),
            None => Err(EngineError::new(
                EngineErrorKind::HostCommand,
                format!(
                    "a host background process still runs {} s after SIGKILL",
                    self.options.reap_limit.as_secs()
                ),
            )),
        }
    }
}

fn still_running(request: &ExecRequest, limit: Duration) -> EngineError {
    EngineError::new(
        EngineErrorKind::HostCommand,
        format!(
            "`{}` still runs on the host {} s after SIGKILL",
            request.id,
            limit.as_secs()
        ),
    )
}

/// A background op as the runner holds it: the process, or how it ended once it did.
pub struct BackgroundProcess {
    id: String,
    state: Mutex<Held>,
}

enum Held {
    Guest(GuestProcess),
    Host(Box<HostProcess>),
    Ended(ExecOutcome),
    /// Left running for another process ([`BackgroundProcess::hand_over`]).
    HandedOver(HandedOver),
}

/// A guest background command one stillpoint process leaves running for another to adopt
/// (`stillpoint recipe run --phase pre`, then `--phase post`): what the second needs to
/// watch and end it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandedOver {
    /// `hook/op`.
    pub id: String,
    /// Its PID in the guest, as `guest-exec` returned it.
    pub pid: i64,
    /// It runs under `setsid`: signals go to its whole process group.
    pub grouped: bool,
}

impl BackgroundProcess {
    /// `hook/op`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Leaves the command running beyond this handle (dropping it no longer kills it) and
    /// says how to adopt it ([`QemuStepRunner::adopt`]). Asks nothing of the guest, so it
    /// works while the guest is frozen. Only a guest command can be handed over: a host
    /// process dies with this process (`PR_SET_PDEATHSIG`); one that already ended has
    /// nothing left to hand over. Both are errors naming the op.
    pub async fn hand_over(&self) -> Result<HandedOver> {
        let mut state = self.state.lock().await;
        let handed = match &mut *state {
            Held::Guest(process) => {
                let (pid, grouped) = process.hand_over();
                HandedOver {
                    id: self.id.clone(),
                    pid,
                    grouped,
                }
            }
            Held::HandedOver(handed) => return Ok(handed.clone()),
            Held::Host(_) => {
                return Err(EngineError::new(
                    EngineErrorKind::HostCommand,
                    format!(
                        "background op `{}` runs on the host, where it ends with this process; it cannot be handed over",
                        self.id
                    ),
                ));
            }
            Held::Ended(_) => {
                return Err(EngineError::new(
                    EngineErrorKind::GuestCommand,
                    format!(
                        "background op `{}` has already ended; there is nothing to hand over",
                        self.id
                    ),
                ));
            }
        };
        *state = Held::HandedOver(handed.clone());
        Ok(handed)
    }

    fn handed_over_error(&self, handed: &HandedOver) -> EngineError {
        EngineError::new(
            EngineErrorKind::GuestCommand,
            format!(
                "background op `{}` (guest pid {}) was handed over to another process",
                self.id, handed.pid
            ),
        )
    }
}

impl StepRunner for QemuStepRunner {
    type Background = BackgroundProcess;
    type Error = EngineError;

    async fn exec(&self, request: &ExecRequest) -> Result<ExecOutcome> {
        match request.target {
            Target::Guest => self.guest_exec(request).await,
            Target::Host => self.host_exec(request).await,
        }
    }

    async fn start_background(&self, request: &ExecRequest) -> Result<BackgroundProcess> {
        let held = match request.target {
            Target::Guest => Held::Guest(self.start_guest(request).await?),
            Target::Host => Held::Host(Box::new(HostProcess::spawn(
                request,
                self.options.output_limit,
                true,
            )?)),
        };
        Ok(BackgroundProcess {
            id: request.id.clone(),
            state: Mutex::new(held),
        })
    }

    async fn background_status(&self, handle: &BackgroundProcess) -> Result<BackgroundState> {
        let mut state = handle.state.lock().await;
        let ended = match &mut *state {
            Held::Ended(outcome) => return Ok(BackgroundState::Exited(outcome.clone())),
            Held::HandedOver(handed) => return Err(handle.handed_over_error(handed)),
            Held::Guest(process) => match process.poll().await? {
                Some(status) => guest_outcome(&status, self.options.output_limit, false),
                None => return Ok(BackgroundState::Running),
            },
            Held::Host(process) => match process.try_status()? {
                Some(status) => {
                    let (stdout, stderr) = process.finish_output().await;
                    ExecOutcome {
                        exit_code: status.code(),
                        stdout,
                        stderr,
                        timed_out: false,
                    }
                }
                None => return Ok(BackgroundState::Running),
            },
        };
        *state = Held::Ended(ended.clone());
        Ok(BackgroundState::Exited(ended))
    }

    async fn end_background(
        &self,
        handle: &BackgroundProcess,
        grace: Duration,
    ) -> Result<BackgroundEnd> {
        let mut state = handle.state.lock().await;
        let (outcome, killed) = match &mut *state {
            Held::Ended(outcome) => {
                return Ok(BackgroundEnd {
                    outcome: outcome.clone(),
                    killed: false,
                });
            }
            Held::HandedOver(handed) => return Err(handle.handed_over_error(handed)),
            Held::Guest(process) => {
                let (status, killed) = self.end_guest(process, grace).await?;
                (
                    guest_outcome(&status, self.options.output_limit, false),
                    killed,
                )
            }
            Held::Host(process) => {
                let (status, killed) = self.end_host(process, grace).await?;
                let (stdout, stderr) = process.finish_output().await;
                (
                    ExecOutcome {
                        exit_code: status.code(),
                        stdout,
                        stderr,
                        timed_out: false,
                    },
                    killed,
                )
            }
        };
        tracing::info!(step = %handle.id, killed, exit_code = ?outcome.exit_code, "background op ended");
        *state = Held::Ended(outcome.clone());
        Ok(BackgroundEnd { outcome, killed })
    }

    async fn capture(&self, step: &CaptureStep) -> Result<CaptureOutcome> {
        let disks: Vec<String> = step
            .select(&self.disks)
            .into_iter()
            .map(|d| d.name.clone())
            .collect();
        if disks.is_empty() {
            let known: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
            return Err(EngineError::new(
                EngineErrorKind::Capture,
                format!(
                    "VM `{}`: `{}` selects none of the VM's disks ({})",
                    self.vm_name,
                    step.id,
                    if known.is_empty() {
                        "it has none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        tracing::info!(vm = %self.vm_name, step = %step.id, ?disks, freeze = step.freeze, "capture");
        self.capture.capture(&disks, step.freeze).await
    }

    async fn ensure_thawed(&self) -> Result<()> {
        let Some(agent) = self.vm.agent() else {
            // Without an agent nothing could have frozen the guest's filesystems.
            return Ok(());
        };
        let status = |e| {
            EngineError::new(
                EngineErrorKind::Agent,
                format!(
                    "VM `{}`: cannot tell whether the guest is frozen",
                    self.vm_name
                ),
            )
            .with_source(e)
        };
        if agent.freeze_status().await.map_err(status)? == FreezeStatus::Thawed {
            return Ok(());
        }
        let thawed = agent.thaw().await.map_err(|e| {
            EngineError::new(
                EngineErrorKind::Agent,
                format!("VM `{}`: the thaw failed", self.vm_name),
            )
            .with_source(e)
        })?;
        tracing::warn!(vm = %self.vm_name, filesystems = thawed, "thawed a guest left frozen");
        match agent.freeze_status().await.map_err(status)? {
            FreezeStatus::Thawed => Ok(()),
            FreezeStatus::Frozen => Err(EngineError::new(
                EngineErrorKind::Agent,
                format!(
                    "VM `{}`: the guest still reports frozen after the thaw",
                    self.vm_name
                ),
            )),
        }
    }

    async fn check_objects(&self, _check: &CheckStep) -> Result<Option<Vec<Json>>> {
        // A VM on qemu has no Kubernetes objects: checks need a command here.
        Ok(None)
    }
}

/// A reaped guest process as the executor sees it. A killed one has no exit code.
fn guest_outcome(status: &ExecStatus, output_limit: usize, timed_out: bool) -> ExecOutcome {
    ExecOutcome {
        exit_code: if timed_out { None } else { status.exit_code },
        stdout: bounded_text(&status.stdout, output_limit, status.stdout_truncated),
        stderr: bounded_text(&status.stderr, output_limit, status.stderr_truncated),
        timed_out,
    }
}

/// The first `limit` bytes as text (invalid UTF-8 replaced), saying so when anything was cut
/// here or, `cut_by_agent`, already by the guest agent.
fn bounded_text(bytes: &[u8], limit: usize, cut_by_agent: bool) -> String {
    let mut output = BoundedOutput::new(limit);
    output.push(bytes);
    let mut text = output.text();
    if cut_by_agent {
        text.push_str("\n[cut by the guest agent]");
    }
    text
}

/// Output kept up to a limit; what comes after is counted, not kept.
#[derive(Debug)]
struct BoundedOutput {
    kept: Vec<u8>,
    dropped: u64,
    limit: usize,
}

impl BoundedOutput {
    fn new(limit: usize) -> Self {
        BoundedOutput {
            kept: Vec::new(),
            dropped: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        let (keep, drop) = bytes.split_at(room.min(bytes.len()));
        self.kept.extend_from_slice(keep);
        self.dropped += drop.len() as u64;
    }

    fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!("\n[{} more bytes not kept]", self.dropped));
        }
        text
    }
}

/// Poll intervals: quick at first (most recipe commands take well under a second), then
/// every half second so a long command does not keep the agent busy.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_millis(500);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 10 s) until `condition` holds; fails the test otherwise.
    pub(super) async fn eventually(condition: impl Fn() -> bool) {
        for _ in 0..400 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the condition did not hold within 10 s");
    }

    #[test]
    fn bounded_output_keeps_the_start_and_counts_the_rest() {
        let mut output = BoundedOutput::new(5);
        output.push(b"abc");
        output.push(b"defgh");
        output.push(b"ij");
        assert_eq!(output.text(), "abcde\n[5 more bytes not kept]");
        let mut small = BoundedOutput::new(5);
        small.push(b"ok");
        assert_eq!(small.text(), "ok");
    }

    #[test]
    fn bounded_text_replaces_invalid_utf8_and_marks_an_agent_cut() {
        assert_eq!(bounded_text(b"a\xffb", 10, false), "a\u{fffd}b");
        assert_eq!(
            bounded_text(b"abcdef", 4, true),
            "abcd\n[2 more bytes not kept]\n[cut by the guest agent]"
        );
    }

    #[test]
    fn guest_outcome_of_a_killed_command_has_no_exit_code() {
        let status = ExecStatus {
            exited: true,
            exit_code: None,
            signal: Some(9),
            stdout: b"partial".to_vec(),
            ..ExecStatus::default()
        };
        let outcome = guest_outcome(&status, 100, true);
        assert!(outcome.timed_out);
        assert_eq!(outcome.exit_code, None);
        assert_eq!(outcome.stdout, "partial");
        assert!(!outcome.succeeded());
        let done = ExecStatus {
            exited: true,
            exit_code: Some(3),
            ..ExecStatus::default()
        };
        assert_eq!(guest_outcome(&done, 100, false).exit_code, Some(3));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new();
        let steps: Vec<u128> = (0..6).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(steps, [50, 100, 200, 400, 500, 500]);
    }
}
