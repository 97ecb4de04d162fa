//! Launching a VM, waiting for it, and ending it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::archive::Archive;
use crate::config::VmConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::guest::GuestImage;
use crate::paths::{find_tool, vm_dir};
use crate::probe;
use crate::qemu::{Accel, VmFiles, qemu_args};
use crate::record::{DiskRecord, VmRecord};
use crate::wait::wait_until;

/// Every line `/init` prints starts with this.
pub const MARKER_PREFIX: &str = "stillpoint-guest: ";
/// `/init` mounted all data disks.
pub const MARKER_DISKS_MOUNTED: &str = "stillpoint-guest: data disks mounted";
/// `/init` finished setting up and is about to start qemu-ga (or to idle, agent off).
pub const MARKER_READY: &str = "stillpoint-guest: ready";
/// `/init` is starting qemu-ga (printed again at every restart).
pub const MARKER_AGENT_STARTING: &str = "stillpoint-guest: qemu-ga starting";
/// `/init` found the agent turned off.
pub const MARKER_AGENT_DISABLED: &str = "stillpoint-guest: agent disabled";
/// `/init` hit a problem (a disk that did not mount, a module that did not load).
pub const MARKER_ERROR: &str = "stillpoint-guest: ERROR";

/// How long [`LaunchedVm::boot_for_test`] waits for the guest (≈ 4 s alone under TCG; the
/// margin is for a loaded 2-core machine running two VMs and a compiler).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a launch waits for QEMU's monitor socket.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);
/// How many console lines go into error messages.
const CONSOLE_TAIL_LINES: usize = 25;

/// How [`LaunchedVm::restart`] ends QEMU before starting it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// QMP `quit`: QEMU closes its images cleanly (persistent dirty bitmaps are written).
    Quit,
    /// SIGKILL, as in a crash of QEMU or of the host.
    Kill,
}

/// What happens to QEMU when the launching process goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Tests, demo, benchmarks: QEMU runs in its own process group, is killed when the handle
    /// is dropped and (through `PR_SET_PDEATHSIG`) when the launching thread or process dies,
    /// and its runtime directory is removed on drop. Launch from a thread that lives as long
    /// as the VM (a test thread, a runtime worker), never from `spawn_blocking`.
    Attached,
    /// `stillpoint vm run`: QEMU gets its own session and outlives the launcher; end it with
    /// [`stop_vm`].
    Detached,
}

/// Where and how to launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The runtime root; the VM lives in `<root>/vms/<name>/`.
    pub root: PathBuf,
    /// Attached or detached.
    pub lifetime: Lifetime,
    /// Recorded as `launched_by` in `vm.json`.
    pub launched_by: String,
}

impl LaunchOptions {
    /// A VM tied to this process (tests, demo, benchmarks).
    pub fn attached(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            lifetime: Lifetime::Attached,
            launched_by: "stillpoint-testvm".to_owned(),
        }
    }

    /// A VM that outlives this process.
    pub fn detached(root: impl Into<PathBuf>, launched_by: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            lifetime: Lifetime::Detached,
            launched_by: launched_by.into(),
        }
    }
}

/// A running QEMU VM and its runtime directory.
#[derive(Debug)]
pub struct LaunchedVm {
    config: VmConfig,
    dir: PathBuf,
    record: VmRecord,
    lifetime: Lifetime,
    child: Mutex<Option<Child>>,
    /// Dropped last: the temporary runtime root of [`LaunchedVm::boot_for_test`].
    temp_root: Option<TempDir>,
}

