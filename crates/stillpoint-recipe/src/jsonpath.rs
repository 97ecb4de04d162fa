//! kubectl's JSONPath dialect (`k8s.io/client-go/util/jsonpath`), the paths inside a check
//! condition's `{…}` operands: parsed with character offsets so errors point into the
//! condition, and evaluated in pure code against a JSON document.
//!
//! Supported, as kubectl has them: `$` and `@` (optional; the document), `.name` (a name runs
//! to the next `.`, `[`, `]`, `,`, space, `$`, `@`, `{` or `}`, and `\` escapes one of those:
//! `.kubernetes\.io/hostname`), `['name']` (its text is a path: `['a.b']` is `.a.b`, as in
//! kubectl), `.*` and `[*]`, `[i]` (negative counts from the end), `[start:end:step]`,
//! unions `[0,2]` / `['a','b.c']`, recursive descent `..name` / `..[0]`, and filters
//! `[?(@.type=="Ready")]` comparing one path with a string (double or single quotes), number,
//! `true`/`false` or another path, with `==`, `!=`, `<`, `<=`, `>`, `>=`, or testing that a
//! path exists: `[?(@.ready)]`. Inside a filter `$` is the element, as in kubectl.
//!
//! Not in kubectl's dialect, so rejected with a message: `&&`/`||` inside a filter, the `=~`
//! operator, functions such as `length()` (kubectl has no `.length`: `.length` is a field
//! named `length`, here as there), and `range`/`end` (they print text; a condition compares
//! values).
//!
//! Deliberate differences, all on the lenient side: a missing key, an index out of range or a
//! filter on a non-list selects nothing instead of failing (kubectl's
//! `--allow-missing-template-keys` default, extended to indices); a filter element whose
//! operands are missing or of different kinds does not match (kubectl stops with "can only
//! compare one element at a time" or "incompatible types"); `step` in a slice steps (kubectl
//! passes it to Go's `Slice3` as a capacity); object members are visited in key order (Go
//! visits maps in random order); `["name"]` is accepted like `['name']`.
//!
//! Why not a crate: the Rust JSONPath crates implement RFC 9535 (`serde_json_path`) or
//! Goessner's dialect (`jsonpath-rust`), not kubectl's. RFC 9535 rejects names kubectl
//! accepts after a dot (`.app-name`, `.kubernetes\.io/hostname`), reads `['a.b']` as one key,
//! makes `$` in a filter the root, and has no `[?(@.x)]`-on-lists-only semantics; recipes are
//! written against kubectl (Ramen evaluates them with client-go), so the dialect must be
//! kubectl's. And those crates report positions in their own string, not in our operands.

use serde_json::Value as Json;

/// A parsed path, with its text for messages.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath {
    pub text: String,
    steps: Vec<Step>,
}

/// A syntax error at a character offset into the path text (the condition's error type: a
/// condition shifts the offset by where the path stands in it).
pub type PathError = crate::condition::ConditionError;

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Field(String),
    Wildcard,
    /// `[i]` is `Slice { start: i, end: None, step: 1, index: true }`.
    Slice {
        start: Option<i64>,
        end: Option<i64>,
        step: i64,
        index: bool,
    },
    Recursive,
    Union(Vec<Vec<Step>>),
    Filter(Box<Filter>),
}

#[derive(Clone, Debug, PartialEq)]
struct Filter {
    left: FilterOperand,
    test: Option<(FilterOp, FilterOperand)>,
}

