//! Go duration strings (`30s`, `1m30s`, `1.5h`, `500ms`) as Velero's annotations write them.
//!
//! Hand-written because the common Rust duration parser (`humantime`) reads a different
//! grammar (no fractions such as `1.5h`, extra units such as `days`), and Velero's values must
//! mean exactly what Go's `time.ParseDuration` makes of them.

use std::time::Duration;

/// Parses a non-negative Go duration. `None` when it is not one.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// For a recipe timeout written as a duration string (`"30s"`), the whole seconds to write
/// instead, for the error message's hint.
pub fn suggest_seconds(text: &str) -> Option<u64> {
    let duration = parse_go_duration(text)
        .or_else(|| text.trim().parse::<u64>().ok().map(Duration::from_secs))?;
    let secs = duration.as_secs_f64().ceil();
    (secs >= 1.0).then_some(secs as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_time_parse_duration() {
        assert_eq!(parse_go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "30", "s", "1x", "-5s", "1..5s", "1e999h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hints_round_up_to_whole_seconds() {
        assert_eq!(suggest_seconds("30s"), Some(30));
        assert_eq!(suggest_seconds("2m"), Some(120));
        assert_eq!(suggest_seconds("1500ms"), Some(2));
        assert_eq!(suggest_seconds("45"), Some(45));
        assert_eq!(suggest_seconds("soon"), None);
    }
}
