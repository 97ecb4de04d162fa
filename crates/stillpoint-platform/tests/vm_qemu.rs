//! The qemu driver against real VMs: state from QMP, the agent over its socket, and how the
//! guest sees each disk (serial, PCI address) for matching frozen filesystems to disks.
#![cfg(feature = "vm-tests")]

use std::path::Path;

use stillpoint_platform::qemu::QemuInventory;
use stillpoint_platform::{Platforms, RunState};
use stillpoint_testvm::{LaunchedVm, VmConfig};

const MIB: u64 = 1 << 20;

fn platforms_for(vm: &LaunchedVm) -> Platforms {
    let root = vm.runtime_root().to_path_buf();
    Platforms::new(QemuInventory::new(vec![], root))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_agent_and_disk_identities_of_a_running_vm() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("plat-ids").with_disks(2, 64 * MIB))
        .await
        .unwrap();
    let handle = platforms_for(&vm).resolve("plat-ids").unwrap();
    assert_eq!(handle.status().await.unwrap().state, RunState::Running);

    let agent = handle.agent().expect("agent channel");
    agent.ping().await.unwrap();
    let filesystems = agent.fs_info().await.unwrap();
    agent.release().await;

    let identities = handle.disk_identities().await.unwrap();
    let ids: Vec<&str> = identities.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["vd0", "vd1"]);
    for identity in &identities {
        let pci = identity.pci.expect("virtio-blk disks sit on PCI");
        // The guest agent reports the same PCI address for the filesystem on that disk.
        let on_disk = filesystems.iter().any(|fs| {
            fs.disks.iter().any(|d| {
                d.pci_controller
                    .is_some_and(|p| (p.bus, p.slot, p.function) == pci)
            })
        });
        assert!(
            on_disk,
            "no filesystem of the guest sits on {identity:?}: {filesystems:#?}"
        );
        assert_eq!(
            identity.serial.as_deref(),
            Some(format!("stillpoint-disk{}", &identity.id[2..]).as_str())
        );
    }

    let definition = handle
        .definition()
        .await
        .unwrap()
        .expect("a local QEMU has a definition");
    assert_eq!(definition.kind, "qemu");
    assert!(
        definition.argv[0].ends_with("qemu-system-x86_64"),
        "{:?}",
        definition.argv
    );
    assert!(definition.argv.iter().any(|arg| arg == "-blockdev"));
    let images: Vec<(&str, &str)> = definition
        .disks
        .iter()
        .map(|d| (d.id.as_str(), d.format.as_str()))
        .collect();
    assert_eq!(images, [("vd0", "qcow2"), ("vd1", "qcow2")]);
    assert_eq!(Path::new(&definition.disks[0].image), vm.disks()[0].path);

    vm.agent_command("guest-ping", None, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let qmp = stillpoint_qmp::Qmp::connect_unix(vm.qmp_socket())
        .await
        .unwrap();
    qmp.stop().await.unwrap();
    drop(qmp);
    assert_eq!(handle.status().await.unwrap().state, RunState::Paused);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_whose_qemu_is_gone_is_not_running() {
    let vm = LaunchedVm::boot_for_test(VmConfig::new("plat-gone").without_agent())
        .await
        .unwrap();
    let platforms = platforms_for(&vm);
    // Keep the runtime directory (vm.json) but end QEMU, as after a crash.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        stillpoint_testvm::wait_until(std::time::Duration::from_secs(10), || async {
            !vm.is_running()
        })
        .await
    );
    let handle = platforms.resolve("plat-gone").unwrap();
    let status = handle.status().await.unwrap();
    assert_eq!(status.state, RunState::NotRunning, "{status:?}");
    assert!(handle.agent().is_none());
}