#[derive(Clone, Debug, PartialEq)]
enum FilterOperand {
    Path(Vec<Step>),
    Value(Json),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

type Parsed<T> = Result<T, PathError>;

fn error<T>(offset: usize, message: impl Into<String>) -> Parsed<T> {
    Err(PathError {
        offset,
        message: message.into(),
    })
}

impl JsonPath {
    /// Parses one path (the text inside `{…}`, trimmed). Errors carry a char offset into `text`.
    pub fn parse(text: &str) -> Result<JsonPath, PathError> {
        let chars: Vec<char> = text.chars().collect();
        let mut parser = PathParser {
            chars: &chars,
            at: 0,
            in_filter: false,
            depth: 0,
        };
        if let Some(word) = parser.keyword() {
            return error(
                0,
                format!(
                    "`{word}` is not supported in a condition: range/end print text, a condition compares values (select the list with [*] or a filter)"
                ),
            );
        }
        let steps = parser.path()?;
        if parser.at < chars.len() {
            let c = chars[parser.at];
            return error(
                parser.at,
                format!("unexpected `{c}` in a JSONPath (expected `.name` or `[…]`)"),
            );
        }
        Ok(JsonPath {
            text: text.to_owned(),
            steps,
        })
    }

    /// The values the path selects in `document`, in kubectl's order.
    pub fn select<'a>(&self, document: &'a Json) -> Vec<&'a Json> {
        walk(&self.steps, vec![document])
    }
}

struct PathParser<'a> {
    chars: &'a [char],
    at: usize,
    in_filter: bool,
    /// Filters inside filters, bounded so that no input can exhaust the stack.
    depth: usize,
}

const MAX_FILTER_DEPTH: usize = 16;

