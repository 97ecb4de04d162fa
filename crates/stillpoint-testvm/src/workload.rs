//! Guest workloads for tests, the demo and benchmarks. Each reports every completed write on
//! the serial console, so the host can watch it even while the guest's filesystems are frozen
//! (the agent refuses guest-exec then; the console does not):
//! - the stall writer: appends a line and reports how long the append took, in guest time;
//! - the record writer: appends fixed-size, self-checking, numbered records to a file, so a
//!   restored copy shows whether it holds a clean prefix of the sequence or a torn record;
//! - the lockstep writer: writes numbered blocks to several raw disks in turn with direct I/O
//!   (each write has reached the virtual disk before the next starts), so restored copies of
//!   the disks show whether they were captured at one instant;
//! - the SQLite writer: an application that inserts batches of rows in transactions, holding
//!   each open for a while, so a restored database shows whether it was captured between
//!   transactions (application level) or inside one (crash level: a hot journal to roll back).

use std::time::Duration;

use crate::error::Result;
use crate::vm::LaunchedVm;

/// The prefix of the stall writer's console lines: `stillpoint-writer SEQ START_NS END_NS`.
pub const WRITER_MARK: &str = "stillpoint-writer";

/// A busybox `sh` loop that appends one line to `path` per iteration and reports how long the
/// append took, in guest monotonic nanoseconds read from `/proc/timer_list` with shell builtins
/// only (no fork between the two timestamps; busybox `date` has no `%N`).
pub fn stall_writer_script(path: &str) -> String {
    format!(
        "i=0; while :; do i=$((i+1)); \
         {{ read l; read l; read _ _ a _; }} < /proc/timer_list; \
         echo \"$i\" >> {path}; \
         {{ read l; read l; read _ _ b _; }} < /proc/timer_list; \
         echo \"{WRITER_MARK} $i $a $b\" > /dev/console; \
         done"
    )
}

/// The stall writer over several files, one per disk: a single loop appends to each file in
/// turn, so one writer meets every file system's freeze (the agent freezes them one after the
/// other), and reports each append with the file's index in `paths`:
/// `stillpoint-writer SEQ START_NS END_NS INDEX` (SEQ counts appends, not loops;
/// [`parse_writer_samples`] reads these lines too). The paths are quoted for the shell.
pub fn stall_writer_script_over(paths: &[&str]) -> String {
    let quoted: Vec<String> = paths
        .iter()
        .map(|p| format!("'{}'", p.replace('\'', "'\\''")))
        .collect();
    format!(
        "i=0; while :; do t=0; for f in {}; do i=$((i+1)); \
         {{ read l; read l; read _ _ a _; }} < /proc/timer_list; \
         echo \"$i\" >> \"$f\"; \
         {{ read l; read l; read _ _ b _; }} < /proc/timer_list; \
         echo \"{WRITER_MARK} $i $a $b $t\" > /dev/console; \
         t=$((t+1)); done; done",
        quoted.join(" ")
    )
}

/// One completed write of the stall writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterSample {
    pub seq: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl WriterSample {
    /// How long this write was blocked.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }
}

/// The writer's samples in a console text, in order; malformed lines are skipped.
pub fn parse_writer_samples(console: &str) -> Vec<WriterSample> {
    console
        .lines()
        .filter_map(|line| {
            let mut fields = line.trim().strip_prefix(WRITER_MARK)?.split_whitespace();
            let seq = fields.next()?.parse().ok()?;
            let start_ns = fields.next()?.parse().ok()?;
            let end_ns = fields.next()?.parse().ok()?;
            Some(WriterSample {
                seq,
                start_ns,
                end_ns,
            })
        })
        .collect()
}

impl LaunchedVm {
    /// Starts the stall writer in the guest (in the background, through the agent) appending
    /// to `path`, and waits until its first writes are reported.
    pub async fn start_stall_writer(&self, path: &str) -> Result<()> {
        self.start_writer_script(stall_writer_script(path)).await
    }

    /// Starts [`stall_writer_script_over`] `paths` like [`Self::start_stall_writer`].
    pub async fn start_stall_writer_over(&self, paths: &[&str]) -> Result<()> {
        self.start_writer_script(stall_writer_script_over(paths))
            .await
    }

    async fn start_writer_script(&self, script: String) -> Result<()> {
        let arguments = serde_json::json!({
            "path": "sh",
            "arg": ["-c", script],
        });
        self.agent_command("guest-exec", Some(arguments), Duration::from_secs(10))
            .await?;
        let started = crate::wait_until(Duration::from_secs(30), || async {
            self.writer_samples()
                .last()
                .is_some_and(|sample| sample.seq >= 3)
        })
        .await;
        if !started {
            return Err(crate::Error::new(
                crate::ErrorKind::Timeout,
                format!(
                    "the stall writer did not start; console:\n{}",
                    self.console_tail(20)
                ),
            )
            .with_vm(self.name()));
        }
        Ok(())
    }

    /// The stall writer's samples so far.
    pub fn writer_samples(&self) -> Vec<WriterSample> {
        parse_writer_samples(&self.console_text())
    }

    /// The stall writer's longest append among the samples after `seq` (zero when none came):
    /// the stall a guest writer saw during whatever ran since.
    pub fn longest_writer_latency_since(&self, seq: u64) -> Duration {
        self.writer_samples()
            .iter()
            .filter(|s| s.seq > seq)
            .map(WriterSample::latency)
            .max()
            .unwrap_or_default()
    }
}

