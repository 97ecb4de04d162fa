//! `bench capture`: what a writer inside the guest sees while a VM is backed up at
//! the filesystem level, against the naive sequence hook-based tools follow, plus the capture
//! path's copy throughput and the cost of an incremental backup.
//!
//! For every (disk count × disk size) it boots the test guest (TCG unless
//! `STILLPOINT_ACCEL=kvm`, one VM at a time) with that many data disks, each `--fill-percent`
//! full of incompressible data written on the host before boot (testvm's prefill: a real file
//! in the disk's ext4, so the copies have real bytes to move). The stall writer appends to
//! `/data` and reports every append's duration on the serial console. Then, alternately, for
//! `--rounds` rounds:
//! - **ours**: a real filesystem-level backup through the engine API in-process (its report
//!   gives the freeze window and the capture start), with `force_full` so that every round
//!   copies all allocated data — after the thaw — into an encrypted repository;
//! - **naive**: `guest-fsfreeze-freeze` → `qemu-img convert -U -O raw` of every disk image,
//!   one after the other, while frozen → `guest-fsfreeze-thaw`.
//!
//! A round's stall is the writer's longest append among those that completed after the round
//! began (the same measure as `bench freeze`). Invariant 2 says ours stays flat in disk size
//! and count; the naive one grows with the data copied while frozen.
//!
//! On the largest size (fewest disks), before the writer starts, the copy phase compares
//! a full backup of the VM through the capture path (disk `vd0`'s bytes read / copy time from
//! the report) with `stillpoint backup-image` of the same disk converted to a raw file (same
//! repository settings, a fresh repository each), then changes 1 % of the disk in the guest
//! and compares the incremental backup's time with the full one's.
//!
//! Timings are printed, never judged by tests; the targets come from the table in
//! `docs/benchmarks.md` ([`crate::targets`]).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rand::{SeedableRng, seq::index::sample};
use serde::Serialize;
use stillpoint_engine::backup::{self, BackupEnv, BackupJob, NoProgress};
use stillpoint_engine::consistency::{Level, OnQuiesceFailure};
use stillpoint_engine::freeze::GuardContext;
use stillpoint_engine::guardian::GuardianCommand;
use stillpoint_engine::report::{BackupReport, StepRecord};
use stillpoint_platform::qemu::QemuInventory;
use stillpoint_platform::{Platforms, Vm};
use stillpoint_repo::{InitOptions, Repository};
use stillpoint_testvm::{
    DiskRecord, LaunchOptions, LaunchedVm, VmConfig, WriterSample, parse_writer_samples, wait_until,
};

use crate::stats::{Stat, mb_per_s, median, ms};
use crate::targets::{Bound, Target, Targets};
use crate::{PASSWORD, Progress};

/// How long the guest agent's freeze call may take (both sequences).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the writer may take to show it runs again after an operation.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the console is read for new writer lines: the precision with which a long
/// append is placed among the backup's steps.
const WATCH_INTERVAL: Duration = Duration::from_millis(5);
/// The share of the disk the incremental phase changes, in runs of this many bytes.
const CHANGE_PERCENT: u64 = 1;
const CHANGE_RUN: u64 = 1 << 20;

/// What `bench capture` runs.
#[derive(Debug, Clone)]
pub struct CaptureBench {
    /// Data disk sizes (each configuration boots a VM with disks of one size).
    pub sizes: Vec<u64>,
    /// Data disk counts.
    pub disks: Vec<usize>,
    /// Rounds per configuration, of our backup and of the naive sequence each.
    pub rounds: usize,
    /// Percent of every data disk filled with incompressible data before boot.
    pub fill_percent: u8,
    /// Pause between rounds (the writer dirties data again).
    pub gap: Duration,
    /// Rounds of the copy phase (full, 1 % incremental, backup-image), at most `rounds`.
    pub copy_rounds: usize,
    /// Where the stall writer appends.
    pub writer_on: WriterOn,
    /// Working directory, kept short (None: a fresh directory under /var/tmp, removed after).
    pub workdir: Option<PathBuf>,
}

/// Where the stall writer appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriterOn {
    /// `/data` only (the first disk).
    Data,
    /// One loop appending to a file on every data disk in turn, so it also meets the file
    /// systems the agent freezes first and thaws last.
    AllDisks,
}

/// One (disk count, disk size) configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    disks: usize,
    size: u64,
}

impl Shape {
    /// `1x4GiB`: the configuration's directory. Paths stay short: the capture's NBD socket
    /// lives under them, and unix socket paths hold at most 107 bytes.
    fn label(self) -> String {
        format!("{}x{}", self.disks, size_label(self.size))
    }

    fn vm_name(self) -> String {
        format!("bc-{}", self.label())
    }
}

/// `256MiB`, `4GiB`: the size in the largest binary unit that divides it.
fn size_label(size: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(unit, _)| size.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", size / unit))
        .unwrap_or_else(|| format!("{size}B"))
}

/// The configurations in run order (sizes outer, counts inner, both as given) and the one the
/// copy phase runs in: the largest size, with the fewest disks.
fn plan_shapes(sizes: &[u64], counts: &[usize]) -> anyhow::Result<(Vec<Shape>, Shape)> {
    ensure!(!sizes.is_empty(), "--sizes names no size");
    ensure!(!counts.is_empty(), "--disks names no disk count");
    let mut shapes = Vec::new();
    for &size in sizes {
        for &disks in counts {
            let shape = Shape { disks, size };
            ensure!(
                !shapes.contains(&shape),
                "{disks} x {} is given twice",
                size_label(size)
            );
            shapes.push(shape);
        }
    }
    let largest = *sizes.iter().max().expect("not empty");
    let fewest = *counts.iter().min().expect("not empty");
    Ok((
        shapes,
        Shape {
            disks: fewest,
            size: largest,
        },
    ))
}

