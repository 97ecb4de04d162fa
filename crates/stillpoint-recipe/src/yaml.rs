//! A YAML document as a tree of positioned nodes.
//!
//! `serde-saphyr` parses (pure Rust, budgeted against alias bombs and deep nesting) and its
//! `Spanned<T>` wrapper gives the line and column of every node, keys included. Deserializing
//! into this generic tree (instead of straight into typed structs) is what lets `validate`
//! report *every* problem with its position — unknown fields, wrong types, duplicate keys —
//! rather than stopping at serde's first error.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Pos};

/// One YAML node and where it starts in the source.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
    /// Characters between `pos` and the first character of a scalar's content: 1 for a quoted
    /// scalar (`"` or `'`), else 0. Used to point inside a condition expression.
    pub content_offset: usize,
    /// True when the scalar's content is on the same line as `pos` and has no escapes that
    /// would make character offsets in the value differ from columns in the file.
    pub single_line: bool,
}

/// The value of a node. Mappings keep their order and their duplicates (reported by the
/// parser, with both positions).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// A short name of the node's type for messages ("a mapping", "a string" …).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The text of a scalar as written (numbers and booleans rendered), for names and messages.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::String(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(x) => Some(x.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }

    /// The position of the character `offset` characters into a scalar's content, when it
    /// can be computed exactly; else the node's own position.
    pub fn pos_in_content(&self, offset: usize) -> Pos {
        if self.single_line {
            self.pos.shifted(self.content_offset + offset)
        } else {
            self.pos
        }
    }
}

/// Parses one YAML document into a positioned tree. A syntax error becomes one diagnostic with
/// the parser's position.
pub fn parse_document(source: &str) -> Result<Node, Diagnostic> {
    let mut node: Node = match serde_saphyr::from_str_with_options(source, parse_options()) {
        Ok(node) => node,
        Err(error) => return Err(syntax_error(&error)),
    };
    annotate_scalars(&mut node, source);
    Ok(node)
}

/// Parses every document of a multi-document stream (`---` between them), positions counted
/// from the start of the file. Empty documents are left out. A file of one document gives one
/// node, exactly as [`parse_document`] does; an empty file gives one `Null` node.
pub fn parse_documents(source: &str) -> Result<Vec<Node>, Diagnostic> {
    let single = match parse_document(source) {
        Ok(node) => return Ok(vec![node]),
        Err(diagnostic) => diagnostic,
    };
    match serde_saphyr::from_str_multiple_with_options::<Node, Vec<Node>>(source, parse_options()) {
        Ok(mut nodes) if nodes.len() > 1 => {
            for node in &mut nodes {
                annotate_scalars(node, source);
            }
            Ok(nodes)
        }
        // One document that did not parse: the single-document parser's message.
        Ok(_) => Err(single),
        Err(error) => Err(syntax_error(&error)),
    }
}

fn syntax_error(error: &serde_saphyr::Error) -> Diagnostic {
    let pos = error
        .location()
        .map(|loc| Pos::new(to_u32(loc.line()), to_u32(loc.column())))
        .unwrap_or(Pos::new(1, 1));
    Diagnostic::error(pos, yaml_message(&error.to_string()))
}

fn parse_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        // Messages carry their own position; a rendered source snippet would be noise.
        with_snippet: false,
        // Keep duplicates so the parser can report both places.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        // `y`, `n`, `on`, `off` stay strings, as in YAML 1.2 and Kubernetes.
        strict_booleans: true,
    }
}

fn to_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// serde-saphyr appends " at line L, column C" to its messages; the diagnostic carries the
/// position itself, so the suffix is dropped.
fn yaml_message(raw: &str) -> String {
    let first_line = raw.lines().next().unwrap_or(raw);
    let trimmed = match first_line.rfind(" at line ") {
        Some(index) if first_line[index..].contains(", column ") => &first_line[..index],
        _ => first_line,
    };
    format!("YAML syntax: {trimmed}")
}

/// Works out, from the source text, whether each string scalar is quoted and single-line, so
/// positions inside a condition expression can be mapped to file columns.
fn annotate_scalars(node: &mut Node, source: &str) {
    // Line start offsets (in chars) are not needed: we walk the source lines directly.
    let lines: Vec<&str> = source.lines().collect();
    annotate(node, &lines);
}

