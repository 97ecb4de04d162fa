//! What the backup VM tests share (on top of `support`, which every test binary using this
//! module declares too): the real `stillpoint` binary run against a test VM's
//! runtime root and a fresh repository, the restored images read with the real e2fsprogs
//! (`e2fsck`, `dumpe2fs`, `debugfs`), and small guest helpers.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::stillpoint_command;
pub use crate::support::text;
use serde_json::Value;
use stillpoint_platform::capture::{Capture, CaptureInventory};
use stillpoint_platform::qemu::QemuInventory;
use stillpoint_platform::qemu::capture::QemuCapture;
use stillpoint_qga::FreezeStatus;
use stillpoint_testvm::{LaunchedVm, VmConfig, probe, wait_until};

pub const PASSWORD: &str = "backup vm tests";
pub const MIB: u64 = 1 << 20;
/// The repository's chunk size in these tests (the default, written out because the tests
/// count chunks).
pub const CHUNK: u64 = 4 * MIB;

/// A booted test VM, a repository beside it, and the `stillpoint` binary pointed at both.
pub struct Bench {
    pub vm: LaunchedVm,
    /// The VM's runtime root (`STILLPOINT_RUNTIME_DIR` for the binary).
    pub root: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Bench {
    /// Boots `config` (a VM that cannot start fails the test) and initialises an encrypted
    /// repository.
    pub async fn boot(config: VmConfig) -> Self {
        let vm = LaunchedVm::boot_for_test(config)
            .await
            .expect("the test VM boots");
        let root = vm.runtime_root().to_path_buf();
        let bench = Self {
            vm,
            root,
            dir: tempfile::tempdir().unwrap(),
        };
        let init = bench.run(&["repo", "init", "--chunk-size", "4MiB"]);
        assert!(init.status.success(), "repo init: {}", text(&init));
        bench
    }

    pub fn name(&self) -> &str {
        self.vm.name()
    }

    pub fn command(&self) -> Command {
        let mut command = stillpoint_command();
        command
            .env("STILLPOINT_RUNTIME_DIR", &self.root)
            .env("STILLPOINT_PASSWORD", PASSWORD)
            .current_dir(self.dir.path())
            .arg("--repo")
            .arg(self.dir.path().join("repo"));
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("the stillpoint binary runs")
    }

    /// `stillpoint backup VM --json ARGS`: the exit code and this VM's report.
    pub fn backup(&self, args: &[&str]) -> (Option<i32>, Value, Output) {
        let mut all = vec!["backup", self.name(), "--json"];
        all.extend_from_slice(args);
        let output = self.run(&all);
        let report = report_of(&output);
        (output.status.code(), report, output)
    }

    /// Starts `stillpoint backup VM --json ARGS` with `FAILPOINTS` set, stderr read line by
    /// line in the background.
    pub fn spawn_backup(&self, failpoints: &str, args: &[&str]) -> Running {
        let mut child = self
            .command()
            .args(["backup", self.name(), "--json"])
            .args(args)
            .env("FAILPOINTS", failpoints)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the stillpoint binary starts");
        let lines = read_lines(child.stderr.take().expect("piped"));
        Running {
            child: Some(child),
            lines,
            stderr: String::new(),
        }
    }

    /// The VM's snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<Value> {
        let output = self.run(&["snapshots", self.name(), "--json"]);
        assert!(output.status.success(), "snapshots: {}", text(&output));
        let list: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        list.as_array().expect("an array").clone()
    }

    /// Restores disk `disk` of `snapshot` as a raw image; returns its path.
    pub fn restore(&self, snapshot: &str, disk: &str) -> PathBuf {
        let to = self.dir.path().join(format!("restore-{snapshot}-{disk}"));
        let output = self.run(&[
            "restore",
            snapshot,
            "--to",
            to.to_str().unwrap(),
            "--format",
            "raw",
            "--disk",
            disk,
        ]);
        assert!(output.status.success(), "restore: {}", text(&output));
        let image = to.join(format!("{disk}.raw"));
        assert!(image.exists(), "restore wrote {}", image.display());
        image
    }

