//! Check conditions: `{$.jsonpath} <op> {$.jsonpath|literal}`, joined with `&&`, `||` and
//! parentheses — the Recipe CR's grammar — parsed with character offsets (so `validate` can
//! point into the expression) and evaluated in pure code against a JSON document.
//!
//! Comparison follows Ramen's rules so recipes behave the same: integers and numeric strings
//! compare as numbers, the strings `true`/`false` (any case) as booleans, operands of different
//! kinds do not compare, and `<`, `<=`, `>`, `>=` apply to numbers and strings only. A path that
//! matches nothing yields `null`, which equals only another `null`; a path that matches several
//! values (through `*`, `..`, a union or a filter) compares its first, as Ramen's
//! `QueryJSONPath` does.
//!
//! The paths are kubectl's JSONPath dialect ([`crate::jsonpath`]): filters
//! `[?(@.type=="Ready")]`, wildcards, unions, slices, recursive descent; a leading `.` means
//! `$.` as in `kubectl -o jsonpath`. A `{…}` operand that is not a path is a literal:
//! `{Running}`, or quoted as kubectl writes text, `{"True"}`.

use std::fmt;

use serde::Serialize;
use serde_json::Value as Json;

pub use crate::jsonpath::JsonPath;

/// A parsed condition, with the text it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    pub source: String,
    #[serde(skip)]
    pub expr: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare {
        left: Operand,
        op: CompareOp,
        right: Operand,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Path(JsonPath),
    Literal(String),
}

/// A syntax error at a character offset into the condition text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.offset + 1)
    }
}

impl Condition {
    pub fn parse(source: &str) -> Result<Condition, ConditionError> {
        let chars: Vec<char> = source.chars().collect();
        let mut parser = Parser {
            chars: &chars,
            at: 0,
        };
        parser.skip_space();
        if parser.at == chars.len() {
            return Err(ConditionError {
                offset: 0,
                message: "the condition is empty".into(),
            });
        }
        let expr = parser.or()?;
        parser.skip_space();
        if parser.at < chars.len() {
            return Err(parser.error(format!(
                "unexpected `{}` after a complete condition (join conditions with && or ||)",
                chars[parser.at]
            )));
        }
        Ok(Condition {
            source: source.to_owned(),
            expr,
        })
    }

    /// Evaluates the condition against one document. `Err` explains why it could not be
    /// evaluated (e.g. comparing a number with a string); callers treat that as "does not hold".
    pub fn evaluate(&self, document: &Json) -> Result<bool, String> {
        evaluate(&self.expr, document)
    }
}

fn evaluate(expr: &Expr, document: &Json) -> Result<bool, String> {
    match expr {
        // Short-circuit like the Go `&&`/`||` users expect.
        Expr::And(left, right) => Ok(evaluate(left, document)? && evaluate(right, document)?),
        Expr::Or(left, right) => Ok(evaluate(left, document)? || evaluate(right, document)?),
        Expr::Compare { left, op, right } => {
            let a = resolve(left, document);
            let b = resolve(right, document);
            compare(&a, *op, &b).map_err(|reason| {
                format!(
                    "{} {} {}: {reason}",
                    describe(left),
                    op.symbol(),
                    describe(right)
                )
            })
        }
    }
}

fn describe(operand: &Operand) -> String {
    match operand {
        Operand::Path(path) => format!("{{{}}}", path.text),
        Operand::Literal(text) => format!("{{{text}}}"),
    }
}

fn resolve(operand: &Operand, document: &Json) -> Comparable {
    match operand {
        Operand::Literal(text) => normalize(Json::String(text.clone())),
        // Ramen (QueryJSONPath) compares the first value a path selects.
        Operand::Path(path) => path
            .select(document)
            .first()
            .map_or(Comparable::Null, |first| normalize((*first).clone())),
    }
}

