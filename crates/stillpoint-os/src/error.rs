//! Typed errors of the OS helpers; each names the path or argument it is about.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime directory is unusable (someone else owns it, others may write it …).
    #[error("runtime directory {}: {problem}", path.display())]
    RuntimeDir { path: PathBuf, problem: String },
    /// The runtime directory could not be created or inspected.
    #[error("runtime directory {}: cannot {action}: {source}", path.display())]
    RuntimeDirIo {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A name (VM name, snapshot name …) that would become a path is not acceptable.
    #[error("invalid {what} `{name}`: {problem}")]
    InvalidName {
        what: String,
        name: String,
        problem: String,
    },
}
