//! Unit tests of the backup flow (`backup_vm_on`) over FAKES OF THE PLATFORM: a `Vm`, a
//! `GuestAgent`, a `Capture` and its captured disks, written here for these tests only. They
//! stand in for QEMU and qemu-ga to produce, on demand and without a VM, the faults the flow
//! must decide on (a freeze that fails or times out, a freeze that covers only some disks, a
//! capture that does not start, a read that fails) and to record the order of events no real
//! peer reports (was the guest frozen when a byte was read?). The repository is the real one,
//! in a temporary directory; the guardian is a stand-in that only says it watches (there is no
//! guest for it to thaw). The real flow on real VMs is in `vm_recipe.rs` and the CLI's tests.
//!
//! The tests run on tokio's current-thread runtime (`#[tokio::test]`), the flavour that
//! `block_in_place` panics on; one runs on the multi-thread runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_engine::EngineErrorKind;
use stillpoint_engine::backup::{BackupEnv, BackupJob, BackupOutcome, NoProgress, backup_vm_on};
use stillpoint_engine::consistency::{Indication, Level, OnQuiesceFailure};
use stillpoint_engine::freeze::{GuardContext, GuardedFreeze};
use stillpoint_engine::guardian::{GUARDIAN_READY, GuardianCommand};
use stillpoint_platform::capture::{
    ByteRange, Capture, CaptureInventory, CaptureMode, CapturePlan, CaptureRequest, CapturedDisk,
    DeadCaptureRelease, DiskInfo, FinishReport, FullReason, PlannedDisk, PreparedCapture,
    StartReport, StartedCapture,
};
use stillpoint_platform::{
    DiskIdentity, GuestAgent, PlatformError, PlatformErrorKind, PlatformKind, Platforms, RunState,
    Vm, VmDefinition, VmRef, VmStatus,
};
use stillpoint_qga::{AgentInfo, ExecRequest, ExecStatus, FreezeStatus, FsInfo, OsInfo};
use stillpoint_repo::{InitOptions, Repository};

const DISK: &str = "vd0";
const OTHER_DISK: &str = "vd1";
const DISK_SIZE: u64 = 2 << 20;

/// How a fake freeze fails.
#[derive(Clone, Copy, PartialEq)]
enum FreezeFault {
    None,
    Refused,
    TimesOut,
    /// The call never returns (a freeze hook that hangs, with no timeout of the agent's own).
    Hangs,
}

/// What the fakes are told to do, and what they saw. Shared by the fake VM, agent, capture
/// and disks of one test.
struct World {
    freeze_fault: FreezeFault,
    /// The guest's only filesystem sits on this disk (another one: the freeze covers nothing
    /// that is captured).
    filesystem_on: &'static str,
    start_fails: bool,
    read_fails: Option<PlatformErrorKind>,
    frozen: AtomicBool,
    /// In order: `freeze`, `thaw`, `capture start`, `read` (the first only), `finish ok`,
    /// `finish failed`, `abort`.
    events: Mutex<Vec<String>>,
    bytes_read: AtomicU64,
    /// The invariant-2 counter: bytes the copy read while the guest was frozen.
    bytes_read_while_frozen: AtomicU64,
    captures: AtomicU64,
}

impl World {
    fn new() -> Self {
        World {
            freeze_fault: FreezeFault::None,
            filesystem_on: DISK,
            start_fails: false,
            read_fails: None,
            frozen: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
            bytes_read_while_frozen: AtomicU64::new(0),
            captures: AtomicU64::new(0),
        }
    }

