//! `stillpoint.toml`: defaults for the command line and VMs started outside stillpoint.
//!
//! ```toml
//! repo = "/srv/backups/stillpoint"    # default for --repo
//! runtime_dir = "/run/stillpoint"     # where launched VMs and freeze leases live
//!
//! [backup]
//! consistency = "filesystem"          # crash | filesystem | application
//! on_quiesce_failure = "degrade"      # degrade | fail
//! parallel = 2                        # VMs backed up at once
//!
//! [vms.web]                           # a QEMU VM started elsewhere
//! qmp = "/run/qemu/web/qmp.sock"
//! qga = "/run/qemu/web/qga.sock"      # omit when the VM has no agent channel
//! ```
//! Relative paths are taken relative to the file's directory. Unknown keys are errors, so a
//! typo never silently does nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use stillpoint_platform::qemu::{QemuVmSpec, SpecOrigin};

pub const DEFAULT_FILE: &str = "stillpoint.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub repo: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    #[serde(default)]
    pub backup: BackupDefaults,
    #[serde(default)]
    pub vms: BTreeMap<String, VmEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupDefaults {
    pub consistency: Option<String>,
    pub on_quiesce_failure: Option<String>,
    pub parallel: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Only `qemu` for now.
    #[serde(default = "default_platform")]
    pub platform: String,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
}

fn default_platform() -> String {
    "qemu".into()
}

/// A configuration and the file it came from.
#[derive(Debug, Default)]
pub struct LoadedConfig {
    pub path: Option<PathBuf>,
    pub config: Config,
}

impl LoadedConfig {
    /// Loads `explicit` (an error if missing), else `./stillpoint.toml` if it exists, else
    /// the defaults.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => {
                let default = PathBuf::from(DEFAULT_FILE);
                if !default.exists() {
                    return Ok(Self::default());
                }
                default
            }
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        let mut config: Config = toml::from_str(&text).map_err(|error| {
            anyhow::anyhow!("{}: {}", path.display(), error.to_string().trim_end())
        })?;
        // Absolute: paths go to QEMU and to the guardian, whose working directories differ.
        let absolute = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        let base = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_relative(&base);
        config.validate(&path)?;
        Ok(Self {
            path: Some(std::path::absolute(&path).unwrap_or(path)),
            config,
        })
    }

    /// The VMs named in the file, as the qemu platform wants them.
    pub fn qemu_vms(&self) -> Vec<QemuVmSpec> {
        let origin = self
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
        self.config
            .vms
            .iter()
            .filter(|(_, entry)| entry.platform == "qemu")
            .map(|(name, entry)| QemuVmSpec {
                name: name.clone(),
                qmp_socket: entry.qmp.clone(),
                qga_socket: entry.qga.clone(),
                pid: None,
                origin: SpecOrigin::Config(origin.clone()),
            })
            .collect()
    }
}

impl Config {
    fn resolve_relative(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        self.repo.as_mut().map(resolve);
        self.runtime_dir.as_mut().map(resolve);
        for entry in self.vms.values_mut() {
            resolve(&mut entry.qmp);
            entry.qga.as_mut().map(resolve);
        }
    }

    fn validate(&self, path: &Path) -> anyhow::Result<()> {
        for (name, entry) in &self.vms {
            if entry.platform != "qemu" {
                anyhow::bail!(
                    "{}: [vms.{name}] platform = \"{}\": only \"qemu\" is supported by this build",
                    path.display(),
                    entry.platform
                );
            }
        }
        if let Some(level) = &self.backup.consistency {
            level
                .parse::<stillpoint_engine::consistency::Level>()
                .map_err(|error| {
                    anyhow::anyhow!("{}: [backup] consistency: {error}", path.display())
                })?;
        }
        if let Some(policy) = &self.backup.on_quiesce_failure {
            policy
                .parse::<stillpoint_engine::consistency::OnQuiesceFailure>()
                .map_err(|error| {
                    anyhow::anyhow!("{}: [backup] on_quiesce_failure: {error}", path.display())
                })?;
        }
        if self.backup.parallel == Some(0) {
            anyhow::bail!("{}: [backup] parallel must be at least 1", path.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<LoadedConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stillpoint.toml");
        std::fs::write(&path, text).unwrap();
        LoadedConfig::load(Some(&path))
    }

    #[test]
    fn full_file_loads_with_relative_paths_resolved() {
        let loaded = load(
            "repo = \"backups\"\n[backup]\nconsistency = \"crash\"\n[vms.web]\nqmp = \"web/qmp.sock\"\n",
        )
        .unwrap();
        let base = loaded
            .path
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        assert_eq!(loaded.config.repo, Some(base.join("backups")));
        let vms = loaded.qemu_vms();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].qmp_socket, base.join("web/qmp.sock"));
        assert_eq!(vms[0].qga_socket, None);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let message = load("repo = \"x\"\n[vms.web]\nqmp = \"a\"\nqgaa = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("stillpoint.toml"), "{message}");
        assert!(message.contains("line 4"), "{message}");
        assert!(message.contains("qgaa"), "{message}");
    }

    #[test]
    fn bad_level_is_named() {
        let message = load("[backup]\nconsistency = \"fs\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("[backup] consistency"), "{message}");
        assert!(
            message.contains("unknown consistency level `fs`"),
            "{message}"
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let message = LoadedConfig::load(Some(Path::new("/nonexistent/stillpoint.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("/nonexistent/stillpoint.toml"),
            "{message}"
        );
    }
}
