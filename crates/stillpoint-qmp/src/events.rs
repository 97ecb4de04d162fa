//! Event subscriptions and waits for job / export state changes.
//!
//! The race this module exists to prevent: QEMU may emit the event you want
//! *before* the reply to the command that caused it (a `transaction` with a
//! `blockdev-backup` emits `JOB_STATUS_CHANGE created/running` before its
//! `return`). So the pattern is always: subscribe, send the command, then wait
//! on the subscription. [`crate::Qmp`]'s `…_and_wait` helpers do exactly that.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::codec::{Event, Timestamp};
use crate::error::{Error, ErrorKind, Result};

/// The state of a QEMU job (`JobStatus` in the QAPI schema).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Not a real state; QEMU never reports it.
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused (e.g. drained inside a transaction).
    Paused,
    /// Ready to complete (mirror); backup jobs never get here.
    Ready,
    /// Paused while ready.
    Standby,
    /// Waiting for the rest of its transaction.
    Waiting,
    /// Waiting for finalize.
    Pending,
    /// Being cancelled or failed.
    Aborting,
    /// Finished; waits for `job-dismiss` (with `auto-dismiss: false`).
    Concluded,
    /// Gone.
    Null,
    /// A state this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// `concluded` or `null`: the job will not change state by itself again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

/// A `JOB_STATUS_CHANGE` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatusChange {
    /// The job id.
    pub job_id: String,
    /// The new state.
    pub status: JobStatus,
    /// When QEMU emitted the change (use this, not the time it was read).
    pub timestamp: Timestamp,
}

impl JobStatusChange {
    /// Reads a `JOB_STATUS_CHANGE` event; `None` for other events.
    pub fn from_event(ev: &Event) -> Option<JobStatusChange> {
        #[derive(Deserialize)]
        struct Data {
            id: String,
            status: JobStatus,
        }
        if ev.name != "JOB_STATUS_CHANGE" {
            return None;
        }
        let d: Data = serde_json::from_value(ev.data.clone()).ok()?;
        Some(JobStatusChange {
            job_id: d.id,
            status: d.status,
            timestamp: ev.timestamp,
        })
    }
}

/// A subscription to QEMU's events; see the module doc for the pattern.
pub struct EventStream {
    rx: Option<broadcast::Receiver<Event>>,
    default_timeout: Duration,
}

impl EventStream {
    pub(crate) fn new(rx: Option<broadcast::Receiver<Event>>, default_timeout: Duration) -> Self {
        EventStream {
            rx,
            default_timeout,
        }
    }

