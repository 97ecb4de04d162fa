//! The NBD client against a real `qemu-nbd` 7.2, with `qemu-img` and the
//! libnbd tools (`nbdinfo`) as references.

mod common;

use std::collections::BTreeSet;

use common::{QemuNbd, image_bytes, mixed_content, nbdinfo_map, qcow2_from_bytes, run};
use stillpoint_nbd::{ErrorKind, NbdClient, ReadOptions, data_ranges, dirty_ranges};

const MIB: usize = 1 << 20;

#[tokio::test]
async fn full_read_equals_the_image_and_block_status_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB + 12 KiB: not a multiple of the 32 MiB maximum request, so the
    // read is split and its last piece is short.
    let content = mixed_content(40 * MIB + 12288);
    let img = qcow2_from_bytes(dir.path(), "mixed", &content);
    let server = QemuNbd::start(dir.path(), &img, "qcow2", &["-r", "--persistent"]).await;
    let nbd = server.connect("", &["base:allocation"]).await.unwrap();
    let info = nbd.info().clone();
    assert_eq!(info.size, content.len() as u64);
    assert!(info.read_only() && info.structured_replies);
    assert!(info.max_request() <= 32 << 20);

    let reference = image_bytes(dir.path(), &img, "qcow2");
    assert!(reference == content);
    let all = nbd.read(0, nbd.size()).await.unwrap();
    assert!(
        all == reference,
        "a full read differs from qemu-img convert"
    );

    let ours = nbd.map("base:allocation").await.unwrap();
    assert_eq!(ours, nbdinfo_map(None, &server.uri("")));
    assert!(ours.iter().any(|e| e.is_hole()) && ours.iter().any(|e| !e.is_hole()));
    assert_eq!(ours.first().unwrap().offset, 0);
    assert_eq!(ours.last().unwrap().end(), nbd.size());

    // Reading only the data ranges (pipelined) and leaving the rest zero
    // rebuilds the same image.
    let mut rebuilt = vec![0u8; content.len()];
    let ranges = data_ranges(&ours);
    let read = nbd
        .read_ranges(
            &ranges,
            ReadOptions {
                request_size: 256 << 10,
                depth: 8,
            },
            |at, data| {
                rebuilt[at as usize..at as usize + data.len()].copy_from_slice(data);
            },
        )
        .await
        .unwrap();
    assert_eq!(read, ranges.iter().map(|r| r.1).sum::<u64>());
    assert!(read < content.len() as u64, "holes must have been skipped");
    assert!(rebuilt == reference);
    nbd.disconnect().await.unwrap();
}

