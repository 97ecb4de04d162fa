//! Integration tests of the repository library against real files in temp directories.
//! Conventions: every test builds its own repository with cheap KDF parameters
//! (`KdfParams::for_tests`) and small chunks (64 KiB) so that many chunks are exercised fast.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rstest::rstest;
use stillpoint_repo::{
    BackupOptions, DiskInput, DiskSource, ErrorKind, Extent, FileSource, ImageFormat, InitOptions,
    KdfParams, KeepRules, Repository, RestoreOptions, SecretString, SnapshotInfo,
};

const CHUNK: u32 = 64 << 10;
const PASS: &str = "test passphrase";

fn pass() -> SecretString {
    SecretString::from(PASS)
}

fn init(dir: &Path, encrypted: bool, grace: Duration) -> Repository {
    Repository::init_local(
        dir.join("repo"),
        &InitOptions {
            chunk_size: CHUNK,
            passphrase: encrypted.then(pass),
            kdf: KdfParams::for_tests(),
            gc_grace: grace,
            ..Default::default()
        },
    )
    .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Content {
    Sparse,
    Random,
    Compressible,
    Mixed,
}

fn make_image(path: &Path, size: u64, content: Content, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let block = 16 << 10;
    let mut off = 0u64;
    let mut buf = vec![0u8; block];
    while off < size {
        let len = (size - off).min(block as u64) as usize;
        let kind = match content {
            Content::Sparse => {
                if rng.random_ratio(1, 16) {
                    1
                } else {
                    0
                }
            }
            Content::Random => 1,
            Content::Compressible => 2,
            Content::Mixed => rng.random_range(0..3),
        };
        match kind {
            0 => {} // leave a hole
            1 => {
                rng.fill_bytes(&mut buf[..len]);
                file.write_all_at(&buf[..len], off).unwrap();
            }
            _ => {
                let line = format!("line {off} of a log file with some text\n");
                let text: Vec<u8> = line.bytes().cycle().take(len).collect();
                file.write_all_at(&text, off).unwrap();
            }
        }
        off += len as u64;
    }
}

fn backup(repo: &Repository, vm: &str, image: &Path) -> stillpoint_repo::Manifest {
    let source = FileSource::open(image).unwrap();
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: vm.into(),
            ..Default::default()
        })
        .unwrap();
    session
        .write_disk(
            DiskInput {
                name: "disk0".into(),
                source: &source,
                changed: None,
            },
            None,
        )
        .unwrap();
    session.publish(SnapshotInfo::default()).unwrap()
}

fn restore(repo: &Repository, manifest: &stillpoint_repo::Manifest, dest: &Path) {
    repo.restore_disk(
        manifest,
        "disk0",
        dest,
        ImageFormat::Raw,
        RestoreOptions::default(),
        None,
    )
    .unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "sizes differ");
    assert!(
        x == y,
        "contents of {} and {} differ",
        a.display(),
        b.display()
    );
}

#[rstest]
#[case::sparse(Content::Sparse, 3 << 20)]
#[case::random(Content::Random, (1 << 20) + 12345)]
#[case::compressible(Content::Compressible, 2 << 20)]
#[case::mixed(Content::Mixed, (5 << 20) + 1)]
#[case::empty(Content::Random, 0)]
#[case::smaller_than_a_chunk(Content::Random, 1000)]
fn round_trip_is_byte_identical(
    #[case] content: Content,
    #[case] size: u64,
    #[values(true, false)] encrypted: bool,
) {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), encrypted, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, size, content, 7);
    let manifest = backup(&repo, "vm", &image);
    // Reopen with the passphrase, as a later process would.
    let repo =
        Repository::open_local(dir.path().join("repo"), encrypted.then(pass).as_ref()).unwrap();
    let manifest = repo.find_snapshot(&manifest.id[..8]).unwrap();
    let out = dir.path().join("restored");
    restore(&repo, &manifest, &out);
    assert_same(&image, &out);
    assert!(repo.verify(false, None).unwrap().is_ok());
    if matches!(content, Content::Sparse) {
        // Zero chunks become holes: the restored file allocates far less than its size.
        let allocated = fs::metadata(&out)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap();
        assert!(
            allocated < size / 2,
            "restored sparse image allocates {allocated} of {size} bytes"
        );
        assert!(manifest.disks[0].stats.chunks_zero > 0);
    }
}

