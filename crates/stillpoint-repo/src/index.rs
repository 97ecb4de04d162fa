//! The fixed-chunk index of one disk: its size, chunk size and one digest per chunk.
//!
//! Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, disk_size))`, so a dirty
//! bitmap maps straight onto chunks. All-zero chunks have the entry [`ZERO_CHUNK_DIGEST`] and
//! are not stored. The plaintext layout is in `format` (`IndexHeader` then 32-byte entries);
//! it is stored inside a blob under `indexes/<snapshot id>/<disk position>`.
//!
//! An index of more than [`crate::format::INDEX_SEGMENT_ENTRIES`] chunks (4 TiB at 4 MiB chunks, 64 GiB at
//! 64 KiB) is split into segments so that no blob exceeds the format's limit whatever the disk
//! size: segment 0 (the header, flag [`INDEX_FLAG_SEGMENTED`], the entries per segment in the
//! first 4 reserved bytes, then its entries) stays at the index's key, segment `k ≥ 1` (entries
//! only) is at `<key>.<k>`. Smaller indexes are one blob, byte for byte as format version 1
//! wrote them.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    INDEX_ENTRY_LEN, INDEX_FLAG_SEGMENTED, INDEX_HEADER_LEN, IndexHeader, MAX_CHUNKS_PER_DISK,
    MAX_INDEX_SEGMENT_ENTRIES, ZERO_CHUNK_DIGEST,
};

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

/// The key of segment `k` of the index stored at `key`.
pub(crate) fn segment_key(key: &str, k: usize) -> String {
    if k == 0 {
        key.to_string()
    } else {
        format!("{key}.{k}")
    }
}

/// Whether `key` names a segment `k ≥ 1` (not an index by itself).
pub(crate) fn is_continuation_segment(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|last| last.contains('.'))
}

/// What the first blob of an index says about the rest.
pub(crate) struct IndexHead {
    /// The index so far: header and the entries of segment 0.
    pub index: DiskIndex,
    /// Entries the whole index has.
    pub count: u64,
    /// Entries per segment, when segmented.
    pub segment_entries: Option<u32>,
}

impl IndexHead {
    /// Number of segments (1 when not segmented).
    pub fn segments(&self) -> usize {
        match self.segment_entries {
            Some(seg) => self.count.div_ceil(u64::from(seg)).max(1) as usize,
            None => 1,
        }
    }

    /// Appends segment `k ≥ 1`; checks that it has exactly the entries it must have.
    pub fn push_segment(&mut self, k: usize, bytes: &[u8]) -> Result<()> {
        let seg = u64::from(
            self.segment_entries
                .expect("only segmented indexes have more"),
        );
        let first = k as u64 * seg;
        let expected = (self.count - first).min(seg);
        if self.index.entries.len() as u64 != first
            || bytes.len() as u64 != expected * INDEX_ENTRY_LEN as u64
        {
            return Err(Error::corrupt(format!(
                "index segment {k} has {} bytes of entries, the header announces {expected} entries ({} bytes)",
                bytes.len(),
                expected * INDEX_ENTRY_LEN as u64
            )));
        }
        self.index.entries.extend(
            bytes
                .chunks_exact(INDEX_ENTRY_LEN)
                .map(|e| -> Digest { e.try_into().expect("32-byte entry") }),
        );
        Ok(())
    }

    /// The complete index, after every segment was pushed.
    pub fn finish(self) -> Result<DiskIndex> {
        if self.index.entries.len() as u64 != self.count {
            return Err(Error::corrupt(format!(
                "index has {} of its {} entries",
                self.index.entries.len(),
                self.count
            )));
        }
        Ok(self.index)
    }
}

