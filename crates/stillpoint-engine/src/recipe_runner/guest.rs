//! Recipe commands inside the guest, through the agent's `guest-exec` / `guest-exec-status`.
//!
//! The agent has no kill call and starts every process in its own process group, so a kill
//! of the first process would leave its children (the `sqlite3` of a `sh -c "… | sqlite3"`
//! lock holder) running. When the guest has `setsid`, each command is started as
//! `setsid ARGV…`: `setsid` is not a process-group leader under the agent, so it calls
//! `setsid()` and execs ARGV without forking — the PID the agent reports is the leader of a
//! new group, and `kill -SIG -PID` (run through `guest-exec`) reaches every process the
//! command started. No shell is involved (invariant 6).

use std::sync::Arc;
use std::time::Duration;

use stillpoint_platform::GuestAgent;
use stillpoint_qga::{Error as AgentError, ErrorKind as AgentErrorKind, ExecRequest, ExecStatus};
use tokio::time::Instant;

use super::Backoff;
use crate::error::{EngineError, EngineErrorKind, Result};

/// The program that puts a guest command into its own session and process group.
pub(super) const SETSID: &str = "setsid";

/// `PATH` given to a guest command whose recipe sets `env` without one: the agent *replaces*
/// the environment when any variable is given, and a bare program name must still resolve.
pub(super) const DEFAULT_GUEST_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the `kill` command itself may take in the guest.
const KILL_COMMAND_LIMIT: Duration = Duration::from_secs(5);

/// The signals the runner sends through `kill` in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GuestSignal {
    Term,
    Kill,
}

impl GuestSignal {
    fn flag(self) -> &'static str {
        match self {
            GuestSignal::Term => "-TERM",
            GuestSignal::Kill => "-KILL",
        }
    }
}

/// The `guest-exec` request for a recipe command: `setsid ARGV…` when `grouped`, else ARGV
/// as is. `None` for an empty argv (validation rejects those; never a panic).
pub(super) fn exec_request(
    argv: &[String],
    env: &[(String, String)],
    stdin: Option<&str>,
    grouped: bool,
) -> Option<ExecRequest> {
    let (program, args) = argv.split_first()?;
    let mut request = if grouped {
        ExecRequest::new(SETSID, argv.iter().cloned())
    } else {
        ExecRequest::new(program.clone(), args.iter().cloned())
    };
    request.env = guest_env(env);
    if let Some(input) = stdin {
        request = request.stdin(input.as_bytes().to_vec());
    }
    Some(request)
}

/// `KEY=VALUE` entries for `guest-exec`; adds [`DEFAULT_GUEST_PATH`] when the recipe sets
/// variables but no `PATH` (an empty list keeps the agent's own environment).
pub(super) fn guest_env(env: &[(String, String)]) -> Vec<String> {
    let mut entries: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !entries.is_empty() && !env.iter().any(|(k, _)| k == "PATH") {
        entries.push(format!("PATH={DEFAULT_GUEST_PATH}"));
    }
    entries
}

