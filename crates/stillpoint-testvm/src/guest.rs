//! The cached guest image: a Debian cloud kernel and an initramfs with busybox, the real
//! qemu-ga, sqlite3, their shared libraries, the virtio modules and `/init`.
//!
//! The image lives in `<cache>/guest-<key>/` where `<key>` is a digest of [`GuestRecipe`]: a
//! change of the recipe (packages, modules, the init script, [`RECIPE_VERSION`]) builds a new
//! image beside the old one. A complete image directory appears atomically (built under a
//! temporary name, then renamed), so its presence is the "already built" check; building is
//! serialised across processes by an exclusive lock on `<cache>/build.lock`, and whoever gets
//! the lock second finds the image done.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::archive::Archive;
use crate::elf;
use crate::error::{Error, ErrorKind, Result};
use crate::packages::PackageStore;
use crate::paths::default_guest_dir;
use crate::tool;

/// Bump when the builder's code changes what it produces, so cached images are rebuilt.
pub const RECIPE_VERSION: u32 = 1;

/// The guest's `/init` (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Where the Debian 12 multiarch libraries go in the guest (and where ld.so looks first).
const GUEST_LIB_DIR: &str = "lib/x86_64-linux-gnu";

/// Directories of a package's root searched for a shared library, in order.
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// How many rounds of "fetch the dependencies of what we have" before a missing library is
/// declared missing.
const MAX_DEPENDENCY_ROUNDS: usize = 6;

/// What goes into the guest. Its JSON form is hashed into the cache key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestRecipe {
    /// [`RECIPE_VERSION`] when the recipe was made.
    pub recipe_version: u32,
    /// Meta-package resolved (with `apt-cache depends`) to the current concrete kernel package.
    pub kernel_meta_package: String,
    /// Kernel options that must be built in (`=y`), checked in the kernel's config file.
    pub kernel_builtin: Vec<String>,
    /// Kernel modules, in load order (each one's `.modinfo` dependencies must come earlier).
    pub modules: Vec<String>,
    /// The package providing a static `bin/busybox`.
    pub busybox_package: String,
    /// Dynamically linked programs: (package, path inside the package), copied with the
    /// shared libraries they need.
    pub programs: Vec<(String, String)>,
    /// The `/init` script.
    pub init_script: String,
}

impl Default for GuestRecipe {
    fn default() -> Self {
        let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        Self {
            recipe_version: RECIPE_VERSION,
            kernel_meta_package: "linux-image-cloud-amd64".into(),
            kernel_builtin: owned(&[
                "CONFIG_EXT4_FS",
                "CONFIG_DEVTMPFS",
                "CONFIG_BLK_DEV_INITRD",
                "CONFIG_RD_GZIP",
            ]),
            modules: owned(&[
                "virtio_ring",
                "virtio",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk",
                "virtio_console",
            ]),
            busybox_package: "busybox-static".into(),
            programs: vec![
                ("qemu-guest-agent".into(), "usr/sbin/qemu-ga".into()),
                ("sqlite3".into(), "usr/bin/sqlite3".into()),
            ],
            init_script: INIT_SCRIPT.into(),
        }
    }
}

impl GuestRecipe {
    /// The cache key: the first 16 hex digits of the BLAKE3 digest of the recipe's JSON.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex()[..16].to_owned()
    }
}

/// What was built, written as `manifest.json` beside the kernel and initramfs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestManifest {
    /// The recipe's cache key.
    pub key: String,
    /// The recipe the image was built from.
    pub recipe: GuestRecipe,
    /// The kernel release (`uname -r` in the guest), e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// Every Debian package used, name to version.
    pub packages: BTreeMap<String, String>,
    /// Shared libraries copied into the guest, soname to the package they came from.
    pub libraries: BTreeMap<String, String>,
    /// Size of the gzip-compressed initramfs.
    pub initramfs_bytes: u64,
    /// When it was built (RFC 3339, UTC).
    pub built_at: String,
}

/// A built guest image on disk.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    manifest: GuestManifest,
}

impl GuestImage {
    /// The default image, built if missing, in the default cache directory (see
    /// [`default_guest_dir`]). Blocks (seconds on first use: downloads and compression);
    /// call it from `spawn_blocking` in async code.
    pub fn ensure() -> Result<Self> {
        Self::ensure_in(&default_guest_dir(), &GuestRecipe::default())
    }

