//! Label selectors in both forms the recipes use — Fusion's string (`app=db,tier in (a,b)`)
//! and Ramen's `matchLabels` / `matchExpressions` — and name selectors, applied to a VM's
//! disks: a `volume` group selects the disks whose name or labels match.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Requirement {
    pub key: String,
    pub operator: SelectorOp,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Kubernetes semantics: every requirement must hold; an empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                SelectorOp::In => value.is_some_and(|v| r.values.contains(v)),
                SelectorOp::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                SelectorOp::Exists => value.is_some(),
                SelectorOp::DoesNotExist => value.is_none(),
            }
        })
    }

    /// Parses the string form (`k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`,
    /// joined by commas). Errors are a char offset and a message.
    pub fn parse_string(text: &str) -> Result<LabelSelector, (usize, String)> {
        let mut requirements = Vec::new();
        for (start, part) in split_top_level(text) {
            let trimmed = part.trim();
            let lead = part.len() - part.trim_start().len();
            let at = start + lead;
            if trimmed.is_empty() {
                return Err((at, "empty requirement in the label selector".into()));
            }
            let requirement = parse_requirement(trimmed).map_err(|message| (at, message))?;
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    /// Builds the selector from `matchLabels` pairs and `matchExpressions` requirements.
    pub fn from_parts(match_labels: Vec<(String, String)>, expressions: Vec<Requirement>) -> Self {
        let mut requirements: Vec<Requirement> = match_labels
            .into_iter()
            .map(|(key, value)| Requirement {
                key,
                operator: SelectorOp::In,
                values: vec![value],
            })
            .collect();
        requirements.extend(expressions);
        LabelSelector { requirements }
    }
}

/// Splits on commas that are not inside parentheses, keeping each part's char offset.
fn split_top_level(text: &str) -> Vec<(usize, String)> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    let mut start = 0;
    for (index, c) in text.chars().enumerate() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push((start, std::mem::take(&mut current)));
                start = index + 1;
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push((start, current));
    parts
}

fn parse_requirement(text: &str) -> Result<Requirement, String> {
    if let Some(key) = text.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement {
            key: key.into(),
            operator: SelectorOp::DoesNotExist,
            values: vec![],
        });
    }
    for (symbol, operator) in [
        ("==", SelectorOp::In),
        ("!=", SelectorOp::NotIn),
        ("=", SelectorOp::In),
    ] {
        if let Some((key, value)) = text.split_once(symbol) {
            let (key, value) = (key.trim(), value.trim());
            check_key(key)?;
            check_value(value)?;
            return Ok(Requirement {
                key: key.into(),
                operator,
                values: vec![value.into()],
            });
        }
    }
    let words: Vec<&str> = text.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0];
        let rest = words[1].trim();
        let (operator, list) = if let Some(list) = rest.strip_prefix("notin") {
            (SelectorOp::NotIn, list)
        } else if let Some(list) = rest.strip_prefix("in") {
            (SelectorOp::In, list)
        } else {
            return Err(format!(
                "expected `in` or `notin` after `{key}`, found `{rest}`"
            ));
        };
        check_key(key)?;
        let list = list.trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| {
                format!("the values of `{key}` must be in parentheses: `{key} in (a,b)`")
            })?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
        for value in &values {
            check_value(value)?;
        }
        if values.iter().all(String::is_empty) {
            return Err(format!("`{key}` has an empty value list"));
        }
        return Ok(Requirement {
            key: key.into(),
            operator,
            values,
        });
    }
    check_key(text)?;
    Ok(Requirement {
        key: text.into(),
        operator: SelectorOp::Exists,
        values: vec![],
    })
}

fn label_key_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    // Kubernetes qualified name: optional DNS prefix and `/`, then a name of at most 63 chars.
    RE.get_or_init(|| {
        Regex::new(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
            .expect("static regex")
    })
}

fn check_key(key: &str) -> Result<(), String> {
    if label_key_re().is_match(key) {
        Ok(())
    } else {
        Err(format!("`{key}` is not a valid label key"))
    }
}

fn check_value(value: &str) -> Result<(), String> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$").expect("static regex")
    });
    if re.is_match(value) {
        Ok(())
    } else {
        Err(format!("`{value}` is not a valid label value"))
    }
}

/// One entry of a `nameSelector`: an exact name when it looks like one, else a regular
/// expression matched anywhere in the name (Ramen's rule; anchor it with `^…$`).
#[derive(Clone, Debug)]
pub enum NameMatcher {
    Exact(String),
    Pattern(Regex),
}

