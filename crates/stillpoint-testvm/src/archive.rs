//! Initramfs archives: a sorted list of entries written as cpio `newc` (by the `cpio` crate),
//! optionally gzip-compressed (by `flate2`).
//!
//! Entries are described in memory rather than staged in a directory, so ownership (root),
//! modes, device nodes and timestamps (all zero, for reproducible archives) do not depend on
//! who runs the build. Parent directories are added automatically. Linux unpacks several
//! concatenated archives in order, later files replacing earlier ones; the launcher relies on
//! that to append per-VM settings to the cached guest image.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
enum Node {
    Directory,
    File(Content),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum Content {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// An initramfs being described.
#[derive(Debug, Default, Clone)]
pub(crate) struct Archive {
    /// Path inside the archive, without a leading `/`, to (node, permission bits).
    entries: BTreeMap<String, (Node, u32)>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory (parents are added as needed).
    pub fn directory(&mut self, path: &str, mode: u32) {
        self.insert(path, Node::Directory, mode);
    }

    /// A regular file whose content is read from the host when the archive is written.
    pub fn host_file(&mut self, path: &str, source: &Path, mode: u32) {
        self.insert(path, Node::File(Content::Host(source.to_owned())), mode);
    }

    /// A regular file with the given content.
    pub fn file(&mut self, path: &str, content: impl Into<Vec<u8>>, mode: u32) {
        self.insert(path, Node::File(Content::Bytes(content.into())), mode);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()), 0o777);
    }

