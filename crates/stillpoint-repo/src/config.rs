//! The repository's `config` object: plain JSON, written once by `init`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    CONFIG_FORMAT_NAME, MAX_CHUNK_SIZE, MAX_GC_GRACE_SECONDS, MIN_CHUNK_SIZE, REPO_FORMAT_VERSION,
};

/// Encryption mode of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// AES-256-GCM with a passphrase-wrapped master key; spelled `"aes256-gcm"` in `config`.
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

    /// Checks a zstd level: zstd's own range (negative levels are its fast modes).
    pub fn check_zstd_level(level: i32) -> Result<()> {
        let range = zstd::compression_level_range();
        if !range.contains(&level) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "zstd_level {level} is outside zstd's range {}..={}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(())
    }

    /// Checks a gc grace period (seconds): at most about 100 years.
    pub fn check_gc_grace(seconds: u64) -> Result<()> {
        if seconds > MAX_GC_GRACE_SECONDS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "gc_grace_seconds {seconds} is more than the {MAX_GC_GRACE_SECONDS} accepted"
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
        Self::check_chunk_size(config.chunk_size)
            .and_then(|()| Self::check_zstd_level(config.zstd_level))
            .and_then(|()| Self::check_gc_grace(config.gc_grace_seconds))
            .map_err(|e| {
                Error::corrupt(format!("repository config is invalid: {}", e.message()))
                    .with_path(&path)
            })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_CONFIG: &str = r#"{
  "format": "stillpoint-repository",
  "version": 1,
  "id": "90a4a1f3ca48b366",
  "chunk_size": 65536,
  "encryption": "aes256-gcm",
  "zstd_level": 1,
  "gc_grace_seconds": 86400,
  "created": "2026-12-04T18:51:35.900707016Z"
}"#;

    #[test]
    fn the_fixture_config_parses_with_the_spelling_of_the_spec() {
        let config = Config::from_json(FIXTURE_CONFIG.as_bytes(), "/r").unwrap();
        assert_eq!(config.encryption, Encryption::Aes256Gcm);
        assert_eq!(config.chunk_size, 65536);
        let written = serde_json::to_string(&config).unwrap();
        assert!(
            written.contains(r#""encryption":"aes256-gcm""#),
            "{written}"
        );
    }

    #[test]
    fn out_of_range_fields_name_the_file_and_field() {
        for (from, to, field) in [
            (
                r#""zstd_level": 1"#,
                r#""zstd_level": 99999"#,
                "zstd_level 99999",
            ),
            (
                r#""chunk_size": 65536"#,
                r#""chunk_size": 1000"#,
                "chunk size 1000",
            ),
            (
                r#""gc_grace_seconds": 86400"#,
                r#""gc_grace_seconds": 18446744073709551615"#,
                "gc_grace_seconds 18446744073709551615",
            ),
        ] {
            let text = FIXTURE_CONFIG.replace(from, to);
            let err = Config::from_json(text.as_bytes(), "/r").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            let message = err.to_string();
            assert!(message.contains(field), "{message}");
            assert!(message.contains("/r/config"), "{message}");
        }
    }

    proptest::proptest! {
        #[test]
        fn zstd_levels_are_accepted_exactly_in_zstds_range(level in proptest::num::i32::ANY) {
            let ok = Config::check_zstd_level(level).is_ok();
            proptest::prop_assert_eq!(ok, zstd::compression_level_range().contains(&level));
            if ok {
                // zstd really takes it.
                proptest::prop_assert!(zstd::bulk::Compressor::new(level).is_ok());
            }
        }
    }
}