/// What one round of our backup saw.
#[derive(Debug, Clone, Serialize)]
struct OursRound {
    stall_ms: f64,
    /// The longest append that overlapped the quiesce: from the start of the agent's freeze
    /// call to the end of the thaw call (what invariant 2 bounds; the rest of `stall_ms` falls
    /// in the copy and the other steps, while the guest runs).
    quiesce_stall_ms: Option<f64>,
    /// How that append splits (ms): inside the agent's freeze call, between the freeze and
    /// the thaw call (the capture start), inside the thaw call.
    quiesce_split_ms: Option<QuiesceSplit>,
    /// Writer appends that completed while the backup ran (it keeps writing during the copy).
    appends_during: u64,
    freeze_call_ms: f64,
    frozen_ms: f64,
    thaw_call_ms: f64,
    capture_start_ms: f64,
    paused_ms: f64,
    copy_ms: f64,
    total_ms: f64,
    bytes_read: u64,
    /// Where the longest append fell, in ms since the backup began (host clock, mapped from
    /// the guest's timestamps), and the backup steps it overlapped.
    stall_window_ms: Option<(f64, f64)>,
    stall_during: Vec<String>,
    steps: Vec<StepRecord>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct QuiesceSplit {
    in_freeze_call: f64,
    frozen_between: f64,
    in_thaw_call: f64,
}

impl QuiesceSplit {
    /// Splits `append` over the freeze step, the gap up to the thaw step, and the thaw step.
    fn of(append: (f64, f64), freeze: &StepRecord, thaw: &StepRecord) -> Self {
        let overlap = |from: f64, to: f64| (append.1.min(to) - append.0.max(from)).max(0.0);
        let freeze_end = freeze.started_ms + freeze.duration_ms;
        Self {
            in_freeze_call: overlap(freeze.started_ms, freeze_end),
            frozen_between: overlap(freeze_end, thaw.started_ms),
            in_thaw_call: overlap(thaw.started_ms, thaw.started_ms + thaw.duration_ms),
        }
    }
}

/// The control: the writer's longest append over a window as long as our backup of the same
/// round, with nothing running (what the guest sees anyway on this machine).
#[derive(Debug, Clone, Serialize)]
struct ControlRound {
    stall_ms: f64,
    window_ms: f64,
}

/// What one round of the naive sequence saw.
#[derive(Debug, Clone, Serialize)]
struct NaiveRound {
    stall_ms: f64,
    appends_during: u64,
    freeze_call_ms: f64,
    /// From the end of the freeze call to the end of the thaw call (as ours).
    frozen_ms: f64,
    copy_ms: f64,
    thaw_call_ms: f64,
    /// Allocated bytes of the raw copies.
    bytes_copied: u64,
}

#[derive(Debug, Serialize)]
struct OursSummary {
    stall: Stat,
    quiesce_stall: Stat,
    freeze_call: Stat,
    frozen: Stat,
    thaw_call: Stat,
    capture_start: Stat,
    paused: Stat,
    total: Stat,
    rounds: Vec<OursRound>,
}

#[derive(Debug, Serialize)]
struct NaiveSummary {
    stall: Stat,
    freeze_call: Stat,
    frozen: Stat,
    copy: Stat,
    rounds: Vec<NaiveRound>,
}

#[derive(Debug, Serialize)]
struct ShapeResult {
    disks: usize,
    disk_size: u64,
    /// Bytes of data written into each disk before boot.
    data_per_disk: u64,
    /// The writer's append time before the rounds.
    writer_baseline: Stat,
    ours: OursSummary,
    naive: NaiveSummary,
    control: Stat,
    controls: Vec<ControlRound>,
    /// Naive median stall / ours.
    stall_ratio: f64,
    /// The stillpoint dirty bitmaps on vd0 after the rounds (each full backup starts one).
    bitmaps_after: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct CopyRound {
    /// backup-image ran before our full backup in this round.
    image_first: bool,
    /// Full backup through the capture path: disk vd0's bytes read and copy time.
    ours_bytes_read: u64,
    ours_copy_ms: f64,
    ours_mb_s: f64,
    /// The whole full backup, and its copy step (every disk).
    ours_total_ms: f64,
    ours_all_disks_copy_ms: f64,
    /// `backup-image` of the same disk as a raw file.
    image_bytes_read: u64,
    image_copy_ms: f64,
    image_mb_s: f64,
    /// The incremental after changing CHANGE_PERCENT % of the disk.
    changed_bytes: u64,
    incremental_total_ms: f64,
    incremental_copy_ms: f64,
    incremental_bytes_read: u64,
    /// CPU seconds spent during the full backup by stillpoint and by QEMU (serving NBD, the
    /// guest), and during backup-image by it and by QEMU (an idle guest): where the capture
    /// path's extra cost goes on a machine with few cores.
    ours_cpu_s: f64,
    ours_qemu_cpu_s: f64,
    image_cpu_s: f64,
    image_qemu_cpu_s: f64,
    full_steps: Vec<StepRecord>,
    incremental_steps: Vec<StepRecord>,
}

#[derive(Debug, Serialize)]
struct CopyResult {
    disks: usize,
    disk_size: u64,
    data_per_disk: u64,
    rounds: Vec<CopyRound>,
    ours_mb_s: f64,
    image_mb_s: f64,
    /// Ours / backup-image: the geometric mean of the per-round ratios of each order, then of
    /// the two orders (see [`order_balanced_ratio`]).
    throughput_ratio: f64,
    /// The median over rounds of incremental total / full total (and of the copy steps).
    incremental_ratio: f64,
    incremental_copy_ratio: f64,
}

/// What `bench capture` measured. Its JSON is the whole result, every round included;
/// `Display` is the human report, each figure beside its target.
#[derive(Debug, Serialize)]
pub struct CaptureReport {
    accel: String,
    writer_on: WriterOn,
    rounds: usize,
    fill_percent: u8,
    naive_copy: &'static str,
    configs: Vec<ShapeResult>,
    copy: CopyResult,
    #[serde(skip)]
    targets: Targets,
}

/// Runs the benchmark; `progress` hears every configuration and round as it completes.
pub async fn run(args: &CaptureBench, progress: &dyn Progress) -> anyhow::Result<CaptureReport> {
    let targets = Targets::load()?;
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.copy_rounds >= 1, "--copy-rounds must be at least 1");
    ensure!(
        (1..=VmConfig::MAX_PREFILL_PERCENT).contains(&args.fill_percent),
        "--fill-percent must be between 1 and {}",
        VmConfig::MAX_PREFILL_PERCENT
    );
    let (shapes, copy_shape) = plan_shapes(&args.sizes, &args.disks)?;
    for shape in &shapes {
        // Checked up front: a bad size should not surface after an hour of rounds.
        VmConfig::new(shape.vm_name())
            .with_disks(shape.disks, shape.size)
            .with_prefill(args.fill_percent)
            .validate()
            .with_context(|| {
                format!("configuration {} x {}", shape.disks, size_label(shape.size))
            })?;
    }
    let work = WorkDir::new(args.workdir.clone())?;
    let bench = Bench {
        args,
        progress,
        work: work.path.clone(),
    };