fn annotate(node: &mut Node, lines: &[&str]) {
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|item| annotate(item, lines)),
        Value::Map(entries) => entries.iter_mut().for_each(|(key, value)| {
            annotate(key, lines);
            annotate(value, lines);
        }),
        Value::String(text) => {
            let Some(line) = lines.get(node.pos.line.saturating_sub(1) as usize) else {
                return;
            };
            let rest: String = line
                .chars()
                .skip(node.pos.column.saturating_sub(1) as usize)
                .collect();
            let (offset, body) = match rest.chars().next() {
                Some(quote @ ('"' | '\'')) => (1, rest[quote.len_utf8()..].to_string()),
                _ => (0, rest),
            };
            node.content_offset = offset;
            // Exact only when the value appears verbatim on this line (no escapes, no folding).
            node.single_line = !text.contains('\n') && body.starts_with(text.as_str());
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => {
            node.single_line = true;
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Node {
            pos: Pos::new(
                to_u32(spanned.referenced.line()),
                to_u32(spanned.referenced.column()),
            ),
            value: spanned.value,
            content_offset: 0,
            single_line: false,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Int(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(match i64::try_from(value) {
            Ok(value) => Value::Int(value),
            // Beyond i64: kept as a float so it is still reported as "too large" later.
            Err(_) => Value::Float(value as f64),
        })
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<Value, E> {
        Ok(match i64::try_from(value) {
            Ok(value) => Value::Int(value),
            Err(_) => Value::Float(value as f64),
        })
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<Value, E> {
        Ok(match i64::try_from(value) {
            Ok(value) => Value::Int(value),
            Err(_) => Value::Float(value as f64),
        })
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(Value::Float(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_bytes<E: de::Error>(self, value: &[u8]) -> Result<Value, E> {
        Ok(Value::String(String::from_utf8_lossy(value).into_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<Node, Node>()? {
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_line_and_column_of_keys_and_values() {
        let doc = parse_document("a: 1\nb:\n  - \"x y\"\n  - {c: true}\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!("not a map: {doc:?}")
        };
        assert_eq!(entries[0].0.pos, Pos::new(1, 1));
        assert_eq!(entries[0].1.pos, Pos::new(1, 4));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Pos::new(3, 5));
        assert_eq!(
            items[0].content_offset, 1,
            "quoted scalar content starts after the quote"
        );
        assert!(items[0].single_line);
        assert_eq!(items[0].pos_in_content(2), Pos::new(3, 8));
        let Value::Map(inner) = &items[1].value else {
            panic!()
        };
        assert_eq!(inner[0].0.pos, Pos::new(4, 6));
        assert_eq!(inner[0].1.value, Value::Bool(true));
    }

    #[test]
    fn multi_document_positions_count_from_the_start_of_the_file() {
        let docs = parse_documents("a: 1\n---\nb: 2\n---\n\n  c: 3\n").unwrap();
        assert_eq!(docs.len(), 3);
        let Value::Map(entries) = &docs[2].value else {
            panic!("not a map: {:?}", docs[2])
        };
        assert_eq!(entries[0].0.pos, Pos::new(6, 3));
        assert_eq!(parse_documents("a: 1\n").unwrap().len(), 1);
        assert!(parse_documents("a: [\n---\nb: 2\n").is_err());
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_parser_to_report() {
        let doc = parse_document("a: 1\na: 2\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].0.pos, Pos::new(2, 1));
    }

    #[test]
    fn yaml_11_booleans_stay_strings() {
        let doc = parse_document("y: n\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries[0].0.value, Value::String("y".into()));
        assert_eq!(entries[0].1.value, Value::String("n".into()));
    }

    #[test]
    fn syntax_errors_have_a_position_and_no_repeated_suffix() {
        let error = parse_document("a: 1\n\tb: [\n").unwrap_err();
        assert!(error.pos.line >= 1, "{error:?}");
        assert!(
            error.message.starts_with("YAML syntax: "),
            "{}",
            error.message
        );
        assert!(!error.message.contains(" at line "), "{}", error.message);
    }

    #[test]
    fn block_scalars_are_not_mapped_character_by_character() {
        let doc = parse_document("a: |\n  x == y\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert!(!entries[0].1.single_line);
        assert_eq!(entries[0].1.pos_in_content(3), entries[0].1.pos);
    }
}
