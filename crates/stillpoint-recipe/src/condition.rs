//! Check conditions: `{$.jsonpath} <op> {$.jsonpath|literal}`, joined with `&&`, `||` and
//! parentheses — the Recipe CR's grammar — parsed with character offsets (so `validate` can
//! point into the expression) and evaluated in pure code against a JSON document.
//!
//! Comparison follows Ramen's rules so recipes behave the same: integers and numeric strings
//! compare as numbers, the strings `true`/`false` (any case) as booleans, operands of different
//! kinds do not compare, and `<`, `<=`, `>`, `>=` apply to numbers and strings only. A path that
//! matches nothing yields `null`, which equals only another `null`.
//!
//! The JSONPath subset is what conditions use in practice: `$`, `.name`, `['name']`, `[index]`
//! (negative counts from the end); a leading `.` means `$.` as in `kubectl -o jsonpath`.
//! A hand-written parser because the JSONPath crates parse far more than this grammar needs and
//! cannot report positions inside our `{…}` operands.

use std::fmt;

use serde::Serialize;
use serde_json::Value as Json;

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

/// A JSONPath in the supported subset, with its text for messages.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath {
    pub text: String,
    pub segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Field(String),
    Index(i64),
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
            let a = normalize(resolve(left, document));
            let b = normalize(resolve(right, document));
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

fn resolve(operand: &Operand, document: &Json) -> Json {
    match operand {
        Operand::Literal(text) => Json::String(text.clone()),
        Operand::Path(path) => {
            let mut current = document;
            for segment in &path.segments {
                let next = match (segment, current) {
                    (Segment::Field(name), Json::Object(map)) => map.get(name),
                    (Segment::Index(index), Json::Array(items)) => {
                        let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
                        let at = if *index < 0 { len + index } else { *index };
                        usize::try_from(at).ok().and_then(|at| items.get(at))
                    }
                    _ => None,
                };
                match next {
                    Some(value) => current = value,
                    None => return Json::Null,
                }
            }
            current.clone()
        }
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
                while self.peek().is_some_and(|c| c != '}') {
                    self.at += 1;
                }
                if self.peek() != Some('}') {
                    return Err(ConditionError { offset: start, message: "this `{` is never closed".into() });
                }
                let raw: String = self.chars[inner_start..self.at].iter().collect();
                self.at += 1;
                let leading = raw.len() - raw.trim_start().len();
                let text = raw.trim();
                if text.is_empty() {
                    return Err(ConditionError { offset: start, message: "empty `{}` operand".into() });
                }
                if text.starts_with('$') || text.starts_with('.') {
                    parse_path(text)
                        .map(Operand::Path)
                        .map_err(|(offset, message)| ConditionError {
                            offset: inner_start + leading + offset,
                            message,
                        })
                } else {
                    Ok(Operand::Literal(text.to_owned()))
                }
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

/// Parses the supported JSONPath subset. Errors carry a char offset into `text`.
fn parse_path(text: &str) -> Result<JsonPath, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut at = 0;
    if chars.first() == Some(&'$') {
        at = 1;
    }
    let mut segments = Vec::new();
    while at < chars.len() {
        match chars[at] {
            '.' => {
                let start = at + 1;
                let mut end = start;
                while end < chars.len()
                    && (chars[end].is_alphanumeric() || "_-".contains(chars[end]))
                {
                    end += 1;
                }
                if end == start {
                    return Err((at, "expected a field name after `.`".into()));
                }
                segments.push(Segment::Field(chars[start..end].iter().collect()));
                at = end;
            }
            '[' => {
                let close = chars[at..].iter().position(|&c| c == ']').map(|p| p + at);
                let Some(close) = close else {
                    return Err((at, "this `[` is never closed".into()));
                };
                let inner: String = chars[at + 1..close].iter().collect();
                let inner = inner.trim();
                if let Some(name) = inner
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                {
                    segments.push(Segment::Field(name.to_owned()));
                } else if let Ok(index) = inner.parse::<i64>() {
                    segments.push(Segment::Index(index));
                } else {
                    return Err((
                        at,
                        format!(
                            "`[{inner}]` is not supported: use an index like [0] or a quoted name like ['key']"
                        ),
                    ));
                }
                at = close + 1;
            }
            c => {
                return Err((
                    at,
                    format!("unexpected `{c}` in a JSONPath (expected `.name` or `[…]`)"),
                ));
            }
        }
    }
    Ok(JsonPath {
        text: text.to_owned(),
        segments,
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
    fn syntax_errors_point_at_the_offending_character() {
        let cases = [
            ("", 0, "empty"),
            ("{$.a} = 1", 6, "use =="),
            ("{$.a} == ", 9, "end of the condition"),
            ("{$.a == 1", 0, "never closed"),
            ("({$.a} == 1", 0, "never closed"),
            ("{$.a} == 1 {$.b}", 11, "after a complete condition"),
            ("{$.a..b} == 1", 4, "field name"),
            ("{$.a[*]} == 1", 4, "not supported"),
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
