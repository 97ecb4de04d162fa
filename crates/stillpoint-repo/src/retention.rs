//! Retention: which snapshots to keep. A pure function of (snapshots, rules, now) returning a
//! plan; `prune` carries the plan out. Rules apply per VM.
//!
//! Semantics (as restic's `forget`): snapshots of a VM are walked newest first; `last N` keeps
//! the N newest; `daily N` keeps the newest snapshot of each of the N most recent days that
//! have snapshots, and likewise `weekly` (ISO weeks) and `monthly`. Days are UTC days.
//! A snapshot is kept if any rule keeps it; snapshots dated after `now` are always kept.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};

/// Retention rules; at least one must be set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeepRules {
    /// Keep the N newest snapshots.
    pub last: u32,
    /// Keep the newest snapshot of each of the last N days with snapshots.
    pub daily: u32,
    /// Same per ISO week.
    pub weekly: u32,
    /// Same per calendar month.
    pub monthly: u32,
}

/// What retention looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Snapshot id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Capture time.
    pub time: DateTime<Utc>,
}

/// The decision for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Snapshot id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Capture time.
    pub time: DateTime<Utc>,
    /// Whether it is kept.
    pub keep: bool,
    /// Why it is kept (`last`, `daily`, …); empty when it goes.
    pub reasons: Vec<String>,
}

/// The plan: one decision per snapshot, grouped by VM, newest first within a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    /// The decisions.
    pub decisions: Vec<Decision>,
}

impl RetentionPlan {
    /// Ids to delete.
    pub fn to_delete(&self) -> Vec<&str> {
        self.decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }
}

/// Computes the retention plan.
pub fn plan_retention(
    snapshots: &[SnapshotSummary],
    rules: &KeepRules,
    now: DateTime<Utc>,
) -> Result<RetentionPlan> {
    if *rules == KeepRules::default() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "no retention rule given (--keep-last, --keep-daily, --keep-weekly or --keep-monthly): refusing to delete every snapshot",
        ));
    }
    let mut by_vm: BTreeMap<&str, Vec<&SnapshotSummary>> = BTreeMap::new();
    for s in snapshots {
        by_vm.entry(&s.vm).or_default().push(s);
    }
    let mut decisions = Vec::new();
    for (_, mut group) in by_vm {
        group.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
        let mut left = [rules.last, rules.daily, rules.weekly, rules.monthly];
        let mut last_bucket: [Option<(i32, u32, u32)>; 4] = [None; 4];
        for (n, s) in group.iter().enumerate() {
            let mut reasons = Vec::new();
            if s.time > now {
                reasons.push("newer than now".to_string());
            }
            let t = s.time;
            let week = t.iso_week();
            let buckets = [
                (0, 0, n as u32), // every snapshot is its own bucket for `last`
                (t.year(), t.month(), t.day()),
                (week.year(), week.week(), 0),
                (t.year(), t.month(), 0),
            ];
            for (rule, name) in ["last", "daily", "weekly", "monthly"].iter().enumerate() {
                if left[rule] > 0 && last_bucket[rule] != Some(buckets[rule]) {
                    left[rule] -= 1;
                    last_bucket[rule] = Some(buckets[rule]);
                    reasons.push((*name).to_string());
                }
            }
            decisions.push(Decision {
                id: s.id.clone(),
                vm: s.vm.clone(),
                time: s.time,
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    Ok(RetentionPlan { decisions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rstest::rstest;

    fn snap(vm: &str, y: i32, m: u32, d: u32, h: u32) -> SnapshotSummary {
        let time = Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        SnapshotSummary {
            id: format!("{vm}-{y}{m:02}{d:02}{h:02}"),
            vm: vm.into(),
            time,
        }
    }

    /// Two snapshots a day (06:00 and 18:00) from 2026-01-01 to 2026-03-31 for vm `a`,
    /// and three for vm `b`.
    fn history() -> Vec<SnapshotSummary> {
        let mut out = Vec::new();
        let mut day = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        while day.month() <= 3 && day.year() == 2026 {
            out.push(snap("a", day.year(), day.month(), day.day(), 6));
            out.push(snap("a", day.year(), day.month(), day.day(), 18));
            day += chrono::Duration::days(1);
        }
        out.push(snap("b", 2026, 3, 1, 1));
        out.push(snap("b", 2026, 3, 2, 1));
        out.push(snap("b", 2026, 3, 2, 2));
        out
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()
    }

    fn kept(plan: &RetentionPlan, vm: &str) -> Vec<String> {
        plan.decisions
            .iter()
            .filter(|d| d.keep && d.vm == vm)
            .map(|d| d.id.clone())
            .collect()
    }

    #[rstest]
    #[case::last_3(KeepRules { last: 3, ..Default::default() }, vec!["a-2026033118", "a-2026033106", "a-2026033018"])]
    #[case::daily_2(KeepRules { daily: 2, ..Default::default() }, vec!["a-2026033118", "a-2026033018"])]
    #[case::weekly_2(KeepRules { weekly: 2, ..Default::default() }, vec!["a-2026033118", "a-2026032918"])]
    #[case::monthly_3(KeepRules { monthly: 3, ..Default::default() }, vec!["a-2026033118", "a-2026022818", "a-2026013118"])]
    #[case::monthly_5_keeps_only_what_exists(KeepRules { monthly: 5, ..Default::default() }, vec!["a-2026033118", "a-2026022818", "a-2026013118"])]
    #[case::last_1_daily_2_overlap(KeepRules { last: 1, daily: 2, ..Default::default() }, vec!["a-2026033118", "a-2026033018"])]
    fn rules_keep_the_expected_snapshots(#[case] rules: KeepRules, #[case] expected: Vec<&str>) {
        let plan = plan_retention(&history(), &rules, now()).unwrap();
        assert_eq!(kept(&plan, "a"), expected);
        assert_eq!(
            plan.decisions.len(),
            history().len(),
            "one decision per snapshot"
        );
    }

    #[test]
    fn rules_apply_per_vm() {
        let plan = plan_retention(
            &history(),
            &KeepRules {
                daily: 1,
                ..Default::default()
            },
            now(),
        )
        .unwrap();
        assert_eq!(kept(&plan, "b"), vec!["b-2026030202"]);
        assert_eq!(kept(&plan, "a"), vec!["a-2026033118"]);
    }

    #[test]
    fn future_snapshots_are_kept_and_reasons_are_given() {
        let mut snaps = history();
        snaps.push(snap("a", 2027, 1, 1, 0));
        let plan = plan_retention(
            &snaps,
            &KeepRules {
                last: 1,
                ..Default::default()
            },
            now(),
        )
        .unwrap();
        let future = plan
            .decisions
            .iter()
            .find(|d| d.id == "a-2027010100")
            .unwrap();
        assert!(future.keep);
        assert_eq!(future.reasons, vec!["newer than now", "last"]);
        assert_eq!(kept(&plan, "a"), vec!["a-2027010100"]);
    }

    #[test]
    fn no_rules_is_an_error() {
        let err = plan_retention(&history(), &KeepRules::default(), now()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