/// Comparable value after Ramen's conversions.
#[derive(Debug, PartialEq)]
enum Comparable {
    Null,
    Number(f64),
    Text(String),
    Bool(bool),
    Other(&'static str),
}

fn normalize(value: Json) -> Comparable {
    match value {
        Json::Null => Comparable::Null,
        Json::Bool(b) => Comparable::Bool(b),
        Json::Number(n) => n.as_f64().map_or(
            Comparable::Other("a number out of range"),
            Comparable::Number,
        ),
        Json::String(s) => {
            let trimmed = s.trim();
            if let Ok(number) = trimmed.parse::<f64>()
                && number.is_finite()
            {
                return Comparable::Number(number);
            }
            match trimmed.to_ascii_lowercase().as_str() {
                "true" => Comparable::Bool(true),
                "false" => Comparable::Bool(false),
                _ => Comparable::Text(s),
            }
        }
        Json::Array(_) => Comparable::Other("a list"),
        Json::Object(_) => Comparable::Other("an object"),
    }
}

fn kind(value: &Comparable) -> &'static str {
    match value {
        Comparable::Null => "nothing (the path matched no value)",
        Comparable::Number(_) => "a number",
        Comparable::Text(_) => "a string",
        Comparable::Bool(_) => "a boolean",
        Comparable::Other(kind) => kind,
    }
}

fn compare(a: &Comparable, op: CompareOp, b: &Comparable) -> Result<bool, String> {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (a, b) {
        (Comparable::Null, Comparable::Null) => Some(Ordering::Equal),
        (Comparable::Null, _) | (_, Comparable::Null) => {
            return match op {
                CompareOp::Eq => Ok(false),
                CompareOp::Ne => Ok(true),
                _ => Err(format!("cannot order {} and {}", kind(a), kind(b))),
            };
        }
        (Comparable::Number(x), Comparable::Number(y)) => x.partial_cmp(y),
        (Comparable::Text(x), Comparable::Text(y)) => Some(x.cmp(y)),
        (Comparable::Bool(x), Comparable::Bool(y)) => {
            return match op {
                CompareOp::Eq => Ok(x == y),
                CompareOp::Ne => Ok(x != y),
                _ => Err("booleans can only be compared with == or !=".into()),
            };
        }
        _ => return Err(format!("cannot compare {} with {}", kind(a), kind(b))),
    };
    let Some(ordering) = ordering else {
        return Err("the numbers do not compare".into());
    };
    Ok(match op {
        CompareOp::Eq => ordering == Ordering::Equal,
        CompareOp::Ne => ordering != Ordering::Equal,
        CompareOp::Lt => ordering == Ordering::Less,
        CompareOp::Le => ordering != Ordering::Greater,
        CompareOp::Gt => ordering == Ordering::Greater,
        CompareOp::Ge => ordering != Ordering::Less,
    })
}

struct Parser<'a> {
    chars: &'a [char],
    at: usize,
}

