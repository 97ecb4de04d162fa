//! Freeze/thaw latency of a real guest: `guest-fsfreeze-freeze` and `-thaw` round trips.
//!
//! ```text
//! cargo run -p stillpoint-qga --example freeze_latency -- [--socket PATH] [--rounds N] [--dirty-mib M]
//! ```
//! Without `--socket` it boots the test guest (stillpoint-testvm, TCG). `--rounds` defaults to
//! 20. With `--dirty-mib M` a second series writes M MiB into `/data` (left in the page cache,
//! not synced) before each round, so the freeze has to write it back.

use std::path::PathBuf;
use std::time::Duration;

use stillpoint_qga::{
    Client, ExecRequest, FreezeThawRound, LatencySummary, connect_unix, measure_freeze_thaw,
    measure_freeze_thaw_round,
};
use stillpoint_testvm::{LaunchedVm, VmConfig};
use tokio::net::UnixStream;

type BoxError = Box<dyn std::error::Error>;

struct Options {
    socket: Option<PathBuf>,
    rounds: usize,
    dirty_mib: u32,
}

fn parse_options() -> Result<Options, BoxError> {
    let mut options = Options {
        socket: None,
        rounds: 20,
        dirty_mib: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("option {flag} needs a value"))
        };
        match flag.as_str() {
            "--socket" => options.socket = Some(PathBuf::from(value()?)),
            "--rounds" => {
                let text = value()?;
                options.rounds = text
                    .parse()
                    .map_err(|e| format!("--rounds {text:?} is not a count: {e}"))?;
            }
            "--dirty-mib" => {
                let text = value()?;
                options.dirty_mib = text
                    .parse()
                    .map_err(|e| format!("--dirty-mib {text:?} is not a number of MiB: {e}"))?;
            }
            other => return Err(format!("unknown option {other:?}").into()),
        }
    }
    Ok(options)
}

fn report(label: &str, rounds: &[FreezeThawRound]) {
    let freeze: Vec<Duration> = rounds.iter().map(|r| r.freeze).collect();
    let thaw: Vec<Duration> = rounds.iter().map(|r| r.thaw).collect();
    let (Some(f), Some(t)) = (LatencySummary::of(&freeze), LatencySummary::of(&thaw)) else {
        println!("{label}: no rounds");
        return;
    };
    let filesystems = rounds.first().map_or(0, |r| r.frozen);
    println!(
        "{label}: {} rounds, {filesystems} filesystem(s) | freeze median {:.2?} max {:.2?} | thaw median {:.2?} max {:.2?}",
        f.count, f.median, f.max, t.median, t.max
    );
}

async fn measure(client: &mut Client<UnixStream>, options: &Options) -> Result<(), BoxError> {
    let idle = measure_freeze_thaw(client, options.rounds).await?;
    report("idle", &idle);
    if options.dirty_mib > 0 {
        let count = format!("count={}", options.dirty_mib);
        let write = ExecRequest::new(
            "dd",
            ["if=/dev/zero", "of=/data/dirty", "bs=1M", count.as_str()],
        );
        let mut dirty = Vec::with_capacity(options.rounds);
        for _ in 0..options.rounds {
            let status = client.run(&write, Duration::from_secs(60)).await?;
            if !status.success() {
                return Err(format!("dd in the guest failed: {}", status.stderr_text()).into());
            }
            dirty.push(measure_freeze_thaw_round(client).await?);
        }
        report(&format!("{} MiB dirty", options.dirty_mib), &dirty);
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let options = parse_options()?;
    // The VM (when we boot one) must live as long as the measurement and drop on this thread.
    let (_vm, socket) = match &options.socket {
        Some(socket) => (None, socket.clone()),
        None => {
            let vm = LaunchedVm::boot_for_test(VmConfig::new("freeze-latency")).await?;
            let socket = vm
                .qga_socket()
                .ok_or("the test VM has no agent")?
                .to_owned();
            (Some(vm), socket)
        }
    };
    let mut client = connect_unix(&socket, Duration::from_secs(10)).await?;
    measure(&mut client, &options).await
}