#[test]
fn qcow2_restore_converts_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 2 << 20, Content::Mixed, 3);
    let manifest = backup(&repo, "vm", &image);
    let qcow = dir.path().join("out.qcow2");
    repo.restore_disk(
        &manifest,
        "disk0",
        &qcow,
        ImageFormat::Qcow2,
        RestoreOptions::default(),
        None,
    )
    .unwrap();
    let status = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&image)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img compare says the qcow2 differs");
    assert!(!dir.path().join("out.qcow2.raw.partial").exists());
}

/// A file source that counts the bytes actually read.
struct CountingSource {
    inner: FileSource,
    read: AtomicU64,
}

impl DiskSource for CountingSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn data_extents(&self) -> stillpoint_repo::Result<Vec<Extent>> {
        self.inner.data_extents()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_repo::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(offset, buf)
    }
}

#[test]
fn incremental_reads_only_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 4 << 20, Content::Random, 1); // 64 chunks
    let first = backup(&repo, "vm", &image);

    // Change 3 bytes ranges touching chunks 2, 10 and 11 (the last straddles a boundary).
    let file = fs::OpenOptions::new().write(true).open(&image).unwrap();
    let changes = [
        (2 * CHUNK as u64 + 100, 50u64),
        (11 * CHUNK as u64 - 10, 20),
    ];
    for (off, len) in changes {
        file.write_all_at(&vec![0xee; len as usize], off).unwrap();
    }
    drop(file);
    let source = CountingSource {
        inner: FileSource::open(&image).unwrap(),
        read: AtomicU64::new(0),
    };
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            parent: Some(first.id.clone()),
            ..Default::default()
        })
        .unwrap();
    let stats = session
        .write_disk(
            DiskInput {
                name: "disk0".into(),
                source: &source,
                changed: Some(
                    changes
                        .iter()
                        .map(|&(offset, len)| Extent { offset, len })
                        .collect(),
                ),
            },
            None,
        )
        .unwrap();
    let second = session.publish(SnapshotInfo::default()).unwrap();
    assert_eq!(
        source.read.load(Ordering::Relaxed),
        3 * CHUNK as u64,
        "exactly 3 chunks read"
    );
    assert_eq!(stats.bytes_read, 3 * CHUNK as u64);
    assert_eq!(stats.chunks_unchanged, 61);
    assert_eq!(stats.chunks_new, 3);
    assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
    let out = dir.path().join("restored");
    restore(&repo, &second, &out);
    assert_same(&image, &out);
}

#[test]
fn unchanged_second_backup_stores_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 2 << 20, Content::Mixed, 5);
    backup(&repo, "vm", &image);
    let second = backup(&repo, "vm", &image);
    assert_eq!(second.disks[0].stats.chunks_new, 0);
    assert_eq!(second.disks[0].stats.bytes_stored, 0);
}

fn flip_bit(path: &Path, at_from_end: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = file.metadata().unwrap().len();
    let mut b = [0u8];
    file.read_exact_at(&mut b, len - at_from_end).unwrap();
    b[0] ^= 0x01;
    file.write_all_at(&b, len - at_from_end).unwrap();
}

fn first_data_chunk(repo: &Repository, manifest: &stillpoint_repo::Manifest) -> (u64, PathBuf) {
    let index = repo.load_index(manifest, "disk0").unwrap();
    let i = (0..index.entries().len())
        .find(|&i| !index.is_zero(i))
        .unwrap();
    let hex = hex::encode(index.entries()[i]);
    let root = PathBuf::from(repo.backend().location());
    (
        index.chunk_range(i).0,
        root.join("chunks").join(&hex[..2]).join(&hex),
    )
}

