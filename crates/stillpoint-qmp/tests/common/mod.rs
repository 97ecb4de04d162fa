//! Test harness: a real QEMU with no guest (`-machine none`), reachable over QMP.
//!
//! QEMU without a machine still has the whole block layer: `blockdev-add` of
//! qcow2 files, dirty bitmaps, backup jobs, the NBD server. Starting it takes
//! well under a second, so these tests need no `vm-tests` feature. A QEMU that
//! cannot start fails the test (it never silently passes).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use stillpoint_qmp::Qmp;
use tokio::process::{Child, Command};

pub struct QemuNoGuest {
    child: Child,
    pub dir: tempfile::TempDir,
    pub qmp_socket: PathBuf,
}

impl QemuNoGuest {
    pub async fn start() -> QemuNoGuest {
        let dir = tempfile::tempdir().expect("temp dir");
        let qmp_socket = dir.path().join("qmp.sock");
        let mut child = Command::new("qemu-system-x86_64")
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
            .expect("qemu-system-x86_64 must be installed (scripts/install-deps.sh)");
        for _ in 0..400 {
            if qmp_socket.exists() {
                return QemuNoGuest {
                    child,
                    dir,
                    qmp_socket,
                };
            }
            if let Some(status) = child.try_wait().expect("poll qemu") {
                let out = child.wait_with_output().await.expect("qemu output");
                panic!(
                    "qemu-system-x86_64 exited with {status} before opening its QMP socket: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "qemu-system-x86_64 did not open {} within 10 s",
            qmp_socket.display()
        );
    }

    /// Connects, retrying while the socket file exists but QEMU is not yet
    /// listening on it (it binds, then listens).
    pub async fn connect(&self) -> Qmp {
        let mut tries = 0;
        loop {
            match Qmp::connect_unix(&self.qmp_socket).await {
                Ok(qmp) => return qmp,
                Err(e) if e.kind() == &stillpoint_qmp::ErrorKind::Connect && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => panic!("connect to QEMU's QMP socket: {e}"),
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for QEMU to exit (after `quit`) and returns whether it exited cleanly.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("qemu exits within 30 s after quit")
            .expect("wait for qemu")
    }
}

/// Runs a host tool and returns its stdout; panics with its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn qcow2_create(path: &Path, size: u64) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
}

/// An NBD URI for a unix socket export.
pub fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}
