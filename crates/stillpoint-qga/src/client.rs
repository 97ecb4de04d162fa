//! The client: runs the codec over any async byte stream, one command at a time.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::codec::{Reply, ReplyDecoder, encode_command, encode_sync};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{
    AgentInfo, ExecRequest, ExecStarted, ExecStatus, ExecStatusWire, FreezeStatus, FsInfo, OsInfo,
};

/// How long each kind of command may take before the client gives up on it.
///
/// Giving up never desynchronises the client: the next command first resynchronises
/// (0xFF + `guest-sync-delimited`), discarding the late reply when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The sync handshake on connect and after any timeout or protocol error. It is also how
    /// long it takes to notice a busy or absent agent.
    pub sync: Duration,
    /// Commands the agent answers from memory or `/proc`: ping, info, osinfo, fsinfo,
    /// freeze status, exec, exec-status, and raw [`Client::execute`].
    pub quick: Duration,
    /// `guest-fsfreeze-freeze(-list)`: runs the fsfreeze hook (which may flush a database)
    /// and then FIFREEZE per filesystem, which first writes back all dirty data.
    pub freeze: Duration,
    /// `guest-fsfreeze-thaw`: FITHAW plus the thaw hook.
    pub thaw: Duration,
}

impl Default for Timeouts {
    /// sync/quick 5 s: libvirt's and Proxmox's default agent timeout, ample for a TCG guest
    /// (a ping takes ~2 ms here). freeze 300 s: Proxmox waits 10 min per freeze call because
    /// abandoning one leaves the agent busy; 5 min bounds how long a backup waits for a hook
    /// while still covering slow application flushes. thaw 180 s: Proxmox's value (Windows
    /// VSS and thaw hooks vary).
    fn default() -> Self {
        Self {
            sync: Duration::from_secs(5),
            quick: Duration::from_secs(5),
            freeze: Duration::from_secs(300),
            thaw: Duration::from_secs(180),
        }
    }
}

/// Poll interval bounds of [`Client::run`]: start short because most guest commands take tens
/// of milliseconds, back off so that a long one does not keep the agent busy.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(250);
/// How long [`Client::run`] waits for a killed process (and the `kill` itself) to be reaped.
const KILL_REAP_LIMIT: Duration = Duration::from_secs(5);

/// A guest agent connection. One command at a time (`&mut self`): qemu-ga is not pipelined.
/// Share it between tasks behind a `tokio::sync::Mutex`.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    decoder: ReplyDecoder,
    /// False from connect until the first sync, and from the moment a command is sent until
    /// its reply is read in full: a timeout, a protocol error or a dropped future leave it
    /// false, and the next command resynchronises first.
    synced: bool,
    last_sync_id: Option<i64>,
    timeouts: Timeouts,
    agent: String,
    read_buf: Box<[u8]>,
}

