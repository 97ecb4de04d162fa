//! Real VMs under real QEMU with the real qemu-ga: the launcher and the guest it builds.
//! Each test boots its own VM(s) in a temporary runtime root; a VM that cannot boot fails the
//! test with its console tail.
#![cfg(feature = "vm-tests")]

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use stillpoint_testvm::{LaunchedVm, VmConfig, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `guest-sync-delimited` then `guest-ping`, by hand over the socket, as the lab describes.
async fn raw_ping(socket: &Path) -> Value {
    let stream = UnixStream::connect(socket)
        .await
        .expect("connect to qga.sock");
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer
        .write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}\n")
        .await
        .expect("write sync");
    loop {
        let mut skipped = Vec::new();
        reader
            .read_until(0xFF, &mut skipped)
            .await
            .expect("read to 0xff");
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("sync answer");
        if serde_json::from_str::<Value>(&line).expect("json") == json!({"return": 4242}) {
            break;
        }
    }
    writer
        .write_all(b"{\"execute\":\"guest-ping\"}\n")
        .await
        .expect("write ping");
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("ping answer");
    serde_json::from_str(&line).expect("ping json")
}

fn mounts_of(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((
                fields.next()?.to_owned(),
                fields.next()?.to_owned(),
                fields.next()?.to_owned(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn guest_boots_and_the_real_agent_answers_ping() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("ping"))
        .await
        .expect("boot");
    let reply = raw_ping(vm.qga_socket().expect("agent socket")).await;
    assert_eq!(reply, json!({"return": {}}));
    let info = vm
        .agent_command("guest-info", None, AGENT_TIMEOUT)
        .await
        .expect("guest-info");
    assert!(
        info["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.2")),
        "{info}"
    );
    let record = vm.record();
    assert!(record.qmp_socket.is_absolute() && record.qmp_socket.exists());
    assert_eq!(record.disks.len(), 1);
    assert_eq!(
        (
            record.disks[0].device_id.as_str(),
            record.disks[0].node_name.as_str()
        ),
        ("vd0", "disk0")
    );
    assert_eq!(record.disks[0].virtual_size, 256 << 20);
    // The record on disk is the contract the platform driver reads.
    let on_disk = stillpoint_testvm::VmRecord::read(vm.dir()).expect("vm.json");
    assert_eq!(&on_disk, record);
}

#[tokio::test]
async fn data_disks_are_mounted_as_ext4_in_order() {
    let config = VmConfig::new("disks").with_disks(3, 64 << 20);
    let vm = LaunchedVm::boot_for_test(config).await.expect("boot");
    let out = vm
        .guest_exec(&["cat", "/proc/mounts"], AGENT_TIMEOUT)
        .await
        .expect("cat /proc/mounts");
    assert_eq!(out.exit_code, Some(0));
    let mounts = mounts_of(&out.stdout_text());
    for (point, device) in [
        ("/data", "/dev/vda"),
        ("/data1", "/dev/vdb"),
        ("/data2", "/dev/vdc"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|(dev, at, fs)| dev == device && at == point && fs == "ext4"),
            "{device} on {point} (ext4) missing from {mounts:?}"
        );
    }
    assert!(
        vm.console_text()
            .contains("stillpoint-guest: data disks mounted (3)")
    );
    // Writable, and the agent sees them as file systems it can freeze.
    let write = vm
        .guest_exec(
            &["sh", "-c", "echo hello > /data2/f && cat /data2/f"],
            AGENT_TIMEOUT,
        )
        .await
        .expect("write");
    assert_eq!(write.stdout_text(), "hello\n");
    let fsinfo = vm
        .agent_command("guest-get-fsinfo", None, AGENT_TIMEOUT)
        .await
        .expect("fsinfo");
    let mut points: Vec<&str> = fsinfo
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|fs| fs["mountpoint"].as_str())
        .collect();
    points.sort_unstable();
    assert_eq!(points, ["/data", "/data1", "/data2"]);
}

#[tokio::test]
async fn sqlite3_runs_in_the_guest() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("sqlite"))
        .await
        .expect("boot");
    let sql = "create table t(x); insert into t values (41),(1); select sum(x) from t;";
    let out = vm
        .guest_exec(&["sqlite3", "/data/app.db", sql], AGENT_TIMEOUT)
        .await
        .expect("sqlite3");
    assert_eq!(
        out.exit_code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout_text(), "42\n");
}

