//! Human and JSON output, error printing and the exit codes of `docs/exit-codes.md`.

use std::ffi::OsStr;
use std::io::IsTerminal;

use serde::Serialize;

/// The requested work was done (for backups: the requested consistency level was achieved).
pub const EXIT_OK: u8 = 0;
/// An error: nothing (more) was published; the message says what and where.
pub const EXIT_ERROR: u8 = 1;
/// Usage error (bad flags); clap uses this code too.
#[allow(dead_code)]
pub const EXIT_USAGE: u8 = 2;
/// The backup completed, but at a lower consistency level than requested (`--on-quiesce-failure degrade`).
#[allow(dead_code)]
pub const EXIT_DEGRADED: u8 = 3;

/// Prints an error and its chain of causes once, each cause on its own line.
pub fn print_error(error: &anyhow::Error, json: bool) {
    if json {
        let chain: Vec<String> = error.chain().map(|cause| cause.to_string()).collect();
        let value = serde_json::json!({ "error": chain.first(), "causes": &chain[1..] });
        println!("{value}");
        return;
    }
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// Prints a value as one JSON document on stdout.
#[allow(dead_code)]
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Whether to write colour (ANSI escapes) to a stream: only to a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>). Log files,
/// pipes and the guardian's log get plain text.
pub fn colour_wanted(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// [`colour_wanted`] for stderr (logs and progress go there) in this process's environment.
pub fn colour_on_stderr() -> bool {
    colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(colour_wanted(true, None));
        assert!(!colour_wanted(false, None), "pipes and files get no colour");
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(
            colour_wanted(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count (no-color.org)"
        );
        assert!(!colour_wanted(false, Some(OsStr::new("1"))));
    }
}