    fn event(&self, what: &str) {
        self.events.lock().unwrap().push(what.to_string());
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    fn position(&self, what: &str) -> Option<usize> {
        self.events().iter().position(|e| e == what)
    }
}

/// Fake of the platform's `Vm` for unit tests: a running VM with one disk and an agent.
struct FakeVm {
    reference: VmRef,
    world: Arc<World>,
}

#[async_trait]
impl Vm for FakeVm {
    fn reference(&self) -> &VmRef {
        &self.reference
    }
    async fn status(&self) -> stillpoint_platform::Result<VmStatus> {
        Ok(VmStatus {
            state: RunState::Running,
            detail: "running".into(),
        })
    }
    fn agent(&self) -> Option<Arc<dyn GuestAgent>> {
        Some(Arc::new(FakeAgent {
            world: self.world.clone(),
        }))
    }
    async fn disk_identities(&self) -> stillpoint_platform::Result<Vec<DiskIdentity>> {
        Ok([DISK, OTHER_DISK]
            .iter()
            .map(|id| DiskIdentity {
                id: id.to_string(),
                serial: Some(id.to_string()),
                pci: None,
            })
            .collect())
    }
    fn capture(&self) -> Option<Arc<dyn Capture>> {
        Some(Arc::new(FakeCapture {
            world: self.world.clone(),
        }))
    }
    /// Nothing of a fake capture outlives the test: no capture guardian is started.
    fn dead_capture_release(&self) -> Option<Arc<dyn DeadCaptureRelease>> {
        None
    }
    async fn definition(&self) -> stillpoint_platform::Result<Option<VmDefinition>> {
        Ok(None)
    }
    async fn resume_if_paused(&self) -> stillpoint_platform::Result<bool> {
        Ok(false)
    }
}

/// Fake of the platform's `GuestAgent` for unit tests: freezes and thaws a flag.
struct FakeAgent {
    world: Arc<World>,
}

fn agent_error(kind: stillpoint_qga::ErrorKind) -> stillpoint_qga::Error {
    stillpoint_qga::Error::new(kind)
}

#[async_trait]
impl GuestAgent for FakeAgent {
    async fn ping(&self) -> stillpoint_qga::Result<()> {
        Ok(())
    }
    async fn info(&self) -> stillpoint_qga::Result<AgentInfo> {
        let frozen = self.world.frozen.load(Ordering::SeqCst);
        let commands: Vec<_> = [
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-freeze-list",
            "guest-fsfreeze-thaw",
            "guest-exec",
            "guest-exec-status",
        ]
        .iter()
        .map(|name| {
            serde_json::json!({
                "name": name,
                // As qemu-ga: a frozen guest's agent disables all but the thaw.
                "enabled": !frozen || *name == "guest-fsfreeze-thaw",
                "success-response": true,
            })
        })
        .collect();
        Ok(serde_json::from_value(serde_json::json!({
            "version": "7.2.0-fake",
            "supported_commands": commands,
        }))
        .expect("agent info"))
    }
    async fn os_info(&self) -> stillpoint_qga::Result<OsInfo> {
        Ok(serde_json::from_value(serde_json::json!({"id": "debian"})).expect("os info"))
    }
    async fn fs_info(&self) -> stillpoint_qga::Result<Vec<FsInfo>> {
        Ok(serde_json::from_value(serde_json::json!([{
            "name": "vda",
            "mountpoint": "/data",
            "type": "ext4",
            "disk": [{
                "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0,
                "serial": self.world.filesystem_on, "dev": "/dev/vda",
            }],
        }]))
        .expect("fs info"))
    }
    async fn freeze_status(&self) -> stillpoint_qga::Result<FreezeStatus> {
        Ok(if self.world.frozen.load(Ordering::SeqCst) {
            FreezeStatus::Frozen
        } else {
            FreezeStatus::Thawed
        })
    }
    async fn freeze(&self, timeout: Duration) -> stillpoint_qga::Result<u32> {
        match self.world.freeze_fault {
            FreezeFault::None => {
                self.world.frozen.store(true, Ordering::SeqCst);
                self.world.event("freeze");
                Ok(1)
            }
            FreezeFault::Refused => Err(agent_error(stillpoint_qga::ErrorKind::Agent {
                class: "GenericError".into(),
                desc: "failed to freeze /data: Operation not supported".into(),
            })),
            FreezeFault::TimesOut => Err(agent_error(stillpoint_qga::ErrorKind::Timeout {
                after: timeout,
            })),
            FreezeFault::Hangs => std::future::pending().await,
        }
    }
    async fn thaw(&self) -> stillpoint_qga::Result<u32> {
        let was = self.world.frozen.swap(false, Ordering::SeqCst);
        if was {
            self.world.event("thaw");
        }
        Ok(u32::from(was))
    }
    async fn exec_start(&self, _request: &ExecRequest) -> stillpoint_qga::Result<i64> {
        Ok(1)
    }
    async fn exec_status(&self, _pid: i64) -> stillpoint_qga::Result<ExecStatus> {
        Ok(exited())
    }
    async fn run(
        &self,
        _request: &ExecRequest,
        _limit: Duration,
    ) -> stillpoint_qga::Result<ExecStatus> {
        // `sync` before the freeze, `cat /proc/mounts` at the preflight (nothing uncovered).
        Ok(exited())
    }
    async fn release(&self) {}
}

fn exited() -> ExecStatus {
    ExecStatus {
        exited: true,
        exit_code: Some(0),
        signal: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
    }
}

/// Fake of the platform's `Capture` for unit tests: a full capture, or an incremental one of
/// the disk whose parent bitmap the request names.
struct FakeCapture {
    world: Arc<World>,
}

fn disk_info(id: &str) -> DiskInfo {
    DiskInfo {
        id: id.to_string(),
        node: format!("node-{id}"),
        device: format!("/machine/{id}"),
        virtual_size: DISK_SIZE,
        image: format!("/images/{id}.qcow2"),
        format: "qcow2".into(),
        format_version: Some("1.1".into()),
        persistent_bitmaps: true,
        bitmaps: Vec::new(),
    }
}

#[async_trait]
impl Capture for FakeCapture {
    async fn inspect(&self) -> stillpoint_platform::Result<CaptureInventory> {
        Ok(CaptureInventory {
            vm: "fake".into(),
            disks: vec![disk_info(DISK)],
            leftovers: Vec::new(),
        })
    }
    async fn prepare(
        &self,
        request: CaptureRequest,
    ) -> stillpoint_platform::Result<Box<dyn PreparedCapture>> {
        let n = self.world.captures.fetch_add(1, Ordering::SeqCst);
        let capture_id = format!("{:013}-{n:08x}", 1_700_000_000_000u64 + n);
        let mode = match request.parents.get(DISK) {
            Some(parent) => CaptureMode::Incremental {
                parent_bitmap: parent.bitmap.clone(),
            },
            None => CaptureMode::Full {
                reason: FullReason::NoParent,
            },
        };
        let plan = CapturePlan {
            vm: "fake".into(),
            capture_id: capture_id.clone(),
            disks: vec![PlannedDisk {
                disk: disk_info(DISK),
                mode,
                new_bitmap: format!("stillpoint-{capture_id}"),
                removed_bitmaps: Vec::new(),
                scratch: request.scratch_dir.join("scratch.qcow2"),
            }],
            recovered: Vec::new(),
        };
        Ok(Box::new(FakePrepared {
            plan,
            world: self.world.clone(),
        }))
    }
}

struct FakePrepared {
    plan: CapturePlan,
    world: Arc<World>,
}

#[async_trait]
impl PreparedCapture for FakePrepared {
    fn plan(&self) -> &CapturePlan {
        &self.plan
    }
    async fn start(self: Box<Self>) -> stillpoint_platform::Result<Box<dyn StartedCapture>> {
        self.world.event("capture start");
        if self.world.start_fails {
            self.world.event("abort");
            return Err(PlatformError::new(
                PlatformErrorKind::Capture,
                "VM `fake`: the transaction was refused (fake)",
            ));
        }
        Ok(Box::new(FakeStarted {
            plan: self.plan,
            report: StartReport {
                was_running: true,
                run_state: "running".into(),
                paused: Duration::from_millis(1),
                total: Duration::from_millis(2),
            },
            world: self.world,
        }))
    }
    async fn abort(self: Box<Self>) -> stillpoint_platform::Result<()> {
        self.world.event("abort");
        Ok(())
    }
}

struct FakeStarted {
    plan: CapturePlan,
    report: StartReport,
    world: Arc<World>,
}

#[async_trait]
impl StartedCapture for FakeStarted {
    fn plan(&self) -> &CapturePlan {
        &self.plan
    }
    fn start_report(&self) -> &StartReport {
        &self.report
    }
    async fn export(&mut self) -> stillpoint_platform::Result<Vec<Arc<dyn CapturedDisk>>> {
        let planned = &self.plan.disks[0];
        Ok(vec![Arc::new(FakeDisk {
            mode: planned.mode.clone(),
            world: self.world.clone(),
        })])
    }
    async fn finish(self: Box<Self>, success: bool) -> stillpoint_platform::Result<FinishReport> {
        self.world.event(if success {
            "finish ok"
        } else {
            "finish failed"
        });
        Ok(FinishReport {
            success,
            bitmaps: BTreeMap::from([(
                DISK.to_string(),
                Some(self.plan.disks[0].new_bitmap.clone()),
            )]),
            warnings: Vec::new(),
        })
    }
}

/// A captured disk whose bytes are a pattern of their offset. Each read records whether the
/// guest was frozen at that moment.
struct FakeDisk {
    mode: CaptureMode,
    world: Arc<World>,
}

#[async_trait]
impl CapturedDisk for FakeDisk {
    fn id(&self) -> &str {
        DISK
    }
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    fn mode(&self) -> &CaptureMode {
        &self.mode
    }
    async fn allocation(&self) -> stillpoint_platform::Result<Vec<ByteRange>> {
        Ok(vec![ByteRange {
            offset: 0,
            len: DISK_SIZE,
        }])
    }
    async fn changes(&self) -> stillpoint_platform::Result<Option<Vec<ByteRange>>> {
        Ok(self.mode.is_incremental().then(|| {
            vec![ByteRange {
                offset: 0,
                len: 64 << 10,
            }]
        }))
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_platform::Result<()> {
        if self.world.position("read").is_none() {
            self.world.event("read");
        }
        if self.world.frozen.load(Ordering::SeqCst) {
            self.world
                .bytes_read_while_frozen
                .fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
        if let Some(kind) = self.world.read_fails {
            return Err(PlatformError::new(
                kind,
                format!("VM `fake`, disk {DISK}, offset {offset}: the read failed (fake)"),
            ));
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = ((offset + i as u64) % 251) as u8;
        }
        self.world
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// A real repository, the fakes, and a stand-in guardian.
struct Bench {
    dir: tempfile::TempDir,
    repo: Repository,
    world: Arc<World>,
}

impl Bench {
    fn new(world: World) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_local(
            dir.path().join("repo"),
            &InitOptions {
                chunk_size: 1 << 20,
                ..InitOptions::default()
            },
        )
        .unwrap();
        Bench {
            dir,
            repo,
            world: Arc::new(world),
        }
    }

    fn env(&self) -> BackupEnv {
        let runtime = self.dir.path().join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        BackupEnv {
            platforms: Platforms::new(stillpoint_platform::qemu::QemuInventory::new(
                Vec::new(),
                runtime.clone(),
            )),
            repo: self.repo.clone(),
            guard: GuardContext {
                runtime_root: runtime,
                config: None,
                // Stand-in guardian: says it watches and exits (there is no guest to thaw).
                guardian: GuardianCommand {
                    program: PathBuf::from("/bin/sh"),
                    args: vec![
                        "-c".into(),
                        format!("echo '{GUARDIAN_READY}'"),
                        "stand-in-guardian".into(),
                    ],
                },
            },
            scratch_root: self.dir.path().join("scratch"),
            freeze_timeout: Duration::from_secs(5),
            hold_limit: Duration::from_secs(30),
            progress: Arc::new(NoProgress),
        }
    }

    async fn backup(&self, requested: Level, policy: OnQuiesceFailure) -> BackupOutcome {
        self.backup_job(BackupJob {
            vm: "fake".into(),
            requested,
            policy,
            recipe: None,
            force_full: false,
        })
        .await
    }

    async fn backup_job(&self, job: BackupJob) -> BackupOutcome {
        let vm = Arc::new(FakeVm {
            reference: VmRef {
                platform: PlatformKind::Qemu,
                name: "fake".into(),
            },
            world: self.world.clone(),
        });
        backup_vm_on(&self.env(), job, vm).await
    }

    fn snapshots(&self) -> usize {
        self.repo.snapshots(Some("fake")).unwrap().len()
    }

    fn leases(&self) -> Vec<PathBuf> {
        leases_in(&self.dir.path().join("run"))
    }
}

/// Lease files left under the runtime root (any depth).
fn leases_in(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "lease")
                || path.to_string_lossy().ends_with(".json")
            {
                found.push(path);
            }
        }
    }
    found
}

fn step<'a>(outcome: &'a BackupOutcome, name: &str) -> Option<&'a str> {
    outcome
        .report
        .steps
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.outcome.as_str())
}

