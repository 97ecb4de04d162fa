//! Guest workloads for tests, the demo and benchmarks: a writer whose every completed write is
//! reported on the serial console with guest timestamps, so the host can watch it even while
//! the guest's filesystems are frozen (the agent refuses guest-exec then; the console does not).

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
}