    /// The image of `recipe` in `cache_dir`, built if missing. Safe to call from several
    /// processes at once: one builds, the others wait for it.
    pub fn ensure_in(cache_dir: &Path, recipe: &GuestRecipe) -> Result<Self> {
        let key = recipe.key();
        let dir = cache_dir.join(format!("guest-{key}"));
        if let Some(image) = Self::open(&dir)? {
            return Ok(image);
        }
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| Error::io("create the guest cache directory", cache_dir, e))?;
        let lock_path = cache_dir.join("build.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open the build lock", &lock_path, e))?;
        lock.lock()
            .map_err(|e| Error::io("lock the build lock", &lock_path, e))?;
        // Someone else may have built it while we waited.
        if let Some(image) = Self::open(&dir)? {
            return Ok(image);
        }
        remove_stale_builds(cache_dir);
        let work = cache_dir.join(format!(".build-{key}-{}", std::process::id()));
        let result = build(recipe, &key, &work).and_then(|()| {
            let staged = work.join("image");
            std::fs::rename(&staged, &dir)
                .map_err(|e| Error::io("move the built image into place at", &dir, e))
        });
        // The unpacked packages are ~150 MB; never keep them.
        let _ = std::fs::remove_dir_all(&work);
        result?;
        tracing::info!(dir = %dir.display(), "guest image built");
        Self::open(&dir)?.ok_or_else(|| {
            Error::new(
                ErrorKind::GuestBuild,
                format!(
                    "the guest image at `{}` vanished after it was built",
                    dir.display()
                ),
            )
        })
    }

    /// An already built image in `dir`, if complete.
    fn open(dir: &Path) -> Result<Option<Self>> {
        let manifest_path = dir.join("manifest.json");
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::io("read", &manifest_path, error)),
        };
        let manifest: GuestManifest = serde_json::from_str(&text).map_err(|e| {
            Error::new(
                ErrorKind::GuestBuild,
                format!(
                    "the guest manifest `{}` is malformed; delete its directory to rebuild",
                    manifest_path.display()
                ),
            )
            .with_path(&manifest_path)
            .with_source(e)
        })?;
        let image = Self {
            dir: dir.to_owned(),
            manifest,
        };
        for file in [image.kernel(), image.initramfs()] {
            if !file.is_file() {
                return Err(Error::new(
                    ErrorKind::GuestBuild,
                    format!(
                        "the guest image in `{}` lacks `{}`; delete the directory to rebuild",
                        dir.display(),
                        file.display()
                    ),
                ));
            }
        }
        Ok(Some(image))
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel (`-kernel`).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The shared initramfs (gzip cpio); each VM appends its own settings to a copy.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio.gz")
    }

    /// What was built from which packages.
    pub fn manifest(&self) -> &GuestManifest {
        &self.manifest
    }
}