    /// Runs `script` with `sh -c` in the guest; its stdout. A non-zero exit fails the test.
    pub async fn sh(&self, script: &str) -> String {
        let output = self
            .vm
            .guest_exec(&["sh", "-c", script], Duration::from_secs(300))
            .await
            .expect("guest-exec");
        assert_eq!(
            output.exit_code,
            Some(0),
            "guest command failed: {script}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A file's bytes as the guest reads them.
    pub async fn guest_file(&self, path: &str) -> Vec<u8> {
        let output = self
            .vm
            .guest_exec(&["cat", path], Duration::from_secs(120))
            .await
            .expect("guest-exec");
        assert_eq!(output.exit_code, Some(0), "cat {path} in the guest");
        output.stdout
    }

    /// The guest agent's freeze status on a fresh connection (`None` while someone else holds
    /// the agent channel).
    pub async fn freeze_status(&self) -> Option<FreezeStatus> {
        let socket = self.vm.qga_socket()?;
        let mut client = stillpoint_qga::connect_unix(socket, Duration::from_secs(3))
            .await
            .ok()?;
        tokio::time::timeout(Duration::from_secs(5), client.fsfreeze_status())
            .await
            .ok()?
            .ok()
    }

    /// Waits until the agent reports the guest thawed.
    pub async fn wait_thawed(&self) -> bool {
        wait_until(Duration::from_secs(90), || async {
            self.freeze_status().await == Some(FreezeStatus::Thawed)
        })
        .await
    }

    /// QEMU's run state (`running`, `paused`, …) from `query-status` on a fresh connection.
    pub async fn run_state(&self) -> String {
        let status = probe::monitor_command(
            self.vm.qmp_socket(),
            "query-status",
            Duration::from_secs(20),
        )
        .await
        .expect("query-status");
        status["status"].as_str().unwrap_or_default().to_string()
    }

    /// What the capture driver sees of the VM now, on a fresh monitor connection (closed
    /// again before this returns): its disks with their format, bitmap storage and stillpoint
    /// bitmaps, and any leftovers of a capture.
    pub async fn capture_inventory(&self) -> CaptureInventory {
        let spec = QemuInventory::new(Vec::new(), self.root.clone())
            .find(self.name())
            .expect("the VM is in its runtime root");
        QemuCapture::for_spec(&spec)
            .inspect()
            .await
            .expect("the capture driver reads QEMU's block state")
    }

    /// One QMP command without arguments on a fresh connection.
    pub async fn qmp(&self, execute: &str) {
        probe::monitor_command(self.vm.qmp_socket(), execute, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("QMP {execute}: {e}"));
    }

    /// The guardian's log of this VM's freeze leases.
    pub fn guardian_log(&self) -> String {
        std::fs::read_to_string(
            self.root
                .join("leases")
                .join(format!("{}.guardian.log", self.name())),
        )
        .unwrap_or_default()
    }

    pub fn lease(&self) -> PathBuf {
        self.root
            .join("leases")
            .join(format!("{}.json", self.name()))
    }
}

/// A backup started with [`Bench::spawn_backup`]. Dropped without [`Running::finish`] or
/// [`Running::kill`] (a failing test), it kills the backup, so no paused backup outlives its
/// test.
pub struct Running {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// What stderr said so far.
    pub stderr: String,
}

impl Running {
    fn child(&self) -> &Child {
        self.child.as_ref().expect("present until consumed")
    }

    /// Waits until stderr says `failpoint NAME reached` (the backup stands there now). Fails
    /// the test, with what the backup printed, if it exits first.
    pub fn wait_for_failpoint(&mut self, name: &str) {
        let wanted = format!("failpoint {name} reached");
        loop {
            match self.lines.recv_timeout(Duration::from_secs(300)) {
                Ok(line) => {
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                    if line.contains(&wanted) {
                        return;
                    }
                }
                Err(_) => {
                    let mut child = self.child.take().expect("present until consumed");
                    let _ = child.kill();
                    let stdout = child
                        .wait_with_output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    panic!(
                        "the backup never reached failpoint {name} (is the binary built with \
                         the `failpoints` feature? another build may have replaced it); \
                         stderr:\n{}\nstdout:\n{stdout}",
                        self.stderr
                    );
                }
            }
        }
    }

    /// SIGUSR1: every failpoint off, a paused backup goes on.
    pub fn release(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child().id() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the backup");
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("present until consumed");
        child.kill().expect("kill the backup");
        child.wait().expect("reap the backup");
    }

    /// Waits for the end: exit code, report, stderr.
    pub fn finish(mut self) -> (Option<i32>, Value, String) {
        let child = self.child.take().expect("present until consumed");
        let output = child.wait_with_output().expect("the backup ends");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        let report = report_of(&output);
        (
            output.status.code(),
            report,
            std::mem::take(&mut self.stderr),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// The one report of `backup --json` (an array of one), or the error document.
fn report_of(output: &Output) -> Value {
    let json: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("backup --json printed no JSON ({e}):\n{}", text(output)));
    match json {
        Value::Array(mut reports) => {
            assert_eq!(reports.len(), 1, "one report per VM: {}", text(output));
            reports.remove(0)
        }
        other => other,
    }
}

/// The report's disk `id`.
pub fn disk<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|d| d["id"] == id))
        .unwrap_or_else(|| panic!("no disk {id} in the report: {report:#}"))
}

pub fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// The snapshot id a successful backup published.
pub fn snapshot_of(report: &Value) -> String {
    report["snapshot"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshot in the report: {report:#}"))
        .to_string()
}

/// `e2fsck -fn IMAGE`: exit code and output (0: clean, nothing to fix).
pub fn e2fsck(image: &Path) -> (i32, String) {
    let output = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck runs (e2fsprogs)");
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Whether the ext4 image's superblock carries `needs_recovery` (an unreplayed journal).
pub fn needs_recovery(image: &Path) -> bool {
    let output = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("dumpe2fs runs (e2fsprogs)");
    let header = String::from_utf8_lossy(&output.stdout);
    let features = header
        .lines()
        .find(|line| line.starts_with("Filesystem features:"))
        .unwrap_or_else(|| {
            panic!(
                "dumpe2fs -h {} has no features line:\n{header}",
                image.display()
            )
        });
    features.split_whitespace().any(|f| f == "needs_recovery")
}

/// A file's bytes read from an ext4 image with `debugfs` (no mount, no journal replay).
pub fn debugfs_file(image: &Path, path: &str) -> Vec<u8> {
    let dump = image.with_extension(format!("{}.out", path.replace('/', "_")));
    let output = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", dump.display()))
        .arg(image)
        .output()
        .expect("debugfs runs (e2fsprogs)");
    let data = std::fs::read(&dump).unwrap_or_else(|_| {
        panic!(
            "debugfs could not dump {path} from {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let _ = std::fs::remove_file(&dump);
    data
}

/// SHA-256 of a host file, with the host's `sha256sum` (the guest's busybox has the same).
pub fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// SHA-256 of bytes, with the host's `sha256sum`.
pub fn sha256_bytes(data: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output().expect("sha256sum ends");
    writer
        .join()
        .expect("writer")
        .expect("sha256sum reads its input");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The guest's whole disk with serial `serial`, hashed as it is on the virtual disk (direct
/// I/O, past the guest's page cache). The disk must not be mounted.
pub async fn guest_disk_sha256(bench: &Bench, serial: &str) -> String {
    let out = bench
        .sh(&format!(
            "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {serial} ] && dev=/dev/${{d##*/}}; done; \
             dd if=$dev bs=1M iflag=direct 2>/dev/null | sha256sum"
        ))
        .await;
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
