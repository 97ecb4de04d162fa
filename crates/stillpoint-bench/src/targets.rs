//! The benchmarks' targets: one table in `docs/benchmarks.md`, the only place their numbers
//! are written.
//!
//! The file is embedded at build time (`include_str!`) and its targets table — the table whose
//! first header cell is `target` — is parsed with a CommonMark parser when a benchmark starts.
//! Each row names a [`Target`] (in backticks), and its `bound` column reads `≥ NUMBER UNIT` or
//! `≤ NUMBER UNIT`. The code fixes, per target, the unit it computes the figure in and the
//! direction that counts as met; the table must agree with both, must name every target and
//! must name nothing else. So a changed number needs an edit of the table only, and a table
//! that would make a benchmark judge the wrong way is an error naming its line.

use std::collections::BTreeMap;
use std::fmt;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

use crate::error::TargetsError;

/// `docs/benchmarks.md`, as built into this binary.
const BENCHMARKS_MD: &str = include_str!("../../../docs/benchmarks.md");

/// A target some benchmark judges a figure against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// `bench repo`: full backup, stillpoint's MB/s over restic's.
    RepoFull,
    /// `bench repo`: unchanged second backup, over restic's.
    RepoUnchanged,
    /// `bench repo`: 1 % incremental, over restic's.
    RepoIncremental,
    /// `bench repo`: restore, over restic's.
    RepoRestore,
    /// `bench repo`: stillpoint's peak RSS over the phases.
    RepoPeakRss,
    /// `bench capture`: the worst median writer stall across configurations.
    CaptureStall,
    /// `bench capture`: capture-path copy throughput over backup-image's.
    CaptureCopyThroughput,
    /// `bench capture`: a 1 % incremental's time over a full backup's.
    CaptureIncremental,
}

impl Target {
    /// Every target the benchmarks ask for.
    pub const ALL: [Target; 8] = [
        Target::RepoFull,
        Target::RepoUnchanged,
        Target::RepoIncremental,
        Target::RepoRestore,
        Target::RepoPeakRss,
        Target::CaptureStall,
        Target::CaptureCopyThroughput,
        Target::CaptureIncremental,
    ];

    /// The target's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Target::RepoFull => "repo.full",
            Target::RepoUnchanged => "repo.unchanged",
            Target::RepoIncremental => "repo.incremental",
            Target::RepoRestore => "repo.restore",
            Target::RepoPeakRss => "repo.peak_rss",
            Target::CaptureStall => "capture.stall",
            Target::CaptureCopyThroughput => "capture.copy_throughput",
            Target::CaptureIncremental => "capture.incremental",
        }
    }

    /// The unit the benchmark computes the figure in.
    pub fn unit(self) -> Unit {
        match self {
            Target::RepoFull
            | Target::RepoUnchanged
            | Target::RepoIncremental
            | Target::RepoRestore => Unit::Times,
            Target::RepoPeakRss => Unit::Mebibytes,
            Target::CaptureStall => Unit::Milliseconds,
            Target::CaptureCopyThroughput | Target::CaptureIncremental => Unit::Percent,
        }
    }

    /// Which side of the bound is good: more (throughput) or less (time, memory).
    pub fn relation(self) -> Relation {
        match self {
            Target::RepoFull
            | Target::RepoUnchanged
            | Target::RepoIncremental
            | Target::RepoRestore
            | Target::CaptureCopyThroughput => Relation::AtLeast,
            Target::RepoPeakRss | Target::CaptureStall | Target::CaptureIncremental => {
                Relation::AtMost
            }
        }
    }

    fn named(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The unit of a bound as written in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A ratio, written `×` (or `x`).
    Times,
    /// A ratio as a percentage, `%`.
    Percent,
    /// `ms`.
    Milliseconds,
    /// `MiB`.
    Mebibytes,
}

impl Unit {
    fn parse(text: &str) -> Option<Unit> {
        match text {
            "×" | "x" => Some(Unit::Times),
            "%" => Some(Unit::Percent),
            "ms" => Some(Unit::Milliseconds),
            "MiB" => Some(Unit::Mebibytes),
            _ => None,
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Times => "×",
            Unit::Percent => "%",
            Unit::Milliseconds => "ms",
            Unit::Mebibytes => "MiB",
        })
    }
}