    /// A character device node (no root needed: it is only a header in the archive).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.insert(path, Node::CharDevice { major, minor }, mode);
    }

    /// Whether `path` has an entry.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    fn insert(&mut self, path: &str, node: Node, mode: u32) {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
            self.entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert((Node::Directory, 0o755));
            parent = dir.parent();
        }
        self.entries.insert(path.to_owned(), (node, mode & 0o7777));
    }

    /// Writes the archive in cpio `newc` format; parents come before their children.
    pub fn write_newc<W: Write>(&self, mut out: W) -> Result<W> {
        let archive_error = |e: std::io::Error| {
            Error::new(
                crate::ErrorKind::GuestBuild,
                "cannot write the cpio archive",
            )
            .with_source(e)
        };
        for (index, (path, (node, mode))) in self.entries.iter().enumerate() {
            let inode = u32::try_from(index + 1).unwrap_or(u32::MAX);
            let header = Builder::new(path)
                .ino(inode)
                .mode(*mode)
                .uid(0)
                .gid(0)
                .mtime(0);
            let (header, data): (Builder, Vec<u8>) = match node {
                Node::Directory => (
                    header.nlink(2).set_mode_file_type(ModeFileType::Directory),
                    Vec::new(),
                ),
                Node::File(Content::Bytes(bytes)) => (
                    header.set_mode_file_type(ModeFileType::Regular),
                    bytes.clone(),
                ),
                Node::File(Content::Host(source)) => (
                    header.set_mode_file_type(ModeFileType::Regular),
                    std::fs::read(source).map_err(|e| Error::io("read", source, e))?,
                ),
                Node::Symlink(target) => (
                    header.set_mode_file_type(ModeFileType::Symlink),
                    target.as_bytes().to_vec(),
                ),
                Node::CharDevice { major, minor } => (
                    header
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .set_mode_file_type(ModeFileType::Char),
                    Vec::new(),
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| {
                Error::new(
                    crate::ErrorKind::GuestBuild,
                    format!("`{path}` is too large for a cpio archive"),
                )
            })?;
            let mut writer = header.write(out, size);
            writer.write_all(&data).map_err(archive_error)?;
            out = writer.finish().map_err(archive_error)?;
        }
        cpio::newc::trailer(out).map_err(archive_error)
    }

    /// Writes the archive gzip-compressed to `path` and returns its size in bytes.
    pub fn write_gzip_file(&self, path: &Path) -> Result<u64> {
        let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
        let encoder = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::default(),
        );
        let encoder = self.write_newc(encoder)?;
        let mut writer = encoder.finish().map_err(|e| Error::io("write", path, e))?;
        writer.flush().map_err(|e| Error::io("write", path, e))?;
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io("read metadata of", path, e))?
            .len();
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// The entries of a newc archive as (name, mode, content, rdev major, rdev minor).
    fn read_entries(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut entries = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(bytes).expect("entry");
            if reader.entry().is_trailer() {
                break;
            }
            let entry = reader.entry();
            let (name, mode) = (entry.name().to_owned(), entry.mode());
            let (major, minor) = (entry.rdev_major(), entry.rdev_minor());
            let mut content = Vec::new();
            reader.read_to_end(&mut content).expect("content");
            entries.push((name, mode, content, major, minor));
            bytes = reader.finish().expect("finish");
        }
        entries
    }

    #[test]
    fn one_file_has_the_expected_newc_header() {
        let mut archive = Archive::new();
        archive.file("init", b"#!/bin/sh\n".to_vec(), 0o755);
        let bytes = archive.write_newc(Vec::new()).expect("write");
        let expected_header = concat!(
            "070701",   // c_magic: newc
            "00000001", // c_ino: entries are numbered from 1
            "000081ed", // c_mode: regular file (0o100000) | 0o755
            "00000000", // c_uid: root
            "00000000", // c_gid: root
            "00000001", // c_nlink
            "00000000", // c_mtime: 0, for reproducible archives
            "0000000a", // c_filesize: 10 bytes
            "00000000", // c_devmajor
            "00000000", // c_devminor
            "00000000", // c_rdevmajor
            "00000000", // c_rdevminor
            "00000005", // c_namesize: "init" + NUL
            "00000000", // c_check: unused in newc
            "init\0",   // name; header + name = 115 bytes, padded to 116
            "\0",
        );
        assert_eq!(&bytes[..116], expected_header.as_bytes());
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        // file data padded to a multiple of 4, then the trailer entry
        assert_eq!(&bytes[126..128], b"\0\0");
        assert_eq!(&bytes[128..134], b"070701");
        assert!(bytes.ends_with(b"TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn parents_come_first_and_every_kind_round_trips() {
        let mut archive = Archive::new();
        archive.symlink("/bin/sh", "busybox");
        archive.file("etc/stillpoint/agent", "on\n", 0o644);
        archive.char_device("dev/console", 0o600, 5, 1);
        archive.directory("proc", 0o555);
        let entries = read_entries(&archive.write_newc(Vec::new()).expect("write"));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/stillpoint",
                "etc/stillpoint/agent",
                "proc"
            ]
        );
        let by_name = |name: &str| entries.iter().find(|e| e.0 == name).expect(name);
        assert_eq!(by_name("bin").1, 0o040755);
        assert_eq!(by_name("bin/sh").1, 0o120777);
        assert_eq!(by_name("bin/sh").2, b"busybox");
        assert_eq!(by_name("dev/console").1, 0o020600);
        assert_eq!((by_name("dev/console").3, by_name("dev/console").4), (5, 1));
        assert_eq!(by_name("etc/stillpoint/agent").2, b"on\n");
        assert_eq!(by_name("proc").1, 0o040555);
    }

    #[test]
    fn gzip_file_decompresses_to_the_same_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::write(&source, b"library bytes").expect("write source");
        let mut archive = Archive::new();
        archive.host_file("lib/libx.so.1", &source, 0o644);
        let gz = dir.path().join("a.cpio.gz");
        let size = archive.write_gzip_file(&gz).expect("gzip");
        assert_eq!(size, std::fs::metadata(&gz).expect("meta").len());
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).expect("open"))
            .read_to_end(&mut raw)
            .expect("gunzip");
        assert_eq!(raw, archive.write_newc(Vec::new()).expect("write"));
        let entries = read_entries(&raw);
        assert_eq!(entries[1].0, "lib/libx.so.1");
        assert_eq!(entries[1].2, b"library bytes");
    }

    #[test]
    fn missing_host_file_names_it() {
        let mut archive = Archive::new();
        archive.host_file("x", Path::new("/nonexistent/stillpoint/x"), 0o644);
        let error = archive.write_newc(Vec::new()).expect_err("missing file");
        assert!(
            error.to_string().contains("/nonexistent/stillpoint/x"),
            "{error}"
        );
    }
}
