//! `start-vm.sh`: a POSIX shell script that starts a restored VM with its rewritten command
//! line. Every word is quoted with `shlex` (a well-kept implementation of POSIX quoting), one
//! option per line so that a person can read and edit it.

use std::path::Path;

use super::cmdline::{CommandLine, Item};
use crate::error::{PlatformError, PlatformErrorKind, Result};

/// The script's text: a comment header (`header` lines, then `notes`), creation of
/// `run_dir`, then `exec` of `argv`. Fails only for an argv word holding a NUL byte, which no
/// shell can pass.
pub(crate) fn start_script(
    argv: &[String],
    run_dir: &Path,
    header: &[String],
    notes: &[String],
) -> Result<String> {
    let Some(line) = CommandLine::parse(argv) else {
        return Err(PlatformError::new(
            PlatformErrorKind::VmDefinition,
            "the command line to write into start-vm.sh is empty",
        ));
    };
    let mut text = String::from("#!/bin/sh\n");
    for comment in header {
        text.push_str(&comment_line(comment));
    }
    if !notes.is_empty() {
        text.push_str("#\n# Notes:\n");
        for note in notes {
            text.push_str(&comment_line(&format!("- {note}")));
        }
    }
    text.push_str("set -eu\n");
    text.push_str(&format!(
        "mkdir -p -- {}\n",
        quote(&run_dir.display().to_string())?
    ));
    text.push_str(&format!("exec {}", quote(&line.program)?));
    for item in &line.items {
        let words = match item {
            Item::Option {
                dashes,
                name,
                value,
                ..
            } => {
                let mut words = vec![quote(&format!("{dashes}{name}"))?];
                if let Some(value) = value {
                    words.push(quote(value)?);
                }
                words.join(" ")
            }
            Item::Positional { value, .. } => quote(value)?,
        };
        text.push_str(" \\\n    ");
        text.push_str(&words);
    }
    text.push('\n');
    Ok(text)
}

/// One `# …` line; line breaks inside would end the comment, so they become spaces.
fn comment_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("# {flat}\n")
}

fn quote(word: &str) -> Result<String> {
    shlex::try_quote(word)
        .map(|quoted| quoted.into_owned())
        .map_err(|error| {
            PlatformError::new(
                PlatformErrorKind::VmDefinition,
                format!("the argument {word:?} cannot be written into a shell script"),
            )
            .with_source(error)
        })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs the script with real `sh`; the program is `printf` so that the output shows each
    /// word exactly as the shell passed it.
    fn words_after_shell(argv: &[&str]) -> (String, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = dir.path().join("run dir");
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let script = start_script(
            &argv,
            &run,
            &["Starts VM `x`\nrestored".into()],
            &["a note; with $(stuff)".into()],
        )
        .expect("script");
        let path = dir.path().join("start-vm.sh");
        std::fs::write(&path, &script).expect("write");
        let output = Command::new("sh").arg(&path).output().expect("sh runs");
        assert!(
            output.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(run.is_dir(), "the script creates the run directory");
        (String::from_utf8(output.stdout).expect("utf-8"), script)
    }

    #[test]
    fn every_word_reaches_the_program_unchanged() {
        let tricky = [
            "plain",
            "two words",
            "it's",
            "$HOME and `id` and $(id)",
            "back\\slash",
            "new\nline",
            "",
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/a b/c.qcow2"}}"#,
            "glob*?[x]",
            "-dash-first",
            "~tilde",
        ];
        let mut argv = vec!["printf", "[%s]\\n"];
        argv.extend(tricky);
        let (output, script) = words_after_shell(&argv);
        let expected: String = tricky.iter().map(|w| format!("[{w}]\n")).collect();
        assert_eq!(output, expected, "script was:\n{script}");
    }

    #[test]
    fn options_and_their_arguments_share_a_line_and_comments_stay_comments() {
        let (output, script) = words_after_shell(&["printf", "%s\\n", "-m", "256", "-S"]);
        // printf repeats its format for every argument.
        assert_eq!(output, "-m\n256\n-S\n");
        assert!(script.contains("\\\n    -m 256 \\\n    -S\n"), "{script}");
        assert!(script.contains("# Starts VM `x` restored\n"), "{script}");
        assert!(script.contains("# - a note; with $(stuff)\n"), "{script}");
    }

    #[test]
    fn a_nul_byte_is_an_error_naming_the_word() {
        let argv = vec!["qemu".to_string(), "-name".into(), "a\0b".into()];
        let error = start_script(&argv, Path::new("/r"), &[], &[]).expect_err("NUL");
        assert!(error.to_string().contains("a\\0b"), "{error}");
        assert!(start_script(&[], Path::new("/r"), &[], &[]).is_err());
    }
}
