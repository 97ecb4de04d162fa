//! The passphrase through the binary, without a VM: taken out of the environment at start-up,
//! it still initialises and opens the repository (from `STILLPOINT_PASSWORD` or
//! `--password-file`), and it appears in no log line even at `-vvv` (trace), where `Debug`
//! output of the structures that hold it would show. The child processes' environments are
//! read in `vm_secrets.rs` (they need a VM).

mod support;

use std::path::Path;
use std::process::Output;
use support::{stillpoint_command, text};

const PASS: &str = "secrets-cli-canary-passphrase";

fn stillpoint(dir: &Path, args: &[&str], env_pass: Option<&str>) -> Output {
    let mut command = stillpoint_command();
    command
        .args(["--repo", "repo"])
        .args(args)
        .env("STILLPOINT_RUNTIME_DIR", dir.join("run"))
        .current_dir(dir);
    if let Some(pass) = env_pass {
        command.env("STILLPOINT_PASSWORD", pass);
    }
    command.output().expect("run stillpoint")
}

#[test]
fn the_passphrase_works_and_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let init = stillpoint(
        dir.path(),
        &["-vvv", "repo", "init", "--chunk-size", "64KiB"],
        Some(PASS),
    );
    assert!(init.status.success(), "{}", text(&init));
    assert!(!text(&init).contains(PASS), "logged: {}", text(&init));

    std::fs::write(dir.path().join("disk.img"), vec![3u8; 1 << 16]).unwrap();
    let backup = stillpoint(
        dir.path(),
        &["-vvv", "backup-image", "disk.img", "--name", "img"],
        Some(PASS),
    );
    assert!(backup.status.success(), "{}", text(&backup));
    assert!(!text(&backup).contains(PASS), "logged: {}", text(&backup));

    // From a file, with the environment variable unset.
    let file = dir.path().join("pass");
    std::fs::write(&file, format!("{PASS}\n")).unwrap();
    let listed = stillpoint(
        dir.path(),
        &[
            "-vvv",
            "--password-file",
            file.to_str().unwrap(),
            "--json",
            "snapshots",
        ],
        None,
    );
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(!text(&listed).contains(PASS), "logged: {}", text(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"img\""));

    // A wrong one is refused (so the passphrase really is what opens it).
    let wrong = stillpoint(dir.path(), &["snapshots"], Some("not the passphrase"));
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
    // Needed and absent: a clear error, no prompt (stdin is not a terminal).
    let absent = stillpoint(dir.path(), &["snapshots"], None);
    assert_eq!(absent.status.code(), Some(1), "{}", text(&absent));
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("STILLPOINT_PASSWORD"),
        "{}",
        text(&absent)
    );
}
