//! A stillpoint stand-in for `tests/vm_capture.rs`: takes a capture of a QEMU VM, reads a
//! little of it, says so on stdout and then waits to be killed — so the test can leave exactly
//! what a stillpoint killed in the middle of a backup leaves in QEMU. Built only with the
//! `vm-tests` feature, never installed.
//!
//! Usage: `stillpoint-platform-capture-holder QMP_SOCKET SCRATCH_DIR [DISK BITMAP SIZE]`

use stillpoint_platform::capture::{Capture, CaptureRequest};
use stillpoint_platform::qemu::capture::QemuCapture;
use stillpoint_qmp::Qmp;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, scratch) = match &args[..] {
        [socket, scratch, ..] => (socket, scratch),
        _ => {
            eprintln!("usage: QMP_SOCKET SCRATCH_DIR [DISK BITMAP SIZE]");
            std::process::exit(2);
        }
    };
    let mut request = CaptureRequest::new(scratch);
    if let [_, _, disk, bitmap, size] = &args[..] {
        request = request.with_parent(disk, bitmap, size.parse().expect("SIZE is a number"));
    }
    let qmp = Qmp::connect_unix(socket).await.expect("monitor");
    let capture = QemuCapture::new("holder", qmp);
    let prepared = capture.prepare(request).await.expect("prepare");
    let mut started = prepared.start().await.expect("start");
    let disks = started.export().await.expect("export");
    let mut buf = vec![0u8; 1 << 20];
    for disk in &disks {
        disk.read_at(0, &mut buf).await.expect("read");
    }
    let plan = started.plan();
    println!("READY {} {}", plan.capture_id, plan.disks[0].new_bitmap);
    // Hold everything (exports, filters, the disabled parent bitmap) until killed.
    std::future::pending::<()>().await;
}
