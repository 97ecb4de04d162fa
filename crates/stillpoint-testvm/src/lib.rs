//! Builds the test/demo guest from Debian packages and launches local QEMU VMs (tests, demo, benches).
//!
//! (Design note to be written with the crate's first real code.)