/// Whether a figure must reach the bound or stay under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    AtLeast,
    AtMost,
}

/// As the benchmarks print it: `>=` or `<=`.
impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Relation::AtLeast => ">=",
            Relation::AtMost => "<=",
        })
    }
}

/// One target's bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    pub relation: Relation,
    /// The number as written in the table, in `unit`.
    pub value: f64,
    pub unit: Unit,
}

impl Bound {
    /// The bound on the scale the benchmarks compute figures on: a percentage as a fraction,
    /// anything else as written.
    pub fn limit(&self) -> f64 {
        match self.unit {
            Unit::Percent => self.value / 100.0,
            _ => self.value,
        }
    }

    /// Whether `measured` (on the scale of [`Bound::limit`]) meets the bound.
    pub fn is_met(&self, measured: f64) -> bool {
        match self.relation {
            Relation::AtLeast => measured >= self.limit(),
            Relation::AtMost => measured <= self.limit(),
        }
    }

    /// By how many percent of the bound `measured` misses it (negative when met).
    pub fn shortfall_percent(&self, measured: f64) -> f64 {
        let share = measured / self.limit();
        match self.relation {
            Relation::AtLeast => (1.0 - share) * 100.0,
            Relation::AtMost => (share - 1.0) * 100.0,
        }
    }
}

/// Every target's bound, from the table.
#[derive(Debug, Clone)]
pub struct Targets {
    bounds: BTreeMap<Target, Bound>,
}

impl Targets {
    /// The targets of the `docs/benchmarks.md` this crate was built with.
    pub fn load() -> Result<Targets, TargetsError> {
        Targets::parse(BENCHMARKS_MD)
    }

    /// The targets table of `markdown`; every [`Target`] must have exactly one row.
    pub fn parse(markdown: &str) -> Result<Targets, TargetsError> {
        let table = find_table(markdown).ok_or(TargetsError::NoTable)?;
        let bound_column = table
            .header
            .iter()
            .position(|h| h.eq_ignore_ascii_case("bound"))
            .ok_or(TargetsError::NoTable)?;
        let mut bounds = BTreeMap::new();
        for row in &table.rows {
            // The parser pads a short row with empty cells: a missing bound reads as empty.
            let cell = |column: usize| row.cells.get(column).map_or("", String::as_str);
            let (name, bound_cell) = (cell(0), cell(bound_column));
            let target = Target::named(name).ok_or_else(|| TargetsError::UnknownTarget {
                line: row.line,
                name: name.into(),
            })?;
            let bound = parse_bound(bound_cell).map_err(|why| TargetsError::BadBound {
                line: row.line,
                name: name.into(),
                bound: bound_cell.into(),
                why: why.into(),
            })?;
            if bound.unit != target.unit() {
                return Err(TargetsError::WrongUnit {
                    line: row.line,
                    name: name.into(),
                    found: bound.unit.to_string(),
                    wanted: target.unit().to_string(),
                });
            }
            if bound.relation != target.relation() {
                return Err(TargetsError::WrongRelation {
                    line: row.line,
                    name: name.into(),
                    wanted: target.relation().to_string(),
                });
            }
            if bounds.insert(target, bound).is_some() {
                return Err(TargetsError::Duplicate {
                    line: row.line,
                    name: name.into(),
                });
            }
        }
        if let Some(missing) = Target::ALL.iter().find(|t| !bounds.contains_key(t)) {
            return Err(TargetsError::Missing {
                name: missing.name().into(),
            });
        }
        Ok(Targets { bounds })
    }

    /// `target`'s bound (a parsed table has one for every target).
    pub fn bound(&self, target: Target) -> Bound {
        self.bounds[&target]
    }
}

struct Table {
    header: Vec<String>,
    rows: Vec<Row>,
}

struct Row {
    /// 1-based line in the markdown.
    line: usize,
    cells: Vec<String>,
}

