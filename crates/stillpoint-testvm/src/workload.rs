//! Guest workloads for tests, the demo and benchmarks. Each reports every completed write on
//! the serial console, so the host can watch it even while the guest's filesystems are frozen
//! (the agent refuses guest-exec then; the console does not):
//! - the stall writer: appends a line and reports how long the append took, in guest time;
//! - the record writer: appends fixed-size, self-checking, numbered records to a file, so a
//!   restored copy shows whether it holds a clean prefix of the sequence or a torn record;
//! - the lockstep writer: writes numbered blocks to several raw disks in turn with direct I/O
//!   (each write has reached the virtual disk before the next starts), so restored copies of
//!   the disks show whether they were captured at one instant.

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
        let arguments = serde_json::json!({
            "path": "sh",
            "arg": ["-c", stall_writer_script(path)],
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
}