/// The record writer's console line after each appended record: `stillpoint-record-written SEQ`.
pub const RECORD_MARK: &str = "stillpoint-record-written";
/// Every record is this long.
pub const RECORD_SIZE: usize = 512;

/// Record `seq` (numbered from 1): `stillpoint-record <seq, 10 digits> <seq, 482 digits>\n`,
/// 512 bytes. The number at both ends makes a record whose end is missing or foreign show.
pub fn record(seq: u64) -> Vec<u8> {
    let text = format!("stillpoint-record {seq:010} {seq:0482}\n");
    debug_assert_eq!(text.len(), RECORD_SIZE);
    text.into_bytes()
}

/// A busybox `sh` loop that appends record 1, 2, … to `path` (one `printf` builtin: one
/// `write` per record) and reports each on the console once the append returned.
pub fn record_writer_script(path: &str) -> String {
    format!(
        "i=0; while :; do i=$((i+1)); \
         printf 'stillpoint-record %010d %0482d\\n' $i $i >> {path} \
         || {{ echo \"{RECORD_MARK}-failed $i\" > /dev/console; exit 1; }}; \
         echo \"{RECORD_MARK} $i\" > /dev/console; \
         done"
    )
}

/// What a copy of the record writer's file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordScan {
    /// Records 1..=`complete` are there, whole and in order.
    pub complete: u64,
    /// What follows them, if anything: a torn record, zeros or foreign bytes, described with
    /// its offset. `None`: the file ends right after record `complete` (a clean prefix).
    pub damage: Option<String>,
}

impl RecordScan {
    /// Records 1..=`complete` and nothing else.
    pub fn is_clean_prefix(&self) -> bool {
        self.damage.is_none()
    }
}

/// Checks a copy of the record writer's file.
pub fn scan_records(data: &[u8]) -> RecordScan {
    let mut complete = 0u64;
    for piece in data.chunks(RECORD_SIZE) {
        let expected = record(complete + 1);
        if piece != expected.as_slice() {
            let offset = complete * RECORD_SIZE as u64;
            let what = if piece.len() < RECORD_SIZE && expected.starts_with(piece) {
                format!(
                    "record {} is torn: only {} of {RECORD_SIZE} bytes",
                    complete + 1,
                    piece.len()
                )
            } else if piece.iter().all(|&b| b == 0) {
                format!(
                    "{} zero bytes where record {} belongs",
                    data.len() as u64 - offset,
                    complete + 1
                )
            } else {
                let shown = String::from_utf8_lossy(&piece[..piece.len().min(40)]).into_owned();
                format!(
                    "record {} is damaged or foreign: starts {shown:?}",
                    complete + 1
                )
            };
            return RecordScan {
                complete,
                damage: Some(format!("at offset {offset}: {what}")),
            };
        }
        complete += 1;
    }
    RecordScan {
        complete,
        damage: None,
    }
}

/// The lockstep writer's console line after each round: `stillpoint-lockstep SEQ`.
pub const LOCKSTEP_MARK: &str = "stillpoint-lockstep";
/// The lockstep writer writes blocks of this size.
pub const LOCKSTEP_BLOCK: u64 = 4096;

/// Where the lockstep writer puts its blocks on each disk: block `seq` goes to block number
/// `first_block + seq % slots` (in [`LOCKSTEP_BLOCK`] units), so the region wraps around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockstepLayout {
    pub first_block: u64,
    pub slots: u64,
}

impl LockstepLayout {
    /// The byte offset of the slot that block `seq` goes to.
    pub fn offset(&self, seq: u64) -> u64 {
        (self.first_block + seq % self.slots) * LOCKSTEP_BLOCK
    }
}

/// Block `seq` of the lockstep writer: `stillpoint-lockstep <seq, 10 digits>\n`, zero-padded to
/// [`LOCKSTEP_BLOCK`] bytes.
pub fn lockstep_block(seq: u64) -> Vec<u8> {
    let mut block = format!("{LOCKSTEP_MARK} {seq:010}\n").into_bytes();
    block.resize(LOCKSTEP_BLOCK as usize, 0);
    block
}

/// A busybox `sh` loop that, for seq = 1, 2, …, writes block `seq` to each disk in turn (found
/// by its virtio serial, e.g. `stillpoint-disk0`) with `dd … oflag=direct conv=notrunc`, and
/// reports the round on the console. Direct I/O: a block has reached the virtual disk before
/// the next write starts, so at any instant disk `k` holds seq or seq-1 if disk `k-1` holds seq.
/// The disks must not be mounted (the writer overwrites their raw blocks).
pub fn lockstep_writer_script(serials: &[&str], layout: LockstepLayout) -> String {
    let mut script = String::from(
        "dev() { for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = \"$1\" ] && echo /dev/${d##*/}; done; }; ",
    );
    for (k, serial) in serials.iter().enumerate() {
        script.push_str(&format!(
            "d{k}=$(dev {serial}); [ -b \"$d{k}\" ] || {{ echo \"{LOCKSTEP_MARK}-failed: no disk {serial}\" > /dev/console; exit 1; }}; "
        ));
    }
    script.push_str(&format!(
        "i=0; while :; do i=$((i+1)); \
         printf '{LOCKSTEP_MARK} %010d\\n' $i > /tmp/lockstep-block; \
         s=$(({first} + i % {slots})); ",
        first = layout.first_block,
        slots = layout.slots
    ));
    for k in 0..serials.len() {
        script.push_str(&format!(
            "dd if=/tmp/lockstep-block of=$d{k} bs={LOCKSTEP_BLOCK} seek=$s count=1 \
             conv=notrunc,sync oflag=direct 2>/dev/null \
             || {{ echo \"{LOCKSTEP_MARK}-failed $i disk {k}\" > /dev/console; exit 1; }}; "
        ));
    }
    script.push_str(&format!("echo \"{LOCKSTEP_MARK} $i\" > /dev/console; done"));
    script
}

