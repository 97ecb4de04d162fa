//! Writes the pinned fixture repositories (run once, by hand, into a NEW directory; the
//! committed fixture is never regenerated — a build that cannot read it has broken the format).
//!
//! `STILLPOINT_FIXTURE_OUT=/tmp/fx cargo test -p stillpoint-repo --test fixture_gen -- --ignored`

use std::path::Path;

use stillpoint_repo::{
    BackupOptions, DiskInput, FileSource, InitOptions, KdfParams, Repository, SnapshotInfo,
};

mod fixture_data;

fn write(root: &Path, encrypted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init_local(
        root,
        &InitOptions {
            chunk_size: fixture_data::CHUNK_SIZE,
            passphrase: encrypted.then(|| fixture_data::PASSPHRASE.into()),
            kdf: KdfParams::for_tests(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut session = repo
        .begin_backup(BackupOptions {
            vm: "fixture-vm".into(),
            workers: Some(1),
            ..Default::default()
        })
        .unwrap();
    for (name, bytes) in [("vda", fixture_data::vda()), ("vdb", fixture_data::vdb())] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let source = FileSource::open(&path).unwrap();
        session
            .write_disk(
                DiskInput {
                    name: name.into(),
                    source: &source,
                    changed: None,
                },
                None,
            )
            .unwrap();
    }
    session
        .publish(SnapshotInfo {
            platform: Some("image:fixture".into()),
            time: Some("2026-12-04T12:00:00Z".parse().unwrap()),
            requested: Some("crash".into()),
            achieved: Some("crash".into()),
            ..Default::default()
        })
        .unwrap();
}

#[test]
#[ignore = "writes a new fixture; run by hand only"]
fn write_fixture() {
    let out = std::path::PathBuf::from(
        std::env::var("STILLPOINT_FIXTURE_OUT").expect("set STILLPOINT_FIXTURE_OUT"),
    );
    assert!(
        !out.exists(),
        "{} exists: never overwrite a fixture",
        out.display()
    );
    write(&out.join("encrypted"), true);
    write(&out.join("unencrypted"), false);
}
