//! Restore of a snapshot into a directory: the disks, what is needed to start the VM again,
//! and an optional boot test.
//!
//! A restore writes, into the target directory `DIR`:
//! - `<disk>.raw` or `<disk>.qcow2` for every chosen disk (sparse; see
//!   `Repository::restore_disk`);
//! - the files of the restored VM's definition, when the snapshot recorded how its VM was
//!   started: the platform that wrote the definition rewrites it for the restored files
//!   (QEMU: `vm-definition.json` and `start-vm.sh`, sockets and logs under `DIR/run/`);
//! - `snapshot.json`: which snapshot this is (id, VM, time, requested/achieved level,
//!   indications) and what the restore noted.
//!
//! This module is platform-neutral orchestration: read the snapshot, write the disks, call
//! the restore capability of the platform that wrote the recorded definition
//! ([`stillpoint_platform::restorer_for`], held as `Arc<dyn VmRestore>`), report. How a
//! definition is rewritten and how a restored VM boots is the platform's
//! (`stillpoint_platform::qemu::restore` for QEMU).
//!
//! Invariants:
//! - Plan, then execute: [`plan_restore`] is a pure function of the manifest and the request
//!   (which disks, file names, the restored definition and its files); [`restore_snapshot`]
//!   carries it out.
//! - Nothing half-written ever carries a final name: every file is written into a staging
//!   directory inside `DIR` and renamed into place only when all of them are complete; a
//!   failed restore removes the staging directory. A restore killed outright (SIGKILL) cannot
//!   remove its own: the staging directory is locked by its restore while it lives, and the
//!   next restore into `DIR` removes every staging directory whose restore is gone
//!   ([`staging`]).
//! - A file that already exists is never overwritten without `force`.
//! - Every error names the snapshot and, where there is one, the disk and the path;
//!   repository damage keeps the repository's offset (invariant 4).
//! - The boot test ([`boot_test()`]) never writes to the restored files (the platform runs the
//!   guest on overlays, removed afterwards).

pub mod staging;
mod target;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use stillpoint_platform::restore::{DefineRequest, RestoreOrigin};
use stillpoint_platform::{PlatformError, PlatformErrorKind, VmDefinition};
use stillpoint_repo::{ImageFormat, Manifest, Repository, RestoreOptions, RestoreStats};

pub use stillpoint_platform::restore::{
    BootAccel, BootFilesystem, BootTestReport, BootTestRequest, DefinitionFile, FileRole,
    RestoredDefinition, TargetDisk,
};

use crate::error::{EngineError, EngineErrorKind, Result, error_chain};

/// What was restored.
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// Reached after each disk is written into the staging directory, before the next one (and
/// before anything is renamed into place). A test pauses a restore here and kills it
/// (`FAILPOINTS='restore::disk-staged=pause'`; docs/restore.md).
pub const FAILPOINT_DISK_STAGED: &str = "restore::disk-staged";

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The target directory (created when missing).
    pub target: PathBuf,
    pub format: ImageFormat,
    /// Disk ids to restore; empty: every disk of the snapshot.
    pub disks: Vec<String>,
    /// Replace files an earlier restore left in the target.
    pub force: bool,
    /// Fill damaged chunks with zeros (and report them) instead of failing.
    pub zero_fill_damaged: bool,
}

/// Told about the disks' progress (progress bars); called from the restore's threads.
pub trait RestoreProgress: Sync {
    fn disk_started(&self, disk: &str, size: u64);
    fn advanced(&self, disk: &str, bytes: u64);
    fn disk_finished(&self, disk: &str);
}

/// Progress nobody watches.
pub struct NoRestoreProgress;

impl RestoreProgress for NoRestoreProgress {
    fn disk_started(&self, _: &str, _: u64) {}
    fn advanced(&self, _: &str, _: u64) {}
    fn disk_finished(&self, _: &str) {}
}

/// One disk a plan restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDisk {
    pub id: String,
    pub size: u64,
    /// The file name in the target directory.
    pub file_name: String,
}

/// What a restore will do (pure: from the manifest and the request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestorePlan {
    pub snapshot: String,
    /// Absolute target directory.
    pub target: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub disks: Vec<PlannedDisk>,
    /// The definition as the snapshot recorded it.
    pub recorded_definition: Option<VmDefinition>,
    /// The definition for the restored files, as the platform that wrote the recorded one
    /// rewrote it; `None` when there is none to write.
    pub definition: Option<RestoredDefinition>,
    /// Every file name the restore writes into the target.
    pub files: Vec<String>,
    pub notes: Vec<String>,
}

