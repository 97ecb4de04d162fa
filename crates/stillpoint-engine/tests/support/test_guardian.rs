//! The freeze guardian the engine's VM tests start: what `stillpoint __guardian --lease FILE`
//! does (the engine's `guardian::watch` with `freeze::thaw_attempt`), minus the CLI's
//! configuration file — it finds the VM through the lease's runtime root only, which is where
//! the tests launch their VMs. Built only with the `vm-tests` feature.

use std::process::ExitCode;

use stillpoint_engine::freeze;
use stillpoint_engine::guardian::{self, GUARDIAN_READY};
use stillpoint_platform::Platforms;
use stillpoint_platform::qemu::QemuInventory;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(lease_file) = args
        .iter()
        .position(|a| a == "--lease")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
    else {
        eprintln!("usage: {} --lease FILE", args[0]);
        return ExitCode::from(2);
    };
    // Like the real guardian: a session of its own, so the test's signals do not reach it.
    let _ = nix::unistd::setsid();
    let lease = match guardian::read_lease(&lease_file) {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            eprintln!("no lease at {}", lease_file.display());
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let platforms = Platforms::new(QemuInventory::new(Vec::new(), lease.runtime_root.clone()));
    let vm = match platforms.resolve(&lease.vm) {
        Ok(vm) => vm,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    println!("{GUARDIAN_READY}");
    let outcome = freeze::guard(&lease_file, &lease, vm.as_ref()).await;
    match outcome {
        Ok(outcome) => {
            eprintln!("{outcome:?}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
