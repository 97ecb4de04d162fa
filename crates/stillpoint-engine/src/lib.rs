//! Backup and restore orchestration, consistency planning, freeze guardian, reports.
//!
//! (Design note to be written with the crate's first real code.)
