//! The crate's one error type.
//!
//! Rules (shared by every stillpoint library crate):
//! - One public error, [`RecipeError`]: a `#[non_exhaustive]` [`RecipeErrorKind`] callers can
//!   match on, the context that says *where* (recipe file, workflow, annotation key, and for an
//!   invalid recipe every positioned [`Diagnostic`]), and the underlying source.
//! - Messages are sentences about what failed; they never repeat the source's text (the CLI
//!   prints the chain once).
//! - Bad input is an error value, never a panic.
//! - Step failures while a workflow runs are *not* errors: they are outcomes in the
//!   [`crate::WorkflowReport`], because the workflow goes on to compensate and report.

use std::path::PathBuf;

use crate::diagnostic::{Diagnostic, Severity};

/// What kind of failure this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecipeErrorKind {
    /// The recipe file could not be read.
    Read,
    /// The recipe has errors; see [`RecipeError::diagnostics`].
    Invalid,
    /// A Velero hook annotation is malformed; see [`RecipeError::annotation`].
    Annotation,
}

#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct RecipeError {
    kind: RecipeErrorKind,
    /// Boxed so `Result<_, RecipeError>` stays small.
    context: Box<Context>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Default)]
struct Context {
    message: Option<String>,
    path: Option<PathBuf>,
    workflow: Option<String>,
    annotation: Option<String>,
    diagnostics: Vec<Diagnostic>,
}

impl RecipeError {
    pub fn new(kind: RecipeErrorKind) -> Self {
        RecipeError {
            kind,
            context: Box::default(),
            source: None,
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.context.message = Some(message.into());
        self
    }

    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.context.path = Some(path.into());
        self
    }

    pub fn with_workflow(mut self, workflow: impl Into<String>) -> Self {
        self.context.workflow = Some(workflow.into());
        self
    }

    pub fn with_annotation(mut self, key: impl Into<String>) -> Self {
        self.context.annotation = Some(key.into());
        self
    }

    pub fn with_diagnostics(mut self, diagnostics: Vec<Diagnostic>) -> Self {
        self.context.diagnostics = diagnostics;
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> RecipeErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&std::path::Path> {
        self.context.path.as_deref()
    }

    pub fn annotation(&self) -> Option<&str> {
        self.context.annotation.as_deref()
    }

    /// Every problem found, positioned, for [`RecipeErrorKind::Invalid`].
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.context.diagnostics
    }

    fn describe(&self) -> String {
        let file = self.context.path.as_ref().map(|p| p.display().to_string());
        let mut text = match (self.kind, &file) {
            (RecipeErrorKind::Read, Some(file)) => format!("cannot read recipe {file}"),
            (RecipeErrorKind::Read, None) => "cannot read the recipe".to_owned(),
            (RecipeErrorKind::Invalid, Some(file)) => format!("recipe {file} is invalid"),
            (RecipeErrorKind::Invalid, None) => "the recipe is invalid".to_owned(),
            (RecipeErrorKind::Annotation, _) => match &self.context.annotation {
                Some(key) => format!("annotation {key} is invalid"),
                None => "the hook annotations are invalid".to_owned(),
            },
        };
        if let Some(workflow) = &self.context.workflow {
            text.push_str(&format!(" (workflow `{workflow}`)"));
        }
        if let Some(message) = &self.context.message {
            text.push_str(": ");
            text.push_str(message);
        }
        let errors: Vec<&Diagnostic> = self
            .context
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        if !errors.is_empty() {
            let file = file.as_deref().unwrap_or("recipe");
            text.push_str(&format!(": {} error(s)", errors.len()));
            for d in errors {
                text.push_str("\n  ");
                text.push_str(&d.render(file));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Pos;

    #[test]
    fn messages_name_the_file_workflow_and_every_error_position() {
        let error = RecipeError::new(RecipeErrorKind::Invalid)
            .with_path("r.yaml")
            .with_diagnostics(vec![
                Diagnostic::error(Pos::new(3, 5), "unknown hook `x`"),
                Diagnostic::warning(Pos::new(4, 1), "ignored"),
            ]);
        assert_eq!(
            error.to_string(),
            "recipe r.yaml is invalid: 1 error(s)\n  r.yaml:3:5: error: unknown hook `x`"
        );
        let error = RecipeError::new(RecipeErrorKind::Annotation)
            .with_annotation("pre.hook.backup.velero.io/timeout")
            .with_message("\"soon\" is not a duration such as 30s or 1m30s");
        assert!(
            error
                .to_string()
                .starts_with("annotation pre.hook.backup.velero.io/timeout is invalid: ")
        );
    }
}
