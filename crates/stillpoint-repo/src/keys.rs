//! Keys: the master key material, its wrapping by a passphrase (Argon2id + AES-256-GCM),
//! and the key files under `keys/`.
//!
//! The master key material is 64 random bytes: the AES-256-GCM data key, then the key of the
//! keyed BLAKE3 that names chunks. Keyed chunk ids keep an observer of the repository from
//! confirming that it holds a known piece of data. A repository created `--unencrypted` has no
//! data key; its chunk-id key is stored in `config` (there is nothing to keep secret).

use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    KDF_SALT_LEN, KEY_WRAP_AAD, MASTER_KEY_LEN, MAX_KDF_ITERATIONS, MAX_KDF_MEMORY_KIB,
    MAX_KDF_PARALLELISM,
};

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

    /// Checks the parameters against the bounds this build accepts (so that a damaged key
    /// file can neither allocate without limit nor run for hours). `Err` names the field:
    /// `"params.memory_kib is 6291456, more than the 1048576 accepted"`.
    pub fn check(&self) -> std::result::Result<(), String> {
        let bad = |field: &str, value: u32, range: std::ops::RangeInclusive<u32>| {
            (!range.contains(&value)).then(|| {
                format!(
                    "params.{field} is {value}, outside the accepted {}..={}",
                    range.start(),
                    range.end()
                )
            })
        };
        let problem = bad("parallelism", self.parallelism, 1..=MAX_KDF_PARALLELISM)
            .or_else(|| bad("iterations", self.iterations, 1..=MAX_KDF_ITERATIONS))
            .or_else(|| {
                // Argon2 needs 8 KiB per lane.
                let min = 8 * self.parallelism.max(1);
                bad("memory_kib", self.memory_kib, min..=MAX_KDF_MEMORY_KIB)
            });
        match problem {
            Some(message) => Err(message),
            None => Ok(()),
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
    /// Base64 of AES-256-GCM(master key material) with its 16-byte tag appended (the
    /// ciphertext of the secret, not the secret).
    pub wrapped: String,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// The 64 bytes of master key material; wiped on drop, never printed.
pub(crate) type MasterKey = Zeroizing<[u8; MASTER_KEY_LEN]>;

/// Secret keys of an open repository. The id key is wiped on drop; the AES key schedule lives
/// inside `ring`'s `LessSafeKey`, which neither prints nor exposes it.
pub struct Keys {
    id_key: Zeroizing<[u8; 32]>,
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

/// Argon2id of `passphrase`. `key_name` names the key file in errors. The parameters are
/// checked first; the memory is allocated with `try_reserve`, so a failure is an error naming
/// the file, not an abort.
fn derive_wrapping_key(
    passphrase: &SecretString,
    salt: &[u8],
    params: KdfParams,
    key_name: &str,
) -> Result<Zeroizing<[u8; 32]>> {
    params.check().map_err(|problem| {
        Error::corrupt(format!(
            "key file has Argon2id parameters this build refuses: {problem}"
        ))
        .with_path(key_name)
    })?;
    if salt.len() != KDF_SALT_LEN {
        return Err(Error::corrupt(format!(
            "key file has a salt of {} bytes, expected {KDF_SALT_LEN}",
            salt.len()
        ))
        .with_path(key_name));
    }
    let argon_params = Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| {
        Error::corrupt(format!("key file has invalid Argon2id parameters: {e}")).with_path(key_name)
    })?;
    let blocks_len = argon_params.block_count();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let mut blocks: Zeroizing<Vec<Block>> = Zeroizing::new(Vec::new());
    blocks.try_reserve_exact(blocks_len).map_err(|_| {
        Error::new(
            ErrorKind::Io,
            format!(
                "not enough memory for the key file's Argon2id parameters ({} KiB)",
                params.memory_kib
            ),
        )
        .with_path(key_name)
    })?;
    blocks.resize(blocks_len, Block::default());
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into_with_memory(
            passphrase.expose_secret().as_bytes(),
            salt,
            out.as_mut_slice(),
            blocks.as_mut_slice(),
        )
        .map_err(|e| {
            Error::corrupt(format!("cannot derive the wrapping key: {e}")).with_path(key_name)
        })?;
    Ok(out)
}

fn aes_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"))
}

impl Keys {
    /// Fresh random master key material for a new encrypted repository.
    pub(crate) fn generate_encrypted() -> (Self, MasterKey) {
        let master: MasterKey = Zeroizing::new(random_bytes());
        (Self::from_master(&master), master)
    }

    /// Keys of an unencrypted repository: only the chunk-id key.
    pub(crate) fn unencrypted(id_key: [u8; 32]) -> Self {
        Self {
            id_key: Zeroizing::new(id_key),
            data_key: None,
            rng: SystemRandom::new(),
        }
    }

    pub(crate) fn from_master(master: &[u8; MASTER_KEY_LEN]) -> Self {
        let mut id_key = Zeroizing::new([0u8; 32]);
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
        passphrase: &SecretString,
        params: KdfParams,
    ) -> Result<KeyFile> {
        params.check().map_err(|problem| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("Argon2id parameters refused: {problem}"),
            )
        })?;
        Self::wrap_with(master, passphrase, params, random_bytes(), random_bytes())
    }

    fn wrap_with(
        master: &[u8; MASTER_KEY_LEN],
        passphrase: &SecretString,
        params: KdfParams,
        salt: [u8; KDF_SALT_LEN],
        nonce: [u8; 12],
    ) -> Result<KeyFile> {
        let wrapping =
            aes_key(derive_wrapping_key(passphrase, &salt, params, "new key file")?.as_slice());
        let mut buf = Zeroizing::new(master.to_vec());
        wrapping
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(KEY_WRAP_AAD),
                &mut *buf,
            )
            .map_err(|_| Error::new(ErrorKind::Io, "cannot wrap the master key"))?;
        Ok(KeyFile {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: B64.encode(salt),
            nonce: B64.encode(nonce),
            wrapped: B64.encode(&*buf),
            created: chrono::Utc::now(),
        })
    }

    /// Opens a key file with `passphrase`; `Ok(None)` when the passphrase does not fit it.
    pub(crate) fn unwrap(
        file: &KeyFile,
        passphrase: &SecretString,
        key_name: &str,
    ) -> Result<Option<Self>> {
        Ok(Self::unwrap_master(file, passphrase, key_name)?.map(|m| Self::from_master(&m)))
    }

    pub(crate) fn unwrap_master(
        file: &KeyFile,
        passphrase: &SecretString,
        key_name: &str,
    ) -> Result<Option<MasterKey>> {
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
        let mut buf = Zeroizing::new(B64.decode(&file.wrapped).map_err(|_| bad("wrapped key"))?);
        if buf.len() != MASTER_KEY_LEN + 16 {
            return Err(bad("wrapped key length"));
        }
        let wrapping =
            aes_key(derive_wrapping_key(passphrase, &salt, file.params, key_name)?.as_slice());
        match wrapping.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(KEY_WRAP_AAD),
            &mut buf,
        ) {
            Ok(plain) => {
                let mut master: MasterKey = Zeroizing::new([0u8; MASTER_KEY_LEN]);
                master.copy_from_slice(plain);
                Ok(Some(master))
            }
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The key file of the pinned fixture (`tests/fixtures/v1/encrypted/keys/…`), as written
    /// by the format-version-1 code.
    pub(crate) const FIXTURE_KEY_FILE: &str = r#"{"version": 1, "kdf": "argon2id", "params": {"memory_kib": 8192, "iterations": 1, "parallelism": 1}, "salt": "d8iCFGKhOEhzIyZLsY4GqA==", "nonce": "mol+BtC52abEcOQc", "wrapped": "aznyY6bkIt+nmW+drX3u0nzEyT9L3bPI4zJCQpDfH8Mgjf6ITGYvdvXPHAcNUSIq1lLj6RyrhvDonS9IqnpaY6o7lBHA6PhvfvNrh9yd+L8=", "created": "2026-12-04T18:51:35.900680026Z"}"#;
    pub(crate) const FIXTURE_PASSPHRASE: &str = "stillpoint fixture passphrase";
    /// Its master key material, computed independently of this crate (Python `cryptography`:
    /// Argon2id(m=8192, t=1, p=1) then AES-256-GCM open with AAD "stillpoint master key v1").
    pub(crate) const FIXTURE_MASTER_HEX: &str = "05d21607dc944e246650f1705a78611ee92126b165af4129a70e2348e34f26b9df738a9122dba262320e300d57e89f08c3dcc34b2e35fd4787f0679120a4d635";

    pub(crate) fn fixture_master() -> [u8; MASTER_KEY_LEN] {
        hex::decode(FIXTURE_MASTER_HEX).unwrap().try_into().unwrap()
    }

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    #[test]
    fn wrap_then_unwrap_with_the_right_passphrase_only() {
        let (keys, master) = Keys::generate_encrypted();
        let file = Keys::wrap(&master, &secret("correct horse"), KdfParams::for_tests()).unwrap();
        let opened = Keys::unwrap(&file, &secret("correct horse"), "keys/k")
            .unwrap()
            .unwrap();
        assert_eq!(opened.chunk_id(b"abc"), keys.chunk_id(b"abc"));
        assert!(
            Keys::unwrap(&file, &secret("wrong"), "keys/k")
                .unwrap()
                .is_none()
        );
    }

    /// Known answer (fixed bytes): Argon2id with the fixture's salt and parameters.
    #[test]
    fn argon2id_wrapping_key_is_the_pinned_one() {
        let salt = B64.decode("d8iCFGKhOEhzIyZLsY4GqA==").unwrap();
        let key = derive_wrapping_key(
            &secret(FIXTURE_PASSPHRASE),
            &salt,
            KdfParams::for_tests(),
            "keys/425f76d93a899889",
        )
        .unwrap();
        assert_eq!(
            hex::encode(key.as_slice()),
            "aa7f901d659248fbd8b0e8c9be84c9c00f3a90b018c0085b312b76efb20d462e"
        );
    }

    /// Known answer (fixed bytes): the fixture's key file opens to the pinned master key.
    #[test]
    fn fixture_key_file_unwraps_to_the_pinned_master_key() {
        let file: KeyFile = serde_json::from_str(FIXTURE_KEY_FILE).unwrap();
        let master = Keys::unwrap_master(&file, &secret(FIXTURE_PASSPHRASE), "keys/x")
            .unwrap()
            .unwrap();
        assert_eq!(hex::encode(master.as_slice()), FIXTURE_MASTER_HEX);
        // And wrapping that master again with the same salt and nonce gives the same bytes.
        let again = Keys::wrap_with(
            &fixture_master(),
            &secret(FIXTURE_PASSPHRASE),
            file.params,
            B64.decode(&file.salt).unwrap().try_into().unwrap(),
            B64.decode(&file.nonce).unwrap().try_into().unwrap(),
        )
        .unwrap();
        assert_eq!(again.wrapped, file.wrapped);
    }

    /// Known answer: chunk ids are keyed BLAKE3 with the last 32 bytes of the master key.
    #[test]
    fn chunk_id_is_keyed_blake3_of_the_id_key() {
        let keys = Keys::from_master(&fixture_master());
        // The fixture's `vdb` chunk is named by this id (its object key).
        let mut vdb = b"vdb: ".to_vec();
        let mut n = 0;
        while vdb.len() < 1000 {
            vdb.extend_from_slice(format!("stillpoint fixture line {n}\n").as_bytes());
            n += 1;
        }
        vdb.truncate(1000);
        assert_eq!(
            hex::encode(keys.chunk_id(&vdb)),
            "8666fc925b88bb442fe8ceed06b60b6fa814771e42c41c1a78dc7bd8adf1a03d"
        );
    }

    #[test]
    fn keys_and_passphrases_do_not_print() {
        let keys = Keys::from_master(&fixture_master());
        let printed = format!("{keys:?} {:?}", secret(FIXTURE_PASSPHRASE));
        assert!(!printed.contains("fixture"), "{printed}");
        assert!(!printed.contains("05d216"), "{printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }

    #[test]
    fn kdf_bounds_name_the_field() {
        assert!(KdfParams::default().check().is_ok());
        assert!(KdfParams::for_tests().check().is_ok());
        let huge = KdfParams {
            memory_kib: 6 << 20,
            ..KdfParams::default()
        };
        assert!(
            huge.check()
                .unwrap_err()
                .contains("params.memory_kib is 6291456")
        );
        let slow = KdfParams {
            iterations: u32::MAX,
            ..KdfParams::default()
        };
        assert!(slow.check().unwrap_err().contains("params.iterations"));
        let lanes = KdfParams {
            parallelism: 0,
            ..KdfParams::default()
        };
        assert!(lanes.check().unwrap_err().contains("params.parallelism"));
    }

    proptest! {
        /// Any parameters in a key file: either refused up front with the file and field
        /// named, or within bounds (never an unbounded allocation or an endless derivation).
        #[test]
        fn damaged_kdf_parameters_are_refused_naming_the_file(
            memory_kib in prop_oneof![0u32..8, (MAX_KDF_MEMORY_KIB + 1)..=u32::MAX],
            iterations in prop_oneof![Just(0u32), (MAX_KDF_ITERATIONS + 1)..=u32::MAX],
            parallelism in 0u32..=u32::MAX,
            which in 0usize..3,
        ) {
            let mut file: KeyFile = serde_json::from_str(FIXTURE_KEY_FILE).unwrap();
            match which {
                0 => file.params.memory_kib = memory_kib,
                1 => file.params.iterations = iterations,
                _ => {
                    file.params.parallelism = parallelism;
                    prop_assume!(file.params.check().is_err());
                }
            }
            let err = Keys::unwrap(&file, &secret(FIXTURE_PASSPHRASE), "keys/425f76d93a899889")
                .expect_err("out-of-bounds parameters are refused");
            let text = err.to_string();
            prop_assert_eq!(err.kind(), ErrorKind::Corrupt);
            prop_assert!(text.contains("keys/425f76d93a899889"), "{}", text);
            prop_assert!(text.contains("params."), "{}", text);
        }
    }
}
