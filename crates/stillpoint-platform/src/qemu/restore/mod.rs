//! The QEMU implementation of the restore capability ([`crate::restore::VmRestore`]).
//!
//! A QEMU VM's recorded definition is its command line (`/proc/PID/cmdline`) and, per disk,
//! the image QEMU reports. [`QemuRestore::define`](crate::restore::VmRestore::define)
//! rewrites that line for the restored files ([`rewrite_definition`]: images, sockets and logs
//! under `DIR/run/`, options that cannot apply dropped) and writes it as
//! [`DEFINITION_FILE`] and as the script [`SCRIPT_FILE`] that starts it; the boot test
//! ([`boot_test()`]) runs the line once more on qcow2 overlays, adapted for an unattended
//! run ([`for_boot_test`]). docs/restore.md has the rules as users read them.
//!
//! - `cmdline` — the line split into options, so one can be rewritten and the rest kept;
//! - `keyval` — QEMU's `key=value,…` option syntax;
//! - `rewrite` — the pure rewrite;
//! - `script` — `start-vm.sh`;
//! - `boot_test` — the boot test (real QEMU, in its own process group).

mod boot_test;
mod cmdline;
mod keyval;
pub mod rewrite;
mod script;

use async_trait::async_trait;
use serde::Serialize;

pub use self::boot_test::boot_test;
pub use self::rewrite::{ExternalFile, RewrittenDefinition, for_boot_test, rewrite_definition};
use crate::error::Result;
use crate::restore::{
    BootTestReport, BootTestRequest, DefineRequest, DefinitionFile, FileRole, RestoredDefinition,
    VmRestore,
};
use crate::vm::{PlatformKind, VmDefinition};

/// The rewritten definition, beside the disks.
pub const DEFINITION_FILE: &str = "vm-definition.json";
/// The script that starts the restored VM.
pub const SCRIPT_FILE: &str = "start-vm.sh";
/// Sockets and logs of the restored VM, below the target directory.
pub const RUN_DIR: &str = "run";

/// Restores QEMU command lines (definitions of kind `qemu`).
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuRestore;

#[async_trait]
impl VmRestore for QemuRestore {
    fn platform(&self) -> PlatformKind {
        PlatformKind::Qemu
    }

    fn file_names(&self) -> Vec<String> {
        vec![DEFINITION_FILE.into(), SCRIPT_FILE.into()]
    }

    fn define(&self, request: &DefineRequest<'_>) -> Result<RestoredDefinition> {
        let rewritten = rewrite_definition(
            request.recorded,
            request.disks,
            &request.target.join(RUN_DIR),
        )?;
        let json = serde_json::to_vec_pretty(&DefinitionJson {
            definition: &rewritten,
            snapshot: &request.origin.snapshot,
            recorded: Some(request.recorded),
        })
        .expect("a definition always serializes");
        let origin = request.origin;
        let header = vec![
            format!(
                "Starts VM {} as restored from stillpoint snapshot {} (captured {}, {} consistency).",
                origin.vm,
                origin.snapshot,
                origin.time,
                origin.achieved.as_deref().unwrap_or("unknown")
            ),
            "Written by `stillpoint restore`: the recorded QEMU command line, pointed at the"
                .into(),
            "restored disks in this directory; sockets and logs go to run/.".into(),
        ];
        let script = script::start_script(
            &rewritten.argv,
            &rewritten.run_dir,
            &header,
            &rewritten.notes,
        )?;
        Ok(RestoredDefinition {
            platform: PlatformKind::Qemu,
            disks: rewritten.disks.clone(),
            unrestored_disks: rewritten.unrestored_disks.clone(),
            notes: rewritten.notes.clone(),
            files: vec![
                DefinitionFile {
                    name: DEFINITION_FILE.into(),
                    role: FileRole::Definition,
                    executable: false,
                    contents: json,
                },
                DefinitionFile {
                    name: SCRIPT_FILE.into(),
                    role: FileRole::Start,
                    executable: true,
                    contents: script.into_bytes(),
                },
            ],
            directories: vec![RUN_DIR.into()],
            details: serde_json::to_value(&rewritten).expect("a definition always serializes"),
        })
    }

    async fn boot_test(&self, request: &BootTestRequest) -> Result<BootTestReport> {
        boot_test(request).await
    }
}

/// `vm-definition.json`: the rewritten definition (its `kind`, `argv` and `disks` read as a
/// `VmDefinition`), and the one the snapshot recorded.
#[derive(Serialize)]
struct DefinitionJson<'a> {
    #[serde(flatten)]
    definition: &'a RewrittenDefinition,
    snapshot: &'a str,
    recorded: Option<&'a VmDefinition>,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::restore::{RestoreOrigin, TargetDisk};
    use crate::vm::DefinedDisk;

    fn recorded() -> VmDefinition {
        VmDefinition {
            kind: "qemu".into(),
            argv: [
                "/usr/bin/qemu-system-x86_64",
                "-blockdev",
                r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"/vms/demo/disk0.qcow2"}}"#,
                "-device",
                "virtio-blk-pci,drive=disk0,id=vd0",
                "-qmp",
                "unix:/vms/demo/qmp.sock,server=on,wait=off",
            ]
            .map(String::from)
            .to_vec(),
            disks: vec![DefinedDisk {
                id: "vd0".into(),
                image: "/vms/demo/disk0.qcow2".into(),
                format: "qcow2".into(),
            }],
        }
    }

    fn origin() -> RestoreOrigin {
        RestoreOrigin {
            vm: "demo".into(),
            snapshot: "6b0821183d1cdce6".into(),
            time: "2026-11-26T12:07:52Z".into(),
            achieved: Some("filesystem".into()),
        }
    }

    #[test]
    fn define_writes_the_rewritten_line_as_json_and_script_and_names_its_files() {
        let recorded = recorded();
        let disks = [TargetDisk {
            id: "vd0".into(),
            path: PathBuf::from("/restore/vd0.raw"),
            format: "raw".into(),
        }];
        let defined = QemuRestore
            .define(&DefineRequest {
                recorded: &recorded,
                disks: &disks,
                target: Path::new("/restore"),
                origin: &origin(),
            })
            .expect("define");
        let names: Vec<&str> = defined.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, QemuRestore.file_names());
        assert_eq!(defined.directories, [RUN_DIR]);
        assert_eq!(defined.details["qmp_socket"], "/restore/run/qmp.sock");

        let json = defined.file(FileRole::Definition).expect("definition");
        let file: serde_json::Value = serde_json::from_slice(&json.contents).expect("JSON");
        assert_eq!(file["snapshot"], "6b0821183d1cdce6");
        assert_eq!(file["recorded"], serde_json::to_value(&recorded).unwrap());
        // Its kind, argv and disks read as a VmDefinition (another restore could take it).
        let again: VmDefinition = serde_json::from_value(file).expect("a VmDefinition");
        assert_eq!(again.kind, "qemu");
        assert_eq!(again.disks, defined.disks);
        assert!(
            again.argv[2].contains("/restore/vd0.raw"),
            "{:?}",
            again.argv
        );

        let script = defined.file(FileRole::Start).expect("script");
        assert!(script.executable);
        let text = String::from_utf8(script.contents.clone()).expect("text");
        assert!(
            text.contains(
                "# Starts VM demo as restored from stillpoint snapshot 6b0821183d1cdce6 \
                 (captured 2026-11-26T12:07:52Z, filesystem consistency).\n"
            ),
            "{text}"
        );
        assert!(text.contains("mkdir -p -- /restore/run\n"), "{text}");
    }
}