#[test]
fn flipped_chunk_bit_is_reported_with_snapshot_disk_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 1 << 20, Content::Random, 9);
    let manifest = backup(&repo, "vm", &image);
    let (offset, chunk) = first_data_chunk(&repo, &manifest);
    flip_bit(&chunk, 100);

    let report = repo.verify(false, None).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(
        (p.snapshot.as_str(), p.disk.as_deref(), p.offset),
        (manifest.id.as_str(), Some("disk0"), Some(offset))
    );
    // Quick verify only checks existence: it passes; deleting the chunk makes it fail.
    assert!(repo.verify(true, None).unwrap().is_ok());

    let out = dir.path().join("restored");
    let err = repo
        .restore_disk(
            &manifest,
            "disk0",
            &out,
            ImageFormat::Raw,
            RestoreOptions::default(),
            None,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let text = err.to_string();
    assert!(
        text.contains(&manifest.id)
            && text.contains("disk0")
            && text.contains(&format!("offset {offset}")),
        "{text}"
    );
    assert!(!out.exists(), "a failed restore leaves no partial file");

    let stats = repo
        .restore_disk(
            &manifest,
            "disk0",
            &out,
            ImageFormat::Raw,
            RestoreOptions {
                zero_fill_damaged: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(stats.damaged_offsets, vec![offset]);

    fs::remove_file(&chunk).unwrap();
    let report = repo.verify(true, None).unwrap();
    assert_eq!(report.problems[0].offset, Some(offset));
}

#[test]
fn flipped_index_and_manifest_bits_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 1 << 20, Content::Mixed, 11);
    let a = backup(&repo, "vm", &image);
    let b = backup(&repo, "vm2", &image);
    let root = dir.path().join("repo");
    flip_bit(&root.join(&a.disks[0].index), 3);
    flip_bit(&root.join("snapshots").join(&b.id), 20);
    let report = repo.verify(false, None).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let index_problem = report.problems.iter().find(|p| p.snapshot == a.id).unwrap();
    assert_eq!(index_problem.disk.as_deref(), Some("disk0"));
    assert!(
        index_problem.message.contains("index"),
        "{}",
        index_problem.message
    );
    let manifest_problem = report.problems.iter().find(|p| p.snapshot == b.id).unwrap();
    assert!(
        manifest_problem.message.contains("manifest"),
        "{}",
        manifest_problem.message
    );
    let err = repo
        .restore_disk(
            &a,
            "disk0",
            &dir.path().join("out"),
            ImageFormat::Raw,
            RestoreOptions::default(),
            None,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&a.id), "{err}");
    assert_eq!(
        repo.find_snapshot(&b.id).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    // Listing skips (and warns about) the damaged manifest instead of hiding every snapshot.
    let listed: Vec<String> = repo
        .snapshots(None)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, vec![a.id.clone()]);
}

#[test]
fn opening_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err = Repository::open_local(dir.path().join("nope"), Some(&pass())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoRepository);
    assert!(err.to_string().contains("nope"));

    init(dir.path(), true, Duration::from_secs(60));
    let root = dir.path().join("repo");
    let err = Repository::open_local(&root, Some(&SecretString::from("wrong"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert_eq!(
        Repository::open_local(&root, None).unwrap_err().kind(),
        ErrorKind::PassphraseRequired
    );
    let err = Repository::init_local(
        &root,
        &InitOptions {
            passphrase: Some(SecretString::from("x")),
            kdf: KdfParams::for_tests(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);

    let config = fs::read_to_string(root.join("config")).unwrap();
    fs::write(
        root.join("config"),
        config.replace("\"version\": 1", "\"version\": 99"),
    )
    .unwrap();
    let err = Repository::open_local(&root, Some(&pass())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedVersion);
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn parallel_backups_of_two_vms_both_restore() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("image{i}"));
            make_image(&p, 3 << 20, Content::Mixed, 100 + i);
            p
        })
        .collect();
    let manifests: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let repo = repo.clone();
                s.spawn(move || backup(&repo, &format!("vm{i}"), p))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, image) in manifests.iter().zip(&images) {
        let out = dir.path().join(format!("out-{}", m.vm));
        restore(&repo, m, &out);
        assert_same(image, &out);
    }
    assert!(repo.verify(false, None).unwrap().is_ok());
}

