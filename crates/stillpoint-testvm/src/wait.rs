//! Polling for a condition with a deadline (tests never assert on time; they wait for state).

use std::time::Duration;

/// How often conditions are re-checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Re-checks `condition` every [`POLL_INTERVAL`] until it holds (`true`) or `timeout` passes
/// (`false`). The condition is always checked at least once, and once more at the deadline.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn true_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let held = wait_until(Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await;
        assert!(held);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn false_when_it_never_holds_and_checked_at_the_deadline() {
        let calls = AtomicU32::new(0);
        let held = wait_until(Duration::from_millis(120), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            false
        })
        .await;
        assert!(!held);
        // at 0, 50, 100 and the deadline 120 ms (virtual time)
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