/// Arguments of the guest's `kill` for `pid`: `-SIG -PID` reaches the whole process group
/// (busybox, procps and util-linux all read a negative number after the signal as a group;
/// busybox rejects `--`, so it is not used).
pub(super) fn kill_args(signal: GuestSignal, pid: i64, grouped: bool) -> Vec<String> {
    let target = if grouped {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    vec![signal.flag().to_owned(), target]
}

/// A guest-exec failure as an engine error naming the VM and the step. The agent refusing
/// guest-exec because the guest is frozen gets its own explanation: the executor never runs
/// a command between freeze and thaw, so someone else froze the guest (or a capture hook
/// left it frozen).
pub(super) fn agent_error(vm: &str, step: &str, action: &str, error: AgentError) -> EngineError {
    let message = if error.is_frozen_refusal() {
        format!(
            "VM `{vm}`: cannot {action} `{step}` in the guest while its filesystems are frozen \
             (recipe steps never run between freeze and thaw, so another freeze holds the guest; \
             `stillpoint unfreeze --name {vm}` thaws it)"
        )
    } else {
        format!("VM `{vm}`: cannot {action} `{step}` in the guest")
    };
    EngineError::new(EngineErrorKind::GuestCommand, message).with_source(error)
}

/// Whether the guest can run `setsid`: it is started once (`setsid true`), before the first
/// guest command (`step`, named in errors). The agent failing to spawn it (its `GenericError`,
/// "Failed to execute child process") means no; any other failure (agent busy, frozen,
/// guest-exec disabled) is an error, not an answer.
pub(super) async fn probe_setsid(
    agent: &Arc<dyn GuestAgent>,
    vm: &str,
    step: &str,
) -> Result<bool> {
    let request = ExecRequest::new(SETSID, ["true"]);
    match agent.exec_start(&request).await {
        Ok(pid) => {
            let mut probe = GuestProcess {
                agent: agent.clone(),
                vm: vm.to_owned(),
                step: "setsid probe".to_owned(),
                pid,
                grouped: true,
                reaped: false,
                handed_over: false,
            };
            let status = probe.wait(KILL_COMMAND_LIMIT).await?;
            Ok(status.is_some_and(|s| s.success()))
        }
        Err(error) if matches!(error.kind(), AgentErrorKind::Agent { .. }) => {
            tracing::warn!(
                vm,
                %error,
                "the guest has no `setsid`: a recipe command that is killed loses only its \
                 first process, not the processes it started"
            );
            Ok(false)
        }
        Err(error) => Err(agent_error(vm, step, "start", error)),
    }
}

/// A process started through `guest-exec`. Dropping it before it was reaped kills it (its
/// group) from a background task — best effort: it needs a live tokio runtime and an agent
/// that answers.
pub(super) struct GuestProcess {
    agent: Arc<dyn GuestAgent>,
    vm: String,
    step: String,
    pid: i64,
    /// Started under `setsid`: signals go to the whole group.
    grouped: bool,
    /// The agent reported it exited (and so forgot its PID): nothing left to kill or ask.
    reaped: bool,
    /// Handed over to another process ([`GuestProcess::hand_over`]): dropping this handle
    /// leaves it running.
    handed_over: bool,
}

impl GuestProcess {
    pub(super) async fn start(
        agent: Arc<dyn GuestAgent>,
        vm: &str,
        step: &str,
        request: &ExecRequest,
        grouped: bool,
    ) -> Result<Self> {
        let pid = agent
            .exec_start(request)
            .await
            .map_err(|error| agent_error(vm, step, "start", error))?;
        tracing::debug!(vm, step, pid, grouped, "guest command started");
        Ok(Self::adopt(agent, vm, step, pid, grouped))
    }

    /// Takes over a running guest command by its PID — one this process started, or one
    /// another stillpoint process handed over: from now on it is watched, ended and (dropped
    /// while running) killed as if started here. The agent keeps a command's status for any
    /// client until someone reads its exit, so the PID stays valid across processes.
    pub(super) fn adopt(
        agent: Arc<dyn GuestAgent>,
        vm: &str,
        step: &str,
        pid: i64,
        grouped: bool,
    ) -> Self {
        GuestProcess {
            agent,
            vm: vm.to_owned(),
            step: step.to_owned(),
            pid,
            grouped,
            reaped: false,
            handed_over: false,
        }
    }

    /// Lets go of the command for another process to adopt: it keeps running, and dropping
    /// this handle no longer kills it. Returns its PID and whether it leads its own group.
    pub(super) fn hand_over(&mut self) -> (i64, bool) {
        self.handed_over = true;
        (self.pid, self.grouped)
    }

    pub(super) fn pid(&self) -> i64 {
        self.pid
    }

    /// Asks once; `Some` (with its output) once it exited, after which it is reaped.
    pub(super) async fn poll(&mut self) -> Result<Option<ExecStatus>> {
        let status = self
            .agent
            .exec_status(self.pid)
            .await
            .map_err(|error| agent_error(&self.vm, &self.step, "watch", error))?;
        if status.exited {
            self.reaped = true;
            Ok(Some(status))
        } else {
            Ok(None)
        }
    }

    /// Polls until it exits or `limit` passes (`None`).
    pub(super) async fn wait(&mut self, limit: Duration) -> Result<Option<ExecStatus>> {
        let deadline = Instant::now() + limit;
        let mut backoff = Backoff::new();
        loop {
            if let Some(status) = self.poll().await? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(backoff.next().min(deadline - now)).await;
        }
    }

    /// Sends `signal` to the process (its group when grouped) with the guest's `kill`.
    pub(super) async fn signal(&self, signal: GuestSignal) -> Result<()> {
        send_signal(&self.agent, self.pid, self.grouped, signal)
            .await
            .map_err(|error| agent_error(&self.vm, &self.step, "signal", error))
    }

    /// Ends it for good: SIGTERM, up to `term_grace` to exit, then SIGKILL and up to
    /// `reap_limit` until the agent reports it gone. `Err` when even that is not confirmed.
    pub(super) async fn terminate(
        &mut self,
        term_grace: Duration,
        reap_limit: Duration,
    ) -> Result<ExecStatus> {
        self.signal(GuestSignal::Term).await?;
        if let Some(status) = self.wait(term_grace).await? {
            return Ok(status);
        }
        self.kill(reap_limit).await
    }

    /// SIGKILL, then up to `reap_limit` until the agent reports it gone.
    pub(super) async fn kill(&mut self, reap_limit: Duration) -> Result<ExecStatus> {
        self.signal(GuestSignal::Kill).await?;
        match self.wait(reap_limit).await? {
            Some(status) => Ok(status),
            None => Err(EngineError::new(
                EngineErrorKind::GuestCommand,
                format!(
                    "VM `{}`: guest process {} of `{}` still runs {} s after SIGKILL",
                    self.vm,
                    self.pid,
                    self.step,
                    reap_limit.as_secs()
                ),
            )),
        }
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        if self.reaped || self.handed_over {
            return;
        }
        let (agent, pid, grouped) = (self.agent.clone(), self.pid, self.grouped);
        let (vm, step) = (self.vm.clone(), self.step.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::warn!(
                    vm,
                    step,
                    pid,
                    "guest command abandoned while running; killing it"
                );
                runtime.spawn(async move {
                    if let Err(error) = send_signal(&agent, pid, grouped, GuestSignal::Kill).await
                    {
                        tracing::warn!(vm, step, pid, %error, "could not kill an abandoned guest command");
                        return;
                    }
                    // Reap it, so the agent forgets the PID.
                    let mut backoff = Backoff::new();
                    let deadline = Instant::now() + KILL_COMMAND_LIMIT;
                    while Instant::now() < deadline {
                        match agent.exec_status(pid).await {
                            Ok(status) if status.exited => return,
                            Ok(_) => tokio::time::sleep(backoff.next()).await,
                            Err(_) => return,
                        }
                    }
                });
            }
            Err(_) => tracing::warn!(
                vm,
                step,
                pid,
                "guest command abandoned outside a tokio runtime: it keeps running in the guest"
            ),
        }
    }
}

