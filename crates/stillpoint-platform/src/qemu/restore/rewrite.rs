//! The rewrite of a recorded VM definition for restored disks: pure, paths in, argv out.
//!
//! Rules (docs/restore.md has the user's version):
//! - Disk images the command line names (`-blockdev` in JSON or `key=value` form, `-drive
//!   file=`, `-hda`…`-hdd`, a bare image argument) become the restored files. The format node
//!   above a restored file gets the restored format; when that changes the driver, options
//!   of the old driver are dropped. `backing` and `data-file` go: a restored image is whole.
//! - Unix sockets (`-chardev socket,path=`, `-qmp`/`-monitor`/`-serial unix:`, `-vnc unix:`)
//!   and log files (`-serial file:`, `-chardev file`, `logfile=`, `-D`) move to the run
//!   directory. Network listeners are kept and noted.
//! - `-daemonize` and `-pidfile` go (the restored VM runs in the foreground of its script);
//!   `-incoming` and `-loadvm` go (the restored VM boots from its disks).
//! - `-kernel`, `-initrd`, `-dtb` and `-bios` stay where they were: they are not part of the
//!   snapshot, so they are listed as external files.
//!
//! [`for_boot_test`] adapts a rewritten line for an unattended test boot (TCG, no displays,
//! networks cut off, a monitor of its own).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cmdline::{CommandLine, Item};
use super::keyval::{KeyVal, Param};
use crate::error::{PlatformError, PlatformErrorKind, Result};
use crate::restore::{BootAccel, TargetDisk};
use crate::vm::{DefinedDisk, VmDefinition};

/// A file the restored VM needs that is not in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    /// The option naming it (`kernel`, `initrd`, …).
    pub option: String,
    pub path: String,
}

/// The recorded definition rewritten for restored disks and a run directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewrittenDefinition {
    /// `qemu`.
    pub kind: String,
    /// The command line to start the restored VM with.
    pub argv: Vec<String>,
    /// Disk id → image, as the new command line uses them.
    pub disks: Vec<DefinedDisk>,
    /// Where sockets and logs go.
    pub run_dir: PathBuf,
    /// The first unix QMP socket, if the line has one.
    pub qmp_socket: Option<PathBuf>,
    /// The guest agent's socket, when its channel is a unix server socket.
    pub agent_socket: Option<PathBuf>,
    /// The first serial port's log file, when it writes to a file.
    pub console_log: Option<PathBuf>,
    /// Files outside the snapshot that the VM needs (kernel, initrd, …).
    pub external_files: Vec<ExternalFile>,
    /// Disks of the definition that were not restored: the line still uses their original
    /// images.
    pub unrestored_disks: Vec<String>,
    /// What the rewrite changed that the user should know.
    pub notes: Vec<String>,
}

/// The serial port name the guest agent listens on.
const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Block drivers that are image formats (the node above the file).
const FORMAT_DRIVERS: &[&str] = &[
    "qcow2",
    "raw",
    "qed",
    "qcow",
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "parallels",
    "luks",
    "bochs",
    "cloop",
    "dmg",
];
/// Options every block node takes, whatever its driver (QAPI `BlockdevOptions` base).
const COMMON_NODE_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
    "file",
];
/// `-drive` keys that belong to the qcow2, luks or raw format drivers (they go when the
/// format changes; `-drive` mixes them with its own keys).
const FORMAT_DRIVE_KEYS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "key-secret",
    "offset",
    "size",
];

/// Whether a node/drive key refers to another image the restored one no longer needs.
fn is_chain_key(key: &str) -> bool {
    key == "backing" || key.starts_with("backing.") || key.starts_with("data-file")
}

fn format_drive_key(key: &str) -> bool {
    FORMAT_DRIVE_KEYS.contains(&key)
        || key.starts_with("overlap-check.")
        || key.starts_with("encrypt.")
}

/// Rewrites `recorded` so that the restored `disks` are used and sockets and logs live in
/// `run_dir`. Fails when the definition is not a QEMU command line, an argument cannot be
/// parsed, or a restored disk's image does not appear in the command line.
pub fn rewrite_definition(
    recorded: &VmDefinition,
    disks: &[TargetDisk],
    run_dir: &Path,
) -> Result<RewrittenDefinition> {
    if recorded.kind != "qemu" {
        return Err(definition_error(format!(
            "the recorded definition is of kind `{}`; only `qemu` command lines can be rewritten",
            recorded.kind
        )));
    }
    let Some(line) = CommandLine::parse(&recorded.argv) else {
        return Err(definition_error("the recorded command line is empty"));
    };
    let mut rewriter = Rewriter::new(recorded, disks, run_dir);
    let items = rewriter.first_pass(line.items)?;
    let items = rewriter.second_pass(items)?;
    let line = CommandLine {
        program: line.program,
        items,
    };
    rewriter.finish(recorded, line)
}

fn definition_error(message: impl Into<String>) -> PlatformError {
    PlatformError::new(PlatformErrorKind::VmDefinition, message)
}

fn at(item_position: usize, option: &str) -> String {
    format!("argument {item_position} (-{option})")
}

struct Rewriter<'a> {
    /// Original image → the restored disk that replaces it.
    by_image: HashMap<&'a str, &'a TargetDisk>,
    /// Restored disk id → its format in the recorded definition.
    recorded_format: HashMap<&'a str, &'a str>,
    run_dir: &'a Path,
    /// Restored disks whose image was found.
    replaced: HashSet<String>,
    /// Node names of protocol nodes (separate `-blockdev`s) of restored disks.
    protocol_nodes: HashMap<String, &'a TargetDisk>,
    /// Format nodes already adjusted (by the disk id below them).
    formatted: HashSet<String>,
    used_names: HashSet<String>,
    counters: BTreeMap<&'static str, usize>,
    /// Chardev id → its rewritten unix server socket.
    chardev_sockets: HashMap<String, PathBuf>,
    agent_chardev: Option<String>,
    qmp_socket: Option<PathBuf>,
    console_log: Option<PathBuf>,
    external_files: Vec<ExternalFile>,
    notes: Vec<String>,
}

impl<'a> Rewriter<'a> {
    fn new(recorded: &'a VmDefinition, disks: &'a [TargetDisk], run_dir: &'a Path) -> Self {
        let images: HashMap<&str, &str> = recorded
            .disks
            .iter()
            .map(|d| (d.id.as_str(), d.image.as_str()))
            .collect();
        let mut by_image = HashMap::new();
        let mut notes = Vec::new();
        for disk in disks {
            match images.get(disk.id.as_str()) {
                Some(image) => {
                    by_image.insert(*image, disk);
                }
                None => notes.push(format!(
                    "disk {} was restored but the recorded definition has no such disk; \
                     the command line does not use it",
                    disk.id
                )),
            }
        }
        Self {
            by_image,
            recorded_format: recorded
                .disks
                .iter()
                .map(|d| (d.id.as_str(), d.format.as_str()))
                .collect(),
            run_dir,
            replaced: HashSet::new(),
            protocol_nodes: HashMap::new(),
            formatted: HashSet::new(),
            used_names: HashSet::new(),
            counters: BTreeMap::new(),
            chardev_sockets: HashMap::new(),
            agent_chardev: None,
            qmp_socket: None,
            console_log: None,
            external_files: Vec::new(),
            notes,
        }
    }

