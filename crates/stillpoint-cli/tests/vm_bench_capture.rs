//! `stillpoint bench capture` end to end on tiny disks (real QEMU under TCG, real qemu-ga, the
//! real engine, qemu-img and backup-image), one round, so the benchmark keeps working. Timings
//! are not judged (tests never do); the report must be complete, every stall measured, and the
//! byte counts must show that each side really copied the data written into the disks.
#![cfg(feature = "vm-tests")]

use std::process::Command;

use serde_json::Value;

fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

#[test]
fn bench_capture_measures_ours_and_the_naive_sequence_for_every_configuration() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args([
            "--json",
            "bench",
            "capture",
            "--sizes",
            "32MiB",
            "--disks",
            "1,2",
            "--rounds",
            "1",
            "--copy-rounds",
            "1",
            // One writer loop over both disks of the second configuration.
            "--writer-on",
            "all-disks",
            "--workdir",
        ])
        .arg(work.path())
        .env_remove("STILLPOINT_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench capture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["rounds"], 1);
    assert_eq!(report["writer_on"], "all-disks");
    let configs = report["configs"].as_array().expect("configs");
    let disk_counts: Vec<u64> = configs
        .iter()
        .map(|c| c["disks"].as_u64().expect("disks"))
        .collect();
    assert_eq!(disk_counts, [1, 2]);
    for config in configs {
        let disks = config["disks"].as_u64().unwrap();
        let data = config["data_per_disk"].as_u64().unwrap();
        assert_eq!(config["disk_size"], 32 << 20);
        assert_eq!(data, 16 << 20, "50 % of each disk is filled by default");
        for side in ["ours", "naive"] {
            let rounds = config[side]["rounds"].as_array().expect("rounds");
            assert_eq!(rounds.len(), 1, "{side}: {config}");
            let stall = number(&rounds[0]["stall_ms"], "stall_ms");
            assert!(stall > 0.0, "{side} {disks} disk(s): no stall measured");
            let median = number(&config[side]["stall"]["median_ms"], "median");
            assert_eq!(median, stall, "one round: the median is that round");
            assert!(number(&rounds[0]["frozen_ms"], "frozen_ms") > 0.0);
            assert!(number(&rounds[0]["freeze_call_ms"], "freeze_call_ms") > 0.0);
        }
        // Both really copied every disk's data: ours after the thaw, the naive one while frozen.
        let ours = &config["ours"]["rounds"][0];
        let naive = &config["naive"]["rounds"][0];
        assert!(
            ours["bytes_read"].as_u64().unwrap() >= disks * data,
            "{ours}"
        );
        assert!(
            naive["bytes_copied"].as_u64().unwrap() >= disks * data,
            "{naive}"
        );
        assert!(number(&ours["capture_start_ms"], "capture_start_ms") > 0.0);
        // The guest's clock was mapped onto the host's: the longest append is placed among
        // the backup's steps, and one overlapped the quiesce (the writer was blocked there).
        assert!(
            !ours["stall_during"].as_array().unwrap().is_empty(),
            "{ours}"
        );
        assert!(
            number(&ours["quiesce_stall_ms"], "quiesce_stall_ms") > 0.0,
            "{ours}"
        );
        let control = &config["controls"][0];
        assert!(
            number(&control["window_ms"], "window_ms") > 0.0,
            "{control}"
        );
        assert!(number(&control["stall_ms"], "stall_ms") > 0.0, "{control}");
        assert!(number(&config["stall_ratio"], "stall_ratio") > 0.0);
    }

    let copy = &report["copy"];
    assert_eq!(
        copy["disks"], 1,
        "the copy phase runs with the fewest disks"
    );
    let round = &copy["rounds"][0];
    let data = copy["data_per_disk"].as_u64().unwrap();
    for field in ["ours_bytes_read", "image_bytes_read"] {
        assert!(round[field].as_u64().unwrap() >= data, "{field}: {round}");
    }
    assert!(round["changed_bytes"].as_u64().unwrap() > 0);
    let incremental = round["incremental_bytes_read"].as_u64().unwrap();
    assert!(
        incremental > 0 && incremental < round["ours_bytes_read"].as_u64().unwrap(),
        "the incremental reads the changed chunks only: {round}"
    );
    for field in [
        "ours_mb_s",
        "image_mb_s",
        "throughput_ratio",
        "incremental_ratio",
    ] {
        assert!(number(&copy[field], field) > 0.0, "{field}: {copy}");
    }
}
