//! Template parameters: recipes are shared as templates with `${NAME}` placeholders in names,
//! namespaces and selectors, which users fill with `sed` or `envsubst` before applying them.
//!
//! stillpoint fills them itself, in the positioned YAML tree (so every position stays that of
//! the file as written): from `--set NAME=VALUE` and `--values FILE` (one `NAME=VALUE` a line,
//! the form `envsubst` users keep in `.env` files). A placeholder left unfilled is a warning
//! for `validate` and stops a run before anything happens ([`crate::plan::plan_workflow`]
//! refuses the recipe, naming it).
//!
//! Commands, `env`, `stdin` and conditions are **not** filled: there `${NAME}` belongs to the
//! shell (or the guest's environment) at run time, and replacing it would change what runs.

use std::collections::BTreeMap;

use crate::diagnostic::{Diagnostic, Pos};
use crate::model::At;
use crate::yaml::{Node, Value};

/// Fields whose values are run-time text, where `${NAME}` is the shell's, never a parameter.
const RUN_TIME_FIELDS: &[&str] = &["command", "env", "stdin", "condition"];

/// Values for template parameters, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parameters {
    values: BTreeMap<String, String>,
}

impl Parameters {
    pub fn new() -> Self {
        Parameters::default()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Every value, by name in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets one value; a later value for the same name replaces the earlier one (so `--set`
    /// given after `--values` wins).
    pub fn insert(&mut self, name: &str, value: &str) -> Result<(), String> {
        if !is_name(name) {
            return Err(format!(
                "`{name}` is not a parameter name: use letters, digits and `_`, not starting with a digit"
            ));
        }
        self.values.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// Parses `NAME=VALUE` (the form of `--set`).
    pub fn insert_assignment(&mut self, text: &str) -> Result<(), String> {
        let Some((name, value)) = text.split_once('=') else {
            return Err(format!("`{text}` is not NAME=VALUE"));
        };
        self.insert(name.trim(), value)
    }

    /// Reads a values file: one `NAME=VALUE` a line; blank lines and lines starting with `#`
    /// are skipped; a value may be wrapped in one pair of matching quotes, which are removed.
    /// Errors name the line.
    pub fn insert_file_text(&mut self, text: &str) -> Result<(), (usize, String)> {
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((name, value)) = line.split_once('=') else {
                return Err((index + 1, format!("`{line}` is not NAME=VALUE")));
            };
            let value = value.trim();
            let value = ['"', '\'']
                .iter()
                .find_map(|q| {
                    value
                        .strip_prefix(*q)
                        .and_then(|v| v.strip_suffix(*q))
                        .filter(|_| value.len() >= 2)
                })
                .unwrap_or(value);
            self.insert(name.trim(), value)
                .map_err(|message| (index + 1, message))?;
        }
        Ok(())
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A `${NAME}` in a text: its offset in characters and the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placeholder {
    pub offset: usize,
    /// Length of `${NAME}` in bytes.
    pub len: usize,
    pub byte_offset: usize,
    pub name: String,
}

/// Every `${NAME}` in `text`, in order.
pub fn placeholders(text: &str) -> Vec<Placeholder> {
    let mut found = Vec::new();
    let mut search = 0;
    while let Some(start) = text[search..].find("${").map(|i| i + search) {
        let rest = &text[start + 2..];
        match rest.find('}') {
            Some(end) if is_name(&rest[..end]) => {
                found.push(Placeholder {
                    offset: text[..start].chars().count(),
                    len: end + 3,
                    byte_offset: start,
                    name: rest[..end].to_owned(),
                });
                search = start + end + 3;
            }
            _ => search = start + 2,
        }
    }
    found
}

/// Whether `text` still holds a `${NAME}` (an unfilled parameter).
pub fn has_placeholder(text: &str) -> bool {
    !placeholders(text).is_empty()
}

/// Fills every placeholder of the tree that `parameters` has a value for (keys included,
/// run-time fields left alone) and returns, with their positions, those left unfilled.
pub fn fill(node: &mut Node, parameters: &Parameters) -> Vec<At<String>> {
    let mut unresolved = Vec::new();
    fill_node(node, parameters, &mut unresolved);
    unresolved
}

fn fill_node(node: &mut Node, parameters: &Parameters, unresolved: &mut Vec<At<String>>) {
    match &mut node.value {
        Value::Seq(items) => items
            .iter_mut()
            .for_each(|item| fill_node(item, parameters, unresolved)),
        Value::Map(entries) => {
            for (key, value) in entries {
                let run_time = key.as_str().is_some_and(|k| RUN_TIME_FIELDS.contains(&k));
                fill_node(key, parameters, unresolved);
                if !run_time {
                    fill_node(value, parameters, unresolved);
                }
            }
        }
        Value::String(text) => {
            let found = placeholders(text);
            if found.is_empty() {
                return;
            }
            let whole = found.len() == 1 && found[0].len == text.len();
            let mut filled = String::with_capacity(text.len());
            let mut last = 0;
            let mut changed = false;
            for placeholder in &found {
                filled.push_str(&text[last..placeholder.byte_offset]);
                let end = placeholder.byte_offset + placeholder.len;
                match parameters.get(&placeholder.name) {
                    Some(value) => {
                        filled.push_str(value);
                        changed = true;
                    }
                    None => {
                        filled.push_str(&text[placeholder.byte_offset..end]);
                        unresolved.push(At::new(
                            placeholder.name.clone(),
                            node_pos_of(
                                node.pos,
                                node.single_line,
                                node.content_offset,
                                placeholder.offset,
                            ),
                        ));
                    }
                }
                last = end;
            }
            filled.push_str(&text[last..]);
            if !changed {
                return;
            }
            // Offsets inside the value no longer match columns in the file.
            node.single_line = false;
            // An unquoted `timeout: ${T}` becomes the number it would be after envsubst.
            let plain = node.content_offset == 0;
            node.value = match (whole && plain, filled.parse::<i64>(), filled.as_str()) {
                (true, Ok(number), _) => Value::Int(number),
                (true, _, "true") => Value::Bool(true),
                (true, _, "false") => Value::Bool(false),
                _ => Value::String(filled),
            };
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => {}
    }
}

fn node_pos_of(pos: Pos, single_line: bool, content_offset: usize, offset: usize) -> Pos {
    if single_line {
        pos.shifted(content_offset + offset)
    } else {
        pos
    }
}

/// Why a recipe with unfilled parameters cannot run, naming each once (`None` when all are
/// filled): what a run and a plan refuse with.
pub fn unset_message(unset: &[At<String>]) -> Option<String> {
    let first = unset.first()?;
    let mut names: Vec<&str> = unset.iter().map(|p| p.value.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let names: Vec<String> = names.iter().map(|n| format!("${{{n}}}")).collect();
    Some(format!(
        "template parameter(s) not set: {} (first at {}); fill them with `--set NAME=VALUE` or `--values FILE`. Nothing was run",
        names.join(", "),
        first.pos
    ))
}

/// The warning for one unfilled parameter.
pub fn unresolved_warning(parameter: &At<String>) -> Diagnostic {
    Diagnostic::warning(
        parameter.pos,
        format!(
            "template parameter `${{{name}}}` is not set: a run stops until it is filled (`--set {name}=VALUE` or `--values FILE`)",
            name = parameter.value
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse_document;

    #[test]
    fn placeholders_are_found_with_their_offsets() {
        let found = placeholders("é-${APP}-x-${NS}${bad-}$");
        let names: Vec<_> = found.iter().map(|p| (p.offset, p.name.as_str())).collect();
        assert_eq!(names, [(2, "APP"), (11, "NS")]);
        assert!(!has_placeholder("$HOME ${} ${1X}"));
    }

    #[test]
    fn filling_keeps_run_time_text_and_reports_what_is_left() {
        let mut root = parse_document(
            "name: ${APP}-db\nns: \"${NS}\"\ntimeout: ${T}\ncommand: echo ${APP}\nkeep: '${T}'\n",
        )
        .unwrap();
        let mut parameters = Parameters::new();
        parameters.insert_assignment("APP=shop").unwrap();
        parameters.insert_assignment("T=45").unwrap();
        let unresolved = fill(&mut root, &parameters);
        assert_eq!(unresolved, [At::new("NS".to_owned(), Pos::new(2, 6))]);
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert_eq!(entries[0].1.value, Value::String("shop-db".into()));
        assert_eq!(entries[2].1.value, Value::Int(45));
        assert_eq!(entries[3].1.value, Value::String("echo ${APP}".into()));
        assert_eq!(entries[4].1.value, Value::String("45".into()));
    }

    #[test]
    fn values_files_are_name_equals_value_lines() {
        let mut parameters = Parameters::new();
        parameters
            .insert_file_text("# app\nAPP=shop\n\nexport NS=\"prod\"\n")
            .unwrap();
        assert_eq!(parameters.get("NS"), Some("prod"));
        assert_eq!(
            parameters.insert_file_text("APP=x\nnot an assignment\n"),
            Err((2, "`not an assignment` is not NAME=VALUE".into()))
        );
        assert!(parameters.insert_assignment("1X=y").is_err());
    }
}
