//! Fault injection for tests (`failpoints` feature only; docs/testing.md): configures the
//! engine's fail points from the `FAILPOINTS` environment variable, and turns every point off
//! on SIGUSR1, which releases a point that is paused — so a test can hold a backup at an exact
//! step for as long as it needs, without guessing a sleep, and then let it go on.

use tokio::signal::unix::{SignalKind, signal};

/// Configures the points; they stay configured while the returned scenario lives.
pub fn setup(runtime: &tokio::runtime::Runtime) -> fail::FailScenario<'static> {
    let scenario = fail::FailScenario::setup();
    // Registered now, before any point can be reached, so no SIGUSR1 is missed.
    let _context = runtime.enter();
    match signal(SignalKind::user_defined1()) {
        Ok(mut release) => {
            runtime.spawn(async move {
                while release.recv().await.is_some() {
                    for (name, _) in fail::list() {
                        if let Err(error) = fail::cfg(name.as_str(), "off") {
                            tracing::warn!("cannot turn failpoint {name} off: {error}");
                        }
                    }
                    tracing::warn!("SIGUSR1: every failpoint is off");
                }
            });
        }
        Err(error) => tracing::warn!("cannot listen for SIGUSR1 to release failpoints: {error}"),
    }
    scenario
}
