//! Child processes: built without the secrets of [`crate::secrets::SECRET_ENV_VARS`], and the
//! two `pre_exec` set-ups stillpoint's children need.
//!
//! Async callers convert: `tokio::process::Command::from(child::command(program))` keeps the
//! environment and the `pre_exec` set-up.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use crate::secrets::SECRET_ENV_VARS;

/// A command for `program` whose environment is this process's minus every secret variable.
/// Variables set with `.env(...)` afterwards still apply (a caller may hand a child a secret
/// on purpose, explicitly).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    without_secrets(&mut command);
    command
}

/// Removes every secret variable from the environment `command` passes on.
pub fn without_secrets(command: &mut Command) -> &mut Command {
    for name in SECRET_ENV_VARS {
        command.env_remove(name);
    }
    command
}

/// The child gets SIGKILL when the thread that started it dies (so when stillpoint itself is
/// killed, even by SIGKILL, no QEMU or hook outlives it). It reaches the child's first process
/// only; put the child in its own process group to kill what it starts.
#[allow(unsafe_code)]
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: then no signal would come.
            if nix::unistd::getppid() != parent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        })
    }
}

/// The child starts a new session (no controlling terminal, its own process group): it lives
/// on after stillpoint exits and a terminal's hang-up does not reach it.
#[allow(unsafe_code)]
pub fn new_session(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `env` as a child and returns its environment lines. The test sets the variables
    /// only on the parent command it builds (never on this process: tests run in threads).
    fn child_env(command: &mut Command) -> Vec<String> {
        let output = command.output().expect("run env");
        assert!(output.status.success());
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn inherited_secrets_are_removed_and_explicit_ones_kept() {
        // The secrets are set on the command (this test process's own environment is shared
        // with other test threads), then scrubbed: the calls `command` makes. Inheritance
        // itself is tested through the binary (crates/stillpoint-cli/tests/secrets_cli.rs).
        let mut command = Command::new("env");
        for name in SECRET_ENV_VARS {
            command.env(name, "hunter2");
        }
        command.env("STILLPOINT_KEEP", "yes");
        without_secrets(&mut command);
        let lines = child_env(&mut command);
        for name in SECRET_ENV_VARS {
            assert!(
                !lines
                    .iter()
                    .any(|line| line.starts_with(&format!("{name}="))),
                "{name} reached the child: {lines:?}"
            );
        }
        assert!(lines.iter().any(|line| line == "STILLPOINT_KEEP=yes"));

        let mut explicit = command_with_env_after("STILLPOINT_PASSWORD", "on-purpose");
        let lines = child_env(&mut explicit);
        assert!(
            lines
                .iter()
                .any(|line| line == "STILLPOINT_PASSWORD=on-purpose"),
            "{lines:?}"
        );
    }

    fn command_with_env_after(name: &str, value: &str) -> Command {
        let mut command = command("env");
        command.env(name, value);
        command
    }

    #[test]
    fn set_ups_let_the_child_run() {
        let mut command = command("true");
        die_with_parent(&mut command);
        assert!(command.status().expect("run true").success());
        let mut command = super::command("true");
        new_session(&mut command);
        assert!(command.status().expect("run true").success());
    }
}