impl PathParser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn starts_with(&self, token: &str) -> bool {
        let token: Vec<char> = token.chars().collect();
        self.chars
            .get(self.at..)
            .is_some_and(|rest| rest.starts_with(&token))
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    /// `range` or `end` at the start (kubectl's identifiers), which conditions cannot use.
    fn keyword(&self) -> Option<&'static str> {
        ["range", "end"].into_iter().find(|word| {
            self.starts_with(word)
                && self
                    .chars
                    .get(self.at + word.len())
                    .is_none_or(|c| !c.is_alphanumeric())
        })
    }

    fn is_terminator(&self, c: char) -> bool {
        c.is_whitespace() || ".,[]$@{}".contains(c) || (self.in_filter && "=!<>()&|~".contains(c))
    }

    /// A path: an optional `$`/`@`, then steps until something that is not a step.
    fn path(&mut self) -> Parsed<Vec<Step>> {
        if matches!(self.peek(), Some('$' | '@')) {
            self.at += 1;
        }
        let mut steps = Vec::new();
        loop {
            match self.peek() {
                Some('.') if self.starts_with("..") => {
                    let start = self.at;
                    self.at += 2;
                    if self.peek() == Some('.') {
                        return error(start, "`...`: only one recursive descent `..` at a time");
                    }
                    steps.push(Step::Recursive);
                    match self.peek() {
                        Some('[') => {}
                        Some(c) if !self.is_terminator(c) && c != '*' => {
                            steps.push(Step::Field(self.name(start)?));
                        }
                        _ => {
                            return error(
                                start,
                                "expected a field name or `[…]` after the recursive descent `..`",
                            );
                        }
                    }
                }
                Some('.') => {
                    let start = self.at;
                    self.at += 1;
                    if self.peek() == Some('*') {
                        self.at += 1;
                        steps.push(Step::Wildcard);
                    } else {
                        steps.push(Step::Field(self.name(start)?));
                    }
                }
                Some('[') => steps.push(self.bracket()?),
                _ => return Ok(steps),
            }
        }
    }

    /// A field name up to the next terminator; `\` takes the next character literally.
    fn name(&mut self, dot: usize) -> Parsed<String> {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c == '\\' {
                match self.chars.get(self.at + 1) {
                    Some(&escaped) => name.push(escaped),
                    None => return error(self.at, "a `\\` at the end escapes nothing"),
                }
                self.at += 2;
            } else if self.is_terminator(c) {
                break;
            } else {
                name.push(c);
                self.at += 1;
            }
        }
        if name.is_empty() {
            return error(dot, "expected a field name after `.`");
        }
        Ok(name)
    }

    fn bracket(&mut self) -> Parsed<Step> {
        let open = self.at;
        if self.starts_with("[?(") {
            return self.filter();
        }
        if self.starts_with("[?") {
            return error(
                open,
                "a filter is written `[?(…)]` in kubectl's JSONPath, with parentheses",
            );
        }
        // The parts between commas, each with its offset; quotes may hold `,` and `]`.
        self.at += 1;
        let mut parts = Vec::new();
        let mut part_start = self.at;
        let mut quote: Option<char> = None;
        loop {
            let Some(c) = self.peek() else {
                return error(open, "this `[` is never closed");
            };
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), '\\') => self.at += 1,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, ',' | ']') => {
                    parts.push((part_start, self.chars[part_start..self.at].to_vec()));
                    part_start = self.at + 1;
                    if c == ']' {
                        self.at += 1;
                        break;
                    }
                }
                (None, _) => {}
            }
            self.at += 1;
        }
        let mut union = Vec::with_capacity(parts.len());
        for (offset, part) in &parts {
            union.push(subscript(part, *offset)?);
        }
        if union.len() == 1 {
            let mut steps = union.pop().unwrap_or_default();
            if steps.len() == 1 {
                return Ok(steps.remove(0));
            }
            return Ok(Step::Union(vec![steps]));
        }
        Ok(Step::Union(union))
    }

    fn filter(&mut self) -> Parsed<Step> {
        let open = self.at;
        if self.depth == MAX_FILTER_DEPTH {
            return error(
                open,
                format!("filters nest more than {MAX_FILTER_DEPTH} deep"),
            );
        }
        self.at += 3;
        let outer = self.in_filter;
        self.in_filter = true;
        self.depth += 1;
        self.skip_space();
        let left = self.filter_operand()?;
        self.skip_space();
        let op_at = self.at;
        let op = [
            ("==", FilterOp::Eq),
            ("!=", FilterOp::Ne),
            ("<=", FilterOp::Le),
            (">=", FilterOp::Ge),
            ("<", FilterOp::Lt),
            (">", FilterOp::Gt),
        ]
        .into_iter()
        .find(|(token, _)| self.starts_with(token));
        let test = match op {
            Some((token, op)) => {
                self.at += token.len();
                self.skip_space();
                let right = self.filter_operand()?;
                self.skip_space();
                Some((op, right))
            }
            None if self.starts_with("=~") => {
                return error(
                    op_at,
                    "the `=~` operator is not supported (kubectl's JSONPath has no regular expressions)",
                );
            }
            None if self.starts_with("=") => {
                return error(op_at, "expected a comparison operator; use == for equality");
            }
            None => None,
        };
        if self.starts_with("&&") || self.starts_with("||") {
            return error(
                self.at,
                "`&&` and `||` are not supported inside a filter (kubectl compares one pair); join two conditions with && instead",
            );
        }
        if !self.starts_with(")]") {
            return match self.peek() {
                Some(c) => error(
                    self.at,
                    format!("unexpected `{c}` in the filter (expected an operator or `)]`)"),
                ),
                None => error(open, "this filter `[?(` is never closed with `)]`"),
            };
        }
        self.at += 2;
        self.in_filter = outer;
        self.depth -= 1;
        Ok(Step::Filter(Box::new(Filter { left, test })))
    }

    fn filter_operand(&mut self) -> Parsed<FilterOperand> {
        let start = self.at;
        match self.peek() {
            Some('@' | '$' | '.' | '[') => Ok(FilterOperand::Path(self.path()?)),
            Some(quote @ ('"' | '\'')) => {
                self.at += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None => return error(start, "this quoted string is never closed"),
                        Some('\\') => {
                            let Some(&c) = self.chars.get(self.at + 1) else {
                                return error(start, "this quoted string is never closed");
                            };
                            text.push(match c {
                                'n' => '\n',
                                't' => '\t',
                                c => c,
                            });
                            self.at += 2;
                        }
                        Some(c) if c == quote => {
                            self.at += 1;
                            return Ok(FilterOperand::Value(Json::String(text)));
                        }
                        Some(c) => {
                            text.push(c);
                            self.at += 1;
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_digit() || "+-.eE".contains(c))
                {
                    self.at += 1;
                }
                let text: String = self.chars[start..self.at].iter().collect();
                let number = text.parse::<i64>().ok().map(Json::from).or_else(|| {
                    text.parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(Json::Number)
                });
                match number {
                    Some(number) => Ok(FilterOperand::Value(number)),
                    None => error(start, format!("`{text}` is not a number")),
                }
            }
            Some(c) if c.is_alphabetic() => {
                while self.peek().is_some_and(char::is_alphanumeric) {
                    self.at += 1;
                }
                let word: String = self.chars[start..self.at].iter().collect();
                match word.as_str() {
                    "true" => Ok(FilterOperand::Value(Json::Bool(true))),
                    "false" => Ok(FilterOperand::Value(Json::Bool(false))),
                    _ => error(
                        start,
                        format!(
                            "`{word}` in a filter: quote strings (@.type==\"{word}\") and start paths with @"
                        ),
                    ),
                }
            }
            Some(c) => error(
                start,
                format!(
                    "expected a path (@.name), a quoted string, a number or true/false in the filter, found `{c}`"
                ),
            ),
            None => error(start, "the filter ends here; expected an operand and `)]`"),
        }
    }
}

