//! Finding plain-QEMU VMs by name: those named in `stillpoint.toml` and those launched by
//! `stillpoint vm run` (each has `<runtime>/vms/<name>/vm.json`, see docs/local-vms.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PlatformError, Result};

/// How to reach one QEMU VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVmSpec {
    pub name: String,
    /// The QMP monitor socket.
    pub qmp_socket: PathBuf,
    /// The guest agent socket; `None` when the VM has no agent channel.
    pub qga_socket: Option<PathBuf>,
    /// The QEMU process, when known (VMs launched by `stillpoint vm run`).
    pub pid: Option<u32>,
    /// Where this definition came from (for error messages).
    pub origin: SpecOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "path")]
pub enum SpecOrigin {
    /// `[vms.NAME]` in this configuration file.
    Config(PathBuf),
    /// A `vm.json` written by `stillpoint vm run`.
    RuntimeDir(PathBuf),
}

/// The fields of `vm.json` the driver needs (the launcher writes more).
#[derive(Debug, Deserialize)]
struct VmJson {
    name: String,
    pid: Option<u32>,
    qmp_socket: PathBuf,
    qga_socket: Option<PathBuf>,
}

/// Every QEMU VM stillpoint knows by name.
#[derive(Debug, Clone, Default)]
pub struct QemuInventory {
    configured: Vec<QemuVmSpec>,
    runtime_root: PathBuf,
}

impl QemuInventory {
    pub fn new(configured: Vec<QemuVmSpec>, runtime_root: PathBuf) -> Self {
        Self {
            configured,
            runtime_root,
        }
    }

    pub fn runtime_root(&self) -> &Path {
        &self.runtime_root
    }

    /// Finds a VM by name: the configuration first, then VMs launched locally.
    pub fn find(&self, name: &str) -> Result<QemuVmSpec> {
        if let Some(spec) = self.configured.iter().find(|spec| spec.name == name) {
            return Ok(spec.clone());
        }
        // A launched VM's name becomes a path under the runtime root: never one that leads
        // out of it (the CLI checks its arguments too; this guards every other caller).
        if let Err(invalid) = stillpoint_os::names::validate_name("VM name", name) {
            return Err(PlatformError::vm_not_found(name, invalid));
        }
        let vm_json = self.runtime_root.join("vms").join(name).join("vm.json");
        if vm_json.exists() {
            return read_vm_json(&vm_json);
        }
        Err(PlatformError::vm_not_found(
            name,
            format!(
                "it is neither in the configuration ([vms.{name}] in stillpoint.toml) nor launched \
                 by `stillpoint vm run` (no {})",
                vm_json.display()
            ),
        ))
    }

    /// Every VM known: configured ones, then launched ones (unreadable vm.json files are skipped
    /// with a warning, so one broken entry does not hide the others).
    pub fn list(&self) -> Vec<QemuVmSpec> {
        let mut specs = self.configured.clone();
        let Ok(entries) = std::fs::read_dir(self.runtime_root.join("vms")) else {
            return specs;
        };
        let mut launched: Vec<QemuVmSpec> = entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path().join("vm.json"))
            .filter(|path| path.exists())
            .filter_map(|path| match read_vm_json(&path) {
                Ok(spec) => Some(spec),
                Err(error) => {
                    tracing::warn!("skipping {}: {error}", path.display());
                    None
                }
            })
            .filter(|spec| !specs.iter().any(|configured| configured.name == spec.name))
            .collect();
        launched.sort_by(|a, b| a.name.cmp(&b.name));
        specs.extend(launched);
        specs
    }
}

fn read_vm_json(path: &Path) -> Result<QemuVmSpec> {
    let text = std::fs::read_to_string(path).map_err(|source| PlatformError::io(path, source))?;
    let vm: VmJson = serde_json::from_str(&text).map_err(|error| {
        PlatformError::bad_definition(
            path,
            format!("line {}, column {}: {error}", error.line(), error.column()),
        )
    })?;
    Ok(QemuVmSpec {
        name: vm.name,
        qmp_socket: vm.qmp_socket,
        qga_socket: vm.qga_socket,
        pid: vm.pid,
        origin: SpecOrigin::RuntimeDir(path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_vm(root: &Path, name: &str, body: &str) -> PathBuf {
        let dir = root.join("vms").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn a_name_that_leads_out_of_the_runtime_root_is_never_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run");
        // A vm.json where `../outside` would lead.
        write_vm(dir.path(), "outside", "{}");
        std::fs::create_dir_all(root.join("vms")).unwrap();
        let inventory = QemuInventory::new(Vec::new(), root);
        let error = inventory.find("../../vms/outside").unwrap_err();
        assert_eq!(error.kind(), crate::PlatformErrorKind::VmNotFound);
        assert!(
            error.to_string().contains("must be letters, digits"),
            "{error}"
        );
    }

    #[test]
    fn finds_launched_vm_from_vm_json() {
        let root = tempfile::tempdir().unwrap();
        write_vm(
            root.path(),
            "demo",
            r#"{"name":"demo","pid":42,"qmp_socket":"/r/qmp.sock","qga_socket":null,
                "console_log":"/r/console.log","disks":[],"started_at":"x","launched_by":"t"}"#,
        );
        let inventory = QemuInventory::new(vec![], root.path().to_path_buf());
        let spec = inventory.find("demo").unwrap();
        assert_eq!(spec.qmp_socket, PathBuf::from("/r/qmp.sock"));
        assert_eq!(spec.qga_socket, None);
        assert_eq!(spec.pid, Some(42));
    }

    #[test]
    fn configuration_wins_over_runtime_dir() {
        let root = tempfile::tempdir().unwrap();
        write_vm(
            root.path(),
            "web",
            r#"{"name":"web","qmp_socket":"/launched.sock"}"#,
        );
        let configured = QemuVmSpec {
            name: "web".into(),
            qmp_socket: "/configured.sock".into(),
            qga_socket: Some("/qga.sock".into()),
            pid: None,
            origin: SpecOrigin::Config("stillpoint.toml".into()),
        };
        let inventory = QemuInventory::new(vec![configured.clone()], root.path().to_path_buf());
        assert_eq!(inventory.find("web").unwrap(), configured);
        assert_eq!(inventory.list(), vec![configured]);
    }

    #[test]
    fn unknown_vm_error_says_where_it_looked() {
        let root = tempfile::tempdir().unwrap();
        let inventory = QemuInventory::new(vec![], root.path().to_path_buf());
        let message = inventory.find("ghost").unwrap_err().to_string();
        assert!(message.contains("ghost"), "{message}");
        assert!(message.contains("stillpoint vm run"), "{message}");
    }

    #[test]
    fn broken_vm_json_names_file_and_line() {
        let root = tempfile::tempdir().unwrap();
        let path = write_vm(
            root.path(),
            "bad",
            "{\n \"name\": \"bad\",\n \"qmp_socket\": 7\n}",
        );
        let inventory = QemuInventory::new(vec![], root.path().to_path_buf());
        let message = inventory.find("bad").unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(inventory.list().is_empty());
    }
}
