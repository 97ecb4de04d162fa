//! Debian packages for the guest: resolving names, `apt-get download`, `dpkg-deb -x`.
//!
//! Nothing here needs root: `apt-get download` writes into the current directory and
//! `dpkg-deb -x` unpacks into any directory. Each package is unpacked into its own directory so
//! that a file can always be traced back to the package it came from (for error messages and
//! the guest manifest). The parsing of apt/dpkg output is kept in pure functions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, ErrorKind, Result};
use crate::paths::find_tool;
use crate::tool;

/// The first `Depends:` of `apt-cache depends <meta>` that starts with `prefix`: how a
/// meta-package such as `linux-image-cloud-amd64` resolves to its current concrete package.
///
/// `apt-cache depends` prints the package name on the first line, then one indented line per
/// relation (`  Depends: name`, `  |Depends: name` for an alternative, `<name>` for a virtual
/// package).
pub(crate) fn concrete_dependency(apt_cache_output: &str, prefix: &str) -> Option<String> {
    apt_cache_output
        .lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches('|');
            line.strip_prefix("Depends:")
        })
        .map(str::trim)
        .find(|name| name.starts_with(prefix) && !name.starts_with('<'))
        .map(str::to_owned)
}

/// The package names of a `Depends:` control field, first alternative of each, without
/// version constraints or architecture qualifiers:
/// `libc6 (>= 2.34), libfoo1 | libbar1, python3:any` → `[libc6, libfoo1, python3]`.
pub(crate) fn parse_depends_field(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|relation| {
            let first = relation.split('|').next()?.trim();
            let name = first.split(['(', ' ', '[', '<']).next()?.trim();
            let name = name.split(':').next()?.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

/// Fields of a Debian control paragraph (`dpkg-deb -f FILE`), continuation lines joined.
pub(crate) fn parse_control(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.as_ref().and_then(|key| fields.get_mut(key)) {
                let value: &mut String = value;
                value.push('\n');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            fields.insert(key.trim().to_owned(), value.trim().to_owned());
            current = Some(key.trim().to_owned());
        }
    }
    fields
}

/// One downloaded and unpacked package.
#[derive(Debug, Clone)]
pub(crate) struct UnpackedPackage {
    pub name: String,
    pub version: String,
    /// `Pre-Depends` and `Depends`, first alternatives, names only.
    pub depends: Vec<String>,
    /// Where its files were unpacked (the package's `/`).
    pub root: PathBuf,
}

/// Downloads and unpacks packages into a work directory, remembering what it has.
#[derive(Debug)]
pub(crate) struct PackageStore {
    work_dir: PathBuf,
    apt_get: PathBuf,
    apt_cache: PathBuf,
    dpkg_deb: PathBuf,
    packages: BTreeMap<String, UnpackedPackage>,
    rounds: usize,
}

impl PackageStore {
    pub fn new(work_dir: &Path) -> Result<Self> {
        Ok(Self {
            work_dir: work_dir.to_owned(),
            apt_get: find_tool("apt-get", "apt")?,
            apt_cache: find_tool("apt-cache", "apt")?,
            dpkg_deb: find_tool("dpkg-deb", "dpkg")?,
            packages: BTreeMap::new(),
            rounds: 0,
        })
    }

    /// Resolves a meta-package to the concrete package it depends on (the kernel).
    pub fn resolve_meta(&self, meta: &str, prefix: &str) -> Result<String> {
        let step = format!("resolving Debian package `{meta}`");
        let output = tool::run(Command::new(&self.apt_cache).args(["depends", meta]), &step)?;
        let text = String::from_utf8_lossy(&output.stdout);
        concrete_dependency(&text, prefix).ok_or_else(|| {
            Error::new(
                ErrorKind::Package,
                format!(
                    "{step}: `apt-cache depends {meta}` names no `{prefix}*` package \
                     (run `apt-get update` if the package lists are empty)"
                ),
            )
        })
    }

    /// The unpacked package `name`, if it was fetched.
    pub fn get(&self, name: &str) -> Option<&UnpackedPackage> {
        self.packages.get(name)
    }

    /// Every unpacked package, by name.
    pub fn all(&self) -> impl Iterator<Item = &UnpackedPackage> {
        self.packages.values()
    }

    /// Downloads (`apt-get download`) and unpacks the packages not fetched yet.
    pub fn fetch(&mut self, names: &[String]) -> Result<()> {
        let wanted: Vec<&String> = names
            .iter()
            .filter(|name| !self.packages.contains_key(*name))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        self.rounds += 1;
        let download_dir = self.work_dir.join(format!("debs-{}", self.rounds));
        std::fs::create_dir_all(&download_dir)
            .map_err(|e| Error::io("create directory", &download_dir, e))?;
        let list = wanted
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut download = Command::new(&self.apt_get);
        download
            .current_dir(&download_dir)
            .arg("download")
            .args(&wanted);
        if nix::unistd::geteuid().is_root() {
            // As root apt drops to `_apt` for downloads, which cannot write into our directory.
            download.args(["-o", "APT::Sandbox::User=root"]);
        }
        tool::run(
            &mut download,
            &format!("downloading Debian packages {list}"),
        )
        .map_err(|error| {
            let hint = " (run `apt-get update` if the package lists are empty or stale)";
            Error::new(ErrorKind::Package, format!("{error}{hint}"))
        })?;
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&download_dir)
            .map_err(|e| Error::io("list directory", &download_dir, e))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .collect();
        debs.sort();
        for deb in debs {
            let package = self.unpack(&deb)?;
            self.packages.insert(package.name.clone(), package);
        }
        for name in wanted {
            if !self.packages.contains_key(name) {
                return Err(Error::new(
                    ErrorKind::Package,
                    format!("`apt-get download {name}` produced no .deb for `{name}`"),
                ));
            }
        }
        Ok(())
    }

    fn unpack(&self, deb: &Path) -> Result<UnpackedPackage> {
        let file_name = deb.file_name().unwrap_or_default().to_string_lossy();
        let output = tool::run(
            Command::new(&self.dpkg_deb).arg("-f").arg(deb).args([
                "Package",
                "Version",
                "Pre-Depends",
                "Depends",
            ]),
            &format!("reading the control fields of `{file_name}`"),
        )?;
        let fields = parse_control(&String::from_utf8_lossy(&output.stdout));
        let name = fields.get("Package").cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::Package,
                format!("`{file_name}` has no Package field"),
            )
        })?;
        let version = fields.get("Version").cloned().unwrap_or_default();
        let mut depends = Vec::new();
        for field in ["Pre-Depends", "Depends"] {
            if let Some(value) = fields.get(field) {
                depends.extend(parse_depends_field(value));
            }
        }
        let root = self.work_dir.join("pkg").join(&name);
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create directory", &root, e))?;
        tool::run(
            Command::new(&self.dpkg_deb).arg("-x").arg(deb).arg(&root),
            &format!("unpacking Debian package `{name}` {version}"),
        )?;
        Ok(UnpackedPackage {
            name,
            version,
            depends,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_meta_package_resolves_to_concrete_image() {
        // Real output of `apt-cache depends linux-image-cloud-amd64` on Debian 12.
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            concrete_dependency(output, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alternatives = "meta\n |Depends: <virtual-thing>\n  Depends: linux-image-x\n";
        assert_eq!(
            concrete_dependency(alternatives, "linux-image-").as_deref(),
            Some("linux-image-x")
        );
        assert_eq!(concrete_dependency("meta\n", "linux-image-"), None);
        assert_eq!(
            concrete_dependency("meta\n  Recommends: linux-image-x\n", "linux-image-"),
            None
        );
    }

    #[test]
    fn depends_field_keeps_first_alternative_names() {
        // The Depends of qemu-guest-agent 1:7.2+dfsg-7+deb12u18+b3.
        let field = "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3), libnuma1 (>= 2.0.11), \
                     libudev1 (>= 183), liburing2 (>= 2.3)";
        assert_eq!(
            parse_depends_field(field),
            ["libc6", "libglib2.0-0", "libnuma1", "libudev1", "liburing2"]
        );
        assert_eq!(
            parse_depends_field("a | b (>= 1), python3:any, c [amd64], d<!nocheck>"),
            ["a", "python3", "c", "d"]
        );
        assert!(parse_depends_field("").is_empty());
        assert!(parse_depends_field(" , ").is_empty());
    }

    #[test]
    fn control_fields_with_continuation_lines() {
        let text = "Package: sqlite3\nVersion: 3.40.1-2+deb12u2\n\
                    Depends: libc6 (>= 2.34),\n libreadline8 (>= 6.0)\nNoColon\n";
        let fields = parse_control(text);
        assert_eq!(fields["Package"], "sqlite3");
        assert_eq!(fields["Version"], "3.40.1-2+deb12u2");
        assert_eq!(fields["Depends"], "libc6 (>= 2.34),\nlibreadline8 (>= 6.0)");
        assert_eq!(
            parse_depends_field(&fields["Depends"]),
            ["libc6", "libreadline8"]
        );
        assert_eq!(fields.len(), 3);
    }
}
