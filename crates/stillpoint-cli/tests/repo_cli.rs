//! The repository commands, run as a user runs them: the real `stillpoint` binary in
//! subprocesses, on real files in a temp directory.

use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const PASS: &str = "cli test passphrase";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stillpoint"));
        cmd.current_dir(self.dir.path())
            .env("STILLPOINT_PASSWORD", PASS)
            .env_remove("STILLPOINT_REPO")
            .env_remove("STILLPOINT_CONFIG")
            .args(["--repo", "repo"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs with `--json`, expects success, returns the parsed document.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.cmd().arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "stillpoint {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn init(&self, chunk: &str) {
        let out = self.run(&["repo", "init", "--chunk-size", chunk]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn random_image(&self, name: &str, size: usize, seed: u8) -> PathBuf {
        let path = self.path(name);
        // A cheap deterministic pseudo-random stream (xorshift): incompressible, no dedup.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(seed);
        let mut data = vec![0u8; size];
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        fs::write(&path, data).unwrap();
        path
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn backup_list_restore_verify_round_trip() {
    let env = Env::new();
    env.init("1MiB");
    let image = env.random_image("disk.img", (3 << 20) + 777, 1);
    let backup = env.json(&["backup-image", "disk.img", "--name", "web"]);
    let id = backup["snapshot"].as_str().unwrap().to_string();
    let list = env.json(&["snapshots", "web"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id);
    let restored = env.json(&["restore", &id[..6], "--to", "out"]);
    assert_eq!(restored["disks"][0]["disk"], "disk.img");
    assert_eq!(
        fs::read(&image).unwrap(),
        fs::read(env.path("out/disk.raw")).unwrap()
    );
    let verify = env.json(&["repo", "verify"]);
    assert_eq!(verify["problems"].as_array().unwrap().len(), 0);
    assert_eq!(verify["chunks_checked"], 4);
    let stats = env.json(&["repo", "stats"]);
    assert_eq!(stats["snapshots"], 1);
}

#[test]
fn incremental_with_changed_ranges_reads_only_those_chunks() {
    let env = Env::new();
    env.init("64KiB");
    let image = env.random_image("disk.img", 2 << 20, 2);
    env.json(&["backup-image", "disk.img", "--name", "db"]);
    let file = fs::OpenOptions::new().write(true).open(&image).unwrap();
    file.write_all_at(&[0xab; 10], 65536 * 5 + 3).unwrap();
    file.write_all_at(&[0xcd; 10], 65536 * 20).unwrap();
    fs::write(
        env.path("ranges"),
        format!("{} 10\n{} 10\n", 65536 * 5 + 3, 65536 * 20),
    )
    .unwrap();
    let inc = env.json(&[
        "backup-image",
        "disk.img",
        "--name",
        "db",
        "--parent",
        "latest",
        "--changed-ranges",
        "ranges",
    ]);
    assert_eq!(inc["stats"]["bytes_read"], 2 * 65536);
    assert_eq!(inc["stats"]["chunks_unchanged"], 30);
    env.json(&["restore", "db:latest", "--to", "out"]);
    assert_eq!(
        fs::read(&image).unwrap(),
        fs::read(env.path("out/disk.raw")).unwrap()
    );

    fs::write(env.path("bad-ranges"), "0 10\nten 20\n").unwrap();
    let out = env.run(&[
        "backup-image",
        "disk.img",
        "--name",
        "db",
        "--parent",
        "latest",
        "--changed-ranges",
        "bad-ranges",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad-ranges:2:"), "{}", stderr(&out));
}

/// kill -9 in the middle of a backup: no snapshot, verify passes, the next backup reuses
/// every chunk the killed one had stored.
#[test]
fn killed_backup_leaves_no_snapshot_and_its_chunks_are_reused() {
    let env = Env::new();
    env.init("1MiB");
    env.random_image("big.img", 400 << 20, 3);
    let mut child = env
        .cmd()
        .args(["backup-image", "big.img", "--name", "vm"])
        .spawn()
        .unwrap();
    let chunks_dir = env.path("repo/chunks");
    while count_files(&chunks_dir) < 8 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the backup was killed, not finished"
    );
    let stored_before = count_files(&chunks_dir);

    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 0);
    let verify = env.run(&["repo", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));

    let next = env.json(&["backup-image", "big.img", "--name", "vm"]);
    let stats = &next["stats"];
    assert!(
        stats["chunks_reused"].as_u64().unwrap() >= stored_before as u64,
        "{stored_before} chunks were stored before the kill, only {} reused",
        stats["chunks_reused"]
    );
    assert_eq!(
        stats["chunks_new"].as_u64().unwrap() + stats["chunks_reused"].as_u64().unwrap(),
        400
    );
    assert!(env.run(&["repo", "verify"]).status.success());
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 1);
}

#[test]
fn bit_flips_are_named_by_verify_and_fail_restore() {
    let env = Env::new();
    env.init("1MiB");
    env.random_image("disk.img", 3 << 20, 4);
    let id = env.json(&["backup-image", "disk.img", "--name", "vm"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Flip a bit in the chunk at offset 1 MiB.
    let repo = env.path("repo");
    let index: Vec<PathBuf> = fs::read_dir(repo.join("chunks"))
        .unwrap()
        .flat_map(|d| {
            fs::read_dir(d.unwrap().path())
                .unwrap()
                .map(|e| e.unwrap().path())
        })
        .collect();
    assert_eq!(index.len(), 3);
    let victim = &index[0];
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(victim)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, 1000).unwrap();
    file.write_all_at(&[b[0] ^ 4], 1000).unwrap();

    let out = env.run(&["repo", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("snapshot {id}, disk disk.img, offset ")),
        "{text}"
    );

    let out = env.run(&["restore", &id, "--to", "out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&id) && stderr(&out).contains("offset"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["restore", &id, "--to", "out", "--zero-fill-damaged"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a zero-filled restore is degraded"
    );
    assert!(stderr(&out).contains("zero-filled"), "{}", stderr(&out));
}

#[test]
fn clear_errors_for_wrong_passphrase_missing_repo_unknown_version() {
    let env = Env::new();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no repository") && stderr(&out).contains("repo"),
        "{}",
        stderr(&out)
    );

    env.init("1MiB");
    let out = env
        .cmd()
        .env("STILLPOINT_PASSWORD", "nope")
        .arg("snapshots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        stderr(&out)
    );

    fs::write(env.path("pw"), format!("{PASS}\n")).unwrap();
    let out = env
        .cmd()
        .env_remove("STILLPOINT_PASSWORD")
        .args(["--password-file", "pw", "snapshots"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "password file works: {}",
        stderr(&out)
    );
    let out = env
        .cmd()
        .env_remove("STILLPOINT_PASSWORD")
        .arg("snapshots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("STILLPOINT_PASSWORD"),
        "{}",
        stderr(&out)
    );

    let config = env.path("repo/config");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("format version 2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn two_backups_in_parallel_both_restore() {
    let env = Env::new();
    env.init("256KiB");
    let a = env.random_image("a.img", 24 << 20, 5);
    let b = env.random_image("b.img", 24 << 20, 6);
    // Both processes run at the same time, each with its own backup lock.
    let mut spawned: Vec<_> = [("a.img", "vm-c"), ("b.img", "vm-d")]
        .iter()
        .map(|(img, vm)| {
            env.cmd()
                .args(["backup-image", img, "--name", vm])
                .spawn()
                .unwrap()
        })
        .collect();
    for child in &mut spawned {
        assert!(child.wait().unwrap().success());
    }
    for (vm, image) in [("vm-c", &a), ("vm-d", &b)] {
        let dir = format!("out-{vm}");
        env.json(&["restore", &format!("{vm}:latest"), "--to", &dir]);
        let name = image.file_stem().unwrap().to_str().unwrap().to_string() + ".raw";
        assert_eq!(
            fs::read(image).unwrap(),
            fs::read(env.path(&format!("{dir}/{name}"))).unwrap()
        );
    }
    assert!(env.run(&["repo", "verify"]).status.success());
}

#[test]
fn prune_and_gc_by_retention_rules() {
    let env = Env::new();
    let out = env.run(&["repo", "init", "--chunk-size", "64KiB", "--gc-grace", "0s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for seed in 0..3 {
        env.random_image("disk.img", 1 << 20, 10 + seed);
        env.json(&["backup-image", "disk.img", "--name", "vm"]);
    }
    let out = env.run(&["repo", "prune"]);
    assert_eq!(out.status.code(), Some(1), "prune without rules refuses");
    let dry = env.json(&["repo", "prune", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["plan"]["decisions"].as_array().unwrap().len(), 3);
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 3);
    let pruned = env.json(&["repo", "prune", "--keep-last", "1"]);
    assert_eq!(pruned["deleted"].as_array().unwrap().len(), 2);
    let gc = env.json(&["repo", "gc"]);
    assert_eq!(gc["deleted_chunks"], 32);
    assert_eq!(gc["referenced_chunks"], 16);
    env.json(&["restore", "vm:latest", "--to", "out"]);
    assert_eq!(
        fs::read(env.path("disk.img")).unwrap(),
        fs::read(env.path("out/disk.raw")).unwrap()
    );
}

#[test]
fn restore_one_disk_as_qcow2() {
    let env = Env::new();
    env.init("1MiB");
    let image = env.random_image("vda.img", (2 << 20) + 4096, 7);
    let id = env.json(&[
        "backup-image",
        "vda.img",
        "--name",
        "vm",
        "--disk-name",
        "vda",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.run(&["restore", &id, "--to", "out", "--disk", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no disk named `nope`") && stderr(&out).contains("vda"),
        "{}",
        stderr(&out)
    );
    env.json(&[
        "restore", &id, "--to", "out", "--disk", "vda", "--format", "qcow2",
    ]);
    let qcow = env.path("out/vda.qcow2");
    let status = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&image)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "qemu-img compare: the qcow2 differs from the image"
    );
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(all_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// docs/exit-codes.md: `snapshots` lists what it can read, names each manifest it cannot,
/// and exits 1 (it exited 0 with only a warning).
#[test]
fn snapshots_lists_what_it_can_and_fails_naming_an_unreadable_manifest() {
    let env = Env::new();
    env.init("64KiB");
    env.random_image("disk.img", 200_000, 20);
    let good = env.json(&["backup-image", "disk.img", "--name", "a"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = env.json(&["backup-image", "disk.img", "--name", "b"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = env.path(&format!("repo/snapshots/{bad}"));
    let mut bytes = fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&manifest, bytes).unwrap();

    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&good), "{stdout}");
    assert!(
        stderr(&out).contains(&format!("snapshot {bad} cannot be read"))
            && stderr(&out).contains(&format!("snapshots/{bad}")),
        "{}",
        stderr(&out)
    );
    let out = env.cmd().args(["--json", "snapshots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], good);
}

/// Whoever can write to the repository sets `"encryption": "none"` in its config: every
/// command refuses, naming the config, and nothing is written in clear.
#[test]
fn a_config_downgraded_to_none_is_refused_and_nothing_is_written_in_clear() {
    let env = Env::new();
    env.init("64KiB");
    env.random_image("disk.img", 300_000, 21);
    env.json(&["backup-image", "disk.img", "--name", "vm"]);
    let config = env.path("repo/config");
    let text = fs::read_to_string(&config).unwrap();
    let downgraded = text.replace(
        "\"encryption\": \"aes256-gcm\",",
        &format!(
            "\"encryption\": \"none\",\n  \"id_key\": \"{}\",",
            "cd".repeat(32)
        ),
    );
    assert_ne!(text, downgraded);
    fs::write(&config, downgraded).unwrap();
    let files_before = all_files(&env.path("repo")).len();
    env.random_image("disk2.img", 300_000, 22);
    for args in [
        vec!["snapshots"],
        vec!["backup-image", "disk2.img", "--name", "vm"],
        vec!["repo", "verify"],
    ] {
        let out = env
            .cmd()
            .env_remove("STILLPOINT_PASSWORD")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("\"encryption\": \"none\"")
                && stderr(&out).contains("key files")
                && stderr(&out).contains("repo/config"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        all_files(&env.path("repo")).len(),
        files_before,
        "nothing written"
    );
}

#[test]
fn repo_init_refuses_a_non_empty_folder_and_a_bad_zstd_level() {
    let env = Env::new();
    fs::create_dir(env.path("repo")).unwrap();
    fs::write(env.path("repo/notes.txt"), "mine").unwrap();
    let out = env.run(&["repo", "init"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not empty") && stderr(&out).contains("repo"),
        "{}",
        stderr(&out)
    );
    assert_eq!(all_files(&env.path("repo")).len(), 1);
    fs::remove_file(env.path("repo/notes.txt")).unwrap();

    let out = env.run(&["repo", "init", "--zstd-level", "99999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("zstd_level 99999"),
        "{}",
        stderr(&out)
    );

    env.init("64KiB"); // the empty folder is fine
    let config = env.path("repo/config");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("\"zstd_level\": 1", "\"zstd_level\": 99999"),
    )
    .unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("zstd_level 99999") && stderr(&out).contains("repo/config"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_truncated_index_is_reported_as_truncated_with_sizes() {
    let env = Env::new();
    env.init("64KiB");
    env.random_image("disk.img", 1 << 20, 23);
    let id = env.json(&["backup-image", "disk.img", "--name", "vm"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let index = env.path(&format!("repo/indexes/{id}/0"));
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..100]).unwrap();
    let out = env.run(&["restore", &id, "--to", "out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "truncated: 100 bytes, the manifest recorded {}",
            bytes.len()
        )) && stderr(&out).contains(&format!("indexes/{id}/0")),
        "{}",
        stderr(&out)
    );
}
