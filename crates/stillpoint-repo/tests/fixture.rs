//! The pinned fixture: repositories written by the format-version-1 code of 2026-12-04
//! (`tests/fixtures/v1/{encrypted,unencrypted}`, made by `fixture_gen.rs`, a few KiB). Every
//! future build must read them back byte-exact; their files' hashes are pinned here so that the
//! fixture itself cannot be regenerated to fit a changed format.

use std::path::{Path, PathBuf};

use stillpoint_repo::{
    BackupOptions, DiskInput, Encryption, ErrorKind, FileSource, ImageFormat, Repository,
    RestoreOptions, SecretString, SnapshotInfo,
};

mod fixture_data;

const ENCRYPTED_SNAPSHOT: &str = "6b130bb7371bcecb";
const UNENCRYPTED_SNAPSHOT: &str = "6b130bb8a2798fb8";

/// SHA-256 of every file of the fixture, as committed (`sha256sum`).
const PINNED: &[(&str, &str)] = &[
    (
        "encrypted/chunks/7f/7f083cda69c89b078cf471d332adedfad3ccac3c88b1f301e951df89bf99cbd5",
        "ccc81939cf944cdc3d58f202f10880e3781664d18a2ea197ace04cac755c4307",
    ),
    (
        "encrypted/chunks/86/8666fc925b88bb442fe8ceed06b60b6fa814771e42c41c1a78dc7bd8adf1a03d",
        "0110c3e00e95e4d0952d99e2bb2c95f7c17a478481c9c6192a4ba54cabeb18cb",
    ),
    (
        "encrypted/chunks/d8/d84cb723a542390b2efdc08e7adc4a4b98cc00bd5f70325252ee86a431a10510",
        "9910b635823b7a1baa3032093a6a21f4cde6afe3c2e2b5f9ea4b7578b3e54aa7",
    ),
    (
        "encrypted/config",
        "da36049b11930331a6517b1b4782134150adb9fcd038d59df984c6193bbaab40",
    ),
    (
        "encrypted/indexes/6b130bb7371bcecb/0",
        "dfeda7383e73ff93f34ef8d5c75a97e1820641be8e868e1951b29ac25935d76a",
    ),
    (
        "encrypted/indexes/6b130bb7371bcecb/1",
        "3115cc45714dfd0112b3662018c2328d9160e5683e0cd0f0b4f28e7121b054b2",
    ),
    (
        "encrypted/keys/425f76d93a899889",
        "c8c6cacc95bed0e58fc898c16599aa9f874fcc6b279e8567fd20004f0a0fbc9a",
    ),
    (
        "encrypted/snapshots/6b130bb7371bcecb",
        "a165c6534430012336e3c4b28f330408237dfa8f3d93c7b7555b96edaa5d4345",
    ),
    (
        "unencrypted/chunks/84/8410a8e2a32563e092679048db8d1a4f2c1f83b6316a7c77abc1b8f39e5a385b",
        "20720ac3f8a0c06ca6637dee474135d97725da89a01c117d9cde7af91767dd96",
    ),
    (
        "unencrypted/chunks/a4/a4a348e86e7cb12b03b66fdd7d490e30653a378d75ccf682500233ef22b433fb",
        "d99844299d9a567c25f3627e9f74015701701cdd35446c0170d2ecd443432979",
    ),
    (
        "unencrypted/chunks/c8/c861410d14628d00c929979d6290ff9b0b28ed485c0a2ce4b9248c725790e639",
        "c122a3f268a6dda78009768bb91abf8945def6b166af70a4637bbe3a74ee6a33",
    ),
    (
        "unencrypted/config",
        "44291e350eedbd0ec3c3f301ac236a97fff2333c6e16180a69c19320e959073e",
    ),
    (
        "unencrypted/indexes/6b130bb8a2798fb8/0",
        "f0ba718e37a9ff3c95e20a9269923e4793ee979977a16a796d196487502953ad",
    ),
    (
        "unencrypted/indexes/6b130bb8a2798fb8/1",
        "8d27d4102d51ba75fa4182b2b27bfa00a6beabdd3470335bb35516aa8d5b2263",
    ),
    (
        "unencrypted/snapshots/6b130bb8a2798fb8",
        "3e8b4474b15fbc93c087b4609049f2d392848a925542071247b0e2fbbbbb2797",
    ),
];

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn files(dir: &Path, base: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, base, out);
        } else {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read(&path).unwrap()));
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let mut all = Vec::new();
    files(from, from, &mut all);
    for (rel, bytes) in all {
        let target = to.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
}

/// A writable copy (reading takes locks, which are objects in the repository).
fn copy_of(which: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(which);
    copy_dir(&fixture_root().join(which), &root);
    (dir, root)
}

