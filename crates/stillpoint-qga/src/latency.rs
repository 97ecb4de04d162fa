//! Freeze/thaw latency measurement, reused by `stillpoint bench freeze`.
//!
//! The durations are host-side round trips of one agent command each (request written to
//! reply read), which is what a backup pays while the guest is frozen.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::warn;

use crate::client::Client;
use crate::error::Result;

/// One freeze followed by one thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeThawRound {
    /// Filesystems the freeze reported.
    pub frozen: u32,
    /// Round trip of `guest-fsfreeze-freeze`.
    pub freeze: Duration,
    /// Round trip of `guest-fsfreeze-thaw`.
    pub thaw: Duration,
}

/// Median and extremes of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: usize,
    /// Smallest sample.
    pub min: Duration,
    /// Median (mean of the two middle samples for an even count).
    pub median: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl LatencySummary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let count = sorted.len();
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let median = if count % 2 == 1 {
            sorted[count / 2]
        } else {
            (sorted[count / 2 - 1] + sorted[count / 2]) / 2
        };
        Some(Self {
            count,
            min,
            median,
            max,
        })
    }
}

/// Freezes and thaws the guest `rounds` times and times each call.
pub async fn measure_freeze_thaw<S>(
    client: &mut Client<S>,
    rounds: usize,
) -> Result<Vec<FreezeThawRound>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut measured = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        measured.push(measure_freeze_thaw_round(client).await?);
    }
    Ok(measured)
}

/// One timed freeze followed by one timed thaw (callers that prepare each round, e.g. dirty
/// the guest's page cache first, loop over this).
///
/// If the freeze fails, a thaw is still sent (the agent thaws on a failed freeze, but a freeze
/// that timed out may still complete) and the freeze's error is returned.
pub async fn measure_freeze_thaw_round<S>(client: &mut Client<S>) -> Result<FreezeThawRound>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let frozen = match client.fsfreeze_freeze().await {
        Ok(n) => n,
        Err(e) => {
            if let Err(thaw_error) = client.fsfreeze_thaw().await {
                warn!(error = %thaw_error, "thaw after a failed freeze also failed");
            }
            return Err(e);
        }
    };
    let freeze = started.elapsed();
    let started = Instant::now();
    client.fsfreeze_thaw().await?;
    let thaw = started.elapsed();
    Ok(FreezeThawRound {
        frozen,
        freeze,
        thaw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn summary_of_odd_and_even_counts() {
        let odd = LatencySummary::of(&[ms(5), ms(1), ms(3)]).unwrap();
        assert_eq!((odd.min, odd.median, odd.max), (ms(1), ms(3), ms(5)));
        let even = LatencySummary::of(&[ms(4), ms(1), ms(2), ms(10)]).unwrap();
        assert_eq!((even.median, even.max, even.count), (ms(3), ms(10), 4));
        assert_eq!(LatencySummary::of(&[]), None);
    }
}
