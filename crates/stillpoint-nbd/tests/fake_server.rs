//! A hand-written **fake NBD server**, only for faults real servers cannot be
//! made to produce: data outside the requested range, replies to unknown
//! handles, reads that are not fully covered, truncated chunks, error chunks
//! with offsets, chunks of several requests interleaved, a server without
//! structured replies. Everything else is tested against `qemu-nbd` and
//! QEMU's built-in server.

use stillpoint_nbd::proto::*;
use stillpoint_nbd::{ErrorKind, NbdClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;

struct FakeServer {
    io: DuplexStream,
}

struct Req {
    command: u16,
    handle: u64,
    offset: u64,
    length: u32,
}

impl FakeServer {
    async fn u32(&mut self) -> u32 {
        self.io.read_u32().await.unwrap()
    }

    async fn option_reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply_type.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        self.io.write_all(&v).await.unwrap();
    }

    /// Plays the server side of the handshake: structured replies on or off,
    /// `base:allocation` as context id 7, an export of SIZE bytes.
    async fn handshake(io: DuplexStream, structured: bool) -> FakeServer {
        let mut s = FakeServer { io };
        let mut greet = NBDMAGIC.to_be_bytes().to_vec();
        greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.io.write_all(&greet).await.unwrap();
        let _client_flags = s.u32().await;
        loop {
            assert_eq!(s.io.read_u64().await.unwrap(), IHAVEOPT);
            let option = s.u32().await;
            let len = s.u32().await as usize;
            let mut data = vec![0; len];
            s.io.read_exact(&mut data).await.unwrap();
            match option {
                OPT_STRUCTURED_REPLY if structured => s.option_reply(option, REP_ACK, &[]).await,
                OPT_STRUCTURED_REPLY => s.option_reply(option, REP_ERR_UNSUP, &[]).await,
                OPT_SET_META_CONTEXT => {
                    let mut p = 7u32.to_be_bytes().to_vec();
                    p.extend_from_slice(b"base:allocation");
                    s.option_reply(option, REP_META_CONTEXT, &p).await;
                    s.option_reply(option, REP_ACK, &[]).await;
                }
                OPT_GO => {
                    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                    p.extend_from_slice(&SIZE.to_be_bytes());
                    p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                    s.option_reply(option, REP_INFO, &p).await;
                    s.option_reply(option, REP_ACK, &[]).await;
                    return s;
                }
                other => panic!("unexpected option {other}"),
            }
        }
    }

    async fn request(&mut self) -> Req {
        assert_eq!(self.u32().await, REQUEST_MAGIC);
        let _flags = self.io.read_u16().await.unwrap();
        Req {
            command: self.io.read_u16().await.unwrap(),
            handle: self.io.read_u64().await.unwrap(),
            offset: self.io.read_u64().await.unwrap(),
            length: self.u32().await,
        }
    }

    async fn chunk(&mut self, flags: u16, chunk_type: u16, handle: u64, payload: &[u8]) {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&chunk_type.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        self.io.write_all(&v).await.unwrap();
    }

    async fn data(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(flags, REPLY_TYPE_OFFSET_DATA, handle, &p).await;
    }
}

async fn pair(structured: bool, contexts: &[&str]) -> (NbdClient, FakeServer) {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(FakeServer::handshake(server_io, structured));
    let client = NbdClient::handshake(client_io, "fake", contexts)
        .await
        .unwrap();
    (client, server.await.unwrap())
}

#[tokio::test]
async fn chunks_of_pipelined_reads_may_interleave_and_holes_read_as_zeros() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let a = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 8).await }
    });
    let ra = srv.request().await;
    let b = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(4096, 8).await }
    });
    let rb = srv.request().await;
    assert_eq!((ra.command, rb.command), (CMD_READ, CMD_READ));
    // b's first half, a's hole, b's second half (done), a's data (done).
    srv.data(0, rb.handle, 4096, &[1, 2, 3, 4]).await;
    let mut hole = 0u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&4u32.to_be_bytes());
    srv.chunk(0, REPLY_TYPE_OFFSET_HOLE, ra.handle, &hole).await;
    srv.data(REPLY_FLAG_DONE, rb.handle, 4100, &[5, 6, 7, 8])
        .await;
    srv.data(REPLY_FLAG_DONE, ra.handle, 4, &[9, 9, 9, 9]).await;
    assert_eq!(b.await.unwrap().unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(a.await.unwrap().unwrap(), vec![0, 0, 0, 0, 9, 9, 9, 9]);
}