    /// A fresh file name in the run directory.
    fn run_file(&mut self, stem: &str, extension: &str) -> PathBuf {
        let stem = stillpoint_os::names::file_name(stem);
        let mut name = format!("{stem}.{extension}");
        let mut n = 2;
        while !self.used_names.insert(name.clone()) {
            name = format!("{stem}-{n}.{extension}");
            n += 1;
        }
        self.run_dir.join(name)
    }

    fn next_index(&mut self, kind: &'static str) -> usize {
        let counter = self.counters.entry(kind).or_insert(0);
        let index = *counter;
        *counter += 1;
        index
    }

    fn socket(&mut self, stem: &str) -> PathBuf {
        let path = self.run_file(stem, "sock");
        let length = path.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            self.notes.push(format!(
                "socket {} is {length} bytes long, more than the {MAX_SOCKET_PATH} a unix \
                 socket path can have: QEMU will refuse it; restore to a shorter directory",
                path.display()
            ));
        }
        path
    }

    fn first_pass(&mut self, items: Vec<Item>) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(items.len());
        for mut item in items {
            let position = item.position();
            let Some(name) = item.name().map(str::to_string) else {
                // A bare image argument is IDE disk 0.
                let value = item.value().unwrap_or_default().to_string();
                out.extend(self.legacy_disk(item, "hda", &value));
                continue;
            };
            let Some(value) = item.value().map(str::to_string) else {
                match name.as_str() {
                    "daemonize" => self.notes.push(
                        "-daemonize was dropped: the restored VM runs in the foreground of \
                         start-vm.sh"
                            .into(),
                    ),
                    _ => out.push(item),
                }
                continue;
            };
            match name.as_str() {
                "blockdev" => {
                    let new = if value.trim_start().starts_with('{') {
                        self.blockdev_json(&value, position)?
                    } else {
                        self.blockdev_keyval(&value)
                    };
                    item.set_value(new);
                    out.push(item);
                }
                "drive" => {
                    item.set_value(self.drive(&value));
                    out.push(item);
                }
                "hda" | "hdb" | "hdc" | "hdd" => {
                    out.extend(self.legacy_disk(item, &name, &value));
                }
                "fda" | "fdb" | "cdrom" | "sd" | "mtdblock" | "pflash" => {
                    if let Some(disk) = self.by_image.get(value.as_str()).copied() {
                        self.replaced.insert(disk.id.clone());
                        item.set_value(disk.path.display().to_string());
                        self.notes.push(format!(
                            "disk {}: -{name} lets QEMU probe the image format",
                            disk.id
                        ));
                    }
                    out.push(item);
                }
                "chardev" => {
                    item.set_value(self.chardev(&value));
                    out.push(item);
                }
                "qmp" | "qmp-pretty" | "monitor" | "serial" | "parallel" | "debugcon" => {
                    let kind: &'static str = match name.as_str() {
                        "qmp" | "qmp-pretty" => "qmp",
                        "monitor" => "monitor",
                        "serial" => "serial",
                        "parallel" => "parallel",
                        _ => "debugcon",
                    };
                    item.set_value(self.compat_chardev(kind, &value, position));
                    out.push(item);
                }
                "vnc" => {
                    if let Some(rest) = value.strip_prefix("unix:") {
                        let mut kv = KeyVal::parse(rest);
                        let socket = self.socket("vnc");
                        kv.set("path", &socket.display().to_string(), Some("path"));
                        item.set_value(format!("unix:{}", kv.render()));
                    }
                    out.push(item);
                }
                "D" => {
                    item.set_value(self.run_file("qemu-debug", "log").display().to_string());
                    out.push(item);
                }
                "pidfile" => self.notes.push(format!(
                    "-pidfile {value} was dropped: the restored VM is not the original process"
                )),
                "incoming" => self.notes.push(format!(
                    "-incoming {value} was dropped: the restored VM boots from its disks instead \
                     of waiting for a migration"
                )),
                "loadvm" => self.notes.push(format!(
                    "-loadvm {value} was dropped: internal VM snapshots are not part of a restore"
                )),
                "kernel" | "initrd" | "dtb" | "bios" => {
                    self.external_files.push(ExternalFile {
                        option: name.clone(),
                        path: value.clone(),
                    });
                    out.push(item);
                }
                "device" => {
                    let kv = KeyVal::parse(&value);
                    if kv.get("driver", Some("driver")) == Some("virtserialport")
                        && kv.get("name", None) == Some(AGENT_PORT_NAME)
                    {
                        self.agent_chardev = kv.get("chardev", None).map(str::to_string);
                    }
                    out.push(item);
                }
                _ => out.push(item),
            }
        }
        Ok(out)
    }

    /// Second pass: format nodes that refer to a restored protocol node by name.
    fn second_pass(&mut self, items: Vec<Item>) -> Result<Vec<Item>> {
        if self.protocol_nodes.is_empty() {
            return Ok(items);
        }
        let mut out = Vec::with_capacity(items.len());
        for mut item in items {
            if item.name() == Some("blockdev")
                && let Some(value) = item.value().map(str::to_string)
            {
                let new = if value.trim_start().starts_with('{') {
                    let mut node: Value = serde_json::from_str(&value).map_err(|error| {
                        definition_error(format!(
                            "{}: not valid JSON",
                            at(item.position(), "blockdev")
                        ))
                        .with_source(error)
                    })?;
                    let before = node.clone();
                    if let Some(object) = node.as_object_mut() {
                        self.adjust_referencing_json(object);
                    }
                    if node == before {
                        value
                    } else {
                        serde_json::to_string(&node).expect("JSON values always serialize")
                    }
                } else {
                    let mut kv = KeyVal::parse(&value);
                    if let Some(reference) = kv.get("file", None).map(str::to_string)
                        && let Some(disk) = self.protocol_nodes.get(&reference).copied()
                    {
                        self.adjust_format_keyval(&mut kv, "", disk);
                    }
                    kv.render()
                };
                item.set_value(new);
            }
            out.push(item);
        }
        Ok(out)
    }

    fn finish(mut self, recorded: &VmDefinition, line: CommandLine) -> Result<RewrittenDefinition> {
        let mut missing: Vec<&TargetDisk> = self
            .by_image
            .values()
            .filter(|disk| !self.replaced.contains(&disk.id))
            .copied()
            .collect();
        missing.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(disk) = missing.first() {
            let image = recorded
                .disks
                .iter()
                .find(|d| d.id == disk.id)
                .map(|d| d.image.as_str())
                .unwrap_or_default();
            return Err(definition_error(format!(
                "disk {}: its image {image} does not appear in the recorded command line, so \
                 the line cannot be pointed at the restored file",
                disk.id
            )));
        }
        for disk in self.protocol_nodes.values() {
            if !self.formatted.contains(&disk.id) {
                self.notes.push(format!(
                    "disk {}: no format node refers to its file node; its format was left as \
                     recorded",
                    disk.id
                ));
            }
        }
        let mut disks = Vec::new();
        let mut unrestored = Vec::new();
        for defined in &recorded.disks {
            match self.by_image.get(defined.image.as_str()) {
                Some(target) => disks.push(DefinedDisk {
                    id: defined.id.clone(),
                    image: target.path.display().to_string(),
                    format: target.format.clone(),
                }),
                None => {
                    unrestored.push(defined.id.clone());
                    self.notes.push(format!(
                        "disk {} was not restored: the command line still uses its original \
                         image {}",
                        defined.id, defined.image
                    ));
                    disks.push(defined.clone());
                }
            }
        }
        let agent_socket = match &self.agent_chardev {
            Some(id) => match self.chardev_sockets.get(id) {
                Some(path) => Some(path.clone()),
                None => {
                    self.notes.push(format!(
                        "the guest agent's channel (chardev {id}) is not a unix server socket; \
                         stillpoint cannot reach the restored VM's agent"
                    ));
                    None
                }
            },
            None => None,
        };
        for file in &self.external_files {
            self.notes.push(format!(
                "-{} {} is not part of the snapshot: the restored VM uses that file where it is",
                file.option, file.path
            ));
        }
        Ok(RewrittenDefinition {
            kind: recorded.kind.clone(),
            argv: line.to_argv(),
            disks,
            run_dir: self.run_dir.to_path_buf(),
            qmp_socket: self.qmp_socket,
            agent_socket,
            console_log: self.console_log,
            external_files: self.external_files,
            unrestored_disks: unrestored,
            notes: self.notes,
        })
    }

    // --- disks -------------------------------------------------------------------------

    fn blockdev_json(&mut self, value: &str, position: usize) -> Result<String> {
        let mut node: Value = serde_json::from_str(value).map_err(|error| {
            definition_error(format!("{}: not valid JSON", at(position, "blockdev")))
                .with_source(error)
        })?;
        let Some(object) = node.as_object_mut() else {
            return Err(definition_error(format!(
                "{}: the JSON is not an object",
                at(position, "blockdev")
            )));
        };
        let before = object.clone();
        if let Some(disk) = self.visit_json(object) {
            // The -blockdev is itself the file node: its format node refers to it by name.
            self.remember_protocol_node(object.get("node-name").and_then(Value::as_str), disk);
        }
        // Untouched nodes keep their text (and key order) exactly.
        if *object == before {
            return Ok(value.to_string());
        }
        Ok(serde_json::to_string(&node).expect("JSON values always serialize"))
    }

    /// Rewrites restored files below `object`; returns the disk when `object` itself is the
    /// file node of one.
    fn visit_json(&mut self, object: &mut Map<String, Value>) -> Option<&'a TargetDisk> {
        let keys: Vec<String> = object.keys().cloned().collect();
        for key in keys {
            let Some(Value::Object(child)) = object.get_mut(&key) else {
                continue;
            };
            if let Some(disk) = self.visit_json(child)
                && key == "file"
            {
                self.adjust_format_json(object, disk);
            }
        }
        let filename = object.get("filename").and_then(Value::as_str)?;
        let disk = self.by_image.get(filename).copied()?;
        object.insert(
            "filename".into(),
            Value::String(disk.path.display().to_string()),
        );
        self.replaced.insert(disk.id.clone());
        Some(disk)
    }

    fn adjust_referencing_json(&mut self, object: &mut Map<String, Value>) {
        if let Some(reference) = object.get("file").and_then(Value::as_str)
            && let Some(disk) = self.protocol_nodes.get(reference).copied()
        {
            self.adjust_format_json(object, disk);
        }
        let keys: Vec<String> = object.keys().cloned().collect();
        for key in keys {
            if let Some(Value::Object(child)) = object.get_mut(&key) {
                self.adjust_referencing_json(child);
            }
        }
    }

    /// `object` is the format node right above a restored file.
    fn adjust_format_json(&mut self, object: &mut Map<String, Value>, disk: &TargetDisk) {
        let driver = object
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !FORMAT_DRIVERS.contains(&driver.as_str()) {
            self.notes.push(format!(
                "disk {}: the node above its file has driver `{driver}`, not an image format; \
                 left as recorded",
                disk.id
            ));
            return;
        }
        self.formatted.insert(disk.id.clone());
        let mut dropped: Vec<String> = Vec::new();
        if driver != disk.format {
            object.retain(|key, _| {
                let keep = COMMON_NODE_KEYS.contains(&key.as_str());
                if !keep {
                    dropped.push(key.clone());
                }
                keep
            });
            object.insert("driver".into(), Value::String(disk.format.clone()));
        } else {
            object.retain(|key, _| {
                let keep = !is_chain_key(key);
                if !keep {
                    dropped.push(key.clone());
                }
                keep
            });
        }
        self.note_format_change(disk, &driver, &dropped);
    }

    fn note_format_change(&mut self, disk: &TargetDisk, driver: &str, dropped: &[String]) {
        if driver != disk.format {
            self.notes.push(format!(
                "disk {}: format {driver} → {} (the restored file)",
                disk.id, disk.format
            ));
        }
        if !dropped.is_empty() {
            self.notes.push(format!(
                "disk {}: dropped {} (not applicable to the restored {} file)",
                disk.id,
                dropped.join(", "),
                disk.format
            ));
        }
    }

    fn remember_protocol_node(&mut self, node_name: Option<&str>, disk: &'a TargetDisk) {
        match node_name {
            Some(name) => {
                self.protocol_nodes.insert(name.to_string(), disk);
            }
            None => self.notes.push(format!(
                "disk {}: its file node has no node-name; its format was left as recorded",
                disk.id
            )),
        }
    }

    fn blockdev_keyval(&mut self, value: &str) -> String {
        let mut kv = KeyVal::parse(value);
        // Every `…filename` key whose value is a restored image, with the key's node prefix.
        let hits: Vec<(String, &'a TargetDisk)> = kv
            .params
            .iter()
            .filter_map(|param| match param {
                Param::Pair(key, v) if key == "filename" || key.ends_with(".filename") => self
                    .by_image
                    .get(v.as_str())
                    .map(|disk| (key.trim_end_matches("filename").to_string(), *disk)),
                _ => None,
            })
            .collect();
        for (prefix, disk) in hits {
            kv.set(
                &format!("{prefix}filename"),
                &disk.path.display().to_string(),
                None,
            );
            self.replaced.insert(disk.id.clone());
            match prefix.strip_suffix("file.") {
                Some(parent) => self.adjust_format_keyval(&mut kv, parent, disk),
                None if prefix.is_empty() => {
                    let name = kv.get("node-name", None).map(str::to_string);
                    self.remember_protocol_node(name.as_deref(), disk);
                }
                None => self.notes.push(format!(
                    "disk {}: its file is under `{prefix}`, not a format node's `file`; its \
                     format was left as recorded",
                    disk.id
                )),
            }
        }
        kv.render()
    }

    /// The node at dotted `prefix` (`""` = the top) of a key=value `-blockdev` is the format
    /// node above a restored file.
    fn adjust_format_keyval(&mut self, kv: &mut KeyVal, prefix: &str, disk: &TargetDisk) {
        let implied = prefix.is_empty().then_some("driver");
        let driver_key = format!("{prefix}driver");
        let driver = kv.get(&driver_key, implied).unwrap_or_default().to_string();
        if !FORMAT_DRIVERS.contains(&driver.as_str()) {
            self.notes.push(format!(
                "disk {}: the node above its file has driver `{driver}`, not an image format; \
                 left as recorded",
                disk.id
            ));
            return;
        }
        self.formatted.insert(disk.id.clone());
        let change = driver != disk.format;
        let dropped = kv.remove_where(|key| {
            let Some(own) = key.strip_prefix(prefix) else {
                return false;
            };
            if is_chain_key(own) {
                return true;
            }
            // Keys of this node only: nested nodes (other than its file) keep theirs.
            let top = own.split('.').next().unwrap_or(own);
            change && !COMMON_NODE_KEYS.contains(&top)
        });
        if change {
            kv.set(&driver_key, &disk.format, implied);
        }
        self.note_format_change(disk, &driver, &dropped);
    }

    fn drive(&mut self, value: &str) -> String {
        let mut kv = KeyVal::parse(value);
        let (key, disk) = match ["file", "file.filename"].into_iter().find_map(|key| {
            let image = kv.get(key, None)?;
            Some((key, self.by_image.get(image).copied()?))
        }) {
            Some(found) => found,
            None => return value.to_string(),
        };
        kv.set(key, &disk.path.display().to_string(), None);
        self.replaced.insert(disk.id.clone());
        self.formatted.insert(disk.id.clone());
        let recorded = kv
            .get("format", None)
            .map(str::to_string)
            .or_else(|| {
                self.recorded_format
                    .get(disk.id.as_str())
                    .map(|f| f.to_string())
            })
            .unwrap_or_default();
        let change = recorded != disk.format;
        let dropped = kv.remove_where(|key| is_chain_key(key) || (change && format_drive_key(key)));
        kv.set("format", &disk.format, None);
        self.note_format_change(disk, &recorded, &dropped);
        kv.render()
    }

    /// `-hda FILE` (or a bare FILE): a restored one becomes `-drive` with an explicit format,
    /// because a probed raw image has its first sector write-protected.
    fn legacy_disk(&mut self, item: Item, option: &str, value: &str) -> Vec<Item> {
        let Some(disk) = self.by_image.get(value).copied() else {
            return vec![item];
        };
        self.replaced.insert(disk.id.clone());
        self.formatted.insert(disk.id.clone());
        let index = match option {
            "hdb" => 1,
            "hdc" => 2,
            "hdd" => 3,
            _ => 0,
        };
        let mut kv = KeyVal { params: Vec::new() };
        kv.set("file", &disk.path.display().to_string(), None);
        kv.set("format", &disk.format, None);
        kv.set("index", &index.to_string(), None);
        kv.set("media", "disk", None);
        self.notes.push(format!(
            "disk {}: `{}` became -drive {} (explicit format)",
            disk.id,
            match &item {
                Item::Positional { .. } => value.to_string(),
                _ => format!("-{option} {value}"),
            },
            kv.render()
        ));
        vec![Item::option("drive", Some(&kv.render()))]
    }

    // --- sockets and logs ----------------------------------------------------------------

    fn chardev(&mut self, value: &str) -> String {
        let mut kv = KeyVal::parse(value);
        let id = kv.get("id", None).unwrap_or("chardev").to_string();
        let backend = kv.get("backend", Some("backend")).unwrap_or_default();
        let has_path = kv.get("path", None).is_some();
        match backend {
            "socket" if has_path && socket_is_server(&kv) => {
                let socket = self.socket(&id);
                kv.set("path", &socket.display().to_string(), None);
                self.chardev_sockets.insert(id.clone(), socket);
            }
            "socket" if has_path => self.notes.push(format!(
                "chardev {id} connects to the external socket {} and was kept",
                kv.get("path", None).unwrap_or_default()
            )),
            "socket" => self.notes.push(format!(
                "chardev {id} is a network socket and was kept: the restored VM would use \
                 the same address as the original"
            )),
            "file" if has_path => {
                let log = self.run_file(&id, "log");
                kv.set("path", &log.display().to_string(), None);
            }
            "pipe" => self
                .notes
                .push(format!("chardev {id} is a pipe and was kept where it was")),
            _ => {}
        }
        if kv.get("logfile", None).is_some() {
            let log = self.run_file(&format!("{id}-log"), "log");
            kv.set("logfile", &log.display().to_string(), None);
        }
        kv.render()
    }

    /// `-qmp`, `-monitor`, `-serial`, … take a chardev in the short form `unix:PATH,…`,
    /// `file:PATH`, `tcp:…`, `stdio`, … (QEMU's `qemu_chr_parse_compat`).
    fn compat_chardev(&mut self, kind: &'static str, value: &str, position: usize) -> String {
        let (mux, spec) = match value.strip_prefix("mon:") {
            Some(rest) => ("mon:", rest),
            None => ("", value),
        };
        let index = self.next_index(kind);
        let stem = if index == 0 {
            kind.to_string()
        } else {
            format!("{kind}{index}")
        };
        let new = if let Some(rest) = spec.strip_prefix("unix:") {
            let mut kv = KeyVal::parse(rest);
            if !socket_is_server(&kv) {
                self.notes.push(format!(
                    "{} `{value}` connects to an external socket and was kept",
                    at(position, kind)
                ));
                return value.to_string();
            }
            let socket = self.socket(&stem);
            kv.set("path", &socket.display().to_string(), Some("path"));
            if kind == "qmp" && self.qmp_socket.is_none() {
                self.qmp_socket = Some(socket);
            }
            format!("unix:{}", kv.render())
        } else if spec.starts_with("file:") {
            // Everything after `file:` is the path (no options in this form).
            let log = if kind == "serial" && index == 0 {
                self.run_file("console", "log")
            } else {
                self.run_file(&stem, "log")
            };
            if kind == "serial" && self.console_log.is_none() {
                self.console_log = Some(log.clone());
            }
            format!("file:{}", log.display())
        } else {
            if ["tcp:", "telnet:", "udp:", "websocket:"]
                .iter()
                .any(|p| spec.starts_with(p))
            {
                self.notes.push(format!(
                    "{} `{value}` listens on the network and was kept: the restored VM would \
                     use the same address as the original",
                    at(position, kind)
                ));
            }
            return value.to_string();
        };
        format!("{mux}{new}")
    }
}

