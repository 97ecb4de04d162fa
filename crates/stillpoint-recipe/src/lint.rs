//! The lint: locks that do not hold. Rules over the parsed model that find ops which take a
//! lock scoped to their own session (or freeze a filesystem) in a one-shot command, so the
//! lock is gone — or the freeze is outside stillpoint's control — when the capture comes.
//!
//! A non-`background` op runs to completion before the next step starts. Every database
//! session it opened has ended by then, and with the session every lock it took:
//! `mysql -e 'FLUSH TABLES WITH READ LOCK'` releases the lock as the client exits, before the
//! snapshot. The fix is the held-session form: a `background: true` op whose session waits
//! (on a FIFO) while the capture runs, and a later op that `ends` it
//! (`examples/recipes/mysql-vm.yaml`, `postgresql-vm.yaml`).
//!
//! Each rule is a pure function of one op (and, for the freeze, the recipe's other ops) and
//! returns a [`Finding`]: the rule, the op, its position and what to write instead. Matching is
//! on the op's whole command text — every argv element and the op's `stdin`, lower-cased with
//! runs of whitespace folded — so an argv array, a `sh -c` script, `mysql -e` /
//! `--execute=`, `psql -c` / `--command=`, a heredoc or SQL fed on stdin are all seen the same
//! way. The rules are documented for users in `docs/recipes.md` ("Lint: locks that do not hold").

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

use crate::diagnostic::{Diagnostic, Pos, sort_diagnostics};
use crate::model::{Hook, HookType, Op, Recipe, Target};

/// What a finding is about; its [`id`](LintRule::id) is what users see and search the docs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LintRule {
    /// MySQL/MariaDB: a session-scoped lock (FLUSH TABLES WITH READ LOCK, LOCK TABLES,
    /// LOCK INSTANCE FOR BACKUP, BACKUP STAGE) taken by a one-shot client.
    SessionLockNotHeld,
    /// PostgreSQL: a non-exclusive backup (`pg_backup_start`, `pg_start_backup(…, false)`)
    /// started by a one-shot client; it is aborted when the session ends.
    BackupSessionNotHeld,
    /// `fsfreeze -f` / `xfs_freeze -f` in the guest by a one-shot op that does not thaw.
    FilesystemFrozenByRecipe,
}

impl LintRule {
    pub const ALL: [LintRule; 3] = [
        LintRule::SessionLockNotHeld,
        LintRule::BackupSessionNotHeld,
        LintRule::FilesystemFrozenByRecipe,
    ];

    pub fn id(self) -> &'static str {
        match self {
            LintRule::SessionLockNotHeld => "session-lock-not-held",
            LintRule::BackupSessionNotHeld => "backup-session-not-held",
            LintRule::FilesystemFrozenByRecipe => "filesystem-frozen-by-recipe",
        }
    }
}

impl std::fmt::Display for LintRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// One op a rule flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: LintRule,
    /// `hook/op`.
    pub op: String,
    /// The op's `command` (the op itself when it has none).
    pub pos: Pos,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl Finding {
    /// The finding as a warning, its rule id at the end: `… [session-lock-not-held]`.
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic::warning(self.pos, format!("{} [{}]", self.message, self.rule))
    }
}

/// Every finding of every rule, sorted by position.
pub fn lint(recipe: &Recipe) -> Vec<Finding> {
    let mut findings = Vec::new();
    for hook in recipe
        .hooks
        .iter()
        .filter(|h| h.hook_type.value == HookType::Exec)
    {
        for op in &hook.ops {
            let text = command_text(op);
            findings.extend(session_lock_not_held(hook, op, &text));
            findings.extend(backup_session_not_held(hook, op, &text));
            findings.extend(filesystem_frozen_by_recipe(recipe, hook, op, &text));
        }
    }
    findings.sort_by(|a, b| (a.pos, a.rule, &a.op).cmp(&(b.pos, b.rule, &b.op)));
    findings
}

/// [`lint`] as warnings, for `recipe validate`.
pub fn lint_diagnostics(recipe: &Recipe) -> Vec<Diagnostic> {
    let mut diagnostics: Vec<Diagnostic> = lint(recipe).iter().map(Finding::diagnostic).collect();
    sort_diagnostics(&mut diagnostics);
    diagnostics
}

