//! QEMU guest agent (qemu-ga) client: `guest-sync-delimited` framing, typed commands,
//! per-command timeouts.
//!
//! This is what the freeze guardian, `stillpoint check`, recipes (guest exec hooks) and
//! backups use to talk to the agent inside a guest over its virtio-serial channel (on plain
//! QEMU a unix socket chardev). It knows nothing about backups.
//!
//! # Layout
//! - [`codec`]: the wire format, pure (no I/O): request encoding, a push decoder that cuts
//!   newline-delimited replies and handles the 0xFF sentinel, reply parsing. Tested against
//!   byte fixtures and random byte streams.
//! - [`Client`]: runs the codec over any `AsyncRead + AsyncWrite` (a `UnixStream` from
//!   [`connect_unix`], a `tokio::io::duplex` in tests); typed calls; [`Client::run`].
//! - [`Error`] / [`ErrorKind`]: one error type; callers match the kind
//!   (e.g. [`DisabledReason::Frozen`] for "the agent is in frozen state").
//! - [`measure_freeze_thaw`]: freeze/thaw round-trip latencies for benchmarks.
//!
//! # Invariants
//! - **Never desynchronised.** The client syncs before its first command and again after any
//!   command that did not end with a complete reply (timeout, malformed or oversized reply,
//!   I/O error, or the caller dropping the future): write 0xFF (the agent drops any partial
//!   request), send `guest-sync-delimited {id: random}`, drop input up to the 0xFF that
//!   precedes the sync reply, and skip replies until the one with this id. A late reply to a
//!   timed-out command therefore never passes for the reply to a later one.
//! - **One command at a time.** Calls take `&mut self`: qemu-ga answers in order and is not
//!   pipelined. Share a client behind a `tokio::sync::Mutex`.
//! - **Every wait is bounded** ([`Timeouts`]): short for queries, long for freeze/thaw. A
//!   busy or absent agent (the chardev takes one client at a time; a second one connects but
//!   gets no answer) surfaces as [`ErrorKind::NotAnswering`] after the sync timeout.
//! - **Bad bytes are errors, never panics**, with an escaped excerpt; a reply line is bounded
//!   ([`codec::DEFAULT_MAX_LINE`]) so a broken peer cannot make us buffer without end.
//! - **Nothing here thaws by itself.** Freezing is a single command; keeping a guest from
//!   staying frozen (thaw on every path, the guardian) is the engine's job.
//!
//! # Why not `qapi-qga` for the types
//! `qapi-qga` 0.13 (arcnmx/qapi-rs, last release 2024-09, schema up to QEMU 9.1) was
//! evaluated: it builds (≈7 s including its code generator) and its structs decode
//! qemu-ga 7.2's replies. It is not used because:
//! 1. its schema enums are closed: `GuestDiskBusType` has no catch-all, so a guest whose
//!    qemu-ga is newer than the crate's bundled schema (guests update independently of the
//!    host) and reports a new bus type would fail `guest-get-fsinfo` as a whole — the
//!    preflight and `stillpoint check` depend on that call;
//! 2. its framing (`qapi` crate) handles only plain `guest-sync`, not the 0xFF sentinel of
//!    `guest-sync-delimited`, so the transport has to be ours anyway, and with it only the
//!    ~10 reply structs we use would come from the crate;
//! 3. those would put a passively-maintained, single-maintainer 0.x crate's generated types
//!    (raw `i64`s, `Option`s for every optional member, `Vec<u8>` output) into our public
//!    API, and a build-time code generator into our build.
//!
//! So the reply types ([`AgentInfo`], [`FsInfo`], [`ExecStatus`], …) are written by hand
//! from `qga/qapi-schema.json` for the commands we call, with extensible enums kept as
//! strings; any other command is reachable through [`Client::execute`].
//!
//! # Known limits
//! - `guest-exec` kills: the agent has no kill command; [`Client::run`] kills a guest process
//!   that outlives its limit with `kill -KILL <pid>` through `guest-exec`, which signals that
//!   process only, not its children (see there).
//! - With qemu-ga 7.2, `guest-get-fsinfo` takes a disk's `serial` from the udev database; in
//!   a guest without udev (the test guest) it is absent, and the PCI address identifies the
//!   disk.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> stillpoint_qga::Result<()> {
//! use std::time::Duration;
//! let mut agent = stillpoint_qga::connect_unix("/run/vm1-qga.sock", Duration::from_secs(5)).await?;
//! agent.ping().await?;
//! let frozen = agent.fsfreeze_freeze().await?;
//! // … start the capture …
//! let thawed = agent.fsfreeze_thaw().await?;
//! assert_eq!(frozen, thawed);
//! # Ok(()) }
//! ```

mod client;
pub mod codec;
mod error;
mod latency;
mod types;

pub use client::{Client, Timeouts, connect_unix};
pub use error::{DisabledReason, EXCERPT_LEN, Error, ErrorKind, Result};
pub use latency::{
    FreezeThawRound, LatencySummary, measure_freeze_thaw, measure_freeze_thaw_round,
};
pub use types::{
    AgentInfo, CommandInfo, DiskAddress, ExecRequest, ExecStatus, FreezeStatus, FsInfo, OsInfo,
    PciAddress,
};