/// The race gc must survive: a backup re-uses chunks that are garbage (their snapshot was
/// pruned) while gc runs over and over beside it with a zero grace period.
#[test]
fn gc_beside_a_backup_never_loses_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), false, Duration::ZERO);
    let image = dir.path().join("image");
    make_image(&image, 8 << 20, Content::Random, 77);
    backup(&repo, "vm", &image);
    let report = repo
        .prune(
            &KeepRules {
                last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert!(report.deleted.is_empty());
    // Make all its chunks garbage by forgetting the snapshot by hand.
    for id in repo.snapshot_ids().unwrap() {
        fs::remove_file(dir.path().join("repo/snapshots").join(id)).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let gc_runs = AtomicU64::new(0);
    let manifest = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                repo.gc(false).unwrap();
                gc_runs.fetch_add(1, Ordering::Relaxed);
            }
        });
        let m = backup(&repo, "vm", &image);
        stop.store(true, Ordering::Relaxed);
        m
    });
    assert!(gc_runs.load(Ordering::Relaxed) > 0);
    let out = dir.path().join("restored");
    restore(&repo, &manifest, &out);
    assert_same(&image, &out);
    // After the backup, gc keeps everything it references and deletes nothing of it.
    let report = repo.gc(false).unwrap();
    assert_eq!(report.deleted_chunks, 0);
    assert!(repo.verify(false, None).unwrap().is_ok());
}

#[test]
fn prune_then_gc_deletes_only_unreferenced_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::ZERO);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    make_image(&a, 1 << 20, Content::Random, 1);
    make_image(&b, 1 << 20, Content::Random, 2);
    let old = backup(&repo, "vm", &a);
    std::thread::sleep(Duration::from_millis(20));
    let new = backup(&repo, "vm", &b);
    let report = repo
        .prune(
            &KeepRules {
                last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(report.deleted, vec![old.id.clone()]);
    let gc = repo.gc(false).unwrap();
    assert_eq!(gc.deleted_chunks, 16, "{gc:?}");
    assert_eq!(gc.deleted_indexes, 1);
    let out = dir.path().join("out");
    restore(&repo, &new, &out);
    assert_same(&b, &out);
    assert!(repo.verify(false, None).unwrap().is_ok());
}

/// Fills a small tmpfs: the backup fails with a "no space" error naming the path, and no
/// snapshot appears. Needs root for the mount (CI runs as root); fails loudly otherwise.
#[test]
fn disk_full_is_a_clear_error_and_leaves_no_snapshot() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs and must run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "cannot mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let repo = init(&mnt, true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 4 << 20, Content::Random, 4);
    let source = FileSource::open(&image).unwrap();
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            ..Default::default()
        })
        .unwrap();
    let err = session
        .write_disk(
            DiskInput {
                name: "disk0".into(),
                source: &source,
                changed: None,
            },
            None,
        )
        .unwrap_err();
    drop(session);
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains(mnt.to_str().unwrap()), "{err}");
    assert!(repo.snapshots(None).unwrap().is_empty());
    assert!(repo.verify(false, None).unwrap().is_ok());
    // No temp file is left behind by the failed writes.
    assert_eq!(
        fs::read_dir(mnt.join("repo/tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// An async source (stand-in for the NBD client: tokio file reads with a yield in between,
/// so that requests overlap) runs through the bridge with several reads in flight at once.
struct AsyncFileSource {
    path: PathBuf,
    size: u64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl stillpoint_repo::AsyncDiskSource for AsyncFileSource {
    fn size(&self) -> u64 {
        self.size
    }

    async fn data_extents(&self) -> stillpoint_repo::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset: 0,
            len: self.size,
        }])
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_repo::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut file = tokio::fs::File::open(&self.path).await.unwrap();
        file.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        file.read_exact(buf).await.unwrap();
        // Let the other workers' requests start before this one completes.
        for _ in 0..50 {
            tokio::task::yield_now().await;
            if self.max_in_flight.load(Ordering::SeqCst) > 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn async_source_through_the_blocking_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 2 << 20, Content::Random, 21);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bridge = stillpoint_repo::BlockingBridge::new(
        AsyncFileSource {
            path: image.clone(),
            size: 2 << 20,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        },
        runtime.handle().clone(),
    );
    let repo2 = repo.clone();
    let (manifest, max_in_flight) = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let mut session = repo2
                .begin_backup(BackupOptions {
                    vm: "vm".into(),
                    workers: Some(4),
                    ..Default::default()
                })
                .unwrap();
            session
                .write_disk(
                    DiskInput {
                        name: "disk0".into(),
                        source: &bridge,
                        changed: None,
                    },
                    None,
                )
                .unwrap();
            (
                session.publish(SnapshotInfo::default()).unwrap(),
                bridge.inner().max_in_flight.load(Ordering::SeqCst),
            )
        })
        .await
        .unwrap()
    });
    assert!(
        max_in_flight >= 2,
        "reads were serialized (max in flight {max_in_flight})"
    );
    let out = dir.path().join("restored");
    restore(&repo, &manifest, &out);
    assert_same(&image, &out);
}

