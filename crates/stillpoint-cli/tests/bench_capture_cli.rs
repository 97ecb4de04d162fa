//! `stillpoint bench capture` refuses bad settings before it boots anything, naming what is
//! wrong.

use std::process::Command;

fn bench_capture(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["bench", "capture"])
        .args(args)
        .env_remove("STILLPOINT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (&["--sizes", "1000"], "size of data disk 0"),
        (&["--sizes", "1000"], "configuration 1 x 1000B"),
        (
            &["--sizes", "64MiB,64MiB", "--disks", "1"],
            "1 x 64MiB is given twice",
        ),
        (
            &["--fill-percent", "90"],
            "--fill-percent must be between 1 and 80",
        ),
        (&["--rounds", "0"], "--rounds must be at least 1"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = bench_capture(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?} should say `{expected}`: {stderr}"
        );
    }
    let (code, stderr) = bench_capture(&["--sizes", "lots"]);
    assert_eq!(
        code,
        Some(2),
        "a size that does not parse is a usage error: {stderr}"
    );
    assert!(stderr.contains("`lots` is not a size"), "{stderr}");
}