/// Opens the agent's unix socket (QEMU's `-chardev socket,server=on,…`) and synchronises.
///
/// `timeout` bounds the connect and the first sync together. A QEMU chardev accepts a
/// connection even while another client holds the agent (or before the guest's agent has
/// started), but then nothing answers; that case ends in
/// [`ErrorKind::NotAnswering`] after `timeout`. Bytes written before the agent starts are
/// delivered when it does, so a long `timeout` also waits for a booting guest.
pub async fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> Result<Client<UnixStream>> {
    let path = path.as_ref();
    let label = path.display().to_string();
    let started = Instant::now();
    let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(Error::new(ErrorKind::Connect)
                .with_source(e)
                .at_agent(&label));
        }
        Err(_) => {
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            return Err(Error::new(ErrorKind::Connect)
                .with_source(e)
                .at_agent(&label));
        }
    };
    let mut client = Client::new(stream, label);
    let remaining = timeout.saturating_sub(started.elapsed());
    client.sync_within(remaining).await?;
    Ok(client)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client over `stream`, not yet synchronised (the first command syncs).
    /// `agent` names it in errors: the socket path, or the VM name.
    pub fn new(stream: S, agent: impl Into<String>) -> Self {
        Self {
            stream,
            decoder: ReplyDecoder::default(),
            synced: false,
            last_sync_id: None,
            timeouts: Timeouts::default(),
            agent: agent.into(),
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
        }
    }

    /// Replaces the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Replaces the decoder (e.g. a different line bound).
    pub fn with_decoder(mut self, decoder: ReplyDecoder) -> Self {
        self.decoder = decoder;
        self.synced = false;
        self
    }

    /// Renames the agent in errors (e.g. to the VM name).
    pub fn with_label(mut self, agent: impl Into<String>) -> Self {
        self.agent = agent.into();
        self
    }

    /// The current timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Changes timeouts in place, e.g. `client.timeouts_mut().freeze = Duration::from_secs(60)`.
    pub fn timeouts_mut(&mut self) -> &mut Timeouts {
        &mut self.timeouts
    }

    /// How errors name this agent.
    pub fn label(&self) -> &str {
        &self.agent
    }

    /// False until synchronised, and after a command that did not complete.
    pub fn is_synchronised(&self) -> bool {
        self.synced
    }

    /// Resynchronises: writes 0xFF (the agent drops any partial request), sends
    /// `guest-sync-delimited` with a fresh random id, drops input up to the 0xFF that precedes
    /// its reply, and skips replies until the one echoing this id (stale sync replies from
    /// earlier attempts carry other ids). Commands call this themselves when needed.
    pub async fn sync(&mut self) -> Result<()> {
        self.sync_within(self.timeouts.sync).await
    }

    async fn sync_within(&mut self, limit: Duration) -> Result<()> {
        self.synced = false;
        let id = self.fresh_sync_id();
        let attempt = async {
            self.decoder.expect_sentinel();
            self.write(&encode_sync(id)).await?;
            loop {
                match self.read_reply().await? {
                    Reply::Return(Value::Number(n)) if n.as_i64() == Some(id) => return Ok(()),
                    stale => {
                        debug!(agent = %self.agent, ?stale, "discarding a stale reply while resynchronising");
                        self.decoder.expect_sentinel();
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(ErrorKind::NotAnswering { after: limit })),
        };
        outcome.map_err(|e| e.in_command("guest-sync-delimited").at_agent(&self.agent))?;
        debug!(agent = %self.agent, id, "synchronised with the guest agent");
        self.synced = true;
        Ok(())
    }

    fn fresh_sync_id(&mut self) -> i64 {
        // Positive and within 32 bits so that any agent's int parsing takes it; never the
        // previous id, so a late reply to the last sync cannot pass for this one.
        let id = loop {
            let id = i64::from(rand::random::<u32>() >> 1);
            if Some(id) != self.last_sync_id {
                break id;
            }
        };
        self.last_sync_id = Some(id);
        id
    }

    /// Runs any agent command with the `quick` timeout and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, self.timeouts.quick)
            .await
    }

    /// Runs any agent command with an explicit timeout. Commands that never reply
    /// (`guest-shutdown`, `guest-suspend-*`) end in a timeout here; resynchronise with
    /// [`Client::sync`], not by sending `guest-sync-delimited` through this.
    pub async fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        if !self.synced {
            self.sync().await?;
        }
        self.synced = false;
        let request = encode_command(command, arguments.as_ref());
        trace!(agent = %self.agent, command, "sending");
        let exchange = async {
            self.write(&request).await?;
            self.read_reply().await
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(reply)) => {
                self.synced = true;
                Ok(reply)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(ErrorKind::Timeout { after: timeout })),
        };
        let reply = reply.map_err(|e| e.in_command(command).at_agent(&self.agent))?;
        match reply {
            Reply::Return(value) => Ok(value),
            Reply::Error(agent_error) => {
                debug!(agent = %self.agent, command, desc = %agent_error.desc, "agent error");
                Err(Error::new(agent_error.kind())
                    .in_command(command)
                    .at_agent(&self.agent))
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T> {
        let value = self
            .execute_with_timeout(command, arguments, timeout)
            .await?;
        T::deserialize(&value).map_err(|e| {
            let bytes = serde_json::to_vec(&value).unwrap_or_default();
            Error::malformed("the reply does not have the documented shape", &bytes)
                .with_source(e)
                .in_command(command)
                .at_agent(&self.agent)
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        // A peer that went away shows up as a failed write before any read sees the end.
        let failed = |e: std::io::Error| {
            let kind = match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    ErrorKind::Closed
                }
                _ => ErrorKind::Io,
            };
            Error::new(kind).with_source(e)
        };
        self.stream.write_all(bytes).await.map_err(failed)?;
        self.stream.flush().await.map_err(failed)
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        loop {
            if let Some(reply) = self.decoder.next_reply()? {
                return Ok(reply);
            }
            let n = self
                .stream
                .read(&mut self.read_buf)
                .await
                .map_err(|e| Error::new(ErrorKind::Io).with_source(e))?;
            if n == 0 {
                return Err(Error::new(ErrorKind::Closed));
            }
            self.decoder.feed(&self.read_buf[..n]);
        }
    }

    /// `guest-ping`: the agent is there and answering.
    pub async fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", None).await.map(drop)
    }

    /// `guest-info`: version and the commands with whether each is enabled.
    pub async fn info(&mut self) -> Result<AgentInfo> {
        self.call("guest-info", None, self.timeouts.quick).await
    }

    /// `guest-get-osinfo`.
    pub async fn get_osinfo(&mut self) -> Result<OsInfo> {
        self.call("guest-get-osinfo", None, self.timeouts.quick)
            .await
    }

    /// `guest-get-fsinfo`: mounted local filesystems with their disks and usage.
    pub async fn get_fsinfo(&mut self) -> Result<Vec<FsInfo>> {
        self.call("guest-get-fsinfo", None, self.timeouts.quick)
            .await
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FreezeStatus> {
        self.call("guest-fsfreeze-status", None, self.timeouts.quick)
            .await
    }

    /// `guest-fsfreeze-freeze`: freezes every freezable filesystem; returns how many. On
    /// error the agent thaws whatever it had frozen. Uses the `freeze` timeout; when it
    /// expires the agent may still be freezing — thaw afterwards regardless.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u32> {
        self.call("guest-fsfreeze-freeze", None, self.timeouts.freeze)
            .await
    }

    /// `guest-fsfreeze-freeze-list`: freezes only `mountpoints` (the agent ignores ones that
    /// are not mounted); returns how many were frozen.
    pub async fn fsfreeze_freeze_list<M: AsRef<str>>(&mut self, mountpoints: &[M]) -> Result<u32> {
        let mountpoints: Vec<&str> = mountpoints.iter().map(AsRef::as_ref).collect();
        let arguments = serde_json::json!({ "mountpoints": mountpoints });
        self.call(
            "guest-fsfreeze-freeze-list",
            Some(arguments),
            self.timeouts.freeze,
        )
        .await
    }

    /// `guest-fsfreeze-thaw`: thaws everything the agent froze; returns how many.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u32> {
        self.call("guest-fsfreeze-thaw", None, self.timeouts.thaw)
            .await
    }

    /// `guest-exec`: starts a process; returns its PID. Poll it with [`Client::exec_status`]
    /// (which reaps it once exited), or use [`Client::run`].
    pub async fn exec(&mut self, request: &ExecRequest) -> Result<i64> {
        let started: ExecStarted = self
            .call(
                "guest-exec",
                Some(request.to_arguments()),
                self.timeouts.quick,
            )
            .await?;
        Ok(started.pid)
    }

    /// `guest-exec-status`: state of a process started by [`Client::exec`], output decoded
    /// from base64. After it reports `exited`, the agent forgets the PID.
    pub async fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        let command = "guest-exec-status";
        let wire: ExecStatusWire = self
            .call(
                command,
                Some(serde_json::json!({ "pid": pid })),
                self.timeouts.quick,
            )
            .await?;
        let decode = |field: &str, data: Option<String>| -> Result<Vec<u8>> {
            use base64::Engine as _;
            let Some(text) = data else {
                return Ok(Vec::new());
            };
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| {
                    Error::malformed(format!("\"{field}\" is not valid base64"), text.as_bytes())
                        .with_source(e)
                        .in_command(command)
                        .at_agent(&self.agent)
                })
        };
        Ok(ExecStatus {
            exited: wire.exited,
            exit_code: wire.exitcode,
            signal: wire.signal,
            stdout: decode("out-data", wire.out_data)?,
            stderr: decode("err-data", wire.err_data)?,
            stdout_truncated: wire.out_truncated,
            stderr_truncated: wire.err_truncated,
        })
    }

    /// Runs a guest command to completion within `limit`, polling `guest-exec-status`.
    ///
    /// The agent has no kill command. When `limit` passes, the process is killed by running
    /// `kill -KILL <pid>` through `guest-exec` (busybox, procps and coreutils all provide
    /// it, found through the agent's `PATH`), and both that `kill` and the killed process are
    /// reaped with `guest-exec-status`, so the agent keeps no zombie. Only the process itself
    /// is signalled, not its children: the agent does not start it in its own process group,
    /// and the group it is in is the agent's. The result is
    /// [`ErrorKind::GuestProcessTimedOut`]; a non-zero exit is *not* an error (see
    /// [`ExecStatus::success`]). If polling itself fails (the agent stops answering, the guest
    /// gets frozen), that error is returned and the process is left as it is.
    pub async fn run(&mut self, request: &ExecRequest, limit: Duration) -> Result<ExecStatus> {
        let pid = self.exec(request).await?;
        let deadline = Instant::now() + limit;
        let mut interval = POLL_FIRST;
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(POLL_MAX);
        }
        warn!(agent = %self.agent, pid, path = %request.path, ?limit, "guest command timed out; killing it");
        let killed = self.kill_and_reap(pid).await;
        Err(Error::new(ErrorKind::GuestProcessTimedOut {
            path: request.path.clone(),
            pid,
            after: limit,
            killed,
        })
        .in_command("guest-exec")
        .at_agent(&self.agent))
    }

    /// Sends SIGKILL to guest process `pid` and reaps it; true once the agent reports it ended.
    async fn kill_and_reap(&mut self, pid: i64) -> bool {
        let kill = ExecRequest::new("kill", ["-KILL".to_owned(), pid.to_string()]);
        match self.exec(&kill).await {
            Ok(kill_pid) => {
                if let Err(e) = self.wait_exited(kill_pid).await {
                    warn!(agent = %self.agent, pid, error = %e, "could not reap the kill command");
                }
            }
            Err(e) => {
                warn!(agent = %self.agent, pid, error = %e, "could not start kill in the guest")
            }
        }
        match self.wait_exited(pid).await {
            Ok(status) => status.exited,
            Err(e) => {
                warn!(agent = %self.agent, pid, error = %e, "could not confirm the guest process ended");
                false
            }
        }
    }

    async fn wait_exited(&mut self, pid: i64) -> Result<ExecStatus> {
        let deadline = Instant::now() + KILL_REAP_LIMIT;
        let mut interval = POLL_FIRST;
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited || Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(POLL_MAX);
        }
    }
}