/// The newest lockstep block a copy of one disk holds, checked slot by slot.
///
/// Every slot holds the newest block that went to it or, before the writer got there, no block
/// at all; anything else (a foreign or torn block, a gap in the sequence) is an error naming
/// the offset. Returns 0 when the writer had not written anything.
pub fn newest_lockstep_block(
    image: &[u8],
    layout: LockstepLayout,
) -> std::result::Result<u64, String> {
    let mut newest = 0u64;
    let mut found = Vec::new();
    for slot in 0..layout.slots {
        let offset = (layout.first_block + slot) * LOCKSTEP_BLOCK;
        let end = offset + LOCKSTEP_BLOCK;
        let Some(block) = image.get(offset as usize..end as usize) else {
            return Err(format!(
                "the image ends before slot {slot} (offset {offset})"
            ));
        };
        let Some(text) = block.strip_prefix(format!("{LOCKSTEP_MARK} ").as_bytes()) else {
            continue; // never written (the writer has not wrapped yet), checked below
        };
        let seq: u64 = std::str::from_utf8(&text[..10.min(text.len())])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(|| format!("offset {offset}: a lockstep block without a number"))?;
        if seq % layout.slots != slot || block != lockstep_block(seq).as_slice() {
            return Err(format!(
                "offset {offset}: block {seq} is torn or in the wrong slot"
            ));
        }
        newest = newest.max(seq);
        found.push(seq);
    }
    // Blocks newest-slots+1 ..= newest must all be there: the writer wrote them in order.
    let oldest_kept = newest.saturating_sub(layout.slots - 1).max(1);
    for seq in oldest_kept..=newest {
        if !found.contains(&seq) {
            return Err(format!(
                "block {seq} is missing (offset {}) although block {newest} is there",
                layout.offset(seq)
            ));
        }
    }
    Ok(newest)
}