/// Everything an op hands its command — argv elements and stdin — lower-cased, with every run
/// of whitespace (newlines of a heredoc or of a folded YAML scalar) folded to one space.
fn command_text(op: &Op) -> String {
    let argv = op.command.iter().flat_map(|c| c.value.argv.iter());
    let parts: Vec<&str> = argv
        .map(String::as_str)
        .chain(op.stdin.as_deref())
        .collect();
    parts
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn op_id(hook: &Hook, op: &Op) -> String {
    format!("{}/{}", hook.name.value, op.name.value)
}

fn op_pos(op: &Op) -> Pos {
    op.command.as_ref().map_or(op.pos, |c| c.pos)
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("the lint's patterns are valid regular expressions")
}

/// A lock statement, the statement that releases it, and how to name it in a message.
struct SessionLock {
    take: Regex,
    release: Regex,
    name: &'static str,
}

static MYSQL_LOCKS: LazyLock<[SessionLock; 4]> = LazyLock::new(|| {
    let unlock_tables = r"\bunlock\s+tables?\b";
    [
        SessionLock {
            // FLUSH [LOCAL|NO_WRITE_TO_BINLOG] TABLES [t1, t2] WITH READ LOCK | FOR EXPORT
            take: regex(
                r"\bflush\s+(?:(?:local|no_write_to_binlog)\s+)?tables?\b[^;]*?\b(?:with\s+read\s+lock|for\s+export)\b",
            ),
            release: regex(unlock_tables),
            name: "FLUSH TABLES WITH READ LOCK",
        },
        SessionLock {
            take: regex(r"(?:^|[^a-z_])lock\s+tables?\s"),
            release: regex(unlock_tables),
            name: "LOCK TABLES",
        },
        SessionLock {
            take: regex(r"(?:^|[^a-z_])lock\s+instance\s+for\s+backup\b"),
            release: regex(r"\bunlock\s+instance\b"),
            name: "LOCK INSTANCE FOR BACKUP",
        },
        SessionLock {
            take: regex(r"\bbackup\s+stage\s+(?:start|flush|block_ddl|block_commit)\b"),
            release: regex(r"\bbackup\s+stage\s+end\b"),
            name: "BACKUP STAGE",
        },
    ]
});

/// The first lock of `locks` that `text` takes and does not release after taking it.
fn unreleased<'l>(locks: &'l [SessionLock], text: &str) -> Option<&'l SessionLock> {
    locks.iter().find(|lock| {
        lock.take.find(text).is_some_and(|taken| {
            !lock
                .release
                .find_iter(text)
                .any(|released| released.start() >= taken.end())
        })
    })
}

/// Rule `session-lock-not-held`: a non-background op takes a MySQL/MariaDB lock that lives as
/// long as its client session and does not release it itself (an op that takes the lock, does
/// its own work and unlocks within one session holds it for exactly what it does).
pub fn session_lock_not_held(hook: &Hook, op: &Op, text: &str) -> Option<Finding> {
    if op.background {
        return None;
    }
    let lock = unreleased(&MYSQL_LOCKS[..], text)?;
    Some(Finding {
        rule: LintRule::SessionLockNotHeld,
        op: op_id(hook, op),
        pos: op_pos(op),
        message: format!(
            "op `{}` takes {} in a one-shot client session: the lock ends with the session, when the command exits — before the capture. Hold it in a `background: true` op whose session waits, e.g. `{{ echo '{};'; read x < /run/lock.fifo; echo 'UNLOCK {};'; }} | mysql`, and release it with a later op that `ends` it (examples/recipes/mysql-vm.yaml)",
            op_id(hook, op),
            lock.name,
            lock.name,
            if lock.name == "LOCK INSTANCE FOR BACKUP" {
                "INSTANCE"
            } else {
                "TABLES"
            }
        ),
    })
}

static PG_BACKUP_START: LazyLock<Regex> = LazyLock::new(|| regex(r"\bpg_backup_start\s*\("));
static PG_BACKUP_STOP: LazyLock<Regex> = LazyLock::new(|| regex(r"\bpg_backup_stop\s*\("));
static PG_START_BACKUP: LazyLock<Regex> = LazyLock::new(|| regex(r"\bpg_start_backup\s*\("));
static PG_STOP_BACKUP: LazyLock<Regex> = LazyLock::new(|| regex(r"\bpg_stop_backup\s*\("));