/// Runs `kill -SIG [-]PID` in the guest and waits (briefly) for it, reaping it. Its own exit
/// code is not judged: "no such process" only means the target ended already.
async fn send_signal(
    agent: &Arc<dyn GuestAgent>,
    pid: i64,
    grouped: bool,
    signal: GuestSignal,
) -> std::result::Result<(), AgentError> {
    let request = ExecRequest::new("kill", kill_args(signal, pid, grouped));
    let kill_pid = agent.exec_start(&request).await?;
    let deadline = Instant::now() + KILL_COMMAND_LIMIT;
    let mut backoff = Backoff::new();
    loop {
        let status = agent.exec_status(kill_pid).await?;
        if status.exited {
            if !status.success() {
                tracing::debug!(
                    pid,
                    stderr = %status.stderr_text().trim(),
                    "guest kill did not succeed (the process may have ended already)"
                );
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            tracing::warn!(pid, kill_pid, "the guest's kill command did not finish");
            return Ok(());
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_qga::DisabledReason;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grouped_commands_run_under_setsid_with_argv_untouched() {
        let argv = strings(&["/bin/sh", "-c", "echo 'a b' | cat"]);
        let grouped = exec_request(&argv, &[], None, true).unwrap();
        assert_eq!(grouped.path, "setsid");
        assert_eq!(grouped.args, argv, "argv is passed on as is, not joined");
        assert!(grouped.capture_output);
        let plain = exec_request(&argv, &[], None, false).unwrap();
        assert_eq!(plain.path, "/bin/sh");
        assert_eq!(plain.args, strings(&["-c", "echo 'a b' | cat"]));
        assert!(exec_request(&[], &[], None, true).is_none());
    }

    #[test]
    fn stdin_is_sent_as_bytes() {
        let request = exec_request(&strings(&["cat"]), &[], Some("BEGIN;\n"), true).unwrap();
        assert_eq!(request.input.as_deref(), Some(&b"BEGIN;\n"[..]));
    }

    #[test]
    fn env_gets_a_path_only_when_the_recipe_sets_variables_without_one() {
        assert!(guest_env(&[]).is_empty(), "no env: the agent's own stays");
        let env = guest_env(&[("PGUSER".into(), "backup".into())]);
        assert_eq!(
            env,
            vec![
                "PGUSER=backup".to_owned(),
                format!("PATH={DEFAULT_GUEST_PATH}")
            ]
        );
        let own = guest_env(&[("PATH".into(), "/opt/db/bin".into())]);
        assert_eq!(own, vec!["PATH=/opt/db/bin".to_owned()]);
    }

    #[test]
    fn kill_reaches_the_group_only_when_grouped() {
        assert_eq!(
            kill_args(GuestSignal::Term, 123, true),
            strings(&["-TERM", "-123"])
        );
        assert_eq!(
            kill_args(GuestSignal::Kill, 123, false),
            strings(&["-KILL", "123"])
        );
    }

    #[test]
    fn frozen_refusal_is_explained_and_keeps_its_source() {
        let refusal = AgentError::new(AgentErrorKind::CommandDisabled {
            reason: DisabledReason::Frozen,
        });
        let error = agent_error("demo", "app-db/hold", "start", refusal);
        assert_eq!(error.kind(), EngineErrorKind::GuestCommand);
        let message = error.to_string();
        assert!(
            message.starts_with("VM `demo`: cannot start `app-db/hold`"),
            "{message}"
        );
        assert!(
            message.contains("while its filesystems are frozen"),
            "{message}"
        );
        assert!(
            message.contains("stillpoint unfreeze --name demo"),
            "{message}"
        );
        let source = std::error::Error::source(&error).expect("the agent error is the source");
        assert!(source.to_string().contains("frozen"), "{source}");
    }

    #[test]
    fn other_agent_errors_name_vm_step_and_action_without_repeating_the_source() {
        let policy = AgentError::new(AgentErrorKind::CommandDisabled {
            reason: DisabledReason::Policy { detail: None },
        });
        let error = agent_error("demo", "app-db/check", "watch", policy);
        assert_eq!(
            error.to_string(),
            "VM `demo`: cannot watch `app-db/check` in the guest"
        );
        assert!(std::error::Error::source(&error).is_some());
    }
}
