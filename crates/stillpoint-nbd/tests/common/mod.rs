//! Test harness: real NBD servers (`qemu-nbd`, and QEMU's built-in server in
//! a QEMU with no guest), images built with `qemu-img`, and the libnbd tools
//! as the reference reader. A server that cannot start fails the test.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use stillpoint_nbd::Extent;
use tokio::process::{Child, Command};

/// Runs a host tool and returns its stdout; panics with its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    stillpoint_testvm::run_tool(program, args).unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_for_socket(child: &mut Child, socket: &Path, what: &str) {
    for _ in 0..400 {
        if socket.exists() {
            return;
        }
        if let Some(status) = child.try_wait().expect("poll child") {
            panic!(
                "{what} exited with {status} before opening {}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not open {} within 10 s", socket.display());
}

/// A running `qemu-nbd`; killed when dropped.
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --socket=… --shared=8 -f FORMAT [extra…] IMAGE` (shared, so
    /// `nbdinfo` can connect beside our client; the default is one client).
    pub async fn start(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> QemuNbd {
        let socket = dir.join(format!(
            "nbd-{}.sock",
            image.file_stem().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .args(["--shared=8", "-f", format])
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-nbd must be installed (scripts/install-deps.sh)");
        wait_for_socket(&mut child, &socket, "qemu-nbd").await;
        QemuNbd { child, socket }
    }

    /// Connects, retrying while the socket file exists but is not yet
    /// listening (qemu-nbd binds before it listens). Other errors return at once.
    pub async fn connect(
        &self,
        export: &str,
        contexts: &[&str],
    ) -> stillpoint_nbd::Result<stillpoint_nbd::NbdClient> {
        connect_retrying(&self.socket, export, contexts).await
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Waits for a non-persistent qemu-nbd to exit after its client left
    /// (it then closes the image cleanly, storing persistent bitmaps).
    pub async fn wait_exit(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("qemu-nbd exits after its client disconnects")
            .unwrap();
        assert!(status.success(), "qemu-nbd: {status}");
    }
}

pub async fn connect_retrying(
    socket: &Path,
    export: &str,
    contexts: &[&str],
) -> stillpoint_nbd::Result<stillpoint_nbd::NbdClient> {
    let mut tries = 0;
    loop {
        match stillpoint_nbd::NbdClient::connect_unix(socket, export, contexts).await {
            Err(e) if e.kind() == &stillpoint_nbd::ErrorKind::Connect && tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

/// A QEMU with no guest (`stillpoint_testvm::BareQemu`), for its built-in NBD server.
pub struct QemuNoGuest {
    qemu: stillpoint_testvm::BareQemu,
    pub qmp_socket: PathBuf,
}

impl QemuNoGuest {
    pub async fn start(dir: &Path) -> QemuNoGuest {
        let qemu = stillpoint_testvm::BareQemu::start(dir)
            .await
            .unwrap_or_else(|e| panic!("{e} (scripts/install-deps.sh installs QEMU)"));
        let qmp_socket = qemu.qmp_socket().to_path_buf();
        QemuNoGuest { qemu, qmp_socket }
    }

    pub async fn connect(&self) -> stillpoint_qmp::Qmp {
        stillpoint_qmp::Qmp::connect_unix(&self.qmp_socket)
            .await
            .unwrap_or_else(|e| panic!("connect to QEMU's QMP socket: {e}"))
    }

    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        self.qemu
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Writes `bytes` as a raw file and converts it to a sparse qcow2 image
/// (zero runs of 4 KiB or more become unallocated).
pub fn qcow2_from_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let img = dir.join(format!("{name}.qcow2"));
    std::fs::write(&raw, bytes).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    img
}

/// The image's guest-visible bytes, as `qemu-img convert -O raw` reads them.
pub fn image_bytes(dir: &Path, image: &Path, format: &str) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.converted.raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// `nbdinfo --map[=CONTEXT] URI` as extents (flags = nbdinfo's type column),
/// adjacent equal extents merged.
pub fn nbdinfo_map(context: Option<&str>, uri: &str) -> Vec<Extent> {
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let rows = run("nbdinfo", &[&map_arg, uri]);
    stillpoint_nbd::merge_extents(rows.lines().map(|l| {
        let mut f = l.split_whitespace();
        Extent {
            offset: f.next().unwrap().parse().unwrap(),
            length: f.next().unwrap().parse().unwrap(),
            flags: f.next().unwrap().parse().unwrap(),
        }
    }))
}

/// A deterministic mix: pattern data, zero runs (become holes) and
/// pseudo-random bytes, in uneven pieces.
pub fn mixed_content(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut at = 0;
    let mut kind = 0;
    while at < size {
        let len = [192 << 10, 64 << 10, 1 << 20, 4096, 300 << 10][kind % 5].min(size - at);
        match kind % 3 {
            0 => v[at..at + len]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = ((at + i) / 512 % 251) as u8 + 1),
            1 => {} // zeros
            _ => v[at..at + len].iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
        }
        at += len;
        kind += 1;
    }
    v
}