#[tokio::test]
async fn data_outside_the_requested_range_is_a_protocol_error_with_offset() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(8192, 16).await }
    });
    let r = srv.request().await;
    srv.data(REPLY_FLAG_DONE, r.handle, 8200, &[0; 16]).await; // runs 8 bytes past
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert_eq!(err.offset(), Some(8192));
    assert_eq!(err.export(), Some("fake"));
    assert!(
        err.to_string().contains(
            "OFFSET_DATA chunk for bytes 8200..8216 lies outside the requested 8192..8208"
        ),
        "{err}"
    );
    // The connection is out of step now: later requests fail, they do not hang.
    assert_eq!(
        nbd.read(0, 4).await.unwrap_err().kind(),
        &ErrorKind::Protocol
    );
}

#[tokio::test]
async fn a_read_not_fully_covered_is_an_error() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 16).await }
    });
    let r = srv.request().await;
    srv.data(REPLY_FLAG_DONE, r.handle, 0, &[1; 8]).await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert!(err.to_string().contains("covered only 8"), "{err}");
    assert_eq!(err.offset(), Some(0));
}

#[tokio::test]
async fn reply_to_an_unknown_handle_fails_requests_in_flight() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(512, 4).await }
    });
    let r = srv.request().await;
    srv.data(REPLY_FLAG_DONE, r.handle + 1000, 512, &[1; 4])
        .await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert!(
        err.to_string().contains("matches no request in flight"),
        "{err}"
    );
    assert_eq!(err.offset(), Some(512));
}

#[tokio::test]
async fn error_offset_chunk_reports_the_servers_errno_message_and_exact_offset() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(65536, 4096).await }
    });
    let r = srv.request().await;
    let mut p = 5u32.to_be_bytes().to_vec(); // EIO
    p.extend_from_slice(&(10u16).to_be_bytes());
    p.extend_from_slice(b"bad sector");
    p.extend_from_slice(&(65536u64 + 1024).to_be_bytes());
    srv.chunk(0, REPLY_TYPE_ERROR_OFFSET, r.handle, &p).await;
    srv.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[])
        .await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Request { errno: 5 });
    assert_eq!(err.offset(), Some(65536 + 1024));
    assert_eq!(
        err.to_string(),
        "the server failed a read: EIO (5): bad sector (offset 66560)"
    );
    // A request error leaves the connection usable.
    let next = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 2).await }
    });
    let r = srv.request().await;
    srv.data(REPLY_FLAG_DONE, r.handle, 0, &[4, 2]).await;
    assert_eq!(next.await.unwrap().unwrap(), vec![4, 2]);
}

#[tokio::test]
async fn truncated_chunk_then_eof_is_closed_not_a_hang() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 4096).await }
    });
    let r = srv.request().await;
    // Header promises 4104 bytes of payload; only 100 arrive.
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    v.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    v.extend_from_slice(&r.handle.to_be_bytes());
    v.extend_from_slice(&4104u32.to_be_bytes());
    v.extend_from_slice(&[0u8; 100]);
    srv.io.write_all(&v).await.unwrap();
    drop(srv);
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Closed, "{err}");
    assert!(err.to_string().contains("OFFSET_DATA"), "{err}");
}

#[tokio::test]
async fn block_status_keeps_our_context_and_clips_to_the_export() {
    let (nbd, mut srv) = pair(true, &["base:allocation"]).await;
    let bs = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.block_status("base:allocation", SIZE - 8192, 8192).await }
    });
    let r = srv.request().await;
    assert_eq!(r.command, CMD_BLOCK_STATUS);
    assert_eq!((r.offset, r.length), (SIZE - 8192, 8192));
    // Another context's chunk first (ignored), then ours, whose last extent
    // runs past the end of the export (allowed by the spec; clipped).
    let mut other = 9u32.to_be_bytes().to_vec();
    other.extend_from_slice(&[0, 0, 0x20, 0, 0, 0, 0, 1]);
    srv.chunk(0, REPLY_TYPE_BLOCK_STATUS, r.handle, &other)
        .await;
    let mut ours = 7u32.to_be_bytes().to_vec();
    ours.extend_from_slice(&4096u32.to_be_bytes());
    ours.extend_from_slice(&0u32.to_be_bytes());
    ours.extend_from_slice(&65536u32.to_be_bytes());
    ours.extend_from_slice(&(STATE_HOLE | STATE_ZERO).to_be_bytes());
    srv.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, &ours)
        .await;
    let extents = bs.await.unwrap().unwrap();
    assert_eq!(extents.len(), 2);
    assert_eq!(
        (extents[0].offset, extents[0].length, extents[0].flags),
        (SIZE - 8192, 4096, 0)
    );
    assert_eq!((extents[1].offset, extents[1].length), (SIZE - 4096, 4096));
    assert!(extents[1].is_hole() && extents[1].is_zero());
}

