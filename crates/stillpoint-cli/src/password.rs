//! The repository passphrase and opening the repository.
//!
//! The passphrase comes from `--password-file FILE`, else `STILLPOINT_PASSWORD`, else a prompt
//! on the terminal — never from a command-line argument, and it is never logged.

use std::io::IsTerminal;

use anyhow::{Context as _, bail};
use stillpoint_repo::{ErrorKind, Repository, SecretString};

use crate::context::Context;

/// Environment variable holding the passphrase.
pub const PASSWORD_ENV: &str = "STILLPOINT_PASSWORD";

/// Reads the passphrase. `confirm` asks twice on a prompt (for `repo init`).
pub fn passphrase(ctx: &Context, confirm: bool) -> anyhow::Result<String> {
    if let Some(path) = &ctx.global.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?;
        let pass = text.strip_suffix('\n').unwrap_or(&text);
        let pass = pass.strip_suffix('\r').unwrap_or(pass);
        if pass.is_empty() {
            bail!("the password file {} is empty", path.display());
        }
        return Ok(pass.to_string());
    }
    if let Ok(pass) = std::env::var(PASSWORD_ENV) {
        if pass.is_empty() {
            bail!("{PASSWORD_ENV} is set but empty");
        }
        return Ok(pass);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "the repository passphrase is needed: set {PASSWORD_ENV} or pass --password-file FILE"
        );
    }
    let pass = rpassword::prompt_password("repository passphrase: ")?;
    if pass.is_empty() {
        bail!("the passphrase is empty");
    }
    if confirm && rpassword::prompt_password("repeat the passphrase: ")? != pass {
        bail!("the two passphrases differ");
    }
    Ok(pass)
}

/// Opens the repository of `ctx`, asking for the passphrase only if it is encrypted.
pub fn open_repository(ctx: &Context) -> anyhow::Result<Repository> {
    let path = ctx.repo_path();
    match Repository::open_local(&path, None) {
        Ok(repo) => Ok(repo),
        Err(e) if e.kind() == ErrorKind::PassphraseRequired => {
            let pass = passphrase(ctx, false)?;
            Ok(Repository::open_local(
                &path,
                Some(&SecretString::from(pass)),
            )?)
        }
        Err(e) => Err(e.into()),
    }
}
