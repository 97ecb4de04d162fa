//! Extents reported by block status, and merging them into a disk map.

use crate::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// A run of bytes with one block-status value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Disk offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Context-specific flags, as sent.
    pub flags: u32,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// `base:allocation`: not allocated.
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }

    /// `base:allocation`: reads as zeros (so need not be read).
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }

    /// `qemu:dirty-bitmap:NAME`: changed since the bitmap was created.
    pub fn is_dirty(&self) -> bool {
        self.flags & STATE_DIRTY != 0
    }
}

/// Joins neighbouring extents that have the same flags.
pub fn merge_extents(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(last) if last.end() == e.offset && last.flags == e.flags => {
                last.length += e.length
            }
            _ => out.push(e),
        }
    }
    out
}

/// The ranges `(offset, length)` worth reading from a `base:allocation` map:
/// everything that does not read as zeros.
pub fn data_ranges(allocation: &[Extent]) -> Vec<(u64, u64)> {
    ranges_where(allocation, |e| !e.is_zero())
}

/// The ranges `(offset, length)` marked dirty in a `qemu:dirty-bitmap:*` map.
pub fn dirty_ranges(bitmap: &[Extent]) -> Vec<(u64, u64)> {
    ranges_where(bitmap, Extent::is_dirty)
}

fn ranges_where(extents: &[Extent], keep: impl Fn(&Extent) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| keep(e)) {
        match out.last_mut() {
            Some((o, l)) if *o + *l == e.offset => *l += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn merges_only_adjacent_equal_flags() {
        let m = merge_extents([
            ex(0, 10, 0),
            ex(10, 5, 0),
            ex(15, 5, 3),
            ex(20, 1, 3),
            ex(21, 4, 0),
        ]);
        assert_eq!(m, vec![ex(0, 15, 0), ex(15, 6, 3), ex(21, 4, 0)]);
    }

    #[test]
    fn data_and_dirty_ranges() {
        // allocated data, allocated zeros, hole+zero, allocated data
        let alloc = [ex(0, 4, 0), ex(4, 4, STATE_ZERO), ex(8, 8, 3), ex(16, 4, 0)];
        assert_eq!(data_ranges(&alloc), vec![(0, 4), (16, 4)]);
        let dirty = [ex(0, 4, 1), ex(4, 4, 1), ex(8, 8, 0), ex(16, 4, 1)];
        assert_eq!(dirty_ranges(&dirty), vec![(0, 8), (16, 4)]);
        assert!(alloc[2].is_hole() && alloc[2].is_zero() && !alloc[0].is_hole());
    }
}
