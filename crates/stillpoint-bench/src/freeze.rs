//! `bench freeze`: freeze latency, thaw latency and the stall a writer inside the guest sees
//! during a freeze → thaw round trip, over many rounds, idle and with a writer.
//!
//! It boots the demo guest (TCG unless `STILLPOINT_ACCEL=kvm`), talks to the real qemu-ga,
//! and measures the stall from inside the guest: a shell loop appends to `/data` and reports
//! each append's duration in guest nanoseconds on the serial console, which stays readable
//! while the guest is frozen.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use stillpoint_testvm::{LaunchOptions, LaunchedVm, VmConfig, WriterSample, wait_until};

use crate::Progress;
use crate::stats::Stat;

/// What `bench freeze` runs.
#[derive(Debug, Clone)]
pub struct FreezeBench {
    /// Freeze → thaw rounds per phase.
    pub rounds: usize,
    /// Pause between rounds (lets the writer dirty some data again).
    pub gap: Duration,
}

/// Both phases, idle and with the writer. Its JSON is the list of phases; `Display` is the
/// human table.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct FreezeReport {
    phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
struct Phase {
    name: &'static str,
    rounds: usize,
    freeze: Stat,
    thaw: Stat,
    /// The longest append the guest writer saw in each round (writer phase only).
    writer_stall: Option<Stat>,
    /// The writer's append time outside the rounds (writer phase only).
    writer_baseline: Option<Stat>,
}

/// Runs the benchmark; `progress` hears when the guest boots.
pub async fn run(args: &FreezeBench, progress: &dyn Progress) -> anyhow::Result<FreezeReport> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let root = tempfile::Builder::new()
        .prefix("stillpoint-bench-")
        .tempdir()?;
    progress.line("Booting the demo guest (TCG)…");
    let vm = LaunchedVm::launch(
        VmConfig::new("bench-freeze"),
        &LaunchOptions::attached(root.path()),
    )
    .await
    .context("cannot launch the benchmark VM")?;
    vm.wait_until_ready(stillpoint_testvm::BOOT_TIMEOUT).await?;
    let socket = vm
        .qga_socket()
        .context("the benchmark VM has no agent")?
        .to_path_buf();

    let mut agent = stillpoint_qga::connect_unix(&socket, Duration::from_secs(5)).await?;
    let idle = rounds(&mut agent, args, None).await?;
    drop(agent); // the writer is started over the agent channel, which takes one client at a time
    vm.start_stall_writer("/data/stall").await?;
    let baseline_from = vm.writer_samples().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline: Vec<Duration> = vm.writer_samples()[baseline_from..]
        .iter()
        .map(WriterSample::latency)
        .collect();
    let mut agent = stillpoint_qga::connect_unix(&socket, Duration::from_secs(5)).await?;
    let mut writer = rounds(&mut agent, args, Some(&vm)).await?;
    writer.writer_baseline = Some(Stat::of(&baseline));
    drop(agent);
    vm.stop().await?;

    Ok(FreezeReport {
        phases: vec![idle, writer],
    })
}

async fn rounds(
    agent: &mut stillpoint_qga::Client<tokio::net::UnixStream>,
    args: &FreezeBench,
    writer: Option<&LaunchedVm>,
) -> anyhow::Result<Phase> {
    let (mut freeze, mut thaw, mut stall) = (vec![], vec![], vec![]);
    for _ in 0..args.rounds {
        tokio::time::sleep(args.gap).await;
        let before = writer.map(|vm| vm.writer_samples().last().map_or(0, |s| s.seq));
        let started = Instant::now();
        agent.fsfreeze_freeze().await.context("freeze")?;
        let frozen_at = Instant::now();
        // Thaw on every path: a failed measurement must not leave the guest frozen.
        let thawed = agent.fsfreeze_thaw().await;
        let thawed_at = Instant::now();
        thawed.context("thaw")?;
        freeze.push(frozen_at - started);
        thaw.push(thawed_at - frozen_at);
        if let (Some(vm), Some(before)) = (writer, before) {
            // The round's stall: the longest append among those that completed after the
            // freeze began, once two more appends show the writer runs freely again.
            let resumed = wait_until(Duration::from_secs(30), || async {
                vm.writer_samples()
                    .last()
                    .is_some_and(|s| s.seq >= before + 2)
            })
            .await;
            anyhow::ensure!(resumed, "the guest writer did not resume after a thaw");
            let longest = vm.longest_writer_latency_since(before);
            stall.push(longest);
        }
    }
    Ok(Phase {
        name: if writer.is_some() {
            "with writer"
        } else {
            "idle"
        },
        rounds: args.rounds,
        freeze: Stat::of(&freeze),
        thaw: Stat::of(&thaw),
        writer_stall: writer.map(|_| Stat::of(&stall)),
        writer_baseline: None,
    })
}

impl fmt::Display for FreezeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phases = &self.phases;
        writeln!(
            f,
            "Freeze benchmark: real qemu-ga in the demo guest, {} rounds per phase",
            phases[0].rounds
        )?;
        writeln!(
            f,
            "{:<14} {:>22} {:>22} {:>24}",
            "phase", "freeze median/max", "thaw median/max", "writer stall median/max"
        )?;
        for phase in phases {
            let cell = |stat: &Stat| format!("{:.1} / {:.1} ms", stat.median_ms, stat.max_ms);
            writeln!(
                f,
                "{:<14} {:>22} {:>22} {:>24}",
                phase.name,
                cell(&phase.freeze),
                cell(&phase.thaw),
                phase
                    .writer_stall
                    .as_ref()
                    .map(cell)
                    .unwrap_or_else(|| "-".into())
            )?;
            if let Some(baseline) = &phase.writer_baseline {
                writeln!(
                    f,
                    "{:<14} a write outside the rounds takes {}",
                    "",
                    cell(baseline)
                )?;
            }
        }
        Ok(())
    }
}