/// The highest `SEQ` of the console lines `<mark> SEQ` (0 when there are none).
pub fn highest_mark(console: &str, mark: &str) -> u64 {
    console
        .lines()
        .filter_map(|line| line.trim().strip_prefix(mark)?.strip_prefix(' '))
        .filter_map(|rest| rest.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

impl LaunchedVm {
    /// Starts `script` with `sh -c` in the guest in the background (guest-exec, not waited for).
    pub async fn start_background(&self, script: &str) -> Result<()> {
        let arguments = serde_json::json!({ "path": "sh", "arg": ["-c", script] });
        self.agent_command("guest-exec", Some(arguments), Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Waits until the console shows `<mark> N` with N ≥ `at_least`; an error with the
    /// console's tail when it does not within `timeout` or the workload reports a failure
    /// (`<mark>-failed`).
    pub async fn wait_for_mark(&self, mark: &str, at_least: u64, timeout: Duration) -> Result<u64> {
        let failed = format!("{mark}-failed");
        let reached = crate::wait_until(timeout, || async {
            let console = self.console_text();
            console.contains(&failed) || highest_mark(&console, mark) >= at_least
        })
        .await;
        let console = self.console_text();
        let highest = highest_mark(&console, mark);
        if !reached || console.contains(&failed) {
            return Err(crate::Error::new(
                crate::ErrorKind::Timeout,
                format!(
                    "the guest workload `{mark}` reached {highest}, not {at_least}; console:\n{}",
                    self.console_tail(20)
                ),
            )
            .with_vm(self.name()));
        }
        Ok(highest)
    }

    /// Starts the record writer appending to `path` and waits for its first records.
    pub async fn start_record_writer(&self, path: &str) -> Result<()> {
        self.start_background(&record_writer_script(path)).await?;
        self.wait_for_mark(RECORD_MARK, 3, Duration::from_secs(60))
            .await
            .map(|_| ())
    }

    /// The highest record the record writer reported appended.
    pub fn records_written(&self) -> u64 {
        highest_mark(&self.console_text(), RECORD_MARK)
    }

    /// Starts the lockstep writer on the disks with these serials (unmounted) and waits for its
    /// first rounds.
    pub async fn start_lockstep_writer(
        &self,
        serials: &[&str],
        layout: LockstepLayout,
    ) -> Result<()> {
        self.start_background(&lockstep_writer_script(serials, layout))
            .await?;
        self.wait_for_mark(LOCKSTEP_MARK, 3, Duration::from_secs(60))
            .await
            .map(|_| ())
    }

    /// The highest round the lockstep writer reported complete on every disk.
    pub fn lockstep_rounds(&self) -> u64 {
        highest_mark(&self.console_text(), LOCKSTEP_MARK)
    }
}

/// The SQLite writer's console lines, each `<mark> SEQ` for transaction SEQ (numbered from 1):
/// it is about to ask for the write lock.
pub const SQLITE_WANT_MARK: &str = "stillpoint-sqlite-want";
/// It holds the write lock: transaction SEQ is open.
pub const SQLITE_BEGIN_MARK: &str = "stillpoint-sqlite-begin";
/// Transaction SEQ wrote all its rows, and what SQLite had written to the files so far (the
/// rollback journal, the pages that did not fit the cache) is on the disk; SEQ is still open.
pub const SQLITE_OPEN_MARK: &str = "stillpoint-sqlite-open";
/// `COMMIT` of SEQ returned. `<mark>-failed SEQ`: sqlite3 failed (its error is on the console
/// too) and the writer stopped.
pub const SQLITE_COMMITTED_MARK: &str = "stillpoint-sqlite-committed";

/// An application for the application-consistency tests: a loop that inserts a batch of rows
/// into an SQLite database per transaction, in the default rollback-journal mode, and reports
/// every step of each transaction on the console (so the host sees what was committed when,
/// also while the guest is frozen).
///
/// Transaction SEQ first inserts its batch row (`batches`: SEQ, how many rows, the sum of
/// their check values), then its `rows_per_transaction` item rows (`items`: SEQ, K, a check
/// value and a payload, both functions of SEQ and K that [`sqlite_scan_sql`] recomputes).
/// The connection's page cache is kept small (10 pages), so SQLite writes the oldest dirty
/// page — the batch row's — into the database file before the commit, having saved the
/// original in the rollback journal: the shape of a large transaction in a real application.
/// Inside the transaction the writer then runs `sync`, so that a crash-level capture taken
/// while the transaction is open finds those pages on the disk (the kernel would write them
/// back within seconds anyway; the `sync` only makes it deterministic), waits while the
/// `gate` file exists (the test holds a transaction open exactly as long as it needs), sleeps
/// `hold`, and commits.
///
/// It waits for the write lock as long as it takes (busy timeout 10 minutes), as an
/// application does while a backup's recipe holds the lock.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteWriter {
    /// The database, e.g. `/data/app.db`.
    pub db: String,
    /// Item rows per transaction (about 1 KiB each). With fewer than about 40 a transaction
    /// fits the 10-page cache, nothing reaches the database file before the commit, and a
    /// journal caught mid-transaction is not hot yet (its header is written at its first sync).
    pub rows_per_transaction: u32,
    /// Seconds each transaction stays open after its rows are written.
    pub hold: f64,
    /// Seconds between two transactions.
    pub pause: f64,
    /// While this guest file exists, the writer keeps its open transaction open.
    pub gate: String,
    /// Where the progress lines go (`/dev/console`: the host reads the serial console).
    pub console: String,
}

impl Default for SqliteWriter {
    fn default() -> Self {
        SqliteWriter {
            db: "/data/app.db".to_owned(),
            rows_per_transaction: 64,
            hold: 0.3,
            pause: 0.2,
            gate: "/run/stillpoint-sqlite-writer.hold".to_owned(),
            console: "/dev/console".to_owned(),
        }
    }
}

/// The check value of item `k` of transaction `seq` (what the writer stores and the scan
/// recomputes, in SQL integer arithmetic).
pub fn sqlite_check_value(seq: u64, k: u64) -> u64 {
    (seq * 1_000_003 + k * 7919) % 1_000_000_007
}

impl SqliteWriter {
    /// The busybox `sh` script of the writer (see [`SqliteWriter`]). It continues after the
    /// highest batch already in the database.
    pub fn script(&self) -> String {
        let SqliteWriter {
            db,
            rows_per_transaction: rows,
            hold,
            pause,
            gate,
            console,
        } = self;
        let numbers = format!(
            "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM k WHERE n < {rows})"
        );
        format!(
            "fail() {{ echo \"{SQLITE_COMMITTED_MARK}-failed $1\" >> {console}; exit 1; }}; \
             sqlite3 -bail {db} \
             'CREATE TABLE IF NOT EXISTS batches(seq INTEGER PRIMARY KEY, rows INTEGER NOT NULL, total INTEGER NOT NULL);' \
             'CREATE TABLE IF NOT EXISTS items(seq INTEGER NOT NULL, k INTEGER NOT NULL, check_value INTEGER NOT NULL, payload TEXT NOT NULL, PRIMARY KEY(seq, k));' \
             2>>{console} || fail 0; \
             i=$(sqlite3 {db} 'SELECT coalesce(max(seq), 0) FROM batches;' 2>>{console}) || fail 0; \
             while :; do i=$((i+1)); \
             echo \"{SQLITE_WANT_MARK} $i\" >> {console}; \
             sqlite3 -bail {db} '.timeout 600000' 'PRAGMA cache_size=10;' 'BEGIN IMMEDIATE;' \
             \".shell echo {SQLITE_BEGIN_MARK} $i >> {console}\" \
             \"INSERT INTO batches SELECT $i, count(*), sum(v) FROM ({numbers} SELECT ($i*1000003+n*7919)%1000000007 AS v FROM k);\" \
             \"{numbers} INSERT INTO items SELECT $i, n, ($i*1000003+n*7919)%1000000007, printf('%0900d', $i*100000+n) FROM k;\" \
             \".shell sync; echo {SQLITE_OPEN_MARK} $i >> {console}; while [ -e {gate} ]; do sleep 0.1; done; sleep {hold}\" \
             'COMMIT;' 2>>{console} || fail $i; \
             echo \"{SQLITE_COMMITTED_MARK} $i\" >> {console}; \
             sleep {pause}; done"
        )
    }
}

/// The query that checks a copy of the writer's database: one line per batch,
/// `seq|rows|total|items|items_total|good_items` (`good_items`: rows whose `k`, check value
/// and payload are what the writer wrote for that batch), then `orphans|N`, the item rows
/// without a batch. Read with [`parse_sqlite_scan`].
pub fn sqlite_scan_sql() -> &'static str {
    "SELECT b.seq, b.rows, b.total, count(i.k), coalesce(sum(i.check_value), 0), \
     coalesce(sum(i.k BETWEEN 1 AND b.rows \
                  AND i.check_value = (b.seq*1000003 + i.k*7919) % 1000000007 \
                  AND i.payload = printf('%0900d', b.seq*100000 + i.k)), 0) \
     FROM batches b LEFT JOIN items i ON i.seq = b.seq GROUP BY b.seq ORDER BY b.seq; \
     SELECT 'orphans', count(*) FROM items WHERE seq NOT IN (SELECT seq FROM batches);"
}

/// What a copy of the writer's database holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SqliteScan {
    /// Every batch found, in order.
    pub batches: Vec<u64>,
    /// What is wrong: a batch that is not whole, a missing batch, item rows without a batch.
    /// Empty: batches 1..=newest, each with exactly its rows.
    pub problems: Vec<String>,
}

impl SqliteScan {
    /// The highest batch found (0 when there is none).
    pub fn newest(&self) -> u64 {
        self.batches.last().copied().unwrap_or(0)
    }

    /// Transactions 1..=newest, each whole, and nothing else.
    pub fn is_clean_prefix(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads the output of [`sqlite_scan_sql`] (sqlite3's default `|`-separated list mode) for a
/// writer that inserts `rows_per_transaction` rows per transaction. A line it cannot read is
/// a problem, not a panic.
pub fn parse_sqlite_scan(output: &str, rows_per_transaction: u32) -> SqliteScan {
    let mut scan = SqliteScan::default();
    let rows = u64::from(rows_per_transaction);
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('|').collect();
        if let ["orphans", count] = fields.as_slice() {
            match count.parse::<u64>() {
                Ok(0) => {}
                Ok(n) => scan
                    .problems
                    .push(format!("{n} item row(s) belong to no batch")),
                Err(_) => scan.problems.push(format!("unreadable line {line:?}")),
            }
            continue;
        }
        let numbers: Option<Vec<u64>> = fields.iter().map(|f| f.parse().ok()).collect();
        let Some([seq, claimed, total, items, items_total, good]) = numbers
            .as_deref()
            .and_then(|n| <[u64; 6]>::try_from(n).ok())
        else {
            scan.problems.push(format!("unreadable line {line:?}"));
            continue;
        };
        let expected_total: u64 = (1..=rows).map(|k| sqlite_check_value(seq, k)).sum();
        let expected_seq = scan.newest() + 1;
        if seq != expected_seq {
            scan.problems.push(format!(
                "batch {seq} follows batch {} (missing {expected_seq}..{seq})",
                scan.newest()
            ));
        }
        if claimed != rows || total != expected_total {
            scan.problems.push(format!(
                "batch {seq}: its batch row says {claimed} rows totalling {total}, the writer wrote {rows} totalling {expected_total}"
            ));
        }
        if items != rows || good != rows || items_total != expected_total {
            scan.problems.push(format!(
                "batch {seq}: {items} item rows ({good} as written, total {items_total}), not {rows} totalling {expected_total}"
            ));
        }
        scan.batches.push(seq);
    }
    scan
}

/// Runs [`sqlite_scan_sql`] with the host's `sqlite3` on `database` — a path, or a URI such as
/// `file:/x/app.db?immutable=1` (read the file as it is, ignoring a journal beside it) — and
/// reads the result. A database sqlite3 cannot read is an error with its message.
pub fn scan_sqlite_database(database: &str, rows_per_transaction: u32) -> Result<SqliteScan> {
    let output = crate::tool::run(
        std::process::Command::new("sqlite3")
            .arg("-bail")
            .arg(database)
            .arg(sqlite_scan_sql()),
        &format!("scanning the SQLite writer's database {database}"),
    )?;
    Ok(parse_sqlite_scan(
        &String::from_utf8_lossy(&output.stdout),
        rows_per_transaction,
    ))
}

/// The first 8 bytes of a live rollback journal's header.
pub const SQLITE_JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// The header of an SQLite rollback journal (`<db>-journal`), as described in "The Rollback
/// Journal" of sqlite.org/fileformat.html. A journal with this header next to its database,
/// whose writer is gone, is *hot*: the next connection that opens the database must roll the
/// journal's pages back into the database file before it may read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteJournalHeader {
    /// Page records in the first segment; `None` for 0xFFFFFFFF ("as many as the file holds",
    /// written when the journal is not synced).
    pub records: Option<u32>,
    /// The size of the database, in pages, before the transaction: the rollback truncates the
    /// file back to it.
    pub initial_pages: u32,
    /// The page size of the journal's records.
    pub page_size: u32,
}

/// Reads a rollback journal's header. `None` when the file is empty, zeroed (a journal SQLite
/// has finished with in `PERSIST` mode), or not a journal: nothing to roll back.
pub fn parse_sqlite_journal_header(journal: &[u8]) -> Option<SqliteJournalHeader> {
    let header = journal.get(..28)?;
    // Bytes 0..8: the magic; anything else (zeros included) is not a live journal.
    if header[..8] != SQLITE_JOURNAL_MAGIC {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    Some(SqliteJournalHeader {
        // Bytes 8..12: the record count of this segment, big-endian; -1 means "compute it".
        records: Some(word(8)).filter(|&n| n != u32::MAX),
        // Bytes 12..16: the nonce of the record checksums (not needed here).
        // Bytes 16..20: the database size in pages when the transaction started.
        initial_pages: word(16),
        // Bytes 20..24: the sector size the writer assumed (not needed here).
        // Bytes 24..28: the page size.
        page_size: word(24),
    })
}

impl LaunchedVm {
    /// Starts `writer` in the guest (in the background) and waits until it committed its
    /// first transactions.
    pub async fn start_sqlite_writer(&self, writer: &SqliteWriter) -> Result<()> {
        self.start_background(&writer.script()).await?;
        self.wait_for_mark(SQLITE_COMMITTED_MARK, 2, Duration::from_secs(120))
            .await
            .map(|_| ())
    }

    /// The highest transaction the SQLite writer reported committed.
    pub fn sqlite_committed(&self) -> u64 {
        highest_mark(&self.console_text(), SQLITE_COMMITTED_MARK)
    }

    /// The SQLite writer's progress as its console shows it now.
    pub fn sqlite_progress(&self) -> SqliteProgress {
        SqliteProgress::of(&self.console_text())
    }
}

/// Where the SQLite writer is, from its console lines: the highest SEQ of each mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SqliteProgress {
    pub wanted: u64,
    pub begun: u64,
    pub open: u64,
    pub committed: u64,
}

impl SqliteProgress {
    pub fn of(console: &str) -> Self {
        SqliteProgress {
            wanted: highest_mark(console, SQLITE_WANT_MARK),
            begun: highest_mark(console, SQLITE_BEGIN_MARK),
            open: highest_mark(console, SQLITE_OPEN_MARK),
            committed: highest_mark(console, SQLITE_COMMITTED_MARK),
        }
    }

    /// It committed `committed` and is waiting for the lock of the next transaction, which it
    /// has not got: nothing of a transaction after `committed` can be in the database.
    pub fn waiting_for_lock(&self) -> bool {
        self.wanted == self.committed + 1 && self.begun == self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_skip_noise() {
        let console = "boot noise\nstillpoint-writer 1 100 350\r\nstillpoint-writer 2 400 9400\n\
                       stillpoint-writer 3 x 1\nstillpoint-writer 4 5\n";
        let samples = parse_writer_samples(console);
        assert_eq!(
            samples,
            vec![
                WriterSample {
                    seq: 1,
                    start_ns: 100,
                    end_ns: 350
                },
                WriterSample {
                    seq: 2,
                    start_ns: 400,
                    end_ns: 9400
                }
            ]
        );
        assert_eq!(samples[1].latency(), Duration::from_nanos(9000));
    }

    #[test]
    fn script_uses_only_builtins_between_timestamps() {
        let script = stall_writer_script("/data/stall");
        let between =
            &script[script.find("read _ _ a").unwrap()..script.find("read _ _ b").unwrap()];
        assert!(between.contains("echo \"$i\" >> /data/stall"));
        assert!(
            !between.contains("$("),
            "no command substitution (a fork) inside the timed part"
        );
    }

    #[test]
    fn a_writer_over_several_files_quotes_them_and_reports_like_the_single_one() {
        let script = stall_writer_script_over(&["/data/stall", "/data1/it's"]);
        assert!(
            script.contains("for f in '/data/stall' '/data1/it'\\''s';"),
            "{script}"
        );
        let between =
            &script[script.find("read _ _ a").unwrap()..script.find("read _ _ b").unwrap()];
        assert!(between.contains("echo \"$i\" >> \"$f\""));
        assert!(!between.contains("$("), "no fork inside the timed part");
        // The index is an extra field: the usual parser reads these lines.
        let console = "stillpoint-writer 1 100 350 0\nstillpoint-writer 2 400 900 1\n";
        let latencies: Vec<Duration> = parse_writer_samples(console)
            .iter()
            .map(WriterSample::latency)
            .collect();
        assert_eq!(
            latencies,
            [Duration::from_nanos(250), Duration::from_nanos(500)]
        );
    }

    #[test]
    fn records_are_512_bytes_numbered_at_both_ends() {
        let r = record(7);
        assert_eq!(r.len(), RECORD_SIZE);
        assert!(r.starts_with(b"stillpoint-record 0000000007 000"));
        assert!(r.ends_with(b"0007\n"));
        assert!(record_writer_script("/data/records").contains("%0482d"));
    }

    #[test]
    fn record_scan_finds_clean_prefixes_and_every_kind_of_damage() {
        let mut data: Vec<u8> = (1..=5).flat_map(record).collect();
        assert_eq!(
            scan_records(&data),
            RecordScan {
                complete: 5,
                damage: None
            }
        );
        assert!(scan_records(&[]).is_clean_prefix());

        let mut torn = data.clone();
        torn.extend_from_slice(&record(6)[..100]);
        let scan = scan_records(&torn);
        assert_eq!(scan.complete, 5);
        assert_eq!(
            scan.damage.as_deref(),
            Some("at offset 2560: record 6 is torn: only 100 of 512 bytes")
        );

        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 1024]);
        let scan = scan_records(&zeros);
        assert_eq!(
            scan.damage.as_deref(),
            Some("at offset 2560: 1024 zero bytes where record 6 belongs")
        );

        // A record whose end was overwritten: same length, wrong content.
        data[2 * RECORD_SIZE + 500] = b'x';
        let scan = scan_records(&data);
        assert_eq!(scan.complete, 2);
        assert!(scan.damage.unwrap().contains("record 3 is damaged"));

        // Out of order.
        let swapped: Vec<u8> = [1, 3, 2].into_iter().flat_map(record).collect();
        assert_eq!(scan_records(&swapped).complete, 1);
    }

    fn image_with(layout: LockstepLayout, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut image =
            vec![0u8; ((layout.first_block + layout.slots + 1) * LOCKSTEP_BLOCK) as usize];
        for seq in seqs {
            let at = layout.offset(seq) as usize;
            image[at..at + LOCKSTEP_BLOCK as usize].copy_from_slice(&lockstep_block(seq));
        }
        image
    }

    #[test]
    fn lockstep_scan_reads_the_newest_block_and_checks_the_sequence() {
        let layout = LockstepLayout {
            first_block: 2,
            slots: 8,
        };
        assert_eq!(
            newest_lockstep_block(&image_with(layout, []), layout),
            Ok(0)
        );
        assert_eq!(
            newest_lockstep_block(&image_with(layout, 1..=5), layout),
            Ok(5)
        );
        // Wrapped around: 13 overwrote 5, the slots hold 6..=13.
        assert_eq!(
            newest_lockstep_block(&image_with(layout, 1..=13), layout),
            Ok(13)
        );

        let gap = image_with(layout, [1, 2, 4]);
        let error = newest_lockstep_block(&gap, layout).unwrap_err();
        assert!(error.contains("block 3 is missing"), "{error}");

        let mut torn = image_with(layout, 1..=3);
        let at = layout.offset(2) as usize + 30;
        torn[at] = 1;
        let error = newest_lockstep_block(&torn, layout).unwrap_err();
        assert!(error.contains("block 2 is torn"), "{error}");

        let script = lockstep_writer_script(&["stillpoint-disk0", "stillpoint-disk1"], layout);
        assert!(script.contains("oflag=direct"));
        assert!(script.find("of=$d0").unwrap() < script.find("of=$d1").unwrap());
    }

    #[test]
    fn highest_mark_ignores_other_lines_and_prefixes() {
        let console = "stillpoint-lockstep 3\nstillpoint-lockstep 12\r\nstillpoint-lockstep-failed 13 disk 1\n\
                       noise stillpoint-lockstep 99\nstillpoint-lockstep x\n";
        assert_eq!(highest_mark(console, LOCKSTEP_MARK), 12);
        assert_eq!(highest_mark("", RECORD_MARK), 0);
    }

    fn batch_line(seq: u64, rows: u64) -> String {
        let total: u64 = (1..=rows).map(|k| sqlite_check_value(seq, k)).sum();
        format!("{seq}|{rows}|{total}|{rows}|{total}|{rows}")
    }

    #[test]
    fn sqlite_scan_accepts_whole_batches_in_order() {
        let output = format!("{}\n{}\norphans|0\n", batch_line(1, 4), batch_line(2, 4));
        let scan = parse_sqlite_scan(&output, 4);
        assert_eq!(scan.batches, vec![1, 2]);
        assert!(scan.is_clean_prefix(), "{:?}", scan.problems);
        assert_eq!(scan.newest(), 2);
        let empty = parse_sqlite_scan("orphans|0\n", 4);
        assert!(empty.is_clean_prefix());
        assert_eq!(empty.newest(), 0);
    }

    #[test]
    fn sqlite_scan_names_every_kind_of_damage() {
        // Batch 2's row is there, its items are not (a torn transaction read without its
        // journal); batch 4 follows batch 2; orphan items.
        let total: u64 = (1..=4).map(|k| sqlite_check_value(2, k)).sum();
        let output = format!(
            "{}\n2|4|{total}|0|0|0\n{}\norphans|3\nnot a line\n",
            batch_line(1, 4),
            batch_line(4, 4)
        );
        let scan = parse_sqlite_scan(&output, 4);
        assert_eq!(scan.batches, vec![1, 2, 4]);
        assert!(!scan.is_clean_prefix());
        let problems = scan.problems.join("\n");
        assert!(
            problems.contains("batch 2: 0 item rows (0 as written, total 0), not 4"),
            "{problems}"
        );
        assert!(
            problems.contains("batch 4 follows batch 2 (missing 3..4)"),
            "{problems}"
        );
        assert!(
            problems.contains("3 item row(s) belong to no batch"),
            "{problems}"
        );
        assert!(
            problems.contains("unreadable line \"not a line\""),
            "{problems}"
        );

        // A row whose payload was changed, and a batch row that lies about its size.
        let total: u64 = (1..=4).map(|k| sqlite_check_value(1, k)).sum();
        let bad_item = parse_sqlite_scan(&format!("1|4|{total}|4|{total}|3\n"), 4);
        assert_eq!(bad_item.batches, vec![1]);
        assert!(
            bad_item.problems[0].contains("(3 as written"),
            "{bad_item:?}"
        );
        let liar = parse_sqlite_scan(&format!("{}\n", batch_line(1, 5)), 4);
        assert!(
            liar.problems[0].contains("batch row says 5 rows"),
            "{liar:?}"
        );
    }

    #[test]
    fn journal_header_fields_are_read_big_endian() {
        let mut journal = SQLITE_JOURNAL_MAGIC.to_vec();
        journal.extend_from_slice(&4u32.to_be_bytes()); // records
        journal.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // nonce
        journal.extend_from_slice(&20u32.to_be_bytes()); // initial pages
        journal.extend_from_slice(&512u32.to_be_bytes()); // sector size
        journal.extend_from_slice(&4096u32.to_be_bytes()); // page size
        assert_eq!(
            parse_sqlite_journal_header(&journal),
            Some(SqliteJournalHeader {
                records: Some(4),
                initial_pages: 20,
                page_size: 4096
            })
        );
        journal[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_sqlite_journal_header(&journal).unwrap().records, None);
        assert_eq!(parse_sqlite_journal_header(&[]), None);
        assert_eq!(parse_sqlite_journal_header(&journal[..27]), None);
        assert_eq!(parse_sqlite_journal_header(&[0; 512]), None, "zeroed");
    }

    #[test]
    fn sqlite_progress_knows_when_the_writer_waits_for_the_lock() {
        let console = "stillpoint-sqlite-want 1\nstillpoint-sqlite-begin 1\nstillpoint-sqlite-open 1\n\
                       stillpoint-sqlite-committed 1\nstillpoint-sqlite-want 2\n";
        let progress = SqliteProgress::of(console);
        assert_eq!(
            progress,
            SqliteProgress {
                wanted: 2,
                begun: 1,
                open: 1,
                committed: 1
            }
        );
        assert!(progress.waiting_for_lock());
        let inside = SqliteProgress::of(&format!("{console}stillpoint-sqlite-begin 2\n"));
        assert!(!inside.waiting_for_lock(), "it holds the lock of 2");
        let between = SqliteProgress::of(&console.replace("stillpoint-sqlite-want 2\n", ""));
        assert!(!between.waiting_for_lock(), "it has not asked for 2 yet");
    }

    /// The writer's script, run by the host's `sh` and `sqlite3` (the guest's version) in a
    /// temporary directory: it commits whole batches, the gate holds a transaction open with
    /// a hot journal beside a database file that already holds part of the transaction, and
    /// rolling that journal back leaves exactly the committed batches.
    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_writer_script_on_the_host_commits_whole_batches_and_leaves_a_hot_journal_while_open()
     {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let writer = SqliteWriter {
            db: path("app.db"),
            rows_per_transaction: 64,
            hold: 0.0,
            pause: 0.0,
            gate: path("gate"),
            console: path("console"),
        };
        let progress =
            || SqliteProgress::of(&std::fs::read_to_string(&writer.console).unwrap_or_default());
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(writer.script())
            .process_group(0)
            .spawn()
            .expect("sh runs");
        let stop = |child: &mut std::process::Child| {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        };
        let ran = crate::wait_until(Duration::from_secs(60), || async {
            progress().committed >= 3
        })
        .await;
        if !ran {
            stop(&mut child);
            panic!(
                "the writer did not commit 3 transactions (is sqlite3 installed?): {}",
                std::fs::read_to_string(&writer.console).unwrap_or_default()
            );
        }

        // Hold the next transaction open and copy the files, as a crash would leave them. A
        // transaction that reports `open` after the gate exists waits at the gate.
        std::fs::write(&writer.gate, b"").unwrap();
        let at_gate = progress();
        let held = crate::wait_until(Duration::from_secs(60), || async {
            let p = progress();
            p.open > at_gate.open && p.open > p.committed
        })
        .await;
        assert!(held, "no transaction was held open: {:?}", progress());
        let open = progress().open;
        let copy = tempfile::tempdir().unwrap();
        let copied = |name: &str| copy.path().join(name).to_str().unwrap().to_owned();
        std::fs::copy(&writer.db, copied("app.db")).unwrap();
        std::fs::copy(format!("{}-journal", writer.db), copied("app.db-journal"))
            .expect("an open transaction has a journal");
        std::fs::remove_file(&writer.gate).unwrap();
        let committed = crate::wait_until(Duration::from_secs(60), || async {
            progress().committed >= open
        })
        .await;
        stop(&mut child);
        assert!(
            committed,
            "the held transaction did not commit: {:?}",
            progress()
        );

        let journal = std::fs::read(copied("app.db-journal")).unwrap();
        let header = parse_sqlite_journal_header(&journal).expect("a hot journal");
        assert!(
            header.records.is_some_and(|n| n > 0),
            "pages were saved: {header:?}"
        );
        // The database file alone (journal ignored) holds the open transaction's batch row
        // without its items: the torn state the journal exists to undo.
        let raw = scan_sqlite_database(
            &format!("file:{}?immutable=1", copied("app.db")),
            writer.rows_per_transaction,
        )
        .unwrap();
        assert_eq!(raw.newest(), open, "{raw:?}");
        assert!(!raw.is_clean_prefix(), "{raw:?}");
        // Opened normally, SQLite rolls the journal back: exactly the committed batches.
        let rolled_back = scan_sqlite_database(&copied("app.db"), 64).unwrap();
        assert!(rolled_back.is_clean_prefix(), "{rolled_back:?}");
        assert_eq!(rolled_back.newest(), open - 1);
        assert!(
            !std::path::Path::new(&copied("app.db-journal")).exists(),
            "the journal is gone after the rollback"
        );

        let live = scan_sqlite_database(&writer.db, 64).unwrap();
        assert!(live.is_clean_prefix(), "{live:?}");
        assert!(live.newest() >= open);
    }
}