impl NameMatcher {
    pub fn new(text: &str) -> Result<NameMatcher, String> {
        static NAME: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        let name = NAME.get_or_init(|| {
            Regex::new(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$").expect("static regex")
        });
        if name.is_match(text) {
            return Ok(NameMatcher::Exact(text.to_owned()));
        }
        Regex::new(text).map(NameMatcher::Pattern).map_err(|error| {
            format!(
                "`{text}` is neither a disk name nor a valid regular expression: {}",
                first_line(&error.to_string())
            )
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NameMatcher::Exact(exact) => exact == name,
            NameMatcher::Pattern(re) => re.is_match(name),
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .last()
        .unwrap_or(text)
        .trim()
        .trim_start_matches("error: ")
        .to_owned()
}

/// A disk of the VM as the platform names it (qemu drive id, libvirt target, KubeVirt volume),
/// with labels where the platform has them (KubeVirt PVC labels; none on qemu).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskInfo {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a volume group selects among the VM's disks: the union of the name and label selectors
/// (as Ramen lists both), or every disk when the group has no selector.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiskSelector {
    #[serde(skip)]
    pub names: Vec<NameMatcher>,
    pub name_patterns: Vec<String>,
    pub labels: Option<LabelSelector>,
}

impl DiskSelector {
    pub fn everything() -> DiskSelector {
        DiskSelector::default()
    }

    pub fn selects_everything(&self) -> bool {
        self.names.is_empty() && self.labels.is_none()
    }

    pub fn selects(&self, disk: &DiskInfo) -> bool {
        if self.selects_everything() {
            return true;
        }
        self.names.iter().any(|m| m.matches(&disk.name))
            || self
                .labels
                .as_ref()
                .is_some_and(|l| l.matches(&disk.labels))
    }

    /// The disks selected, in the VM's order.
    pub fn select<'a>(&self, disks: &'a [DiskInfo]) -> Vec<&'a DiskInfo> {
        disks.iter().filter(|d| self.selects(d)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn string_form_covers_every_operator() {
        let s =
            LabelSelector::parse_string("app=db, tier in (a, b),env!=prod,backup,!skip").unwrap();
        assert_eq!(s.requirements.len(), 5);
        assert!(s.matches(&labels(&[("app", "db"), ("tier", "b"), ("backup", "")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "c"), ("backup", "")])));
        assert!(!s.matches(&labels(&[
            ("app", "db"),
            ("tier", "a"),
            ("backup", ""),
            ("skip", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "db"),
            ("tier", "a"),
            ("backup", ""),
            ("env", "prod")
        ])));
    }

    #[test]
    fn string_form_errors_carry_an_offset() {
        assert_eq!(LabelSelector::parse_string("app=db,,x").unwrap_err().0, 7);
        let (offset, message) = LabelSelector::parse_string("a=b, tier in a,b").unwrap_err();
        assert_eq!(offset, 5);
        assert!(message.contains("parentheses"), "{message}");
        assert!(LabelSelector::parse_string("bad key=1").is_err());
    }

    #[test]
    fn name_matchers_are_exact_names_or_unanchored_regexes_like_ramen() {
        assert!(NameMatcher::new("vda").unwrap().matches("vda"));
        assert!(!NameMatcher::new("vda").unwrap().matches("vdab"));
        assert!(NameMatcher::new("^vd[ab]$").unwrap().matches("vdb"));
        assert!(NameMatcher::new("data-.*").unwrap().matches("pvc-data-1"));
        assert!(
            NameMatcher::new("(")
                .unwrap_err()
                .contains("neither a disk name")
        );
    }

    #[test]
    fn disk_selector_is_the_union_of_names_and_labels() {
        let selector = DiskSelector {
            names: vec![NameMatcher::new("vda").unwrap()],
            name_patterns: vec!["vda".into()],
            labels: Some(LabelSelector::parse_string("role=data").unwrap()),
        };
        let disks = vec![
            DiskInfo {
                name: "vda".into(),
                labels: labels(&[]),
            },
            DiskInfo {
                name: "vdb".into(),
                labels: labels(&[("role", "data")]),
            },
            DiskInfo {
                name: "vdc".into(),
                labels: labels(&[("role", "scratch")]),
            },
        ];
        let names: Vec<_> = selector
            .select(&disks)
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["vda", "vdb"]);
        assert_eq!(DiskSelector::everything().select(&disks).len(), 3);
    }
}