/// The top-level, comma-separated arguments of the call whose `(` ends at `open_end`.
fn call_arguments(text: &str, open_end: usize) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for c in text[open_end..].chars() {
        match (quote, c) {
            (Some(q), _) if c == q => {
                quote = None;
                current.push(c);
            }
            (Some(_), _) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (None, '(') => {
                depth += 1;
                current.push(c);
            }
            (None, ')') if depth == 0 => break,
            (None, ')') => {
                depth -= 1;
                current.push(c);
            }
            (None, ',') if depth == 0 => arguments.push(std::mem::take(&mut current)),
            (None, _) => current.push(c),
        }
    }
    arguments.push(current);
    arguments.into_iter().map(|a| a.trim().to_owned()).collect()
}

/// Whether a `pg_start_backup(label, fast, exclusive)` call asks for a non-exclusive backup:
/// `exclusive` (third, or named `exclusive => …`) false. Its default, true, is the exclusive
/// backup of PostgreSQL 9.x–14, which outlives the session (and was removed in 15).
fn non_exclusive(arguments: &[String]) -> bool {
    let named = arguments.iter().find_map(|a| {
        let rest = a.strip_prefix("exclusive")?.trim_start();
        let rest = rest
            .strip_prefix("=>")
            .or_else(|| rest.strip_prefix(":="))?;
        Some(rest.trim())
    });
    let value = named.or_else(|| arguments.get(2).map(String::as_str));
    value.is_some_and(|v| {
        let v = v.trim_matches(|c| c == '\'' || c == '"');
        ["false", "f", "off", "no", "n", "0"].contains(&v)
    })
}

/// Rule `backup-session-not-held`: a non-background op starts a non-exclusive PostgreSQL
/// backup and does not stop it itself. A non-exclusive backup belongs to its session:
/// PostgreSQL aborts it when the session ends, so nothing is in progress at the capture.
pub fn backup_session_not_held(hook: &Hook, op: &Op, text: &str) -> Option<Finding> {
    if op.background {
        return None;
    }
    let stopped_after = |stop: &Regex, at: usize| stop.find_iter(text).any(|m| m.start() >= at);
    let started = PG_BACKUP_START
        .find(text)
        .filter(|m| !stopped_after(&PG_BACKUP_STOP, m.end()))
        .map(|_| "pg_backup_start()")
        .or_else(|| {
            PG_START_BACKUP
                .find_iter(text)
                .find(|m| {
                    non_exclusive(&call_arguments(text, m.end()))
                        && !stopped_after(&PG_STOP_BACKUP, m.end())
                })
                .map(|_| "pg_start_backup(…, exclusive => false)")
        })?;
    Some(Finding {
        rule: LintRule::BackupSessionNotHeld,
        op: op_id(hook, op),
        pos: op_pos(op),
        message: format!(
            "op `{}` calls {started} in a one-shot client session: a non-exclusive backup is aborted when its session ends, when the command exits — before the capture. Start it in a `background: true` op whose session waits, e.g. `{{ echo \"SELECT pg_backup_start('stillpoint', true);\"; read x < /run/backup.fifo; echo 'SELECT * FROM pg_backup_stop(true);'; }} | psql -X`, and stop it with a later op that `ends` it (examples/recipes/postgresql-vm.yaml)",
            op_id(hook, op),
        ),
    })
}

/// `fsfreeze` or `xfs_freeze` and the words after it up to the end of its shell command.
static FREEZE_COMMAND: LazyLock<Regex> =
    LazyLock::new(|| regex(r"\b(?:fsfreeze|xfs_freeze)((?:\s+[^\s;&|()<>]+)*)"));

