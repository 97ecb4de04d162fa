//! Hook commands: always an argv array, never a shell line (invariant 6).
//!
//! The Recipe CR writes `command` as a string: Ramen parses it as a JSON array when it looks
//! like one and splits it with shell-like quoting rules otherwise. We accept both, and a YAML
//! list as well. Splitting uses the `shlex` crate (POSIX quoting, no expansion); nothing here
//! ever starts a shell — a recipe that wants one writes `["/bin/sh", "-c", "…"]` itself.

use serde::Serialize;

/// How the command was written, kept for messages and for `recipe plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandForm {
    /// `command: [a, b]`
    YamlList,
    /// `command: '["a","b"]'`
    JsonArray,
    /// `command: "a 'b c'"`, split with shell-like quoting (no shell runs).
    Split,
}

/// A command ready to run: the program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Command {
    pub argv: Vec<String>,
    pub form: CommandForm,
}

/// Why a command string could not become an argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    Empty,
    BadJson(String),
    JsonNotStrings,
    UnbalancedQuotes,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Empty => f.write_str("the command is empty"),
            CommandError::BadJson(reason) => {
                write!(
                    f,
                    "the command looks like a JSON array but is not valid JSON ({reason})"
                )
            }
            CommandError::JsonNotStrings => {
                f.write_str("the command's JSON array must hold only strings")
            }
            CommandError::UnbalancedQuotes => {
                f.write_str("the command has an unterminated quote or a trailing backslash")
            }
        }
    }
}

impl Command {
    /// Parses the string form: a JSON array when it starts with `[`, else shell-like splitting.
    pub fn from_string(text: &str) -> Result<Command, CommandError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(CommandError::Empty);
        }
        if trimmed.starts_with('[') {
            let value: serde_json::Value = serde_json::from_str(trimmed)
                .map_err(|error| CommandError::BadJson(error.to_string()))?;
            let serde_json::Value::Array(items) = value else {
                return Err(CommandError::JsonNotStrings);
            };
            let argv = items
                .into_iter()
                .map(|item| match item {
                    serde_json::Value::String(s) => Ok(s),
                    _ => Err(CommandError::JsonNotStrings),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if argv.is_empty() || argv[0].is_empty() {
                return Err(CommandError::Empty);
            }
            return Ok(Command {
                argv,
                form: CommandForm::JsonArray,
            });
        }
        let argv = shlex::split(trimmed).ok_or(CommandError::UnbalancedQuotes)?;
        if argv.is_empty() {
            return Err(CommandError::Empty);
        }
        Ok(Command {
            argv,
            form: CommandForm::Split,
        })
    }

    /// The list form, already split by YAML.
    pub fn from_list(argv: Vec<String>) -> Result<Command, CommandError> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(CommandError::Empty);
        }
        Ok(Command {
            argv,
            form: CommandForm::YamlList,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_string_is_parsed_as_json() {
        let command = Command::from_string(r#"["/bin/bash","-c","echo \"a b\""]"#).unwrap();
        assert_eq!(command.argv, ["/bin/bash", "-c", "echo \"a b\""]);
        assert_eq!(command.form, CommandForm::JsonArray);
    }

    #[test]
    fn plain_string_is_split_like_a_shell_would_without_running_one() {
        let command =
            Command::from_string("sqlite3 /data/app.db 'PRAGMA wal_checkpoint;' $HOME").unwrap();
        assert_eq!(
            command.argv,
            ["sqlite3", "/data/app.db", "PRAGMA wal_checkpoint;", "$HOME"]
        );
        assert_eq!(command.form, CommandForm::Split);
    }

    #[test]
    fn malformed_forms_are_errors() {
        assert_eq!(Command::from_string("  "), Err(CommandError::Empty));
        assert_eq!(Command::from_string("[]"), Err(CommandError::Empty));
        assert_eq!(
            Command::from_string("[1, 2]"),
            Err(CommandError::JsonNotStrings)
        );
        assert!(matches!(
            Command::from_string("[\"a\""),
            Err(CommandError::BadJson(_))
        ));
        assert_eq!(
            Command::from_string("echo 'oops"),
            Err(CommandError::UnbalancedQuotes)
        );
        assert_eq!(Command::from_list(vec![]), Err(CommandError::Empty));
    }
}