/// One restored disk.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    /// The disk id (the old CLI output called it `disk`; kept for scripts).
    #[serde(rename = "disk")]
    pub id: String,
    pub path: PathBuf,
    pub format: String,
    pub stats: RestoreStats,
    pub seconds: f64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    pub snapshot: SnapshotSummary,
    pub target: PathBuf,
    pub disks: Vec<RestoredDisk>,
    /// The restored definition's own file (QEMU: `DIR/vm-definition.json`), when written.
    pub definition_file: Option<PathBuf>,
    /// What starts the restored VM (QEMU: `DIR/start-vm.sh`), when written.
    pub script_file: Option<PathBuf>,
    pub snapshot_file: PathBuf,
    #[serde(skip)]
    pub recorded_definition: Option<VmDefinition>,
    pub definition: Option<RestoredDefinition>,
    pub notes: Vec<String>,
}

impl RestoreOutcome {
    /// Offsets zero-filled because their chunks were damaged, over all disks.
    pub fn damaged_chunks(&self) -> usize {
        self.disks
            .iter()
            .map(|d| d.stats.damaged_offsets.len())
            .sum()
    }

    /// The restored disks as the boot test takes them.
    pub fn target_disks(&self) -> Vec<TargetDisk> {
        self.disks
            .iter()
            .map(|d| TargetDisk {
                id: d.id.clone(),
                path: d.path.clone(),
                format: d.format.clone(),
            })
            .collect()
    }
}

/// The snapshot facts written to `snapshot.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub id: String,
    pub vm: String,
    pub platform: Option<String>,
    /// Capture time, RFC 3339.
    pub time: String,
    pub hostname: String,
    pub parent: Option<String>,
    pub requested: Option<String>,
    pub achieved: Option<String>,
    pub indications: Vec<String>,
}

impl SnapshotSummary {
    fn of(manifest: &Manifest) -> Self {
        Self {
            id: manifest.id.clone(),
            vm: manifest.vm.clone(),
            platform: manifest.platform.clone(),
            // The manifest's own form (RFC 3339, UTC, `Z`).
            time: serde_json::to_value(manifest.time)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            hostname: manifest.hostname.clone(),
            parent: manifest.parent.clone(),
            requested: manifest.requested.clone(),
            achieved: manifest.achieved.clone(),
            indications: manifest.indications.clone(),
        }
    }

    /// What the platform's definition files say about where they come from.
    fn origin(&self) -> RestoreOrigin {
        RestoreOrigin {
            vm: self.vm.clone(),
            snapshot: self.id.clone(),
            time: self.time.clone(),
            achieved: self.achieved.clone(),
        }
    }
}

/// `raw` / `qcow2`.
pub fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    }
}

/// A file name for a disk (disk names may contain `/`: escaped injectively, so two disks
/// never share a file; an image snapshot's `disk.raw` restores to `disk.raw`, not
/// `disk.raw.raw`).
pub fn disk_file_name(disk: &str, format: ImageFormat) -> String {
    let safe = stillpoint_os::names::file_name(disk);
    let stem = [".raw", ".img", ".qcow2"]
        .iter()
        .find_map(|suffix| safe.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty() && *stem != "." && *stem != "..")
        .unwrap_or(&safe);
    format!("{stem}.{}", format_name(format))
}

/// The VM definition the snapshot recorded (in its report), if any. `Err` holds why a
/// recorded one cannot be read.
pub fn recorded_definition(
    manifest: &Manifest,
) -> std::result::Result<Option<VmDefinition>, String> {
    match manifest.report.get("vm_definition") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|error| {
                format!("the snapshot's recorded VM definition is not readable: {error}")
            }),
    }
}