#[tokio::test]
async fn a_filesystem_backup_freezes_only_around_the_capture_start_and_copies_after_the_thaw() {
    let bench = Bench::new(World::new());
    let outcome = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Fail)
        .await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(outcome.achieved_requested(), "{:#?}", outcome.report);
    assert_eq!(outcome.report.achieved, Level::Filesystem);
    assert_eq!(outcome.report.indications, vec![Indication::GuestAgent]);
    assert_eq!(bench.snapshots(), 1);
    assert_eq!(step(&outcome, "freeze"), Some("ok"));
    assert_eq!(step(&outcome, "thaw"), Some("ok"));
    assert_eq!(step(&outcome, "publish"), Some("ok"));

    // Invariant 2, as an ordering and a byte counter: frozen → start → thawed, and only then
    // the first read; not one byte read while frozen.
    let world = &bench.world;
    let (freeze, start, thaw, read, finish) = (
        world.position("freeze").expect("frozen"),
        world.position("capture start").expect("started"),
        world.position("thaw").expect("thawed"),
        world.position("read").expect("read"),
        world.position("finish ok").expect("finished as a success"),
    );
    assert!(
        freeze < start && start < thaw && thaw < read && read < finish,
        "{:?}",
        world.events()
    );
    assert_eq!(
        world.bytes_read_while_frozen.load(Ordering::SeqCst),
        0,
        "data was copied while the guest was frozen"
    );
    assert_eq!(world.bytes_read.load(Ordering::SeqCst), DISK_SIZE);
    assert!(!world.frozen.load(Ordering::SeqCst));
    assert!(bench.leases().is_empty(), "{:?}", bench.leases());
}

