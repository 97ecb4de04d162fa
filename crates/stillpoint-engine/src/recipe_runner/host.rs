//! Recipe commands on the host: plain local processes (argv, never a shell), each in a
//! process group of its own so that a timeout or an end reaches every process it started.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use stillpoint_recipe::ExecRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::BoundedOutput;
use crate::error::{EngineError, EngineErrorKind, Result};

/// How long output readers may go on after the process exited (a process that escaped the
/// group could hold the pipes open for ever).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// A host process and the readers collecting its output. Dropping it while the process may
/// still run sends SIGKILL to its whole group (synchronously, so it also works while the
/// runtime shuts down).
pub(super) struct HostProcess {
    step: String,
    child: Child,
    /// Its process group (= its PID: it leads the group it was started in).
    group: Pid,
    /// Dropping this closes the process's stdin (the writer task then lets go of it).
    stdin_open: Option<oneshot::Sender<()>>,
    stdout: Arc<Mutex<BoundedOutput>>,
    stderr: Arc<Mutex<BoundedOutput>>,
    readers: Vec<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl HostProcess {
    /// Starts `request.argv` with `request.env` added to this process's environment.
    /// `request.stdin` is written to the process; with `keep_stdin_open` (background ops) its
    /// stdin then stays open until [`close_stdin`](Self::close_stdin) — closing it is how a
    /// held session on the host (e.g. `psql` reading commands) is asked to end.
    pub(super) fn spawn(
        request: &ExecRequest,
        output_limit: usize,
        keep_stdin_open: bool,
    ) -> Result<Self> {
        let (program, args) = request.argv.split_first().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::HostCommand,
                format!("`{}` has an empty command", request.id),
            )
        })?;
        if let Some(container) = &request.container {
            tracing::warn!(step = %request.id, container, "`container` applies on KubeVirt only; ignored on the qemu platform");
        }
        let wants_stdin = request.stdin.is_some() || keep_stdin_open;
        // Without inherited secrets (hooks are third-party scripts); the recipe's own `env` applies.
        let mut command = stillpoint_os::child::command(program);
        stillpoint_os::child::die_with_parent(&mut command);
        let mut command = Command::from(command);
        command
            .args(args)
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .stdin(if wants_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: a kill reaches what it started, and signals for our own
            // group (Ctrl-C) do not reach it; we end it ourselves.
            .process_group(0);
        let mut child = command.spawn().map_err(|error| {
            EngineError::new(
                EngineErrorKind::HostCommand,
                format!("cannot start `{}` on the host ({program})", request.id),
            )
            .with_source(error)
        })?;
        let pid = child.id().ok_or_else(|| {
            EngineError::new(
                EngineErrorKind::HostCommand,
                format!("`{}` exited before its PID could be read", request.id),
            )
        })?;
        let group = Pid::from_raw(pid as i32);
        let stdout = Arc::new(Mutex::new(BoundedOutput::new(output_limit)));
        let stderr = Arc::new(Mutex::new(BoundedOutput::new(output_limit)));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(collect(out, stdout.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(collect(err, stderr.clone())));
        }
        let mut stdin_open = None;
        if let Some(mut stdin) = child.stdin.take() {
            let input = request.stdin.clone().unwrap_or_default();
            let (open_tx, open_rx) = oneshot::channel::<()>();
            if keep_stdin_open {
                stdin_open = Some(open_tx);
            }
            let step = request.id.clone();
            // Written from a task: a process that does not read its stdin must not block us.
            tokio::spawn(async move {
                if let Err(error) = stdin.write_all(input.as_bytes()).await {
                    tracing::debug!(step, %error, "could not write all of stdin");
                }
                // Held until the sender is dropped (at once for foreground commands).
                let _ = open_rx.await;
                drop(stdin);
            });
        }
        Ok(HostProcess {
            step: request.id.clone(),
            child,
            group,
            stdin_open,
            stdout,
            stderr,
            readers,
            exited: None,
        })
    }

    /// Waits up to `limit` for it to exit (`None`: still running).
    pub(super) async fn wait(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.exited {
            return Ok(Some(status));
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Ok(Some(status))
            }
            Ok(Err(error)) => Err(self.error("cannot wait for").with_source(error)),
            Err(_) => Ok(None),
        }
    }

    /// Whether it exited, without waiting.
    pub(super) fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.exited {
            return Ok(Some(status));
        }
        match self.child.try_wait() {
            Ok(status) => {
                self.exited = status;
                Ok(status)
            }
            Err(error) => Err(self.error("cannot look at").with_source(error)),
        }
    }

    /// Closes its stdin: the graceful way to end a session that reads commands.
    pub(super) fn close_stdin(&mut self) {
        self.stdin_open = None;
    }

    /// Sends `signal` to its process group; false when nothing was left to signal.
    pub(super) fn signal_group(&self, signal: Signal) -> bool {
        match killpg(self.group, signal) {
            Ok(()) => true,
            Err(nix::errno::Errno::ESRCH) => false,
            Err(error) => {
                tracing::warn!(step = %self.step, group = self.group.as_raw(), %error, "could not signal the host process group");
                false
            }
        }
    }

    /// After it exited: ends what it left running in its group (those would hold the output
    /// pipes and outlive the step) and returns its bounded stdout and stderr.
    pub(super) async fn finish_output(&mut self) -> (String, String) {
        if self.signal_group(Signal::SIGKILL) {
            tracing::warn!(step = %self.step, "the host command left processes behind in its group; killed them");
        }
        for reader in &mut self.readers {
            if tokio::time::timeout(DRAIN_LIMIT, &mut *reader)
                .await
                .is_err()
            {
                // Someone outside the group still holds the pipe: keep what was read.
                reader.abort();
            }
        }
        self.readers.clear();
        let text = |buffer: &Arc<Mutex<BoundedOutput>>| {
            buffer
                .lock()
                .map(|b| b.text())
                .unwrap_or_else(|poisoned| poisoned.into_inner().text())
        };
        (text(&self.stdout), text(&self.stderr))
    }

    fn error(&self, what: &str) -> EngineError {
        EngineError::new(
            EngineErrorKind::HostCommand,
            format!(
                "{what} host process {} of `{}`",
                self.group.as_raw(),
                self.step
            ),
        )
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if self.exited.is_none() && self.signal_group(Signal::SIGKILL) {
            tracing::warn!(step = %self.step, "host command abandoned while running; killed its process group");
        }
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn collect(mut stream: impl AsyncRead + Unpin, into: Arc<Mutex<BoundedOutput>>) {
    let mut buffer = vec![0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut output) = into.lock() {
                    output.push(&buffer[..n]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_recipe::Target;

    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            id: "host-hook/op".to_owned(),
            target: Target::Host,
            container: None,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(10),
        }
    }

    fn alive(pid: i32) -> bool {
        crate::guardian::process_alive(pid as u32)
    }

    /// The PID a command wrote to `file`, once it is there.
    async fn read_pid(file: &std::path::Path) -> i32 {
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(file)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no pid in {}", file.display());
    }

    #[tokio::test]
    async fn argv_is_not_given_to_a_shell_and_env_and_stdin_arrive() {
        let mut echo = HostProcess::spawn(&request(&["echo", "a  b; $(id -u) *"]), 1024, false)
            .expect("echo starts");
        let status = echo.wait(Duration::from_secs(10)).await.unwrap().unwrap();
        assert!(status.success());
        let (stdout, _) = echo.finish_output().await;
        assert_eq!(
            stdout, "a  b; $(id -u) *\n",
            "one argument, printed literally"
        );

        let mut with_env = request(&["sh", "-c", "printf '%s|' \"$STILLPOINT_T\"; cat"]);
        with_env.env = vec![("STILLPOINT_T".into(), "x y".into())];
        with_env.stdin = Some("from stdin".into());
        let mut process = HostProcess::spawn(&with_env, 1024, false).unwrap();
        process
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(process.finish_output().await.0, "x y|from stdin");
    }

    #[tokio::test]
    async fn output_is_bounded_and_says_how_much_was_cut() {
        let mut process = HostProcess::spawn(
            &request(&["sh", "-c", "yes 0123456789 | head -c 100000; echo err >&2"]),
            1000,
            false,
        )
        .unwrap();
        process
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let (stdout, stderr) = process.finish_output().await;
        assert!(
            stdout.starts_with("0123456789\n0123456789\n"),
            "{stdout:.40}"
        );
        assert!(
            stdout.ends_with("[99000 more bytes not kept]"),
            "{}",
            &stdout[stdout.len() - 60..]
        );
        assert_eq!(stderr, "err\n");
    }

    #[tokio::test]
    async fn killing_the_group_reaches_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let mut process =
            HostProcess::spawn(&request(&["sh", "-c", &script]), 1024, false).unwrap();
        let grandchild = read_pid(&pid_file).await;
        assert!(alive(grandchild));
        assert!(
            process
                .wait(Duration::from_millis(200))
                .await
                .unwrap()
                .is_none()
        );
        assert!(process.signal_group(Signal::SIGKILL));
        let status = process
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), None, "killed by a signal");
        crate::recipe_runner::tests::eventually(|| !alive(grandchild)).await;
    }

    #[tokio::test]
    async fn leftovers_of_an_exited_command_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("leftover");
        // The shell exits at once; its background sleep holds stdout open.
        let script = format!("sleep 300 & echo $! > {}", pid_file.display());
        let mut process =
            HostProcess::spawn(&request(&["sh", "-c", &script]), 1024, false).unwrap();
        let status = process
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        let leftover = read_pid(&pid_file).await;
        process.finish_output().await;
        crate::recipe_runner::tests::eventually(|| !alive(leftover)).await;
    }

    #[tokio::test]
    async fn dropping_a_running_process_kills_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let process = HostProcess::spawn(&request(&["sh", "-c", &script]), 1024, false).unwrap();
        let grandchild = read_pid(&pid_file).await;
        drop(process);
        crate::recipe_runner::tests::eventually(|| !alive(grandchild)).await;
    }

    #[tokio::test]
    async fn a_kept_stdin_stays_open_until_closed() {
        let mut request = request(&["cat"]);
        request.stdin = Some("held\n".into());
        let mut process = HostProcess::spawn(&request, 1024, true).unwrap();
        assert!(
            process
                .wait(Duration::from_millis(300))
                .await
                .unwrap()
                .is_none(),
            "cat keeps running while its stdin is open"
        );
        process.close_stdin();
        let status = process
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        assert_eq!(process.finish_output().await.0, "held\n");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let error = HostProcess::spawn(&request(&["/nonexistent/stillpoint-x"]), 1024, false)
            .err()
            .expect("cannot start");
        assert_eq!(error.kind(), EngineErrorKind::HostCommand);
        assert_eq!(
            error.to_string(),
            "cannot start `host-hook/op` on the host (/nonexistent/stillpoint-x)"
        );
    }
}
