//! The client against the real qemu-ga 7.2 in a real QEMU guest (TCG), launched by
//! `stillpoint-testvm`. Each test boots its own VM in a temporary runtime root; a VM that
//! cannot boot fails the test with its console tail.
#![cfg(feature = "vm-tests")]

use std::time::Duration;

use stillpoint_qga::{
    Client, DisabledReason, ErrorKind, ExecRequest, FreezeStatus, connect_unix, measure_freeze_thaw,
};
use stillpoint_testvm::{LaunchedVm, VmConfig};
use tokio::net::UnixStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const EXEC_LIMIT: Duration = Duration::from_secs(20);

/// The error and its sources, one per line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    text
}

/// Boots `config` and connects a client to its agent; panics (fails the test) if it cannot.
async fn boot(config: VmConfig) -> (LaunchedVm, Client<UnixStream>) {
    let name = config.name.clone();
    let vm = LaunchedVm::boot_for_test(config)
        .await
        .unwrap_or_else(|e| panic!("test VM {name} did not boot: {}", chain(&e)));
    let client = connect(&vm).await;
    (vm, client)
}

async fn connect(vm: &LaunchedVm) -> Client<UnixStream> {
    let socket = vm.qga_socket().expect("the VM has an agent");
    connect_unix(socket, CONNECT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}'s agent: {}", vm.name(), chain(&e)))
        .with_label(vm.name())
}

async fn run(client: &mut Client<UnixStream>, request: ExecRequest) -> stillpoint_qga::ExecStatus {
    let what = format!("{} {:?}", request.path, request.args);
    client
        .run(&request, EXEC_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("guest command {what} failed: {}", chain(&e)))
}

#[tokio::test]
async fn queries_ping_info_osinfo_fsinfo() {
    let (_vm, mut client) = boot(VmConfig::new("qga-queries")).await;
    client.ping().await.unwrap();

    let info = client.info().await.unwrap();
    assert!(
        info.version.starts_with("7.2"),
        "agent version {}",
        info.version
    );
    for command in [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-freeze-list",
        "guest-fsfreeze-thaw",
        "guest-fsfreeze-status",
        "guest-exec",
        "guest-exec-status",
    ] {
        assert!(
            info.is_enabled(command),
            "{command} is not enabled: {info:?}"
        );
    }

    let os = client.get_osinfo().await.unwrap();
    assert_eq!(
        os.kernel_release.as_deref().map(|r| r.contains("cloud")),
        Some(true),
        "{os:?}"
    );
    assert_eq!(os.machine.as_deref(), Some("x86_64"));

    let filesystems = client.get_fsinfo().await.unwrap();
    let data = filesystems
        .iter()
        .find(|fs| fs.mountpoint == "/data")
        .unwrap_or_else(|| panic!("no /data in {filesystems:?}"));
    assert_eq!(data.fs_type, "ext4");
    assert!(data.total_bytes.unwrap() > data.used_bytes.unwrap());
    let disk = &data.disks[0];
    assert_eq!(disk.bus_type, "virtio");
    // qemu-ga 7.2 reads the serial from the udev database, which the test guest (no udev)
    // does not have, so `serial` is absent here; the PCI address locates the disk instead.
    assert!(disk.pci_controller.is_some(), "{disk:?}");
    assert!(
        disk.dev
            .as_deref()
            .is_some_and(|d| d.starts_with("/dev/vd")),
        "{disk:?}"
    );
}

#[tokio::test]
async fn freeze_status_thaw_and_what_a_frozen_agent_refuses() {
    let (_vm, mut client) = boot(VmConfig::new("qga-freeze")).await;
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );

    let frozen = client.fsfreeze_freeze().await.unwrap();
    assert!(frozen >= 1, "froze {frozen} filesystems");
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Frozen
    );

    // While frozen the agent refuses guest-exec, and says why; ping and info still work.
    let err = client
        .exec(&ExecRequest::new("true", Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(err.is_frozen_refusal(), "{}", chain(&err));
    assert_eq!(err.command(), Some("guest-exec"));
    assert_eq!(err.agent(), Some("qga-freeze"));
    client.ping().await.unwrap();
    assert!(!client.info().await.unwrap().is_enabled("guest-exec"));

    assert_eq!(client.fsfreeze_thaw().await.unwrap(), frozen);
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
    assert!(
        run(&mut client, ExecRequest::new("true", Vec::<String>::new()))
            .await
            .success()
    );

    // Only /data, by mount point.
    assert_eq!(client.fsfreeze_freeze_list(&["/data"]).await.unwrap(), 1);
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Frozen
    );
    assert_eq!(client.fsfreeze_thaw().await.unwrap(), 1);

    // The measuring helper: every round freezes and thaws the same filesystems.
    let rounds = measure_freeze_thaw(&mut client, 3).await.unwrap();
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r.frozen == frozen), "{rounds:?}");
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
}

