//! The one framing of every stored chunk, index and manifest (pure: bytes in, bytes out).
//!
//! ```text
//! header (28 bytes, see format::BlobHeader) | body | tag (16 bytes)
//! ```
//! The body is the plaintext, zstd-compressed when that saves at least 1/32, then encrypted
//! with AES-256-GCM under a random 96-bit nonce. The associated data is the header followed by
//! the object's identity (a chunk's digest, an index's or manifest's key), so that neither the
//! flags nor the object can be swapped. Unencrypted blobs end with the first 16 bytes of
//! `blake3(header | identity | body)` instead of a tag: corruption is still detected.
//! This module is the only place that computes chunk digests' framing, so all writers agree.

use ring::aead::{Aad, Nonce, Tag};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BLOB_HEADER_LEN, BLOB_TAG_LEN, BlobHeader, COMPRESS_KEEP_DEN, COMPRESS_KEEP_NUM,
    COMPRESSION_NONE, COMPRESSION_ZSTD, ENCRYPTION_AES256GCM, ENCRYPTION_NONE, MAX_BLOB_PLAINTEXT,
};
use crate::keys::Keys;

/// Reusable per-thread state for encoding (a zstd context and a scratch buffer).
pub(crate) struct BlobEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl BlobEncoder {
    pub fn new(level: i32) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::io("cannot create a zstd compressor", e))?;
        Ok(Self {
            compressor,
            scratch: Vec::new(),
        })
    }

    /// Frames `plaintext` into `out` (cleared first). `compress` false skips zstd.
    pub fn encode(
        &mut self,
        keys: &Keys,
        magic: [u8; 8],
        identity: &[u8],
        plaintext: &[u8],
        compress: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        check_plaintext_len(plaintext.len())?;
        let mut compression = COMPRESSION_NONE;
        let mut body: &[u8] = plaintext;
        if compress && !plaintext.is_empty() {
            let bound = zstd::zstd_safe::compress_bound(plaintext.len());
            self.scratch.clear();
            self.scratch.reserve(bound);
            let written = self
                .compressor
                .compress_to_buffer(plaintext, &mut self.scratch)
                .map_err(|e| Error::io("zstd compression failed", e))?;
            if written * COMPRESS_KEEP_DEN <= plaintext.len() * COMPRESS_KEEP_NUM {
                compression = COMPRESSION_ZSTD;
                body = &self.scratch[..written];
            }
        }
        let mut header = BlobHeader {
            magic,
            compression,
            encryption: if keys.encrypted() {
                ENCRYPTION_AES256GCM
            } else {
                ENCRYPTION_NONE
            },
            reserved: [0; 2],
            plaintext_len: (plaintext.len() as u32).to_le_bytes(),
            nonce: [0; 12],
        };
        if keys.encrypted() {
            keys.fill_nonce(&mut header.nonce);
        }
        let header_bytes = header.to_bytes();
        out.clear();
        out.reserve(BLOB_HEADER_LEN + body.len() + BLOB_TAG_LEN);
        out.extend_from_slice(&header_bytes);
        out.extend_from_slice(body);
        let tag = seal_or_checksum(keys, &header_bytes, identity, &mut out[BLOB_HEADER_LEN..])?;
        out.extend_from_slice(&tag);
        Ok(())
    }
}

/// Refuses a plaintext larger than a blob may carry (indexes are split into segments below
/// this size, chunks are at most 64 MiB; a larger manifest is an error, never a panic).
pub(crate) fn check_plaintext_len(len: usize) -> Result<()> {
    if len > MAX_BLOB_PLAINTEXT {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "an object of {len} bytes is larger than the {MAX_BLOB_PLAINTEXT} bytes a blob may carry"
            ),
        ));
    }
    Ok(())
}

fn aad_bytes(header: &[u8; BLOB_HEADER_LEN], identity: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(BLOB_HEADER_LEN + identity.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(identity);
    aad
}

fn checksum(header: &[u8; BLOB_HEADER_LEN], identity: &[u8], body: &[u8]) -> [u8; BLOB_TAG_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    hasher.update(identity);
    hasher.update(body);
    let mut out = [0u8; BLOB_TAG_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..BLOB_TAG_LEN]);
    out
}

