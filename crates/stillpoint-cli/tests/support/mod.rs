//! What every CLI test shares: the real `stillpoint` binary in an environment of the test's own
//! making, and how a run is shown when an assertion fails. Each test binary includes it with
//! `mod support;`; the backup VM tests add `backup_support` on top.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Variables of the developer's shell that would change what the binary does: every test sets
/// the ones it needs itself.
const INHERITED_SETTINGS: [&str; 8] = [
    "STILLPOINT_CONFIG",
    "STILLPOINT_REPO",
    "STILLPOINT_PASSWORD",
    "STILLPOINT_RUNTIME_DIR",
    "RUST_LOG",
    "NO_COLOR",
    "CLICOLOR_FORCE",
    "FAILPOINTS",
];

/// The `stillpoint` binary built with this test, with none of [`INHERITED_SETTINGS`].
pub fn stillpoint_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stillpoint"));
    for name in INHERITED_SETTINGS {
        command.env_remove(name);
    }
    command
}

/// The workspace's root (examples, recipes).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A run's exit code, stdout and stderr, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the binary with `args` in the workspace's root (where the examples' relative paths
/// resolve).
pub fn stillpoint_in_workspace(args: &[&str]) -> Output {
    stillpoint_command()
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("the stillpoint binary runs")
}

/// A run's stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}
