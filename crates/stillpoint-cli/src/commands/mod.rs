//! One module per command group: each owns its clap arguments and its `run` function.

pub mod annotations;
pub mod backup;
pub mod backup_image;
pub mod bench;
pub mod check;
pub mod demo;
pub mod freeze;
pub mod recipe;
pub mod repo;
pub mod restore;
pub mod snapshots;
pub mod vm;
