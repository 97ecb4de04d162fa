//! QEMU monitor (QMP) client: negotiation, commands, events, block jobs.
//!
//! # What it is for
//! The qemu platform driver composes this client with `stillpoint-nbd` into the
//! capture step (`docs/capture.md` has the whole sequence and why it is this one):
//! add a scratch node and a standalone `copy-before-write` filter per disk, run
//! the one bitmap `transaction`, switch each guest device onto its filter with
//! `qom-set`, export the point-in-time view through a `snapshot-access` node
//! over NBD, and clean up exports first, then the server, then the nodes. This
//! crate knows the protocol and the commands; it makes no backup decision
//! (which bitmap to rotate, whether to freeze) — that is the driver's job.
//!
//! Block jobs (`blockdev-backup`, `JOB_STATUS_CHANGE`, cancel and dismiss) are
//! bound as well, for callers that need them; the capture does not use the
//! backup job, because its built-in filter pauses the VM when the scratch space
//! runs out (`docs/capture.md`, "Why the standalone copy-before-write filter").
//!
//! # Layout
//! - [`codec`]: the wire format as pure functions over one line (greeting,
//!   command framing with `id`, return / error / event parsing).
//! - [`Qmp`]: the transport over any `AsyncRead + AsyncWrite` (and
//!   [`Qmp::connect_unix`]): negotiation, [`Qmp::execute`] with a per-command
//!   timeout, and [`Qmp::subscribe`] for events.
//! - Typed helpers (`query_named_block_nodes`, `transaction` with [`Action`]
//!   builders, `nbd_server_start_unix`, `block_export_add_nbd`, …) and waits
//!   for `JOB_STATUS_CHANGE` / `BLOCK_EXPORT_DELETED` ([`EventStream`]).
//!
//! # Invariants
//! - Replies are matched to commands by `id`, never by order: commands from
//!   clones of one [`Qmp`] may be in flight together, and events interleave.
//! - A command that times out (or whose future is dropped) never leaves half a
//!   line on the wire: one writer task writes whole lines.
//! - Malformed input from QEMU closes the connection with an error naming the
//!   line; every waiting and later command gets that error (a stream that is
//!   out of step cannot be trusted to match ids).
//! - Events keep QEMU's own timestamp ([`Timestamp`]): time block jobs from the
//!   stamp, not from when the event was read (it may sit unread while the
//!   caller talks to the guest agent).
//! - No lost event races: subscribe before issuing the command whose event you
//!   await; the `…_and_wait` helpers do this for you.
//!
//! # Why not `qapi-qmp`
//! `qapi-qmp` 0.15 (with its client crate `qapi`) was evaluated: its types are
//! generated from the QEMU **9.1** schema, and they did deserialize a 7.2
//! `query-named-block-nodes` reply here. Still it does not fit:
//! - the compiler would accept commands and fields QEMU 7.2 rejects (the types
//!   describe 9.1), so it gives a false sense of checking;
//! - the client has no per-command timeout and a single-consumer event
//!   stream, and logs through `log`: we would write the transport anyway;
//! - it adds ~24 s of generated-code build on these 2-core machines for the
//!   ~20 commands capture uses, and is passively maintained (about one release
//!   a year, single maintainer).
//!
//! So the arguments here are small serde types that produce exactly the 7.2
//! wire shape (unit-tested against the sequences verified on QEMU 7.2), and the
//! replies read only the fields capture needs, ignoring the rest.
//!
//! # Example
//! The point in time of one disk, as the capture takes it (`disk0` is the
//! node under the guest's device `/machine/peripheral/vd0/virtio-backend`):
//! ```no_run
//! # async fn demo() -> stillpoint_qmp::Result<()> {
//! use serde_json::json;
//! use stillpoint_qmp::{Action, BitmapRef, NbdExport, Qmp};
//! let qmp = Qmp::connect_unix("/run/vm/qmp.sock").await?;
//! qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "fl0",
//!                         "file": {"driver": "file", "filename": "/scratch/fl0.qcow2"}}))
//!     .await?;
//! qmp.blockdev_add(json!({"driver": "copy-before-write", "node-name": "cbw0",
//!                         "file": "disk0", "target": "fl0",
//!                         "on-cbw-error": "break-snapshot", "cbw-timeout": 60}))
//!     .await?;
//! // The bitmap rotation first, then the device onto the filter: a guest write
//! // between the two is recorded in the new bitmap.
//! qmp.transaction(vec![
//!     Action::bitmap_add("disk0", "b2", true),
//!     Action::bitmap_disable("disk0", "b1"),
//! ])
//! .await?;
//! qmp.qom_set("/machine/peripheral/vd0/virtio-backend", "drive", json!("cbw0"))
//!     .await?;
//! qmp.blockdev_add(json!({"driver": "snapshot-access", "node-name": "snap0", "file": "cbw0"}))
//!     .await?;
//! qmp.nbd_server_start_unix("/scratch/nbd.sock".as_ref()).await?;
//! qmp.block_export_add_nbd(
//!     &NbdExport::new("exp0", "snap0")
//!         .name("vd0")
//!         .bitmaps(vec![BitmapRef::on("disk0", "b1")]),
//! )
//! .await?;
//! # Ok(()) }
//! ```

mod client;
pub mod codec;
mod commands;
mod error;
mod events;
mod transaction;

pub use client::{DEFAULT_TIMEOUT, Qmp};
pub use codec::{Event, Greeting, QemuVersion, Timestamp};
pub use commands::{
    BitmapRef, BlockExportInfo, BlockInfo, BlockNodeInfo, DirtyBitmapInfo, ExportRemoveMode,
    ImageSummary, JobInfo, NbdExport, StatusInfo,
};
pub use error::{Error, ErrorKind, Result};
pub use events::{EventStream, JobStatus, JobStatusChange};
pub use transaction::{Action, BlockdevBackup, SyncMode};