#[tokio::test]
async fn without_structured_replies_reads_use_simple_replies_and_contexts_are_refused() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(FakeServer::handshake(server_io, false));
    let err = NbdClient::handshake(client_io, "fake", &["base:allocation"])
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), &ErrorKind::Unsupported);
    assert!(err.to_string().contains("no structured replies"), "{err}");
    drop(server);

    let (nbd, mut srv) = pair(false, &[]).await;
    assert!(!nbd.info().structured_replies);
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(100, 3).await }
    });
    let r = srv.request().await;
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&r.handle.to_be_bytes());
    v.extend_from_slice(&[7, 8, 9]);
    srv.io.write_all(&v).await.unwrap();
    assert_eq!(read.await.unwrap().unwrap(), vec![7, 8, 9]);
}

#[tokio::test]
async fn garbage_reply_magic_names_the_bytes() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 4).await }
    });
    let _ = srv.request().await;
    srv.io
        .write_all(b"HTTP/1.1 400 Bad Request\r\n")
        .await
        .unwrap();
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert!(err.to_string().contains("got 0x48545450"), "{err}");
}

#[tokio::test]
async fn overlapping_chunks_are_refused_even_when_their_sizes_add_up() {
    // Read buffers are reused without zeroing, so a reply that writes one
    // half twice and never the other must not pass as complete.
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move { nbd.read(0, 16).await }
    });
    let r = srv.request().await;
    srv.data(0, r.handle, 0, &[1; 8]).await;
    srv.data(REPLY_FLAG_DONE, r.handle, 4, &[2; 8]).await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert!(
        err.to_string()
            .contains("chunk for bytes 4..12 overlaps an earlier chunk for 0..8"),
        "{err}"
    );
}

#[tokio::test]
async fn read_into_splits_into_requests_and_a_reused_buffer_never_shows_old_bytes() {
    let (nbd, mut srv) = pair(true, &[]).await;
    const PIECE: usize = 256 << 10;
    // 256 KiB + 16 bytes: two requests, both in flight before any reply.
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move {
            let mut buf = vec![0u8; PIECE + 16];
            nbd.read_into(4096, &mut buf).await.map(|()| buf)
        }
    });
    let (r1, r2) = (srv.request().await, srv.request().await);
    assert_eq!((r1.offset, r1.length), (4096, PIECE as u32));
    assert_eq!((r2.offset, r2.length), (4096 + PIECE as u64, 16));
    // Replies out of order: the second request first.
    srv.data(REPLY_FLAG_DONE, r2.handle, r2.offset, &[2; 16])
        .await;
    srv.data(REPLY_FLAG_DONE, r1.handle, r1.offset, &vec![1; PIECE])
        .await;
    let buf = read.await.unwrap().unwrap();
    assert!(buf[..PIECE].iter().all(|&b| b == 1) && buf[PIECE..] == [2; 16]);

    // The next read reuses a pooled buffer that held 0x01 or 0x02 bytes. A
    // reply covering only half of it is an error: the stale half never
    // passes for data.
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move {
            let mut buf = vec![0u8; 16];
            nbd.read_into(0, &mut buf).await
        }
    });
    let r = srv.request().await;
    srv.data(REPLY_FLAG_DONE, r.handle, 0, &[7; 8]).await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Protocol);
    assert!(err.to_string().contains("covered only 8"), "{err}");
    assert_eq!(err.offset(), Some(0));

    // A hole in a reused buffer reads as zeros, not as the old bytes.
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move {
            let mut buf = vec![9u8; 16];
            nbd.read_into(0, &mut buf).await.map(|()| buf)
        }
    });
    let r = srv.request().await;
    let mut hole = 0u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&8u32.to_be_bytes());
    srv.chunk(0, REPLY_TYPE_OFFSET_HOLE, r.handle, &hole).await;
    srv.data(REPLY_FLAG_DONE, r.handle, 8, &[3; 8]).await;
    let buf = read.await.unwrap().unwrap();
    assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 3, 3]);
}

#[tokio::test]
async fn read_into_reports_the_failed_requests_offset() {
    let (nbd, mut srv) = pair(true, &[]).await;
    let read = tokio::spawn({
        let nbd = nbd.clone();
        async move {
            let mut buf = vec![0u8; 512 << 10];
            nbd.read_into(0, &mut buf).await
        }
    });
    let (r1, r2) = (srv.request().await, srv.request().await);
    srv.data(REPLY_FLAG_DONE, r1.handle, 0, &vec![1; 256 << 10])
        .await;
    // EINVAL for the second request, as QEMU's server answers reads of a broken snapshot.
    let mut err = 22u32.to_be_bytes().to_vec();
    err.extend_from_slice(&0u16.to_be_bytes());
    srv.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r2.handle, &err)
        .await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Request { errno: 22 });
    assert_eq!(err.offset(), Some(256 << 10));
}
