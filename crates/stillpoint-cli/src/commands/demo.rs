//! `stillpoint demo`: the embedded default. Boots the demo VM (the test guest with the real
//! qemu-ga), checks which consistency it can reach, runs a writer in it, takes a guarded
//! freeze → thaw round trip and shows what the writer saw, then stops the VM.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use stillpoint_engine::consistency::{self, Assessment};
use stillpoint_engine::freeze::{FreezeWindow, GuardContext, GuardedFreeze};
use stillpoint_engine::guardian::GuardianCommand;
use stillpoint_engine::preflight;
use stillpoint_platform::Platforms;
use stillpoint_platform::qemu::QemuInventory;
use stillpoint_testvm::{LaunchOptions, LaunchedVm, VmConfig, WriterSample};

use crate::context::Context;
use crate::output::{EXIT_ERROR, EXIT_OK, print_json};

const DEMO_VM: &str = "demo";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's runtime directory (VM sockets, guardian logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    vm: String,
    assessment: Assessment,
    freeze: FreezeWindow,
    /// The longest append the guest writer saw across the freeze.
    writer_stall_ms: f64,
    /// Appends the writer completed while the guest was frozen (at most the one in flight).
    writes_while_frozen: u64,
    left_frozen: bool,
}

pub async fn run(ctx: &Context, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let say = |line: &str| {
        if !ctx.global.json {
            println!("{line}");
        }
    };
    let root = tempfile::Builder::new()
        .prefix("stillpoint-demo-")
        .tempdir()?;
    say("▶ Building (or reusing) the demo guest and booting it under QEMU…");
    let vm = LaunchedVm::launch(
        VmConfig::new(DEMO_VM),
        &LaunchOptions::attached(root.path()),
    )
    .await
    .context("cannot launch the demo VM")?;
    vm.wait_until_ready(stillpoint_testvm::BOOT_TIMEOUT).await?;
    say(&format!(
        "  VM `{DEMO_VM}` runs: QMP {}, agent {}",
        vm.qmp_socket().display(),
        vm.qga_socket()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    ));

    let platforms = Platforms::new(QemuInventory::new(vec![], root.path().to_path_buf()));
    let handle = platforms.resolve(DEMO_VM)?;

    say("▶ stillpoint check demo");
    let facts = preflight::gather(handle.as_ref(), None).await?;
    let assessment = consistency::assess(&facts.facts);
    say(&format!(
        "  achievable consistency: {}",
        assessment.achievable
    ));
    for verdict in &assessment.levels {
        say(&format!(
            "    {:<12} {}",
            verdict.level.as_str(),
            if verdict.achievable {
                "yes".to_string()
            } else {
                format!("no: {}", verdict.reasons.join("; "))
            }
        ));
    }

    say("▶ Starting a writer in the guest (appends to /data, reports each append on the console)…");
    vm.start_stall_writer("/data/demo-writer").await?;
    let before = vm.writer_samples().last().map_or(0, |s| s.seq);

    say("▶ Guarded freeze → thaw (a guardian process would thaw the guest if this one died)…");
    let guard = GuardContext {
        runtime_root: root.path().to_path_buf(),
        config: None,
        guardian: GuardianCommand::current_exe()?,
    };
    let agent = handle.agent().context("the demo VM has no agent")?;
    let frozen = GuardedFreeze::freeze(
        handle.as_ref(),
        agent.clone(),
        &guard,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .await?;
    let at_freeze = vm.writer_samples().last().map_or(0, |s| s.seq);
    tokio::time::sleep(Duration::from_millis(500)).await; // a visible window for the demo
    let during = vm.writer_samples().last().map_or(0, |s| s.seq);
    let (window, thawed) = frozen.thaw().await;
    thawed?;
    let resumed = stillpoint_testvm::wait_until(Duration::from_secs(30), || async {
        vm.writer_samples()
            .last()
            .is_some_and(|s| s.seq >= during + 2)
    })
    .await;
    anyhow::ensure!(resumed, "the guest writer did not resume after the thaw");
    let stall = vm
        .writer_samples()
        .iter()
        .filter(|s| s.seq > before)
        .map(WriterSample::latency)
        .max()
        .unwrap_or_default();
    let left_frozen = agent.freeze_status().await? == stillpoint_qga::FreezeStatus::Frozen;
    agent.release().await;

    let report = DemoReport {
        vm: DEMO_VM.into(),
        assessment,
        freeze: window,
        writer_stall_ms: stall.as_secs_f64() * 1000.0,
        writes_while_frozen: during.saturating_sub(at_freeze),
        left_frozen,
    };
    vm.stop().await?;
    if args.keep {
        let kept = root.keep();
        say(&format!("  runtime directory kept at {}", kept.display()));
    }

    if ctx.global.json {
        print_json(&report)?;
    } else {
        println!("▶ Report");
        println!(
            "  froze {} filesystem(s): freeze call {:.1} ms, thaw call {:.1} ms, frozen {:.1} ms (incl. the demo's 500 ms pause)",
            report.freeze.filesystems,
            report.freeze.freeze_ms,
            report.freeze.thaw_ms,
            report.freeze.frozen_ms
        );
        println!(
            "  the writer completed {} append(s) while frozen (at most the one in flight) and stalled at most {:.1} ms",
            report.writes_while_frozen, report.writer_stall_ms
        );
        println!(
            "  guest left frozen: {}",
            if report.left_frozen {
                "YES (bug)"
            } else {
                "no"
            }
        );
        println!(
            "  (backup, restore and the application level join this demo with the next issues)"
        );
    }
    let ok = !report.left_frozen && report.writes_while_frozen <= 1;
    Ok(ExitCode::from(if ok { EXIT_OK } else { EXIT_ERROR }))
}