/// Removes work directories left by builds that were killed (we hold the lock, so none runs).
fn remove_stale_builds(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".build-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Builds the image of `recipe` into `<work>/image`.
fn build(recipe: &GuestRecipe, key: &str, work: &Path) -> Result<()> {
    let image = work.join("image");
    std::fs::create_dir_all(&image).map_err(|e| Error::io("create directory", &image, e))?;
    let mut store = PackageStore::new(work)?;

    let kernel_package = store.resolve_meta(&recipe.kernel_meta_package, "linux-image-")?;
    let mut first: Vec<String> = vec![kernel_package.clone(), recipe.busybox_package.clone()];
    first.extend(recipe.programs.iter().map(|(package, _)| package.clone()));
    store.fetch(&first)?;

    let mut archive = base_archive(recipe);
    let kernel_root = store
        .get(&kernel_package)
        .map(|package| package.root.clone())
        .unwrap_or_default();
    let release = add_kernel(recipe, &kernel_root, &kernel_package, &image, &mut archive)?;
    add_busybox(recipe, &store, &mut archive)?;
    let libraries = add_programs(recipe, &mut store, &mut archive)?;

    let initramfs_bytes = archive.write_gzip_file(&image.join("initramfs.cpio.gz"))?;
    let manifest = GuestManifest {
        key: key.to_owned(),
        recipe: recipe.clone(),
        kernel_release: release,
        packages: store
            .all()
            .map(|package| (package.name.clone(), package.version.clone()))
            .collect(),
        libraries,
        initramfs_bytes,
        built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let manifest_path = image.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    std::fs::write(&manifest_path, json).map_err(|e| Error::io("write", &manifest_path, e))
}

/// The parts of the initramfs that come from no package.
fn base_archive(recipe: &GuestRecipe) -> Archive {
    let mut archive = Archive::new();
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc/stillpoint", "root"] {
        archive.directory(dir, 0o755);
    }
    archive.directory("tmp", 0o1777);
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.char_device("dev/console", 0o600, 5, 1);
    archive.file("init", recipe.init_script.as_bytes(), 0o755);
    let mut order = recipe.modules.join("\n");
    order.push('\n');
    archive.file("lib/modules/load-order", order, 0o644);
    archive.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    archive.file("etc/group", "root:x:0:\n", 0o644);
    archive
}

/// Copies the kernel image, checks its built-in options and adds its modules. Returns the
/// kernel release.
fn add_kernel(
    recipe: &GuestRecipe,
    root: &Path,
    package: &str,
    image: &Path,
    archive: &mut Archive,
) -> Result<String> {
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| {
            Error::io(
                format_args!("list the kernel package `{package}` directory"),
                &boot,
                e,
            )
        })?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("vmlinuz-"))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::GuestBuild,
                format!("the kernel package `{package}` has no boot/vmlinuz-*"),
            )
        })?;
    let release = vmlinuz.trim_start_matches("vmlinuz-").to_owned();
    let target = image.join("vmlinuz");
    std::fs::copy(boot.join(&vmlinuz), &target)
        .map_err(|e| Error::io("copy the kernel to", &target, e))?;

    let config_path = boot.join(format!("config-{release}"));
    let config = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::io("read the kernel config", &config_path, e))?;
    let missing = missing_builtin_options(&config, &recipe.kernel_builtin);
    if !missing.is_empty() {
        return Err(Error::new(
            ErrorKind::GuestBuild,
            format!(
                "kernel `{package}` does not have {} built in (`=y` in {}); the guest's /init \
                 relies on them",
                missing.join(", "),
                config_path.display()
            ),
        ));
    }

    let modules_dir = root.join("lib/modules").join(&release);
    let mut files = BTreeMap::new();
    find_modules(&modules_dir, &mut files)
        .map_err(|e| Error::io("list the kernel modules in", &modules_dir, e))?;
    let mut dependencies = BTreeMap::new();
    for module in &recipe.modules {
        let path = files.get(module).ok_or_else(|| {
            Error::new(
                ErrorKind::GuestBuild,
                format!(
                    "kernel `{package}` has no module `{module}.ko` under lib/modules/{release}"
                ),
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let depends = elf::module_depends(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::GuestBuild,
                format!("cannot read the module info of `{module}.ko`"),
            )
            .with_path(path)
            .with_source(e)
        })?;
        dependencies.insert(module.clone(), depends);
        archive.host_file(&format!("lib/modules/{module}.ko"), path, 0o644);
    }
    check_module_order(&recipe.modules, &dependencies).map_err(|message| {
        Error::new(
            ErrorKind::GuestBuild,
            format!("kernel `{package}`: {message}"),
        )
    })?;
    Ok(release)
}

/// Options of `wanted` that are not `=y` in a kernel config file.
fn missing_builtin_options(config: &str, wanted: &[String]) -> Vec<String> {
    let built_in: BTreeSet<&str> = config
        .lines()
        .filter_map(|line| line.strip_suffix("=y"))
        .collect();
    wanted
        .iter()
        .filter(|option| !built_in.contains(option.as_str()))
        .cloned()
        .collect()
}

/// Checks that every module's dependencies are loaded before it.
fn check_module_order(
    order: &[String],
    depends: &BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    for (position, module) in order.iter().enumerate() {
        for dependency in depends.get(module).into_iter().flatten() {
            if !order[..position].contains(dependency) {
                return Err(format!(
                    "module `{module}` needs `{dependency}`, which is not loaded before it \
                     (load order: {})",
                    order.join(" ")
                ));
            }
        }
    }
    Ok(())
}

