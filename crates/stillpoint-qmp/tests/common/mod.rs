//! Test harness: a real QEMU with no guest (`stillpoint_testvm::BareQemu`), reachable over
//! QMP, in a temporary directory. A QEMU that cannot start fails the test.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use stillpoint_qmp::Qmp;
use stillpoint_testvm::BareQemu;

pub struct QemuNoGuest {
    qemu: BareQemu,
    pub dir: tempfile::TempDir,
    pub qmp_socket: PathBuf,
}

impl QemuNoGuest {
    pub async fn start() -> QemuNoGuest {
        let dir = tempfile::tempdir().expect("temp dir");
        let qemu = BareQemu::start(dir.path())
            .await
            .unwrap_or_else(|e| panic!("{e} (scripts/install-deps.sh installs QEMU)"));
        let qmp_socket = qemu.qmp_socket().to_path_buf();
        QemuNoGuest {
            qemu,
            dir,
            qmp_socket,
        }
    }

    pub async fn connect(&self) -> Qmp {
        Qmp::connect_unix(&self.qmp_socket)
            .await
            .unwrap_or_else(|e| panic!("connect to QEMU's QMP socket: {e}"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for QEMU to exit (after `quit`) and returns whether it exited cleanly.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.qemu
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Runs a host tool and returns its stdout; panics with its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    stillpoint_testvm::run_tool(program, args).unwrap_or_else(|e| panic!("{e}"))
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