/// Plans the restore of `manifest` into the absolute directory `target`.
pub fn plan_restore(
    manifest: &Manifest,
    request: &RestoreRequest,
    target: &Path,
) -> Result<RestorePlan> {
    let chosen: Vec<&stillpoint_repo::DiskEntry> = if request.disks.is_empty() {
        manifest.disks.iter().collect()
    } else {
        let mut seen = BTreeSet::new();
        let mut chosen = Vec::new();
        for id in &request.disks {
            let disk = manifest.disk(id).map_err(|error| {
                EngineError::new(
                    EngineErrorKind::Restore,
                    format!("snapshot {} cannot restore disk {id}", manifest.id),
                )
                .with_source(error)
            })?;
            if seen.insert(disk.name.as_str()) {
                chosen.push(disk);
            }
        }
        chosen
    };
    let mut disks = Vec::new();
    let mut files = Vec::new();
    for disk in &chosen {
        let file_name = disk_file_name(&disk.name, request.format);
        if files.contains(&file_name) {
            return Err(EngineError::new(
                EngineErrorKind::Restore,
                format!(
                    "snapshot {}: two disks would both be restored to {file_name}; restore \
                     them one at a time with --disk",
                    manifest.id
                ),
            ));
        }
        files.push(file_name.clone());
        disks.push(PlannedDisk {
            id: disk.name.clone(),
            size: disk.size,
            file_name,
        });
    }
    let mut notes = Vec::new();
    let image_snapshot = manifest
        .platform
        .as_deref()
        .is_some_and(|p| p.starts_with("image:"));
    let recorded = match recorded_definition(manifest) {
        Ok(recorded) => recorded,
        Err(why) => {
            notes.push(format!("{why}; only the disks were restored"));
            None
        }
    };
    let definition = match &recorded {
        None if image_snapshot => {
            notes.push(
                "an image snapshot has no VM definition: only the disks were restored".into(),
            );
            None
        }
        None => {
            if notes.is_empty() {
                notes.push(
                    "the snapshot recorded no VM definition (its platform could not read how \
                     the VM was started, e.g. a VM of another host or user): only the disks \
                     were restored"
                        .into(),
                );
            }
            None
        }
        Some(recorded) => {
            let targets: Vec<TargetDisk> = disks
                .iter()
                .map(|d| TargetDisk {
                    id: d.id.clone(),
                    path: target.join(&d.file_name),
                    format: format_name(request.format).to_string(),
                })
                .collect();
            let origin = SnapshotSummary::of(manifest).origin();
            let defined = stillpoint_platform::restorer_for(recorded).and_then(|restorer| {
                restorer.define(&DefineRequest {
                    recorded,
                    disks: &targets,
                    target,
                    origin: &origin,
                })
            });
            let defined = defined
                .map_err(|error| error_chain(&error))
                .and_then(|defined| match defined_file_clash(&defined, &files) {
                    Some(clash) => Err(clash),
                    None => Ok(defined),
                });
            match defined {
                Ok(defined) => {
                    files.extend(defined.files.iter().map(|f| f.name.clone()));
                    Some(defined)
                }
                Err(why) => {
                    notes.push(format!(
                        "the recorded VM definition cannot be used for the restored disks \
                         ({why}): only the disks were restored"
                    ));
                    None
                }
            }
        }
    };
    files.push(SNAPSHOT_FILE.to_string());
    Ok(RestorePlan {
        snapshot: manifest.id.clone(),
        target: target.to_path_buf(),
        format: format_name(request.format).to_string(),
        disks,
        recorded_definition: recorded,
        definition,
        files,
        notes,
    })
}

/// Restores `manifest` as `request` says. Blocking (the disk restores run on threads).
pub fn restore_snapshot(
    repo: &Repository,
    manifest: &Manifest,
    request: &RestoreRequest,
    progress: &dyn RestoreProgress,
) -> Result<RestoreOutcome> {
    let created = !request.target.exists();
    let result = restore_into(repo, manifest, request, progress);
    if result.is_err() && created {
        // Only removes the directory if the failed restore left it empty.
        let _ = std::fs::remove_dir(&request.target);
    }
    result
}

