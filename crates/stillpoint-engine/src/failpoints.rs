//! Named fault-injection points in the backup path, for tests that kill or fail a backup at
//! an exact step (docs/testing.md lists the points and how tests use them).
//!
//! They are [fail-rs](https://docs.rs/fail) fail points, compiled in only with the
//! `failpoints` feature (the CLI's `vm-tests` feature turns it on; a normal build has none of
//! this code) and configured at run time by the `FAILPOINTS` environment variable, e.g.
//! `FAILPOINTS='backup::after-freeze=pause'`. fail-rs is used rather than ad-hoc environment
//! checks because it already parses actions (`pause`, `sleep(ms)`, `return`, counts and
//! probabilities) and wakes paused points when they are reconfigured.
//!
//! Two things are added on top of fail-rs:
//! - A configured point logs `failpoint NAME reached` (at warn level, so it shows without
//!   `-v`) before it acts: a test reading stderr knows the backup stands exactly there.
//! - A point blocks its thread (`pause`, `sleep`); on a multi-thread runtime it does so with
//!   `block_in_place`, so the rest of the process (the agent and monitor connections, a
//!   signal handler that releases the point) keeps running.

use crate::error::Result;

/// In the frozen window: after the guarded freeze returned, before the capture starts.
pub const AFTER_FREEZE: &str = "backup::after-freeze";
/// Just before the capture start (after the freeze and `AFTER_FREEZE` when the level freezes):
/// `return` makes the start fail as a real one does (QEMU refusing the transaction) — the
/// capture is released, the guest thawed, a recipe's inverse ops run, nothing is published.
pub const CAPTURE_START: &str = "backup::capture-start";
/// Before each disk's copy into the repository (after the export, so the capture is
/// started, its bitmaps rotated and its NBD export open).
pub const DURING_COPY: &str = "backup::during-copy";

/// Every point, for documentation and tests.
pub const ALL: [&str; 4] = [
    AFTER_FREEZE,
    CAPTURE_START,
    DURING_COPY,
    crate::restore::FAILPOINT_DISK_STAGED,
];

/// A point that may delay (`pause`, `sleep`) but not fail: where an early return would skip
/// a step that must run (the thaw after a freeze). `return` is ignored here, with a warning.
pub(crate) fn delay(name: &'static str) {
    #[cfg(feature = "failpoints")]
    if evaluate(name).is_some() {
        tracing::warn!("failpoint {name} cannot return an error; `return` is ignored here");
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// A point that may delay, or fail the step with an injected error (`return`, `return(text)`).
pub(crate) fn check(name: &'static str) -> Result<()> {
    #[cfg(feature = "failpoints")]
    if let Some(text) = evaluate(name) {
        return Err(crate::error::EngineError::new(
            crate::error::EngineErrorKind::Injected,
            format!(
                "fault injected at failpoint {name}{}",
                text.map(|t| format!(": {t}")).unwrap_or_default()
            ),
        ));
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
    Ok(())
}

/// Runs the point: `Some(argument)` when it is configured to `return`.
#[cfg(feature = "failpoints")]
fn evaluate(name: &'static str) -> Option<Option<String>> {
    if !fail::list()
        .iter()
        .any(|(configured, _)| configured == name)
    {
        return None;
    }
    tracing::warn!("failpoint {name} reached");
    let run = || fail::eval(name, |argument| argument);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    // One test touches the process-wide fail point registry, so nothing runs beside it.
    #[test]
    fn unconfigured_points_pass_and_return_becomes_an_injected_error() {
        let scenario = fail::FailScenario::setup();
        assert!(check(DURING_COPY).is_ok());
        delay(AFTER_FREEZE);

        fail::cfg(DURING_COPY, "return(disk full)").unwrap();
        let error = check(DURING_COPY).unwrap_err();
        assert_eq!(error.kind(), crate::error::EngineErrorKind::Injected);
        assert_eq!(
            error.to_string(),
            "fault injected at failpoint backup::during-copy: disk full"
        );

        fail::cfg(DURING_COPY, "1*return->off").unwrap();
        assert!(check(DURING_COPY).is_err());
        assert!(check(DURING_COPY).is_ok(), "the count is used up");

        // `return` cannot skip the thaw: the delay-only point ignores it.
        fail::cfg(AFTER_FREEZE, "return").unwrap();
        delay(AFTER_FREEZE);

        // The capture start fails with the injected error as its cause.
        assert!(check(CAPTURE_START).is_ok());
        fail::cfg(CAPTURE_START, "return").unwrap();
        assert_eq!(
            check(CAPTURE_START).unwrap_err().to_string(),
            "fault injected at failpoint backup::capture-start"
        );

        scenario.teardown();
    }
}
