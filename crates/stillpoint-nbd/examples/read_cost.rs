//! CPU cost of reading an export the way a backup does, by request size.
//!
//! ```text
//! cargo run --release -p stillpoint-nbd --example read_cost -- [SIZE_MIB] [WORKDIR]
//! ```
//! Serves a qcow2 image of SIZE_MIB (default 2048) of pseudo-random data with
//! `qemu-nbd -r` (the same NBD server code as QEMU's built-in one), warms the
//! page cache, then reads it as the repository writer reads a capture: 4 plain
//! threads, each taking the next 4 MiB chunk and blocking (`Handle::block_on`)
//! on `read_into` of its pieces, all pieces of a chunk in flight at once. For
//! each piece size, the median over 5 interleaved rounds of the wall time and
//! of the CPU seconds per GiB of this process and of qemu-nbd, against `pread`
//! of the same bytes from the raw file by 4 threads (what `backup-image` does).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stillpoint_nbd::NbdClient;

const CHUNK: u64 = 4 << 20;
const THREADS: usize = 4;

fn random_raw(path: &Path, size: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        buf.chunks_mut(8).for_each(|c| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        });
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// CPU seconds (user + system) of a process, from /proc.
fn process_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn own_cpu_s() -> f64 {
    process_cpu_s(std::process::id())
}

/// Reads `size` bytes in 4 MiB chunks from 4 threads with `read`.
fn run_threads(size: u64, read: &(dyn Fn(u64, &mut [u8]) + Sync)) -> Duration {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                loop {
                    let at = next.fetch_add(CHUNK, Ordering::Relaxed);
                    if at >= size {
                        break;
                    }
                    let n = CHUNK.min(size - at) as usize;
                    read(at, &mut buf[..n]);
                    std::hint::black_box(&buf);
                }
            });
        }
    });
    t.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let size_mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SIZE_MIB"))
        .unwrap_or(2048);
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let raw = dir.join("cost.raw");
    let img = dir.join("cost.qcow2");
    let sock = dir.join("cost.sock");
    eprintln!("building a {size_mib} MiB image in {}", dir.display());
    random_raw(&raw, size_mib << 20);
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .args([&raw, &img])
        .status()
        .unwrap();
    assert!(st.success());
    let _ = std::fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .arg(format!("--socket={}", sock.display()))
        .args(["-r", "--persistent", "-f", "qcow2"])
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-nbd must be installed");
    let server_pid = server.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        loop {
            match NbdClient::connect_unix(&sock, "", &[]).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let size = client.size();
    let file = std::fs::File::open(&raw).unwrap();
    let handle = runtime.handle().clone();

    let pieces: [u64; 4] = [256 << 10, 1 << 20, 2 << 20, 4 << 20];
    let nbd_read = |piece: u64| {
        let client = &client;
        let handle = &handle;
        move |at: u64, buf: &mut [u8]| {
            handle.block_on(async {
                let reads = buf
                    .chunks_mut(piece as usize)
                    .enumerate()
                    .map(|(i, part)| client.read_into(at + i as u64 * piece, part));
                for r in futures::future::join_all(reads).await {
                    r.unwrap();
                }
            })
        }
    };
    // What the capture path did before `read_into`: a `Vec` per request, copied into place.
    let read_copy = |at: u64, buf: &mut [u8]| {
        handle.block_on(async {
            let reads = buf.chunks_mut(256 << 10).enumerate().map(|(i, part)| {
                let client = &client;
                async move {
                    let data = client
                        .read(at + i as u64 * (256 << 10), part.len() as u64)
                        .await;
                    part.copy_from_slice(&data.unwrap());
                }
            });
            futures::future::join_all(reads).await;
        })
    };
    // One `read_into` per chunk: it splits the chunk itself.
    let whole = |at: u64, buf: &mut [u8]| handle.block_on(client.read_into(at, buf)).unwrap();
    let pread = |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at).unwrap();
    // Warm the page cache (both files).
    run_threads(size, &pread);
    run_threads(size, &nbd_read(1 << 20));

    let gib = size as f64 / (1u64 << 30) as f64;
    // Per reader: its name, then wall seconds, own and qemu-nbd CPU-s/GiB of every round.
    type Row = (String, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut rows: Vec<Row> = Vec::new();
    for round in 0..5 {
        let mut i = 0;
        let mut measure = |name: String, read: &(dyn Fn(u64, &mut [u8]) + Sync)| {
            let (own, qemu) = (own_cpu_s(), process_cpu_s(server_pid));
            let wall = run_threads(size, read).as_secs_f64();
            let own = (own_cpu_s() - own) / gib;
            let qemu = (process_cpu_s(server_pid) - qemu) / gib;
            if round == 0 {
                rows.push((name, Vec::new(), Vec::new(), Vec::new()));
            }
            rows[i].1.push(wall);
            rows[i].2.push(own);
            rows[i].3.push(qemu);
            i += 1;
        };
        measure("pread of the raw file".into(), &pread);
        measure("read + copy, 256 KiB pieces".into(), &read_copy);
        measure("read_into, whole chunk".into(), &whole);
        for piece in pieces {
            measure(
                format!("read_into, {} KiB pieces", piece >> 10),
                &nbd_read(piece),
            );
        }
    }
    println!(
        "{:<32} {:>8} {:>10} {:>16} {:>16}",
        "reader", "time", "MiB/s", "own CPU-s/GiB", "qemu CPU-s/GiB"
    );
    for (name, wall, own, qemu) in rows {
        let wall = median(wall);
        println!(
            "{name:<32} {wall:>7.3}s {:>10.0} {:>16.2} {:>16.2}",
            size as f64 / (1 << 20) as f64 / wall,
            median(own),
            median(qemu)
        );
    }
    runtime.block_on(client.disconnect()).unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
}
