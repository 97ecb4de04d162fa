//! `stillpoint bench repo` end to end on a small image, with the real restic and borg, so the
//! benchmark keeps working. Numbers are not asserted (tests never judge timings); only that
//! every tool ran every phase and the report is complete.

use std::process::Command;

#[test]
fn bench_repo_runs_every_tool_through_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["--json", "bench", "repo", "--size", "40MiB", "--workdir"])
        .arg(dir.path())
        .env_remove("STILLPOINT_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for tool in ["stillpoint", "restic", "borg"] {
        for phase in ["full", "unchanged", "incremental", "restore"] {
            let m = &report[tool][phase];
            assert_eq!(m["success"], true, "{tool} {phase}: {m}");
            assert!(
                m["max_rss_kib"].as_u64().unwrap() > 0,
                "{tool} {phase}: no RSS measured"
            );
        }
        assert!(
            report[tool]["repo_bytes"].as_u64().unwrap() > 0,
            "{tool}: no repository size"
        );
    }
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
}
