//! The repository passphrase and opening the repository.
//!
//! The passphrase comes from `--password-file FILE`, else `STILLPOINT_PASSWORD`, else a prompt
//! on the terminal — never from a command-line argument, and it is never logged. It is held as
//! a [`SecretString`] (zeroised when dropped, `[REDACTED]` in `Debug`). `STILLPOINT_PASSWORD`
//! (and every other secret variable of `stillpoint_os::secrets::SECRET_ENV_VARS`) is taken out
//! of the process's environment at start-up ([`keep_environment_secrets`], called by `main`), so
//! no child process — guardian, QEMU, qemu-img, a recipe's host hook — inherits it.

use std::io::IsTerminal;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};
use stillpoint_os::secrets::EnvSecrets;
use stillpoint_repo::{ErrorKind, ExposeSecret as _, Repository, SecretString};

use crate::context::Context;

/// Environment variable holding the passphrase.
pub use stillpoint_os::secrets::PASSWORD_ENV;

/// The secret variables' values, taken out of the environment by `main` before any thread.
static ENVIRONMENT_SECRETS: OnceLock<EnvSecrets> = OnceLock::new();

/// Keeps the secrets `main` took out of the environment, for [`environment_secret`].
pub fn keep_environment_secrets(secrets: EnvSecrets) {
    let _ = ENVIRONMENT_SECRETS.set(secrets);
}

/// The value secret variable `name` had when stillpoint started (it is no longer in the
/// environment).
pub fn environment_secret(name: &str) -> Option<&'static SecretString> {
    ENVIRONMENT_SECRETS.get()?.get(name)
}

/// Reads the passphrase. `confirm` asks twice on a prompt (for `repo init`).
pub fn passphrase(ctx: &Context, confirm: bool) -> anyhow::Result<SecretString> {
    if let Some(path) = &ctx.global.password_file {
        let text = SecretString::from(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the password file {}", path.display()))?,
        );
        let text = text.expose_secret();
        let pass = text.strip_suffix('\n').unwrap_or(text);
        let pass = pass.strip_suffix('\r').unwrap_or(pass);
        if pass.is_empty() {
            bail!("the password file {} is empty", path.display());
        }
        return Ok(SecretString::from(pass));
    }
    if let Some(pass) = environment_secret(PASSWORD_ENV) {
        if pass.expose_secret().is_empty() {
            bail!("{PASSWORD_ENV} is set but empty");
        }
        return Ok(pass.clone());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "the repository passphrase is needed: set {PASSWORD_ENV} or pass --password-file FILE"
        );
    }
    let pass = SecretString::from(rpassword::prompt_password("repository passphrase: ")?);
    if pass.expose_secret().is_empty() {
        bail!("the passphrase is empty");
    }
    if confirm {
        let again = SecretString::from(rpassword::prompt_password("repeat the passphrase: ")?);
        if again.expose_secret() != pass.expose_secret() {
            bail!("the two passphrases differ");
        }
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
            Ok(Repository::open_local(&path, Some(&pass))?)
        }
        Err(e) => Err(e.into()),
    }
}
