//! Builds the test/demo guest from Debian packages and launches local QEMU VMs — for the tests
//! of every crate, `stillpoint vm run|list|stop`, the demo and the benchmarks.
//!
//! # The guest
//! [`GuestImage::ensure`] builds (once, then from its cache) a Debian 12 cloud kernel and an
//! initramfs holding static busybox, the real qemu-ga, sqlite3, exactly the shared libraries
//! they need (found from their `DT_NEEDED` entries in the packages' dependencies), the virtio
//! modules and a small `/init`. Everything comes from `apt-get download` + `dpkg-deb -x`; no
//! root is needed. See docs/test-guest.md for what `/init` does and the console markers.
//!
//! # Launching
//! ```no_run
//! # async fn example() -> stillpoint_testvm::Result<()> {
//! use std::time::Duration;
//! use stillpoint_testvm::{LaunchedVm, VmConfig};
//!
//! // A test: temporary runtime root, killed on drop, waits until the agent answers.
//! let vm = LaunchedVm::boot_for_test(VmConfig::new("qga-test")).await?;
//! let qga = vm.qga_socket().expect("agent on");   // connect your client here
//! let qmp = vm.qmp_socket();
//! let mounts = vm.guest_exec(&["cat", "/proc/mounts"], Duration::from_secs(10)).await?;
//! # let _ = (qga, qmp, mounts); Ok(()) }
//! ```
//! [`LaunchedVm::launch`] with [`LaunchOptions::detached`] is what `stillpoint vm run` uses;
//! [`list_vms`] and [`stop_vm`] find and end such VMs through their `vm.json` ([`VmRecord`],
//! a contract with the qemu platform driver: docs/local-vms.md).
//!
//! # Invariants
//! - No QEMU outlives its test: an [`Lifetime::Attached`] VM runs in its own process group,
//!   is killed when its handle drops, and gets SIGKILL from the kernel (`PR_SET_PDEATHSIG`)
//!   when the launching thread or process dies, however it dies.
//! - A VM that cannot start or boot is an error carrying the console's last lines — never a
//!   silently passing test.
//! - Each VM gets fresh, independent disks and its own copy of the initramfs; per-VM settings
//!   (agent on/off, qemu-ga arguments, fsfreeze hook, disk count) travel in a small archive
//!   appended to that copy, so the cached image is never rebuilt for them.
//! - With the agent off there is no agent channel at all (no virtio-serial device).
//! - Disks are `-blockdev` nodes `diskN` on devices `vdN`; the first one is `/data` in the guest.
//! - The cached image is keyed by a digest of its [`GuestRecipe`]; it appears atomically and
//!   concurrent builders are serialised by a file lock.
//! - KVM is used only when `STILLPOINT_ACCEL=kvm`; TCG is the default.

mod archive;
mod bare_qemu;
mod config;
mod disk;
mod elf;
mod error;
mod guest;
mod image;
mod packages;
mod paths;
pub mod probe;
mod qemu;
mod record;
mod tool;
pub use crate::tool::run_tool;
mod vm;
mod wait;
mod workload;

pub use crate::bare_qemu::BareQemu;
pub use crate::config::{
    DEFAULT_DISK_SIZE, DEFAULT_MEMORY_MIB, DiskFormat, DiskSpec, MAX_DISKS, VmConfig,
    parse_disk_size,
};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::guest::{GuestImage, GuestManifest, GuestRecipe, RECIPE_VERSION};
pub use crate::image::{Ext4Health, ext4_extract, ext4_file_size, ext4_health};
pub use crate::paths::{
    GUEST_DIR_ENV, RUNTIME_DIR_ENV, default_guest_dir, default_runtime_root, vm_dir,
};
pub use crate::qemu::{ACCEL_ENV, Accel};
pub use crate::record::{DiskRecord, RECORD_FILE, VmRecord};
pub use crate::vm::{
    BOOT_TIMEOUT, LaunchOptions, LaunchedVm, Lifetime, ListedVm, MARKER_AGENT_DISABLED,
    MARKER_AGENT_STARTING, MARKER_DISKS_MOUNTED, MARKER_ERROR, MARKER_PREFIX, MARKER_READY,
    Restart, StopOutcome, list_vms, stop_vm,
};
pub use crate::wait::{POLL_INTERVAL, wait_until};
pub use crate::workload::{
    LOCKSTEP_BLOCK, LOCKSTEP_MARK, LockstepLayout, RECORD_MARK, RECORD_SIZE, RecordScan,
    SQLITE_BEGIN_MARK, SQLITE_COMMITTED_MARK, SQLITE_JOURNAL_MAGIC, SQLITE_OPEN_MARK,
    SQLITE_WANT_MARK, SqliteJournalHeader, SqliteProgress, SqliteScan, SqliteWriter, WRITER_MARK,
    WriterSample, highest_mark, lockstep_block, lockstep_writer_script, newest_lockstep_block,
    parse_sqlite_journal_header, parse_sqlite_scan, parse_writer_samples, record,
    record_writer_script, scan_records, scan_sqlite_database, sqlite_check_value, sqlite_scan_sql,
    stall_writer_script, stall_writer_script_over,
};