/// Module name (file stem, `-` read as `_` like the kernel does) to file, recursively.
fn find_modules(dir: &Path, found: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            find_modules(&path, found)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            found.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

/// Adds static busybox and a link for each of its applets.
fn add_busybox(recipe: &GuestRecipe, store: &PackageStore, archive: &mut Archive) -> Result<()> {
    let package = &recipe.busybox_package;
    let root = store
        .get(package)
        .map(|p| p.root.clone())
        .unwrap_or_default();
    let busybox = root.join("bin/busybox");
    if !busybox.is_file() {
        return Err(Error::new(
            ErrorKind::GuestBuild,
            format!("the package `{package}` has no bin/busybox"),
        ));
    }
    archive.host_file("bin/busybox", &busybox, 0o755);
    // The static binary runs on the build host too; it lists its own applets.
    let output = tool::run(
        Command::new(&busybox).arg("--list-full"),
        &format!("listing the applets of busybox from `{package}`"),
    )?;
    for applet in String::from_utf8_lossy(&output.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || archive.contains(applet) {
            continue;
        }
        archive.symlink(applet, "/bin/busybox");
    }
    Ok(())
}

/// Adds each program of the recipe with the shared libraries it needs (transitively) and the
/// dynamic loader. Libraries are looked up in the unpacked packages; when one is missing, the
/// dependencies of the package that needs it are fetched, then their dependencies, and so on.
/// Returns soname to package.
fn add_programs(
    recipe: &GuestRecipe,
    store: &mut PackageStore,
    archive: &mut Archive,
) -> Result<BTreeMap<String, String>> {
    struct Need {
        /// A soname, or an absolute path for the dynamic loader.
        name: String,
        needed_by: String,
        package: String,
    }
    let mut queue = VecDeque::new();
    for (package, program) in &recipe.programs {
        let root = store
            .get(package)
            .map(|p| p.root.clone())
            .unwrap_or_default();
        let path = resolve_in_root(&root, program).ok_or_else(|| {
            Error::new(
                ErrorKind::GuestBuild,
                format!("the package `{package}` has no `{program}`"),
            )
        })?;
        archive.host_file(program, &path, 0o755);
        for name in read_needs(&path, program)? {
            queue.push_back(Need {
                name,
                needed_by: program.clone(),
                package: package.clone(),
            });
        }
    }
    let mut copied: BTreeMap<String, String> = BTreeMap::new();
    while let Some(need) = queue.pop_front() {
        if copied.contains_key(&need.name) {
            continue;
        }
        let mut rounds = 0;
        let (package, path) = loop {
            if let Some(found) = find_library(store, &need.name) {
                break found;
            }
            let mut wanted: Vec<String> = store
                .get(&need.package)
                .map(|p| p.depends.clone())
                .unwrap_or_default();
            if rounds > 0 {
                // Not in the direct dependencies: widen to the dependencies of everything.
                wanted.extend(store.all().flat_map(|p| p.depends.clone()));
            }
            wanted.retain(|name| store.get(name).is_none());
            wanted.sort();
            wanted.dedup();
            if wanted.is_empty() || rounds >= MAX_DEPENDENCY_ROUNDS {
                let fetched: Vec<String> = store.all().map(|p| p.name.clone()).collect();
                return Err(Error::new(
                    ErrorKind::GuestBuild,
                    format!(
                        "cannot find the shared library `{}` needed by `{}` (package `{}`) in \
                         its dependencies; packages searched: {}",
                        need.name,
                        need.needed_by,
                        need.package,
                        fetched.join(", ")
                    ),
                ));
            }
            store.fetch(&wanted)?;
            rounds += 1;
        };
        let guest_path = if need.name.starts_with('/') {
            need.name.trim_start_matches('/').to_owned()
        } else {
            format!("{GUEST_LIB_DIR}/{}", need.name)
        };
        archive.host_file(&guest_path, &path, 0o755);
        copied.insert(need.name.clone(), package.clone());
        for name in read_needs(&path, &need.name)? {
            queue.push_back(Need {
                name,
                needed_by: need.name.clone(),
                package: package.clone(),
            });
        }
    }
    Ok(copied)
}

/// The sonames and interpreter an ELF file needs.
fn read_needs(path: &Path, what: &str) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let needs = elf::dynamic_needs(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::GuestBuild,
            format!("cannot read `{what}` as an ELF file"),
        )
        .with_path(path)
        .with_source(e)
    })?;
    Ok(needs
        .libraries
        .into_iter()
        .chain(needs.interpreter)
        .collect())
}

