//! VMs started elsewhere, named in `stillpoint.toml` by their monitor and agent sockets:
//! `check` and `backup` find them there, and the backup records how to start the VM again
//! (its QEMU found through the monitor socket's peer).
#![cfg(feature = "vm-tests")]

mod support;

use std::path::Path;
use std::process::Output;

use stillpoint_testvm::{LaunchedVm, VmConfig};
use support::{stillpoint_command, text};

fn stillpoint(dir: &Path, args: &[&str]) -> Output {
    stillpoint_command()
        .args(args)
        .current_dir(dir)
        .env("STILLPOINT_PASSWORD", "config-test")
        .output()
        .expect("the stillpoint binary runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_vm_is_checked_and_backed_up_by_its_sockets() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("elsewhere"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Its own runtime directory: the launched VM's vm.json is not where stillpoint looks.
    let config = format!(
        "repo = \"repo\"\nruntime_dir = \"run\"\n[backup]\nconsistency = \"filesystem\"\n\
         [vms.web]\nqmp = \"{}\"\nqga = \"{}\"\n",
        vm.qmp_socket().display(),
        vm.qga_socket().unwrap().display()
    );
    std::fs::write(dir.path().join("stillpoint.toml"), config).unwrap();

    let init = stillpoint(dir.path(), &["repo", "init"]);
    assert!(init.status.success(), "{}", text(&init));
    assert!(
        dir.path().join("repo").is_dir(),
        "the repository comes from stillpoint.toml"
    );

    let check = stillpoint(dir.path(), &["check", "web", "--json"]);
    assert!(check.status.success(), "{}", text(&check));
    let check: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(check["achievable"], "filesystem", "{check:#}");

    let backup = stillpoint(dir.path(), &["backup", "web", "--json"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let reports: serde_json::Value = serde_json::from_slice(&backup.stdout).unwrap();
    let report = &reports[0];
    assert_eq!(
        report["requested"], "filesystem",
        "the level comes from stillpoint.toml"
    );
    assert_eq!(report["achieved"], "filesystem", "{report:#}");
    let definition = &report["vm_definition"];
    assert_eq!(definition["kind"], "qemu", "{report:#}");
    assert_eq!(
        definition["disks"][0]["image"],
        vm.disks()[0].path.display().to_string()
    );

    let unknown = stillpoint(dir.path(), &["check", "nowhere"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("unknown VM `nowhere`"),
        "{}",
        text(&unknown)
    );

    std::fs::write(dir.path().join("stillpoint.toml"), "[vms.web]\nqmp = 3\n").unwrap();
    let broken = stillpoint(dir.path(), &["check", "web"]);
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("stillpoint.toml") && stderr.contains("line 2"),
        "{}",
        text(&broken)
    );
}
