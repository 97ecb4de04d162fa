//! A plain-QEMU VM: its state from QMP `query-status`, its agent over the agent socket.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_qmp::Qmp;

use crate::agent::{GuestAgent, SocketAgent};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::qemu::QemuVmSpec;
use crate::vm::{DefinedDisk, DiskIdentity, RunState, Vm, VmDefinition, VmRef, VmStatus};

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

    async fn definition(&self) -> Result<Option<VmDefinition>> {
        let pid = match self.spec.pid {
            Some(pid) => Some(pid),
            // QEMU started elsewhere: the monitor socket's peer is the QEMU process.
            None => tokio::net::UnixStream::connect(&self.spec.qmp_socket)
                .await
                .ok()
                .and_then(|stream| stream.peer_cred().ok())
                .and_then(|cred| cred.pid())
                .map(|pid| pid as u32),
        };
        let Some(pid) = pid else { return Ok(None) };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return Ok(None); // another host's or another user's QEMU
        };
        let argv: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let qmp = self.monitor().await?;
        let blocks = qmp.query_block().await.map_err(|error| {
            PlatformError::new(
                PlatformErrorKind::Monitor,
                format!("VM `{}`: query-block failed", self.spec.name),
            )
            .with_source(error)
        })?;
        let disks = blocks
            .iter()
            .filter_map(|block| {
                let (id, _) = device_of(block.qdev.as_deref()?);
                let node = block.inserted.as_ref()?;
                Some(DefinedDisk {
                    id,
                    image: node.image.filename.clone(),
                    format: node.image.format.clone(),
                })
            })
            .collect();
        Ok(Some(VmDefinition {
            kind: "qemu".into(),
            argv,
            disks,
        }))
    }

    async fn resume_if_paused(&self) -> Result<bool> {
        // Only a pause the capture start made (it leaves a marker node while the vCPUs are
        // stopped): a VM the user paused stays paused.
        let qmp = self.monitor().await?;
        let outcome = crate::qemu::capture::resume_if_paused_by_capture(&qmp)
            .await
            .map_err(|error| {
                PlatformError::new(
                    PlatformErrorKind::Monitor,
                    format!(
                        "VM `{}`: resuming after an interrupted capture start failed",
                        self.spec.name
                    ),
                )
                .with_source(error)
            })?;
        Ok(outcome == crate::qemu::capture::ResumeOutcome::Resumed)
    }

    fn capture(&self) -> Option<Arc<dyn crate::capture::Capture>> {
        Some(Arc::new(crate::qemu::capture::QemuCapture::for_spec(
            &self.spec,
        )))
    }

    fn dead_capture_release(&self) -> Option<Arc<dyn crate::capture::DeadCaptureRelease>> {
        Some(Arc::new(crate::qemu::capture::QemuCapture::for_spec(
            &self.spec,
        )))
    }

    async fn disk_identities(&self) -> Result<Vec<DiskIdentity>> {
        let qmp = self.monitor().await?;
        let monitor_error = |what: &str, error: stillpoint_qmp::Error| {
            PlatformError::new(
                PlatformErrorKind::Monitor,
                format!("VM `{}`: {what} failed", self.spec.name),
            )
            .with_source(error)
        };
        let pci = qmp
            .execute("query-pci", None)
            .await
            .map_err(|e| monitor_error("query-pci", e))?;
        let blocks = qmp
            .query_block()
            .await
            .map_err(|e| monitor_error("query-block", e))?;
        let mut identities = Vec::new();
        for block in blocks {
            let Some(qdev) = block.qdev.as_deref() else {
                continue;
            };
            let (id, path) = device_of(qdev);
            let serial = qmp
                .qom_get(&path, "serial")
                .await
                .ok()
                .and_then(|value| value.as_str().map(str::to_string))
                .filter(|serial| !serial.is_empty());
            let pci = pci_address_of(&pci, &id);
            identities.push(DiskIdentity { id, serial, pci });
        }
        Ok(identities)
    }
}

/// A block backend's device id and QOM path, from `query-block`'s `qdev`: a plain id, or a QOM
/// path such as `/machine/peripheral/vd0/virtio-backend` (virtio) for a device with id `vd0`.
pub fn device_of(qdev: &str) -> (String, String) {
    match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => {
            let id = rest.split('/').next().unwrap_or(rest).to_string();
            let path = format!("/machine/peripheral/{id}");
            (id, path)
        }
        None if !qdev.starts_with('/') => (qdev.to_string(), format!("/machine/peripheral/{qdev}")),
        None => (qdev.to_string(), qdev.to_string()),
    }
}

/// Finds a device's PCI address in a `query-pci` reply, behind bridges too.
pub fn pci_address_of(query_pci: &serde_json::Value, qdev_id: &str) -> Option<(i64, i64, i64)> {
    fn search(devices: &[serde_json::Value], qdev_id: &str) -> Option<(i64, i64, i64)> {
        for device in devices {
            if device["qdev_id"].as_str() == Some(qdev_id) {
                return Some((
                    device["bus"].as_i64()?,
                    device["slot"].as_i64()?,
                    device["function"].as_i64()?,
                ));
            }
            if let Some(behind) = device["pci_bridge"]["devices"].as_array()
                && let Some(found) = search(behind, qdev_id)
            {
                return Some(found);
            }
        }
        None
    }
    query_pci
        .as_array()?
        .iter()
        .find_map(|bus| search(bus["devices"].as_array()?, qdev_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_found_on_the_root_bus_and_behind_bridges() {
        let reply = serde_json::json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 3, "function": 0, "qdev_id": "vd0"},
            {"bus": 0, "slot": 5, "function": 0, "qdev_id": "bridge",
             "pci_bridge": {"devices": [{"bus": 1, "slot": 2, "function": 0, "qdev_id": "vd1"}]}}
        ]}]);
        assert_eq!(pci_address_of(&reply, "vd0"), Some((0, 3, 0)));
        assert_eq!(pci_address_of(&reply, "vd1"), Some((1, 2, 0)));
        assert_eq!(pci_address_of(&reply, "vd9"), None);
        assert_eq!(
            pci_address_of(&serde_json::json!({"unexpected": 1}), "vd0"),
            None
        );
    }

    #[test]
    fn device_ids_come_from_qdev_paths() {
        assert_eq!(
            device_of("/machine/peripheral/vd0/virtio-backend"),
            ("vd0".into(), "/machine/peripheral/vd0".into())
        );
        assert_eq!(
            device_of("vd1"),
            ("vd1".into(), "/machine/peripheral/vd1".into())
        );
        let anonymous = "/machine/peripheral-anon/device[2]/virtio-backend";
        assert_eq!(device_of(anonymous), (anonymous.into(), anonymous.into()));
    }

    #[test]
    fn qemu_states_map_to_ours() {
        assert_eq!(run_state_of("running", true), RunState::Running);
        assert_eq!(run_state_of("paused", false), RunState::Paused);
        assert_eq!(run_state_of("io-error", false), RunState::Paused);
        assert_eq!(run_state_of("shutdown", false), RunState::NotRunning);
    }
}