fn restore_into(
    repo: &Repository,
    manifest: &Manifest,
    request: &RestoreRequest,
    progress: &dyn RestoreProgress,
) -> Result<RestoreOutcome> {
    let io_error = |what: String, error: std::io::Error| {
        EngineError::new(
            EngineErrorKind::Restore,
            format!("snapshot {}: {what}", manifest.id),
        )
        .with_source(error)
    };
    // Checked before anything is created, so a refused restore leaves no trace.
    target::check_target(
        &request.target,
        &planned_names(manifest, request),
        request.force,
    )?;
    std::fs::create_dir_all(&request.target).map_err(|e| {
        io_error(
            format!(
                "cannot create the target directory {}",
                request.target.display()
            ),
            e,
        )
    })?;
    let target = request.target.canonicalize().map_err(|e| {
        io_error(
            format!(
                "cannot resolve the target directory {}",
                request.target.display()
            ),
            e,
        )
    })?;
    let plan = plan_restore(manifest, request, &target)?;
    target::check_target(&target, &plan.files, request.force)?;

    let mut notes = plan.notes.clone();
    notes.extend(sweep_staging(&target));
    let staging = staging::Staging::create(&target).map_err(|e| {
        io_error(
            format!("cannot create a staging directory in {}", target.display()),
            e,
        )
    })?;
    let mut restored = Vec::new();
    for disk in &plan.disks {
        let staged = staging.path().join(&disk.file_name);
        let final_path = target.join(&disk.file_name);
        progress.disk_started(&disk.id, disk.size);
        let advance = |bytes: u64| progress.advanced(&disk.id, bytes);
        let started = Instant::now();
        let stats = repo.restore_disk(
            manifest,
            &disk.id,
            &staged,
            request.format,
            RestoreOptions {
                zero_fill_damaged: request.zero_fill_damaged,
                ..Default::default()
            },
            Some(&advance),
        );
        progress.disk_finished(&disk.id);
        let stats = stats.map_err(|error| {
            EngineError::new(
                EngineErrorKind::Restore,
                format!(
                    "snapshot {}: cannot restore disk {} to {}",
                    manifest.id,
                    disk.id,
                    final_path.display()
                ),
            )
            .with_source(error)
        })?;
        restored.push(RestoredDisk {
            id: disk.id.clone(),
            path: final_path,
            format: plan.format.clone(),
            stats,
            seconds: started.elapsed().as_secs_f64(),
        });
        crate::failpoints::delay(FAILPOINT_DISK_STAGED);
    }

    let summary = SnapshotSummary::of(manifest);
    if let Some(definition) = &plan.definition {
        notes.extend(definition.notes.iter().cloned());
        for file in &definition.files {
            write_staged(staging.path(), &file.name, &file.contents, file.executable)
                .map_err(|e| io_error(format!("cannot write {}", file.name), e))?;
        }
    }
    let snapshot_json = serde_json::to_vec_pretty(&SnapshotFile {
        snapshot: &summary,
        disks: &restored
            .iter()
            .map(|d| SnapshotFileDisk {
                id: &d.id,
                file: d
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                format: &d.format,
                size: d.stats.size,
                zero_filled_offsets: &d.stats.damaged_offsets,
            })
            .collect::<Vec<_>>(),
        definition: plan
            .definition
            .as_ref()
            .and_then(|d| d.file(FileRole::Definition))
            .map(|f| f.name.as_str()),
        notes: &notes,
    })
    .expect("a summary always serializes");
    write_staged(staging.path(), SNAPSHOT_FILE, &snapshot_json, false)
        .map_err(|e| io_error(format!("cannot write {SNAPSHOT_FILE}"), e))?;

    // Everything is complete: give the files their names.
    for name in &plan.files {
        let from = staging.path().join(name);
        let to = target.join(name);
        std::fs::rename(&from, &to)
            .map_err(|e| io_error(format!("cannot move {} into place", to.display()), e))?;
    }
    for directory in plan.definition.iter().flat_map(|d| &d.directories) {
        let path = target.join(directory);
        std::fs::create_dir_all(&path)
            .map_err(|e| io_error(format!("cannot create {}", path.display()), e))?;
    }
    std::fs::File::open(&target)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| {
            io_error(
                format!("cannot flush the directory {}", target.display()),
                e,
            )
        })?;
    drop(staging);
    let defined_file = |role| {
        plan.definition
            .as_ref()
            .and_then(|d| d.file(role))
            .map(|f| target.join(&f.name))
    };
    Ok(RestoreOutcome {
        snapshot: summary,
        definition_file: defined_file(FileRole::Definition),
        script_file: defined_file(FileRole::Start),
        snapshot_file: target.join(SNAPSHOT_FILE),
        target,
        disks: restored,
        recorded_definition: plan.recorded_definition,
        definition: plan.definition,
        notes,
    })
}

