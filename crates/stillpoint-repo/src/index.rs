//! The fixed-chunk index of one disk: its size, chunk size and one digest per chunk.
//!
//! Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, disk_size))`, so a dirty
//! bitmap maps straight onto chunks. All-zero chunks have the entry [`ZERO_CHUNK_DIGEST`] and
//! are not stored. The plaintext layout is in `format` (`IndexHeader` then 32-byte entries);
//! it is stored inside a blob under `indexes/<snapshot id>/<disk position>`.

use crate::error::{Error, Result};
use crate::format::{INDEX_ENTRY_LEN, INDEX_HEADER_LEN, IndexHeader, ZERO_CHUNK_DIGEST};

/// A chunk digest (keyed BLAKE3).
pub type Digest = [u8; 32];

/// The index of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    disk_size: u64,
    chunk_size: u32,
    entries: Vec<Digest>,
}

/// Number of chunks of a disk of `disk_size` bytes.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

impl DiskIndex {
    /// An index of the right length with every chunk zero.
    pub fn new_zeroed(disk_size: u64, chunk_size: u32) -> Self {
        Self {
            disk_size,
            chunk_size,
            entries: vec![ZERO_CHUNK_DIGEST; chunk_count(disk_size, chunk_size) as usize],
        }
    }

    /// The disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The entries, one per chunk.
    pub fn entries(&self) -> &[Digest] {
        &self.entries
    }

    pub(crate) fn set(&mut self, chunk: usize, digest: Digest) {
        self.entries[chunk] = digest;
    }

    /// Byte range `(offset, len)` of chunk `i`.
    pub fn chunk_range(&self, i: usize) -> (u64, usize) {
        let offset = i as u64 * u64::from(self.chunk_size);
        let len = (self.disk_size - offset).min(u64::from(self.chunk_size)) as usize;
        (offset, len)
    }

    /// Whether chunk `i` is all zeros.
    pub fn is_zero(&self, i: usize) -> bool {
        self.entries[i] == ZERO_CHUNK_DIGEST
    }

    /// The plaintext bytes of this index.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = IndexHeader {
            disk_size: self.disk_size.to_le_bytes(),
            chunk_size: self.chunk_size.to_le_bytes(),
            flags: [0; 4],
            chunk_count: (self.entries.len() as u64).to_le_bytes(),
            reserved: [0; 8],
        };
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * INDEX_ENTRY_LEN);
        out.extend_from_slice(&header.disk_size);
        out.extend_from_slice(&header.chunk_size);
        out.extend_from_slice(&header.flags);
        out.extend_from_slice(&header.chunk_count);
        out.extend_from_slice(&header.reserved);
        for entry in &self.entries {
            out.extend_from_slice(entry);
        }
        out
    }

    /// Parses index plaintext; every inconsistency is a [`crate::ErrorKind::Corrupt`] error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(Error::corrupt(format!(
                "index is {} bytes, shorter than its {INDEX_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let disk_size = u64_at(0);
        let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4"));
        let count = u64_at(16);
        if flags != 0 {
            return Err(Error::corrupt(format!(
                "index has unknown flags {flags:#x}"
            )));
        }
        if chunk_size == 0 || count != chunk_count(disk_size, chunk_size) {
            return Err(Error::corrupt(format!(
                "index header is inconsistent: {count} chunks of {chunk_size} bytes for a disk of {disk_size} bytes"
            )));
        }
        let body = &bytes[INDEX_HEADER_LEN..];
        if body.len() as u64 != count * INDEX_ENTRY_LEN as u64 {
            return Err(Error::corrupt(format!(
                "index has {} bytes of entries, its header announces {count} entries",
                body.len()
            )));
        }
        let entries = body
            .chunks_exact(INDEX_ENTRY_LEN)
            .map(|e| e.try_into().expect("32-byte entry"))
            .collect();
        Ok(Self {
            disk_size,
            chunk_size,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer fixture with a comment per field.
    #[test]
    fn index_fixture_parses() {
        let mut bytes = vec![
            0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
            0x00, // disk size: 1 MiB + 0 (u64 LE) = 0x100000
            0x00, 0x00, 0x08, 0x00, // chunk size: 512 KiB (u32 LE)
            0x00, 0x00, 0x00, 0x00, // flags: none
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // chunk count: 2
            0, 0, 0, 0, 0, 0, 0, 0, // reserved
        ];
        bytes.extend_from_slice(&[0xaa; 32]); // chunk 0 digest
        bytes.extend_from_slice(&[0x00; 32]); // chunk 1: zero chunk
        let index = DiskIndex::from_bytes(&bytes).unwrap();
        assert_eq!(index.disk_size(), 1 << 20);
        assert_eq!(index.chunk_size(), 512 << 10);
        assert!(!index.is_zero(0));
        assert!(index.is_zero(1));
        assert_eq!(index.to_bytes(), bytes);
    }

    #[test]
    fn last_chunk_is_short_and_sizes_round_trip() {
        let mut index = DiskIndex::new_zeroed(10_000, 4096);
        assert_eq!(index.entries().len(), 3);
        assert_eq!(index.chunk_range(2), (8192, 10_000 - 8192));
        index.set(1, [5; 32]);
        assert_eq!(DiskIndex::from_bytes(&index.to_bytes()).unwrap(), index);
        let empty = DiskIndex::new_zeroed(0, 4096);
        assert_eq!(DiskIndex::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }

    #[test]
    fn inconsistent_headers_are_errors_not_panics() {
        let index = DiskIndex::new_zeroed(10_000, 4096);
        let mut bytes = index.to_bytes();
        bytes[16] = 9; // wrong count
        assert!(DiskIndex::from_bytes(&bytes).is_err());
        let mut bytes = index.to_bytes();
        bytes.pop(); // truncated entry
        assert!(DiskIndex::from_bytes(&bytes).is_err());
        assert!(DiskIndex::from_bytes(&[1, 2, 3]).is_err());
    }
}
