//! `stillpoint freeze`, `unfreeze` and `check` against real guests (TCG): the guarded freeze
//! really blocks a writer in the guest, the guardian thaws after the freezer dies, and the
//! level `check` reports matches what the agent allows.
#![cfg(feature = "vm-tests")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use stillpoint_qga::FreezeStatus;
use stillpoint_testvm::{LaunchedVm, VmConfig, wait_until};
use support::{stillpoint_command, text};

/// A guest shell loop that appends to /data (frozen by a freeze) and reports each completed
/// write on the console (not frozen), so the host can watch it while the guest is frozen.
const WRITER: &str = "i=0; while :; do i=$((i+1)); echo $i >> /data/ticks; \
                      echo \"stillpoint-writer $i\" > /dev/console; sleep 0.05; done";

fn stillpoint(runtime_root: &Path, args: &[&str]) -> Output {
    stillpoint_command()
        .args(args)
        .env("STILLPOINT_RUNTIME_DIR", runtime_root)
        .current_dir(runtime_root)
        .output()
        .expect("the stillpoint binary runs")
}

fn runtime_root(vm: &LaunchedVm) -> PathBuf {
    vm.runtime_root().to_path_buf()
}

/// Asks the agent for its freeze status on a fresh connection, then lets go of the channel
/// (it takes one client at a time). `None` while the agent is busy (e.g. a hook runs).
async fn freeze_status(vm: &LaunchedVm) -> Option<FreezeStatus> {
    let socket = vm.qga_socket()?;
    let mut client = stillpoint_qga::connect_unix(socket, Duration::from_secs(2))
        .await
        .ok()?;
    client.fsfreeze_status().await.ok()
}

async fn wait_for_status(vm: &LaunchedVm, want: FreezeStatus, limit: Duration) -> bool {
    wait_until(limit, || async { freeze_status(vm).await == Some(want) }).await
}