/// Why the files a platform's definition writes cannot go beside `disk_files` (a name that
/// is not a plain file name, or one the restore already writes), if they cannot.
fn defined_file_clash(defined: &RestoredDefinition, disk_files: &[String]) -> Option<String> {
    let mut taken: BTreeSet<&str> = disk_files.iter().map(String::as_str).collect();
    taken.insert(SNAPSHOT_FILE);
    for file in &defined.files {
        let plain = Path::new(&file.name).file_name() == Some(std::ffi::OsStr::new(&file.name));
        if !plain || file.name.starts_with(staging::PREFIX) {
            return Some(format!(
                "its file name `{}` is not a plain file name",
                file.name
            ));
        }
        if !taken.insert(&file.name) {
            return Some(format!(
                "its file {} would replace another file of the restore",
                file.name
            ));
        }
    }
    None
}

/// Removes what restores killed outright left in `target`; says so in notes.
fn sweep_staging(target: &Path) -> Vec<String> {
    let swept = match staging::sweep_abandoned(target) {
        Ok(swept) => swept,
        Err(error) => {
            return vec![format!(
                "cannot look for staging directories that killed restores left in {}: {error}",
                target.display()
            )];
        }
    };
    swept
        .into_iter()
        .map(|left| match left.error {
            None => format!(
                "removed {}, which a killed restore left behind ({} bytes)",
                left.path.display(),
                left.bytes
            ),
            Some(error) => format!(
                "cannot remove {}, which a killed restore left behind: {error}",
                left.path.display()
            ),
        })
        .collect()
}

/// Boots the restored VM once, through the restore capability of the platform that wrote
/// the recorded definition (see [`BootTestRequest`]). `Err` when the test cannot be set up;
/// a guest that does not come up is a report with `passed: false`.
pub async fn boot_test(request: &BootTestRequest) -> Result<BootTestReport> {
    let restorer = stillpoint_platform::restorer_for(&request.recorded).map_err(platform_error)?;
    restorer.boot_test(request).await.map_err(platform_error)
}

/// A platform error as the engine's, with the same message and cause (so the chain does not
/// say it twice).
fn platform_error(error: PlatformError) -> EngineError {
    let kind = match error.kind() {
        PlatformErrorKind::VmDefinition => EngineErrorKind::VmDefinition,
        PlatformErrorKind::BootTest => EngineErrorKind::BootTest,
        _ => EngineErrorKind::Platform,
    };
    let message = error.to_string();
    let engine = EngineError::new(kind, message);
    match error.into_source() {
        Some(source) => engine.with_source(source),
        None => engine,
    }
}

/// The names a restore of `request` may write, known before the target exists (the
/// definition's files whenever the snapshot has one: checking more names than are written
/// only errs on the safe side).
fn planned_names(manifest: &Manifest, request: &RestoreRequest) -> Vec<String> {
    let mut names: Vec<String> = manifest
        .disks
        .iter()
        .filter(|d| request.disks.is_empty() || request.disks.contains(&d.name))
        .map(|d| disk_file_name(&d.name, request.format))
        .collect();
    if let Ok(Some(recorded)) = recorded_definition(manifest)
        && let Ok(restorer) = stillpoint_platform::restorer_for(&recorded)
    {
        names.extend(restorer.file_names());
    }
    names.push(SNAPSHOT_FILE.into());
    names
}

#[derive(Serialize)]
struct SnapshotFile<'a> {
    snapshot: &'a SnapshotSummary,
    disks: &'a [SnapshotFileDisk<'a>],
    definition: Option<&'a str>,
    notes: &'a [String],
}

#[derive(Serialize)]
struct SnapshotFileDisk<'a> {
    id: &'a str,
    file: String,
    format: &'a str,
    size: u64,
    zero_filled_offsets: &'a [u64],
}