impl LaunchedVm {
    /// Boots `config` for a test: in a fresh temporary runtime root, attached, and waits until
    /// the guest is ready (the agent answers `guest-ping`, or, agent off, `/init` says so).
    /// A guest that does not get there is an error holding the console's last lines.
    pub async fn boot_for_test(config: VmConfig) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("stillpoint-vm-")
            .tempdir()
            .map_err(|e| {
                Error::io(
                    "create a temporary runtime root in",
                    &std::env::temp_dir(),
                    e,
                )
            })?;
        let mut vm = Self::launch(config, &LaunchOptions::attached(temp.path())).await?;
        vm.temp_root = Some(temp);
        vm.wait_until_ready(BOOT_TIMEOUT).await?;
        Ok(vm)
    }

    /// Prepares the guest (builds the cached image if needed, makes fresh disks) and starts
    /// QEMU. Returns once QEMU's monitor accepts connections; the guest is still booting.
    pub async fn launch(config: VmConfig, options: &LaunchOptions) -> Result<Self> {
        config.validate()?;
        let name = config.name.clone();
        Self::launch_validated(config, options)
            .await
            .map_err(|error| error.with_vm(&name))
    }

    async fn launch_validated(config: VmConfig, options: &LaunchOptions) -> Result<Self> {
        let accel = Accel::from_env()?;
        let qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")?;
        crate::paths::ensure_private_root(&options.root)?;
        let dir = absolute(&vm_dir(&options.root, &config.name))?;
        claim_vm_dir(&dir)?;

        // Building the image and the disks blocks; QEMU itself is spawned on this thread
        // because the death signal follows the thread that forks.
        let prepared = {
            let config = config.clone();
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || prepare(&config, &dir))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::GuestBuild, "preparing the VM panicked").with_source(e)
                })?
        };
        let files = match prepared {
            Ok(files) => files,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        let args = qemu_args(&config, &files, accel)?;
        tracing::info!(vm = %config.name, qemu = %qemu.display(), ?args, "starting QEMU");

        let log_path = dir.join("qemu.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("reopen", &log_path, e))?;
        let mut command = stillpoint_os::child::command(&qemu);
        command
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        configure_lifetime(&mut command, options.lifetime);
        let child = command.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            Error::new(
                ErrorKind::QemuStart,
                format!("cannot start `{}`", qemu.display()),
            )
            .with_source(e)
        })?;

        let record = VmRecord {
            name: config.name.clone(),
            pid: child.id(),
            qmp_socket: files.qmp_socket.clone(),
            qga_socket: files.qga_socket.clone(),
            console_log: files.console_log.clone(),
            disks: files
                .disks
                .iter()
                .zip(&config.data_disks)
                .enumerate()
                .map(|(index, (path, spec))| DiskRecord {
                    device_id: format!("vd{index}"),
                    node_name: format!("disk{index}"),
                    path: path.clone(),
                    format: spec.format.driver().to_owned(),
                    virtual_size: spec.size,
                })
                .collect(),
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            launched_by: options.launched_by.clone(),
        };
        let vm = Self {
            config,
            dir,
            record,
            lifetime: options.lifetime,
            child: Mutex::new(Some(child)),
            temp_root: None,
        };
        // From here on, dropping `vm` ends QEMU (attached) on every error path.
        if let Err(error) = vm.record.write(&vm.dir) {
            vm.kill();
            return Err(error);
        }
        vm.wait_for_monitor(MONITOR_TIMEOUT)
            .await
            .inspect_err(|_| {
                vm.kill();
            })?;
        Ok(vm)
    }

    async fn wait_for_monitor(&self, timeout: Duration) -> Result<()> {
        let socket = self.record.qmp_socket.clone();
        let ready = wait_until(timeout, || {
            let socket = socket.clone();
            async move {
                if self.exit_status().is_some() {
                    return true;
                }
                tokio::net::UnixStream::connect(&socket).await.is_ok()
            }
        })
        .await;
        if let Some(status) = self.exit_status() {
            return Err(Error::new(
                ErrorKind::QemuStart,
                format!("QEMU exited ({status}) at start: {}", self.qemu_log_tail()),
            ));
        }
        if !ready {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("QEMU's monitor socket did not accept connections within {timeout:?}"),
            ));
        }
        Ok(())
    }

    /// Waits until the guest is ready: the agent answers (agent on), or `/init` reports ready
    /// (agent off).
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<()> {
        if self.config.agent {
            self.wait_for_agent(timeout).await
        } else {
            self.wait_for_console(MARKER_READY, timeout).await
        }
    }

    /// Waits until the serial console shows `marker`. Fails early, with the console's tail,
    /// when QEMU exits or `/init` reports an error.
    pub async fn wait_for_console(&self, marker: &str, timeout: Duration) -> Result<()> {
        let mut outcome = None;
        wait_until(timeout, || {
            let console = self.console_text();
            outcome = if console.contains(marker) {
                Some(Ok(()))
            } else if let Some(status) = self.exit_status() {
                Some(Err(self.boot_error(
                    ErrorKind::QemuStart,
                    &format!("QEMU exited ({status}) before the guest printed `{marker}`"),
                )))
            } else if console.contains(MARKER_ERROR) {
                Some(Err(self.boot_error(
                    ErrorKind::QemuStart,
                    &format!("the guest reported an error before printing `{marker}`"),
                )))
            } else {
                None
            };
            std::future::ready(outcome.is_some())
        })
        .await;
        outcome.unwrap_or_else(|| {
            Err(self.boot_error(
                ErrorKind::Timeout,
                &format!("the guest did not print `{marker}` within {timeout:?}"),
            ))
        })
    }

    /// Waits until qemu-ga answers `guest-ping`.
    pub async fn wait_for_agent(&self, timeout: Duration) -> Result<()> {
        let Some(socket) = self.record.qga_socket.clone() else {
            return Err(
                Error::new(ErrorKind::InvalidConfig, "the VM has no guest agent")
                    .with_vm(&self.config.name),
            );
        };
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_for_console(MARKER_AGENT_STARTING, timeout)
            .await?;
        let mut last_error = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = left.min(Duration::from_secs(2));
            match probe::agent_command(&socket, "guest-ping", None, attempt).await {
                Ok(_) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
            if let Some(status) = self.exit_status() {
                return Err(self.boot_error(
                    ErrorKind::QemuStart,
                    &format!("QEMU exited ({status}) before the guest agent answered"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let why = last_error.map_or_else(String::new, |error| format!(" (last attempt: {error})"));
        Err(self.boot_error(
            ErrorKind::Timeout,
            &format!("the guest agent did not answer guest-ping within {timeout:?}{why}"),
        ))
    }

    fn boot_error(&self, kind: ErrorKind, what: &str) -> Error {
        let qemu_log = self.qemu_log_tail();
        let qemu_log = if qemu_log.is_empty() {
            String::new()
        } else {
            format!("\nQEMU said: {qemu_log}")
        };
        Error::new(
            kind,
            format!(
                "{what}; console {} (last lines):\n{}{qemu_log}",
                self.record.console_log.display(),
                self.console_tail(CONSOLE_TAIL_LINES)
            ),
        )
        .with_vm(&self.config.name)
    }

    /// Runs one guest agent command on a fresh connection; see [`probe::agent_command`].
    pub async fn agent_command(
        &self,
        execute: &str,
        arguments: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let socket = self.require_agent()?;
        probe::agent_command(socket, execute, arguments, timeout)
            .await
            .map_err(|error| error.with_vm(&self.config.name))
    }

    /// Runs `argv` in the guest through the agent; see [`probe::guest_exec`].
    pub async fn guest_exec(
        &self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<probe::GuestExecOutput> {
        let socket = self.require_agent()?;
        probe::guest_exec(socket, argv, timeout)
            .await
            .map_err(|error| error.with_vm(&self.config.name))
    }

    fn require_agent(&self) -> Result<&Path> {
        self.record.qga_socket.as_deref().ok_or_else(|| {
            Error::new(ErrorKind::InvalidConfig, "the VM has no guest agent")
                .with_vm(&self.config.name)
        })
    }

    /// The VM name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The configuration it was launched with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// What `vm.json` says.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// The runtime directory `<root>/vms/<name>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The runtime root it was launched under: `<root>` of `<root>/vms/<name>/`, what
    /// `STILLPOINT_RUNTIME_DIR` names for a `stillpoint` that should find it.
    pub fn runtime_root(&self) -> &Path {
        self.dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.dir)
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.record.qmp_socket
    }

    /// The guest agent socket, `None` when the agent is off.
    pub fn qga_socket(&self) -> Option<&Path> {
        self.record.qga_socket.as_deref()
    }

    /// The serial console log.
    pub fn console_log(&self) -> &Path {
        &self.record.console_log
    }

    /// The data disks (`vd0`/`disk0` first).
    pub fn disks(&self) -> &[DiskRecord] {
        &self.record.disks
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console_text(&self) -> String {
        std::fs::read(&self.record.console_log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        last_lines(&self.console_text(), lines)
    }

    fn qemu_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
        last_lines(text.trim(), 10)
    }

    /// QEMU's exit status, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self
            .child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether QEMU is still running.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Ends the VM cleanly: QMP `quit`, then a kill if QEMU has not exited after a few seconds.
    /// Its runtime directory is removed.
    pub async fn stop(self) -> Result<()> {
        if self.is_running() {
            let quit =
                probe::monitor_command(&self.record.qmp_socket, "quit", Duration::from_secs(5))
                    .await;
            if let Err(error) = quit {
                tracing::warn!(vm = %self.config.name, %error, "QMP quit failed; killing QEMU");
            }
            let exited = wait_until(Duration::from_secs(10), || {
                std::future::ready(!self.is_running())
            })
            .await;
            if !exited {
                tracing::warn!(vm = %self.config.name, "QEMU did not quit; killing it");
            }
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }

    /// Ends QEMU the way `how` says, then starts it again on the same disk files, initramfs
    /// and sockets, and waits until the guest is ready. For tests of what survives a QEMU
    /// restart (persistent dirty bitmaps survive a clean `quit`, not a crash). Attached VMs
    /// only. Close your own QMP connection first: the monitor takes one client at a time.
    pub async fn restart(&mut self, how: Restart) -> Result<()> {
        if self.lifetime != Lifetime::Attached {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "only VMs attached to this process can be restarted",
            )
            .with_vm(&self.config.name));
        }
        if how == Restart::Quit && self.is_running() {
            probe::monitor_command(&self.record.qmp_socket, "quit", Duration::from_secs(10))
                .await
                .map_err(|error| error.with_vm(&self.config.name))?;
            let exited = wait_until(Duration::from_secs(30), || {
                std::future::ready(!self.is_running())
            })
            .await;
            if !exited {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "QEMU did not exit within 30 s of `quit`",
                )
                .with_vm(&self.config.name));
            }
        }
        // Reaps a quit QEMU; kills a running one (Restart::Kill) like a crash would.
        self.kill();

        let accel = Accel::from_env()?;
        let qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let image = tokio::task::spawn_blocking(GuestImage::ensure)
            .await
            .map_err(|e| {
                Error::new(ErrorKind::GuestBuild, "finding the guest image panicked").with_source(e)
            })??;
        let files = VmFiles {
            kernel: image.kernel(),
            initrd: self.dir.join("initramfs.cpio.gz"),
            console_log: self.record.console_log.clone(),
            qmp_socket: self.record.qmp_socket.clone(),
            qga_socket: self.record.qga_socket.clone(),
            disks: self.record.disks.iter().map(|d| d.path.clone()).collect(),
        };
        let args = qemu_args(&self.config, &files, accel)?;
        let log_path = self.dir.join("qemu.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("reopen", &log_path, e))?;
        let mut command = stillpoint_os::child::command(&qemu);
        command
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        configure_lifetime(&mut command, self.lifetime);
        let child = command.spawn().map_err(|e| {
            Error::new(
                ErrorKind::QemuStart,
                format!("cannot start `{}` again", qemu.display()),
            )
            .with_source(e)
            .with_vm(&self.config.name)
        })?;
        self.record.pid = child.id();
        *self
            .child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(child);
        self.record.write(&self.dir)?;
        self.wait_for_monitor(MONITOR_TIMEOUT).await?;
        self.wait_until_ready(BOOT_TIMEOUT).await
    }

    /// Kills QEMU (SIGKILL to its process group) and reaps it.
    fn kill(&self) {
        let mut guard = self
            .child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                if self.lifetime == Lifetime::Attached {
                    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
                    let _ = killpg(group, Signal::SIGKILL);
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for LaunchedVm {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Attached {
            self.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sets up QEMU's process for its lifetime (runs in the child between fork and exec).
fn configure_lifetime(command: &mut Command, lifetime: Lifetime) {
    match lifetime {
        Lifetime::Attached => {
            command.process_group(0);
            stillpoint_os::child::die_with_parent(command);
        }
        Lifetime::Detached => {
            stillpoint_os::child::new_session(command);
        }
    }
}

/// Makes sure `dir` can be used for a new VM: a live QEMU there is an error, leftovers of a
/// dead one are removed.
fn claim_vm_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        if let Ok(record) = VmRecord::read(dir)
            && qemu_is_alive(record.pid, &record.qmp_socket)
        {
            return Err(Error::new(
                ErrorKind::AlreadyRunning,
                format!(
                    "already running as pid {} (runtime directory `{}`)",
                    record.pid,
                    dir.display()
                ),
            ));
        }
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::io("remove the stale runtime directory", dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create the runtime directory", dir, e))
}

/// Builds what QEMU needs: the VM's initramfs (the cached one plus its settings) and disks.
fn prepare(config: &VmConfig, dir: &Path) -> Result<VmFiles> {
    let image = GuestImage::ensure()?;
    let initrd = dir.join("initramfs.cpio.gz");
    std::fs::copy(image.initramfs(), &initrd)
        .map_err(|e| Error::io("copy the guest initramfs to", &initrd, e))?;
    let settings = dir.join("settings.cpio.gz");
    vm_settings_archive(config).write_gzip_file(&settings)?;
    append_file(&initrd, &settings)?;
    let _ = std::fs::remove_file(&settings);
    let disks = config
        .data_disks
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let prefill = crate::disk::Prefill::of(*spec, config.prefill_percent, &config.name);
            crate::disk::create_data_disk(dir, index, *spec, prefill)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VmFiles {
        kernel: image.kernel(),
        initrd,
        console_log: dir.join("console.log"),
        qmp_socket: dir.join("qmp.sock"),
        qga_socket: config.agent.then(|| dir.join("qga.sock")),
        disks,
    })
}

/// The per-VM settings `/init` reads from `/etc/stillpoint/`.
pub(crate) fn vm_settings_archive(config: &VmConfig) -> Archive {
    let mut archive = Archive::new();
    archive.file(
        "etc/stillpoint/hostname",
        format!("{}\n", config.name),
        0o644,
    );
    archive.file(
        "etc/stillpoint/disks",
        format!("{}\n", config.data_disks.len()),
        0o644,
    );
    let agent = if config.agent { "on\n" } else { "off\n" };
    archive.file("etc/stillpoint/agent", agent, 0o644);
    if !config.qga_args.is_empty() {
        let mut args = config.qga_args.join("\n");
        args.push('\n');
        archive.file("etc/stillpoint/qga-args", args, 0o644);
    }
    if let Some(hook) = &config.fsfreeze_hook {
        archive.file("etc/stillpoint/fsfreeze-hook", hook.as_bytes(), 0o755);
    }
    archive
}

fn append_file(target: &Path, extra: &Path) -> Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .open(target)
        .map_err(|e| Error::io("open for appending", target, e))?;
    let mut input = std::fs::File::open(extra).map_err(|e| Error::io("open", extra, e))?;
    std::io::copy(&mut input, &mut out).map_err(|e| Error::io("append to", target, e))?;
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io("make absolute", path, e))
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `pid` is a live (not zombie) QEMU that serves `qmp_socket` — guards against pid
/// reuse when a record outlived its VM.
pub(crate) fn qemu_is_alive(pid: u32, qmp_socket: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name in parentheses, which may itself hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = qmp_socket.to_string_lossy();
    cmdline
        .split(|byte| *byte == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(needle.as_ref()))
}

/// One VM found under a runtime root.
#[derive(Debug, Clone)]
pub struct ListedVm {
    /// The directory name (the VM name).
    pub name: String,
    /// Its runtime directory.
    pub dir: PathBuf,
    /// Its `vm.json`, when readable.
    pub record: Option<VmRecord>,
    /// Whether its QEMU is alive.
    pub running: bool,
    /// Why the record could not be read, if it could not.
    pub problem: Option<String>,
}

/// The VMs under `<root>/vms/`, by name; stale ones (QEMU gone) included.
pub fn list_vms(root: &Path) -> Result<Vec<ListedVm>> {
    let vms = root.join("vms");
    let entries = match std::fs::read_dir(&vms) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(Error::io("list", &vms, error)),
    };
    let mut listed = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let (record, problem) = match VmRecord::read(&dir) {
            Ok(record) => (Some(record), None),
            Err(error) => (None, Some(stillpoint_os::error_chain(&error))),
        };
        let running = record
            .as_ref()
            .is_some_and(|record| qemu_is_alive(record.pid, &record.qmp_socket));
        listed.push(ListedVm {
            name,
            dir,
            record,
            running,
            problem,
        });
    }
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listed)
}

/// How [`stop_vm`] ended a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// QEMU quit when asked over QMP.
    Quit,
    /// QEMU needed SIGTERM.
    Terminated,
    /// QEMU needed SIGKILL.
    Killed,
    /// QEMU was not running; only the runtime directory was removed.
    WasNotRunning,
}

/// Stops the VM `name` under `root` (QMP `quit`, then SIGTERM, then SIGKILL, each given a few
/// seconds) and removes its runtime directory.
pub async fn stop_vm(root: &Path, name: &str) -> Result<StopOutcome> {
    crate::paths::validate_vm_name(name)?;
    let dir = vm_dir(root, name);
    if !dir.is_dir() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no VM `{name}` under `{}`", root.display()),
        ));
    }
    let outcome = match VmRecord::read(&dir) {
        Ok(record) => stop_process(&record).await,
        Err(error) => {
            tracing::warn!(vm = name, error = %stillpoint_os::error_chain(&error), "no usable vm.json; removing the directory");
            StopOutcome::WasNotRunning
        }
    };
    std::fs::remove_dir_all(&dir)
        .map_err(|e| Error::io("remove the runtime directory", &dir, e).with_vm(name))?;
    Ok(outcome)
}