/// prune keeps a snapshot that a running backup names as its parent.
#[test]
fn prune_keeps_the_parent_of_a_running_backup() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), false, Duration::ZERO);
    let image = dir.path().join("image");
    make_image(&image, 1 << 20, Content::Random, 31);
    let old = backup(&repo, "vm", &image);
    std::thread::sleep(Duration::from_millis(10));
    backup(&repo, "vm", &image);
    let session = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            parent: Some(old.id.clone()),
            ..Default::default()
        })
        .unwrap();
    let report = repo
        .prune(
            &KeepRules {
                last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(report.kept_in_use, vec![old.id.clone()]);
    assert!(report.deleted.is_empty());
    drop(session);
    let report = repo
        .prune(
            &KeepRules {
                last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(report.deleted, vec![old.id]);
}

/// Whoever can write to the storage edits `config` to say "none" (adding an id key, as an
/// unencrypted config has): the repository refuses to open instead of writing in clear.
#[test]
fn a_config_downgraded_to_no_encryption_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 1 << 20, Content::Mixed, 9);
    backup(&repo, "vm", &image);
    let root = dir.path().join("repo");
    let config_path = root.join("config");
    let config = fs::read_to_string(&config_path).unwrap();
    let downgraded = config.replace(
        "\"encryption\": \"aes256-gcm\",",
        &format!(
            "\"encryption\": \"none\",\n  \"id_key\": \"{}\",",
            "ab".repeat(32)
        ),
    );
    assert_ne!(config, downgraded);
    fs::write(&config_path, &downgraded).unwrap();
    for passphrase in [None, Some(pass())] {
        let err = Repository::open_local(&root, passphrase.as_ref()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let message = err.to_string();
        assert!(message.contains("\"encryption\": \"none\""), "{message}");
        assert!(message.contains("key files"), "{message}");
        assert!(
            message.contains(&config_path.display().to_string()),
            "{message}"
        );
    }
    // Also with the key files removed: the encrypted snapshots give it away.
    fs::remove_dir_all(root.join("keys")).unwrap();
    let message = Repository::open_local(&root, None).unwrap_err().to_string();
    assert!(message.contains("is encrypted"), "{message}");
    assert!(message.contains("snapshots/"), "{message}");
}

#[test]
fn init_refuses_a_non_empty_unrelated_directory_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("photos");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("holiday.jpg"), b"not a repository").unwrap();
    let options = InitOptions {
        passphrase: Some(pass()),
        kdf: KdfParams::for_tests(),
        chunk_size: CHUNK,
        ..Default::default()
    };
    let err = Repository::init_local(&target, &options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(
        err.to_string().contains(&target.display().to_string()),
        "{err}"
    );
    assert_eq!(fs::read_dir(&target).unwrap().count(), 1, "nothing written");
    // An empty directory and a new path are fine.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Repository::init_local(&empty, &options).unwrap();
    Repository::init_local(dir.path().join("new/deeper"), &options).unwrap();
    // zstd's range is enforced at init too.
    let err = Repository::init_local(
        dir.path().join("z"),
        &InitOptions {
            zstd_level: 99999,
            ..options.clone()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("zstd_level 99999"), "{err}");
}

/// A sparse disk whose data is a few bytes at the start and at the end.
struct HugeSparse {
    size: u64,
}

impl HugeSparse {
    fn byte_at(offset: u64) -> u8 {
        (offset % 251) as u8 | 1
    }
}

impl DiskSource for HugeSparse {
    fn size(&self) -> u64 {
        self.size
    }
    fn data_extents(&self) -> stillpoint_repo::Result<Vec<Extent>> {
        Ok(vec![
            Extent {
                offset: 0,
                len: 4096,
            },
            Extent {
                offset: self.size - 1000,
                len: 1000,
            },
        ])
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> stillpoint_repo::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = Self::byte_at(offset + i as u64);
        }
        Ok(())
    }
}

/// A valid disk of 1 TiB + 1 chunk at 64 KiB chunks has 2^24 + 1 chunks: its index (512 MiB
/// of digests) is over the blob limit, which aborted the backup before indexes were split into
/// segments. It backs up, lists, verifies and restores; its index is 17 segments.
/// (Takes ~600 MiB of memory for the index, by design 32 bytes per chunk.)
#[test]
fn a_one_tib_disk_at_64_kib_chunks_backs_up_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let source = HugeSparse {
        size: (1 << 40) + u64::from(CHUNK),
    };
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "big".into(),
            ..Default::default()
        })
        .unwrap();
    let stats = session
        .write_disk(
            DiskInput {
                name: "vda".into(),
                source: &source,
                changed: None,
            },
            None,
        )
        .unwrap();
    assert_eq!(stats.chunks_new, 2);
    let manifest = session.publish(SnapshotInfo::default()).unwrap();
    let entry = &manifest.disks[0];
    assert_eq!(
        entry.index_sizes.len(),
        17,
        "2^24 + 1 entries in 2^20-entry segments"
    );
    let root = dir.path().join("repo");
    assert!(root.join(format!("{}.16", entry.index)).exists());

    let repo = Repository::open_local(&root, Some(&pass())).unwrap();
    let manifest = repo.find_snapshot("big:latest").unwrap();
    let index = repo.load_index(&manifest, "vda").unwrap();
    assert_eq!(index.entries().len(), (1 << 24) + 1);
    assert!(!index.is_zero(0) && !index.is_zero(1 << 24) && index.is_zero(12345));
    drop(index);
    let report = repo.verify(false, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.chunks_checked, 2);
    let out = dir.path().join("vda.raw");
    repo.restore_disk(
        &manifest,
        "vda",
        &out,
        ImageFormat::Raw,
        RestoreOptions::default(),
        None,
    )
    .unwrap();
    let file = File::open(&out).unwrap();
    assert_eq!(file.metadata().unwrap().len(), source.size);
    let mut head = vec![0u8; 4097];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(
        head[..4096]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == HugeSparse::byte_at(i as u64))
    );
    assert_eq!(head[4096], 0);
    let mut tail = vec![0u8; 1000];
    file.read_exact_at(&mut tail, source.size - 1000).unwrap();
    assert!(
        tail.iter()
            .enumerate()
            .all(|(i, &b)| b == HugeSparse::byte_at(source.size - 1000 + i as u64))
    );
    drop(file);
    fs::remove_file(&out).unwrap();

    // A missing segment is named, not taken for a short index.
    fs::remove_file(root.join(format!("{}.7", entry.index))).unwrap();
    let err = repo.load_index(&manifest, "vda").unwrap_err();
    assert!(
        err.to_string().contains(&format!("{}.7", entry.index)),
        "{err}"
    );
}