fn seal_or_checksum(
    keys: &Keys,
    header: &[u8; BLOB_HEADER_LEN],
    identity: &[u8],
    body: &mut [u8],
) -> Result<[u8; BLOB_TAG_LEN]> {
    match keys.data_key() {
        Some(key) => {
            let nonce = Nonce::try_assume_unique_for_key(&header[16..28]).expect("12-byte nonce");
            let tag: Tag = key
                .seal_in_place_separate_tag(nonce, Aad::from(aad_bytes(header, identity)), body)
                .map_err(|_| Error::corrupt("AES-GCM refused to seal a blob"))?;
            let mut out = [0u8; BLOB_TAG_LEN];
            out.copy_from_slice(tag.as_ref());
            Ok(out)
        }
        None => Ok(checksum(header, identity, body)),
    }
}

/// Checks, decrypts and decompresses a blob into `out`. Errors say what is wrong; callers add
/// the object's path / snapshot / disk / offset.
pub(crate) fn decode(
    keys: &Keys,
    magic: [u8; 8],
    identity: &[u8],
    mut blob: Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    if blob.len() < BLOB_HEADER_LEN + BLOB_TAG_LEN {
        return Err(Error::corrupt(format!(
            "object is truncated ({} bytes, a blob has at least {})",
            blob.len(),
            BLOB_HEADER_LEN + BLOB_TAG_LEN
        )));
    }
    let mut header_bytes = [0u8; BLOB_HEADER_LEN];
    header_bytes.copy_from_slice(&blob[..BLOB_HEADER_LEN]);
    let header = BlobHeader::from_bytes(&header_bytes);
    if header.magic != magic {
        return Err(Error::corrupt(
            "object has the wrong magic (damaged, or not this kind of object)",
        ));
    }
    let plaintext_len = u32::from_le_bytes(header.plaintext_len) as usize;
    let body_end = blob.len() - BLOB_TAG_LEN;
    // An uncompressed body has exactly the plaintext's length: a shorter object is truncated
    // (said before authentication fails, which would only say "tag mismatch").
    let expected_len = BLOB_HEADER_LEN + plaintext_len + BLOB_TAG_LEN;
    if header.compression == COMPRESSION_NONE && blob.len() != expected_len {
        return Err(Error::corrupt(format!(
            "object is {}: {} bytes, its header announces {expected_len} (or the header is damaged)",
            if blob.len() < expected_len {
                "truncated"
            } else {
                "longer than its header says"
            },
            blob.len()
        )));
    }
    let size = blob.len();
    match (header.encryption, keys.data_key()) {
        (ENCRYPTION_AES256GCM, Some(key)) => {
            let nonce = Nonce::try_assume_unique_for_key(&header.nonce).expect("12-byte nonce");
            let plain_len = key
                .open_in_place(
                    nonce,
                    Aad::from(aad_bytes(&header_bytes, identity)),
                    &mut blob[BLOB_HEADER_LEN..],
                )
                .map_err(|_| {
                    Error::corrupt(format!(
                        "object fails authentication (AES-GCM tag mismatch): damaged or truncated ({size} bytes)"
                    ))
                })?
                .len();
            blob.truncate(BLOB_HEADER_LEN + plain_len);
        }
        (ENCRYPTION_NONE, None) => {
            let expected = checksum(&header_bytes, identity, &blob[BLOB_HEADER_LEN..body_end]);
            if blob[body_end..] != expected {
                return Err(Error::corrupt(format!(
                    "object fails its checksum: damaged or truncated ({size} bytes)"
                )));
            }
            blob.truncate(body_end);
        }
        (ENCRYPTION_NONE, Some(_)) | (ENCRYPTION_AES256GCM, None) => {
            return Err(Error::corrupt(
                "object's encryption flag does not match the repository",
            ));
        }
        (other, _) => {
            return Err(Error::corrupt(format!(
                "object has an unknown encryption type {other}"
            )));
        }
    }
    // From here the header is authenticated (AAD or checksum).
    let body = &blob[BLOB_HEADER_LEN..];
    out.clear();
    match header.compression {
        COMPRESSION_NONE => {
            if body.len() != plaintext_len {
                return Err(Error::corrupt("object's length does not match its header"));
            }
            out.extend_from_slice(body);
        }
        COMPRESSION_ZSTD => {
            if plaintext_len > MAX_BLOB_PLAINTEXT {
                return Err(Error::corrupt("object's plaintext length is implausible"));
            }
            out.reserve(plaintext_len);
            let written = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(body, out))
                .map_err(|e| Error::corrupt("object's zstd frame is damaged").with_source(e))?;
            if written != plaintext_len {
                return Err(Error::corrupt("object's length does not match its header"));
            }
        }
        other => {
            return Err(Error::corrupt(format!(
                "object has an unknown compression type {other}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CHUNK_BLOB_MAGIC, INDEX_BLOB_MAGIC, MANIFEST_BLOB_MAGIC};

    fn keys(encrypted: bool) -> Keys {
        if encrypted {
            Keys::generate_encrypted().0
        } else {
            Keys::unencrypted([1; 32])
        }
    }

    #[rstest::rstest]
    #[case::encrypted(true)]
    #[case::plain(false)]
    fn round_trip_and_every_bit_flip_is_caught(#[case] encrypted: bool) {
        let keys = keys(encrypted);
        let mut enc = BlobEncoder::new(1).unwrap();
        let plain: Vec<u8> = b"hello hello hello hello hello hello hello hello".repeat(10);
        let mut blob = Vec::new();
        enc.encode(&keys, CHUNK_BLOB_MAGIC, b"id", &plain, true, &mut blob)
            .unwrap();
        assert_eq!(blob[8], COMPRESSION_ZSTD, "compressible data is compressed");
        let mut out = Vec::new();
        decode(&keys, CHUNK_BLOB_MAGIC, b"id", blob.clone(), &mut out).unwrap();
        assert_eq!(out, plain);
        for byte in 0..blob.len() {
            let mut bad = blob.clone();
            bad[byte] ^= 0x10;
            assert!(
                decode(&keys, CHUNK_BLOB_MAGIC, b"id", bad, &mut out).is_err(),
                "flip at byte {byte} went unnoticed"
            );
        }
        assert!(decode(&keys, CHUNK_BLOB_MAGIC, b"other", blob, &mut out).is_err());
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let keys = keys(true);
        let mut enc = BlobEncoder::new(1).unwrap();
        let plain: Vec<u8> = (0..65536u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let mut blob = Vec::new();
        enc.encode(&keys, CHUNK_BLOB_MAGIC, b"", &plain, true, &mut blob)
            .unwrap();
        assert_eq!(blob[8], COMPRESSION_NONE);
        assert_eq!(blob.len(), plain.len() + BLOB_HEADER_LEN + BLOB_TAG_LEN);
    }

    /// Fixed bytes: the `vdb` index blob of `tests/fixtures/v1/unencrypted` (zstd body,
    /// BLAKE3 checksum tag), identity = its key.
    const UNENCRYPTED_INDEX_BLOB: &str = "7c63cb1a3607b149010000004000000000000000000000000000000028b52ffd20408501007402e80300010001008410a8e2a32563e092679048db8d1a4f2c1f83b6316a7c77abc1b8f39e5a385b03100082197687672f8a5a6de33d4dfff6d500c0188068";
    /// Fixed bytes: the same index in `tests/fixtures/v1/encrypted` (AES-256-GCM).
    const ENCRYPTED_INDEX_BLOB: &str = "7c63cb1a3607b14901010000400000007df8585a5350a1ac50459468af805f3d2253ae4eca7ace38a341381ca5674250e0d209f0f3a50b04464338566a3a2de0b77a9c244e63954dba99316c53949db3ef5f3531c7abcc30aa12d7acf3c1f58c31fbe15348";
    /// Fixed bytes: the fixture's encrypted `vdb` chunk (identity = its 32-byte id).
    const ENCRYPTED_CHUNK_BLOB: &str = "6701cae836fc74e501010000e8030000c7a220e1cf18b85edcd148a37ebb416bdbe142ed4d6b33adca8904a0f4f8500b697bd0589da13ccefcce0194a770448f43bbe58844bd821f6269dbadd22816439545554313ab686cc48ea51c13bcfe10e8a3afb13184773acd9965e651de9df5cb7cd15743eb957857a08eee78b9faca334234f0904d70af3837c0d1a9258147260a85e921c2eedbb5ba156e8c870821d5121fd57b8e59f1a82f45b20f006be3f18ab7d913b6fa45bce9473476d7";
    /// Fixed bytes: the fixture's encrypted manifest.
    const ENCRYPTED_MANIFEST_BLOB: &str = "8ccc2960a37817550101000073020000b048a528008fff62a4aefc17ac5cf05c3a169238416dc265ecdd28751d05f0c8d887a6ab08becfdd30e432d6ae7e469b8dafa6ca89316b376234c0440f04264c85ca51d01521acd1c762a7576cd924b46accb431cfbb9a74700abc33ef975a9dfc41f0ea9f3db6cc4a5d9aaea96cd17c0ab0e76f3c7da07c7c8d73dadf2287ba7087013c7ec3c530f5584d03566a1f74ebc47ce4c23d754c729196e8c82901276b9aded6c436525f9349c5769932197a632e6c695c0fa1e1eced3af284228da679e5248f39b76835254be2271cf8329480701c27e1e5e284d560c26cd386da17aeeb3a5e8a6e7767a156fa72dff792ed90d4ff23d1195313f149eea8c31c416795d7824f9b3858fc68fe2b6b6117c26aab5d0f2c8868f2faf9b5a2fe41c2e97c64fb67ac5c21ddc17a488446c214d280b3a7fccfeac6d6913ce86bd0e64b2588aff447ef8b13a8ff65fb7df49da3ff40e90f9d3a9531f336";
    /// The plaintext of the `vdb` index: 1000 bytes, chunk size 65536, flags 0, 1 chunk,
    /// reserved, then the chunk id (header fields in order, little-endian).
    const VDB_INDEX_PLAINTEXT_ENCRYPTED: &str = concat!(
        "e803000000000000",
        "00000100",
        "00000000",
        "0100000000000000",
        "0000000000000000",
        "8666fc925b88bb442fe8ceed06b60b6fa814771e42c41c1a78dc7bd8adf1a03d"
    );
    const VDB_INDEX_PLAINTEXT_UNENCRYPTED: &str = concat!(
        "e803000000000000",
        "00000100",
        "00000000",
        "0100000000000000",
        "0000000000000000",
        "8410a8e2a32563e092679048db8d1a4f2c1f83b6316a7c77abc1b8f39e5a385b"
    );
    const FIXTURE_MANIFEST: &str = r#"{"version":1,"id":"6b130bb7371bcecb","vm":"fixture-vm","platform":"image:fixture","time":"2026-12-04T12:00:00Z","hostname":"vm","parent":null,"disks":[{"name":"vda","size":199608,"chunk_size":65536,"index":"indexes/6b130bb7371bcecb/0","stats":{"bytes_read":199608,"chunks_new":2,"chunks_reused":1,"chunks_unchanged":0,"chunks_zero":1,"bytes_stored":4911}},{"name":"vdb","size":1000,"chunk_size":65536,"index":"indexes/6b130bb7371bcecb/1","stats":{"bytes_read":1000,"chunks_new":1,"chunks_reused":0,"chunks_unchanged":0,"chunks_zero":0,"bytes_stored":190}}],"requested":"crash","achieved":"crash","indications":[],"report":null}"#;
    const UNENCRYPTED_ID_KEY: &str =
        "6a75989580072709180f6618ce54786115fce40ee999dcd5ea06567db29bbc7d";

    fn fixture_keys() -> Keys {
        Keys::from_master(&crate::keys::tests::fixture_master())
    }

    fn decoded(keys: &Keys, magic: [u8; 8], identity: &[u8], blob_hex: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        decode(
            keys,
            magic,
            identity,
            hex::decode(blob_hex).unwrap(),
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn fixed_unencrypted_index_blob_decodes() {
        let keys = Keys::unencrypted(hex::decode(UNENCRYPTED_ID_KEY).unwrap().try_into().unwrap());
        let plain = decoded(
            &keys,
            INDEX_BLOB_MAGIC,
            b"indexes/6b130bb8a2798fb8/1",
            UNENCRYPTED_INDEX_BLOB,
        )
        .unwrap();
        assert_eq!(hex::encode(plain), VDB_INDEX_PLAINTEXT_UNENCRYPTED);
        // The checksum covers the identity: the same bytes under another key are refused.
        assert!(
            decoded(
                &keys,
                INDEX_BLOB_MAGIC,
                b"indexes/6b130bb8a2798fb8/0",
                UNENCRYPTED_INDEX_BLOB
            )
            .is_err()
        );
    }

    #[test]
    fn fixed_encrypted_blobs_decode_with_the_fixture_master_key() {
        let keys = fixture_keys();
        let index = decoded(
            &keys,
            INDEX_BLOB_MAGIC,
            b"indexes/6b130bb7371bcecb/1",
            ENCRYPTED_INDEX_BLOB,
        )
        .unwrap();
        assert_eq!(hex::encode(index), VDB_INDEX_PLAINTEXT_ENCRYPTED);
        let manifest = decoded(
            &keys,
            MANIFEST_BLOB_MAGIC,
            b"snapshots/6b130bb7371bcecb",
            ENCRYPTED_MANIFEST_BLOB,
        )
        .unwrap();
        assert_eq!(String::from_utf8(manifest).unwrap(), FIXTURE_MANIFEST);
        let id = hex::decode("8666fc925b88bb442fe8ceed06b60b6fa814771e42c41c1a78dc7bd8adf1a03d")
            .unwrap();
        let chunk = decoded(&keys, CHUNK_BLOB_MAGIC, &id, ENCRYPTED_CHUNK_BLOB).unwrap();
        assert_eq!(chunk.len(), 1000);
        assert!(chunk.starts_with(b"vdb: stillpoint fixture line 0\nstillpoint fixture line 1\n"));
        assert_eq!(keys.chunk_id(&chunk).to_vec(), id);
    }

    #[test]
    fn unencrypted_encoding_is_deterministic_and_pinned() {
        // Raw (uncompressed) body: header | body | blake3(header | identity | body)[..16].
        let keys = Keys::unencrypted([0; 32]);
        let mut enc = BlobEncoder::new(1).unwrap();
        let mut blob = Vec::new();
        enc.encode(&keys, CHUNK_BLOB_MAGIC, b"", b"abc", false, &mut blob)
            .unwrap();
        assert_eq!(
            hex::encode(&blob[..BLOB_HEADER_LEN + 3]),
            concat!(
                "6701cae836fc74e5",         // magic: chunk blob v1
                "00",                       // compression: none
                "00",                       // encryption: none
                "0000",                     // reserved
                "03000000",                 // plaintext length 3 (u32 LE)
                "000000000000000000000000", // nonce: unused, zero
                "616263"                    // body "abc"
            )
        );
        let mut out = Vec::new();
        decode(&keys, CHUNK_BLOB_MAGIC, b"", blob, &mut out).unwrap();
        assert_eq!(out, b"abc");
    }

    #[rstest::rstest]
    #[case::encrypted(true)]
    #[case::plain(false)]
    fn truncation_is_named_with_sizes(#[case] encrypted: bool) {
        let keys = keys(encrypted);
        let mut enc = BlobEncoder::new(1).unwrap();
        let mut blob = Vec::new();
        enc.encode(
            &keys,
            CHUNK_BLOB_MAGIC,
            b"id",
            &[7u8; 1000],
            false,
            &mut blob,
        )
        .unwrap();
        blob.truncate(600);
        let mut out = Vec::new();
        let err = decode(&keys, CHUNK_BLOB_MAGIC, b"id", blob, &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "object is truncated: 600 bytes, its header announces 1044 (or the header is damaged)"
        );
    }

    #[test]
    fn oversized_plaintext_is_an_error_not_a_panic() {
        assert!(check_plaintext_len(MAX_BLOB_PLAINTEXT).is_ok());
        let err = check_plaintext_len(MAX_BLOB_PLAINTEXT + 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
