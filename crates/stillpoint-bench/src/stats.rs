//! The small statistics every harness reports: median / max in milliseconds.

use std::time::Duration;

use serde::Serialize;
use stillpoint_qga::LatencySummary;

/// Median and max of one measured quantity, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Stat {
    /// Of `samples`; NaN when there are none.
    pub fn of(samples: &[Duration]) -> Self {
        match LatencySummary::of(samples) {
            Some(summary) => Self {
                median_ms: ms(summary.median),
                max_ms: ms(summary.max),
            },
            None => Self {
                median_ms: f64::NAN,
                max_ms: f64::NAN,
            },
        }
    }

    /// Of values already in milliseconds (negative ones count as zero).
    pub fn of_ms(values: impl Iterator<Item = f64>) -> Self {
        let samples: Vec<Duration> = values
            .map(|v| Duration::from_secs_f64(v.max(0.0) / 1000.0))
            .collect();
        Self::of(&samples)
    }
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The median of `values`; NaN when there are none.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }
}