/// A disk with more chunks than an index holds is refused up front, naming the disk.
#[test]
fn a_disk_beyond_the_index_limit_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), false, Duration::from_secs(3600));
    let source = HugeSparse {
        size: u64::from(u32::MAX) * u64::from(CHUNK) + 1,
    };
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "huge".into(),
            ..Default::default()
        })
        .unwrap();
    let err = session
        .write_disk(
            DiskInput {
                name: "vdz".into(),
                source: &source,
                changed: None,
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let message = err.to_string();
    assert!(
        message.contains("disk vdz") && message.contains("larger chunk size"),
        "{message}"
    );
}

/// A truncated index is reported as truncated, with the object and both sizes.
#[test]
fn a_truncated_index_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), true, Duration::from_secs(3600));
    let image = dir.path().join("image");
    make_image(&image, 3 << 20, Content::Random, 4);
    let manifest = backup(&repo, "vm", &image);
    let entry = &manifest.disks[0];
    let path = dir.path().join("repo").join(&entry.index);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = repo.load_index(&manifest, "disk0").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "truncated: {} bytes, the manifest recorded {}",
            bytes.len() / 2,
            bytes.len()
        )),
        "{message}"
    );
    assert!(message.contains(&entry.index), "{message}");
    let report = repo.verify(true, None).unwrap();
    assert!(
        report.problems[0].message.contains("truncated"),
        "{:?}",
        report.problems
    );
}
