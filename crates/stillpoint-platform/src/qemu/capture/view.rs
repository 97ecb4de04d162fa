//! One captured disk read over QEMU's NBD export of its `snapshot-access` node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use stillpoint_nbd::{Extent, NbdClient, data_ranges, dirty_ranges};

use crate::capture::{ByteRange, CaptureMode, CapturedDisk};
use crate::error::{PlatformError, PlatformErrorKind, Result};

/// NBD error numbers a `snapshot-access` read fails with once copy-before-write broke the
/// snapshot (`on-cbw-error: break-snapshot`): EINVAL (seen on QEMU 7.2: docs/capture.md, "What QEMU 7.2 does") and EIO.
const BROKEN_SNAPSHOT_ERRNOS: [u32; 2] = [22, 5];

/// The NBD metadata context of a dirty bitmap.
pub fn bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

pub struct QemuCapturedDisk {
    pub(crate) vm: String,
    pub(crate) id: String,
    pub(crate) node: String,
    pub(crate) mode: CaptureMode,
    pub(crate) client: NbdClient,
    pub(crate) scratch: PathBuf,
    /// Set by the first read that finds the snapshot broken; shared by the disks of one
    /// capture so `finish(true)` can refuse to settle a broken capture as a success.
    pub(crate) broken: Arc<AtomicBool>,
}

impl QemuCapturedDisk {
    fn context(&self) -> String {
        format!("VM `{}`, disk {} (node `{}`)", self.vm, self.id, self.node)
    }

    fn read_error(&self, offset: u64, error: stillpoint_nbd::Error) -> PlatformError {
        if let stillpoint_nbd::ErrorKind::Request { errno } = error.kind()
            && BROKEN_SNAPSHOT_ERRNOS.contains(errno)
        {
            self.broken.store(true, Ordering::Relaxed);
            return PlatformError::new(
                PlatformErrorKind::CaptureBroken,
                broken_message(&self.context(), offset, &self.scratch),
            )
            .with_source(error);
        }
        PlatformError::new(
            PlatformErrorKind::Capture,
            format!(
                "{}: reading the capture at offset {offset} failed",
                self.context()
            ),
        )
        .with_source(error)
    }

    fn map_error(&self, what: &str, error: stillpoint_nbd::Error) -> PlatformError {
        // A broken snapshot fails block status the way it fails reads (seen on QEMU 7.2 with
        // a full scratch area: the allocation map is the first thing read after the break).
        if let stillpoint_nbd::ErrorKind::Request { errno } = error.kind()
            && BROKEN_SNAPSHOT_ERRNOS.contains(errno)
        {
            let offset = error.offset().unwrap_or(0);
            return self.read_error(offset, error);
        }
        PlatformError::new(
            PlatformErrorKind::Capture,
            format!(
                "{}: reading the capture's {what} map failed",
                self.context()
            ),
        )
        .with_source(error)
    }
}

/// The message of a read that found the snapshot broken.
pub fn broken_message(context: &str, offset: u64, scratch: &Path) -> String {
    let free = nix::sys::statvfs::statvfs(scratch.parent().unwrap_or(scratch))
        .map(|fs| {
            format!(
                ", {} bytes free there now",
                fs.blocks_available() * fs.fragment_size()
            )
        })
        .unwrap_or_default();
    format!(
        "{context}, offset {offset}: the capture broke: copy-before-write could not save old data \
         to the scratch area (full?) at {}{free}; the guest kept running and writing",
        scratch.display()
    )
}

fn to_ranges(ranges: Vec<(u64, u64)>) -> Vec<ByteRange> {
    ranges
        .into_iter()
        .map(|(offset, len)| ByteRange { offset, len })
        .collect()
}

/// The ranges worth reading from a `base:allocation` map.
pub fn allocated(map: &[Extent]) -> Vec<ByteRange> {
    to_ranges(data_ranges(map))
}

/// The ranges a dirty-bitmap map marks.
pub fn changed(map: &[Extent]) -> Vec<ByteRange> {
    to_ranges(dirty_ranges(map))
}

#[async_trait]
impl CapturedDisk for QemuCapturedDisk {
    fn id(&self) -> &str {
        &self.id
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn mode(&self) -> &CaptureMode {
        &self.mode
    }

    async fn allocation(&self) -> Result<Vec<ByteRange>> {
        let map = self
            .client
            .map("base:allocation")
            .await
            .map_err(|e| self.map_error("allocation", e))?;
        Ok(allocated(&map))
    }

    async fn changes(&self) -> Result<Option<Vec<ByteRange>>> {
        let CaptureMode::Incremental { parent_bitmap } = &self.mode else {
            return Ok(None);
        };
        let map = self
            .client
            .map(&bitmap_context(parent_bitmap))
            .await
            .map_err(|e| self.map_error("dirty bitmap", e))?;
        Ok(Some(changed(&map)))
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // One call for the whole range: the client splits it into requests that are all in
        // flight at once (QEMU serves them concurrently) and reads them into `buf` with one
        // copy, from pooled buffers.
        self.client
            .read_into(offset, buf)
            .await
            .map_err(|e| self.read_error(e.offset().unwrap_or(offset), e))
    }
}

#[cfg(test)]
mod tests {
    use stillpoint_nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};

    use super::*;

    fn ex(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn allocation_skips_zeros_and_changes_keep_dirty_runs() {
        const K64: u64 = 64 << 10;
        // data, zero-allocated, hole, data, data (joined with the one before).
        let map = [
            ex(0, K64, 0),
            ex(K64, K64, STATE_ZERO),
            ex(2 * K64, 4 * K64, STATE_HOLE | STATE_ZERO),
            ex(6 * K64, K64, 0),
            ex(7 * K64, K64, 0),
        ];
        assert_eq!(
            allocated(&map),
            vec![
                ByteRange {
                    offset: 0,
                    len: K64
                },
                ByteRange {
                    offset: 6 * K64,
                    len: 2 * K64
                }
            ]
        );
        let bitmap = [
            ex(0, 2 * K64, STATE_DIRTY),
            ex(2 * K64, 10 * K64, 0),
            ex(12 * K64, K64, STATE_DIRTY),
        ];
        assert_eq!(
            changed(&bitmap),
            vec![
                ByteRange {
                    offset: 0,
                    len: 2 * K64
                },
                ByteRange {
                    offset: 12 * K64,
                    len: K64
                }
            ]
        );
        assert_eq!(bitmap_context("b1"), "qemu:dirty-bitmap:b1");
    }

    #[test]
    fn a_broken_capture_is_explained_with_the_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("sp-scratch-vm-disk0-x.qcow2");
        let text = broken_message("VM `vm`, disk vd0 (node `disk0`)", 4096, &scratch);
        assert!(
            text.starts_with(
                "VM `vm`, disk vd0 (node `disk0`), offset 4096: the capture broke: \
                 copy-before-write could not save old data to the scratch area (full?) at "
            ),
            "{text}"
        );
        assert!(text.contains(&scratch.display().to_string()), "{text}");
        assert!(text.contains("bytes free there now"), "{text}");
    }
}
