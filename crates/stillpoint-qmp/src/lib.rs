//! QEMU monitor (QMP) client: negotiation, commands, events, block jobs.
//!
//! (Design note to be written with the crate's first real code.)