async fn stop_process(record: &VmRecord) -> StopOutcome {
    let alive = || qemu_is_alive(record.pid, &record.qmp_socket);
    if !alive() {
        return StopOutcome::WasNotRunning;
    }
    let gone = |timeout| wait_until(timeout, move || std::future::ready(!alive()));
    if let Err(error) =
        probe::monitor_command(&record.qmp_socket, "quit", Duration::from_secs(5)).await
    {
        tracing::warn!(vm = %record.name, %error, "QMP quit failed");
    } else if gone(Duration::from_secs(10)).await {
        return StopOutcome::Quit;
    }
    let pid = Pid::from_raw(i32::try_from(record.pid).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    if gone(Duration::from_secs(5)).await {
        return StopOutcome::Terminated;
    }
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    gone(Duration::from_secs(5)).await;
    StopOutcome::Killed
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn entries(archive: &Archive) -> Vec<(String, u32, String)> {
        let bytes = archive.write_newc(Vec::new()).expect("write");
        let mut rest: &[u8] = &bytes;
        let mut found = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(rest).expect("entry");
            if reader.entry().is_trailer() {
                return found;
            }
            let (name, mode) = (reader.entry().name().to_owned(), reader.entry().mode());
            let mut text = String::new();
            reader.read_to_string(&mut text).expect("content");
            found.push((name, mode, text));
            rest = reader.finish().expect("finish");
        }
    }

    #[test]
    fn settings_carry_agent_args_hook_and_disk_count() {
        let config = VmConfig::new("db1")
            .with_disks(2, 64 << 20)
            .with_qga_arg("--block-rpcs")
            .with_qga_arg("guest-fsfreeze-freeze")
            .with_fsfreeze_hook("#!/bin/sh\necho \"$1\" >> /run/hook.log\n");
        let found = entries(&vm_settings_archive(&config));
        let get = |name: &str| found.iter().find(|e| e.0 == name).cloned().expect(name);
        assert_eq!(get("etc/stillpoint/hostname").2, "db1\n");
        assert_eq!(get("etc/stillpoint/disks").2, "2\n");
        assert_eq!(get("etc/stillpoint/agent").2, "on\n");
        assert_eq!(
            get("etc/stillpoint/qga-args").2,
            "--block-rpcs\nguest-fsfreeze-freeze\n"
        );
        let hook = get("etc/stillpoint/fsfreeze-hook");
        assert_eq!(hook.1, 0o100755, "the hook must be executable");
        assert!(hook.2.starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn agent_off_settings_have_no_agent_files() {
        let found = entries(&vm_settings_archive(
            &VmConfig::new("quiet").without_agent(),
        ));
        let names: Vec<&str> = found.iter().map(|e| e.0.as_str()).collect();
        assert!(names.contains(&"etc/stillpoint/agent"));
        assert!(!names.contains(&"etc/stillpoint/qga-args"));
        assert!(!names.contains(&"etc/stillpoint/fsfreeze-hook"));
        assert_eq!(
            found
                .iter()
                .find(|e| e.0 == "etc/stillpoint/agent")
                .map(|e| e.2.as_str()),
            Some("off\n")
        );
    }

    #[test]
    fn init_script_reads_every_setting_the_launcher_writes() {
        let config = VmConfig::new("x")
            .with_qga_arg("-v")
            .with_fsfreeze_hook("#!/bin/sh\n");
        for (name, _, _) in entries(&vm_settings_archive(&config)) {
            let file = name.trim_start_matches("etc/stillpoint/");
            if name == "etc" || name == "etc/stillpoint" {
                continue;
            }
            assert!(
                crate::guest::INIT_SCRIPT.contains(&format!("$conf/{file}")),
                "/init never reads {name}"
            );
        }
        for marker in [
            MARKER_DISKS_MOUNTED,
            MARKER_READY,
            MARKER_AGENT_STARTING,
            MARKER_AGENT_DISABLED,
            MARKER_ERROR,
        ] {
            let text = marker.trim_start_matches(MARKER_PREFIX);
            assert!(
                crate::guest::INIT_SCRIPT.contains(&format!("say \"{text}")),
                "/init never prints {marker}"
            );
        }
    }

    #[test]
    fn last_lines_of_text() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn liveness_checks_the_command_line_not_just_the_pid() {
        let me = std::process::id();
        assert!(!qemu_is_alive(me, Path::new("/nonexistent/qmp.sock")));
        let exe = std::env::current_exe().expect("exe");
        assert!(qemu_is_alive(me, &exe), "our own pid with our own argv[0]");
        assert!(!qemu_is_alive(u32::MAX, &exe));
    }

    #[tokio::test]
    async fn stopping_an_unknown_vm_names_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let error = stop_vm(root.path(), "ghost").await.expect_err("not found");
        assert_eq!(error.kind(), ErrorKind::NotFound);
        assert!(error.to_string().contains("ghost"), "{error}");
    }

    #[tokio::test]
    async fn listing_reports_stale_and_broken_records() {
        let root = tempfile::tempdir().expect("tempdir");
        let stale = vm_dir(root.path(), "stale");
        std::fs::create_dir_all(&stale).expect("mkdir");
        let record = VmRecord {
            name: "stale".into(),
            pid: u32::MAX,
            qmp_socket: stale.join("qmp.sock"),
            qga_socket: None,
            console_log: stale.join("console.log"),
            disks: vec![],
            started_at: "2026-11-26T12:00:00Z".into(),
            launched_by: "test".into(),
        };
        record.write(&stale).expect("write");
        let broken = vm_dir(root.path(), "broken");
        std::fs::create_dir_all(&broken).expect("mkdir");
        std::fs::write(broken.join("vm.json"), "{").expect("write");
        let listed = list_vms(root.path()).expect("list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].name, "broken");
        assert!(listed[0].record.is_none());
        assert!(
            listed[0]
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("malformed")),
            "{:?}",
            listed[0].problem
        );
        assert_eq!(listed[1].name, "stale");
        assert!(!listed[1].running);
        assert_eq!(listed[1].record.as_ref().map(|r| r.pid), Some(u32::MAX));
        assert_eq!(
            stop_vm(root.path(), "stale").await.expect("stop"),
            StopOutcome::WasNotRunning
        );
        assert!(!stale.exists());
    }
}
