//! The secret environment variables, and taking them out of the process's own environment.
//!
//! A secret in the environment reaches every child process (a third-party hook script, QEMU
//! for the VM's whole life) and is readable in `/proc/PID/environ` by the same user for as
//! long as the child lives. So the CLI takes every listed variable out of its own environment
//! at start-up ([`take_from_environment`]), keeps the values in memory as [`SecretString`]s,
//! and [`crate::child::command`] removes them again from every child (defence in depth for
//! library callers that never ran the start-up step).

use std::collections::BTreeMap;

use secrecy::SecretString;

/// The repository passphrase.
pub const PASSWORD_ENV: &str = "STILLPOINT_PASSWORD";

/// Every environment variable that holds a secret: removed from the environment of every
/// child process, and taken out of the CLI's own environment at start-up.
pub const SECRET_ENV_VARS: &[&str] = &[
    PASSWORD_ENV,
    // S3-compatible repositories (credentials for the object store).
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Secret values taken out of the environment at start-up, by variable name.
#[derive(Debug, Default)]
pub struct EnvSecrets {
    values: BTreeMap<&'static str, SecretString>,
}

impl EnvSecrets {
    /// The value a secret variable had at start-up (`None` when it was unset or not UTF-8).
    pub fn get(&self, name: &str) -> Option<&SecretString> {
        self.values.get(name)
    }
}

/// Takes every [`SECRET_ENV_VARS`] variable out of this process's environment and returns
/// their values.
///
/// # Safety
/// Changing the environment is only sound while no other thread exists (another thread may
/// read the environment at the same time, e.g. in `getaddrinfo`). Call this first thing in
/// `main`, before an async runtime or any other thread starts.
#[allow(unsafe_code)]
pub unsafe fn take_from_environment() -> EnvSecrets {
    let mut values = BTreeMap::new();
    for &name in SECRET_ENV_VARS {
        if let Ok(value) = std::env::var(name) {
            values.insert(name, SecretString::from(value));
        }
        // SAFETY: the caller guarantees that no other thread exists (this function's contract).
        unsafe { std::env::remove_var(name) };
    }
    EnvSecrets { values }
}