#[tokio::test]
async fn agent_off_means_no_agent_socket_and_no_channel() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("noagent").without_agent())
        .await
        .expect("boot");
    assert!(vm.qga_socket().is_none());
    assert!(vm.record().qga_socket.is_none());
    assert!(!vm.dir().join("qga.sock").exists());
    let console = vm.console_text();
    assert!(
        console.contains("stillpoint-guest: agent disabled"),
        "{console}"
    );
    assert!(
        console.contains("stillpoint-guest: data disks mounted (1)"),
        "{console}"
    );
    assert!(!console.contains("qemu-ga starting"), "{console}");
    // QEMU itself has no virtio-serial device.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid())).expect("cmdline");
    assert!(!String::from_utf8_lossy(&cmdline).contains("virtserialport"));
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(vm.dir().join("vm.json")).expect("vm.json"))
            .expect("json");
    assert_eq!(json["qga_socket"], Value::Null);
}

#[tokio::test]
async fn extra_qga_args_take_effect() {
    let config = VmConfig::new("blocked")
        .with_qga_arg("--block-rpcs")
        .with_qga_arg("guest-fsfreeze-freeze");
    let vm = LaunchedVm::boot_for_test(config).await.expect("boot");
    let info = vm
        .agent_command("guest-info", None, AGENT_TIMEOUT)
        .await
        .expect("guest-info");
    let enabled = |name: &str| {
        info["supported_commands"]
            .as_array()
            .expect("supported_commands")
            .iter()
            .find(|command| command["name"] == name)
            .map(|command| command["enabled"].as_bool())
    };
    assert_eq!(
        enabled("guest-fsfreeze-freeze"),
        Some(Some(false)),
        "{info}"
    );
    assert_eq!(enabled("guest-fsfreeze-thaw"), Some(Some(true)), "{info}");
    let error = vm
        .agent_command("guest-fsfreeze-freeze", None, AGENT_TIMEOUT)
        .await
        .expect_err("blocked");
    assert!(error.to_string().contains("disabled"), "{error}");
}

#[tokio::test]
async fn fsfreeze_hook_is_installed_and_called() {
    let hook = "#!/bin/sh\necho \"hook $1\" >> /run/hook.log\n";
    let vm = LaunchedVm::boot_for_test(VmConfig::new("hook").with_fsfreeze_hook(hook))
        .await
        .expect("boot");
    assert!(
        vm.console_text()
            .contains("stillpoint-guest: fsfreeze hook installed")
    );
    let frozen = vm
        .agent_command("guest-fsfreeze-freeze", None, AGENT_TIMEOUT)
        .await;
    // Thaw whatever happened: never leave the guest frozen.
    let thawed = vm
        .agent_command("guest-fsfreeze-thaw", None, AGENT_TIMEOUT)
        .await
        .expect("thaw");
    assert_eq!(
        frozen.expect("freeze"),
        json!(1),
        "one file system (/data) frozen"
    );
    assert_eq!(thawed, json!(1));
    let log = vm
        .guest_exec(&["cat", "/run/hook.log"], AGENT_TIMEOUT)
        .await
        .expect("hook log");
    assert_eq!(log.stdout_text(), "hook freeze\nhook thaw\n");
}

#[tokio::test]
async fn two_vms_run_at_once_independently() {
    let (a, b) = tokio::join!(
        LaunchedVm::boot_for_test(VmConfig::new("twin-a")),
        LaunchedVm::boot_for_test(VmConfig::new("twin-b")),
    );
    let (a, b) = (a.expect("boot a"), b.expect("boot b"));
    assert_ne!(a.pid(), b.pid());
    assert_ne!(a.disks()[0].path, b.disks()[0].path);
    a.guest_exec(&["sh", "-c", "echo a > /data/who"], AGENT_TIMEOUT)
        .await
        .expect("write a");
    let on_b = b
        .guest_exec(&["sh", "-c", "cat /data/who 2>&1; hostname"], AGENT_TIMEOUT)
        .await
        .expect("read b");
    assert!(
        on_b.stdout_text().contains("No such file"),
        "disks are independent: {}",
        on_b.stdout_text()
    );
    assert!(
        on_b.stdout_text().ends_with("twin-b\n"),
        "{}",
        on_b.stdout_text()
    );
}

#[tokio::test]
async fn dropping_the_handle_leaves_no_qemu_and_no_directory() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("dropme").without_agent())
        .await
        .expect("boot");
    let pid = vm.pid();
    let dir = vm.dir().to_owned();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(vm);
    // Reaped by the handle: the pid is gone at once, not a zombie.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} survived its handle"
    );
    assert!(!dir.exists());
}

#[tokio::test]
async fn stop_quits_qemu_through_the_monitor() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("stopme").without_agent())
        .await
        .expect("boot");
    let pid = vm.pid();
    vm.stop().await.expect("stop");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// The test process dying (SIGKILL, no destructors) must take its QEMU along: a child process
