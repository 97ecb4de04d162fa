//! Read throughput of this client against `nbdcopy` (libnbd), measured in the
//! same run on the same export.
//!
//! ```text
//! cargo run --release -p stillpoint-nbd --example read_bench -- [SIZE_MIB] [WORKDIR]
//! ```
//! Builds a qcow2 image of SIZE_MIB (default 1536) with mixed content (pattern
//! data, pseudo-random data, zero runs that become holes), serves it with
//! `qemu-nbd -r`, warms the page cache, then times (median of 5 interleaved rounds):
//! - ours: `map(base:allocation)` + `read_ranges` of the data ranges (what a
//!   full backup does), with several request sizes / depths;
//! - `nbdcopy URI null:` (its defaults: extents, multi-conn) and with
//!   `--connections=1` (one connection, like ours).
//!
//! Needs qemu-img, qemu-nbd and nbdcopy. Prints a table and the ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_nbd::{NbdClient, ReadOptions, data_ranges};

fn mixed_raw(path: &Path, size: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut at = 0usize;
    let mut kind = 0usize;
    let mut buf = Vec::new();
    while at < size {
        let len = [3 << 20, 1 << 20, 5 << 20, 192 << 10, 2 << 20][kind % 5].min(size - at);
        buf.clear();
        buf.resize(len, 0);
        match kind % 3 {
            0 => buf
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = ((at + i) / 512 % 251) as u8 + 1),
            1 => {} // zeros: become holes
            _ => buf.chunks_mut(8).for_each(|c| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bytes = x.to_le_bytes();
                c.copy_from_slice(&bytes[..c.len()]);
            }),
        }
        f.write_all(&buf).unwrap();
        at += len;
        kind += 1;
    }
    f.flush().unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn nbdcopy(uri: &str, extra: &[&str]) -> Duration {
    let t = Instant::now();
    let st = Command::new("nbdcopy")
        .args(extra)
        .args([uri, "null:"])
        .status()
        .expect("nbdcopy must be installed");
    assert!(st.success(), "nbdcopy failed");
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let size_mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SIZE_MIB"))
        .unwrap_or(1536);
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let raw = dir.join("bench.raw");
    let img = dir.join("bench.qcow2");
    let sock = dir.join("bench.sock");
    eprintln!("building a {size_mib} MiB mixed image in {}", dir.display());
    mixed_raw(&raw, size_mib << 20);
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .args([&raw, &img])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();

    let _ = std::fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .arg(format!("--socket={}", sock.display()))
        .args(["-r", "--persistent", "--shared=8", "-f", "qcow2"])
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-nbd must be installed");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let client = loop {
        match NbdClient::connect_unix(&sock, "", &["base:allocation"]).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };

    let map = client.map("base:allocation").await.unwrap();
    let ranges = data_ranges(&map);
    let data_bytes: u64 = ranges.iter().map(|r| r.1).sum();
    println!(
        "image: {size_mib} MiB virtual, {:.0} MiB data in {} ranges, served by qemu-nbd",
        data_bytes as f64 / (1 << 20) as f64,
        ranges.len(),
    );
    // Warm the page cache so every contender reads from memory.
    nbdcopy(&uri, &[]);

    // Rounds interleave all contenders, so load from elsewhere on a shared
    // machine hits them alike; each gets the median of its rounds.
    let default = ReadOptions::default();
    let configs = [
        (default.request_size, default.depth),
        (2 << 20, 16),
        (1 << 20, 32),
        (512 << 10, 32),
        (256 << 10, 64),
        (128 << 10, 64),
    ];
    let copies: [(&str, &[&str]); 2] = [
        ("nbdcopy (defaults)", &[]),
        ("nbdcopy --connections=1", &["--connections=1"]),
    ];
    let mut ours: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let mut theirs: Vec<Vec<Duration>> = vec![Vec::new(); copies.len()];
    for _round in 0..5 {
        for (i, &(req, depth)) in configs.iter().enumerate() {
            let t = Instant::now();
            let map = client.map("base:allocation").await.unwrap();
            let mut check = 0u8;
            let n = client
                .read_ranges(
                    &data_ranges(&map),
                    ReadOptions {
                        request_size: req,
                        depth,
                    },
                    |_, d| check ^= d[0],
                )
                .await
                .unwrap();
            std::hint::black_box(check);
            assert_eq!(n, data_bytes);
            ours[i].push(t.elapsed());
        }
        for (i, (_, extra)) in copies.iter().enumerate() {
            theirs[i].push(nbdcopy(&uri, extra));
        }
    }
    let mut rows = Vec::new();
    for (i, &(req, depth)) in configs.iter().enumerate() {
        let tag = if i == 0 { " (default)" } else { "" };
        rows.push((
            format!("stillpoint-nbd {}K x{depth}{tag}", req >> 10),
            median(std::mem::take(&mut ours[i])),
        ));
    }
    for (i, (name, _)) in copies.iter().enumerate() {
        rows.push((name.to_string(), median(std::mem::take(&mut theirs[i]))));
    }

    println!("{:<32} {:>10} {:>12}", "reader", "time", "MiB/s (data)");
    for (name, d) in &rows {
        println!(
            "{name:<32} {:>9.3}s {:>12.0}",
            d.as_secs_f64(),
            mib_s(data_bytes, *d)
        );
    }
    let ours = rows[0].1.as_secs_f64();
    for (name, d) in rows.iter().filter(|r| r.0.starts_with("nbdcopy")) {
        println!(
            "ratio stillpoint-nbd (default options) / {name}: {:.2} (throughput; >1 = faster)",
            d.as_secs_f64() / ours
        );
    }
    client.disconnect().await.unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
}
