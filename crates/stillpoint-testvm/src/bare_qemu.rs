//! A QEMU with no guest (`-machine none`), reachable over QMP: the one harness of the protocol
//! crates' tests (QMP, NBD) that need QEMU's block layer but no VM.
//!
//! QEMU without a machine still has the whole block layer: `blockdev-add` of qcow2 files,
//! dirty bitmaps, block jobs, the NBD server. It starts in well under a second, so the tests
//! that use it need no `vm-tests` feature. It is killed when dropped; a QEMU that cannot start
//! is an error carrying its stderr, never a silently passing test.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::{Error, ErrorKind, Result};
use crate::paths::find_tool;
use crate::wait::wait_until;

/// How long QEMU may take to listen on its monitor socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `qemu-system-x86_64 -machine none`; killed when dropped.
pub struct BareQemu {
    child: Child,
    qmp_socket: PathBuf,
}

impl BareQemu {
    /// Starts QEMU with its QMP socket at `<dir>/qmp.sock` and returns once QEMU listens on it,
    /// so the first connect succeeds (QEMU binds the socket file before it listens). The probe's
    /// connection is closed at once; a client connecting next waits in the listen backlog
    /// until QEMU has dropped the probe and accepts it.
    pub async fn start(dir: &Path) -> Result<BareQemu> {
        let qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let qmp_socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_socket);
        let mut child = Command::new(qemu)
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                Error::new(ErrorKind::QemuStart, "cannot start qemu-system-x86_64")
                    .with_source(error)
            })?;
        let mut exited = None;
        let listening = wait_until(START_TIMEOUT, || {
            let status = child.try_wait().ok().flatten();
            if status.is_some() {
                exited = status;
            }
            let up =
                status.is_none() && std::os::unix::net::UnixStream::connect(&qmp_socket).is_ok();
            async move { status.is_some() || up }
        })
        .await;
        if let Some(status) = exited {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            return Err(Error::new(
                ErrorKind::QemuStart,
                format!(
                    "qemu-system-x86_64 exited with {status} before listening on {}: {}",
                    qmp_socket.display(),
                    stderr.trim()
                ),
            ));
        }
        if !listening {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "qemu-system-x86_64 did not listen on {} within {} s",
                    qmp_socket.display(),
                    START_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(BareQemu { child, qmp_socket })
    }

    /// The QMP socket (one client at a time, as QEMU's `-qmp` gives it).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// Waits for QEMU to exit on its own (after `quit`) and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(error)) => Err(
                Error::new(ErrorKind::Io, "cannot wait for qemu-system-x86_64").with_source(error),
            ),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "qemu-system-x86_64 did not exit within {} s",
                    timeout.as_secs()
                ),
            )),
        }
    }
}
