//! Agent access: the capability to talk to a VM's guest agent, whatever carries it (a unix
//! socket on plain QEMU, `virsh qemu-agent-command` under libvirt, the launcher on KubeVirt).
//!
//! The protocol is the same everywhere, so the calls take and return `stillpoint-qga`'s types
//! and errors: the engine matches on the agent's error kinds (disabled, frozen, not answering)
//! the same way on every platform.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_qga::{
    AgentInfo, Client, ExecRequest, ExecStatus, FreezeStatus, FsInfo, OsInfo, Result, Timeouts,
};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// One VM's guest agent. Calls are serialised: the agent answers one command at a time.
#[async_trait]
pub trait GuestAgent: Send + Sync {
    async fn ping(&self) -> Result<()>;
    async fn info(&self) -> Result<AgentInfo>;
    async fn os_info(&self) -> Result<OsInfo>;
    async fn fs_info(&self) -> Result<Vec<FsInfo>>;
    async fn freeze_status(&self) -> Result<FreezeStatus>;
    /// Freezes every filesystem the agent can freeze; returns how many. `timeout` bounds the
    /// call (the guest's fsfreeze hook may take long).
    async fn freeze(&self, timeout: Duration) -> Result<u32>;
    /// Thaws; returns how many filesystems were thawed (0 when none was frozen).
    async fn thaw(&self) -> Result<u32>;
    /// Starts a guest process and returns its pid at once (for background steps).
    async fn exec_start(&self, request: &ExecRequest) -> Result<i64>;
    /// The state of a process started by [`exec_start`](Self::exec_start); reaps it once exited.
    async fn exec_status(&self, pid: i64) -> Result<ExecStatus>;
    /// Runs a guest process to completion; past `limit` it is killed in the guest.
    async fn run(&self, request: &ExecRequest, limit: Duration) -> Result<ExecStatus>;
    /// Lets go of the agent's channel, so another client (the guardian) can use it.
    async fn release(&self);
}

/// The guest agent of a plain-QEMU VM, reached through its unix socket chardev. Connects on
/// first use and again after the connection broke.
pub struct SocketAgent {
    vm: String,
    socket: PathBuf,
    timeouts: Timeouts,
    client: Mutex<Option<Client<UnixStream>>>,
}

impl SocketAgent {
    pub fn new(vm: impl Into<String>, socket: PathBuf, timeouts: Timeouts) -> Self {
        Self {
            vm: vm.into(),
            socket,
            timeouts,
            client: Mutex::new(None),
        }
    }

    /// Runs `call` on a connected client; a broken connection is dropped so the next call
    /// reconnects (the client itself resynchronises after timeouts).
    async fn with_client<T, F>(&self, call: F) -> Result<T>
    where
        F: for<'c> FnOnce(
                &'c mut Client<UnixStream>,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>,
            > + Send,
        T: Send,
    {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            let client = stillpoint_qga::connect_unix(&self.socket, self.timeouts.sync)
                .await?
                .with_timeouts(self.timeouts)
                .with_label(self.vm.clone());
            *guard = Some(client);
        }
        let client = guard.as_mut().expect("connected above");
        let result = call(client).await;
        if let Err(error) = &result
            && matches!(
                error.kind(),
                stillpoint_qga::ErrorKind::Closed
                    | stillpoint_qga::ErrorKind::Io
                    | stillpoint_qga::ErrorKind::Connect
            )
        {
            *guard = None;
        }
        result
    }
}

#[async_trait]
impl GuestAgent for SocketAgent {
    async fn ping(&self) -> Result<()> {
        self.with_client(|c| Box::pin(c.ping())).await
    }

    async fn info(&self) -> Result<AgentInfo> {
        self.with_client(|c| Box::pin(c.info())).await
    }

    async fn os_info(&self) -> Result<OsInfo> {
        self.with_client(|c| Box::pin(c.get_osinfo())).await
    }

    async fn fs_info(&self) -> Result<Vec<FsInfo>> {
        self.with_client(|c| Box::pin(c.get_fsinfo())).await
    }

    async fn freeze_status(&self) -> Result<FreezeStatus> {
        self.with_client(|c| Box::pin(c.fsfreeze_status())).await
    }

    async fn freeze(&self, timeout: Duration) -> Result<u32> {
        self.with_client(move |c| {
            Box::pin(async move {
                let saved = c.timeouts().freeze;
                c.timeouts_mut().freeze = timeout;
                let result = c.fsfreeze_freeze().await;
                c.timeouts_mut().freeze = saved;
                result
            })
        })
        .await
    }

    async fn thaw(&self) -> Result<u32> {
        self.with_client(|c| Box::pin(c.fsfreeze_thaw())).await
    }

    async fn exec_start(&self, request: &ExecRequest) -> Result<i64> {
        let request = request.clone();
        self.with_client(move |c| Box::pin(async move { c.exec(&request).await }))
            .await
    }

    async fn exec_status(&self, pid: i64) -> Result<ExecStatus> {
        self.with_client(move |c| Box::pin(c.exec_status(pid)))
            .await
    }

    async fn run(&self, request: &ExecRequest, limit: Duration) -> Result<ExecStatus> {
        let request = request.clone();
        self.with_client(move |c| Box::pin(async move { c.run(&request, limit).await }))
            .await
    }

    async fn release(&self) {
        *self.client.lock().await = None;
    }
}
