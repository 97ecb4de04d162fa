//! `stillpoint bench freeze`: freeze latency, thaw latency and the stall a writer inside the
//! guest sees during a freeze → thaw round trip, over many rounds, idle and with a writer.
//!
//! It boots the demo guest (TCG unless `STILLPOINT_ACCEL=kvm`), talks to the real qemu-ga,
//! and measures the stall from inside the guest: a shell loop appends to `/data` and reports
//! each append's duration in guest nanoseconds on the serial console, which stays readable
//! while the guest is frozen.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use stillpoint_qga::LatencySummary;
use stillpoint_testvm::{LaunchOptions, LaunchedVm, VmConfig, WriterSample, wait_until};

use crate::context::Context;
use crate::output::{EXIT_OK, print_json};

#[derive(Debug, Args)]
pub struct FreezeBenchArgs {
    /// Freeze → thaw rounds per phase.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Pause between rounds, in milliseconds (lets the writer dirty some data again).
    #[arg(long, default_value_t = 300)]
    pub gap_ms: u64,
}

/// Median and max of one measured quantity, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Stat {
    pub fn of(samples: &[Duration]) -> Self {
        match LatencySummary::of(samples) {
            Some(summary) => Self {
                median_ms: ms(summary.median),
                max_ms: ms(summary.max),
            },
            None => Self {
                median_ms: f64::NAN,
                max_ms: f64::NAN,
            },
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
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

pub async fn run(ctx: &Context, args: FreezeBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let root = tempfile::Builder::new()
        .prefix("stillpoint-bench-")
        .tempdir()?;
    if !ctx.global.json {
        eprintln!("Booting the demo guest (TCG)…");
    }
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
    let idle = rounds(&mut agent, &args, None).await?;
    drop(agent); // the writer is started over the agent channel, which takes one client at a time
    vm.start_stall_writer("/data/stall").await?;
    let baseline_from = vm.writer_samples().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline: Vec<Duration> = vm.writer_samples()[baseline_from..]
        .iter()
        .map(WriterSample::latency)
        .collect();
    let mut agent = stillpoint_qga::connect_unix(&socket, Duration::from_secs(5)).await?;
    let mut writer = rounds(&mut agent, &args, Some(&vm)).await?;
    writer.writer_baseline = Some(Stat::of(&baseline));
    drop(agent);
    vm.stop().await?;

    let phases = [idle, writer];
    if ctx.global.json {
        print_json(&phases)?;
    } else {
        print_table(&phases);
    }
    Ok(ExitCode::from(EXIT_OK))
}

async fn rounds(
    agent: &mut stillpoint_qga::Client<tokio::net::UnixStream>,
    args: &FreezeBenchArgs,
    writer: Option<&LaunchedVm>,
) -> anyhow::Result<Phase> {
    let (mut freeze, mut thaw, mut stall) = (vec![], vec![], vec![]);
    for _ in 0..args.rounds {
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
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
            let longest = vm
                .writer_samples()
                .iter()
                .filter(|s| s.seq > before)
                .map(WriterSample::latency)
                .max()
                .unwrap_or_default();
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

fn print_table(phases: &[Phase]) {
    println!(
        "Freeze benchmark: real qemu-ga in the demo guest, {} rounds per phase",
        phases[0].rounds
    );
    println!(
        "{:<14} {:>22} {:>22} {:>24}",
        "phase", "freeze median/max", "thaw median/max", "writer stall median/max"
    );
    for phase in phases {
        let cell = |stat: &Stat| format!("{:.1} / {:.1} ms", stat.median_ms, stat.max_ms);
        println!(
            "{:<14} {:>22} {:>22} {:>24}",
            phase.name,
            cell(&phase.freeze),
            cell(&phase.thaw),
            phase
                .writer_stall
                .as_ref()
                .map(cell)
                .unwrap_or_else(|| "-".into())
        );
        if let Some(baseline) = &phase.writer_baseline {
            println!(
                "{:<14} a write outside the rounds takes {}",
                "",
                cell(baseline)
            );
        }
    }
}
