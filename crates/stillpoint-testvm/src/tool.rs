//! Running host tools (apt-get, dpkg-deb, mkfs.ext4, qemu-img) with errors that name the step.

use std::process::{Command, Output};

use crate::error::{Error, ErrorKind, Result};

/// How much of a failing tool's stderr goes into the error message.
const STDERR_TAIL_BYTES: usize = 2000;

/// Runs `command` to completion; a non-zero exit becomes an error naming `step`, the command
/// line and the end of its stderr.
pub(crate) fn run(command: &mut Command, step: &str) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| {
        let kind = if source.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::ToolMissing
        } else {
            ErrorKind::ToolFailed
        };
        Error::new(kind, format!("{step}: cannot run `{program}`")).with_source(source)
    })?;
    if !output.status.success() {
        let line = command_line(command);
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::new(
            ErrorKind::ToolFailed,
            format!(
                "{step}: `{line}` failed ({}): {}",
                output.status,
                tail(stderr.trim(), STDERR_TAIL_BYTES)
            ),
        ));
    }
    Ok(output)
}

/// The command as a readable line (for messages only; nothing is run through a shell).
fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub(crate) fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs a host tool with plain arguments (no shell) and returns its stdout; a failure is an
/// error naming the command line and the end of its stderr. For tests that drive `qemu-img`,
/// `nbdinfo`, `nbdcopy` and the like.
pub fn run_tool(program: &str, args: &[&str]) -> Result<String> {
    let output = run(Command::new(program).args(args), program)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_tool_names_step_command_and_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo boom >&2; exit 3"]);
        let error = run(&mut command, "make the thing").expect_err("exit 3");
        let message = error.to_string();
        assert_eq!(error.kind(), ErrorKind::ToolFailed);
        assert!(message.starts_with("make the thing: `sh -c"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.ends_with("boom"), "{message}");
    }

    #[test]
    fn missing_program_is_tool_missing() {
        let mut command = Command::new("/nonexistent/stillpoint-tool");
        let error = run(&mut command, "step").expect_err("missing");
        assert_eq!(error.kind(), ErrorKind::ToolMissing);
    }

    #[test]
    fn tail_cuts_at_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 2), "ef");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