/// The first table whose first header cell is `target`, each cell's text (code spans
/// included) trimmed.
fn find_table(markdown: &str) -> Option<Table> {
    let line_of = |offset: usize| markdown[..offset].matches('\n').count() + 1;
    let mut current: Option<Table> = None;
    let mut row: Option<Row> = None;
    let mut cell: Option<String> = None;
    for (event, range) in Parser::new_ext(markdown, Options::ENABLE_TABLES).into_offset_iter() {
        match event {
            Event::Start(Tag::Table(_)) => {
                current = Some(Table {
                    header: Vec::new(),
                    rows: Vec::new(),
                })
            }
            Event::Start(Tag::TableHead | Tag::TableRow) => {
                row = Some(Row {
                    line: line_of(range.start),
                    cells: Vec::new(),
                })
            }
            Event::Start(Tag::TableCell) => cell = Some(String::new()),
            Event::Text(text) | Event::Code(text) => {
                if let Some(cell) = cell.as_mut() {
                    cell.push_str(&text);
                }
            }
            Event::End(TagEnd::TableCell) => {
                if let (Some(row), Some(text)) = (row.as_mut(), cell.take()) {
                    row.cells.push(text.trim().to_string());
                }
            }
            Event::End(TagEnd::TableHead) => {
                if let (Some(table), Some(head)) = (current.as_mut(), row.take()) {
                    table.header = head.cells;
                }
            }
            Event::End(TagEnd::TableRow) => {
                if let (Some(table), Some(done)) = (current.as_mut(), row.take()) {
                    table.rows.push(done);
                }
            }
            Event::End(TagEnd::Table) => {
                let table = current.take()?;
                if table
                    .header
                    .first()
                    .is_some_and(|h| h.eq_ignore_ascii_case("target"))
                {
                    return Some(table);
                }
            }
            _ => {}
        }
    }
    None
}