impl Parser<'_> {
    fn error(&self, message: String) -> ConditionError {
        ConditionError {
            offset: self.at,
            message,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        let token: Vec<char> = token.chars().collect();
        if self.chars[self.at..].starts_with(&token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.and()?;
        loop {
            self.skip_space();
            if self.eat("||") {
                let right = self.and()?;
                left = Expr::Or(Box::new(left), Box::new(right));
            } else {
                return Ok(left);
            }
        }
    }

    fn and(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.primary()?;
        loop {
            self.skip_space();
            if self.eat("&&") {
                let right = self.primary()?;
                left = Expr::And(Box::new(left), Box::new(right));
            } else {
                return Ok(left);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, ConditionError> {
        self.skip_space();
        if self.peek() == Some('(') {
            let open = self.at;
            self.at += 1;
            let inner = self.or()?;
            self.skip_space();
            if !self.eat(")") {
                return Err(ConditionError {
                    offset: open,
                    message: "this `(` is never closed".into(),
                });
            }
            return Ok(inner);
        }
        let left = self.operand()?;
        self.skip_space();
        let op_at = self.at;
        let op = if self.eat("==") {
            CompareOp::Eq
        } else if self.eat("!=") {
            CompareOp::Ne
        } else if self.eat("<=") {
            CompareOp::Le
        } else if self.eat(">=") {
            CompareOp::Ge
        } else if self.eat("<") {
            CompareOp::Lt
        } else if self.eat(">") {
            CompareOp::Gt
        } else {
            return Err(ConditionError {
                offset: op_at,
                message: match self.peek() {
                    Some('=') => "expected a comparison operator; use == for equality".into(),
                    Some(c) => format!(
                        "expected a comparison operator (==, !=, <, <=, >, >=), found `{c}`"
                    ),
                    None => "expected a comparison operator (==, !=, <, <=, >, >=) and a right-hand side".into(),
                },
            });
        };
        let right = self.operand()?;
        Ok(Expr::Compare { left, op, right })
    }

    fn operand(&mut self) -> Result<Operand, ConditionError> {
        self.skip_space();
        let start = self.at;
        match self.peek() {
            Some('{') => {
                self.at += 1;
                let inner_start = self.at;
                // Quotes (in a filter, or quoted text) may hold a `}`; a lone quote in a literal
                // (`{don't}`) does not, so without a closing `}` outside quotes the first `}` ends it.
                let mut quote: Option<char> = None;
                let mut first_close = None;
                while let Some(c) = self.peek() {
                    if c == '}' && first_close.is_none() {
                        first_close = Some(self.at);
                    }
                    match quote {
                        Some(q) if c == q => quote = None,
                        Some(_) if c == '\\' => self.at += 1,
                        Some(_) => {}
                        None if c == '"' || c == '\'' => quote = Some(c),
                        None if c == '}' => break,
                        None => {}
                    }
                    self.at += 1;
                }
                if self.peek() != Some('}') {
                    match first_close {
                        Some(close) => self.at = close,
                        None => return Err(ConditionError { offset: start, message: "this `{` is never closed".into() }),
                    }
                }
                let raw = &self.chars[inner_start..self.at];
                self.at += 1;
                let leading = raw.iter().take_while(|c| c.is_whitespace()).count();
                let trailing = raw.iter().rev().take_while(|c| c.is_whitespace()).count();
                let inner = &raw[leading..raw.len().saturating_sub(trailing).max(leading)];
                let text: String = inner.iter().collect();
                if text.is_empty() {
                    return Err(ConditionError { offset: start, message: "empty `{}` operand".into() });
                }
                let inner_at = inner_start + leading;
                match inner.first() {
                    Some('$' | '.' | '@' | '[') => {}
                    Some(quote @ ('"' | '\'')) => return quoted_text(inner, *quote, inner_at),
                    _ if text == "end" || text.starts_with("range ") => {}
                    _ => return Ok(Operand::Literal(text)),
                }
                JsonPath::parse(&text)
                    .map(Operand::Path)
                    .map_err(|error| ConditionError {
                        offset: inner_at + error.offset,
                        message: error.message,
                    })
            }
            Some(quote @ ('"' | '\'')) => {
                self.at += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None => {
                            return Err(ConditionError {
                                offset: start,
                                message: "this quoted string is never closed".into(),
                            });
                        }
                        Some(c) if c == quote => {
                            self.at += 1;
                            return Ok(Operand::Literal(text));
                        }
                        Some(c) => {
                            text.push(c);
                            self.at += 1;
                        }
                    }
                }
            }
            Some(c) if c.is_alphanumeric() || c == '-' || c == '+' || c == '_' => {
                while self.peek().is_some_and(|c| c.is_alphanumeric() || "-+_.:/".contains(c)) {
                    self.at += 1;
                }
                Ok(Operand::Literal(self.chars[start..self.at].iter().collect()))
            }
            Some(c) => Err(self.error(format!(
                "expected an operand such as {{$.path}}, {{literal}}, a number or a quoted string, found `{c}`"
            ))),
            None => Err(self.error("expected an operand, found the end of the condition".into())),
        }
    }
}

/// Text quoted as kubectl writes it inside `{…}`: `{"True"}`, `{'a b'}`, with `\` escapes.
fn quoted_text(inner: &[char], quote: char, at: usize) -> Result<Operand, ConditionError> {
    let mut text = String::new();
    let mut i = 1;
    while i < inner.len() {
        match inner[i] {
            '\\' if i + 1 < inner.len() => {
                text.push(match inner[i + 1] {
                    'n' => '\n',
                    't' => '\t',
                    c => c,
                });
                i += 1;
            }
            c if c == quote => {
                if i + 1 != inner.len() {
                    return Err(ConditionError {
                        offset: at + i + 1,
                        message: "unexpected text after the quoted string in `{…}`".into(),
                    });
                }
                return Ok(Operand::Literal(text));
            }
            c => text.push(c),
        }
        i += 1;
    }
    Err(ConditionError {
        offset: at,
        message: "this quoted string is never closed".into(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn holds(condition: &str, doc: &Json) -> Result<bool, String> {
        Condition::parse(condition).unwrap().evaluate(doc)
    }

    #[test]
    fn ramen_examples_parse_and_evaluate() {
        let sts =
            json!({"spec": {"replicas": 3}, "status": {"readyReplicas": 3, "phase": "Running"}});
        assert_eq!(
            holds("{$.spec.replicas} == {$.status.readyReplicas}", &sts),
            Ok(true)
        );
        assert_eq!(holds("{$.status.phase} == {Running}", &sts), Ok(true));
        assert_eq!(holds("{.status.phase} != {Pending}", &sts), Ok(true));
    }

    #[test]
    fn and_or_and_parentheses_combine_with_usual_precedence() {
        let doc = json!({"exitCode": 1, "stdout": "busy", "json": null});
        assert_eq!(
            holds(
                "{$.exitCode} == 0 || {$.stdout} == {busy} && {$.exitCode} == 1",
                &doc
            ),
            Ok(true)
        );
        assert_eq!(
            holds(
                "({$.exitCode} == 0 || {$.stdout} == {busy}) && {$.exitCode} == 2",
                &doc
            ),
            Ok(false)
        );
    }

    #[test]
    fn numeric_strings_compare_as_numbers_and_true_false_as_booleans() {
        let doc = json!({"a": "10", "b": 9, "c": "True", "d": [1, 2, 3], "e": {"k-1": "x"}});
        assert_eq!(holds("{$.a} > {$.b}", &doc), Ok(true));
        assert_eq!(holds("{$.c} == true", &doc), Ok(true));
        assert_eq!(holds("{$.d[-1]} == 3", &doc), Ok(true));
        assert_eq!(holds("{$.d[0]} <= 1", &doc), Ok(true));
        assert_eq!(holds("{$.e['k-1']} == \"x\"", &doc), Ok(true));
    }

    #[test]
    fn missing_paths_equal_nothing_but_null_and_do_not_order() {
        let doc = json!({});
        assert_eq!(holds("{$.nope} == {$.also}", &doc), Ok(true));
        assert_eq!(holds("{$.nope} == 1", &doc), Ok(false));
        assert_eq!(holds("{$.nope} != 1", &doc), Ok(true));
        assert_eq!(holds("{$.nope} != {don't}", &doc), Ok(true));
        assert!(holds("{$.nope} < 1", &doc).is_err());
    }

    #[test]
    fn mismatched_kinds_are_evaluation_errors_that_name_the_operands() {
        let doc = json!({"n": 1, "s": "x", "b": true});
        let error = holds("{$.n} == {$.s}", &doc).unwrap_err();
        assert!(
            error.contains("{$.n} == {$.s}") && error.contains("a number with a string"),
            "{error}"
        );
        assert!(holds("{$.b} < true", &doc).is_err());
    }

    #[test]
    fn kubernetes_conditions_with_filters_hold_as_in_ramen() {
        let pod = json!({"status": {"conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"},
            {"type": "Progressing", "status": "False", "reason": "a}b"}
        ], "replicas": 2, "readyReplicas": "2"}});
        let table = [
            (
                r#"{$.status.conditions[?(@.type=="Ready")].status} == {"True"}"#,
                true,
            ),
            (
                r#"{.status.conditions[?(@.type=='Ready')].status} == {True}"#,
                true,
            ),
            (
                r#"{$.status.conditions[?(@.type=="Ready")].status} == true"#,
                true,
            ),
            (
                r#"{$.status.conditions[?(@.reason=="a}b")].status} == {'False'}"#,
                true,
            ),
            (
                r#"{$.status.conditions[?(@.type=="Missing")].status} == {"True"}"#,
                false,
            ),
            (r#"{$.status.conditions[-1].type} == {Progressing}"#, true),
            (r#"{$..readyReplicas} == {$.status.replicas}"#, true),
            (
                r#"{$.status.conditions[?(@.type=="Ready")].status} == {"True"} && {$.status.replicas} >= 2"#,
                true,
            ),
        ];
        for (condition, expected) in table {
            assert_eq!(holds(condition, &pod), Ok(expected), "{condition}");
        }
    }

    #[test]
    fn filters_reach_into_a_commands_json_output() {
        // The document the executor builds for a check on a VM: `json` is stdout parsed.
        let result = json!({"exitCode": 0, "stdout": "…", "stderr": "", "json": {"volumes": [
            {"name": "data", "state": "mounted", "free": 512},
            {"name": "logs", "state": "ro", "free": 3}
        ]}});
        assert_eq!(
            holds(
                r#"{$.exitCode} == 0 && {$.json.volumes[?(@.name=="data")].state} == {mounted}"#,
                &result
            ),
            Ok(true)
        );
        assert_eq!(
            holds(
                r#"{$.json.volumes[?(@.free < 10)].name} == {"logs"}"#,
                &result
            ),
            Ok(true)
        );
    }

    #[test]
    fn a_recipe_with_kubernetes_filter_conditions_validates_and_plans() {
        let source = r#"apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata:
  name: filters
spec:
  groups:
  - name: disks
    type: volume
  hooks:
  - name: app
    type: check
    chks:
    - name: ready
      command: [/bin/sh, -c, "cat /run/app/status.json"]
      condition: '{$.json.status.conditions[?(@.type=="Ready")].status} == {"True"}'
    - name: replicas
      command: [/bin/sh, -c, "cat /run/app/status.json"]
      condition: "{$.json.spec.replicas} == {$.json..readyReplicas} && {$.json.items[-1:].phase} != {'Failed'}"
  workflows:
  - name: backup
    sequence: [{hook: app/ready}, {hook: app/replicas}, {group: disks}]
"#;
        let (recipe, diagnostics) = crate::check_source(source, &crate::ValidateOptions::default());
        assert!(diagnostics.is_empty(), "{diagnostics:#?}");
        let recipe = recipe.unwrap();
        crate::plan_workflow(&recipe, "backup", &crate::PlanOptions::default()).unwrap();
    }

    #[test]
    fn a_path_matching_several_values_compares_its_first_as_ramen_does() {
        let doc = json!({"items": [{"ready": false, "n": 1}, {"ready": true, "n": 2}]});
        assert_eq!(holds("{$.items[*].ready} == false", &doc), Ok(true));
        assert_eq!(holds("{$.items[*].n} == 1", &doc), Ok(true));
        assert_eq!(holds("{$.items[?(@.n > 1)].ready} == true", &doc), Ok(true));
    }

    #[test]
    fn syntax_errors_point_at_the_offending_character() {
        let cases = [
            ("", 0, "empty"),
            ("{$.a} = 1", 6, "use =="),
            ("{$.a} == ", 9, "end of the condition"),
            ("{$.a == 1", 0, "never closed"),
            ("({$.a} == 1", 0, "never closed"),
            ("{$.a} == 1 {$.b}", 11, "after a complete condition"),
            ("{$.a.} == 1", 4, "field name"),
            ("{$.a[x]} == 1", 5, "not supported"),
            ("{$.c[?(@.type = \"Ready\")].status} == 1", 14, "use =="),
            ("{.c[?(@.t==\"a}\")]} == {\"b} == 1", 23, "never closed"),
            ("{range .items[*]} == 1", 1, "range/end"),
            ("{\"True\" x} == 1", 7, "after the quoted string"),
            ("{$.a} == 1 && ", 14, "end of the condition"),
            ("{ $x} == 1", 3, "expected `.name`"),
        ];
        for (text, offset, needle) in cases {
            let error = Condition::parse(text).unwrap_err();
            assert_eq!(error.offset, offset, "{text:?}: {error}");
            assert!(
                error.message.contains(needle),
                "{text:?}: {}",
                error.message
            );
        }
    }
}
