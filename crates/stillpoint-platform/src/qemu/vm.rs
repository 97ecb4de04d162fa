//! A plain-QEMU VM: its state from QMP `query-status`, its agent over the agent socket.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_qmp::Qmp;

use crate::agent::{GuestAgent, SocketAgent};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::qemu::QemuVmSpec;
use crate::vm::{RunState, Vm, VmRef, VmStatus};

/// How long to wait for the monitor's greeting: another client may hold the monitor (QEMU's
/// chardev takes one at a time), in which case nothing answers.
const MONITOR_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct QemuVm {
    reference: VmRef,
    spec: QemuVmSpec,
    agent: Option<Arc<SocketAgent>>,
}

impl QemuVm {
    pub fn new(spec: QemuVmSpec, agent_timeouts: stillpoint_qga::Timeouts) -> Self {
        let reference = VmRef {
            platform: crate::vm::PlatformKind::Qemu,
            name: spec.name.clone(),
        };
        let agent = spec
            .qga_socket
            .clone()
            .map(|socket| Arc::new(SocketAgent::new(spec.name.clone(), socket, agent_timeouts)));
        Self {
            reference,
            spec,
            agent,
        }
    }

    pub fn spec(&self) -> &QemuVmSpec {
        &self.spec
    }

    /// Connects to the VM's QMP monitor.
    pub async fn monitor(&self) -> Result<Qmp> {
        let connect = Qmp::connect_unix(&self.spec.qmp_socket);
        match tokio::time::timeout(MONITOR_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(qmp)) => Ok(qmp),
            Ok(Err(error)) => Err(PlatformError::new(
                PlatformErrorKind::Monitor,
                format!(
                    "VM `{}`: cannot open the QMP monitor {}",
                    self.spec.name,
                    self.spec.qmp_socket.display()
                ),
            )
            .with_source(error)),
            Err(_) => Err(PlatformError::new(
                PlatformErrorKind::Monitor,
                format!(
                    "VM `{}`: the QMP monitor {} did not answer within {} s (another client may hold it)",
                    self.spec.name,
                    self.spec.qmp_socket.display(),
                    MONITOR_CONNECT_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

/// Maps QEMU's run state to ours.
pub fn run_state_of(qemu_status: &str, running: bool) -> RunState {
    match qemu_status {
        _ if running => RunState::Running,
        "shutdown" | "guest-panicked" => RunState::NotRunning,
        _ => RunState::Paused,
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn reference(&self) -> &VmRef {
        &self.reference
    }

    async fn status(&self) -> Result<VmStatus> {
        if let Some(pid) = self.spec.pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            return Ok(VmStatus {
                state: RunState::NotRunning,
                detail: format!("its QEMU process {pid} is gone"),
            });
        }
        if !self.spec.qmp_socket.exists() {
            return Ok(VmStatus {
                state: RunState::NotRunning,
                detail: format!(
                    "its monitor socket {} does not exist",
                    self.spec.qmp_socket.display()
                ),
            });
        }
        let qmp = match self.monitor().await {
            Ok(qmp) => qmp,
            Err(error) => {
                // A refused connection means no QEMU listens: the VM is not running.
                let refused = std::os::unix::net::UnixStream::connect(&self.spec.qmp_socket)
                    .err()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if refused {
                    return Ok(VmStatus {
                        state: RunState::NotRunning,
                        detail: "nothing listens on its monitor socket".into(),
                    });
                }
                return Err(error);
            }
        };
        let status = qmp.query_status().await.map_err(|error| {
            PlatformError::new(
                PlatformErrorKind::Monitor,
                format!("VM `{}`: query-status failed", self.spec.name),
            )
            .with_source(error)
        })?;
        Ok(VmStatus {
            state: run_state_of(&status.status, status.running),
            detail: status.status,
        })
    }

    fn agent(&self) -> Option<Arc<dyn GuestAgent>> {
        self.agent.clone().map(|agent| agent as Arc<dyn GuestAgent>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_states_map_to_ours() {
        assert_eq!(run_state_of("running", true), RunState::Running);
        assert_eq!(run_state_of("paused", false), RunState::Paused);
        assert_eq!(run_state_of("io-error", false), RunState::Paused);
        assert_eq!(run_state_of("shutdown", false), RunState::NotRunning);
    }
}