/// The counter of the test above is not one that cannot fail: a copy inside the freeze
/// window (simulated here by reading while the fake guest is frozen) moves it.
#[tokio::test]
async fn the_frozen_read_counter_sees_a_read_inside_the_window() {
    let world = Arc::new(World::new());
    world.frozen.store(true, Ordering::SeqCst);
    let disk = FakeDisk {
        mode: CaptureMode::Full {
            reason: FullReason::NoParent,
        },
        world: world.clone(),
    };
    let mut buf = vec![0u8; 4096];
    disk.read_at(0, &mut buf).await.unwrap();
    assert_eq!(world.bytes_read_while_frozen.load(Ordering::SeqCst), 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_runs_on_a_multi_thread_runtime_too() {
    let bench = Bench::new(World::new());
    let outcome = bench.backup(Level::Crash, OnQuiesceFailure::Fail).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(outcome.report.achieved, Level::Crash);
    assert_eq!(
        bench.world.position("freeze"),
        None,
        "crash does not freeze"
    );
    assert_eq!(bench.snapshots(), 1);
    assert!(bench.leases().is_empty(), "{:?}", bench.leases());
}

#[tokio::test]
async fn a_refused_freeze_degrades_to_crash_or_refuses_under_fail() {
    let mut world = World::new();
    world.freeze_fault = FreezeFault::Refused;
    let bench = Bench::new(world);

    let refused = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Fail)
        .await;
    let error = refused.error.as_ref().expect("refused");
    assert_eq!(error.kind(), EngineErrorKind::ConsistencyRefused);
    assert!(error.to_string().contains("the freeze failed"), "{error}");
    assert!(refused.manifest.is_none());
    assert_eq!(bench.snapshots(), 0);
    assert_eq!(
        bench.world.events(),
        vec!["abort"],
        "released, never started"
    );

    let degraded = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
        .await;
    assert!(degraded.error.is_none(), "{:?}", degraded.error);
    assert_eq!(degraded.report.achieved, Level::Crash);
    assert!(
        degraded
            .report
            .indications
            .contains(&Indication::QuiesceFailed),
        "{:?}",
        degraded.report.indications
    );
    assert!(!degraded.achieved_requested());
    assert_eq!(bench.snapshots(), 1);
    assert!(!bench.world.frozen.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_freeze_that_times_out_is_a_quiesce_timeout_by_its_typed_cause() {
    let mut world = World::new();
    world.freeze_fault = FreezeFault::TimesOut;
    let bench = Bench::new(world);
    let degraded = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
        .await;
    assert!(degraded.error.is_none(), "{:?}", degraded.error);
    assert_eq!(degraded.report.achieved, Level::Crash);
    assert!(
        degraded
            .report
            .indications
            .contains(&Indication::QuiesceTimeout),
        "{:?}",
        degraded.report.indications
    );
}

#[tokio::test]
async fn a_freeze_that_covers_no_captured_disk_degrades_or_refuses_before_freezing() {
    let mut world = World::new();
    world.filesystem_on = OTHER_DISK;
    let bench = Bench::new(world);

    let refused = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Fail)
        .await;
    let error = refused.error.as_ref().expect("refused");
    assert_eq!(error.kind(), EngineErrorKind::ConsistencyRefused);
    assert!(error.to_string().contains(DISK), "{error}");
    assert_eq!(bench.snapshots(), 0);
    assert_eq!(bench.world.events(), vec!["abort"]);

    let degraded = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
        .await;
    assert!(degraded.error.is_none(), "{:?}", degraded.error);
    assert_eq!(degraded.report.achieved, Level::Crash);
    assert_eq!(
        degraded
            .report
            .coverage
            .as_ref()
            .map(|c| c.uncovered.clone()),
        Some(vec![DISK.to_string()])
    );
    assert_eq!(
        bench.world.position("freeze"),
        None,
        "a freeze that covers nothing is not made"
    );
    assert_eq!(bench.snapshots(), 1);
}

#[tokio::test]
async fn a_capture_that_does_not_start_fails_under_either_policy_and_thaws() {
    for policy in [OnQuiesceFailure::Degrade, OnQuiesceFailure::Fail] {
        let mut world = World::new();
        world.start_fails = true;
        let bench = Bench::new(world);
        let failed = bench.backup(Level::Filesystem, policy).await;
        let error = failed.error.as_ref().expect("failed");
        assert_eq!(error.kind(), EngineErrorKind::Platform, "{error}");
        assert!(failed.manifest.is_none());
        assert_eq!(bench.snapshots(), 0);
        assert_eq!(step(&failed, "capture start"), Some("failed"));
        assert_eq!(step(&failed, "thaw"), Some("ok"));
        assert!(!bench.world.frozen.load(Ordering::SeqCst));
        assert_eq!(bench.world.position("read"), None);
        assert!(bench.leases().is_empty(), "{:?}", bench.leases());
    }
}

#[tokio::test]
async fn a_copy_that_fails_publishes_nothing_and_finishes_the_capture_as_a_failure() {
    for (kind, expected) in [
        (PlatformErrorKind::Io, EngineErrorKind::Repository),
        (
            PlatformErrorKind::CaptureBroken,
            EngineErrorKind::CaptureBroken,
        ),
    ] {
        let mut world = World::new();
        world.read_fails = Some(kind);
        let bench = Bench::new(world);
        let failed = bench
            .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
            .await;
        let error = failed.error.as_ref().expect("failed");
        assert_eq!(error.kind(), expected, "{error}");
        assert!(failed.manifest.is_none());
        assert!(failed.report.snapshot.is_none());
        assert_eq!(bench.snapshots(), 0, "nothing is published");
        assert_eq!(step(&failed, "copy vd0"), Some("failed"));
        assert!(
            bench.world.position("finish failed").is_some(),
            "{:?}",
            bench.world.events()
        );
        assert_eq!(bench.world.position("finish ok"), None);
    }
}

#[tokio::test]
async fn a_full_read_asked_for_names_the_parent_it_did_not_use() {
    let bench = Bench::new(World::new());
    let first = bench.backup(Level::Crash, OnQuiesceFailure::Fail).await;
    let parent = first.manifest.as_ref().expect("published").id.clone();
    assert_eq!(
        first.report.disks[0].full_reason.as_deref(),
        Some("no parent snapshot")
    );

    let incremental = bench.backup(Level::Crash, OnQuiesceFailure::Fail).await;
    assert_eq!(incremental.report.disks[0].mode, "incremental");

    let full = bench
        .backup_job(BackupJob {
            vm: "fake".into(),
            requested: Level::Crash,
            policy: OnQuiesceFailure::Fail,
            recipe: None,
            force_full: true,
        })
        .await;
    assert!(full.error.is_none(), "{:?}", full.error);
    let latest = incremental.manifest.as_ref().unwrap().id.clone();
    assert_ne!(latest, parent);
    let reason = full.report.disks[0].full_reason.clone().unwrap_or_default();
    assert!(reason.contains("--full"), "{reason}");
    assert!(
        reason.contains(&latest),
        "names the unused parent: {reason}"
    );
}

#[tokio::test]
async fn a_guest_frozen_by_someone_else_is_reported_frozen_not_blocked() {
    let world = World::new();
    world.frozen.store(true, Ordering::SeqCst);
    let bench = Bench::new(world);
    let degraded = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
        .await;
    assert!(degraded.error.is_none(), "{:?}", degraded.error);
    assert_eq!(degraded.report.achieved, Level::Crash);
    let why = degraded.report.degraded_because.join("; ");
    assert!(
        why.contains("the guest is frozen already (not by stillpoint"),
        "{why}"
    );
    assert!(!why.contains("block-rpcs"), "{why}");
    assert_eq!(
        bench.world.position("thaw"),
        None,
        "someone else's freeze is left alone"
    );

    // Under a stillpoint freeze lease: by whom and for how long.
    let runtime = bench.dir.path().join("run");
    let lease_path = stillpoint_engine::guardian::lease_path(&runtime, "fake");
    std::fs::create_dir_all(lease_path.parent().unwrap()).unwrap();
    let now = stillpoint_engine::guardian::now_ms();
    stillpoint_engine::guardian::write_lease(
        &lease_path,
        &stillpoint_engine::guardian::Lease {
            vm: "fake".into(),
            config: None,
            runtime_root: runtime.clone(),
            token: "test".into(),
            holder_pid: 4242,
            watch_holder: false,
            frozen_at_ms: now - 30_000,
            deadline_ms: None,
            thaw_now: false,
            guardian_pid: None,
            thaw: true,
            resume_if_paused: false,
            release_capture: false,
        },
    )
    .unwrap();
    let degraded = bench
        .backup(Level::Filesystem, OnQuiesceFailure::Degrade)
        .await;
    let why = degraded.report.degraded_because.join("; ");
    assert!(
        why.contains("by a stillpoint freeze (pid 4242) 30 s ago")
            && why.contains("until `stillpoint unfreeze`"),
        "{why}"
    );
}

/// A caller that gives up on the freeze while the agent's call still runs (its timeout drops
/// the future) leaves the thaw to the guardian at once — not at the lease's deadline, when
/// the guardian would stop this process.
#[tokio::test]
async fn a_freeze_call_abandoned_while_it_runs_hands_the_thaw_to_the_guardian_at_once() {
    let mut world = World::new();
    world.freeze_fault = FreezeFault::Hangs;
    let bench = Bench::new(world);
    let env = bench.env();
    let vm = FakeVm {
        reference: VmRef {
            platform: PlatformKind::Qemu,
            name: "fake".into(),
        },
        world: bench.world.clone(),
    };
    let agent = vm.agent().expect("the fake has an agent");
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        GuardedFreeze::freeze(&vm, agent, &env.guard, env.freeze_timeout, env.hold_limit),
    )
    .await;
    assert!(abandoned.is_err(), "the fake's freeze call never returns");
    let lease = stillpoint_engine::guardian::read_lease(&stillpoint_engine::guardian::lease_path(
        &env.guard.runtime_root,
        "fake",
    ))
    .unwrap()
    .expect("the lease stays for the guardian");
    assert!(
        lease.thaw_now,
        "the guardian is told to thaw now: {lease:?}"
    );
}