impl DiskIndex {
    /// An index of the right length with every chunk zero. Refuses a disk with more chunks
    /// than an index may hold ([`MAX_CHUNKS_PER_DISK`]).
    pub fn new_zeroed(disk_size: u64, chunk_size: u32) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "chunk size is zero"));
        }
        let count = chunk_count(disk_size, chunk_size);
        if count > MAX_CHUNKS_PER_DISK {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a disk of {disk_size} bytes has {count} chunks of {chunk_size} bytes, more than the {MAX_CHUNKS_PER_DISK} an index holds: use a repository with a larger chunk size"
                ),
            ));
        }
        Ok(Self {
            disk_size,
            chunk_size,
            entries: vec![ZERO_CHUNK_DIGEST; count as usize],
        })
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

    /// The number of blobs this index is stored in with `segment_entries` entries per segment.
    pub(crate) fn segment_count(&self, segment_entries: u32) -> usize {
        if self.entries.len() as u64 <= u64::from(segment_entries) {
            1
        } else {
            self.entries.len().div_ceil(segment_entries as usize)
        }
    }

    /// The plaintext of segment `k` (of [`Self::segment_count`]); a one-segment index is the
    /// unsegmented format-version-1 layout.
    pub(crate) fn segment_bytes(&self, k: usize, segment_entries: u32) -> Vec<u8> {
        let segmented = self.segment_count(segment_entries) > 1;
        let seg = if segmented {
            segment_entries as usize
        } else {
            self.entries.len()
        };
        let range = (k * seg).min(self.entries.len())..((k + 1) * seg).min(self.entries.len());
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + range.len() * INDEX_ENTRY_LEN);
        if k == 0 {
            let mut reserved = [0u8; 8];
            if segmented {
                reserved[0..4].copy_from_slice(&segment_entries.to_le_bytes());
            }
            let header = IndexHeader {
                disk_size: self.disk_size.to_le_bytes(),
                chunk_size: self.chunk_size.to_le_bytes(),
                flags: if segmented { INDEX_FLAG_SEGMENTED } else { 0 }.to_le_bytes(),
                chunk_count: (self.entries.len() as u64).to_le_bytes(),
                reserved,
            };
            out.extend_from_slice(&header.disk_size);
            out.extend_from_slice(&header.chunk_size);
            out.extend_from_slice(&header.flags);
            out.extend_from_slice(&header.chunk_count);
            out.extend_from_slice(&header.reserved);
        }
        for entry in &self.entries[range] {
            out.extend_from_slice(entry);
        }
        out
    }

    /// The plaintext bytes of this index as one blob (unsegmented).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.segment_bytes(0, u32::MAX)
    }

    /// Parses the plaintext of an unsegmented index; every inconsistency is a
    /// [`crate::ErrorKind::Corrupt`] error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let head = Self::parse_head(bytes)?;
        if head.segments() > 1 {
            return Err(Error::corrupt(format!(
                "index is split into {} segments; this is only its first",
                head.segments()
            )));
        }
        head.finish()
    }

    /// Parses the first (or only) blob of an index.
    pub(crate) fn parse_head(bytes: &[u8]) -> Result<IndexHead> {
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(Error::corrupt(format!(
                "index is {} bytes, shorter than its {INDEX_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let disk_size = u64_at(0);
        let chunk_size = u32_at(8);
        let flags = u32_at(12);
        let count = u64_at(16);
        if flags & !INDEX_FLAG_SEGMENTED != 0 {
            return Err(Error::corrupt(format!(
                "index has unknown flags {flags:#x}"
            )));
        }
        if chunk_size == 0 || count != chunk_count(disk_size, chunk_size) {
            return Err(Error::corrupt(format!(
                "index header is inconsistent: {count} chunks of {chunk_size} bytes for a disk of {disk_size} bytes"
            )));
        }
        if count > MAX_CHUNKS_PER_DISK {
            return Err(Error::corrupt(format!(
                "index announces {count} chunks, more than the {MAX_CHUNKS_PER_DISK} an index may hold"
            )));
        }
        let segment_entries = if flags & INDEX_FLAG_SEGMENTED != 0 {
            let seg = u32_at(24);
            if !(1..=MAX_INDEX_SEGMENT_ENTRIES).contains(&seg) {
                return Err(Error::corrupt(format!(
                    "index has {seg} entries per segment, outside 1..={MAX_INDEX_SEGMENT_ENTRIES}"
                )));
            }
            Some(seg)
        } else {
            None
        };
        let in_first = segment_entries.map_or(count, |seg| count.min(u64::from(seg)));
        let body = &bytes[INDEX_HEADER_LEN..];
        // count ≤ 2^32, so this cannot overflow.
        if body.len() as u64 != in_first * INDEX_ENTRY_LEN as u64 {
            return Err(Error::corrupt(format!(
                "index has {} bytes of entries, its header announces {in_first} entries ({} bytes)",
                body.len(),
                in_first * INDEX_ENTRY_LEN as u64
            )));
        }
        let entries = body
            .chunks_exact(INDEX_ENTRY_LEN)
            .map(|e| e.try_into().expect("32-byte entry"))
            .collect();
        Ok(IndexHead {
            index: Self {
                disk_size,
                chunk_size,
                entries,
            },
            count,
            segment_entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

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
        let mut index = DiskIndex::new_zeroed(10_000, 4096).unwrap();
        assert_eq!(index.entries().len(), 3);
        assert_eq!(index.chunk_range(2), (8192, 10_000 - 8192));
        index.set(1, [5; 32]);
        assert_eq!(DiskIndex::from_bytes(&index.to_bytes()).unwrap(), index);
        let empty = DiskIndex::new_zeroed(0, 4096).unwrap();
        assert_eq!(DiskIndex::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }

    #[test]
    fn inconsistent_headers_are_errors_not_panics() {
        let index = DiskIndex::new_zeroed(10_000, 4096).unwrap();
        let mut bytes = index.to_bytes();
        bytes[16] = 9; // wrong count
        assert!(DiskIndex::from_bytes(&bytes).is_err());
        let mut bytes = index.to_bytes();
        bytes.pop(); // truncated entry
        assert!(DiskIndex::from_bytes(&bytes).is_err());
        assert!(DiskIndex::from_bytes(&[1, 2, 3]).is_err());
    }

    /// The overflow this module had: `count * 32` with a count from the header wrapped (or
    /// panicked in debug builds) for a count near 2^59.
    #[test]
    fn a_huge_announced_count_is_an_error_not_an_overflow() {
        let mut bytes = vec![0u8; INDEX_HEADER_LEN];
        bytes[0..8].copy_from_slice(&(1u64 << 59).to_le_bytes()); // disk size
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes()); // chunk size 1
        bytes[16..24].copy_from_slice(&(1u64 << 59).to_le_bytes()); // count = disk size
        let err = DiskIndex::from_bytes(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("more than the 4294967295"),
            "{err}"
        );
    }

    #[test]
    fn too_many_chunks_for_an_index_is_refused_before_allocating() {
        let err = DiskIndex::new_zeroed(u64::MAX, 64 << 10).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("larger chunk size"), "{err}");
    }

    #[test]
    fn segment_keys() {
        assert_eq!(segment_key("indexes/ab/0", 0), "indexes/ab/0");
        assert_eq!(segment_key("indexes/ab/0", 3), "indexes/ab/0.3");
        assert!(is_continuation_segment("indexes/ab/0.3"));
        assert!(!is_continuation_segment("indexes/ab/0"));
    }

    fn sample(disk_size: u64, chunk_size: u32, seed: u8) -> DiskIndex {
        let mut index = DiskIndex::new_zeroed(disk_size, chunk_size).unwrap();
        for i in 0..index.entries().len() {
            if !(i + seed as usize).is_multiple_of(3) {
                let mut d = [seed; 32];
                d[..8].copy_from_slice(&(i as u64).to_le_bytes());
                index.set(i, d);
            }
        }
        index
    }

    fn reassemble(index: &DiskIndex, seg: u32) -> Result<DiskIndex> {
        let mut head = DiskIndex::parse_head(&index.segment_bytes(0, seg))?;
        for k in 1..head.segments() {
            head.push_segment(k, &index.segment_bytes(k, seg))?;
        }
        head.finish()
    }

    proptest! {
        /// Any disk size, chunk size and segment size: the segments read back to the same
        /// index, no segment holds more than its share, and an index that fits one segment
        /// is byte for byte the format-version-1 layout.
        #[test]
        fn segments_round_trip_for_any_sizes(
            disk_size in 0u64..(3 << 20),
            chunk_shift in 9u32..17,
            seg in 1u32..200,
            seed in any::<u8>(),
        ) {
            let index = sample(disk_size, 1 << chunk_shift, seed);
            let n = index.segment_count(seg);
            prop_assert_eq!(reassemble(&index, seg)?, index.clone());
            for k in 0..n {
                let header = if k == 0 { INDEX_HEADER_LEN } else { 0 };
                prop_assert!(index.segment_bytes(k, seg).len() <= header + seg as usize * INDEX_ENTRY_LEN);
            }
            if index.entries().len() as u64 <= u64::from(seg) {
                prop_assert_eq!(n, 1);
                prop_assert_eq!(index.segment_bytes(0, seg), index.to_bytes());
                prop_assert_eq!(&index.to_bytes()[12..16], &[0u8; 4][..]);
                prop_assert_eq!(DiskIndex::from_bytes(&index.to_bytes())?, index);
            } else {
                prop_assert!(DiskIndex::from_bytes(&index.segment_bytes(0, seg)).is_err());
            }
        }

        /// Any header and body: parsing returns an error or an index, never panics or
        /// overflows, and an accepted index is consistent.
        #[test]
        fn arbitrary_headers_never_panic(
            disk_size in prop_oneof![any::<u64>(), 0u64..(1 << 20)],
            chunk_size in prop_oneof![any::<u32>(), Just(1u32), Just(4096u32)],
            flags in prop_oneof![Just(0u32), Just(1u32), any::<u32>()],
            count in prop_oneof![any::<u64>(), 0u64..300],
            reserved in any::<[u8; 8]>(),
            body_entries in 0usize..300,
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&disk_size.to_le_bytes());
            bytes.extend_from_slice(&chunk_size.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
            bytes.extend_from_slice(&reserved);
            bytes.resize(INDEX_HEADER_LEN + body_entries * INDEX_ENTRY_LEN, 0xab);
            if let Ok(head) = DiskIndex::parse_head(&bytes) {
                prop_assert_eq!(head.count, chunk_count(disk_size, chunk_size));
                prop_assert!(head.count <= MAX_CHUNKS_PER_DISK);
                if let Ok(index) = DiskIndex::from_bytes(&bytes) {
                    prop_assert_eq!(index.entries().len() as u64, count);
                    let last = index.entries().len().checked_sub(1);
                    if let Some(last) = last {
                        let (offset, len) = index.chunk_range(last);
                        prop_assert!(offset + len as u64 == disk_size);
                    }
                }
            }
        }

        /// A segment of the wrong length (truncated, or from another index) is refused.
        #[test]
        fn a_segment_of_the_wrong_length_is_refused(cut in 1usize..64) {
            let index = sample(100 * 4096, 4096, 1);
            let mut head = DiskIndex::parse_head(&index.segment_bytes(0, 30)).unwrap();
            let mut second = index.segment_bytes(1, 30);
            second.truncate(second.len() - cut);
            prop_assert!(head.push_segment(1, &second).is_err());
        }
    }
}
