//! `stillpoint vm run|list|stop` through the built binary, with real QEMU VMs in a temporary
//! runtime root. The VMs are detached (they outlive the CLI), so a guard kills whatever a
//! failing test leaves behind.
#![cfg(feature = "vm-tests")]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use stillpoint_testvm::VmRecord;
use tempfile::TempDir;

/// A runtime root of its own, and the QEMU pids to kill if the test fails half-way.
struct Sandbox {
    root: TempDir,
    pids: Vec<u32>,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("sp-cli-")
                .tempdir()
                .expect("tempdir"),
            pids: Vec::new(),
        }
    }

    fn stillpoint(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args(args)
            .env("STILLPOINT_RUNTIME_DIR", self.root.path())
            .env_remove("STILLPOINT_CONFIG")
            .current_dir(self.root.path())
            .output()
            .expect("run stillpoint")
    }

    /// Runs a command that must succeed and returns its stdout as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let output = self.stillpoint(args);
        assert!(
            output.status.success(),
            "stillpoint {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON on stdout")
    }

    /// `vm run` with `--json`; remembers the pid for cleanup.
    fn run_vm(&mut self, args: &[&str]) -> VmRecord {
        let mut all = vec!["--json", "vm", "run"];
        all.extend_from_slice(args);
        let record: VmRecord = serde_json::from_value(self.json(&all)).expect("a vm.json record");
        self.pids.push(record.pid);
        record
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for pid in &self.pids {
            if qemu_alive(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Alive and not a zombie (a detached QEMU's new parent may never reap it).
fn qemu_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

const AGENT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn run_list_stop_through_the_binary() {
    let mut sandbox = Sandbox::new();
    let record = sandbox.run_vm(&["demo", "--wait"]);
    // The CLI has exited; the VM lives on, with the demo defaults.
    assert!(
        qemu_alive(record.pid),
        "QEMU {} did not outlive `vm run`",
        record.pid
    );
    assert_eq!(record.name, "demo");
    assert_eq!(record.launched_by, "stillpoint vm run");
    assert_eq!(record.disks.len(), 1);
    assert_eq!(record.disks[0].virtual_size, 256 << 20);
    let qga = record.qga_socket.clone().expect("agent on by default");
    let ping = stillpoint_testvm::probe::agent_command(&qga, "guest-ping", None, AGENT)
        .await
        .expect("ping");
    assert_eq!(ping, serde_json::json!({}));

    let listed = sandbox.json(&["--json", "vm", "list"]);
    assert_eq!(listed[0]["name"], "demo");
    assert_eq!(listed[0]["state"], "running");
    assert_eq!(listed[0]["pid"], record.pid);
    assert_eq!(listed[0]["qga_socket"].as_str(), qga.to_str());

    let again = sandbox.stillpoint(&["vm", "run", "demo"]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("VM `demo`") && stderr.contains("already running"),
        "{stderr}"
    );

    let stopped = sandbox.json(&["--json", "vm", "stop", "demo"]);
    assert_eq!(stopped["outcome"], "quit");
    assert!(
        !qemu_alive(record.pid),
        "QEMU still running after `vm stop`"
    );
    assert!(!sandbox.root.path().join("vms/demo").exists());
    assert_eq!(
        sandbox.json(&["--json", "vm", "list"]),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn run_flags_reach_the_guest() {
    let mut sandbox = Sandbox::new();
    let hook = sandbox.root.path().join("hook.sh");
    std::fs::write(&hook, "#!/bin/sh\necho \"$1\" >> /run/hook.log\n").expect("write hook");
    let record = sandbox.run_vm(&[
        "hooked",
        "--disks",
        "2",
        "--disk-size",
        "32M",
        "--memory",
        "200",
        "--qga-arg=--block-rpcs",
        "--qga-arg",
        "guest-fsfreeze-freeze",
        "--fsfreeze-hook",
        hook.to_str().expect("utf-8 path"),
        "--wait",
    ]);
    let sizes: Vec<u64> = record.disks.iter().map(|disk| disk.virtual_size).collect();
    assert_eq!(sizes, [32 << 20, 32 << 20]);
    let qga = record.qga_socket.clone().expect("agent on");
    let info = stillpoint_testvm::probe::agent_command(&qga, "guest-info", None, AGENT)
        .await
        .expect("guest-info");
    let freeze = info["supported_commands"]
        .as_array()
        .expect("commands")
        .iter()
        .find(|command| command["name"] == "guest-fsfreeze-freeze")
        .cloned()
        .expect("freeze listed");
    assert_eq!(freeze["enabled"], false, "--qga-arg did not reach qemu-ga");
    let installed = stillpoint_testvm::probe::guest_exec(
        &qga,
        &["cat", "/etc/stillpoint/fsfreeze-hook"],
        AGENT,
    )
    .await
    .expect("cat hook");
    assert_eq!(
        installed.stdout_text(),
        std::fs::read_to_string(&hook).expect("hook")
    );
    let memory =
        stillpoint_testvm::probe::guest_exec(&qga, &["grep", "MemTotal", "/proc/meminfo"], AGENT)
            .await
            .expect("meminfo");
    let kib: u64 = memory
        .stdout_text()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        kib > 150 * 1024 && kib <= 200 * 1024,
        "MemTotal {kib} KiB for --memory 200"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.pid)).expect("cmdline");
    assert!(String::from_utf8_lossy(&cmdline).contains("id=vd1"));
    sandbox.json(&["--json", "vm", "stop", "hooked"]);
}

#[tokio::test]
async fn agent_off_has_a_null_agent_socket() {
    let mut sandbox = Sandbox::new();
    let record = sandbox.run_vm(&["quiet", "--no-agent", "--wait"]);
    assert!(record.qga_socket.is_none());
    let text =
        std::fs::read_to_string(sandbox.root.path().join("vms/quiet/vm.json")).expect("vm.json");
    let json: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["qga_socket"], Value::Null);
    assert!(!Path::new(&sandbox.root.path().join("vms/quiet/qga.sock")).exists());
    let human = sandbox.stillpoint(&["vm", "list"]);
    let stdout = String::from_utf8_lossy(&human.stdout);
    assert!(
        stdout.contains("quiet") && stdout.contains("running"),
        "{stdout}"
    );
    sandbox.json(&["--json", "vm", "stop", "quiet"]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let sandbox = Sandbox::new();
    let ghost = sandbox.stillpoint(&["vm", "stop", "ghost"]);
    assert_eq!(ghost.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&ghost.stderr).contains("no VM `ghost`"));
    let name = sandbox.stillpoint(&["vm", "run", "a/b"]);
    assert_eq!(name.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&name.stderr).contains("invalid VM name"));
    let size = sandbox.stillpoint(&["vm", "run", "x", "--disk-size", "lots"]);
    assert_eq!(
        size.status.code(),
        Some(2),
        "a bad flag value is a usage error"
    );
    assert!(String::from_utf8_lossy(&size.stderr).contains("disk size"));
    let help = sandbox.stillpoint(&["vm", "run", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--fsfreeze-hook"));
}
