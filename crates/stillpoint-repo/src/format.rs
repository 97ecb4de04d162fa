//! Every magic number and fixed size of the on-disk format, in one place.
//!
//! PLEASE DO NOT MODIFY THESE VALUES: repositories written with them must stay readable
//! (`tests/fixtures/v1` and the fixed-bytes vectors hold every build to it).
//! A change of layout gets a new magic and a new [`REPO_FORMAT_VERSION`]; an extension that
//! older readers refuse cleanly and that leaves existing objects unchanged (the segmented-index
//! flag) stays within the version and is listed in the document.
//! `docs/repository-format.md` describes the same bytes for other tools.

/// The repository format version written to (and required in) `config`.
pub const REPO_FORMAT_VERSION: u32 = 1;

/// The `format` field of `config`, so that a stray JSON file is not taken for a repository.
pub const CONFIG_FORMAT_NAME: &str = "stillpoint-repository";

/// Blob magic of a data chunk: `blake3(b"stillpoint chunk blob v1")[0..8]`.
pub const CHUNK_BLOB_MAGIC: [u8; 8] = [0x67, 0x01, 0xca, 0xe8, 0x36, 0xfc, 0x74, 0xe5];
/// Blob magic of a per-disk index: `blake3(b"stillpoint fixed index blob v1")[0..8]`.
pub const INDEX_BLOB_MAGIC: [u8; 8] = [0x7c, 0x63, 0xcb, 0x1a, 0x36, 0x07, 0xb1, 0x49];
/// Blob magic of a snapshot manifest: `blake3(b"stillpoint manifest blob v1")[0..8]`.
pub const MANIFEST_BLOB_MAGIC: [u8; 8] = [0x8c, 0xcc, 0x29, 0x60, 0xa3, 0x78, 0x17, 0x55];

/// Blob header: magic (8), compression (1), encryption (1), reserved (2), plaintext length
/// (u32 LE, 4), nonce (12).
pub const BLOB_HEADER_LEN: usize = 28;
/// Every blob ends with 16 bytes: the AES-GCM tag, or (unencrypted) a BLAKE3 checksum prefix.
pub const BLOB_TAG_LEN: usize = 16;
/// Largest plaintext a blob may carry. Chunks are at most 64 MiB and indexes are split into
/// segments of [`INDEX_SEGMENT_ENTRIES`], so only a manifest could reach it (an error).
pub const MAX_BLOB_PLAINTEXT: usize = 512 << 20;

/// Compression byte: stored as is.
pub const COMPRESSION_NONE: u8 = 0;
/// Compression byte: a zstd frame.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Encryption byte: none (the tag is a BLAKE3 checksum).
pub const ENCRYPTION_NONE: u8 = 0;
/// Encryption byte: AES-256-GCM with the repository's data key.
pub const ENCRYPTION_AES256GCM: u8 = 1;

/// The layout of a blob header, checked at compile time against [`BLOB_HEADER_LEN`].
#[repr(C)]
pub(crate) struct BlobHeader {
    pub magic: [u8; 8],
    pub compression: u8,
    pub encryption: u8,
    pub reserved: [u8; 2],
    pub plaintext_len: [u8; 4],
    pub nonce: [u8; 12],
}
const _: () = assert!(std::mem::size_of::<BlobHeader>() == BLOB_HEADER_LEN);

impl BlobHeader {
    pub fn to_bytes(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut out = [0u8; BLOB_HEADER_LEN];
        out[0..8].copy_from_slice(&self.magic);
        out[8] = self.compression;
        out[9] = self.encryption;
        out[10..12].copy_from_slice(&self.reserved);
        out[12..16].copy_from_slice(&self.plaintext_len);
        out[16..28].copy_from_slice(&self.nonce);
        out
    }

    pub fn from_bytes(bytes: &[u8; BLOB_HEADER_LEN]) -> Self {
        let mut header = BlobHeader {
            magic: [0; 8],
            compression: bytes[8],
            encryption: bytes[9],
            reserved: [bytes[10], bytes[11]],
            plaintext_len: [0; 4],
            nonce: [0; 12],
        };
        header.magic.copy_from_slice(&bytes[0..8]);
        header.plaintext_len.copy_from_slice(&bytes[12..16]);
        header.nonce.copy_from_slice(&bytes[16..28]);
        header
    }
}

/// Index plaintext header: disk size (u64 LE), chunk size (u32 LE), flags (u32, zero),
/// chunk count (u64 LE), reserved (8 zero bytes); then `chunk count` digests of 32 bytes.
pub const INDEX_HEADER_LEN: usize = 32;
/// Index flag: the index is split into segments (see `index`); the first 4 reserved bytes of
/// the header hold the entries per segment (u32 LE). Written only for indexes of more than
/// [`INDEX_SEGMENT_ENTRIES`] chunks, so smaller ones are unchanged from format version 1.
pub const INDEX_FLAG_SEGMENTED: u32 = 1;
/// Entries per index segment written (32 MiB of digests per blob).
pub const INDEX_SEGMENT_ENTRIES: u32 = 1 << 20;
/// Most entries per segment a reader accepts (a segment must fit in a blob).
pub const MAX_INDEX_SEGMENT_ENTRIES: u32 =
    ((MAX_BLOB_PLAINTEXT - INDEX_HEADER_LEN) / INDEX_ENTRY_LEN) as u32;
