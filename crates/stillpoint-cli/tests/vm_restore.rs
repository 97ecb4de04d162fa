//! `stillpoint restore` of a real VM's snapshot (TCG), through the real binary: files the
//! guest wrote come back byte for byte in a clean ext4 (checked with the real e2fsprogs), the
//! written `start-vm.sh` really starts the restored VM, `--boot-test` boots it without
//! touching the restored files, and repository damage fails the restore loudly.
//!
//! One VM test on purpose: the restored VMs need the source VM's initramfs (an external file,
//! see docs/restore.md), so the source runs throughout, and at most two VMs run at once. A
//! second test, without a VM, kills a real restore with SIGKILL mid-way and checks that the
//! next restore into the same directory removes what it left (and never what a running
//! restore stages).
#![cfg(feature = "vm-tests")]

mod support;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use stillpoint_qga::ExecRequest;
use stillpoint_testvm::{LaunchedVm, VmConfig};
use support::{stillpoint_command, text};

const PASSWORD: &str = "restore vm tests";
const HELLO: &str = "restored by stillpoint\n";
/// What the guest writes to /data/dir/numbers.txt (`seq 1 20000`, 108894 bytes).
fn numbers() -> String {
    (1..=20000).map(|n| format!("{n}\n")).collect()
}

struct Bench {
    vm: LaunchedVm,
    /// The VM's runtime root (`STILLPOINT_RUNTIME_DIR`).
    root: PathBuf,
    work: tempfile::TempDir,
}

impl Bench {
    fn path(&self, relative: &str) -> PathBuf {
        self.work.path().join(relative)
    }

    fn stillpoint(&self, args: &[&str]) -> Output {
        stillpoint_command()
            .args(args)
            .env("STILLPOINT_RUNTIME_DIR", &self.root)
            .env("STILLPOINT_PASSWORD", PASSWORD)
            .env("STILLPOINT_REPO", self.path("repo"))
            // Temporary files of the boot test land here, so the test can see them go.
            .env("TMPDIR", self.path("tmp"))
            .current_dir(self.work.path())
            .output()
            .expect("the stillpoint binary runs")
    }

    /// Runs with `--json`, expects `code`, returns the JSON document.
    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.stillpoint(&all);
        assert_eq!(output.status.code(), Some(code), "{}", text(&output));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&output)))
    }
}

