//! The crate's typed error: what is wrong with the targets table of `docs/benchmarks.md`.
//!
//! The harnesses themselves return `anyhow::Result`: a benchmark run is an end-to-end program
//! whose failures (a VM that does not boot, a peer tool that fails) are reported to a person
//! with their chain of context, never matched on by a caller. The targets table is different:
//! it is data the code depends on, and each of its faults has a place (line, target, column).

/// A fault in the targets table, naming the line of `docs/benchmarks.md` and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetsError {
    /// No table whose header starts with `target` was found.
    #[error(
        "docs/benchmarks.md has no targets table (a table whose first header is `target`, with a `bound` column)"
    )]
    NoTable,
    /// The target's name is not one the benchmarks know.
    #[error("docs/benchmarks.md line {line}: `{name}` is not a target any benchmark checks")]
    UnknownTarget { line: usize, name: String },
    /// The same target is given twice.
    #[error("docs/benchmarks.md line {line}: target `{name}` is given twice")]
    Duplicate { line: usize, name: String },
    /// The bound cell does not read `≥ NUMBER UNIT` or `≤ NUMBER UNIT`.
    #[error(
        "docs/benchmarks.md line {line}: the bound `{bound}` of `{name}` is not `≥ NUMBER UNIT` or `≤ NUMBER UNIT` ({why})"
    )]
    BadBound {
        line: usize,
        name: String,
        bound: String,
        why: String,
    },
    /// The bound's unit is not the one the benchmark computes the figure in.
    #[error(
        "docs/benchmarks.md line {line}: the bound of `{name}` is in `{found}`, the benchmark measures it in `{wanted}`"
    )]
    WrongUnit {
        line: usize,
        name: String,
        found: String,
        wanted: String,
    },
    /// The bound points the wrong way: the benchmark would call a miss met.
    #[error(
        "docs/benchmarks.md line {line}: the bound of `{name}` must read `{wanted} …`: that side is the good one"
    )]
    WrongRelation {
        line: usize,
        name: String,
        wanted: String,
    },
    /// A target the code asks for has no row.
    #[error("docs/benchmarks.md: the targets table has no row for `{name}`")]
    Missing { name: String },
}
