//! Human and JSON output, error printing and the exit codes of `docs/exit-codes.md`.

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
