//! A captured disk as the repository writer's [`DiskSource`].
//!
//! The writer plans chunks from `data_extents()` (called once, on the calling thread) and
//! reads them with `read_at` from its plain worker threads, several at once. A captured disk
//! is async (NBD over tokio), so:
//! - the allocation map is read up front, in the async [`CapturedDiskSource::new`], so that
//!   `data_extents()` never blocks on the network;
//! - `read_at` runs the disk's async read with `Handle::block_on` on the worker thread (the
//!   same bridge as `stillpoint_repo::BlockingBridge`): each worker keeps one read in flight
//!   on the shared, pipelined NBD connection, and nothing is buffered beyond the chunk read.
//!   Call `write_disk` from `spawn_blocking` or `block_in_place`, never directly on a runtime
//!   worker.
//!
//! A failed read becomes a repository error of kind `Source` naming the disk and offset, with
//! the platform's error as its source; [`capture_error`] finds that error again, so the engine
//! can tell a capture that broke (scratch space ran out: `CaptureBroken`) from other failures.

use std::sync::Arc;

use stillpoint_platform::capture::{ByteRange, CapturedDisk};
use stillpoint_platform::{PlatformError, PlatformErrorKind};
use stillpoint_repo::{AsyncDiskSource, DiskSource, Error, ErrorKind, Extent};
use tokio::runtime::Handle;

/// One captured disk, readable by the repository writer.
pub struct CapturedDiskSource {
    disk: Arc<dyn CapturedDisk>,
    handle: Handle,
    allocation: Vec<Extent>,
}

impl CapturedDiskSource {
    /// Wraps `disk`; reads run on the runtime of `handle`. Reads the allocation map now.
    pub async fn new(
        disk: Arc<dyn CapturedDisk>,
        handle: Handle,
    ) -> stillpoint_platform::Result<Self> {
        let allocation = extents(disk.allocation().await?);
        Ok(Self {
            disk,
            handle,
            allocation,
        })
    }

    /// For an incremental capture, the ranges changed since the parent snapshot, as the
    /// writer's `DiskInput::changed` takes them; `None` for a full capture.
    pub async fn changed_extents(&self) -> stillpoint_platform::Result<Option<Vec<Extent>>> {
        Ok(self.disk.changes().await?.map(extents))
    }

    /// The captured disk.
    pub fn disk(&self) -> &Arc<dyn CapturedDisk> {
        &self.disk
    }

    fn read_error(&self, offset: u64, error: PlatformError) -> Error {
        Error::new(ErrorKind::Source, "cannot read the captured disk")
            .with_disk(self.disk.id())
            .with_offset(offset)
            .with_source(error)
    }
}

/// Platform ranges as repository extents.
pub fn extents(ranges: Vec<ByteRange>) -> Vec<Extent> {
    ranges
        .into_iter()
        .map(|r| Extent {
            offset: r.offset,
            len: r.len,
        })
        .collect()
}

/// The capture's own error behind a repository error, if a captured-disk read caused it.
pub fn capture_error(error: &Error) -> Option<&PlatformError> {
    std::error::Error::source(error)?.downcast_ref::<PlatformError>()
}

/// Whether a repository error comes from a capture that broke (scratch space ran out).
pub fn capture_broke(error: &Error) -> bool {
    capture_error(error).is_some_and(|e| e.kind() == PlatformErrorKind::CaptureBroken)
}

impl DiskSource for CapturedDiskSource {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn data_extents(&self) -> stillpoint_repo::Result<Vec<Extent>> {
        Ok(self.allocation.clone())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_repo::Result<()> {
        self.handle
            .block_on(self.disk.read_at(offset, buf))
            .map_err(|e| self.read_error(offset, e))
    }
}

impl AsyncDiskSource for CapturedDiskSource {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    async fn data_extents(&self) -> stillpoint_repo::Result<Vec<Extent>> {
        Ok(self.allocation.clone())
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_repo::Result<()> {
        self.disk
            .read_at(offset, buf)
            .await
            .map_err(|e| self.read_error(offset, e))
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use stillpoint_platform::capture::CaptureMode;

    use super::*;

    /// Hand-written test double: an in-memory captured disk whose reads past `broken_from`
    /// fail as a broken capture does (a real one needs a VM and a full scratch area; the
    /// platform's VM tests cover that). Here only the adapter's mapping is under test.
    struct MemoryDisk {
        data: Vec<u8>,
        allocation: Vec<ByteRange>,
        changes: Option<Vec<ByteRange>>,
        mode: CaptureMode,
        broken_from: u64,
    }

    #[async_trait]
    impl CapturedDisk for MemoryDisk {
        fn id(&self) -> &str {
            "vd1"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn mode(&self) -> &CaptureMode {
            &self.mode
        }
        async fn allocation(&self) -> stillpoint_platform::Result<Vec<ByteRange>> {
            Ok(self.allocation.clone())
        }
        async fn changes(&self) -> stillpoint_platform::Result<Option<Vec<ByteRange>>> {
            Ok(self.changes.clone())
        }
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_platform::Result<()> {
            if offset + buf.len() as u64 > self.broken_from {
                return Err(PlatformError::new(
                    PlatformErrorKind::CaptureBroken,
                    "VM `vm`, disk vd1: the capture broke",
                ));
            }
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    fn disk(broken_from: u64) -> Arc<dyn CapturedDisk> {
        Arc::new(MemoryDisk {
            data: (0..1 << 20).map(|i| (i % 251) as u8).collect(),
            allocation: vec![ByteRange {
                offset: 4096,
                len: 8192,
            }],
            changes: Some(vec![ByteRange {
                offset: 65536,
                len: 65536,
            }]),
            mode: CaptureMode::Incremental {
                parent_bitmap: "stillpoint-b".into(),
            },
            broken_from,
        })
    }

    #[test]
    fn maps_extents_and_reads_from_plain_threads() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let source = runtime
            .block_on(CapturedDiskSource::new(
                disk(u64::MAX),
                runtime.handle().clone(),
            ))
            .unwrap();
        let changed = runtime.block_on(source.changed_extents()).unwrap();
        assert_eq!(
            changed,
            Some(vec![Extent {
                offset: 65536,
                len: 65536
            }])
        );
        let source: &dyn DiskSource = &source;
        assert_eq!(source.size(), 1 << 20);
        assert_eq!(
            source.data_extents().unwrap(),
            vec![Extent {
                offset: 4096,
                len: 8192
            }]
        );
        // As the writer's workers do: several plain threads, each blocking on its read.
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    source.read_at(t * 4096, &mut buf).unwrap();
                    assert_eq!(buf[0], ((t * 4096) % 251) as u8);
                });
            }
        });
    }

    #[test]
    fn a_broken_capture_is_a_source_error_naming_disk_and_offset() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let source = runtime
            .block_on(CapturedDiskSource::new(
                disk(8192),
                runtime.handle().clone(),
            ))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let error = std::thread::scope(|scope| {
            scope
                .spawn(|| DiskSource::read_at(&source, 8192, &mut buf).unwrap_err())
                .join()
                .unwrap()
        });
        assert_eq!(error.kind(), ErrorKind::Source);
        assert_eq!(error.context().disk.as_deref(), Some("vd1"));
        assert_eq!(error.context().offset, Some(8192));
        assert!(capture_broke(&error));
        assert_eq!(
            capture_error(&error).unwrap().kind(),
            PlatformErrorKind::CaptureBroken
        );
        let plain = Error::new(ErrorKind::Io, "disk full");
        assert!(!capture_broke(&plain));
    }
}