fn passphrase() -> SecretString {
    SecretString::from(fixture_data::PASSPHRASE)
}

#[test]
fn fixture_files_are_the_committed_ones() {
    let mut all = Vec::new();
    files(&fixture_root(), &fixture_root(), &mut all);
    let mut actual: Vec<(String, String)> = all
        .iter()
        .map(|(rel, bytes)| (rel.clone(), sha256_hex(bytes)))
        .collect();
    actual.sort();
    let pinned: Vec<(String, String)> = PINNED
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(actual, pinned);
}

#[test]
fn fixture_disk_contents_are_the_pinned_ones() {
    // The generator of the expected bytes is itself pinned.
    // (SHA-256 computed independently of this code, in Python.)
    assert_eq!(
        sha256_hex(&fixture_data::vda()),
        "6c1f47d54e6eec44725af7f73a0f9029b0db05cc9c8b2a426904ecb258e0a4d1"
    );
    assert_eq!(
        sha256_hex(&fixture_data::vdb()),
        "a6d4119fa740652954f5273444c6abf6422b9e397958e8fdfd724443d11bbef3"
    );
}

fn reads_back(which: &str, secret: Option<&SecretString>, id: &str, encryption: Encryption) {
    let (dir, root) = copy_of(which);
    let repo = Repository::open_local(&root, secret).unwrap();
    let config = repo.config();
    assert_eq!(config.chunk_size, fixture_data::CHUNK_SIZE);
    assert_eq!(config.encryption, encryption);
    assert_eq!(config.zstd_level, 1);
    assert_eq!(config.gc_grace_seconds, 86400);

    let snapshots = repo.snapshots(None).unwrap();
    assert_eq!(snapshots.len(), 1);
    let manifest = &snapshots[0];
    assert_eq!(manifest.id, id);
    assert_eq!(manifest.vm, "fixture-vm");
    assert_eq!(manifest.platform.as_deref(), Some("image:fixture"));
    assert_eq!(manifest.time.to_rfc3339(), "2026-12-04T12:00:00+00:00");
    assert_eq!(manifest.achieved.as_deref(), Some("crash"));
    let names: Vec<&str> = manifest.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["vda", "vdb"]);
    let vda = &manifest.disks[0];
    assert_eq!(vda.size, 3 * 65536 + 3000);
    assert_eq!(vda.index, format!("indexes/{id}/0"));
    assert_eq!(vda.stats.chunks_new, 2);
    assert_eq!(vda.stats.chunks_zero, 1);

    let index = repo.load_index(manifest, "vda").unwrap();
    assert_eq!(index.entries().len(), 4);
    assert!(index.is_zero(1));
    assert_eq!(
        index.entries()[0],
        index.entries()[2],
        "dedup of equal chunks"
    );

    for (disk, expected) in [("vda", fixture_data::vda()), ("vdb", fixture_data::vdb())] {
        let out = dir.path().join(format!("{disk}.raw"));
        repo.restore_disk(
            manifest,
            disk,
            &out,
            ImageFormat::Raw,
            RestoreOptions::default(),
            None,
        )
        .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == expected,
            "{which} {disk} differs"
        );
    }
    let report = repo.verify(false, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.chunks_checked, 3);

    // Today's code adds a snapshot to the old repository; both read back.
    let image = dir.path().join("new.img");
    std::fs::write(&image, fixture_data::vdb().repeat(100)).unwrap();
    let source = FileSource::open(&image).unwrap();
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "fixture-vm".into(),
            ..Default::default()
        })
        .unwrap();
    session
        .write_disk(
            DiskInput {
                name: "new".into(),
                source: &source,
                changed: None,
            },
            None,
        )
        .unwrap();
    session.publish(SnapshotInfo::default()).unwrap();
    let repo = Repository::open_local(&root, secret).unwrap();
    assert_eq!(repo.snapshots(None).unwrap().len(), 2);
    assert!(repo.verify(false, None).unwrap().is_ok());
}

#[test]
fn encrypted_fixture_reads_back_byte_exact() {
    reads_back(
        "encrypted",
        Some(&passphrase()),
        ENCRYPTED_SNAPSHOT,
        Encryption::Aes256Gcm,
    );
}

#[test]
fn unencrypted_fixture_reads_back_byte_exact() {
    reads_back("unencrypted", None, UNENCRYPTED_SNAPSHOT, Encryption::None);
}

#[test]
fn encrypted_fixture_refuses_a_wrong_passphrase() {
    let (_dir, root) = copy_of("encrypted");
    let err = Repository::open_local(&root, Some(&SecretString::from("wrong"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
}