    /// The next event; [`ErrorKind::Closed`] once the connection is gone,
    /// [`ErrorKind::EventsLost`] if this subscriber fell behind.
    pub async fn recv(&mut self) -> Result<Event> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(Error::new(ErrorKind::Closed));
        };
        match rx.recv().await {
            Ok(ev) => Ok(ev),
            Err(RecvError::Closed) => Err(Error::new(ErrorKind::Closed)),
            Err(RecvError::Lagged(count)) => Err(Error::new(ErrorKind::EventsLost { count })),
        }
    }

    /// Waits for the first event for which `select` returns `Some`. `what`
    /// names the awaited event in errors.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut select: impl FnMut(&Event) -> Option<T>,
    ) -> Result<T> {
        let wait = async {
            loop {
                let ev = self.recv().await?;
                if let Some(found) = select(&ev) {
                    return Ok(found);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(res) => res.map_err(|e: Error| e.with_command(what)),
            Err(_) => Err(Error::new(ErrorKind::Timeout { after: timeout }).with_command(what)),
        }
    }

    /// Waits for the next event named `name`.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event> {
        self.wait_for(name, timeout, |ev| (ev.name == name).then(|| ev.clone()))
            .await
    }

    /// Waits until job `job_id` reaches `status`, or a terminal state
    /// (`concluded`/`null`) if that comes first; the returned change says
    /// which. A job that fails before reaching `status` thus ends the wait
    /// instead of running into the timeout.
    pub async fn wait_job_status(
        &mut self,
        job_id: &str,
        status: JobStatus,
        timeout: Duration,
    ) -> Result<JobStatusChange> {
        let what = format!("JOB_STATUS_CHANGE of job '{job_id}' to {status:?}");
        self.wait_for(&what, timeout, |ev| {
            JobStatusChange::from_event(ev)
                .filter(|c| c.job_id == job_id && (c.status == status || c.status.is_terminal()))
        })
        .await
    }

    /// Waits for `BLOCK_EXPORT_DELETED` of export `id` (sent once the export's
    /// last client is gone and its node is released).
    pub async fn wait_block_export_deleted(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<Event> {
        let what = format!("BLOCK_EXPORT_DELETED of export '{id}'");
        self.wait_for(&what, timeout, |ev| {
            (ev.name == "BLOCK_EXPORT_DELETED"
                && ev.data.get("id").and_then(|v| v.as_str()) == Some(id))
            .then(|| ev.clone())
        })
        .await
    }

    /// The timeout the client was created with, for callers that want the same.
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(name: &str, data: serde_json::Value, micros: i64) -> Event {
        Event {
            name: name.into(),
            data,
            timestamp: Timestamp {
                seconds: 100,
                microseconds: micros,
            },
        }
    }

    #[test]
    fn job_status_change_reads_known_and_unknown_states() {
        let c = JobStatusChange::from_event(&ev(
            "JOB_STATUS_CHANGE",
            json!({"status": "concluded", "id": "fleece0"}),
            5,
        ))
        .unwrap();
        assert_eq!(c.job_id, "fleece0");
        assert_eq!(c.status, JobStatus::Concluded);
        assert!(c.status.is_terminal());
        let c = JobStatusChange::from_event(&ev(
            "JOB_STATUS_CHANGE",
            json!({"status": "sleeping-beauty", "id": "j"}),
            5,
        ))
        .unwrap();
        assert_eq!(c.status, JobStatus::Unknown);
        assert!(JobStatusChange::from_event(&ev("STOP", json!({}), 1)).is_none());
    }

    #[tokio::test]
    async fn waits_skip_other_jobs_and_stop_at_terminal_state() {
        let (tx, rx) = broadcast::channel(16);
        let mut stream = EventStream::new(Some(rx), Duration::from_secs(5));
        tx.send(ev(
            "JOB_STATUS_CHANGE",
            json!({"status": "running", "id": "other"}),
            1,
        ))
        .unwrap();
        tx.send(ev("STOP", json!({}), 2)).unwrap();
        tx.send(ev(
            "JOB_STATUS_CHANGE",
            json!({"status": "concluded", "id": "j1"}),
            3,
        ))
        .unwrap();
        // Waiting for `running` of j1 ends at its terminal state instead.
        let c = stream
            .wait_job_status("j1", JobStatus::Running, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(c.status, JobStatus::Concluded);
        assert_eq!(c.timestamp.microseconds, 3);
    }

    #[tokio::test]
    async fn closed_connection_ends_a_wait_with_closed() {
        let (tx, rx) = broadcast::channel::<Event>(16);
        let mut stream = EventStream::new(Some(rx), Duration::from_secs(5));
        drop(tx);
        let e = stream
            .wait_block_export_deleted("exp1", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Closed);
        assert!(
            e.to_string()
                .contains("BLOCK_EXPORT_DELETED of export 'exp1'"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn lagging_subscriber_is_told_events_were_lost() {
        let (tx, rx) = broadcast::channel(2);
        let mut stream = EventStream::new(Some(rx), Duration::from_secs(5));
        for i in 0..5 {
            tx.send(ev("STOP", json!({}), i)).unwrap();
        }
        let e = stream.recv().await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::EventsLost { count: 3 });
    }

    #[tokio::test(start_paused = true)]
    async fn wait_times_out_naming_the_awaited_event() {
        let (_tx, rx) = broadcast::channel::<Event>(2);
        let mut stream = EventStream::new(Some(rx), Duration::from_secs(5));
        let e = stream
            .wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::Timeout {
                after: Duration::from_secs(3)
            }
        );
        assert!(e.to_string().contains("BLOCK_JOB_CANCELLED"));
    }
}
