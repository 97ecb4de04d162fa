//! `stillpoint freeze`, `unfreeze` and `check` against real guests (TCG): the guarded freeze
//! really blocks a writer in the guest, the guardian thaws after the freezer dies, and the
//! level `check` reports matches what the agent allows.
#![cfg(feature = "vm-tests")]