fn tool(program: &str, args: &[&str], image: &Path) -> Output {
    Command::new(program)
        .args(args)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

fn sha256(path: &Path) -> String {
    let output = tool("sha256sum", &[], path);
    assert!(output.status.success(), "{}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The restored ext4 image: clean (`e2fsck -fn`, no journal to replay) and holding what the
/// guest wrote.
fn check_restored_ext4(image: &Path) {
    let fsck = tool("e2fsck", &["-fn"], image);
    assert_eq!(fsck.status.code(), Some(0), "e2fsck -fn: {}", text(&fsck));
    let header = tool("dumpe2fs", &["-h"], image);
    assert!(header.status.success(), "{}", text(&header));
    let header = String::from_utf8_lossy(&header.stdout);
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no feature line in:\n{header}"));
    assert!(features.contains("has_journal"), "{features}");
    assert!(
        !features.contains("needs_recovery"),
        "a filesystem-level snapshot needs no journal replay: {features}"
    );
    for (file, expected) in [
        ("/hello.txt", HELLO.to_string()),
        ("/dir/numbers.txt", numbers()),
    ] {
        let cat = tool("debugfs", &["-R", &format!("cat {file}")], image);
        assert!(cat.status.success(), "{}", text(&cat));
        assert!(
            String::from_utf8_lossy(&cat.stdout) == expected,
            "{file} in the restored image differs from what the guest wrote ({} bytes, want {})",
            cat.stdout.len(),
            expected.len()
        );
    }
}

/// `start-vm.sh` running in its own process group; the group is killed on drop.
struct ScriptVm(Child);

impl ScriptVm {
    fn start(script: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new("setpriv")
            // QEMU (exec'd by the script) dies with the test even if the test is killed.
            .args(["--pdeathsig", "KILL", "sh"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start-vm.sh starts");
        Self(child)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().expect("wait")
    }
}

impl Drop for ScriptVm {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

async fn agent_client(socket: &Path) -> Option<stillpoint_qga::Client<tokio::net::UnixStream>> {
    let mut client = stillpoint_qga::connect_unix(socket, Duration::from_secs(2))
        .await
        .ok()?;
    client.ping().await.ok()?;
    Some(client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filesystem_snapshot_restores_raw_and_qcow2_the_script_starts_it_and_it_boot_tests() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("restore-src"))
        .await
        .expect("the source VM boots");
    let root = vm.runtime_root().to_path_buf();
    let bench = Bench {
        vm,
        root,
        work: tempfile::tempdir().expect("temp dir"),
    };
    std::fs::create_dir(bench.path("tmp")).expect("mkdir tmp");
    let init = bench.stillpoint(&["repo", "init"]);
    assert!(init.status.success(), "{}", text(&init));

    // Known files, written through the agent and synced.
    let written = bench
        .vm
        .guest_exec(
            &[
                "sh",
                "-c",
                "printf 'restored by stillpoint\\n' > /data/hello.txt && mkdir -p /data/dir \
                 && seq 1 20000 > /data/dir/numbers.txt && sync",
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("guest-exec runs");
    assert_eq!(written.exit_code, Some(0), "{written:?}");

    let backup = bench.json(&["backup", "restore-src", "--consistency", "filesystem"], 0);
    assert_eq!(backup[0]["achieved"], "filesystem", "{backup:#}");
    let snapshot = backup[0]["snapshot"]
        .as_str()
        .expect("a snapshot id")
        .to_string();

    // --- raw: the disk, the definition, the script, the summary ---------------------------
    let raw = bench.json(&["restore", &snapshot, "--to", "raw"], 0);
    let raw_dir = bench.path("raw").canonicalize().expect("raw dir");
    let image = raw_dir.join("vd0.raw");
    assert_eq!(raw["disks"][0]["disk"], "vd0", "{raw:#}");
    assert_eq!(raw["disks"][0]["path"], image.to_str().unwrap(), "{raw:#}");
    assert_eq!(
        entries(&raw_dir),
        [
            "run",
            "snapshot.json",
            "start-vm.sh",
            "vd0.raw",
            "vm-definition.json"
        ],
        "nothing else, no staging leftovers"
    );
    let meta = std::fs::metadata(&image).expect("image");
    assert_eq!(meta.len(), 256 << 20, "the disk's full size");
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "the raw image is sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    check_restored_ext4(&image);

    let summary: Value =
        serde_json::from_slice(&std::fs::read(raw_dir.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(summary["snapshot"]["id"], snapshot.as_str());
    assert_eq!(summary["snapshot"]["vm"], "restore-src");
    assert_eq!(summary["snapshot"]["requested"], "filesystem");
    assert_eq!(summary["snapshot"]["achieved"], "filesystem");
    assert!(
        summary["snapshot"]["indications"]
            .as_array()
            .unwrap()
            .contains(&Value::from("GuestAgent")),
        "{summary:#}"
    );
    let definition: Value =
        serde_json::from_slice(&std::fs::read(raw_dir.join("vm-definition.json")).unwrap())
            .unwrap();
    assert_eq!(
        definition["disks"][0],
        serde_json::json!({"id": "vd0", "image": image, "format": "raw"})
    );
    assert_eq!(
        definition["agent_socket"],
        raw_dir.join("run/qga0.sock").to_str().unwrap()
    );
    let argv: Vec<&str> = definition["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        !argv
            .iter()
            .any(|a| a.contains(bench.vm.dir().to_str().unwrap())
                && !a.ends_with("initramfs.cpio.gz")),
        "only the initramfs (external) still points into the source VM: {argv:?}"
    );
    let script = raw_dir.join("start-vm.sh");
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "start-vm.sh is executable");

    // The same target again: refused, naming what it would overwrite; --force replaces.
    let again = bench.stillpoint(&["restore", &snapshot, "--to", "raw"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already holds vd0.raw") && stderr.contains("--force"),
        "{stderr}"
    );

    // --- qcow2 with and without --boot-test ----------------------------------------------
    bench.json(
        &["restore", &snapshot, "--to", "plain", "--format", "qcow2"],
        0,
    );
    let untouched = sha256(&bench.path("plain/vd0.qcow2"));
    let booted = bench.json(
        &[
            "restore",
            &snapshot,
            "--to",
            "booted",
            "--format",
            "qcow2",
            "--boot-test",
        ],
        0,
    );
    let report = &booted["boot_test"];
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["booted"], true, "{report:#}");
    assert_eq!(report["agent_answered"], true, "{report:#}");
    assert!(
        report["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|fs| fs["mountpoint"] == "/data" && fs["type"] == "ext4"),
        "the restored guest reports /data as ext4: {report:#}"
    );
    assert_eq!(report["restored_images_untouched"], true, "{report:#}");
    let booted_image = bench.path("booted/vd0.qcow2");
    assert_eq!(
        sha256(&booted_image),
        untouched,
        "the boot test wrote nothing into the restored image (the guest's mount did write, \
         into the overlay)"
    );
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&image)
        .arg(&booted_image)
        .output()
        .expect("qemu-img runs");
    assert!(
        compare.status.success(),
        "raw and qcow2 hold the same disk: {}",
        text(&compare)
    );
    assert!(
        entries(&bench.path("tmp")).is_empty(),
        "the boot test removed its overlays and sockets: {:?}",
        entries(&bench.path("tmp"))
    );
    eprintln!(
        "boot test: running after {} s, agent after {} s",
        report["seconds_to_running"], report["seconds_to_agent"]
    );

    // --- start-vm.sh really starts the restored (raw) VM ---------------------------------
    let mut started = ScriptVm::start(&script, &bench.path("script.log"));
    let agent_socket = raw_dir.join("run/qga0.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut client = None;
    while client.is_none() && started.exited().is_none() && std::time::Instant::now() < deadline {
        client = agent_client(&agent_socket).await;
        if client.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut client = client.unwrap_or_else(|| {
        panic!(
            "the VM started by start-vm.sh did not answer (QEMU exit: {:?}); its output:\n{}\n\
             console:\n{}",
            started.exited(),
            std::fs::read_to_string(bench.path("script.log")).unwrap_or_default(),
            std::fs::read_to_string(raw_dir.join("run/console.log")).unwrap_or_default()
        )
    });
    let hello = client
        .run(
            &ExecRequest::new("cat", ["/data/hello.txt"]).capture_output(true),
            Duration::from_secs(30),
        )
        .await
        .expect("guest-exec in the restored VM");
    assert_eq!(hello.stdout_text(), HELLO, "{hello:?}");
    drop(client);
    drop(started);

    // --- a damaged chunk fails the restore, naming snapshot, disk and offset --------------
    let chunks = bench.path("repo/chunks");
    let victim = std::fs::read_dir(&chunks)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .expect("a stored chunk");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();
    let damaged = bench.stillpoint(&["restore", &snapshot, "--to", "damaged"]);
    assert_eq!(damaged.status.code(), Some(1), "{}", text(&damaged));
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    for expected in [snapshot.as_str(), "disk vd0", "offset "] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
    let left: Vec<String> = match std::fs::read_dir(bench.path("damaged")) {
        Ok(_) => entries(&bench.path("damaged")),
        Err(_) => Vec::new(),
    };
    assert!(
        left.is_empty(),
        "a failed restore leaves nothing under a final name: {left:?}"
    );
}

/// A `stillpoint` with its repository and scratch in `work` (no VM needed).
fn stillpoint_in(work: &Path) -> Command {
    let mut command = stillpoint_command();
    command
        .env("STILLPOINT_PASSWORD", PASSWORD)
        .env("STILLPOINT_REPO", work.join("repo"))
        .env("STILLPOINT_RUNTIME_DIR", work.join("runtime"))
        .current_dir(work);
    command
}

/// `stillpoint restore` held at `restore::disk-staged` (its disk written into the staging
/// directory, nothing renamed yet); killed with SIGKILL on drop.
struct PausedRestore {
    child: Child,
    stderr: String,
}

impl PausedRestore {
    fn start(work: &Path, snapshot: &str, target: &str) -> Self {
        let mut child = stillpoint_in(work)
            .args(["restore", snapshot, "--to", target])
            .env("FAILPOINTS", "restore::disk-staged=pause")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stillpoint restore starts");
        let (send, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut paused = Self {
            child,
            stderr: String::new(),
        };
        loop {
            match lines.recv_timeout(Duration::from_secs(300)) {
                Ok(line) => {
                    paused.stderr.push_str(&line);
                    paused.stderr.push('\n');
                    if line.contains("failpoint restore::disk-staged reached") {
                        return paused;
                    }
                }
                Err(_) => panic!(
                    "the restore never reached failpoint restore::disk-staged (is the binary \
                     built with the `failpoints` feature?); exit {:?}; stderr:\n{}",
                    paused.child.try_wait(),
                    paused.stderr
                ),
            }
        }
    }

    /// SIGKILL, as `kill -9`, and reap.
    fn kill(mut self) {
        self.child.kill().expect("kill -9 the restore");
        let status = self.child.wait().expect("reap the restore");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "killed by SIGKILL: {status:?}"
        );
    }
}

impl Drop for PausedRestore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The staging directories (`.stillpoint-restore-*`) in `dir`.
fn staging_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".stillpoint-restore-"))
        })
        .collect();
    found.sort();
    found
}

fn run_json(command: &mut Command, code: i32) -> Value {
    let output = command.arg("--json").output().expect("stillpoint runs");
    assert_eq!(output.status.code(), Some(code), "{}", text(&output));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&output)))
}

/// A restore killed with SIGKILL mid-way leaves its staging directory (the staged disk); the
/// next restore into the same directory removes it and restores correctly — while the
/// staging directory of a restore that still runs is never touched. Real binary, real
/// SIGKILL; no VM needed (an image snapshot).
#[test]
fn a_killed_restores_staging_directory_goes_with_the_next_restore_a_running_ones_stays() {
    let work = tempfile::tempdir().expect("temp dir");
    let work = work.path();
    let init = stillpoint_in(work)
        .args(["repo", "init"])
        .output()
        .expect("stillpoint runs");
    assert!(init.status.success(), "{}", text(&init));
    // 48 MiB of incompressible data, so the staged copy is big and really allocated.
    let image = work.join("disk.img");
    let made = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=48", "status=none"])
        .arg(format!("of={}", image.display()))
        .status()
        .expect("dd runs");
    assert!(made.success());
    let backup = run_json(
        stillpoint_in(work).args(["backup-image", "disk.img", "--name", "img"]),
        0,
    );
    let snapshot = backup["snapshot"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    let original = sha256(&image);

    // --- kill -9 mid-way, then the next restore into the same directory -------------------
    let killed = PausedRestore::start(work, &snapshot, "killed");
    let target = work.join("killed");
    let left = staging_dirs(&target);
    assert_eq!(left.len(), 1, "one staging directory: {left:?}");
    let staged = left[0].join("disk.raw");
    assert_eq!(
        std::fs::metadata(&staged).expect("the staged disk").len(),
        48 << 20
    );
    killed.kill();
    assert_eq!(
        entries(&target),
        [left[0].file_name().unwrap().to_string_lossy().into_owned()],
        "the killed restore left its staging directory and nothing under a final name"
    );
    let allocated = std::fs::metadata(&staged).expect("still there").blocks() * 512;
    assert!(allocated >= 48 << 20, "{allocated} bytes left behind");

    let next = run_json(
        stillpoint_in(work).args(["restore", &snapshot, "--to", "killed"]),
        0,
    );
    assert_eq!(
        entries(&target),
        ["disk.raw", "snapshot.json"],
        "the leftover is gone"
    );
    assert_eq!(sha256(&target.join("disk.raw")), original, "restored right");
    let notes: Vec<&str> = next["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let said = format!(
        "removed {}, which a killed restore left behind",
        left[0].display()
    );
    assert!(
        notes.iter().any(|n| n.starts_with(&said)),
        "{said:?} not in {notes:?}"
    );

    // --- a restore that still runs keeps its staging directory ----------------------------
    let running = PausedRestore::start(work, &snapshot, "busy");
    let busy = work.join("busy");
    let theirs = staging_dirs(&busy);
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    let beside = run_json(
        stillpoint_in(work).args(["restore", &snapshot, "--to", "busy"]),
        0,
    );
    assert_eq!(
        staging_dirs(&busy),
        theirs,
        "the running restore's staging directory is untouched"
    );
    assert!(theirs[0].join("disk.raw").exists());
    assert_eq!(sha256(&busy.join("disk.raw")), original);
    assert!(
        !beside.to_string().contains("killed restore"),
        "nothing was removed: {beside:#}"
    );
    drop(running);
}