/// launches a VM and is killed, and its QEMU must go away on its own.
#[tokio::test]
async fn qemu_dies_with_the_process_that_launched_it() {
    if std::env::var_os("STILLPOINT_TESTVM_ORPHAN_CHILD").is_some() {
        // The child role: launch, report the pid, wait to be killed.
        let root = std::env::var("STILLPOINT_TESTVM_ORPHAN_ROOT").expect("root");
        let vm = LaunchedVm::launch(
            VmConfig::new("orphan").without_agent(),
            &stillpoint_testvm::LaunchOptions::attached(root),
        )
        .await
        .expect("launch");
        println!("QEMU_PID={}", vm.pid());
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "qemu_dies_with_the_process_that_launched_it",
            "--nocapture",
        ])
        .env("STILLPOINT_TESTVM_ORPHAN_CHILD", "1")
        .env("STILLPOINT_TESTVM_ORPHAN_ROOT", root.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child test");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut pid = None;
    while let Some(line) = lines.next_line().await.expect("read child") {
        if let Some(value) = line.strip_prefix("QEMU_PID=") {
            pid = Some(value.trim().parse::<u32>().expect("pid"));
            break;
        }
    }
    let pid = pid.expect("the child launched a VM");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU runs before the kill");
    assert!(String::from_utf8_lossy(&cmdline).contains("qemu-system-x86_64"));
    child.start_kill().expect("kill child");
    child.wait().await.expect("reap child");
    let gone = wait_until(Duration::from_secs(20), || async {
        // Gone, or a zombie waiting for its new parent to reap it.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    })
    .await;
    assert!(gone, "QEMU {pid} outlived the process that launched it");
}

#[tokio::test]
async fn a_guest_that_cannot_boot_fails_with_its_console() {
    // With 72 MiB the kernel cannot unpack the initramfs and panics; QEMU exits (-no-reboot).
    let error = LaunchedVm::boot_for_test(VmConfig::new("tiny").with_memory_mib(72))
        .await
        .expect_err("cannot boot");
    let message = error.to_string();
    assert_eq!(error.vm(), Some("tiny"));
    assert!(message.contains("QEMU exited"), "{message}");
    assert!(
        message.contains("Kernel panic"),
        "the console tail is in the message: {message}"
    );
}

/// Two builders at once (threads with their own open file descriptions of the lock file, which
/// `flock` treats like separate processes) build the image once; a changed recipe builds a new
/// image beside it. Uses the real apt-get download, in a cache of its own.
#[test]
fn concurrent_builds_build_once_and_a_recipe_change_rebuilds() {
    use stillpoint_testvm::{GuestImage, GuestRecipe};
    let cache = tempfile::tempdir().expect("tempdir");
    let recipe = GuestRecipe::default();
    let builders: Vec<_> = (0..2)
        .map(|_| {
            let (cache, recipe) = (cache.path().to_owned(), recipe.clone());
            std::thread::spawn(move || GuestImage::ensure_in(&cache, &recipe))
        })
        .collect();
    let images: Vec<GuestImage> = builders
        .into_iter()
        .map(|b| b.join().expect("thread").expect("build"))
        .collect();
    assert_eq!(images[0].dir(), images[1].dir());
    assert_eq!(
        images[0].manifest(),
        images[1].manifest(),
        "the second builder found the first's image"
    );
    let entries = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list cache")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        entries(cache.path()),
        ["build.lock".to_owned(), format!("guest-{}", recipe.key())]
    );
    let manifest = images[0].manifest();
    assert!(manifest.packages.contains_key("qemu-guest-agent"));
    assert_eq!(
        manifest
            .libraries
            .get("libglib-2.0.so.0")
            .map(String::as_str),
        Some("libglib2.0-0")
    );
    assert!(
        manifest.kernel_release.ends_with("-cloud-amd64"),
        "{}",
        manifest.kernel_release
    );

    let mut changed = recipe.clone();
    changed.init_script.push_str("# a changed recipe\n");
    let rebuilt = GuestImage::ensure_in(cache.path(), &changed).expect("rebuild");
    assert_ne!(rebuilt.dir(), images[0].dir());
    assert!(images[0].initramfs().is_file(), "the old image stays");
    assert_eq!(entries(cache.path()).len(), 3);
}

#[test]
fn a_package_that_does_not_exist_is_named_in_the_error() {
    use stillpoint_testvm::{ErrorKind, GuestImage, GuestRecipe};
    let cache = tempfile::tempdir().expect("tempdir");
    let recipe = GuestRecipe {
        busybox_package: "stillpoint-no-such-package".into(),
        ..GuestRecipe::default()
    };
    let error = GuestImage::ensure_in(cache.path(), &recipe).expect_err("no such package");
    assert_eq!(error.kind(), ErrorKind::Package);
    let message = error.to_string();
    assert!(message.contains("downloading Debian packages"), "{message}");
    assert!(message.contains("stillpoint-no-such-package"), "{message}");
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        ["build.lock"],
        "no image and no work directory left behind"
    );
}
