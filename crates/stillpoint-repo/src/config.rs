//! The repository's `config` object: plain JSON, written once by `init`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{CONFIG_FORMAT_NAME, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, REPO_FORMAT_VERSION};

/// Encryption mode of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// AES-256-GCM with a passphrase-wrapped master key.
    Aes256Gcm,
    /// None (chosen explicitly at init).
    None,
}

/// The `config` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Always [`CONFIG_FORMAT_NAME`].
    pub format: String,
    /// Format version ([`REPO_FORMAT_VERSION`]).
    pub version: u32,
    /// Random repository id (16 hex digits).
    pub id: String,
    /// Fixed chunk size for disk images, bytes.
    pub chunk_size: u32,
    /// Encryption mode.
    pub encryption: Encryption,
    /// zstd level for chunks.
    pub zstd_level: i32,
    /// Seconds an unreferenced chunk is kept before gc may delete it.
    pub gc_grace_seconds: u64,
    /// Chunk-id key, hex; present only in unencrypted repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    /// When the repository was created.
    pub created: chrono::DateTime<chrono::Utc>,
}

impl Config {
    /// Checks a chunk size chosen at init.
    pub fn check_chunk_size(chunk_size: u32) -> Result<()> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "chunk size {chunk_size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
                ),
            ));
        }
        Ok(())
    }

    /// Parses and checks `config`; `location` names the repository in errors.
    pub fn from_json(bytes: &[u8], location: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<String>,
            version: Option<u32>,
        }
        let path = format!("{location}/config");
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt("repository config is not valid JSON")
                .with_path(&path)
                .with_source(e)
        })?;
        if probe.format.as_deref() != Some(CONFIG_FORMAT_NAME) {
            return Err(Error::corrupt(format!(
                "this is not a stillpoint repository config (format is {:?}, expected {CONFIG_FORMAT_NAME:?})",
                probe.format
            ))
            .with_path(&path));
        }
        if probe.version != Some(REPO_FORMAT_VERSION) {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "repository has format version {}, this stillpoint reads version {REPO_FORMAT_VERSION}",
                    probe.version.map_or("(none)".to_string(), |v| v.to_string())
                ),
            )
            .with_path(&path));
        }
        let config: Config = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt("repository config has missing or invalid fields")
                .with_path(&path)
                .with_source(e)
        })?;
        Self::check_chunk_size(config.chunk_size).map_err(|e| {
            Error::corrupt(format!("repository config is invalid: {}", e.message()))
                .with_path(&path)
        })?;
        Ok(config)
    }
}