#[tokio::test]
async fn many_concurrent_reads_on_one_connection_each_get_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let content = mixed_content(8 * MIB);
    let img = qcow2_from_bytes(dir.path(), "conc", &content);
    let server = QemuNbd::start(dir.path(), &img, "qcow2", &["-r", "--persistent"]).await;
    let nbd = server.connect("", &[]).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let nbd = nbd.clone();
        // Uneven sizes and offsets so replies finish out of order.
        let offset = (i * 123_457) % (7 * MIB as u64);
        let len = 4096 + (i * 7919) % (600 << 10);
        tasks.push(tokio::spawn(async move {
            (offset, nbd.read(offset, len).await.unwrap())
        }));
    }
    for t in tasks {
        let (offset, data) = t.await.unwrap();
        let o = offset as usize;
        assert!(data == content[o..o + data.len()], "read at {offset}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_into_from_plain_threads_gets_every_byte_in_place() {
    let dir = tempfile::tempdir().unwrap();
    // 9 MiB + 12 KiB of mixed data and holes: the last chunk is short, and
    // 4 MiB chunks are split into several requests each.
    let content = mixed_content(9 * MIB + 12288);
    let img = qcow2_from_bytes(dir.path(), "into", &content);
    let server = QemuNbd::start(dir.path(), &img, "qcow2", &["-r", "--persistent"]).await;
    let nbd = server.connect("", &[]).await.unwrap();

    // As the repository writer reads a capture: plain threads, each blocking
    // on its chunk, buffers reused (filled with a marker first, so a byte
    // left unwritten would show).
    const CHUNK: usize = 4 * MIB;
    let handle = tokio::runtime::Handle::current();
    let rebuilt = tokio::task::spawn_blocking({
        let nbd = nbd.clone();
        let len = content.len();
        move || {
            let mut out = vec![0u8; len];
            std::thread::scope(|scope| {
                for (i, part) in out.chunks_mut(CHUNK).enumerate() {
                    let (nbd, handle) = (&nbd, &handle);
                    scope.spawn(move || {
                        let mut buf = vec![0xA5u8; CHUNK];
                        let buf = &mut buf[..part.len()];
                        handle
                            .block_on(nbd.read_into((i * CHUNK) as u64, buf))
                            .unwrap();
                        part.copy_from_slice(buf);
                    });
                }
            });
            out
        }
    })
    .await
    .unwrap();
    assert!(rebuilt == content, "read_into differs from the image");

    // Twice more into one reused buffer: the pooled request buffers hold the
    // previous read's bytes, which must never show through.
    let mut buf = vec![0u8; 3 * MIB + 4096];
    for offset in [5 * MIB as u64, 1 << 20] {
        nbd.read_into(offset, &mut buf).await.unwrap();
        let o = offset as usize;
        assert!(buf == content[o..o + buf.len()], "read_into at {offset}");
    }
    let err = nbd
        .read_into(nbd.size() - 4096, &mut [0u8; 8192])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn dirty_bitmap_context_matches_the_writes_and_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let content = mixed_content(16 * MIB);
    let img = qcow2_from_bytes(dir.path(), "bm", &content);
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", "--enable", img_s, "b1"]);

    // Writes through a writable, non-persistent qemu-nbd: it records them in
    // the enabled bitmap and stores it when the client leaves and it exits.
    let writes: [(u64, usize, u8); 3] = [
        (0, 4096, 0x11),
        (5 * MIB as u64 + 4096, 70_000, 0x22),
        (15 * MIB as u64, MIB, 0x33),
    ];
    let mut expected = content.clone();
    {
        let server = QemuNbd::start(dir.path(), &img, "qcow2", &[]).await;
        let nbd = server.connect("", &[]).await.unwrap();
        assert!(!nbd.info().read_only());
        for (off, len, byte) in writes {
            nbd.write(off, &vec![byte; len]).await.unwrap();
            expected[off as usize..off as usize + len].fill(byte);
        }
        nbd.flush().await.unwrap();
        nbd.disconnect().await.unwrap();
        server.wait_exit().await;
    }
    // An enabled bitmap cannot be exported read-only: freeze it, as a backup would.
    run("qemu-img", &["bitmap", "--disable", img_s, "b1"]);
    let server = QemuNbd::start(
        dir.path(),
        &img,
        "qcow2",
        &["-r", "--persistent", "-B", "b1"],
    )
    .await;
    let ctx = "qemu:dirty-bitmap:b1";
    let nbd = server.connect("", &["base:allocation", ctx]).await.unwrap();
    let map = nbd.map(ctx).await.unwrap();
    assert_eq!(map, nbdinfo_map(Some(ctx), &server.uri("")));

    // Expected: every 64 KiB cluster a write touched.
    let cluster = 64u64 << 10;
    let mut clusters = BTreeSet::new();
    for (off, len, _) in writes {
        for c in off / cluster..(off + len as u64).div_ceil(cluster) {
            clusters.insert(c);
        }
    }
    let dirty = dirty_ranges(&map);
    let got: BTreeSet<u64> = dirty
        .iter()
        .flat_map(|&(o, l)| o / cluster..(o + l) / cluster)
        .collect();
    assert_eq!(got, clusters);

    // Reading just the dirty ranges gives the written bytes.
    let mut seen = 0;
    nbd.read_ranges(&dirty, ReadOptions::default(), |at, data| {
        assert!(data == &expected[at as usize..at as usize + data.len()]);
        seen += data.len();
    })
    .await
    .unwrap();
    assert_eq!(seen as u64, clusters.len() as u64 * cluster);
}

#[tokio::test]
async fn real_server_refusals_and_bad_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_from_bytes(dir.path(), "small", &mixed_content(MIB));
    let server = QemuNbd::start(
        dir.path(),
        &img,
        "qcow2",
        &["-r", "--persistent", "-x", "disk0"],
    )
    .await;

    let err = server.connect("nope", &[]).await.err().unwrap();
    assert!(matches!(err.kind(), ErrorKind::Refused { .. }), "{err}");
    assert_eq!(err.export(), Some("nope"));
    assert!(err.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{err}");

    let err = server
        .connect("disk0", &["qemu:dirty-bitmap:missing"])
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), &ErrorKind::Unsupported, "{err}");
    assert!(
        err.to_string().contains("'qemu:dirty-bitmap:missing'"),
        "{err}"
    );

    let nbd = server.connect("disk0", &[]).await.unwrap();
    let err = nbd.read(MIB as u64 - 10, 20).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidArgument);
    assert_eq!(err.offset(), Some(MIB as u64 - 10));
    assert!(err.to_string().contains("past the end"), "{err}");
    let err = nbd.write(0, b"x").await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Unsupported);
    let err = nbd
        .block_status("base:allocation", 0, 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("was not negotiated"), "{err}");

    let err = NbdClient::connect_unix(dir.path().join("absent.sock"), "disk0", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), &ErrorKind::Connect);
    assert!(err.to_string().contains("absent.sock"), "{err}");
}
