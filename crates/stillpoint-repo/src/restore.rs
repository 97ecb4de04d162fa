//! Restoring one disk of a snapshot to a raw or qcow2 file.
//!
//! The raw file is created at its full size (sparse) and only non-zero data is written with
//! positioned writes from several worker threads; all-zero chunks, and zero runs of 64 KiB
//! inside chunks, stay holes. qcow2 is produced by writing the sparse raw file next to the
//! target and running `qemu-img convert -O qcow2` on it: qemu-img is the reference qcow2
//! writer, it skips holes, and it keeps this crate free of a second image format.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tracing::{info, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::lock::LockKind;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::writer::Progress;

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A sparse raw image.
    Raw,
    /// qcow2 (via `qemu-img convert`).
    Qcow2,
}

/// Options of [`Repository::restore_disk`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Fill damaged or missing chunks with zeros and report them instead of failing.
    pub zero_fill_damaged: bool,
    /// Worker threads (default: twice the number of CPUs).
    pub workers: Option<usize>,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreStats {
    /// Bytes of the disk.
    pub size: u64,
    /// Chunks read from the repository.
    pub chunks_read: u64,
    /// Zero chunks left as holes.
    pub chunks_zero: u64,
    /// Offsets of damaged chunks that were zero-filled (only with `zero_fill_damaged`).
    pub damaged_offsets: Vec<u64>,
}

const HOLE_BLOCK: usize = 64 << 10;

impl Repository {
    /// Restores disk `disk` of `snapshot` to `dest` in `format`. Takes a read lock (so prune
    /// and gc wait). On a damaged chunk it fails naming snapshot, disk and offset, and removes
    /// the partial file, unless `zero_fill_damaged` is set.
    pub fn restore_disk(
        &self,
        snapshot: &Manifest,
        disk: &str,
        dest: &Path,
        format: ImageFormat,
        options: RestoreOptions,
        progress: Option<Progress<'_>>,
    ) -> Result<RestoreStats> {
        let _lock = self.lock(LockKind::Read, &format!("restore {}", snapshot.id))?;
        let index = self.load_index(snapshot, disk)?;
        let raw_path = match format {
            ImageFormat::Raw => dest.to_path_buf(),
            ImageFormat::Qcow2 => sibling(dest, ".raw.partial"),
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&raw_path)
            .map_err(|e| Error::io("cannot create the restore target", e).with_path(&raw_path))?;
        let result = self.fill(&file, &raw_path, snapshot, disk, &index, options, progress);
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                let _ = fs::remove_file(&raw_path);
                return Err(e);
            }
        };
        file.sync_all()
            .map_err(|e| Error::io("cannot flush the restored image", e).with_path(&raw_path))?;
        drop(file);
        if format == ImageFormat::Qcow2 {
            let output = stillpoint_os::child::command("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw_path)
                .arg(dest)
                .output();
            let _ = fs::remove_file(&raw_path);
            let output = output.map_err(|e| {
                Error::new(ErrorKind::External, "cannot run qemu-img to write qcow2").with_source(e)
            })?;
            if !output.status.success() {
                return Err(Error::new(
                    ErrorKind::External,
                    format!(
                        "qemu-img convert failed: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    ),
                )
                .with_path(dest));
            }
        }
        info!(snapshot = snapshot.id, disk, dest = %dest.display(), "disk restored");
        Ok(stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        file: &File,
        path: &Path,
        snapshot: &Manifest,
        disk: &str,
        index: &crate::index::DiskIndex,
        options: RestoreOptions,
        progress: Option<Progress<'_>>,
    ) -> Result<RestoreStats> {
        file.set_len(index.disk_size())
            .map_err(|e| Error::io("cannot size the restore target", e).with_path(path))?;
        let work: Vec<usize> = (0..index.entries().len())
            .filter(|&i| !index.is_zero(i))
            .collect();
        let zero_chunks = index.entries().len() - work.len();
        if let Some(progress) = progress {
            progress(
                (0..index.entries().len())
                    .filter(|&i| index.is_zero(i))
                    .map(|i| index.chunk_range(i).1 as u64)
                    .sum(),
            );
        }
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let error: Mutex<Option<Error>> = Mutex::new(None);
        let damaged: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let read = AtomicU64::new(0);
        let workers = options
            .workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get() * 2)
                    .unwrap_or(2)
            })
            .clamp(1, work.len().max(1));
        let worker = || -> Result<()> {
            let mut buf = Vec::new();
            loop {
                if abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let Some(&i) = work.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return Ok(());
                };
                let (offset, len) = index.chunk_range(i);
                match self.read_chunk(&index.entries()[i], &mut buf) {
                    Ok(()) if buf.len() == len => {
                        write_sparse(file, offset, &buf).map_err(|e| {
                            Error::io("cannot write the restore target", e)
                                .with_path(path)
                                .with_offset(offset)
                        })?;
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    result => {
                        let e = match result {
                            Err(e) => e,
                            Ok(()) => Error::corrupt(format!(
                                "chunk has {} bytes where the index needs {len}",
                                buf.len()
                            )),
                        };
                        let e = e
                            .with_snapshot(&snapshot.id)
                            .with_disk(disk)
                            .with_offset(offset);
                        if options.zero_fill_damaged
                            && matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Missing)
                        {
                            warn!(error = %e, "zero-filling a damaged chunk");
                            damaged.lock().expect("poisoned").push(offset);
                        } else {
                            return Err(e);
                        }
                    }
                }
                if let Some(progress) = progress {
                    progress(len as u64);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    if let Err(e) = worker() {
                        abort.store(true, Ordering::Relaxed);
                        error.lock().expect("poisoned").get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().expect("poisoned") {
            return Err(e);
        }
        let mut damaged_offsets = damaged.into_inner().expect("poisoned");
        damaged_offsets.sort_unstable();
        Ok(RestoreStats {
            size: index.disk_size(),
            chunks_read: read.into_inner(),
            chunks_zero: zero_chunks as u64,
            damaged_offsets,
        })
    }
}

/// Writes `buf` at `offset`, skipping aligned all-zero 64 KiB blocks (they stay holes).
fn write_sparse(file: &File, offset: u64, buf: &[u8]) -> std::io::Result<()> {
    static ZERO: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + HOLE_BLOCK).min(buf.len());
        let zero = buf[pos..end] == ZERO[..end - pos];
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                file.write_all_at(&buf[start..pos], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        file.write_all_at(&buf[start..], offset + start as u64)?;
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}
