//! Keys: the master key material, its wrapping by a passphrase (Argon2id + AES-256-GCM),
//! and the key files under `keys/`.
//!
//! The master key material is 64 random bytes: the AES-256-GCM data key, then the key of the
//! keyed BLAKE3 that names chunks. Keyed chunk ids keep an observer of the repository from
//! confirming that it holds a known piece of data. A repository created `--unencrypted` has no
//! data key; its chunk-id key is stored in `config` (there is nothing to keep secret).

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{KEY_WRAP_AAD, MASTER_KEY_LEN};

/// Argon2id cost parameters, stored in each key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about 0.2 s here, within the RSS budget of 256 MiB.
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only (8 MiB, 1 pass): never use them for real data.
    pub fn for_tests() -> Self {
        Self {
            memory_kib: 8 * 1024,
            iterations: 1,
            parallelism: 1,
        }
    }
}

/// The JSON stored at `keys/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeyFile {
    pub version: u32,
    pub kdf: String,
    pub params: KdfParams,
    /// Base64 salt (16 bytes).
    pub salt: String,
    /// Base64 nonce (12 bytes).
    pub nonce: String,
    /// Base64 of AES-256-GCM(master key material) with its 16-byte tag appended.
    pub wrapped: String,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// Secret keys of an open repository.
pub struct Keys {
    id_key: [u8; 32],
    data_key: Option<LessSafeKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys")
            .field("encrypted", &self.data_key.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random source does not fail on Linux");
    out
}

fn derive_wrapping_key(passphrase: &str, salt: &[u8], params: KdfParams) -> Result<[u8; 32]> {
    let argon_params = Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| Error::corrupt(format!("invalid Argon2id parameters in key file: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut out)
        .map_err(|e| Error::corrupt(format!("cannot derive the wrapping key: {e}")))?;
    Ok(out)
}

fn aes_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"))
}

impl Keys {
    /// Fresh random master key material for a new encrypted repository.
    pub(crate) fn generate_encrypted() -> (Self, [u8; MASTER_KEY_LEN]) {
        let master: [u8; MASTER_KEY_LEN] = random_bytes();
        (Self::from_master(&master), master)
    }

    /// Keys of an unencrypted repository: only the chunk-id key.
    pub(crate) fn unencrypted(id_key: [u8; 32]) -> Self {
        Self {
            id_key,
            data_key: None,
            rng: SystemRandom::new(),
        }
    }

    fn from_master(master: &[u8; MASTER_KEY_LEN]) -> Self {
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&master[32..64]);
        Self {
            id_key,
            data_key: Some(aes_key(&master[0..32])),
            rng: SystemRandom::new(),
        }
    }

    /// Whether blobs are encrypted.
    pub fn encrypted(&self) -> bool {
        self.data_key.is_some()
    }

    /// The chunk id: keyed BLAKE3 of the plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    pub(crate) fn data_key(&self) -> Option<&LessSafeKey> {
        self.data_key.as_ref()
    }

    pub(crate) fn fill_nonce(&self, nonce: &mut [u8; 12]) {
        self.rng
            .fill(nonce)
            .expect("the OS random source does not fail on Linux");
    }

    /// Wraps `master` with a key derived from `passphrase`.
    pub(crate) fn wrap(
        master: &[u8; MASTER_KEY_LEN],
        passphrase: &str,
        params: KdfParams,
    ) -> Result<KeyFile> {
        let salt: [u8; 16] = random_bytes();
        let nonce: [u8; 12] = random_bytes();
        let wrapping = aes_key(&derive_wrapping_key(passphrase, &salt, params)?);
        let mut buf = master.to_vec();
        wrapping
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(KEY_WRAP_AAD),
                &mut buf,
            )
            .map_err(|_| Error::new(ErrorKind::Io, "cannot wrap the master key"))?;
        Ok(KeyFile {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: B64.encode(salt),
            nonce: B64.encode(nonce),
            wrapped: B64.encode(&buf),
            created: chrono::Utc::now(),
        })
    }

    /// Opens a key file with `passphrase`; `Ok(None)` when the passphrase does not fit it.
    pub(crate) fn unwrap(file: &KeyFile, passphrase: &str, key_name: &str) -> Result<Option<Self>> {
        let bad = |what: &str| {
            Error::corrupt(format!("key file has an invalid {what}")).with_path(key_name)
        };
        if file.kdf != "argon2id" || file.version != 1 {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "key file uses {} version {}, this build reads argon2id version 1",
                    file.kdf, file.version
                ),
            )
            .with_path(key_name));
        }
        let salt = B64.decode(&file.salt).map_err(|_| bad("salt"))?;
        let nonce: [u8; 12] = B64
            .decode(&file.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| bad("nonce"))?;
        let mut buf = B64.decode(&file.wrapped).map_err(|_| bad("wrapped key"))?;
        if buf.len() != MASTER_KEY_LEN + 16 {
            return Err(bad("wrapped key length"));
        }
        let wrapping = aes_key(&derive_wrapping_key(passphrase, &salt, file.params)?);
        match wrapping.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(KEY_WRAP_AAD),
            &mut buf,
        ) {
            Ok(plain) => {
                let mut master = [0u8; MASTER_KEY_LEN];
                master.copy_from_slice(plain);
                Ok(Some(Self::from_master(&master)))
            }
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_then_unwrap_with_the_right_passphrase_only() {
        let (keys, master) = Keys::generate_encrypted();
        let file = Keys::wrap(&master, "correct horse", KdfParams::for_tests()).unwrap();
        let opened = Keys::unwrap(&file, "correct horse", "keys/k")
            .unwrap()
            .unwrap();
        assert_eq!(opened.chunk_id(b"abc"), keys.chunk_id(b"abc"));
        assert!(Keys::unwrap(&file, "wrong", "keys/k").unwrap().is_none());
    }

    /// Known answer: chunk ids are keyed BLAKE3 (pins the id function of the format).
    #[test]
    fn chunk_id_is_keyed_blake3() {
        let keys = Keys::unencrypted([0x42; 32]);
        let id = keys.chunk_id(b"stillpoint");
        assert_eq!(
            id,
            *blake3::keyed_hash(&[0x42; 32], b"stillpoint").as_bytes()
        );
        assert_ne!(id, *blake3::hash(b"stillpoint").as_bytes());
    }
}
