//! `stillpoint demo` — the README's first command — runs end to end and proves what it says:
//! every level reached, the filesystem- and application-level restores clean, the boot test
//! passed.
#![cfg(feature = "vm-tests")]

use std::process::Command;

#[test]
fn demo_proves_every_level_and_the_restore_boots() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["demo", "--json"])
        .current_dir(dir.path())
        .env_remove("STILLPOINT_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["proofs_hold"], true, "{report:#}");
    let levels = report["levels"].as_array().unwrap();
    let achieved: Vec<&str> = levels
        .iter()
        .map(|l| l["achieved"].as_str().unwrap())
        .collect();
    assert_eq!(achieved, ["crash", "filesystem", "application"]);
    for level in &levels[1..] {
        assert_eq!(level["ext4"]["fsck_clean"], true, "{level:#}");
        assert_eq!(level["ext4"]["needs_recovery"], false, "{level:#}");
        assert!(level["frozen_ms"].as_f64().is_some(), "{level:#}");
    }
    assert_eq!(levels[2]["db_integrity"], "ok");
    assert_eq!(levels[2]["db_hot_journal"], false);
    assert_eq!(
        levels[0]["frozen_ms"],
        serde_json::Value::Null,
        "a crash-level backup does not freeze"
    );
    assert_eq!(report["boot_test_passed"], true);
    let incremental = report["incremental_bytes_read"].as_u64().unwrap();
    assert!(
        incremental < report["disk_size"].as_u64().unwrap() / 4,
        "{report:#}"
    );
}