/// The highest write number the guest writer reported on the console.
fn writer_progress(vm: &LaunchedVm) -> u64 {
    vm.console_text()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("stillpoint-writer "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

async fn start_writer(vm: &LaunchedVm) {
    let socket = vm.qga_socket().expect("agent on");
    let mut client = stillpoint_qga::connect_unix(socket, Duration::from_secs(5))
        .await
        .unwrap();
    client
        .exec(&stillpoint_qga::ExecRequest::new("sh", ["-c", WRITER]))
        .await
        .unwrap();
    drop(client);
    let started = wait_until(Duration::from_secs(30), || async {
        writer_progress(vm) >= 3
    })
    .await;
    assert!(
        started,
        "the guest writer did not start:\n{}",
        vm.console_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn freeze_blocks_a_guest_writer_and_unfreeze_releases_it() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-writer"))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    start_writer(&vm).await;

    let frozen = stillpoint(&root, &["freeze", "--name", "freeze-writer"]);
    assert!(frozen.status.success(), "{}", text(&frozen));
    assert!(
        String::from_utf8_lossy(&frozen.stdout).contains("Froze 1 filesystem"),
        "{}",
        text(&frozen)
    );
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Frozen));

    // While frozen, at most the write that was in flight completes.
    let at_freeze = writer_progress(&vm);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let while_frozen = writer_progress(&vm);
    assert!(
        while_frozen <= at_freeze + 1,
        "the writer made progress while frozen: {at_freeze} -> {while_frozen}"
    );

    // Freezing again does not stack.
    let again = stillpoint(&root, &["freeze", "--name", "freeze-writer"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already frozen"),
        "{}",
        text(&again)
    );

    let thawed = stillpoint(&root, &["unfreeze", "--name", "freeze-writer"]);
    assert!(thawed.status.success(), "{}", text(&thawed));
    assert!(
        String::from_utf8_lossy(&thawed.stdout).contains("Thawed 1 filesystem"),
        "{}",
        text(&thawed)
    );
    let resumed = wait_until(Duration::from_secs(30), || async {
        writer_progress(&vm) > while_frozen + 2
    })
    .await;
    assert!(
        resumed,
        "the writer did not resume after the thaw:\n{}",
        vm.console_tail(10)
    );
    // The lease is gone with the unfreeze, so no guardian acts later.
    assert!(!root.join("leases/freeze-writer.json").exists());

    // Unfreezing a thawed guest succeeds.
    let twice = stillpoint(&root, &["unfreeze", "--name", "freeze-writer", "--json"]);
    assert!(twice.status.success(), "{}", text(&twice));
    let json: serde_json::Value = serde_json::from_slice(&twice.stdout).unwrap();
    assert_eq!(json["result"]["outcome"], "was-not-frozen");
}

#[tokio::test(flavor = "multi_thread")]
async fn guardian_thaws_when_the_freezer_is_killed_inside_the_freeze_call() {
    // A slow freeze hook keeps the freezer inside the freeze call long enough to SIGKILL it
    // there: the guest ends up frozen with nobody left to thaw it but the guardian.
    // It says on the console when it runs, so the test kills inside the call, not after a
    // guess at how long the freezer takes to get there.
    let hook = "#!/bin/sh\n[ \"$1\" = freeze ] && { echo stillpoint-test-freeze-hook-running \
                > /dev/console; sleep 2; }\nexit 0\n";
    let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-killed").with_fsfreeze_hook(hook))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let mut freezer = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args([
            "freeze",
            "--name",
            "freeze-killed",
            "--unfreezeTimeoutSeconds",
            "4",
        ])
        .env("STILLPOINT_RUNTIME_DIR", &root)
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lease = root.join("leases/freeze-killed.json");
    assert!(
        wait_until(Duration::from_secs(20), || async { lease.exists() }).await,
        "a lease before the freeze"
    );
    vm.wait_for_console(
        "stillpoint-test-freeze-hook-running",
        Duration::from_secs(30),
    )
    .await
    .expect("the freeze call reaches the guest's hook");
    freezer.kill().unwrap(); // SIGKILL, inside the freeze call (the hook sleeps 2 s)
    freezer.wait().unwrap();

    // The freezer died before it could report the freeze: the guardian thaws as soon as the
    // agent answers again (after the hook), long before the unfreeze timeout. That it thawed
    // one filesystem shows the freeze the killed freezer asked for did take effect (the
    // frozen state itself may last only until the guardian gets the agent, too short to poll).
    let guardian_log = root.join("leases/freeze-killed.guardian.log");
    let read_log = || std::fs::read_to_string(&guardian_log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(90), || async {
            read_log().contains("thawed")
        })
        .await,
        "the guardian did not thaw the guest; its log:\n{}",
        read_log()
    );
    assert!(
        wait_for_status(&vm, FreezeStatus::Thawed, Duration::from_secs(30)).await,
        "the guest is thawed"
    );
    let log = read_log();
    assert!(log.contains("thawed 1 filesystem"), "{log}");
    assert!(
        log.contains("the process that froze the guest died"),
        "{log}"
    );
    assert!(!lease.exists(), "the guardian removes its lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn guardian_thaws_when_the_unfreeze_timeout_passes() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-timer"))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let frozen = stillpoint(
        &root,
        &[
            "freeze",
            "--name",
            "freeze-timer",
            "--unfreezeTimeoutSeconds",
            "3",
        ],
    );
    assert!(frozen.status.success(), "{}", text(&frozen));
    // The freezer has exited; only the guardian is left.
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Frozen));
    assert!(
        wait_for_status(&vm, FreezeStatus::Thawed, Duration::from_secs(60)).await,
        "the guardian did not thaw after the timeout; its log:\n{}",
        std::fs::read_to_string(root.join("leases/freeze-timer.guardian.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(root.join("leases/freeze-timer.guardian.log")).unwrap();
    assert!(log.contains("the unfreeze timeout passed"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_unfreeze_timeout_stays_frozen_until_unfreeze() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-forever"))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let frozen = stillpoint(
        &root,
        &[
            "freeze",
            "--name",
            "freeze-forever",
            "--unfreezeTimeoutSeconds",
            "0",
        ],
    );
    assert!(frozen.status.success(), "{}", text(&frozen));
    assert!(
        String::from_utf8_lossy(&frozen.stdout).contains("No automatic thaw"),
        "{}",
        text(&frozen)
    );
    // Longer than any guardian would wait for a short timeout: still frozen.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Frozen));
    let thawed = stillpoint(&root, &["unfreeze", "--name", "freeze-forever"]);
    assert!(thawed.status.success(), "{}", text(&thawed));
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Thawed));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_agent_channel_freeze_exits_zero_and_check_says_crash_only() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("no-agent").without_agent())
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let frozen = stillpoint(&root, &["freeze", "--name", "no-agent"]);
    assert!(frozen.status.success(), "{}", text(&frozen));
    assert!(
        String::from_utf8_lossy(&frozen.stdout).contains("No guest agent"),
        "{}",
        text(&frozen)
    );

    let check = stillpoint(&root, &["check", "no-agent", "--json"]);
    assert!(check.status.success(), "{}", text(&check));
    let json: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(json["achievable"], "crash");
    assert_eq!(json["indication"], "NoGuestAgent");
    assert_eq!(json["agent"]["state"], "no-channel");
    let reasons = json["levels"][1]["reasons"].to_string();
    assert!(reasons.contains("no guest agent channel"), "{reasons}");
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_freeze_rpc_is_a_clear_error_and_check_reports_it() {
    let config = VmConfig::new("freeze-blocked")
        .with_qga_arg("--block-rpcs")
        .with_qga_arg("guest-fsfreeze-freeze");
    let vm = LaunchedVm::boot_for_test(config).await.unwrap();
    let root = runtime_root(&vm);
    let frozen = stillpoint(&root, &["freeze", "--name", "freeze-blocked"]);
    assert_eq!(frozen.status.code(), Some(1), "{}", text(&frozen));
    let stderr = String::from_utf8_lossy(&frozen.stderr);
    assert!(stderr.contains("disabled"), "{}", text(&frozen));
    assert!(stderr.contains("freeze-blocked"), "{}", text(&frozen));
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Thawed));
    assert!(
        !root.join("leases/freeze-blocked.json").exists(),
        "no lease is left behind"
    );

    let check = stillpoint(&root, &["check", "freeze-blocked"]);
    assert!(check.status.success(), "{}", text(&check));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(stdout.contains("freeze DISABLED"), "{stdout}");
    assert!(stdout.contains("Achievable consistency: crash"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_freeze_hook_times_out_and_nothing_stays_frozen() {
    let hook = "#!/bin/sh\n[ \"$1\" = freeze ] && sleep 8\nexit 0\n";
    let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-hang").with_fsfreeze_hook(hook))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let frozen = stillpoint(
        &root,
        &[
            "freeze",
            "--name",
            "freeze-hang",
            "--freezeTimeoutSeconds",
            "2",
        ],
    );
    assert_eq!(frozen.status.code(), Some(1), "{}", text(&frozen));
    let stderr = String::from_utf8_lossy(&frozen.stderr);
    assert!(
        stderr.contains("did not complete within 2 s"),
        "{}",
        text(&frozen)
    );
    assert!(stderr.contains("guardian thaws"), "{}", text(&frozen));
    // Once the hook returns, the agent freezes — and the guardian thaws right after.
    assert!(
        wait_for_status(&vm, FreezeStatus::Thawed, Duration::from_secs(60)).await
            && wait_until(Duration::from_secs(30), || async {
                !root.join("leases/freeze-hang.json").exists()
            })
            .await,
        "the guest was left frozen; guardian log:\n{}",
        std::fs::read_to_string(root.join("leases/freeze-hang.guardian.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(root.join("leases/freeze-hang.guardian.log")).unwrap();
    assert!(log.contains("the freeze call timed out"), "{log}");
    assert_eq!(freeze_status(&vm).await, Some(FreezeStatus::Thawed));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_healthy_guest() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("check-ok"))
        .await
        .unwrap();
    let root = runtime_root(&vm);
    let check = stillpoint(&root, &["check", "check-ok", "--json"]);
    assert!(check.status.success(), "{}", text(&check));
    let json: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["achievable"], "filesystem");
    assert_eq!(json["agent"]["state"], "reachable");
    assert_eq!(json["agent"]["exec_enabled"], true);
    let covered = json["agent"]["covered_filesystems"].as_array().unwrap();
    assert!(
        covered
            .iter()
            .any(|fs| fs["mountpoint"] == "/data" && fs["fs_type"] == "ext4"),
        "{covered:?}"
    );
    assert_eq!(
        json["agent"]["uncovered_filesystems"],
        serde_json::json!([])
    );
    assert_eq!(json["agent"]["selinux"], "disabled");
    let kernel = json["agent"]["os"]["kernel_release"]
        .as_str()
        .unwrap_or_default();
    assert!(
        kernel.starts_with("6."),
        "the guest's kernel release: {kernel:?}"
    );
    let application = json["levels"][2]["reasons"].to_string();
    assert!(application.contains("no recipe"), "{application}");
}
