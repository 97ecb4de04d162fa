//! Transmission phase: requests, simple replies and structured reply chunks,
//! as pure encoders and parsers.

use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::proto::*;

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Our handle (cookie); the reply echoes it.
    pub handle: u64,
    /// Disk offset.
    pub offset: u64,
    /// Length (bytes to read / write / describe).
    pub length: u32,
}

/// Encodes a request header (a write's data follows it on the wire).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Which kind of reply starts with these 4 magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMagic {
    /// 12 more header bytes follow.
    Simple,
    /// 16 more header bytes follow.
    Structured,
}

/// Classifies a reply by its first 4 bytes.
pub fn parse_reply_magic(bytes: [u8; 4]) -> Result<ReplyMagic> {
    match u32::from_be_bytes(bytes) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyMagic::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyMagic::Structured),
        other => Err(Error::protocol(format!(
            "reply: expected a simple ({SIMPLE_REPLY_MAGIC:#x}) or structured ({STRUCTURED_REPLY_MAGIC:#x}) reply magic at byte 0, got {other:#010x}"
        ))),
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 for success, else an NBD error number.
    pub errno: u32,
    /// The request's handle.
    pub handle: u64,
}

/// Parses a whole simple reply header (16 bytes, magic included).
pub fn parse_simple_reply(bytes: &[u8]) -> Result<SimpleReply> {
    let mut f = Fields::new("simple reply", bytes);
    let magic = f.u32("magic")?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "simple reply: bad magic {magic:#010x} at byte 0"
        )));
    }
    let r = SimpleReply {
        errno: f.u32("error")?,
        handle: f.u64("handle")?,
    };
    f.finish()?;
    Ok(r)
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// The request's handle.
    pub handle: u64,
    /// Payload length that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Parses a whole structured chunk header (20 bytes, magic included).
pub fn parse_chunk_header(bytes: &[u8]) -> Result<ChunkHeader> {
    let mut f = Fields::new("structured reply chunk header", bytes);
    let magic = f.u32("magic")?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "structured reply chunk header: bad magic {magic:#010x} at byte 0"
        )));
    }
    let h = ChunkHeader {
        flags: f.u16("flags")?,
        chunk_type: f.u16("type")?,
        handle: f.u64("handle")?,
        length: f.u32("length")?,
    };
    f.finish()?;
    Ok(h)
}

/// One block status descriptor, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Length of the extent.
    pub length: u32,
    /// Context-specific flags.
    pub flags: u32,
}

