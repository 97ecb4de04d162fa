//! The binary as a careless user meets it, no VM needed: `check` of a VM whose monitor socket
//! does not exist, and output written to a pipe (a log file, a CI job) carrying no colour codes.

mod support;

use std::path::Path;
use std::process::Output;
use support::{stillpoint_command, text};

/// A directory with a `stillpoint.toml` naming VM `ghost` by a monitor socket that does not
/// exist, and a recipe that validates with one warning (a log line on stderr).
fn ghost_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gone").join("qmp.sock");
    std::fs::write(
        dir.path().join("stillpoint.toml"),
        format!("[vms.ghost]\nqmp = \"{}\"\n", socket.display()),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("warned.yaml"),
        "apiVersion: ramendr.openshift.io/v1alpha1\nkind: Recipe\nmetadata: {name: warned}\n\
         spec:\n  groups:\n  - {name: disks, type: volume}\n  workflows:\n  - name: backup\n    \
         sequence: [{group: disks}]\n    priority: 5\n",
    )
    .unwrap();
    (dir, socket.display().to_string())
}

/// Runs the binary in `dir`, stdout and stderr both pipes.
fn stillpoint(dir: &Path, args: &[&str]) -> Output {
    // Colour must stay off because the output is a pipe, not because of NO_COLOR (which
    // `stillpoint_command` removes).
    stillpoint_command()
        .args(args)
        .current_dir(dir)
        .env("STILLPOINT_RUNTIME_DIR", dir.join("run"))
        .output()
        .expect("the stillpoint binary runs")
}

#[test]
fn check_of_a_vm_whose_monitor_socket_is_missing_fails_naming_the_vm_and_the_socket() {
    let (dir, socket) = ghost_dir();
    let check = stillpoint(dir.path(), &["check", "ghost"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "docs/exit-codes.md: the VM could not be looked at: {}",
        text(&check)
    );
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("VM `ghost`") && stderr.contains(&socket),
        "the error names the VM and the socket path: {}",
        text(&check)
    );
    assert!(
        !String::from_utf8_lossy(&check.stdout).contains("crash"),
        "no consistency level is offered for a VM that does not run: {}",
        text(&check)
    );

    let json = stillpoint(dir.path(), &["check", "ghost", "--json"]);
    assert_eq!(json.status.code(), Some(1), "{}", text(&json));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("one JSON document on stdout ({e}): {}", text(&json)));
    let error = value["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("ghost") && error.contains(&socket),
        "{value:#}"
    );

    // `backup` fails on the same VM (into a repository that exists): the two commands agree.
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let init = stillpoint(
        dir.path(),
        &["--repo", repo, "repo", "init", "--unencrypted"],
    );
    assert!(init.status.success(), "{}", text(&init));
    let backup = stillpoint(dir.path(), &["--repo", repo, "backup", "ghost"]);
    assert_eq!(backup.status.code(), Some(1), "{}", text(&backup));
    assert!(
        String::from_utf8_lossy(&backup.stderr).contains("ghost"),
        "{}",
        text(&backup)
    );
}

#[test]
fn output_to_a_pipe_carries_no_escape_codes() {
    let (dir, _) = ghost_dir();
    // A log line (the recipe's warning), the human error, at the most verbose level.
    let output = stillpoint(
        dir.path(),
        &["-vvv", "check", "ghost", "--recipe", "warned.yaml"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("WARN") && stderr.contains("priority"),
        "the recipe's warning is logged, so there is a log line to look at: {}",
        text(&output)
    );
    assert!(stderr.contains("error: "), "{}", text(&output));
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        assert!(
            !bytes.contains(&0x1b),
            "{stream} is a pipe, yet it holds an ESC byte (a colour code): {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}