#[tokio::test]
async fn exec_captures_output_exit_code_signal_stdin_and_env() {
    let (_vm, mut client) = boot(VmConfig::new("qga-exec")).await;

    let status = run(
        &mut client,
        ExecRequest::new("sh", ["-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(status.stdout_text(), "out\n");
    assert_eq!(status.stderr_text(), "err\n");
    assert_eq!(status.exit_code, Some(3));
    assert!(!status.success());
    assert!(!status.stdout_truncated && !status.stderr_truncated);

    let input = b"line one\n\x00binary\xfftail".to_vec();
    let status = run(
        &mut client,
        ExecRequest::new("cat", Vec::<String>::new()).stdin(input.clone()),
    )
    .await;
    assert_eq!(status.stdout, input);
    assert!(status.success());

    let status = run(
        &mut client,
        ExecRequest::new("sh", ["-c", "echo \"$GREETING from $0\""]).env("GREETING", "hello"),
    )
    .await;
    assert_eq!(status.stdout_text(), "hello from sh\n");

    let status = run(&mut client, ExecRequest::new("sh", ["-c", "kill -TERM $$"])).await;
    assert_eq!(status.signal, Some(15), "{status:?}");

    let err = client
        .exec(&ExecRequest::new("/no/such/program", Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Agent { class, desc } if class == "GenericError" && desc.contains("/no/such/program")),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn guest_command_that_outlives_its_limit_is_killed_in_the_guest() {
    let (_vm, mut client) = boot(VmConfig::new("qga-kill")).await;
    let err = client
        .run(&ExecRequest::new("sleep", ["600"]), Duration::from_secs(2))
        .await
        .unwrap_err();
    let ErrorKind::GuestProcessTimedOut {
        pid, killed, path, ..
    } = err.kind().clone()
    else {
        panic!("expected GuestProcessTimedOut, got {}", chain(&err));
    };
    assert_eq!(path, "sleep");
    assert!(killed, "{}", chain(&err));

    // Gone from the guest's process table, and reaped: the agent no longer knows the PID.
    let probe = format!("/proc/{pid}");
    let status = run(
        &mut client,
        ExecRequest::new("test", ["-e", probe.as_str()]),
    )
    .await;
    assert_eq!(status.exit_code, Some(1), "{probe} still exists");
    let err = client.exec_status(pid).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Agent { .. }),
        "{}",
        chain(&err)
    );
    let status = run(
        &mut client,
        ExecRequest::new("sh", ["-c", "ps | grep -c '[s]leep 600'"]),
    )
    .await;
    assert_eq!(status.stdout_text().trim(), "0");
}

#[tokio::test]
async fn freeze_blocked_by_agent_policy_is_command_disabled() {
    let config = VmConfig::new("qga-blocked")
        .with_qga_arg("--block-rpcs")
        .with_qga_arg("guest-fsfreeze-freeze");
    let (_vm, mut client) = boot(config).await;
    let info = client.info().await.unwrap();
    assert!(!info.is_enabled("guest-fsfreeze-freeze"));

    let err = client.fsfreeze_freeze().await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Policy { .. }
            }
        ),
        "{}",
        chain(&err)
    );
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
}

#[tokio::test]
async fn freeze_timeout_leaves_the_client_usable_with_the_real_agent() {
    // A hook that makes the freeze take ~3 s; the client gives up after 1 s. The agent's late
    // reply ("1") must be discarded by the resync, not read as the next command's reply.
    let hook = "#!/bin/sh\n[ \"$1\" = freeze ] && sleep 3\nexit 0\n";
    let (_vm, mut client) = boot(VmConfig::new("qga-slowhook").with_fsfreeze_hook(hook)).await;
    client.timeouts_mut().freeze = Duration::from_secs(1);
    let err = client.fsfreeze_freeze().await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Timeout { .. }),
        "{}",
        chain(&err)
    );
    assert!(!client.is_synchronised());

    // The sync waits until the agent has finished the freeze, then the status is current.
    client.timeouts_mut().sync = Duration::from_secs(10);
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Frozen
    );
    assert_eq!(client.fsfreeze_thaw().await.unwrap(), 1);
    assert_eq!(
        client.fsfreeze_status().await.unwrap(),
        FreezeStatus::Thawed
    );
}

#[tokio::test]
async fn second_client_is_told_the_agent_is_busy() {
    let (vm, mut first) = boot(VmConfig::new("qga-busy")).await;
    let socket = vm.qga_socket().unwrap().to_owned();
    first.ping().await.unwrap();

    let err = connect_unix(&socket, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::NotAnswering { .. }),
        "{}",
        chain(&err)
    );
    assert!(err.to_string().contains("busy"));

    drop(first);
    let mut next = connect(&vm).await;
    next.ping().await.unwrap();
}