/// One comma-separated part of `[…]`: `*`, a quoted name (a path in kubectl: `'a.b'` is
/// `.a.b`), an index or a slice. `offset` is where `part` starts in the path text.
fn subscript(part: &[char], offset: usize) -> Parsed<Vec<Step>> {
    let leading = part.iter().take_while(|c| c.is_whitespace()).count();
    let text: String = part.iter().collect();
    let trimmed = text.trim();
    let at = offset + leading;
    if trimmed.is_empty() {
        return error(
            at,
            "empty `[]`: use an index [0], a slice [1:3], [*] or a quoted name ['key']",
        );
    }
    if trimmed == "*" {
        return Ok(vec![Step::Wildcard]);
    }
    let first = trimmed.chars().next().unwrap_or(' ');
    if first == '\'' || first == '"' {
        let inner: Vec<char> = trimmed.chars().collect();
        if inner.len() < 2 || inner[inner.len() - 1] != first {
            return error(at, "this quoted name is never closed");
        }
        let body = &inner[1..inner.len() - 1];
        // kubectl reads the quoted text as a path: unescaped dots separate names.
        let mut steps = Vec::new();
        let mut name = String::new();
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                '\\' if i + 1 < body.len() => {
                    name.push(body[i + 1]);
                    i += 1;
                }
                '.' => steps.push(Step::Field(std::mem::take(&mut name))),
                c => name.push(c),
            }
            i += 1;
        }
        steps.push(Step::Field(name));
        return Ok(steps);
    }
    let pieces: Vec<&str> = trimmed.split(':').collect();
    if pieces.len() > 3 {
        return error(
            at,
            format!("`[{trimmed}]`: a slice has at most start:end:step"),
        );
    }
    let mut numbers = [None, None, None];
    for (slot, piece) in pieces.iter().enumerate() {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        match piece.parse::<i64>() {
            Ok(n) => numbers[slot] = Some(n),
            Err(_) => {
                return error(
                    at,
                    format!(
                        "`[{trimmed}]` is not supported: use an index [0], a slice [1:3], [*], a quoted name ['key'] or a filter [?(@.name==\"x\")]"
                    ),
                );
            }
        }
    }
    if pieces.len() == 1 {
        return Ok(vec![Step::Slice {
            start: numbers[0],
            end: None,
            step: 1,
            index: true,
        }]);
    }
    let step = numbers[2].unwrap_or(1);
    if step <= 0 {
        return error(
            at,
            format!("`[{trimmed}]`: the step of a slice must be positive"),
        );
    }
    Ok(vec![Step::Slice {
        start: numbers[0],
        end: numbers[1],
        step,
        index: false,
    }])
}

