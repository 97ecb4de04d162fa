//! The boot test: start the restored VM once, unattended, and see whether it comes up.
//!
//! The guest runs on qcow2 overlays (backed by the restored images, which QEMU opens
//! read-only) in a temporary directory, with fresh sockets there, in its own process group
//! that is killed on every path (and by the kernel if this process dies first). It passes
//! when QMP says `running`, the guest agent (when the definition has a channel for one)
//! answers `guest-ping`, and the restored files are unchanged afterwards.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::rewrite::{for_boot_test, rewrite_definition};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::qemu::{QemuVm, QemuVmSpec, SpecOrigin};
use crate::restore::{BootFilesystem, BootTestReport, BootTestRequest, TargetDisk};
use crate::{GuestAgent, RunState, Vm};

/// How often the test looks at QEMU and the agent while it waits.
const POLL: Duration = Duration::from_millis(200);
/// How long a clean `quit` may take before QEMU is killed.
const QUIT_LIMIT: Duration = Duration::from_secs(10);
/// Console lines kept for a failure report.
const CONSOLE_TAIL_LINES: usize = 30;

/// Boots the restored VM once (see the module doc). `Err` when the test cannot be set up
/// (no overlay, no QEMU); a guest that does not come up is a report with `passed: false`.
pub async fn boot_test(request: &BootTestRequest) -> Result<BootTestReport> {
    let missing: Vec<&str> = request
        .recorded
        .disks
        .iter()
        .filter(|d| !request.disks.iter().any(|t| t.id == d.id))
        .map(|d| d.id.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(boot_error(format!(
            "VM {}: the boot test needs every disk of the VM restored; missing: {}",
            request.vm,
            missing.join(", ")
        )));
    }
    let scratch_parent = request
        .scratch_parent
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let temp = tempfile::Builder::new()
        .prefix("stillpoint-boot-")
        .tempdir_in(&scratch_parent)
        .map_err(|e| {
            boot_error(format!(
                "cannot create a temporary directory in {}",
                scratch_parent.display()
            ))
            .with_source(e)
        })?;
    let run_dir = temp.path().join("run");
    std::fs::create_dir(&run_dir)
        .map_err(|e| boot_error(format!("cannot create {}", run_dir.display())).with_source(e))?;

    let mut overlays = Vec::new();
    for disk in &request.disks {
        let overlay = temp.path().join(format!(
            "{}.overlay.qcow2",
            stillpoint_os::names::file_name(&disk.id)
        ));
        create_overlay(&disk.path, &disk.format, &overlay)
            .await
            .map_err(|e| {
                PlatformError::new(
                    PlatformErrorKind::BootTest,
                    format!(
                        "VM {}: disk {}: cannot create the overlay",
                        request.vm, disk.id
                    ),
                )
                .with_source(e)
            })?;
        overlays.push(TargetDisk {
            id: disk.id.clone(),
            path: overlay,
            format: "qcow2".into(),
        });
    }
    let rewritten = rewrite_definition(&request.recorded, &overlays, &run_dir)?;
    let qmp_socket = run_dir.join("boot-test-qmp.sock");
    let (argv, adapted) = for_boot_test(&rewritten.argv, request.accel, &qmp_socket)?;
    let mut report = BootTestReport {
        argv: argv.clone(),
        notes: adapted,
        agent_channel: rewritten.agent_socket.is_some(),
        ..Default::default()
    };
    let before = fingerprints(&request.disks);

    let log_path = temp.path().join("qemu.log");
    let program = program_to_run(&argv[0], &mut report.notes);
    let qemu = QemuProcess::spawn(&program, &argv[1..], temp.path(), &log_path).map_err(|e| {
        PlatformError::new(
            PlatformErrorKind::BootTest,
            format!("VM {}: cannot start {program}", request.vm),
        )
        .with_source(e)
    })?;
    let vm = QemuVm::new(
        QemuVmSpec {
            name: format!("{}-boot-test", request.vm),
            qmp_socket: qmp_socket.clone(),
            qga_socket: rewritten.agent_socket.clone(),
            pid: Some(qemu.pid()),
            origin: SpecOrigin::RuntimeDir(temp.path().to_path_buf()),
        },
        stillpoint_qga::Timeouts::default(),
    );

    let outcome = watch(&vm, &qemu, request, &mut report).await;
    if qemu.exit_status().is_none() {
        quit(&vm, &qemu).await;
    }
    drop(qemu);
    report.restored_images_untouched = fingerprints(&request.disks) == before;
    if let Err(failure) = outcome {
        report.failure = Some(failure);
    } else if !report.restored_images_untouched {
        report.failure = Some("a restored image changed during the boot test".into());
    }
    report.passed = report.failure.is_none();
    if !report.passed {
        report.console_tail = Some(console_tail(rewritten.console_log.as_deref(), &log_path));
    }
    drop(temp);
    Ok(report)
}

