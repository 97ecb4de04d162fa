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

use crate::error::{Error, Result};
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
        assert!(
            plaintext.len() <= MAX_BLOB_PLAINTEXT,
            "blob plaintext too large"
        );
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
    match (header.encryption, keys.data_key()) {
        (ENCRYPTION_AES256GCM, Some(key)) => {
            let nonce = Nonce::try_assume_unique_for_key(&header.nonce).expect("12-byte nonce");
            let plain_len = key
                .open_in_place(
                    nonce,
                    Aad::from(aad_bytes(&header_bytes, identity)),
                    &mut blob[BLOB_HEADER_LEN..],
                )
                .map_err(|_| Error::corrupt("object fails authentication (AES-GCM tag mismatch)"))?
                .len();
            blob.truncate(BLOB_HEADER_LEN + plain_len);
        }
        (ENCRYPTION_NONE, None) => {
            let expected = checksum(&header_bytes, identity, &blob[BLOB_HEADER_LEN..body_end]);
            if blob[body_end..] != expected {
                return Err(Error::corrupt("object fails its checksum"));
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
    use crate::format::CHUNK_BLOB_MAGIC;

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

    /// Known-answer fixture of an unencrypted blob, with a comment per field.
    #[test]
    fn unencrypted_blob_fixture_decodes() {
        let mut blob = vec![
            0x67, 0x01, 0xca, 0xe8, 0x36, 0xfc, 0x74, 0xe5, // magic: chunk blob v1
            0x00, // compression: none
            0x00, // encryption: none
            0x00, 0x00, // reserved
            0x03, 0x00, 0x00, 0x00, // plaintext length: 3 (u32 LE)
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // nonce: unused, zero
            b'a', b'b', b'c', // body
        ];
        let mut header = [0u8; BLOB_HEADER_LEN];
        header.copy_from_slice(&blob[..BLOB_HEADER_LEN]);
        // tag: blake3(header | identity | body)[0..16]
        let tag = checksum(&header, b"", b"abc");
        blob.extend_from_slice(&tag);
        let mut out = Vec::new();
        decode(
            &Keys::unencrypted([0; 32]),
            crate::format::CHUNK_BLOB_MAGIC,
            b"",
            blob,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"abc");
    }
}