/// A socket chardev is a server unless `server=off` (the default for `-chardev socket` is
/// client, but the compat `unix:` form without `server` is a client too).
fn socket_is_server(kv: &KeyVal) -> bool {
    kv.params.iter().any(|param| match param {
        Param::Pair(key, value) => {
            key == "server" && matches!(value.as_str(), "on" | "yes" | "true")
        }
        Param::Bare(flag) => flag == "server",
    })
}

/// Adapts a rewritten command line for an unattended test boot: the accelerator (TCG unless
/// `accel` keeps the recorded one), no `-S`, no displays, networks cut off (`user` with
/// `restrict=on`, so a restored copy never meets the original's network), and a QMP monitor
/// of the test's own at `qmp_socket`. Returns the argv and what was changed.
pub fn for_boot_test(
    argv: &[String],
    accel: BootAccel,
    qmp_socket: &Path,
) -> Result<(Vec<String>, Vec<String>)> {
    let Some(line) = CommandLine::parse(argv) else {
        return Err(definition_error("the command line is empty"));
    };
    let mut notes = Vec::new();
    let mut items = Vec::new();
    let mut has_accel = false;
    // `-display none` or `-nographic` already there (they exclude each other).
    let mut headless = false;
    for mut item in line.items {
        let name = item.name().unwrap_or_default().to_string();
        let value = item.value().map(str::to_string);
        match (name.as_str(), value) {
            ("enable-kvm", _) if accel == BootAccel::Tcg => {
                notes.push("-enable-kvm replaced by TCG for the boot test".into());
            }
            ("accel", Some(value)) if accel == BootAccel::Tcg => {
                has_accel = true;
                let kv = KeyVal::parse(&value);
                if kv.get("accel", Some("accel")) != Some("tcg") {
                    notes.push(format!("-accel {value} replaced by TCG for the boot test"));
                    item.set_value("tcg".into());
                }
                items.push(item);
            }
            ("machine" | "M", Some(value)) if accel == BootAccel::Tcg => {
                let mut kv = KeyVal::parse(&value);
                if let Some(chosen) = kv.get("accel", None).map(str::to_string) {
                    // `-accel` and `-machine accel=` exclude each other.
                    has_accel = true;
                    if chosen != "tcg" {
                        notes.push(format!(
                            "-machine accel={chosen} replaced by TCG for the boot test"
                        ));
                        kv.set("accel", "tcg", None);
                        item.set_value(kv.render());
                    }
                }
                items.push(item);
            }
            ("cpu", Some(value)) if accel == BootAccel::Tcg => {
                let mut kv = KeyVal::parse(&value);
                // `host` passes the host CPU through, which only KVM can; `max` is TCG's
                // closest model.
                if kv.get("model", Some("model")) == Some("host") {
                    kv.set("model", "max", Some("model"));
                    notes.push("-cpu host replaced by -cpu max for TCG".into());
                    item.set_value(kv.render());
                }
                items.push(item);
            }
            ("S", _) => notes.push("-S dropped: the boot test needs the VM to run".into()),
            ("display", Some(value)) if value == "none" => {
                headless = true;
                items.push(item);
            }
            ("vnc" | "spice" | "display", Some(value)) => {
                notes.push(format!(
                    "-{name} {value} dropped for the boot test (no display)"
                ));
            }
            ("nographic", _) => {
                headless = true;
                items.push(item);
            }
            ("netdev", Some(value)) => {
                let kv = KeyVal::parse(&value);
                let id = kv.get("id", None).unwrap_or_default();
                let mut isolated = KeyVal::parse("user,restrict=on");
                isolated.set("id", id, None);
                notes.push(format!(
                    "network {id} cut off for the boot test (user networking, restrict=on)"
                ));
                item.set_value(isolated.render());
                items.push(item);
            }
            ("nic", Some(value)) => {
                let kv = KeyVal::parse(&value);
                if kv.get("type", Some("type")) != Some("none") {
                    let mut isolated = KeyVal::parse("user,restrict=on");
                    for key in ["model", "mac", "id"] {
                        if let Some(v) = kv.get(key, None) {
                            isolated.set(key, v, None);
                        }
                    }
                    notes.push(
                        "-nic cut off for the boot test (user networking, restrict=on)".into(),
                    );
                    item.set_value(isolated.render());
                }
                items.push(item);
            }
            ("net", Some(value)) => {
                notes.push(format!("-net {value} dropped for the boot test"));
            }
            _ => items.push(item),
        }
    }
    if accel == BootAccel::Tcg && !has_accel {
        items.push(Item::option("accel", Some("tcg")));
    }
    if !headless {
        items.push(Item::option("display", Some("none")));
    }
    let mut monitor = KeyVal {
        params: vec![Param::Bare(qmp_socket.display().to_string())],
    };
    monitor.set("server", "on", None);
    monitor.set("wait", "off", None);
    items.push(Item::option(
        "qmp",
        Some(&format!("unix:{}", monitor.render())),
    ));
    let line = CommandLine {
        program: line.program,
        items,
    };
    Ok((line.to_argv(), notes))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn definition(argv: Vec<String>, disks: &[(&str, &str, &str)]) -> VmDefinition {
        VmDefinition {
            kind: "qemu".into(),
            argv,
            disks: disks
                .iter()
                .map(|(id, image, format)| DefinedDisk {
                    id: id.to_string(),
                    image: image.to_string(),
                    format: format.to_string(),
                })
                .collect(),
        }
    }

    fn target(id: &str, path: &str, format: &str) -> TargetDisk {
        TargetDisk {
            id: id.into(),
            path: PathBuf::from(path),
            format: format.into(),
        }
    }

    /// The value after the `n`-th (0-based) occurrence of `option`.
    fn value_of<'a>(argv: &'a [String], option: &str, n: usize) -> &'a str {
        argv.iter()
            .enumerate()
            .filter(|(_, a)| *a == option)
            .nth(n)
            .map(|(i, _)| argv[i + 1].as_str())
            .unwrap_or_else(|| panic!("no {option} #{n} in {argv:?}"))
    }

    fn json_of(text: &str) -> Value {
        serde_json::from_str(text).expect("JSON")
    }

    /// The command line `stillpoint vm run` / the test launcher gives QEMU (testvm's
    /// `demo_vm_command_line` fixture), as `/proc/PID/cmdline` records it.
    fn testvm_argv() -> Vec<String> {
        argv(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "demo",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "file:/r/vms/demo/console.log",
            "-kernel",
            "/cache/vmlinuz",
            "-initrd",
            "/r/vms/demo/initramfs.cpio.gz",
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"/r/vms/demo/disk0.qcow2"}}"#,
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0,serial=stillpoint-disk0",
            "-chardev",
            "socket,path=/r/vms/demo/qga.sock,server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp",
            "unix:/r/vms/demo/qmp.sock,server=on,wait=off",
        ])
    }

    #[test]
    fn testvm_line_restored_raw() {
        let recorded = definition(
            testvm_argv(),
            &[("vd0", "/r/vms/demo/disk0.qcow2", "qcow2")],
        );
        let out = rewrite_definition(
            &recorded,
            &[target("vd0", "/restore/vd0.raw", "raw")],
            Path::new("/restore/run"),
        )
        .expect("rewrite");
        let a = &out.argv;
        assert_eq!(a.len(), recorded.argv.len(), "nothing added or dropped");
        assert_eq!(
            json_of(value_of(a, "-blockdev", 0)),
            json!({"driver": "raw", "node-name": "disk0",
                   "file": {"driver": "file", "filename": "/restore/vd0.raw"}})
        );
        assert_eq!(value_of(a, "-serial", 0), "file:/restore/run/console.log");
        assert_eq!(
            value_of(a, "-chardev", 0),
            "socket,path=/restore/run/qga0.sock,server=on,wait=off,id=qga0"
        );
        assert_eq!(
            value_of(a, "-qmp", 0),
            "unix:/restore/run/qmp.sock,server=on,wait=off"
        );
        // Untouched: kernel, initrd, devices, accelerator.
        assert_eq!(value_of(a, "-kernel", 0), "/cache/vmlinuz");
        assert_eq!(value_of(a, "-initrd", 0), "/r/vms/demo/initramfs.cpio.gz");
        assert_eq!(value_of(a, "-accel", 0), "tcg,thread=multi");
        assert_eq!(
            value_of(a, "-device", 0),
            "virtio-blk-pci,drive=disk0,id=vd0,serial=stillpoint-disk0"
        );
        assert_eq!(
            out.agent_socket,
            Some(PathBuf::from("/restore/run/qga0.sock"))
        );
        assert_eq!(out.qmp_socket, Some(PathBuf::from("/restore/run/qmp.sock")));
        assert_eq!(
            out.console_log,
            Some(PathBuf::from("/restore/run/console.log"))
        );
        assert_eq!(
            out.disks,
            vec![DefinedDisk {
                id: "vd0".into(),
                image: "/restore/vd0.raw".into(),
                format: "raw".into()
            }]
        );
        let external: Vec<&str> = out
            .external_files
            .iter()
            .map(|f| f.option.as_str())
            .collect();
        assert_eq!(external, ["kernel", "initrd"]);
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("-kernel /cache/vmlinuz is not part of the snapshot")),
            "{:?}",
            out.notes
        );
        assert!(
            out.notes.iter().any(|n| n.contains("format qcow2 → raw")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn testvm_line_restored_qcow2_keeps_the_driver_and_its_text() {
        let recorded = definition(
            testvm_argv(),
            &[("vd0", "/r/vms/demo/disk0.qcow2", "qcow2")],
        );
        let out = rewrite_definition(
            &recorded,
            &[target("vd0", "/restore/vd0.qcow2", "qcow2")],
            Path::new("/restore/run"),
        )
        .expect("rewrite");
        assert_eq!(
            json_of(value_of(&out.argv, "-blockdev", 0)),
            json!({"driver": "qcow2", "node-name": "disk0",
                   "file": {"driver": "file", "filename": "/restore/vd0.qcow2"}})
        );
        assert!(
            !out.notes.iter().any(|n| n.contains("format")),
            "{:?}",
            out.notes
        );
    }

    /// The plain `-drive file=…,if=virtio,format=…` form (as a hand-written QEMU line has it) plus the
    /// options that go or move: -daemonize, -pidfile, -D, -monitor, a second serial, tcp.
    #[test]
    fn drive_form_and_the_options_that_are_dropped_or_moved() {
        let recorded = definition(
            argv(&[
                "qemu-system-x86_64",
                "-name",
                "web,process=qemu-web",
                "-daemonize",
                "-pidfile",
                "/var/run/web.pid",
                "-D",
                "/var/log/web-debug.log",
                "-drive",
                "file=/vms/web.qcow2,if=virtio,id=drive0,format=qcow2,lazy-refcounts=on,cache=none",
                "-serial",
                "file:/vms/web-console.log",
                "-serial",
                "unix:/vms/web-serial.sock,server,nowait",
                "-monitor",
                "unix:/vms/web-hmp.sock,server=on,wait=off",
                "-monitor",
                "tcp:127.0.0.1:4444,server=on,wait=off",
                "-chardev",
                "file,id=trace,path=/vms/trace.out",
                "-chardev",
                "socket,id=ext,path=/run/swtpm.sock",
                "-incoming",
                "defer",
            ]),
            &[("drive0", "/vms/web.qcow2", "qcow2")],
        );
        let out = rewrite_definition(
            &recorded,
            &[target("drive0", "/r/drive0.raw", "raw")],
            Path::new("/r/run"),
        )
        .expect("rewrite");
        let expected = argv(&[
            "qemu-system-x86_64",
            "-name",
            "web,process=qemu-web",
            "-D",
            "/r/run/qemu-debug.log",
            "-drive",
            "file=/r/drive0.raw,if=virtio,id=drive0,format=raw,cache=none",
            "-serial",
            "file:/r/run/console.log",
            "-serial",
            "unix:/r/run/serial1.sock,server,nowait",
            "-monitor",
            "unix:/r/run/monitor.sock,server=on,wait=off",
            "-monitor",
            "tcp:127.0.0.1:4444,server=on,wait=off",
            "-chardev",
            "file,id=trace,path=/r/run/trace.log",
            "-chardev",
            "socket,id=ext,path=/run/swtpm.sock",
        ]);
        assert_eq!(out.argv, expected);
        let notes = out.notes.join("\n");
        for expected in [
            "-daemonize was dropped",
            "-pidfile /var/run/web.pid was dropped",
            "-incoming defer was dropped",
            "dropped lazy-refcounts",
            "`tcp:127.0.0.1:4444,server=on,wait=off` listens on the network",
            "chardev ext connects to the external socket /run/swtpm.sock",
        ] {
            assert!(notes.contains(expected), "{expected:?} not in:\n{notes}");
        }
        assert_eq!(out.agent_socket, None);
        assert_eq!(out.qmp_socket, None);
    }

    /// `-blockdev` in key=value form: a separate file node referred to by name, and a format
    /// node with its file inline (dotted keys) and an implied driver.
    #[test]
    fn keyval_blockdevs_separate_and_inline() {
        let recorded = definition(
            argv(&[
                "qemu",
                "-blockdev",
                "driver=file,node-name=proto0,filename=/vms/a.qcow2,aio=threads",
                "-blockdev",
                "driver=qcow2,node-name=fmt0,file=proto0,l2-cache-size=1M,backing=base0,cache.direct=on",
                "-blockdev",
                "qcow2,node-name=fmt1,file.driver=file,file.filename=/vms/b,,x.qcow2,discard=unmap,lazy-refcounts=on",
                "-device",
                "virtio-blk-pci,drive=fmt0,id=vda",
                "-device",
                "virtio-blk-pci,drive=fmt1,id=vdb",
            ]),
            &[
                ("vda", "/vms/a.qcow2", "qcow2"),
                ("vdb", "/vms/b,x.qcow2", "qcow2"),
            ],
        );
        let out = rewrite_definition(
            &recorded,
            &[
                target("vda", "/r/vda.raw", "raw"),
                target("vdb", "/r/vdb.raw", "raw"),
            ],
            Path::new("/r/run"),
        )
        .expect("rewrite");
        assert_eq!(
            value_of(&out.argv, "-blockdev", 0),
            "driver=file,node-name=proto0,filename=/r/vda.raw,aio=threads"
        );
        assert_eq!(
            value_of(&out.argv, "-blockdev", 1),
            "driver=raw,node-name=fmt0,file=proto0,cache.direct=on"
        );
        assert_eq!(
            value_of(&out.argv, "-blockdev", 2),
            "raw,node-name=fmt1,file.driver=file,file.filename=/r/vdb.raw,discard=unmap"
        );
    }

    /// JSON `-blockdev`s: a separate file node, and a format node that names it and a
    /// backing node; a qcow2 restore keeps the driver but drops the backing reference.
    #[test]
    fn json_blockdevs_with_a_separate_file_node_and_backing() {
        let recorded = definition(
            argv(&[
                "qemu",
                "-blockdev",
                r#"{"driver":"file","node-name":"base-file","filename":"/vms/base.qcow2","read-only":true}"#,
                "-blockdev",
                r#"{"driver":"file","node-name":"top-file","filename":"/vms/top.qcow2"}"#,
                "-blockdev",
                r#"{"driver":"qcow2","node-name":"top","file":"top-file","backing":"base","cache":{"direct":true}}"#,
            ]),
            &[("vda", "/vms/top.qcow2", "qcow2")],
        );
        let out = rewrite_definition(
            &recorded,
            &[target("vda", "/r/vda.qcow2", "qcow2")],
            Path::new("/r/run"),
        )
        .expect("rewrite");
        // Not a restored image: the very same text.
        assert_eq!(
            value_of(&out.argv, "-blockdev", 0),
            recorded.argv[2].as_str()
        );
        assert_eq!(
            json_of(value_of(&out.argv, "-blockdev", 1)),
            json!({"driver": "file", "node-name": "top-file", "filename": "/r/vda.qcow2"})
        );
        assert_eq!(
            json_of(value_of(&out.argv, "-blockdev", 2)),
            json!({"driver": "qcow2", "node-name": "top", "file": "top-file",
                   "cache": {"direct": true}})
        );
        assert!(
            out.notes.iter().any(|n| n.contains("dropped backing")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn legacy_hda_and_a_bare_image_become_drives_with_an_explicit_format() {
        let recorded = definition(
            argv(&[
                "qemu",
                "/vms/root.img",
                "-hdb",
                "/vms/data.qcow2",
                "-m",
                "1G",
            ]),
            &[
                ("ide0-hd0", "/vms/root.img", "raw"),
                ("ide0-hd1", "/vms/data.qcow2", "qcow2"),
            ],
        );
        let out = rewrite_definition(
            &recorded,
            &[
                target("ide0-hd0", "/r/ide0-hd0.raw", "raw"),
                target("ide0-hd1", "/r/ide0-hd1.raw", "raw"),
            ],
            Path::new("/r/run"),
        )
        .expect("rewrite");
        assert_eq!(
            out.argv,
            argv(&[
                "qemu",
                "-drive",
                "file=/r/ide0-hd0.raw,format=raw,index=0,media=disk",
                "-drive",
                "file=/r/ide0-hd1.raw,format=raw,index=1,media=disk",
                "-m",
                "1G",
            ])
        );
    }

    #[test]
    fn a_disk_that_was_not_restored_keeps_its_image_and_is_listed() {
        let mut line = testvm_argv();
        line.extend(argv(&[
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"disk1","file":{"driver":"file","filename":"/r/vms/demo/disk1.qcow2"}}"#,
        ]));
        let recorded = definition(
            line,
            &[
                ("vd0", "/r/vms/demo/disk0.qcow2", "qcow2"),
                ("vd1", "/r/vms/demo/disk1.qcow2", "qcow2"),
            ],
        );
        let out = rewrite_definition(
            &recorded,
            &[target("vd1", "/x/vd1.qcow2", "qcow2")],
            Path::new("/x/run"),
        )
        .expect("rewrite");
        assert_eq!(out.unrestored_disks, ["vd0"]);
        assert!(
            value_of(&out.argv, "-blockdev", 0).contains("/r/vms/demo/disk0.qcow2"),
            "{:?}",
            out.argv
        );
        assert!(value_of(&out.argv, "-blockdev", 1).contains("/x/vd1.qcow2"));
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("disk vd0 was not restored")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn bad_definitions_are_errors_that_say_where() {
        let disks = [("vd0", "/vms/a.qcow2", "qcow2")];
        let targets = [target("vd0", "/r/vd0.raw", "raw")];
        let run = Path::new("/r/run");

        let broken = definition(
            argv(&["qemu", "-m", "1G", "-blockdev", "{\"driver\": \"qcow2\","]),
            &disks,
        );
        let error = rewrite_definition(&broken, &targets, run).expect_err("bad JSON");
        assert_eq!(error.kind(), PlatformErrorKind::VmDefinition);
        assert_eq!(error.to_string(), "argument 3 (-blockdev): not valid JSON");

        let elsewhere = definition(argv(&["qemu", "-m", "1G"]), &disks);
        let error = rewrite_definition(&elsewhere, &targets, run).expect_err("no image");
        assert_eq!(
            error.to_string(),
            "disk vd0: its image /vms/a.qcow2 does not appear in the recorded command line, \
             so the line cannot be pointed at the restored file"
        );

        let mut other = definition(argv(&["cloud-hypervisor"]), &disks);
        other.kind = "cloud-hypervisor".into();
        let error = rewrite_definition(&other, &targets, run).expect_err("kind");
        assert!(
            error.to_string().contains("kind `cloud-hypervisor`"),
            "{error}"
        );

        let empty = definition(Vec::new(), &disks);
        let error = rewrite_definition(&empty, &targets, run).expect_err("empty");
        assert!(error.to_string().contains("empty"), "{error}");
    }

    #[test]
    fn sockets_too_long_for_unix_are_noted() {
        let recorded = definition(
            testvm_argv(),
            &[("vd0", "/r/vms/demo/disk0.qcow2", "qcow2")],
        );
        let deep = format!("/{}/run", "d".repeat(110));
        let out = rewrite_definition(
            &recorded,
            &[target("vd0", "/r/vd0.raw", "raw")],
            Path::new(&deep),
        )
        .expect("rewrite");
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("more than the 107 a unix socket path can have")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn boot_test_line_runs_tcg_without_display_network_or_pause() {
        let line = argv(&[
            "qemu",
            "-enable-kvm",
            "-cpu",
            "host,-cx16",
            "-S",
            "-vnc",
            ":1",
            "-netdev",
            "tap,id=net0,ifname=tap0,script=no",
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-nic",
            "bridge,br=br0,model=e1000,mac=52:54:00:00:00:01",
            "-net",
            "nic",
            "-m",
            "1G",
        ]);
        let (out, notes) =
            for_boot_test(&line, BootAccel::Tcg, Path::new("/t/run/q,x.sock")).expect("adapt");
        assert_eq!(
            out,
            argv(&[
                "qemu",
                "-cpu",
                "max,-cx16",
                "-netdev",
                "user,restrict=on,id=net0",
                "-device",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
                "-nic",
                "user,restrict=on,model=e1000,mac=52:54:00:00:00:01",
                "-m",
                "1G",
                "-accel",
                "tcg",
                "-display",
                "none",
                "-qmp",
                "unix:/t/run/q,,x.sock,server=on,wait=off",
            ])
        );
        let notes = notes.join("\n");
        for expected in [
            "-enable-kvm replaced by TCG",
            "-cpu host replaced",
            "-S dropped",
        ] {
            assert!(notes.contains(expected), "{expected:?} not in:\n{notes}");
        }

        // The accelerator the line names is replaced in place, and `-machine accel=`
        // excludes a second `-accel`.
        let (out, _) = for_boot_test(
            &argv(&["qemu", "-accel", "kvm,kernel-irqchip=on", "-nographic"]),
            BootAccel::Tcg,
            Path::new("/q"),
        )
        .expect("adapt");
        assert_eq!(
            out,
            argv(&[
                "qemu",
                "-accel",
                "tcg",
                "-nographic",
                "-qmp",
                "unix:/q,server=on,wait=off"
            ])
        );
        let (out, _) = for_boot_test(
            &argv(&["qemu", "-machine", "q35,accel=kvm"]),
            BootAccel::Tcg,
            Path::new("/q"),
        )
        .expect("adapt");
        assert_eq!(value_of(&out, "-machine", 0), "q35,accel=tcg");
        assert!(!out.contains(&"-accel".to_string()), "{out:?}");

        // Asked to keep the recorded accelerator: KVM stays.
        let (out, notes) = for_boot_test(
            &argv(&["qemu", "-accel", "kvm", "-cpu", "host"]),
            BootAccel::AsRecorded,
            Path::new("/q"),
        )
        .expect("adapt");
        assert_eq!(value_of(&out, "-accel", 0), "kvm");
        assert_eq!(value_of(&out, "-cpu", 0), "host");
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn boot_test_of_the_testvm_line_only_adds_its_monitor() {
        let (out, notes) =
            for_boot_test(&testvm_argv(), BootAccel::Tcg, Path::new("/t/q.sock")).expect("adapt");
        let mut expected = testvm_argv();
        expected.extend(argv(&["-qmp", "unix:/t/q.sock,server=on,wait=off"]));
        assert_eq!(out, expected);
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// The rewritten forms as real QEMU reads them: every restored file attached, as raw,
    /// and the options of the old format gone (QEMU refuses unknown options).
    #[test]
    fn real_qemu_accepts_the_rewritten_disks_as_raw() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = |name: &str| {
            let path = dir.path().join(name);
            let created = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&path)
                .arg("1M")
                .status()
                .expect("qemu-img runs");
            assert!(created.success());
            path
        };
        let restored = [
            target("vda", file("vda.raw").to_str().unwrap(), "raw"),
            target("vdb", file("vd,b.raw").to_str().unwrap(), "raw"),
            target("drive0", file("drive0.raw").to_str().unwrap(), "raw"),
            target("ide0-hd0", file("ide0-hd0.raw").to_str().unwrap(), "raw"),
        ];
        let recorded = definition(
            argv(&[
                "qemu-system-x86_64",
                "-nodefaults",
                "-display",
                "none",
                "-blockdev",
                r#"{"driver":"file","node-name":"proto0","filename":"/vms/a.qcow2"}"#,
                "-blockdev",
                r#"{"driver":"qcow2","node-name":"fmt0","file":"proto0","l2-cache-size":1048576}"#,
                "-device",
                "virtio-blk-pci,drive=fmt0,id=vda",
                "-blockdev",
                "qcow2,node-name=fmt1,file.driver=file,file.filename=/vms/b.qcow2,lazy-refcounts=on",
                "-device",
                "virtio-blk-pci,drive=fmt1,id=vdb",
                "-drive",
                "file=/vms/c.qcow2,if=virtio,id=drive0,format=qcow2,cache-size=2M",
                "-hda",
                "/vms/d.qcow2",
            ]),
            &[
                ("vda", "/vms/a.qcow2", "qcow2"),
                ("vdb", "/vms/b.qcow2", "qcow2"),
                ("drive0", "/vms/c.qcow2", "qcow2"),
                ("ide0-hd0", "/vms/d.qcow2", "qcow2"),
            ],
        );
        let out =
            rewrite_definition(&recorded, &restored, &dir.path().join("run")).expect("rewrite");
        let mut qemu = std::process::Command::new(&out.argv[0])
            .args(&out.argv[1..])
            .args(["-S", "-monitor", "stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("QEMU starts");
        {
            use std::io::Write as _;
            let mut stdin = qemu.stdin.take().expect("stdin");
            stdin
                .write_all(b"info block\nquit\n")
                .expect("monitor input");
        }
        let output = qemu.wait_with_output().expect("QEMU ends");
        let text = String::from_utf8_lossy(&output.stdout).replace('\r', "");
        assert!(
            output.status.success(),
            "QEMU refused {:?}: {}",
            out.argv,
            String::from_utf8_lossy(&output.stderr)
        );
        for disk in &restored {
            let attached = format!("{} (raw)", disk.path.display());
            assert!(text.contains(&attached), "{attached} not in:\n{text}");
        }
    }
}
