//! QEMU guest agent client: guest-sync-delimited framing, typed commands, per-command timeouts.
//!
//! (Design note to be written with the crate's first real code.)
