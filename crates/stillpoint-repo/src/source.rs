//! What the writer reads a disk from.
//!
//! A [`DiskSource`] has a size, an allocation map (the ranges that may hold data; everything
//! else reads as zeros and is never read) and positioned reads that may run concurrently from
//! several threads. The writer's worker threads each issue their own reads, so a source backed
//! by an NBD export has as many requests in flight as there are workers.
//!
//! Async sources (an NBD client on tokio) implement [`AsyncDiskSource`] and are wrapped in
//! [`BlockingBridge`], which runs each read with `Handle::block_on` on the calling worker
//! thread: the writer's workers are plain threads, never tokio workers, so blocking there is
//! allowed, each worker keeps one request in flight, and nothing is buffered beyond the chunk
//! being read. Call `write_disk` from `tokio::task::spawn_blocking`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

impl Extent {
    /// End (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A disk to back up.
pub trait DiskSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Sorted, non-overlapping ranges that may contain data; bytes outside them are zeros.
    /// The default says "everything may be data".
    fn data_extents(&self) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset: 0,
            len: self.size(),
        }])
    }
    /// Fills `buf` with the bytes at `offset` (always within `size()`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// An async disk source, such as an NBD client reading a capture export.
pub trait AsyncDiskSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Sorted ranges that may contain data (NBD block status); the rest reads as zeros.
    fn data_extents(&self) -> impl std::future::Future<Output = Result<Vec<Extent>>> + Send;
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Presents an [`AsyncDiskSource`] as a [`DiskSource`] to the writer's worker threads.
#[derive(Debug)]
pub struct BlockingBridge<S> {
    inner: S,
    handle: tokio::runtime::Handle,
}

impl<S: AsyncDiskSource> BlockingBridge<S> {
    /// Wraps `inner`; its futures run on the runtime of `handle`.
    pub fn new(inner: S, handle: tokio::runtime::Handle) -> Self {
        Self { inner, handle }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncDiskSource> DiskSource for BlockingBridge<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn data_extents(&self) -> Result<Vec<Extent>> {
        self.handle.block_on(self.inner.data_extents())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.handle.block_on(self.inner.read_at(offset, buf))
    }
}

/// A plain (possibly sparse) file: holes found with `SEEK_DATA`/`SEEK_HOLE` are not read.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Opens `path` for reading.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .map_err(|e| Error::io("cannot open the image", e).with_path(&path))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat the image", e).with_path(&path))?;
        if !meta.is_file() {
            return Err(
                Error::new(ErrorKind::InvalidInput, "the image is not a regular file")
                    .with_path(&path),
            );
        }
        Ok(Self {
            file,
            path,
            size: meta.len(),
        })
    }
}

impl DiskSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&self) -> Result<Vec<Extent>> {
        use nix::unistd::{Whence, lseek};
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        let size = self.size as i64;
        while pos < size {
            let data = match lseek(&self.file, pos, Whence::SeekData) {
                Ok(d) => d,
                Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
                Err(nix::errno::Errno::EINVAL) => {
                    // The filesystem does not support SEEK_DATA: treat everything as data.
                    return Ok(vec![Extent {
                        offset: 0,
                        len: self.size,
                    }]);
                }
                Err(e) => {
                    return Err(
                        Error::io("cannot map the image's data (SEEK_DATA)", e.into())
                            .with_path(&self.path)
                            .with_offset(pos as u64),
                    );
                }
            };
            let hole = lseek(&self.file, data, Whence::SeekHole).map_err(|e| {
                Error::io("cannot map the image's data (SEEK_HOLE)", e.into())
                    .with_path(&self.path)
                    .with_offset(data as u64)
            })?;
            let end = hole.min(size);
            if end > data {
                out.push(Extent {
                    offset: data as u64,
                    len: (end - data) as u64,
                });
            }
            pos = hole;
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::new(ErrorKind::Source, "cannot read the image")
                .with_source(e)
                .with_path(&self.path)
                .with_offset(offset)
        })
    }
}

/// Sorts and merges ranges, clamping them to `size`; ranges past the end are cut off.
pub(crate) fn normalize(mut ranges: Vec<Extent>, size: u64) -> Vec<Extent> {
    ranges.retain(|r| r.len > 0 && r.offset < size);
    ranges.sort_by_key(|r| r.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let end = r.end().min(size);
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                last.len = last.len.max(end - last.offset);
            }
            _ => out.push(Extent {
                offset: r.offset,
                len: end - r.offset,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_extents_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        file.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        drop(file);
        let source = FileSource::open(&path).unwrap();
        let extents = source.data_extents().unwrap();
        let covered: u64 = extents.iter().map(|e| e.len).sum();
        assert!(
            covered < 64 << 20,
            "holes are not reported as data: {extents:?}"
        );
        assert!(
            extents
                .iter()
                .any(|e| e.offset <= 8 << 20 && e.end() >= (8 << 20) + 4096)
        );
        assert!(
            extents
                .iter()
                .any(|e| e.offset <= 40 << 20 && e.end() >= (40 << 20) + 4096)
        );
    }

    #[test]
    fn normalize_merges_and_clamps() {
        let r = |offset, len| Extent { offset, len };
        assert_eq!(
            normalize(vec![r(10, 5), r(0, 3), r(12, 10), r(100, 5), r(3, 0)], 20),
            vec![r(0, 3), r(10, 10)]
        );
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = FileSource::open("/nonexistent/disk.img").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }
}