/// Most chunks of one disk (chunk numbers are u32): 256 TiB at 64 KiB chunks, 16 PiB at
/// 4 MiB. The index of such a disk takes 32 bytes per chunk in memory.
pub const MAX_CHUNKS_PER_DISK: u64 = u32::MAX as u64;
/// Bytes per index entry: the chunk's keyed BLAKE3 digest ([`ZERO_CHUNK_DIGEST`] for zeros).
pub const INDEX_ENTRY_LEN: usize = 32;

/// The layout of an index header, checked at compile time against [`INDEX_HEADER_LEN`].
#[repr(C)]
pub(crate) struct IndexHeader {
    pub disk_size: [u8; 8],
    pub chunk_size: [u8; 4],
    pub flags: [u8; 4],
    pub chunk_count: [u8; 8],
    pub reserved: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<IndexHeader>() == INDEX_HEADER_LEN);

/// The index entry of an all-zero chunk: such chunks are recorded, never stored.
/// A real keyed BLAKE3 digest equal to this has probability 2^-256.
pub const ZERO_CHUNK_DIGEST: [u8; 32] = [0; 32];

/// Default fixed chunk size for disk images (4 MiB: a multiple of every dirty-bitmap
/// granularity QEMU uses by default (64 KiB), large enough to keep indexes small).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Smallest chunk size `init` accepts.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size `init` accepts.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// Largest `gc_grace_seconds` accepted (about 100 years): time arithmetic never overflows.
pub const MAX_GC_GRACE_SECONDS: u64 = 100 * 366 * 24 * 3600;

/// Associated data that binds the wrapped master key to its purpose.
pub const KEY_WRAP_AAD: &[u8] = b"stillpoint master key v1";
/// Length of the master key material: data key (32) then chunk-id key (32).
pub const MASTER_KEY_LEN: usize = 64;
/// Length of the Argon2id salt in a key file.
pub const KDF_SALT_LEN: usize = 16;
/// Largest Argon2id memory a key file may ask for (1 GiB, in KiB): a damaged key file must
/// not make every command allocate without limit.
pub const MAX_KDF_MEMORY_KIB: u32 = 1 << 20;
/// Most Argon2id passes a key file may ask for (at 1 GiB, some 20 s here).
pub const MAX_KDF_ITERATIONS: u32 = 16;
/// Most Argon2id lanes a key file may ask for.
pub const MAX_KDF_PARALLELISM: u32 = 16;
/// Largest `config` or key file object this build reads (they are a few hundred bytes).
pub const MAX_JSON_OBJECT_LEN: u64 = 64 << 10;

/// zstd output is kept only when it is at most this fraction (num/den) of the input;
/// otherwise the chunk is stored raw (it costs a little space, saves decompression later).
pub const COMPRESS_KEEP_NUM: usize = 31;
/// See [`COMPRESS_KEEP_NUM`].
pub const COMPRESS_KEEP_DEN: usize = 32;

/// Object key prefixes.
pub mod keys {
    /// The repository's configuration (plain JSON).
    pub const CONFIG: &str = "config";
    /// Wrapped master keys, one JSON object per passphrase.
    pub const KEYS: &str = "keys/";
    /// Snapshot manifests, one blob per snapshot, named by snapshot id.
    pub const SNAPSHOTS: &str = "snapshots/";
    /// Per-disk indexes: `indexes/<snapshot id>/<disk position>`.
    pub const INDEXES: &str = "indexes/";
    /// Chunks: `chunks/<first two hex digits>/<64 hex digits>`.
    pub const CHUNKS: &str = "chunks/";
    /// Lock objects (JSON).
    pub const LOCKS: &str = "locks/";
    /// Records of finished garbage collections (JSON).
    pub const GC: &str = "gc/";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(label: &[u8]) -> [u8; 8] {
        let mut out = [0u8; 8];
        out.copy_from_slice(&blake3::hash(label).as_bytes()[0..8]);
        out
    }

    /// Known answers: the magics are what their doc comments say they are.
    #[test]
    fn magics_match_their_derivation() {
        assert_eq!(CHUNK_BLOB_MAGIC, derived(b"stillpoint chunk blob v1"));
        assert_eq!(INDEX_BLOB_MAGIC, derived(b"stillpoint fixed index blob v1"));
        assert_eq!(MANIFEST_BLOB_MAGIC, derived(b"stillpoint manifest blob v1"));
    }

    #[test]
    fn header_round_trips() {
        let header = BlobHeader {
            magic: CHUNK_BLOB_MAGIC,
            compression: COMPRESSION_ZSTD,
            encryption: ENCRYPTION_AES256GCM,
            reserved: [0, 0],
            plaintext_len: 4096u32.to_le_bytes(),
            nonce: [7; 12],
        };
        let bytes = header.to_bytes();
        let back = BlobHeader::from_bytes(&bytes);
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(u32::from_le_bytes(back.plaintext_len), 4096);
    }
}
