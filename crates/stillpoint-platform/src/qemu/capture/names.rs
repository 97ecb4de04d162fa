//! Names of everything a capture adds to QEMU. They all start with [`PREFIX`] so that the
//! leftovers of an interrupted capture can be found again in QEMU's state, and each one names
//! the disk node it belongs to (`sp-cbw-disk0` sits on `disk0`), which is how recovery knows
//! which node a device must be given back.

use std::path::{Path, PathBuf};

/// Prefix of every node and export a capture adds.
pub const PREFIX: &str = "sp-";
/// Copy-before-write filter over a disk node.
pub const FILTER: &str = "sp-cbw-";
/// Scratch qcow2 node the filter saves old data to.
pub const SCRATCH: &str = "sp-fl-";
/// `snapshot-access` node over the filter: the point-in-time view that is exported.
pub const SNAPSHOT: &str = "sp-snap-";
/// NBD export of the view.
pub const EXPORT: &str = "sp-exp-";
/// A `null-co` node that exists only while a capture has the VM paused: the evidence a
/// guardian needs to resume a VM that a dead stillpoint paused (and only such a VM).
pub const PAUSE_MARKER: &str = "sp-paused-by-capture";
/// Scratch files are named `sp-scratch-<vm>-<node>-<capture id>.qcow2`; recovery deletes only
/// files that match this.
pub const SCRATCH_FILE: &str = "sp-scratch-";

/// QEMU keeps node names in a 32-byte buffer (`BlockDriverState.node_name`).
pub const MAX_NODE_NAME: usize = 31;
/// The longest disk node name whose derived names still fit (`sp-snap-` is the longest prefix).
pub const MAX_DISK_NODE: usize = MAX_NODE_NAME - SNAPSHOT.len();
/// `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

pub fn filter(node: &str) -> String {
    format!("{FILTER}{node}")
}

pub fn scratch(node: &str) -> String {
    format!("{SCRATCH}{node}")
}

pub fn snapshot(node: &str) -> String {
    format!("{SNAPSHOT}{node}")
}

pub fn export(node: &str) -> String {
    format!("{EXPORT}{node}")
}

/// Whether derived names of `node` are valid QEMU node names: a letter first, then letters,
/// digits, `-`, `.`, `_` (QEMU's `id_wellformed`), short enough for every prefix. Nodes QEMU
/// named itself (`#block123`, from `-drive`) are not.
pub fn usable_disk_node(node: &str) -> bool {
    let mut chars = node.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && node.len() <= MAX_DISK_NODE
}

/// The disk node a stillpoint node named `name` with `prefix` belongs to.
pub fn disk_node_of<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix).filter(|node| !node.is_empty())
}

/// The scratch file of one disk of one capture.
pub fn scratch_file(dir: &Path, vm: &str, node: &str, capture_id: &str) -> PathBuf {
    let vm = stillpoint_os::names::file_name(vm);
    dir.join(format!("{SCRATCH_FILE}{vm}-{node}-{capture_id}.qcow2"))
}

/// Whether `path` is a scratch file stillpoint made (the only files recovery deletes).
pub fn is_scratch_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(SCRATCH_FILE) && n.ends_with(".qcow2"))
}

/// The NBD server's socket of one capture.
pub fn nbd_socket(dir: &Path, capture_id: &str) -> PathBuf {
    // The random half of the id keeps the path short (sockets are limited to 107 bytes).
    let short = capture_id.rsplit('-').next().unwrap_or(capture_id);
    dir.join(format!("sp-nbd-{short}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_qemus_limit_and_map_back_to_their_disk() {
        let longest = "d".repeat(MAX_DISK_NODE);
        for name in [
            filter(&longest),
            scratch(&longest),
            snapshot(&longest),
            export(&longest),
        ] {
            assert!(name.len() <= MAX_NODE_NAME, "{name}");
        }
        assert_eq!(disk_node_of(&filter("disk0"), FILTER), Some("disk0"));
        assert_eq!(
            disk_node_of("sp-cbw-libvirt-1-format", FILTER),
            Some("libvirt-1-format")
        );
        assert_eq!(disk_node_of("sp-cbw-", FILTER), None);
        assert_eq!(disk_node_of("disk0", FILTER), None);
        assert!(PAUSE_MARKER.len() <= MAX_NODE_NAME);
    }

    #[test]
    fn only_well_formed_short_nodes_are_usable() {
        assert!(usable_disk_node("disk0"));
        assert!(usable_disk_node("libvirt-1-format"));
        assert!(usable_disk_node(&"d".repeat(MAX_DISK_NODE)));
        assert!(!usable_disk_node(&"d".repeat(MAX_DISK_NODE + 1)));
        assert!(!usable_disk_node("#block123"));
        assert!(!usable_disk_node("0disk"));
        assert!(!usable_disk_node(""));
        assert!(!usable_disk_node("disk 0"));
    }

    #[test]
    fn scratch_files_are_recognisable_and_vm_names_are_tamed() {
        let path = scratch_file(Path::new("/scratch"), "web/01 x", "disk0", "123-abc");
        assert_eq!(
            path,
            Path::new("/scratch/sp-scratch-web%2F01%20x-disk0-123-abc.qcow2")
        );
        assert!(is_scratch_file(&path));
        assert!(!is_scratch_file(Path::new("/vm/disk0.qcow2")));
        assert!(!is_scratch_file(Path::new("/scratch/sp-scratch-x.raw")));
        assert_eq!(
            nbd_socket(Path::new("/s"), "1764158400123-deadbeef"),
            Path::new("/s/sp-nbd-deadbeef.sock")
        );
    }
}