fn write_staged(dir: &Path, name: &str, bytes: &[u8], executable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if executable { 0o755 } else { 0o644 })
        .open(dir.join(name))?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(report: serde_json::Value, platform: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "id": "6b0821183d1cdce6",
            "vm": "demo",
            "platform": platform,
            "time": "2026-11-26T12:07:52Z",
            "hostname": "host1",
            "parent": null,
            "disks": [
                { "name": "vd0", "size": 1048576, "chunk_size": 65536,
                  "index": "indexes/6b0821183d1cdce6/0", "stats": {
                    "bytes_read": 0, "chunks_new": 0, "chunks_reused": 0,
                    "chunks_unchanged": 0, "chunks_zero": 0, "bytes_stored": 0 } },
                { "name": "vd1", "size": 2097152, "chunk_size": 65536,
                  "index": "indexes/6b0821183d1cdce6/1", "stats": {
                    "bytes_read": 0, "chunks_new": 0, "chunks_reused": 0,
                    "chunks_unchanged": 0, "chunks_zero": 0, "bytes_stored": 0 } }
            ],
            "requested": "filesystem",
            "achieved": "filesystem",
            "indications": ["GuestAgent"],
            "report": report,
        }))
        .expect("manifest fixture")
    }

    fn definition() -> serde_json::Value {
        let blockdev = |i: usize| {
            format!(
                r#"{{"driver":"qcow2","node-name":"disk{i}","file":{{"driver":"file","filename":"/vms/demo/disk{i}.qcow2"}}}}"#
            )
        };
        serde_json::json!({
            "kind": "qemu",
            "argv": ["/usr/bin/qemu-system-x86_64", "-name", "demo",
                     "-blockdev", blockdev(0), "-device", "virtio-blk-pci,drive=disk0,id=vd0",
                     "-blockdev", blockdev(1), "-device", "virtio-blk-pci,drive=disk1,id=vd1",
                     "-qmp", "unix:/vms/demo/qmp.sock,server=on,wait=off"],
            "disks": [
                { "id": "vd0", "image": "/vms/demo/disk0.qcow2", "format": "qcow2" },
                { "id": "vd1", "image": "/vms/demo/disk1.qcow2", "format": "qcow2" }
            ]
        })
    }

    fn request(disks: &[&str], format: ImageFormat) -> RestoreRequest {
        RestoreRequest {
            target: PathBuf::from("/restore"),
            format,
            disks: disks.iter().map(|s| s.to_string()).collect(),
            force: false,
            zero_fill_damaged: false,
        }
    }

    #[test]
    fn a_vm_snapshot_plans_disks_definition_script_and_summary() {
        let manifest = manifest(
            serde_json::json!({ "vm_definition": definition() }),
            "qemu:demo",
        );
        let plan = plan_restore(
            &manifest,
            &request(&[], ImageFormat::Qcow2),
            Path::new("/restore"),
        )
        .expect("plan");
        assert_eq!(
            plan.files,
            [
                "vd0.qcow2",
                "vd1.qcow2",
                "vm-definition.json",
                "start-vm.sh",
                SNAPSHOT_FILE
            ]
        );
        let definition = plan.definition.expect("rewritten");
        assert_eq!(definition.disks[1].image, "/restore/vd1.qcow2");
        assert_eq!(definition.details["qmp_socket"], "/restore/run/qmp.sock");
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    }

    #[test]
    fn one_chosen_disk_leaves_the_other_on_its_original_image() {
        let manifest = manifest(
            serde_json::json!({ "vm_definition": definition() }),
            "qemu:demo",
        );
        let plan = plan_restore(
            &manifest,
            &request(&["vd1", "vd1"], ImageFormat::Raw),
            Path::new("/restore"),
        )
        .expect("plan");
        assert_eq!(plan.disks.len(), 1, "a disk named twice is restored once");
        let definition = plan.definition.expect("rewritten");
        assert_eq!(definition.unrestored_disks, ["vd0"]);
        assert_eq!(definition.disks[0].image, "/vms/demo/disk0.qcow2");
        assert_eq!(definition.disks[1].image, "/restore/vd1.raw");
    }

    #[test]
    fn without_a_definition_only_disks_and_the_summary_are_planned_and_it_says_why() {
        let image = manifest(serde_json::json!({}), "image:/data/disk.img");
        let plan =
            plan_restore(&image, &request(&[], ImageFormat::Raw), Path::new("/r")).expect("plan");
        assert_eq!(plan.files, ["vd0.raw", "vd1.raw", SNAPSHOT_FILE]);
        assert!(plan.notes[0].contains("image snapshot"), "{:?}", plan.notes);

        let elsewhere = manifest(serde_json::json!({ "vm_definition": null }), "qemu:demo");
        let plan = plan_restore(&elsewhere, &request(&[], ImageFormat::Raw), Path::new("/r"))
            .expect("plan");
        assert!(plan.definition.is_none());
        assert!(
            plan.notes[0].contains("no VM definition"),
            "{:?}",
            plan.notes
        );

        let broken = manifest(
            serde_json::json!({ "vm_definition": { "kind": "qemu", "argv": 3 } }),
            "qemu:demo",
        );
        let plan =
            plan_restore(&broken, &request(&[], ImageFormat::Raw), Path::new("/r")).expect("plan");
        assert!(plan.definition.is_none());
        assert!(
            plan.notes[0].contains("recorded VM definition is not readable"),
            "{:?}",
            plan.notes
        );

        // A definition whose disk image is not on its command line: disks only, with why.
        let mut def = definition();
        def["disks"][0]["image"] = "/elsewhere/disk0.qcow2".into();
        let odd = manifest(serde_json::json!({ "vm_definition": def }), "qemu:demo");
        let plan =
            plan_restore(&odd, &request(&[], ImageFormat::Raw), Path::new("/r")).expect("plan");
        assert!(plan.definition.is_none());
        assert!(
            plan.notes[0].contains("disk vd0: its image /elsewhere/disk0.qcow2"),
            "{:?}",
            plan.notes
        );
    }

    /// The platform that wrote the definition picks its restore: one this build cannot
    /// restore leaves the disks only, saying so.
    #[test]
    fn a_definition_of_a_platform_without_a_restore_restores_the_disks_only() {
        let mut def = definition();
        def["kind"] = "libvirt".into();
        let manifest = manifest(serde_json::json!({ "vm_definition": def }), "libvirt:demo");
        let plan = plan_restore(&manifest, &request(&[], ImageFormat::Raw), Path::new("/r"))
            .expect("plan");
        assert!(plan.definition.is_none());
        assert_eq!(plan.files, ["vd0.raw", "vd1.raw", SNAPSHOT_FILE]);
        assert!(
            plan.notes[0].contains("written by the libvirt platform"),
            "{:?}",
            plan.notes
        );
        assert_eq!(
            planned_names(&manifest, &request(&[], ImageFormat::Raw)),
            ["vd0.raw", "vd1.raw", SNAPSHOT_FILE]
        );
    }

    #[test]
    fn a_platform_file_that_is_no_plain_name_or_taken_is_refused() {
        let defined = |name: &str| RestoredDefinition {
            platform: stillpoint_platform::PlatformKind::Qemu,
            disks: vec![],
            unrestored_disks: vec![],
            notes: vec![],
            files: vec![DefinitionFile {
                name: name.into(),
                role: FileRole::Definition,
                executable: false,
                contents: vec![],
            }],
            directories: vec![],
            details: serde_json::Value::Null,
        };
        let disks = ["vd0.raw".to_string()];
        assert_eq!(defined_file_clash(&defined("vm.xml"), &disks), None);
        for taken in ["vd0.raw", SNAPSHOT_FILE] {
            let why = defined_file_clash(&defined(taken), &disks).expect("taken");
            assert!(why.contains("would replace another file"), "{why}");
        }
        for odd in ["../x", "a/b", "", ".stillpoint-restore-x"] {
            let why = defined_file_clash(&defined(odd), &disks).expect("not plain");
            assert!(why.contains("not a plain file name"), "{odd:?}: {why}");
        }
    }

    #[test]
    fn an_unknown_disk_is_an_error_naming_snapshot_and_disks() {
        let manifest = manifest(serde_json::json!({}), "qemu:demo");
        let error = plan_restore(
            &manifest,
            &request(&["nope"], ImageFormat::Raw),
            Path::new("/r"),
        )
        .expect_err("unknown disk");
        let text = format!("{error}: {}", error_chain(&error));
        assert!(text.contains("6b0821183d1cdce6"), "{text}");
        assert!(text.contains("no disk named `nope`"), "{text}");
        assert!(text.contains("vd0, vd1"), "{text}");
    }

    #[test]
    fn the_summary_keeps_the_manifest_facts() {
        let manifest = manifest(serde_json::json!({}), "qemu:demo");
        let summary = SnapshotSummary::of(&manifest);
        assert_eq!(summary.time, "2026-11-26T12:07:52Z");
        assert_eq!(summary.achieved.as_deref(), Some("filesystem"));
        assert_eq!(summary.indications, ["GuestAgent"]);
    }

    #[test]
    fn disk_file_names() {
        assert_eq!(disk_file_name("vd0", ImageFormat::Qcow2), "vd0.qcow2");
        assert_eq!(disk_file_name("disk.img", ImageFormat::Raw), "disk.raw");
        assert_eq!(disk_file_name("disk.raw", ImageFormat::Raw), "disk.raw");
        assert_eq!(disk_file_name("a/b", ImageFormat::Raw), "a%2Fb.raw");
        assert_eq!(disk_file_name("a_b", ImageFormat::Raw), "a_b.raw");
        assert_eq!(disk_file_name(".raw", ImageFormat::Raw), "%2Eraw.raw");
    }
}