/// A parsed structured chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Disk offset of the data.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: reads as zeros.
    OffsetHole {
        /// Disk offset of the hole.
        offset: u64,
        /// Its length.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Which negotiated context these describe.
        context_id: u32,
        /// Consecutive extents from the request's offset.
        descriptors: Vec<Descriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR`, `_ERROR_OFFSET` or an unknown error type (all
    /// error types share this payload prefix).
    Error {
        /// The chunk type.
        chunk_type: u16,
        /// NBD error number.
        errno: u32,
        /// The server's message (may be empty).
        message: String,
        /// The offset the error concerns (`_ERROR_OFFSET` only).
        offset: Option<u64>,
    },
}

/// Length of the offset prefix of `OFFSET_DATA`; the transport reads it, then
/// the data straight into the destination buffer.
pub const OFFSET_DATA_PREFIX_LEN: usize = 8;

/// Parses the offset that starts an `OFFSET_DATA` payload.
pub fn parse_offset_data_prefix(bytes: &[u8]) -> Result<u64> {
    Fields::new("OFFSET_DATA chunk", bytes).u64("offset")
}

/// Parses a structured chunk payload of type `chunk_type`.
pub fn parse_chunk(chunk_type: u16, payload: &[u8]) -> Result<Chunk<'_>> {
    match chunk_type {
        REPLY_TYPE_NONE => {
            Fields::new("NONE chunk", payload).finish()?;
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            let mut f = Fields::new("OFFSET_DATA chunk", payload);
            let offset = f.u64("offset")?;
            let data = f.take(f.remaining(), "data")?;
            if data.is_empty() {
                return Err(Error::protocol(
                    "OFFSET_DATA chunk: no data after the offset (the spec requires at least one byte)",
                ));
            }
            Ok(Chunk::OffsetData { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let mut f = Fields::new("OFFSET_HOLE chunk", payload);
            let offset = f.u64("offset")?;
            let length = f.u32("hole size")?;
            f.finish()?;
            if length == 0 {
                return Err(Error::protocol("OFFSET_HOLE chunk: hole size is 0"));
            }
            Ok(Chunk::OffsetHole { offset, length })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let mut f = Fields::new("BLOCK_STATUS chunk", payload);
            let context_id = f.u32("context id")?;
            if f.remaining() == 0 || !f.remaining().is_multiple_of(8) {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS chunk: {} descriptor bytes after the context id at byte 4, expected a non-zero multiple of 8",
                    f.remaining()
                )));
            }
            let mut descriptors = Vec::with_capacity(f.remaining() / 8);
            while f.remaining() > 0 {
                let at = f.pos();
                let length = f.u32("extent length")?;
                let flags = f.u32("status flags")?;
                if length == 0 {
                    return Err(Error::protocol(format!(
                        "BLOCK_STATUS chunk: extent length 0 at byte {at}"
                    )));
                }
                descriptors.push(Descriptor { length, flags });
            }
            Ok(Chunk::BlockStatus {
                context_id,
                descriptors,
            })
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            let mut f = Fields::new("error chunk", payload);
            let errno = f.u32("error")?;
            let len = f.u16("message length")? as usize;
            let message = String::from_utf8_lossy(f.take(len, "message")?).into_owned();
            let offset = if t == REPLY_TYPE_ERROR_OFFSET {
                Some(f.u64("offset")?)
            } else {
                None
            };
            if t == REPLY_TYPE_ERROR || t == REPLY_TYPE_ERROR_OFFSET {
                f.finish()?;
            }
            if errno == 0 {
                return Err(Error::protocol(
                    "error chunk: error number 0 (the spec requires a non-zero error)",
                ));
            }
            Ok(Chunk::Error {
                chunk_type: t,
                errno,
                message,
                offset,
            })
        }
        other => Err(Error::protocol(format!(
            "structured reply chunk of unknown type {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_request_bytes() {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            handle: 7,
            offset: 1 << 20,
            length: 65536,
        };
        assert_eq!(
            encode_request(&r),
            [
                0x25, 0x60, 0x95, 0x13, // request magic
                0, 0, // command flags
                0, 0, // NBD_CMD_READ
                0, 0, 0, 0, 0, 0, 0, 7, // handle
                0, 0, 0, 0, 0, 0x10, 0, 0, // offset 1 MiB
                0, 1, 0, 0, // length 64 KiB
            ]
        );
    }

    #[test]
    fn simple_reply_bytes() {
        let b = [
            0x67, 0x44, 0x66, 0x98, // simple reply magic
            0, 0, 0, 5, // error: EIO
            0, 0, 0, 0, 0, 0, 0, 9, // handle
        ];
        assert_eq!(
            parse_reply_magic([b[0], b[1], b[2], b[3]]).unwrap(),
            ReplyMagic::Simple
        );
        assert_eq!(
            parse_simple_reply(&b).unwrap(),
            SimpleReply {
                errno: 5,
                handle: 9
            }
        );
    }

    #[test]
    fn structured_header_bytes() {
        let b = [
            0x66, 0x8e, 0x33, 0xef, // structured reply magic
            0, 1, // flags: DONE
            0, 5, // type: BLOCK_STATUS
            0, 0, 0, 0, 0, 0, 0, 3, // handle
            0, 0, 0, 20, // payload length
        ];
        let h = parse_chunk_header(&b).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_BLOCK_STATUS,
                handle: 3,
                length: 20
            }
        );
        assert!(h.is_done());
        let e = parse_reply_magic([0xde, 0xad, 0xbe, 0xef]).unwrap_err();
        assert!(e.to_string().contains("got 0xdeadbeef"), "{e}");
    }

    #[test]
    fn chunk_payloads() {
        let data = [
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0xAA, 0xBB, // data
        ];
        assert_eq!(
            parse_chunk(REPLY_TYPE_OFFSET_DATA, &data).unwrap(),
            Chunk::OffsetData {
                offset: 4096,
                data: &[0xAA, 0xBB]
            }
        );
        assert_eq!(parse_offset_data_prefix(&data[..8]).unwrap(), 4096);
        let hole = [
            0, 0, 0, 0, 0, 0, 0x20, 0, // offset 8192
            0, 0, 0x10, 0, // hole size 4096
        ];
        assert_eq!(
            parse_chunk(REPLY_TYPE_OFFSET_HOLE, &hole).unwrap(),
            Chunk::OffsetHole {
                offset: 8192,
                length: 4096
            }
        );
        let status = [
            0, 0, 0, 1, // context id 1
            0, 1, 0, 0, 0, 0, 0, 0, // 64 KiB, flags 0 (allocated data)
            0, 0xff, 0, 0, 0, 0, 0, 3, // 16320 KiB, HOLE|ZERO
        ];
        assert_eq!(
            parse_chunk(REPLY_TYPE_BLOCK_STATUS, &status).unwrap(),
            Chunk::BlockStatus {
                context_id: 1,
                descriptors: vec![
                    Descriptor {
                        length: 65536,
                        flags: 0
                    },
                    Descriptor {
                        length: 0x00ff_0000,
                        flags: STATE_HOLE | STATE_ZERO
                    }
                ]
            }
        );
        let mut err = vec![
            0, 0, 0, 22, // EINVAL
            0, 4, // message length
        ];
        err.extend_from_slice(b"nope"); // message
        err.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0]); // offset 512
        assert_eq!(
            parse_chunk(REPLY_TYPE_ERROR_OFFSET, &err).unwrap(),
            Chunk::Error {
                chunk_type: REPLY_TYPE_ERROR_OFFSET,
                errno: 22,
                message: "nope".into(),
                offset: Some(512)
            }
        );
        assert_eq!(
            parse_chunk(REPLY_TYPE_ERROR, &err[..10]).unwrap(),
            Chunk::Error {
                chunk_type: REPLY_TYPE_ERROR,
                errno: 22,
                message: "nope".into(),
                offset: None
            }
        );
        assert_eq!(parse_chunk(REPLY_TYPE_NONE, &[]).unwrap(), Chunk::None);
    }

    #[test]
    fn malformed_chunks_name_field_and_byte() {
        let e = parse_chunk(REPLY_TYPE_OFFSET_HOLE, &[0; 10]).unwrap_err();
        assert!(e.to_string().contains("'hole size' at byte 8"), "{e}");
        let e = parse_chunk(REPLY_TYPE_BLOCK_STATUS, &[0, 0, 0, 1, 0, 0, 0, 1]).unwrap_err();
        assert!(e.to_string().contains("4 descriptor bytes"), "{e}");
        let e = parse_chunk(
            REPLY_TYPE_BLOCK_STATUS,
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        )
        .unwrap_err();
        assert!(e.to_string().contains("extent length 0 at byte 4"), "{e}");
        let e = parse_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).unwrap_err();
        assert!(e.to_string().contains("'message' at byte 6"), "{e}");
        let e = parse_chunk(REPLY_TYPE_NONE, &[1]).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
        let e = parse_chunk(3, &[]).unwrap_err();
        assert!(e.to_string().contains("unknown type 3"), "{e}");
        assert!(parse_chunk(REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        assert!(parse_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
    }

    fn encode_chunk_header(flags: u16, t: u16, handle: u64, len: u32) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    proptest! {
        // Fuzz-ish: no byte string makes a parser panic.
        #[test]
        fn parsers_never_panic(t in any::<u16>(), bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = parse_chunk(t, &bytes);
            let _ = parse_chunk_header(&bytes);
            let _ = parse_simple_reply(&bytes);
            let _ = parse_offset_data_prefix(&bytes);
            let _ = crate::handshake::parse_greeting(&bytes);
            let _ = crate::handshake::parse_option_reply_header(&bytes);
            let _ = crate::handshake::parse_info(&bytes);
            let _ = crate::handshake::parse_meta_context(&bytes);
        }

        // Every known chunk type parses back what a server would encode.
        #[test]
        fn block_status_round_trips(ctx in any::<u32>(), ds in proptest::collection::vec((1u32.., any::<u32>()), 1..40)) {
            let mut p = ctx.to_be_bytes().to_vec();
            for (l, fl) in &ds { p.extend_from_slice(&l.to_be_bytes()); p.extend_from_slice(&fl.to_be_bytes()); }
            let Chunk::BlockStatus { context_id, descriptors } = parse_chunk(REPLY_TYPE_BLOCK_STATUS, &p).unwrap() else { panic!() };
            prop_assert_eq!(context_id, ctx);
            prop_assert_eq!(descriptors.iter().map(|d| (d.length, d.flags)).collect::<Vec<_>>(), ds);
        }

        #[test]
        fn headers_round_trip(flags in any::<u16>(), t in any::<u16>(), handle in any::<u64>(), len in any::<u32>()) {
            let h = parse_chunk_header(&encode_chunk_header(flags, t, handle, len)).unwrap();
            prop_assert_eq!(h, ChunkHeader { flags, chunk_type: t, handle, length: len });
        }

        #[test]
        fn truncating_a_valid_chunk_is_an_error(offset in any::<u64>(), hole in 1u32.., cut in 0usize..12) {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend_from_slice(&hole.to_be_bytes());
            prop_assert!(parse_chunk(REPLY_TYPE_OFFSET_HOLE, &p).is_ok());
            prop_assert!(parse_chunk(REPLY_TYPE_OFFSET_HOLE, &p[..cut]).is_err());
        }
    }
}