/// Finds a soname (or an absolute loader path) in the unpacked packages: (package, real file).
fn find_library(store: &PackageStore, name: &str) -> Option<(String, PathBuf)> {
    store.all().find_map(|package| {
        let found = if name.starts_with('/') {
            resolve_in_root(&package.root, name)
        } else {
            LIBRARY_DIRS
                .iter()
                .find_map(|dir| resolve_in_root(&package.root, &format!("{dir}/{name}")))
        };
        found.map(|path| (package.name.clone(), path))
    })
}

/// Resolves `path` inside `root` as if `root` were `/`, following symbolic links (absolute
/// ones relative to `root`, never to the host). `None` when it does not lead to a file.
fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut current = path.trim_start_matches('/').to_owned();
    for _ in 0..16 {
        let host = root.join(&current);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host).ok()?;
            let target = target.to_string_lossy();
            current = if let Some(absolute) = target.strip_prefix('/') {
                absolute.to_owned()
            } else {
                let parent = Path::new(&current).parent().unwrap_or(Path::new(""));
                normalize(&parent.join(target.as_ref()))?
            };
            continue;
        }
        return meta.is_file().then_some(host);
    }
    None
}

/// Removes `.` and `..` from a relative path; `None` if it climbs above the root.
fn normalize(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            std::path::Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_key_changes_with_the_recipe() {
        let recipe = GuestRecipe::default();
        assert_eq!(recipe.key(), GuestRecipe::default().key());
        assert_eq!(recipe.key().len(), 16);
        let mut changed = recipe.clone();
        changed.init_script.push_str("# changed\n");
        assert_ne!(recipe.key(), changed.key());
        let mut changed = recipe.clone();
        changed.modules.pop();
        assert_ne!(recipe.key(), changed.key());
    }

    #[test]
    fn builtin_options_are_checked() {
        let config = "CONFIG_EXT4_FS=y\nCONFIG_VIRTIO=m\n# CONFIG_X is not set\n";
        let wanted = vec![
            "CONFIG_EXT4_FS".to_owned(),
            "CONFIG_VIRTIO".to_owned(),
            "CONFIG_X".to_owned(),
        ];
        assert_eq!(
            missing_builtin_options(config, &wanted),
            ["CONFIG_VIRTIO", "CONFIG_X"]
        );
    }

    #[test]
    fn module_order_must_respect_dependencies() {
        let order: Vec<String> = ["virtio_ring", "virtio", "virtio_blk"]
            .map(String::from)
            .to_vec();
        let mut depends = BTreeMap::new();
        depends.insert(
            "virtio_blk".to_owned(),
            vec!["virtio".to_owned(), "virtio_ring".to_owned()],
        );
        depends.insert("virtio".to_owned(), vec![]);
        assert!(check_module_order(&order, &depends).is_ok());
        let reversed: Vec<String> = order.iter().rev().cloned().collect();
        let message = check_module_order(&reversed, &depends).expect_err("wrong order");
        assert!(message.contains("`virtio_blk` needs `virtio`"), "{message}");
    }

    #[test]
    fn symlinks_resolve_inside_the_root_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).expect("mkdir");
        std::fs::create_dir_all(root.join("lib64")).expect("mkdir");
        std::fs::write(root.join("lib/x86_64-linux-gnu/libz.so.1.2.13"), b"z").expect("write");
        std::os::unix::fs::symlink(
            "libz.so.1.2.13",
            root.join("lib/x86_64-linux-gnu/libz.so.1"),
        )
        .expect("link");
        // Like libc6's /lib64/ld-linux-x86-64.so.2: an absolute link, which must not reach the host.
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/libz.so.1", root.join("lib64/ld.so"))
            .expect("link");
        std::os::unix::fs::symlink("/etc/passwd", root.join("lib64/host")).expect("link");
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("lib64/climb"))
            .expect("link");
        let real = root.join("lib/x86_64-linux-gnu/libz.so.1.2.13");
        assert_eq!(
            resolve_in_root(root, "lib/x86_64-linux-gnu/libz.so.1"),
            Some(real.clone())
        );
        assert_eq!(resolve_in_root(root, "/lib64/ld.so"), Some(real));
        assert_eq!(resolve_in_root(root, "lib64/host"), None);
        assert_eq!(resolve_in_root(root, "lib64/climb"), None);
        assert_eq!(
            resolve_in_root(root, "lib64"),
            None,
            "a directory is not a library"
        );
    }
}