fn walk<'a>(steps: &[Step], mut current: Vec<&'a Json>) -> Vec<&'a Json> {
    for step in steps {
        current = apply(step, current);
    }
    current
}

fn children(value: &Json) -> Vec<&Json> {
    match value {
        Json::Object(map) => map.values().collect(),
        Json::Array(items) => items.iter().collect(),
        _ => Vec::new(),
    }
}

fn descend<'a>(value: &'a Json, into: &mut Vec<&'a Json>) {
    if matches!(value, Json::Object(_) | Json::Array(_)) {
        into.push(value);
        for child in children(value) {
            descend(child, into);
        }
    }
}

fn apply<'a>(step: &Step, input: Vec<&'a Json>) -> Vec<&'a Json> {
    let mut out = Vec::new();
    match step {
        Step::Field(name) => {
            out.extend(input.iter().filter_map(|value| value.get(name.as_str())));
        }
        Step::Wildcard => {
            for value in input {
                out.extend(children(value));
            }
        }
        Step::Recursive => {
            for value in input {
                descend(value, &mut out);
            }
        }
        Step::Union(parts) => {
            for part in parts {
                out.extend(walk(part, input.clone()));
            }
        }
        Step::Slice {
            start,
            end,
            step,
            index,
        } => {
            for value in input {
                let Json::Array(items) = value else { continue };
                let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
                let resolve = |n: i64| if n < 0 { n.saturating_add(len) } else { n };
                if *index {
                    let at = resolve(start.unwrap_or(0));
                    if let Some(item) = usize::try_from(at).ok().and_then(|at| items.get(at)) {
                        out.push(item);
                    }
                    continue;
                }
                let from = resolve(start.unwrap_or(0)).clamp(0, len);
                let to = resolve(end.unwrap_or(len)).clamp(0, len);
                let mut at = from;
                while at < to {
                    if let Some(item) = usize::try_from(at).ok().and_then(|at| items.get(at)) {
                        out.push(item);
                    }
                    at = at.saturating_add(*step);
                }
            }
        }
        Step::Filter(filter) => {
            for value in input {
                let Json::Array(items) = value else { continue };
                out.extend(items.iter().filter(|item| filter.matches(item)));
            }
        }
    }
    out
}

impl Filter {
    fn matches(&self, element: &Json) -> bool {
        let left = self.left.values(element);
        let Some((op, right)) = &self.test else {
            return !left.is_empty();
        };
        let right = right.values(element);
        match (left.as_slice(), right.as_slice()) {
            ([a], [b]) => filter_compare(a, *op, b),
            _ => false,
        }
    }
}

impl FilterOperand {
    fn values<'a>(&'a self, element: &'a Json) -> Vec<&'a Json> {
        match self {
            FilterOperand::Path(steps) => walk(steps, vec![element]),
            FilterOperand::Value(value) => vec![value],
        }
    }
}

/// kubectl's filter comparison (Go template `eq`, `lt` …): same kinds only, no conversions.
fn filter_compare(a: &Json, op: FilterOp, b: &Json) -> bool {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (Json::Number(x), Json::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x.partial_cmp(&y),
            _ => None,
        },
        (Json::String(x), Json::String(y)) => Some(x.cmp(y)),
        (Json::Bool(x), Json::Bool(y)) => {
            return match op {
                FilterOp::Eq => x == y,
                FilterOp::Ne => x != y,
                _ => false,
            };
        }
        (Json::Null, Json::Null) => Some(Ordering::Equal),
        _ => None,
    };
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        FilterOp::Eq => ordering == Ordering::Equal,
        FilterOp::Ne => ordering != Ordering::Equal,
        FilterOp::Lt => ordering == Ordering::Less,
        FilterOp::Le => ordering != Ordering::Greater,
        FilterOp::Gt => ordering == Ordering::Greater,
        FilterOp::Ge => ordering != Ordering::Less,
    }
}

#[cfg(test)]
#[path = "jsonpath_tests.rs"]
mod tests;
