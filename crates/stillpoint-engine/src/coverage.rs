//! Which captured disks a freeze covered (invariant 5: a backup is `filesystem` only if the
//! freeze really covered the capture start of **every** disk).
//!
//! The guest agent lists the filesystems it freezes and, for each, the disks under it (serial,
//! PCI address). The platform says how the guest sees each of the VM's disks. A captured disk
//! is covered when some frozen filesystem sits on it; a disk with no frozen filesystem (a raw
//! database disk, an unmounted disk, one the agent cannot map) holds data that is only
//! crash-consistent, so the backup is too.

use serde::Serialize;
use stillpoint_platform::DiskIdentity;
use stillpoint_qga::FsInfo;

/// The outcome for the captured disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Coverage {
    /// Disk id → the mountpoints frozen on it.
    pub covered: Vec<(String, Vec<String>)>,
    /// Captured disks no frozen filesystem was found on.
    pub uncovered: Vec<String>,
}

impl Coverage {
    pub fn complete(&self) -> bool {
        self.uncovered.is_empty()
    }
}

/// Matches the agent's filesystems to the captured disks, by serial first (set by the
/// hypervisor, unambiguous), then by the disk device's PCI address (virtio-blk).
pub fn freeze_coverage(
    filesystems: &[FsInfo],
    disks: &[DiskIdentity],
    captured: &[String],
) -> Coverage {
    let mut covered = Vec::new();
    let mut uncovered = Vec::new();
    for id in captured {
        let identity = disks.iter().find(|disk| &disk.id == id);
        let mountpoints: Vec<String> = match identity {
            None => Vec::new(),
            Some(identity) => filesystems
                .iter()
                .filter(|fs| fs.disks.iter().any(|address| sits_on(address, identity)))
                .map(|fs| fs.mountpoint.clone())
                .collect(),
        };
        if mountpoints.is_empty() {
            uncovered.push(id.clone());
        } else {
            covered.push((id.clone(), mountpoints));
        }
    }
    Coverage { covered, uncovered }
}

fn sits_on(address: &stillpoint_qga::DiskAddress, disk: &DiskIdentity) -> bool {
    if let (Some(guest), Some(host)) = (&address.serial, &disk.serial) {
        return guest == host;
    }
    match (address.pci_controller, disk.pci) {
        // Only virtio-blk puts the disk itself at the PCI address; behind a SCSI or SATA
        // controller the address names the controller, shared by several disks.
        (Some(pci), Some((bus, slot, function))) if address.bus_type == "virtio" => {
            pci.domain == 0 && (pci.bus, pci.slot, pci.function) == (bus, slot, function)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(mountpoint: &str, json_disks: serde_json::Value) -> FsInfo {
        serde_json::from_value(serde_json::json!({
            "name": "vda", "mountpoint": mountpoint, "type": "ext4", "disk": json_disks
        }))
        .unwrap()
    }

    fn virtio(slot: i64, serial: Option<&str>) -> serde_json::Value {
        let mut disk = serde_json::json!({
            "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0,
            "pci-controller": {"domain": 0, "bus": 0, "slot": slot, "function": 0},
        });
        if let Some(serial) = serial {
            disk["serial"] = serial.into();
        }
        disk
    }

    fn disk(id: &str, slot: i64, serial: Option<&str>) -> DiskIdentity {
        DiskIdentity {
            id: id.into(),
            serial: serial.map(Into::into),
            pci: Some((0, slot, 0)),
        }
    }

    #[test]
    fn every_captured_disk_with_a_frozen_filesystem_is_covered() {
        let filesystems = [
            fs("/data", serde_json::json!([virtio(3, None)])),
            fs("/data1", serde_json::json!([virtio(4, None)])),
        ];
        let disks = [disk("vd0", 3, None), disk("vd1", 4, None)];
        let coverage = freeze_coverage(&filesystems, &disks, &["vd0".into(), "vd1".into()]);
        assert!(coverage.complete());
        assert_eq!(
            coverage.covered[1],
            ("vd1".to_string(), vec!["/data1".to_string()])
        );
    }

    #[test]
    fn a_disk_without_filesystem_is_uncovered() {
        let filesystems = [fs("/data", serde_json::json!([virtio(3, None)]))];
        let disks = [disk("vd0", 3, None), disk("vd1", 4, None)];
        let coverage = freeze_coverage(&filesystems, &disks, &["vd0".into(), "vd1".into()]);
        assert_eq!(coverage.uncovered, vec!["vd1".to_string()]);
        assert!(!coverage.complete());
    }

    #[test]
    fn serial_wins_over_pci_and_mismatching_serial_is_not_covered() {
        let filesystems = [fs("/data", serde_json::json!([virtio(3, Some("other"))]))];
        let coverage = freeze_coverage(
            &filesystems,
            &[disk("vd0", 3, Some("mine"))],
            &["vd0".into()],
        );
        assert_eq!(coverage.uncovered, vec!["vd0".to_string()]);
        let coverage = freeze_coverage(
            &filesystems,
            &[disk("vd0", 9, Some("other"))],
            &["vd0".into()],
        );
        assert!(coverage.complete());
    }

    #[test]
    fn scsi_controller_address_does_not_prove_a_disk() {
        let mut scsi = virtio(3, None);
        scsi["bus-type"] = "scsi".into();
        let filesystems = [fs("/data", serde_json::json!([scsi]))];
        let coverage = freeze_coverage(&filesystems, &[disk("sd0", 3, None)], &["sd0".into()]);
        assert_eq!(coverage.uncovered, vec!["sd0".to_string()]);
    }

    #[test]
    fn unknown_disk_is_uncovered() {
        let filesystems = [fs("/data", serde_json::json!([virtio(3, None)]))];
        let coverage = freeze_coverage(&filesystems, &[], &["vd0".into()]);
        assert_eq!(coverage.uncovered, vec!["vd0".to_string()]);
    }
}