/// The guest freezes a host can ask for: libvirt's `virsh domfsfreeze` / `domfsthaw`, and the
/// agent's own commands sent with `virsh qemu-agent-command` (or any other agent client).
static AGENT_FREEZE_COMMAND: LazyLock<Regex> =
    LazyLock::new(|| regex(r"\b(?:domfs(freeze|thaw)\b|guest-fsfreeze-(freeze|thaw)(?:-list)?\b)"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreezeAction {
    Freeze,
    Thaw,
}

/// What an op's command does to the guest's filesystems, in order: `fsfreeze -f|-u` when it
/// runs in the guest (on the host it would freeze a host filesystem), and the agent's freeze
/// and thaw wherever it runs.
fn freeze_actions(target: Target, text: &str) -> Vec<FreezeAction> {
    let action = |word: &str| match word {
        "-f" | "--freeze" | "freeze" => Some(FreezeAction::Freeze),
        "-u" | "--unfreeze" | "thaw" => Some(FreezeAction::Thaw),
        _ => None,
    };
    let mut actions: Vec<(usize, FreezeAction)> = Vec::new();
    if target == Target::Guest {
        actions.extend(FREEZE_COMMAND.captures_iter(text).filter_map(|c| {
            let words = c.get(1).map_or("", |m| m.as_str());
            let found = words.split_whitespace().find_map(action)?;
            Some((c.get(0)?.start(), found))
        }));
    }
    actions.extend(AGENT_FREEZE_COMMAND.captures_iter(text).filter_map(|c| {
        let word = c.get(1).or_else(|| c.get(2))?;
        Some((c.get(0)?.start(), action(word.as_str())?))
    }));
    actions.sort_by_key(|(at, _)| *at);
    actions.into_iter().map(|(_, a)| a).collect()
}

/// Rule `filesystem-frozen-by-recipe`: a non-background guest op freezes a filesystem and
/// leaves it frozen when it exits (its last `fsfreeze` freezes). stillpoint freezes every guest
/// filesystem itself, through the guest agent, around the capture — with a guardian that thaws
/// if stillpoint dies; a freeze of the recipe's own is outside all of that: the agent finds the
/// filesystem already frozen, its thaw after the capture thaws it early, and a workflow that
/// stops between the freeze op and the thaw op leaves the guest frozen. A host op's `fsfreeze`
/// is not checked (a host filesystem is not the guest's); its `virsh domfsfreeze` or
/// `guest-fsfreeze-freeze` freezes the guest and is.
pub fn filesystem_frozen_by_recipe(
    recipe: &Recipe,
    hook: &Hook,
    op: &Op,
    text: &str,
) -> Option<Finding> {
    if op.background {
        return None;
    }
    if freeze_actions(hook.target.value, text).last() != Some(&FreezeAction::Freeze) {
        return None;
    }
    let thawed_by: Vec<String> = recipe
        .hooks
        .iter()
        .flat_map(|h| h.ops.iter().map(move |o| (h, o)))
        .filter(|(_, o)| !std::ptr::eq(*o, op))
        .filter(|(h, o)| {
            freeze_actions(h.target.value, &command_text(o)).contains(&FreezeAction::Thaw)
        })
        .map(|(h, o)| format!("`{}`", op_id(h, o)))
        .collect();
    let thaw = if thawed_by.is_empty() {
        "and no op thaws it".to_owned()
    } else {
        format!("and thaws it only in {}", thawed_by.join(", "))
    };
    Some(Finding {
        rule: LintRule::FilesystemFrozenByRecipe,
        op: op_id(hook, op),
        pos: op_pos(op),
        message: format!(
            "op `{}` freezes a guest filesystem {thaw}: stillpoint freezes every guest filesystem itself, through the guest agent, around the capture (with a guardian that thaws if stillpoint dies); a freeze of the recipe's own outlives the op, is thawed early by the capture's thaw, and stays if the workflow stops before the thaw op. Remove the freeze and thaw ops and back up with --consistency filesystem or application; to run something at the freeze itself, use the agent's fsfreeze hook scripts",
            op_id(hook, op)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_recipe;

    /// A valid recipe whose hook `db` (on `target`) has the given ops (YAML, indented for the
    /// `ops:` list), run before the capture.
    fn recipe(target: &str, ops: &str) -> Recipe {
        let source = format!(
            "apiVersion: ramendr.openshift.io/v1alpha1\nkind: Recipe\nmetadata:\n  name: t\nspec:\n  groups:\n  - name: disks\n    type: volume\n  hooks:\n  - name: db\n    type: exec\n    target: {target}\n    ops:\n{ops}\n  workflows:\n  - name: backup\n    sequence:\n    - hook: db/first\n    - group: disks\n"
        );
        let parsed = parse_recipe(&source);
        let errors: Vec<_> = parsed
            .diagnostics
            .iter()
            .filter(|d| d.severity == crate::Severity::Error)
            .collect();
        assert!(errors.is_empty(), "{source}\n{errors:#?}");
        parsed.recipe.expect("the test recipe parses")
    }

    /// The rules found for a guest hook `db` whose single op `first` has this command.
    fn rules(command: &str) -> Vec<LintRule> {
        rules_of(&recipe(
            "guest",
            &format!("    - name: first\n      command: {command}"),
        ))
    }

    fn rules_of(recipe: &Recipe) -> Vec<LintRule> {
        lint(recipe).into_iter().map(|f| f.rule).collect()
    }

    const LOCK: &[LintRule] = &[LintRule::SessionLockNotHeld];
    const BACKUP: &[LintRule] = &[LintRule::BackupSessionNotHeld];
    const FREEZE: &[LintRule] = &[LintRule::FilesystemFrozenByRecipe];

    #[test]
    fn a_one_shot_flush_tables_with_read_lock_is_flagged_however_it_is_written() {
        for command in [
            // Fusion's own sample: a shell string through bash -c.
            r#"'["/bin/bash", "-c", "mysql -uroot -e \"FLUSH TABLES WITH READ LOCK\""]'"#,
            "[mysql, -e, 'flush tables with read lock']",
            "\"mysql --execute='Flush  Tables   With Read Lock;'\"",
            "[mysql, --execute, 'FLUSH TABLES WITH READ LOCK']",
            "[mariadb, -e, 'FLUSH LOCAL TABLES db.t1, db.t2 WITH READ LOCK']",
            "[mysql, -e, 'FLUSH TABLES t1 FOR EXPORT']",
            "[mysql, -e, 'LOCK TABLES t1 READ, t2 READ']",
            "[mysql, -e, 'LOCK INSTANCE FOR BACKUP']",
            "[mariadb, -e, 'BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT']",
            // A heredoc in a shell script: the SQL spans lines.
            "[/bin/sh, -c, \"mysql <<'EOF'\\nFLUSH TABLES\\n  WITH READ LOCK;\\nEOF\"]",
        ] {
            assert_eq!(rules(command), LOCK, "{command}");
        }
    }

    #[test]
    fn sql_on_the_ops_stdin_is_matched_too() {
        let recipe = recipe(
            "guest",
            "    - name: first\n      command: [mysql]\n      stdin: \"FLUSH TABLES WITH READ LOCK;\\n\"",
        );
        assert_eq!(rules_of(&recipe), LOCK);
    }

    #[test]
    fn mysql_locks_that_are_released_or_held_are_not_flagged() {
        for command in [
            "[mysql, -e, 'UNLOCK TABLES']",
            "[mysql, -e, 'UNLOCK INSTANCE']",
            "[mysql, -e, 'BACKUP STAGE END']",
            "[mysql, -e, 'FLUSH TABLES']",
            "[mysqladmin, flush-tables]",
            // The lock is taken and released in one session, around the op's own work.
            "[mysql, -e, 'FLUSH TABLES WITH READ LOCK; system cp -a /var/lib/mysql /backup; UNLOCK TABLES']",
            "[mysql, -e, 'LOCK INSTANCE FOR BACKUP; system true; UNLOCK INSTANCE']",
        ] {
            assert_eq!(rules(command), &[] as &[LintRule], "{command}");
        }
    }

    #[test]
    fn a_background_op_holding_the_lock_is_not_flagged() {
        let recipe = recipe(
            "guest",
            "    - name: first\n      background: true\n      command: [/bin/sh, -c, \"{ echo 'FLUSH TABLES WITH READ LOCK;'; read x < /run/l.fifo; } | mysql\"]\n    - name: pg\n      background: true\n      command: [psql, -c, \"SELECT pg_backup_start('x')\"]\n    - name: freeze\n      background: true\n      command: [/bin/sh, -c, 'fsfreeze -f /data; read x < /run/f.fifo']",
        );
        assert_eq!(rules_of(&recipe), &[] as &[LintRule]);
    }

    #[test]
    fn a_one_shot_postgresql_backup_start_is_flagged() {
        for command in [
            "[psql, -c, \"SELECT pg_backup_start('stillpoint', true)\"]",
            "\"psql --command=\\\"select PG_BACKUP_START('x')\\\"\"",
            "[psql, -c, \"SELECT pg_start_backup('x', true, false)\"]",
            "[psql, -c, \"SELECT pg_start_backup(label => 'x', exclusive => false)\"]",
            "[/bin/sh, -c, \"psql <<EOF\\nSELECT pg_backup_start(\\n  'x');\\nEOF\"]",
        ] {
            assert_eq!(rules(command), BACKUP, "{command}");
        }
    }

    #[test]
    fn postgresql_backups_that_are_stopped_or_exclusive_are_not_flagged() {
        for command in [
            "[psql, -c, 'SELECT * FROM pg_backup_stop(true)']",
            "[psql, -c, \"SELECT pg_stop_backup(false)\"]",
            // Exclusive (PostgreSQL 9.x–14 default): not tied to the session.
            "[psql, -c, \"SELECT pg_start_backup('x')\"]",
            "[psql, -c, \"SELECT pg_start_backup('x, y', false, true)\"]",
            "[psql, -c, \"SELECT pg_backup_start('x'); SELECT pg_backup_stop()\"]",
            "[psql, -c, CHECKPOINT]",
        ] {
            assert_eq!(rules(command), &[] as &[LintRule], "{command}");
        }
    }

    #[test]
    fn a_guest_freeze_left_for_another_op_is_flagged_and_names_the_thawing_op() {
        let recipe = recipe(
            "guest",
            "    - name: first\n      command: [/sbin/fsfreeze, --freeze, /data]\n    - name: thaw\n      command: fsfreeze -u /data",
        );
        let findings = lint(&recipe);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].rule, LintRule::FilesystemFrozenByRecipe);
        assert_eq!(findings[0].op, "db/first");
        assert!(
            findings[0].message.contains("thaws it only in `db/thaw`"),
            "{}",
            findings[0].message
        );
        for command in [
            "fsfreeze -f /data",
            "[/bin/sh, -c, 'sync && xfs_freeze -f /var/lib/mysql']",
            "[fsfreeze, /data, --freeze]",
            // Thawed, then frozen again: the last action leaves it frozen.
            "[/bin/sh, -c, 'fsfreeze -u /data; fsfreeze -f /data']",
        ] {
            assert_eq!(rules(command), FREEZE, "{command}");
        }
    }

    #[test]
    fn freezes_that_are_thawed_in_the_op_on_the_host_or_only_thaws_are_not_flagged() {
        for command in [
            "fsfreeze -u /data",
            "[/bin/sh, -c, 'fsfreeze -f /data && cp -a /data/db /backup; fsfreeze -u /data']",
            "[fsfreeze, --help]",
        ] {
            assert_eq!(rules(command), &[] as &[LintRule], "{command}");
        }
        let host = recipe(
            "host",
            "    - name: first\n      command: [fsfreeze, -f, /srv/images]",
        );
        assert_eq!(rules_of(&host), &[] as &[LintRule]);
    }

    #[test]
    fn a_host_op_freezing_the_guest_through_libvirt_or_the_agent_is_flagged() {
        for command in [
            "[virsh, domfsfreeze, vm1]",
            "[virsh, domfsfreeze, vm1, --mountpoint, /data]",
            r#"[virsh, qemu-agent-command, vm1, '{"execute":"guest-fsfreeze-freeze"}']"#,
            r#"[virsh, qemu-agent-command, vm1, '{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/data"]}}']"#,
        ] {
            let host = recipe(
                "host",
                &format!("    - name: first\n      command: {command}"),
            );
            assert_eq!(rules_of(&host), FREEZE, "{command}");
        }
        for command in [
            "[virsh, domfsthaw, vm1]",
            r#"[virsh, qemu-agent-command, vm1, '{"execute":"guest-fsfreeze-status"}']"#,
            r#"[virsh, qemu-agent-command, vm1, '{"execute":"guest-fsfreeze-thaw"}']"#,
            "[/bin/sh, -c, 'virsh domfsfreeze vm1 && virsh snapshot-create-as vm1 s --disk-only; virsh domfsthaw vm1']",
        ] {
            let host = recipe(
                "host",
                &format!("    - name: first\n      command: {command}"),
            );
            assert_eq!(rules_of(&host), &[] as &[LintRule], "{command}");
        }
    }

    #[test]
    fn a_finding_is_a_warning_at_the_ops_command_with_its_rule_id() {
        let recipe = recipe(
            "guest",
            "    - name: first\n      command: [mysql, -e, 'FLUSH TABLES WITH READ LOCK']",
        );
        let diagnostics = lint_diagnostics(&recipe);
        assert_eq!(diagnostics.len(), 1);
        let d = &diagnostics[0];
        assert_eq!(d.severity, crate::Severity::Warning);
        assert_eq!(d.pos, Pos::new(15, 16), "{d:?}"); // `command:` of op `first`, at its value
        assert!(
            d.message.ends_with("[session-lock-not-held]") && d.message.contains("`db/first`"),
            "{}",
            d.message
        );
        assert!(d.message.contains("background: true"), "{}", d.message);
    }

    #[test]
    fn rule_ids_are_distinct_and_serialized_as_written_in_the_docs() {
        for rule in LintRule::ALL {
            assert_eq!(
                serde_json::to_value(rule).unwrap(),
                serde_json::Value::String(rule.id().to_owned())
            );
        }
        let docs = include_str!("../../../docs/recipes.md");
        for rule in LintRule::ALL {
            assert!(
                docs.contains(&format!("| `{}` |", rule.id())),
                "docs/recipes.md has no row for {rule}"
            );
        }
    }
}