    let mut configs = Vec::new();
    let mut copy = None;
    for shape in shapes {
        let (result, copied) = bench.run_shape(shape, shape == copy_shape).await?;
        configs.push(result);
        if copied.is_some() {
            copy = copied;
        }
    }
    Ok(CaptureReport {
        writer_on: args.writer_on,
        accel: stillpoint_testvm::Accel::from_env()
            .map(|a| format!("{a:?}").to_lowercase())
            .unwrap_or_else(|_| "unknown".into()),
        rounds: args.rounds,
        fill_percent: args.fill_percent,
        naive_copy: "guest-fsfreeze-freeze, qemu-img convert -U -O raw of each disk image in turn, guest-fsfreeze-thaw",
        configs,
        copy: copy.expect("the copy shape is one of the shapes"),
        targets,
    })
}

/// The working directory, removed at the end unless the user named it.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl WorkDir {
    fn new(given: Option<PathBuf>) -> anyhow::Result<Self> {
        let (path, remove) = match given {
            Some(path) => (path, false),
            None => (
                PathBuf::from(format!("/var/tmp/sp-bench-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create the working directory {}", path.display()))?;
        Ok(Self { path, remove })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

struct Bench<'a> {
    args: &'a CaptureBench,
    progress: &'a dyn Progress,
    work: PathBuf,
}

/// One configuration's VM and what talks to it.
struct BenchVm {
    vm: LaunchedVm,
    watch: WriterWatch,
    handle: Arc<dyn Vm>,
    platforms: Platforms,
    guard: GuardContext,
    scratch: PathBuf,
}

impl BenchVm {
    fn env(&self, repo: Repository) -> BackupEnv {
        BackupEnv {
            platforms: self.platforms.clone(),
            repo,
            guard: self.guard.clone(),
            scratch_root: self.scratch.clone(),
            freeze_timeout: FREEZE_TIMEOUT,
            hold_limit: Duration::from_secs(60),
            progress: Arc::new(NoProgress),
        }
    }
}

impl Bench<'_> {
    fn say(&self, line: &str) {
        self.progress.line(line);
    }

    async fn run_shape(
        &self,
        shape: Shape,
        with_copy_phase: bool,
    ) -> anyhow::Result<(ShapeResult, Option<CopyResult>)> {
        let name = shape.vm_name();
        let dir = self.work.join(shape.label());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data_per_disk = shape.size * u64::from(self.args.fill_percent) / 100 / 4096 * 4096;
        self.say(&format!(
            "{} x {} ({} of data each): preparing the disks and booting…",
            shape.disks,
            size_label(shape.size),
            bytesize::ByteSize(data_per_disk)
        ));
        let root = dir.join("runtime");
        let vm = LaunchedVm::launch(
            VmConfig::new(&name)
                .with_disks(shape.disks, shape.size)
                .with_prefill(self.args.fill_percent),
            &LaunchOptions::attached(&root),
        )
        .await
        .with_context(|| format!("cannot launch the benchmark VM `{name}`"))?;
        vm.wait_until_ready(stillpoint_testvm::BOOT_TIMEOUT).await?;
        let platforms = Platforms::new(QemuInventory::new(vec![], root.clone()));
        let target = BenchVm {
            handle: platforms.resolve(&name)?,
            platforms,
            guard: GuardContext {
                runtime_root: root.clone(),
                config: None,
                guardian: GuardianCommand::current_exe()?,
            },
            scratch: dir.join("s"),
            watch: WriterWatch::start(vm.console_log()),
            vm,
        };

        let copy = if with_copy_phase {
            Some(self.copy_phase(&target, shape, data_per_disk, &dir).await?)
        } else {
            None
        };

        // With `all-disks`, one loop over a file on every data disk: the agent freezes the file
        // systems one after the other (the last mounted first), and a writer on /data alone
        // meets only the last one frozen and first thawed.
        let writers = match self.args.writer_on {
            WriterOn::Data => 1,
            WriterOn::AllDisks => shape.disks,
        };
        let files: Vec<String> = (0..writers)
            .map(|i| match i {
                0 => "/data/stall".to_string(),
                i => format!("/data{i}/stall"),
            })
            .collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        target.vm.start_stall_writer_over(&files).await?;
        let from = target.watch.last_seq();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let baseline: Vec<Duration> = target
            .watch
            .since(from)
            .iter()
            .map(|seen| seen.sample.latency())
            .collect();

        let repo_path = dir.join("repo");
        let repo = init_repository(&repo_path)?;
        let env = target.env(repo);
        let naive_out = dir.join("naive");
        let (mut ours, mut naive, mut controls) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..self.args.rounds {
            // Alternate which goes first, so neither always inherits the other's aftermath.
            for ours_turn in [round % 2 == 0, round % 2 != 0] {
                self.settle().await;
                if ours_turn {
                    ours.push(self.ours_round(&target, &env).await?);
                } else {
                    naive.push(self.naive_round(&target, &naive_out).await?);
                }
            }
            let (o, n) = (ours.last().expect("ran"), naive.last().expect("ran"));
            self.settle().await;
            let control = self.control_round(&target, o.total_ms).await?;
            self.say(&format!(
                "  round {}: stall ours {:.1} ms (at the quiesce {}, frozen {:.1} ms), naive {:.1} ms (frozen {:.1} ms, {} copied), control {:.1} ms",
                round + 1,
                o.stall_ms,
                o.quiesce_stall_ms
                    .map_or("?".into(), |v| format!("{v:.1} ms")),
                o.frozen_ms,
                n.stall_ms,
                n.frozen_ms,
                bytesize::ByteSize(n.bytes_copied),
                control.stall_ms
            ));
            controls.push(control);
        }
        drop(env);
        // Asked last: this handle keeps the monitor, which takes one client at a time.
        let inventory = target
            .handle
            .capture()
            .context("the benchmark VM cannot capture")?
            .inspect()
            .await?;
        let bitmaps_after = inventory
            .disks
            .first()
            .map(|d| d.bitmaps.iter().map(|b| b.name.clone()).collect())
            .unwrap_or_default();
        target.vm.stop().await?;
        let _ = std::fs::remove_dir_all(&dir);

        let ours = OursSummary {
            stall: Stat::of_ms(ours.iter().map(|r| r.stall_ms)),
            quiesce_stall: Stat::of_ms(ours.iter().filter_map(|r| r.quiesce_stall_ms)),
            freeze_call: Stat::of_ms(ours.iter().map(|r| r.freeze_call_ms)),
            frozen: Stat::of_ms(ours.iter().map(|r| r.frozen_ms)),
            thaw_call: Stat::of_ms(ours.iter().map(|r| r.thaw_call_ms)),
            capture_start: Stat::of_ms(ours.iter().map(|r| r.capture_start_ms)),
            paused: Stat::of_ms(ours.iter().map(|r| r.paused_ms)),
            total: Stat::of_ms(ours.iter().map(|r| r.total_ms)),
            rounds: ours,
        };
        let naive = NaiveSummary {
            stall: Stat::of_ms(naive.iter().map(|r| r.stall_ms)),
            freeze_call: Stat::of_ms(naive.iter().map(|r| r.freeze_call_ms)),
            frozen: Stat::of_ms(naive.iter().map(|r| r.frozen_ms)),
            copy: Stat::of_ms(naive.iter().map(|r| r.copy_ms)),
            rounds: naive,
        };
        let stall_ratio = naive.stall.median_ms / ours.stall.median_ms;
        Ok((
            ShapeResult {
                disks: shape.disks,
                disk_size: shape.size,
                data_per_disk,
                writer_baseline: Stat::of(&baseline),
                ours,
                naive,
                control: Stat::of_ms(controls.iter().map(|c| c.stall_ms)),
                controls,
                stall_ratio,
                bitmaps_after,
            },
            copy,
        ))
    }

    /// Between rounds: write back what the previous round left dirty on the host (so no round
    /// pays for another's I/O), then let the writer dirty some data in the guest again.
    async fn settle(&self) {
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        tokio::time::sleep(self.args.gap).await;
    }

    async fn ours_round(&self, target: &BenchVm, env: &BackupEnv) -> anyhow::Result<OursRound> {
        let before = target.watch.last_seq();
        let began = Instant::now();
        let report = backup_full(env, target.vm.name(), true).await?;
        let stall = target.watch.stall_since(&target.vm, before, began).await?;
        let freeze = report
            .freeze
            .as_ref()
            .context("the backup report has no freeze window")?;
        let capture = report
            .capture
            .as_ref()
            .context("the backup report has no capture start")?;
        let stall_during = stall
            .window_ms
            .map(|window| steps_overlapping(&report.steps, window))
            .unwrap_or_default();
        let step = |name: &str| report.steps.iter().find(|s| s.name == name);
        let at_quiesce = match (step("freeze"), step("thaw")) {
            (Some(freeze), Some(thaw)) => stall
                .longest_within((freeze.started_ms, thaw.started_ms + thaw.duration_ms))
                .map(|(place, latency)| (latency, QuiesceSplit::of(place, freeze, thaw))),
            _ => None,
        };
        Ok(OursRound {
            stall_ms: ms(stall.longest),
            quiesce_stall_ms: at_quiesce.map(|(latency, _)| ms(latency)),
            quiesce_split_ms: at_quiesce.map(|(_, split)| split),
            appends_during: stall.appends_during,
            freeze_call_ms: freeze.freeze_ms,
            frozen_ms: freeze.frozen_ms,
            thaw_call_ms: freeze.thaw_ms,
            capture_start_ms: capture.start_ms,
            paused_ms: capture.paused_ms,
            copy_ms: report.disks.iter().map(|d| d.copy_ms).sum(),
            total_ms: report.duration_ms,
            bytes_read: report.bytes_read,
            stall_window_ms: stall.window_ms,
            stall_during,
            steps: report.steps,
        })
    }

    async fn control_round(
        &self,
        target: &BenchVm,
        window_ms: f64,
    ) -> anyhow::Result<ControlRound> {
        let before = target.watch.last_seq();
        let began = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(window_ms / 1000.0)).await;
        let stall = target.watch.stall_since(&target.vm, before, began).await?;
        Ok(ControlRound {
            stall_ms: ms(stall.longest),
            window_ms,
        })
    }

    /// Freeze → copy every disk image while frozen → thaw, the thaw on every path. No guardian:
    /// the VM is attached to this process and dies with it, so it cannot stay frozen.
    async fn naive_round(&self, target: &BenchVm, out: &Path) -> anyhow::Result<NaiveRound> {
        let agent = target
            .handle
            .agent()
            .context("the benchmark VM has no guest agent")?;
        std::fs::create_dir_all(out)?;
        let before = target.watch.last_seq();
        let began = Instant::now();
        let frozen = agent.freeze(FREEZE_TIMEOUT).await;
        let frozen_at = Instant::now();
        let copied = match &frozen {
            Ok(_) => Some(copy_images(target.vm.disks(), out).await),
            Err(_) => None,
        };
        let thaw_began = Instant::now();
        let thawed = agent.thaw().await;
        let thawed_at = Instant::now();
        agent.release().await;
        let filesystems = frozen.context("guest-fsfreeze-freeze failed")?;
        thawed.context("guest-fsfreeze-thaw failed")?;
        let bytes_copied = copied.expect("copied when frozen")?;
        ensure!(
            filesystems as usize >= target.vm.disks().len(),
            "the agent froze {filesystems} filesystem(s) for {} data disk(s)",
            target.vm.disks().len()
        );
        let stall = target.watch.stall_since(&target.vm, before, began).await?;
        std::fs::remove_dir_all(out)?;
        Ok(NaiveRound {
            stall_ms: ms(stall.longest),
            appends_during: stall.appends_during,
            freeze_call_ms: ms(frozen_at - began),
            frozen_ms: ms(thawed_at - frozen_at),
            copy_ms: ms(thaw_began - frozen_at),
            thaw_call_ms: ms(thawed_at - thaw_began),
            bytes_copied,
        })
    }

    /// Throughput of a full backup through the capture path against `backup-image` of the same
    /// disk as a raw file, and an incremental with 1 % of the disk changed against the full.
    async fn copy_phase(
        &self,
        target: &BenchVm,
        shape: Shape,
        data_per_disk: u64,
        dir: &Path,
    ) -> anyhow::Result<CopyResult> {
        let copy_dir = dir.join("copy");
        std::fs::create_dir_all(&copy_dir)?;
        let disk = target
            .vm
            .disks()
            .first()
            .context("the benchmark VM has no data disk")?
            .clone();
        let raw = copy_dir.join("vd0.raw");
        self.say(&format!(
            "  copy phase: converting {} to a raw file for backup-image…",
            disk.path.display()
        ));
        qemu_img_to_raw(&disk.path, &raw).await?;
        let rounds = self.args.copy_rounds.min(self.args.rounds);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut results = Vec::new();
        for round in 0..rounds {
            // The two full backups run back to back, in alternating order: on this machine the
            // one that runs second is often slower (the storage's write budget, spent by the
            // first), so the order is recorded and balanced in the result.
            let image_first = round % 2 == 1;
            let image_repo = copy_dir.join(format!("repo-image-{round}"));
            let ours_repo = copy_dir.join(format!("repo-ours-{round}"));
            let qemu = target.vm.pid();
            let mut image = None;
            if image_first {
                self.settle().await;
                image = Some(backup_image(&raw, &image_repo, qemu).await?);
            }
            self.settle().await;
            let env = target.env(init_repository(&ours_repo)?);
            let (own_before, qemu_before) = (
                rusage_cpu_s(nix::sys::resource::UsageWho::RUSAGE_SELF),
                process_cpu_s(qemu),
            );
            let full = backup_full(&env, target.vm.name(), true).await?;
            let ours_cpu_s = rusage_cpu_s(nix::sys::resource::UsageWho::RUSAGE_SELF) - own_before;
            let ours_qemu_cpu_s = process_cpu_s(qemu) - qemu_before;
            if !image_first {
                self.settle().await;
                image = Some(backup_image(&raw, &image_repo, qemu).await?);
            }
            let changed_bytes = change_in_guest(&target.vm, shape.size, data_per_disk, &mut rng)
                .await
                .context("changing 1 % of the disk in the guest")?;
            self.settle().await;
            let incremental = backup_full(&env, target.vm.name(), false).await?;
            ensure!(
                incremental.disks.iter().all(|d| d.mode == "incremental"),
                "the second backup was not incremental: {:?}",
                incremental
                    .disks
                    .iter()
                    .map(|d| (&d.id, &d.mode, &d.full_reason))
                    .collect::<Vec<_>>()
            );
            drop(env);
            let image = image.expect("ran in this round");
            let vd0 = full
                .disks
                .iter()
                .find(|d| d.id == disk.device_id)
                .context("the full backup's report has no vd0")?;
            let result = CopyRound {
                image_first,
                ours_bytes_read: vd0.bytes_read,
                ours_copy_ms: vd0.copy_ms,
                ours_mb_s: mb_per_s(vd0.bytes_read, vd0.copy_ms / 1000.0),
                ours_total_ms: full.duration_ms,
                ours_all_disks_copy_ms: full.disks.iter().map(|d| d.copy_ms).sum(),
                image_bytes_read: image.bytes_read,
                image_copy_ms: image.seconds * 1000.0,
                image_mb_s: mb_per_s(image.bytes_read, image.seconds),
                changed_bytes,
                incremental_total_ms: incremental.duration_ms,
                incremental_copy_ms: incremental.disks.iter().map(|d| d.copy_ms).sum(),
                incremental_bytes_read: incremental.bytes_read,
                ours_cpu_s,
                ours_qemu_cpu_s,
                image_cpu_s: image.cpu_s,
                image_qemu_cpu_s: image.qemu_cpu_s,
                full_steps: full.steps.clone(),
                incremental_steps: incremental.steps,
            };
            self.say(&format!(
                "  copy round {}: capture path {:.0} MB/s, backup-image {:.0} MB/s; full {:.1} s, 1 % incremental {:.1} s ({} read)",
                round + 1,
                result.ours_mb_s,
                result.image_mb_s,
                result.ours_total_ms / 1000.0,
                result.incremental_total_ms / 1000.0,
                bytesize::ByteSize(result.incremental_bytes_read)
            ));
            results.push(result);
            let _ = std::fs::remove_dir_all(&ours_repo);
            let _ = std::fs::remove_dir_all(&image_repo);
        }
        let _ = std::fs::remove_dir_all(&copy_dir);
        let ours_mb_s = median(results.iter().map(|r| r.ours_mb_s));
        let image_mb_s = median(results.iter().map(|r| r.image_mb_s));
        // Ratios are taken per round, between measurements made moments apart, then the
        // median: on a shared machine the load drifts more between rounds than within one.
        Ok(CopyResult {
            disks: shape.disks,
            disk_size: shape.size,
            data_per_disk,
            ours_mb_s,
            image_mb_s,
            throughput_ratio: order_balanced_ratio(&results),
            incremental_ratio: median(
                results
                    .iter()
                    .map(|r| r.incremental_total_ms / r.ours_total_ms),
            ),
            incremental_copy_ratio: median(
                results
                    .iter()
                    .map(|r| r.incremental_copy_ms / r.ours_all_disks_copy_ms),
            ),
            rounds: results,
        })
    }
}

/// Ours / backup-image over the rounds, with the order effect cancelled: if running second
/// scales a tool's speed by k, ours-first rounds show ratio × k and image-first rounds
/// ratio / k; the geometric mean of the two orders' geometric means cancels k, however many
/// rounds each order had.
fn order_balanced_ratio(rounds: &[CopyRound]) -> f64 {
    let geometric_mean = |image_first: bool| {
        let logs: Vec<f64> = rounds
            .iter()
            .filter(|r| r.image_first == image_first)
            .map(|r| (r.ours_mb_s / r.image_mb_s).ln())
            .collect();
        (!logs.is_empty()).then(|| logs.iter().sum::<f64>() / logs.len() as f64)
    };
    let orders: Vec<f64> = [false, true]
        .into_iter()
        .filter_map(geometric_mean)
        .collect();
    (orders.iter().sum::<f64>() / orders.len() as f64).exp()
}

/// A fresh encrypted repository with the default settings.
fn init_repository(path: &Path) -> anyhow::Result<Repository> {
    let _ = std::fs::remove_dir_all(path);
    Repository::init_local(
        path,
        &InitOptions {
            passphrase: Some(PASSWORD.into()),
            ..InitOptions::default()
        },
    )
    .with_context(|| format!("cannot create the repository {}", path.display()))
}

/// One filesystem-level backup of `vm` (full when `force_full`); anything short of a published
/// filesystem-level snapshot is an error, so a degraded backup never passes for a measurement.
async fn backup_full(env: &BackupEnv, vm: &str, force_full: bool) -> anyhow::Result<BackupReport> {
    let outcome = backup::backup_vm(
        env,
        BackupJob {
            vm: vm.to_string(),
            requested: Level::Filesystem,
            policy: OnQuiesceFailure::Fail,
            recipe: None,
            force_full,
        },
    )
    .await;
    if let Some(error) = outcome.error {
        return Err(anyhow::Error::new(error).context(format!("the backup of `{vm}` failed")));
    }
    ensure!(
        outcome.achieved_requested(),
        "the backup of `{vm}` reached {} consistency, not filesystem: {}",
        outcome.report.achieved,
        outcome.report.degraded_because.join("; ")
    );
    Ok(outcome.report)
}

/// `qemu-img convert -U -O raw` of every image in turn into `out`; returns the allocated bytes
/// of the copies. `-U`: QEMU holds the images open (the guest is frozen, and the freeze
/// flushed the guest's writes through QEMU into the image files).
async fn copy_images(disks: &[DiskRecord], out: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for disk in disks {
        let copy = out.join(format!("{}.raw", disk.device_id));
        qemu_img_to_raw(&disk.path, &copy).await?;
        total += allocated_bytes(&copy)?;
    }
    Ok(total)
}

async fn qemu_img_to_raw(image: &Path, raw: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .await
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !output.status.success() {
        bail!(
            "qemu-img convert of {} failed ({}): {}",
            image.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(meta.blocks() * 512)
}

/// What `backup-image` of the raw file did.
struct ImageRun {
    bytes_read: u64,
    /// The copy as it reports it (without opening the repository).
    seconds: f64,
    /// CPU seconds of the whole subprocess, and of QEMU meanwhile.
    cpu_s: f64,
    qemu_cpu_s: f64,
}

/// `stillpoint backup-image RAW` into a fresh repository with the same settings as ours, as a
/// subprocess, while the VM (QEMU pid `qemu`) runs on.
async fn backup_image(raw: &Path, repo_path: &Path, qemu: u32) -> anyhow::Result<ImageRun> {
    drop(init_repository(repo_path)?);
    let (children_before, qemu_before) = (
        rusage_cpu_s(nix::sys::resource::UsageWho::RUSAGE_CHILDREN),
        process_cpu_s(qemu),
    );
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--repo")
        .arg(repo_path)
        .args(["--json", "backup-image"])
        .arg(raw)
        .args(["--name", "bench-image"])
        .env("STILLPOINT_PASSWORD", PASSWORD)
        .env_remove("STILLPOINT_CONFIG")
        .output()
        .await
        .context("cannot run stillpoint backup-image")?;
    let cpu_s = rusage_cpu_s(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) - children_before;
    let qemu_cpu_s = process_cpu_s(qemu) - qemu_before;
    if !output.status.success() {
        bail!(
            "stillpoint backup-image {} failed ({}): {}",
            raw.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("stillpoint backup-image --json printed no JSON")?;
    Ok(ImageRun {
        bytes_read: report["stats"]["bytes_read"]
            .as_u64()
            .context("backup-image's report has no stats.bytes_read")?,
        seconds: report["seconds"]
            .as_f64()
            .context("backup-image's report has no seconds")?,
        cpu_s,
        qemu_cpu_s,
    })
}

/// Overwrites CHANGE_PERCENT % of the disk's size with random data, in CHANGE_RUN runs at
/// random run-aligned places of the prefilled file, from inside the guest, then syncs.
/// Returns the bytes changed.
async fn change_in_guest(
    vm: &LaunchedVm,
    disk_size: u64,
    file_size: u64,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<u64> {
    let slots = file_size / CHANGE_RUN;
    let runs = (disk_size * CHANGE_PERCENT / 100 / CHANGE_RUN).clamp(1, slots.max(1));
    ensure!(
        slots >= runs,
        "the prefilled file is too small to change 1 % of the disk"
    );
    let picked = sample(rng, slots as usize, runs as usize);
    let seeks: Vec<String> = picked.iter().map(|s| s.to_string()).collect();
    let script = format!(
        "for k in {}; do dd if=/dev/urandom of=/data/{} bs={CHANGE_RUN} count=1 \
         seek=$k conv=notrunc 2>/dev/null || exit 1; done; sync",
        seeks.join(" "),
        VmConfig::PREFILL_FILE
    );
    let output = vm
        .guest_exec(&["sh", "-c", &script], Duration::from_secs(300))
        .await?;
    ensure!(
        output.exit_code == Some(0),
        "the change script failed in the guest ({:?}): {}",
        output.exit_code,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(runs * CHANGE_RUN)
}

/// One append of the stall writer and when the host first saw it on the console.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    sample: WriterSample,
}

/// The stall writer's appends as they show up on the serial console, each with the host time
/// it was first seen (within [`WATCH_INTERVAL`]). That maps the guest's clock onto the host's,
/// so that a long append can be placed among the backup's steps. A background task reads only
/// what was appended since its last look (the console grows for the whole run).
struct WriterWatch {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the writer saw during one operation.
struct StallSeen {
    longest: Duration,
    appends_during: u64,
    /// The longest append, in ms since the operation began (host clock).
    window_ms: Option<(f64, f64)>,
    /// Every append after the operation began: (from, to) in ms since it began (host clock),
    /// and its duration. Empty when the clocks could not be mapped.
    placed: Vec<((f64, f64), Duration)>,
}

impl StallSeen {
    /// The longest append that overlapped `(from, to)` (ms since the operation began), and
    /// where it lay.
    fn longest_within(&self, (from, to): (f64, f64)) -> Option<((f64, f64), Duration)> {
        self.placed
            .iter()
            .filter(|((start, end), _)| *start < to && *end > from)
            .max_by_key(|(_, latency)| *latency)
            .copied()
    }
}

impl WriterWatch {
    fn start(console: &Path) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let console = console.to_path_buf();
        let task = tokio::spawn(async move {
            let mut file = None;
            let mut pending = Vec::new();
            loop {
                if file.is_none() {
                    file = std::fs::File::open(&console).ok();
                }
                if let Some(file) = file.as_mut() {
                    let _ = file.read_to_end(&mut pending);
                }
                if let Some(cut) = pending.iter().rposition(|&b| b == b'\n') {
                    let at = Instant::now();
                    let lines: Vec<u8> = pending.drain(..=cut).collect();
                    let samples = parse_writer_samples(&String::from_utf8_lossy(&lines));
                    sink.lock()
                        .expect("not poisoned")
                        .extend(samples.into_iter().map(|sample| Seen { at, sample }));
                }
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
        });
        Self { seen, task }
    }

    fn last_seq(&self) -> u64 {
        self.seen
            .lock()
            .expect("not poisoned")
            .last()
            .map_or(0, |s| s.sample.seq)
    }

    fn since(&self, seq: u64) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.sample.seq > seq)
            .copied()
            .collect()
    }

    /// The longest append among those after `before` — once two more show the writer runs
    /// freely again — and how many completed while the operation ran (it ended just now).
    async fn stall_since(
        &self,
        vm: &LaunchedVm,
        before: u64,
        began: Instant,
    ) -> anyhow::Result<StallSeen> {
        let ended = self.last_seq();
        let resumed = wait_until(RESUME_TIMEOUT, || {
            std::future::ready(self.last_seq() >= ended.max(before) + 2)
        })
        .await;
        ensure!(
            resumed,
            "the guest writer did not resume; console:\n{}",
            vm.console_tail(10)
        );
        let after = self.since(before);
        let longest = after
            .iter()
            .max_by_key(|s| s.sample.latency())
            .expect("at least two appends after `before`");
        let offset = guest_to_host_ms(&after, began);
        let place = |sample: &WriterSample| {
            offset.map(|offset| {
                (
                    sample.start_ns as f64 / 1e6 + offset,
                    sample.end_ns as f64 / 1e6 + offset,
                )
            })
        };
        Ok(StallSeen {
            longest: longest.sample.latency(),
            appends_during: ended.saturating_sub(before),
            window_ms: place(&longest.sample),
            placed: after
                .iter()
                .filter_map(|s| Some((place(&s.sample)?, s.sample.latency())))
                .collect(),
        })
    }
}

impl Drop for WriterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The offset from guest milliseconds to host milliseconds since `began`: every append was
/// seen no earlier than it ended, so the smallest (seen − ended) is the closest estimate.
fn guest_to_host_ms(seen: &[Seen], began: Instant) -> Option<f64> {
    seen.iter()
        .map(|s| signed_ms(s.at, began) - s.sample.end_ns as f64 / 1e6)
        .min_by(f64::total_cmp)
}

fn signed_ms(at: Instant, since: Instant) -> f64 {
    match at.checked_duration_since(since) {
        Some(after) => ms(after),
        None => -ms(since - at),
    }
}

/// The steps of a backup that overlap `window` (ms since the backup began).
fn steps_overlapping(steps: &[StepRecord], (from, to): (f64, f64)) -> Vec<String> {
    let during: Vec<String> = steps
        .iter()
        .filter(|s| s.started_ms < to && s.started_ms + s.duration_ms > from)
        .map(|s| s.name.clone())
        .collect();
    if during.is_empty() {
        vec!["between recorded steps".into()]
    } else {
        during
    }
}

/// CPU seconds (user + system) used so far by process `pid`, from /proc.
fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // utime and stime are fields 14 and 15; the command name (field 2) may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / per_second,
        _ => f64::NAN,
    }
}

/// CPU seconds used by this process (`RUSAGE_SELF`) or its waited-for children.
fn rusage_cpu_s(who: nix::sys::resource::UsageWho) -> f64 {
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1_000_000.0;
    nix::sys::resource::getrusage(who)
        .map(|u| seconds(u.user_time()) + seconds(u.system_time()))
        .unwrap_or(f64::NAN)
}

/// `met`, or `MISSED by N %` of the bound.
fn verdict(bound: Bound, measured: f64) -> String {
    if bound.is_met(measured) {
        "met".into()
    } else {
        format!("MISSED by {:.0} %", bound.shortfall_percent(measured))
    }
}

impl fmt::Display for CaptureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let result = self;
        let stall_target = self.targets.bound(Target::CaptureStall);
        let throughput_target = self.targets.bound(Target::CaptureCopyThroughput);
        let incremental_target = self.targets.bound(Target::CaptureIncremental);
        let cell = |s: &Stat| format!("{:.1} / {:.1}", s.median_ms, s.max_ms);
        writeln!(f)?;
        writeln!(
            f,
            "Capture benchmark ({}, {} rounds per configuration, every disk {} % full of incompressible data)",
            result.accel.to_uppercase(),
            result.rounds,
            result.fill_percent
        )?;
        writeln!(
            f,
            "writer stall = the longest append of a writer in the guest during the operation (ms, median / max); the writer appends to {}",
            match result.writer_on {
                WriterOn::Data => "/data (the first disk)",
                WriterOn::AllDisks => "a file on every data disk in turn",
            }
        )?;
        writeln!(f, "naive = {}", result.naive_copy)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<12} {:>15} {:>15} {:>15} {:>17} {:>7}  {:>13} {:>13} {:>13} {:>17}",
            "config",
            "ours stall",
            "at the quiesce",
            "control",
            "naive stall",
            "ratio",
            "ours frozen",
            "capture start",
            "vCPUs paused",
            "naive frozen"
        )?;
        for c in &result.configs {
            writeln!(
                f,
                "{:<12} {:>15} {:>15} {:>15} {:>17} {:>6.1}x  {:>13} {:>13} {:>13} {:>17}",
                format!("{} x {}", c.disks, size_label(c.disk_size)),
                cell(&c.ours.stall),
                cell(&c.ours.quiesce_stall),
                cell(&c.control),
                cell(&c.naive.stall),
                c.stall_ratio,
                cell(&c.ours.frozen),
                cell(&c.ours.capture_start),
                cell(&c.ours.paused),
                cell(&c.naive.frozen),
            )?;
        }
        writeln!(
            f,
            "(at the quiesce: the longest append overlapping freeze call → thaw; control: the longest append over a window as long as our backup, nothing running; ratio: naive / ours median stall)"
        )?;
        writeln!(f)?;
        for c in &result.configs {
            writeln!(
                f,
                "{} x {}: writer append outside the rounds {} ms; ours: freeze call {} ms, thaw call {} ms, whole backup {:.1} s ({} read); naive copy while frozen {:.0} ms ({} copied)",
                c.disks,
                size_label(c.disk_size),
                cell(&c.writer_baseline),
                cell(&c.ours.freeze_call),
                cell(&c.ours.thaw_call),
                c.ours.total.median_ms / 1000.0,
                bytesize::ByteSize(c.ours.rounds.first().map_or(0, |r| r.bytes_read)),
                c.naive.copy.median_ms,
                bytesize::ByteSize(c.naive.rounds.first().map_or(0, |r| r.bytes_copied)),
            )?;
            let placed: Vec<String> = c
                .ours
                .rounds
                .iter()
                .map(|r| format!("{:.0} ms in {}", r.stall_ms, r.stall_during.join("+")))
                .collect();
            writeln!(
                f,
                "    ours' longest append per round: {}",
                placed.join(", ")
            )?;
            let splits: Vec<QuiesceSplit> = c
                .ours
                .rounds
                .iter()
                .filter_map(|r| r.quiesce_split_ms)
                .collect();
            if !splits.is_empty() {
                writeln!(
                    f,
                    "    ours' longest append at the quiesce lay (median ms): {:.1} in the agent's freeze call, {:.1} between it and the thaw call (capture start), {:.1} in the thaw call",
                    median(splits.iter().map(|s| s.in_freeze_call)),
                    median(splits.iter().map(|s| s.frozen_between)),
                    median(splits.iter().map(|s| s.in_thaw_call)),
                )?;
            }
            if c.bitmaps_after.len() > 1 {
                writeln!(
                    f,
                    "    note: vd0 holds {} stillpoint dirty bitmaps after {} full backups",
                    c.bitmaps_after.len(),
                    c.ours.rounds.len()
                )?;
            }
        }
        let worst = result
            .configs
            .iter()
            .map(|c| c.ours.stall.median_ms)
            .fold(0.0, f64::max);
        let best = result
            .configs
            .iter()
            .map(|c| c.ours.stall.median_ms)
            .fold(f64::INFINITY, f64::min);
        let quiesce: Vec<f64> = result
            .configs
            .iter()
            .map(|c| c.ours.quiesce_stall.median_ms)
            .collect();
        let (q_worst, q_best) = (
            quiesce.iter().copied().fold(0.0, f64::max),
            quiesce.iter().copied().fold(f64::INFINITY, f64::min),
        );
        writeln!(f)?;
        writeln!(
            f,
            "ours, worst median stall {worst:.1} ms (target {} {} ms): {}; largest / smallest median across configurations {:.2}x",
            stall_target.relation,
            stall_target.limit(),
            verdict(stall_target, worst),
            worst / best
        )?;
        writeln!(
            f,
            "ours at the quiesce, worst median {q_worst:.1} ms: {}; largest / smallest median {:.2}x",
            verdict(stall_target, q_worst),
            q_worst / q_best
        )?;
        let copy = &result.copy;
        writeln!(f)?;
        writeln!(
            f,
            "copy throughput ({} x {}, vd0, {} of data): capture path {:.0} MB/s, backup-image of the raw file {:.0} MB/s (medians); ratio, order-balanced {:.0} % (target {} {:.0} %): {}",
            copy.disks,
            size_label(copy.disk_size),
            bytesize::ByteSize(copy.data_per_disk),
            copy.ours_mb_s,
            copy.image_mb_s,
            copy.throughput_ratio * 100.0,
            throughput_target.relation,
            throughput_target.value,
            verdict(throughput_target, copy.throughput_ratio)
        )?;
        let gb = |bytes: u64| bytes as f64 / 1e9;
        for (i, r) in copy.rounds.iter().enumerate() {
            writeln!(
                f,
                "    round {} ({} first): {:.0} vs {:.0} MB/s ({:.0} %); CPU s per GB read — capture path: stillpoint {:.2} + QEMU {:.2}; backup-image: stillpoint {:.2} + QEMU (idle guest) {:.2}",
                i + 1,
                if r.image_first {
                    "backup-image"
                } else {
                    "ours"
                },
                r.ours_mb_s,
                r.image_mb_s,
                r.ours_mb_s / r.image_mb_s * 100.0,
                r.ours_cpu_s / gb(r.ours_bytes_read),
                r.ours_qemu_cpu_s / gb(r.ours_bytes_read),
                r.image_cpu_s / gb(r.image_bytes_read),
                r.image_qemu_cpu_s / gb(r.image_bytes_read),
            )?;
        }
        let first = copy.rounds.first();
        writeln!(
            f,
            "1 % incremental ({} changed, {} read): median {:.0} % of the full backup's time (target {} {:.0} %): {}; its copy step {:.0} % of the full's; per round: {}",
            bytesize::ByteSize(first.map_or(0, |r| r.changed_bytes)),
            bytesize::ByteSize(first.map_or(0, |r| r.incremental_bytes_read)),
            copy.incremental_ratio * 100.0,
            incremental_target.relation,
            incremental_target.value,
            verdict(incremental_target, copy.incremental_ratio),
            copy.incremental_copy_ratio * 100.0,
            copy.rounds
                .iter()
                .map(|r| format!("{:.0} %", r.incremental_total_ms / r.ours_total_ms * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        if let Some(r) = first {
            let steps = |steps: &[StepRecord]| {
                steps
                    .iter()
                    .filter(|s| s.outcome != "skipped")
                    .map(|s| format!("{} {:.0}", s.name, s.duration_ms))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(f, "    full steps (ms): {}", steps(&r.full_steps))?;
            writeln!(
                f,
                "    incremental steps (ms): {}",
                steps(&r.incremental_steps)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_run_in_order_and_the_copy_phase_takes_the_largest_size_with_fewest_disks() {
        let (shapes, copy) = plan_shapes(&[256 << 20, 4 << 30], &[4, 1]).expect("plan");
        let names: Vec<String> = shapes.iter().map(|s| s.vm_name()).collect();
        assert_eq!(
            names,
            ["bc-4x256MiB", "bc-1x256MiB", "bc-4x4GiB", "bc-1x4GiB"]
        );
        assert_eq!(
            copy,
            Shape {
                disks: 1,
                size: 4 << 30
            }
        );
        let twice = plan_shapes(&[1 << 30, 1 << 30], &[1]).expect_err("duplicate");
        assert!(twice.to_string().contains("1 x 1GiB"), "{twice}");
        assert!(plan_shapes(&[], &[1]).is_err());
    }

    #[test]
    fn sizes_are_labelled_in_the_largest_whole_unit() {
        assert_eq!(size_label(256 << 20), "256MiB");
        assert_eq!(size_label(4 << 30), "4GiB");
        assert_eq!(size_label(1536 << 20), "1536MiB");
        assert_eq!(size_label(1000), "1000B");
    }

    fn step(name: &str, started_ms: f64, duration_ms: f64) -> StepRecord {
        StepRecord {
            name: name.into(),
            started_ms,
            duration_ms,
            outcome: "ok".into(),
            detail: None,
        }
    }

    #[test]
    fn an_append_is_placed_among_the_steps_it_overlaps() {
        let steps = [
            step("preflight", 0.0, 80.0),
            step("freeze", 100.0, 120.0),
            step("capture start", 220.0, 4.0),
            step("thaw", 224.0, 6.0),
            step("copy vd0", 240.0, 1000.0),
        ];
        assert_eq!(
            steps_overlapping(&steps, (200.0, 226.0)),
            ["freeze", "capture start", "thaw"]
        );
        assert_eq!(steps_overlapping(&steps, (500.0, 540.0)), ["copy vd0"]);
        assert_eq!(
            steps_overlapping(&steps, (85.0, 95.0)),
            ["between recorded steps"]
        );
        let split = QuiesceSplit::of((200.0, 226.0), &steps[1], &steps[3]);
        assert_eq!(
            (
                split.in_freeze_call,
                split.frozen_between,
                split.in_thaw_call
            ),
            (20.0, 4.0, 2.0)
        );
    }

    #[test]
    fn guest_time_maps_onto_host_time_by_the_earliest_sighting() {
        let began = Instant::now();
        let seen = |after_ms: u64, end_ns: u64| Seen {
            at: began + Duration::from_millis(after_ms),
            sample: WriterSample {
                seq: 1,
                start_ns: end_ns - 1_000_000,
                end_ns,
            },
        };
        // Guest ns 5_000_000_000 is host ms 10 (seen at once); the other line was seen late.
        let offset = guest_to_host_ms(&[seen(10, 5_000_000_000), seen(40, 5_020_000_000)], began)
            .expect("samples");
        assert!((offset - (10.0 - 5000.0)).abs() < 1e-6, "{offset}");
        assert_eq!(guest_to_host_ms(&[], began), None);
        assert!((signed_ms(began, began + Duration::from_millis(3)) + 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_order_effect_cancels_out_of_the_throughput_ratio() {
        let round = |image_first: bool, ours_mb_s: f64, image_mb_s: f64| CopyRound {
            image_first,
            ours_bytes_read: 0,
            ours_copy_ms: 0.0,
            ours_mb_s,
            ours_total_ms: 0.0,
            ours_all_disks_copy_ms: 0.0,
            image_bytes_read: 0,
            image_copy_ms: 0.0,
            image_mb_s,
            changed_bytes: 0,
            incremental_total_ms: 0.0,
            incremental_copy_ms: 0.0,
            incremental_bytes_read: 0,
            ours_cpu_s: 0.0,
            ours_qemu_cpu_s: 0.0,
            image_cpu_s: 0.0,
            image_qemu_cpu_s: 0.0,
            full_steps: vec![],
            incremental_steps: vec![],
        };
        // True ratio 0.8; running second halves the speed; three rounds one way, one the other.
        let rounds = [
            round(false, 400.0, 250.0),
            round(true, 200.0, 500.0),
            round(false, 400.0, 250.0),
            round(false, 400.0, 250.0),
        ];
        let ratio = order_balanced_ratio(&rounds);
        assert!((ratio - 0.8).abs() < 1e-9, "{ratio}");
        assert!((order_balanced_ratio(&rounds[1..2]) - 0.4).abs() < 1e-9);
    }
}
