//! What every room needs from the host OS: child processes without secrets, process liveness,
//! the runtime directory, names that become file names, atomic file writes — and one way to
//! write an error with its causes.
//!
//! Design note. These helpers used to be copied from crate to crate, and the copies drifted
//! (two zombie semantics for "is this process alive", two runtime-root rules, seven file-name
//! sanitisers that mapped `a b` and `a_b` to the same lease file). Each now has one home here,
//! below every other stillpoint crate (it depends on no stillpoint crate):
//!
//! - [`child`]: every child process (guardian, QEMU, qemu-img, recipe host hooks) is built by
//!   [`child::command`], which removes the [`secrets::SECRET_ENV_VARS`] from the environment
//!   it inherits; an explicit `.env(...)` set afterwards still applies (benches hand a bench
//!   passphrase to child `stillpoint` processes on purpose). [`child::die_with_parent`] and
//!   [`child::new_session`] are the two `pre_exec` set-ups children need.
//! - [`secrets`]: the one list of secret environment variables, and taking them out of the
//!   process's own environment at start-up, before any thread exists.
//! - [`process`]: whether a process lives (a zombie counts as dead).
//! - [`runtime`]: the runtime root (`$STILLPOINT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/stillpoint`,
//!   else `/tmp/stillpoint-<uid>`), created 0700 and refused when someone else owns it or
//!   group/others may write it: it holds leases, agent and monitor sockets, and scratch images
//!   with guest data in clear.
//! - [`names`]: the one check of names that become paths or snapshot names, and an injective
//!   escaping of arbitrary strings into file names.
//! - [`fs`]: atomic file writes (temporary file + rename), so readers never see half a file.
//! - [`error_chain`]: an error and its causes on one line, for notes, reports and logs (four
//!   crates had their own copy).

mod chain;
pub mod child;
pub mod error;
pub mod fs;
pub mod names;
pub mod process;
pub mod runtime;
pub mod secrets;

pub use chain::error_chain;
pub use error::{Error, Result};