/// `≥ 80 %`, `<= 50 ms`, `≥ 2×`.
fn parse_bound(text: &str) -> Result<Bound, &'static str> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the cell is empty");
    }
    let (relation, rest) = [
        ("≥", Relation::AtLeast),
        (">=", Relation::AtLeast),
        ("≤", Relation::AtMost),
        ("<=", Relation::AtMost),
    ]
    .into_iter()
    .find_map(|(prefix, relation)| Some((relation, text.strip_prefix(prefix)?)))
    .ok_or("it starts with neither ≥ nor ≤")?;
    let rest = rest.trim_start();
    let digits = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let value: f64 = rest[..digits].parse().map_err(|_| "no number")?;
    if !(value.is_finite() && value > 0.0) {
        return Err("the number must be positive");
    }
    let unit = Unit::parse(rest[digits..].trim()).ok_or("the unit is none of ×, %, ms, MiB")?;
    Ok(Bound {
        relation,
        value,
        unit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_table_parses_and_names_every_target_the_benchmarks_ask_for() {
        let targets = Targets::load().unwrap_or_else(|e| panic!("{e}"));
        for target in Target::ALL {
            let bound = targets.bound(target);
            assert_eq!(bound.unit, target.unit(), "{}", target.name());
            assert_eq!(bound.relation, target.relation(), "{}", target.name());
        }
    }

    /// A table with one row per target, every bound 1 in the target's unit and direction,
    /// with `edit` applied to the rows.
    fn table(edit: impl FnOnce(&mut Vec<String>)) -> String {
        let mut rows: Vec<String> = Target::ALL
            .iter()
            .map(|t| {
                let op = match t.relation() {
                    Relation::AtLeast => "≥",
                    Relation::AtMost => "≤",
                };
                format!("| `{}` | a figure | {op} 1 {} |", t.name(), t.unit())
            })
            .collect();
        edit(&mut rows);
        format!(
            "# Benchmarks\n\n| other | table |\n|---|---|\n| a | b |\n\n| target | figure | bound |\n|---|---|---|\n{}\n",
            rows.join("\n")
        )
    }

    #[test]
    fn bounds_read_both_spellings_and_every_unit() {
        let text = table(|rows| {
            rows[0] = "| `repo.full` | full | >= 2.5x |".into();
            rows[6] = "| `capture.copy_throughput` | copy | ≥80 % |".into();
        });
        let targets = Targets::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let full = targets.bound(Target::RepoFull);
        assert_eq!(
            (full.relation, full.value, full.unit),
            (Relation::AtLeast, 2.5, Unit::Times)
        );
        let copy = targets.bound(Target::CaptureCopyThroughput);
        assert_eq!((copy.value, copy.limit()), (80.0, 0.8));
        assert_eq!(targets.bound(Target::CaptureStall).unit, Unit::Milliseconds);
        assert_eq!(targets.bound(Target::RepoPeakRss).unit, Unit::Mebibytes);
    }

    #[test]
    fn faults_in_the_table_name_their_line_and_target() {
        // The targets table's header is line 7, the first row line 9.
        let missing = Targets::parse(&table(|rows| {
            rows.remove(3);
        }))
        .expect_err("a row is missing");
        assert_eq!(
            missing,
            TargetsError::Missing {
                name: "repo.restore".into()
            }
        );
        let unknown = Targets::parse(&table(|rows| {
            rows.push("| `repo.speed` | x | ≥ 1 × |".into())
        }))
        .expect_err("unknown");
        assert_eq!(
            unknown,
            TargetsError::UnknownTarget {
                line: 17,
                name: "repo.speed".into()
            }
        );
        let twice = Targets::parse(&table(|rows| rows.push(rows[0].clone()))).expect_err("twice");
        assert!(
            matches!(twice, TargetsError::Duplicate { line: 17, .. }),
            "{twice}"
        );
        let unit = Targets::parse(&table(|rows| {
            rows[5] = "| `capture.stall` | s | ≤ 1 % |".into()
        }))
        .expect_err("unit");
        assert_eq!(
            unit.to_string(),
            "docs/benchmarks.md line 14: the bound of `capture.stall` is in `%`, the benchmark measures it in `ms`"
        );
        let direction = Targets::parse(&table(|rows| {
            rows[5] = "| `capture.stall` | s | ≥ 1 ms |".into()
        }))
        .expect_err("direction");
        assert!(
            matches!(direction, TargetsError::WrongRelation { line: 14, .. }),
            "{direction}"
        );
        for (bound, why) in [
            ("50 ms", "neither"),
            ("≤ ms", "no number"),
            ("≤ 0 ms", "positive"),
            ("≤ 50 s", "the unit"),
        ] {
            let bad = Targets::parse(&table(|rows| {
                rows[5] = format!("| `capture.stall` | s | {bound} |")
            }))
            .expect_err(bound);
            let text = bad.to_string();
            assert!(
                text.contains("line 14") && text.contains(bound) && text.contains(why),
                "{text}"
            );
        }
        let short = Targets::parse(&table(|rows| rows[5] = "| `capture.stall` |".into()))
            .expect_err("short");
        assert!(
            matches!(&short, TargetsError::BadBound { line: 14, why, .. } if why == "the cell is empty"),
            "{short}"
        );
        assert_eq!(
            Targets::parse("| a | b |\n|---|---|\n| 1 | 2 |\n").expect_err("none"),
            TargetsError::NoTable
        );
    }

    #[test]
    fn a_bound_judges_in_its_direction_and_says_by_how_much_it_was_missed() {
        let at_most = Bound {
            relation: Relation::AtMost,
            value: 50.0,
            unit: Unit::Milliseconds,
        };
        assert!(at_most.is_met(50.0) && !at_most.is_met(50.1));
        assert!((at_most.shortfall_percent(75.0) - 50.0).abs() < 1e-9);
        let at_least = Bound {
            relation: Relation::AtLeast,
            value: 80.0,
            unit: Unit::Percent,
        };
        assert!(at_least.is_met(0.8) && !at_least.is_met(0.79));
        assert!((at_least.shortfall_percent(0.6) - 25.0).abs() < 1e-9);
    }
}