/// Waits for `running`, then for the agent; fills `report`. `Err` says why it failed.
async fn watch(
    vm: &QemuVm,
    qemu: &QemuProcess,
    request: &BootTestRequest,
    report: &mut BootTestReport,
) -> std::result::Result<(), String> {
    let started = qemu.started;
    let deadline = started + request.start_timeout;
    loop {
        if let Some(status) = qemu.exit_status() {
            return Err(format!("QEMU exited ({status}) before the VM ran"));
        }
        if let Ok(status) = vm.status().await
            && status.state == RunState::Running
        {
            report.booted = true;
            report.seconds_to_running = Some(started.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "QMP did not report the VM running within {} s",
                request.start_timeout.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let Some(agent) = vm.agent() else {
        report
            .notes
            .push("the VM has no guest agent channel: only checked that it runs".into());
        return Ok(());
    };
    let deadline = Instant::now() + request.agent_timeout;
    loop {
        if let Some(status) = qemu.exit_status() {
            return Err(format!(
                "QEMU exited ({status}) before the guest agent answered"
            ));
        }
        // One ping may wait for the agent's sync handshake; it never outlasts the deadline.
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(())) = tokio::time::timeout(remaining, agent.ping()).await {
            report.agent_answered = true;
            report.seconds_to_agent = Some(started.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the guest agent did not answer guest-ping within {} s",
                request.agent_timeout.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    collect_guest_facts(agent, report).await;
    Ok(())
}

async fn collect_guest_facts(agent: Arc<dyn GuestAgent>, report: &mut BootTestReport) {
    match agent.fs_info().await {
        Ok(filesystems) => {
            report.filesystems = filesystems
                .into_iter()
                .map(|fs| BootFilesystem {
                    mountpoint: fs.mountpoint,
                    fs_type: fs.fs_type,
                    device: fs.name,
                })
                .collect();
        }
        Err(error) => report
            .notes
            .push(format!("guest-get-fsinfo failed: {error}")),
    }
    match agent.os_info().await {
        Ok(os) => {
            let name = os.pretty_name.or(os.name).or(os.id);
            report.os = match (name, os.kernel_release) {
                (Some(name), Some(kernel)) => Some(format!("{name} (kernel {kernel})")),
                (Some(name), None) => Some(name),
                (None, Some(kernel)) => Some(format!("kernel {kernel}")),
                (None, None) => None,
            };
        }
        Err(error) => report
            .notes
            .push(format!("guest-get-osinfo failed: {error}")),
    }
    agent.release().await;
}

/// QMP `quit`, then a kill when QEMU has not gone within [`QUIT_LIMIT`].
async fn quit(vm: &QemuVm, qemu: &QemuProcess) {
    if let Ok(monitor) = vm.monitor().await {
        let _ = monitor.quit().await;
    }
    let deadline = Instant::now() + QUIT_LIMIT;
    while qemu.exit_status().is_none() && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT OVERLAY`.
async fn create_overlay(
    backing: &Path,
    format: &str,
    overlay: &Path,
) -> std::result::Result<(), std::io::Error> {
    let output = tokio::process::Command::from(stillpoint_os::child::command("qemu-img"))
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", format])
        .arg(overlay)
        .output()
        .await?;
    if output.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "qemu-img create failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// The recorded program, or its bare name looked up in `PATH` when the recorded path does
/// not exist here (a definition from another host).
fn program_to_run(recorded: &str, notes: &mut Vec<String>) -> String {
    let path = Path::new(recorded);
    if path.is_absolute()
        && !path.exists()
        && let Some(name) = path.file_name()
    {
        let name = name.to_string_lossy().into_owned();
        notes.push(format!(
            "{recorded} does not exist here; ran {name} from PATH"
        ));
        return name;
    }
    recorded.to_string()
}

/// What identifies a file's content without reading it: size and modification time.
fn fingerprints(disks: &[TargetDisk]) -> Vec<Option<(u64, SystemTime)>> {
    disks
        .iter()
        .map(|d| {
            let meta = std::fs::metadata(&d.path).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        })
        .collect()
}

fn console_tail(console: Option<&Path>, qemu_log: &Path) -> String {
    let tail = |path: &Path| {
        let text = std::fs::read(path).ok()?;
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
        let joined = lines[start..].join("\n");
        (!joined.trim().is_empty()).then_some(joined)
    };
    let mut parts = Vec::new();
    if let Some(text) = console.and_then(tail) {
        parts.push(format!("guest console:\n{text}"));
    }
    if let Some(text) = tail(qemu_log) {
        parts.push(format!("QEMU output:\n{text}"));
    }
    if parts.is_empty() {
        "(the guest console and QEMU's output are empty)".into()
    } else {
        parts.join("\n")
    }
}

fn boot_error(message: impl Into<String>) -> PlatformError {
    PlatformError::new(PlatformErrorKind::BootTest, message)
}

/// QEMU in its own process group, killed (the whole group) when this handle drops, and by
/// the kernel when the thread that started it dies.
struct QemuProcess {
    child: std::sync::Mutex<Child>,
    started: Instant,
}

impl QemuProcess {
    fn spawn(program: &str, args: &[String], dir: &Path, log: &Path) -> std::io::Result<Self> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let mut command = stillpoint_os::child::command(program);
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Its own process group, so the whole group can be killed, and SIGKILL when the
        // starting thread dies, so no QEMU outlives a killed `stillpoint`.
        command.process_group(0);
        stillpoint_os::child::die_with_parent(&mut command);
        let child = command.spawn()?;
        Ok(Self {
            child: std::sync::Mutex::new(child),
            started: Instant::now(),
        })
    }

    fn pid(&self) -> u32 {
        self.lock().id()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    //! Real QEMU, no guest OS: enough to see the failure paths (QEMU refusing to start, an
    //! agent that never answers) end with a report, a console tail, QEMU gone and the
    //! scratch directory removed. The passing path, with a real guest, is the CLI's
    //! `vm_restore` test.

    use super::*;
    use crate::{DefinedDisk, VmDefinition};

    /// A VM definition recorded elsewhere (`/orig/…`) with one qcow2 disk and an agent
    /// channel, and a "restored" image for it in `dir`.
    fn fixture(dir: &Path, extra: &[&str]) -> BootTestRequest {
        let image = dir.join("vd0.qcow2");
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("16M")
            .status()
            .expect("qemu-img runs");
        assert!(created.success());
        let mut argv: Vec<String> = [
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-serial",
            "file:/orig/console.log",
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"/orig/disk0.qcow2"}}"#,
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0",
            "-chardev",
            "socket,path=/orig/qga.sock,server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        let recorded = VmDefinition {
            kind: "qemu".into(),
            argv,
            disks: vec![DefinedDisk {
                id: "vd0".into(),
                image: "/orig/disk0.qcow2".into(),
                format: "qcow2".into(),
            }],
        };
        let mut request = BootTestRequest::new(
            "fixture".into(),
            recorded,
            vec![TargetDisk {
                id: "vd0".into(),
                path: image,
                format: "qcow2".into(),
            }],
        );
        let scratch = dir.join("scratch");
        std::fs::create_dir(&scratch).expect("mkdir");
        request.scratch_parent = Some(scratch);
        request
    }

    /// Whether any process still has `needle` on its command line.
    fn process_with(needle: &str) -> bool {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
    }

    fn assert_cleaned_up(request: &BootTestRequest) {
        let scratch = request.scratch_parent.as_ref().expect("set");
        let left: Vec<_> = std::fs::read_dir(scratch).expect("scratch").collect();
        assert!(left.is_empty(), "scratch left behind: {left:?}");
        assert!(
            !process_with(&scratch.display().to_string()),
            "a QEMU of the boot test outlived it"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_agent_that_never_answers_fails_the_test_with_the_console_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        // No kernel and no bootable disk: the firmware runs, no agent ever starts.
        let mut request = fixture(dir.path(), &[]);
        request.agent_timeout = Duration::from_secs(2);
        let before = std::fs::read(&request.disks[0].path).expect("image");
        let report = boot_test(&request).await.expect("the test runs");
        assert!(report.booted, "{report:#?}");
        assert!(report.agent_channel, "{report:#?}");
        assert!(!report.agent_answered, "{report:#?}");
        assert!(!report.passed, "{report:#?}");
        assert_eq!(
            report.failure.as_deref(),
            Some("the guest agent did not answer guest-ping within 2 s")
        );
        assert!(report.console_tail.is_some(), "{report:#?}");
        assert!(report.restored_images_untouched, "{report:#?}");
        assert_eq!(
            std::fs::read(&request.disks[0].path).expect("image"),
            before
        );
        assert_cleaned_up(&request);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn qemu_refusing_to_start_is_a_failed_report_with_its_output() {
        let dir = tempfile::tempdir().expect("temp dir");
        let request = fixture(dir.path(), &["-kernel", "/nonexistent/vmlinuz"]);
        let report = boot_test(&request).await.expect("the test runs");
        assert!(!report.booted, "{report:#?}");
        assert!(!report.passed, "{report:#?}");
        let failure = report.failure.as_deref().unwrap_or_default();
        assert!(
            failure.starts_with("QEMU exited") && failure.contains("before the VM ran"),
            "{failure}"
        );
        let tail = report.console_tail.as_deref().unwrap_or_default();
        assert!(
            tail.contains("/nonexistent/vmlinuz"),
            "QEMU's own words: {tail}"
        );
        assert_cleaned_up(&request);
    }

    #[tokio::test]
    async fn every_disk_of_the_vm_must_be_restored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut request = fixture(dir.path(), &[]);
        request.disks.clear();
        let error = boot_test(&request).await.expect_err("no disks");
        assert_eq!(error.kind(), PlatformErrorKind::BootTest);
        assert_eq!(
            error.to_string(),
            "VM fixture: the boot test needs every disk of the VM restored; missing: vd0"
        );
    }
}
