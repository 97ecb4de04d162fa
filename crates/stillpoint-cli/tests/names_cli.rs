//! Names and the runtime directory, through the binary: a VM name with `../` (or too long) is
//! refused by every command that turns it into a path or a snapshot name, with an error naming
//! the argument, before anything outside the runtime directory is read; and the runtime
//! directory is created private (0700) and refused when someone else owns it or others may
//! write it.

mod support;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Output;
use support::{stillpoint_command, text};

const PASS: &str = "names test passphrase";

fn stillpoint(dir: &Path, runtime: &Path, args: &[&str]) -> Output {
    stillpoint_command()
        .args(["--repo", "repo"])
        .args(args)
        .env("STILLPOINT_RUNTIME_DIR", runtime)
        .env("STILLPOINT_PASSWORD", PASS)
        .current_dir(dir)
        .output()
        .expect("run stillpoint")
}

/// Every command that takes a VM refuses `../`-names; a `vm.json` planted where the name would
/// lead (outside the runtime directory) is never read.
#[test]
fn vm_names_with_dot_dot_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    // `<run>/vms/../../outside` is `<dir>/outside`: a record there points at a socket that the
    // error would name if the record were read.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("vm.json"),
        br#"{"name":"outside","pid":1,"qmp_socket":"/planted/qmp.sock","qga_socket":"/planted/qga.sock"}"#,
    )
    .unwrap();
    let bad = "../../outside";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["check", bad], "VM"),
        (vec!["backup", "fine-vm", bad], "VM"),
        (vec!["freeze", "--name", bad], "--name"),
        (vec!["unfreeze", "--name", bad], "--name"),
        (vec!["vm", "stop", bad], "VM name"),
    ];
    for (args, argument) in cases {
        let output = stillpoint(dir.path(), &runtime, &args);
        let all = text(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {all}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{argument} `{bad}`")),
            "{args:?}: the error does not name the argument: {all}"
        );
        assert!(
            stderr.contains("letters, digits"),
            "{args:?}: the error does not say the rule: {all}"
        );
        assert!(
            !stderr.contains("planted"),
            "{args:?}: read the planted record: {all}"
        );
    }
}

#[test]
fn backup_image_names_are_checked_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let init = stillpoint(
        dir.path(),
        &runtime,
        &["repo", "init", "--chunk-size", "64KiB"],
    );
    assert!(init.status.success(), "{}", text(&init));
    std::fs::write(dir.path().join("disk.img"), vec![7u8; 1 << 16]).unwrap();
    let long = "n".repeat(300);
    for (name, problem) in [
        ("../../x", "letters, digits"),
        (long.as_str(), "300 characters long"),
        ("", "is empty"),
    ] {
        let output = stillpoint(
            dir.path(),
            &runtime,
            &["backup-image", "disk.img", "--name", name],
        );
        let all = text(&output);
        assert_eq!(output.status.code(), Some(1), "{name}: {all}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--name `"), "{name}: {all}");
        assert!(stderr.contains(problem), "{name}: {all}");
    }
    let listed = stillpoint(dir.path(), &runtime, &["--json", "snapshots"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let snapshots: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        snapshots.as_array().map(Vec::len),
        Some(0),
        "a refused name stored a snapshot: {snapshots}"
    );
    // A good name still works.
    let good = stillpoint(
        dir.path(),
        &runtime,
        &["backup-image", "disk.img", "--name", "web-1.example"],
    );
    assert!(good.status.success(), "{}", text(&good));
}

#[test]
fn the_runtime_directory_is_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("fresh/run");
    let output = stillpoint(dir.path(), &runtime, &["--json", "vm", "list"]);
    assert!(output.status.success(), "{}", text(&output));
    let mode = std::fs::metadata(&runtime).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "runtime directory mode {mode:o}");
}

#[test]
fn a_runtime_directory_others_may_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("shared");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let output = stillpoint(dir.path(), &runtime, &["check", "demo"]);
    let all = text(&output);
    assert_eq!(output.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("runtime directory {}", runtime.display())),
        "{all}"
    );
    assert!(stderr.contains("others may write"), "{all}");
}

#[test]
fn a_runtime_directory_of_someone_else_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("theirs");
    std::fs::create_dir(&runtime).unwrap();
    let me = std::fs::metadata(dir.path()).unwrap().uid();
    // Handing a directory to someone else needs root (the test machines run as root); as
    // another user, a directory of root's stands for "someone else's".
    let other = if me == 0 {
        std::os::unix::fs::chown(&runtime, Some(65534), Some(65534)).unwrap();
        65534
    } else {
        0
    };
    let runtime = if me == 0 {
        runtime
    } else {
        Path::new("/").to_path_buf()
    };
    let output = stillpoint(dir.path(), &runtime, &["vm", "list"]);
    let all = text(&output);
    assert_eq!(output.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("owned by uid {other}")), "{all}");
    assert!(stderr.contains(&runtime.display().to_string()), "{all}");
}
