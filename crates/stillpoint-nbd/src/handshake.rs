//! The fixed-newstyle handshake, as pure encoders and parsers.
//!
//! Sequence the client drives (see [`crate::NbdClient::handshake`]):
//! server greeting (18 bytes) → client flags (4) → `NBD_OPT_STRUCTURED_REPLY`
//! → `NBD_OPT_SET_META_CONTEXT` (if contexts were asked for) → `NBD_OPT_GO`
//! with the export name and a request for block sizes → transmission.

use crate::error::{Error, ErrorKind, Result};
use crate::fields::Fields;
use crate::proto::*;

/// Length of the server's greeting: NBDMAGIC 8 + IHAVEOPT 8 + flags 2.
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header: magic 8 + option 4 + type 4 + length 4.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Oldstyle servers send this instead of IHAVEOPT.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Parses the server greeting; returns its handshake flags.
pub fn parse_greeting(bytes: &[u8]) -> Result<u16> {
    let mut f = Fields::new("server greeting", bytes);
    let magic = f.u64("NBDMAGIC")?;
    if magic != NBDMAGIC {
        return Err(Error::protocol(format!(
            "server greeting: expected NBDMAGIC at byte 0, got {magic:#018x} (not an NBD server?)"
        )));
    }
    let second = f.u64("IHAVEOPT")?;
    if second == OLDSTYLE_MAGIC {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "the server speaks the oldstyle NBD handshake, which has no export names or block status",
        ));
    }
    if second != IHAVEOPT {
        return Err(Error::protocol(format!(
            "server greeting: expected IHAVEOPT at byte 8, got {second:#018x}"
        )));
    }
    let flags = f.u16("handshake flags")?;
    f.finish()?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "the server does not offer the fixed-newstyle handshake",
        ));
    }
    Ok(flags)
}

/// The client flags answering the greeting's `server_flags`.
pub fn encode_client_flags(server_flags: u16) -> [u8; 4] {
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        flags |= FLAG_C_NO_ZEROES;
    }
    flags.to_be_bytes()
}

/// One option request: IHAVEOPT 8 + option 4 + data length 4 + data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn push_string(v: &mut Vec<u8>, s: &str, what: &str) -> Result<()> {
    if s.len() > MAX_STRING {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{what} is {} bytes; NBD allows at most {MAX_STRING}",
                s.len()
            ),
        ));
    }
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Data of `NBD_OPT_GO`: name length 4 + name + number of info requests 2 +
/// info types 2 each.
pub fn encode_go(export: &str, info_requests: &[u16]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    push_string(&mut v, export, "the export name")?;
    v.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
    for info in info_requests {
        v.extend_from_slice(&info.to_be_bytes());
    }
    Ok(v)
}

/// Data of `NBD_OPT_SET_META_CONTEXT`: export name (length 4 + bytes) +
/// number of queries 4 + each query (length 4 + bytes).
pub fn encode_set_meta_context(export: &str, queries: &[&str]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    push_string(&mut v, export, "the export name")?;
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        push_string(&mut v, q, "a metadata context name")?;
    }
    Ok(v)
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Payload length that follows.
    pub length: u32,
}

/// Parses an option reply header (20 bytes).
pub fn parse_option_reply_header(bytes: &[u8]) -> Result<OptionReplyHeader> {
    let mut f = Fields::new("option reply header", bytes);
    let magic = f.u64("magic")?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "option reply header: expected magic {OPTION_REPLY_MAGIC:#x} at byte 0, got {magic:#x}"
        )));
    }
    let h = OptionReplyHeader {
        option: f.u32("option")?,
        reply_type: f.u32("reply type")?,
        length: f.u32("length")?,
    };
    f.finish()?;
    Ok(h)
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`TFLAG_*`).
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Requests must be aligned to this.
        minimum: u32,
        /// Requests of this size (and alignment) are efficient.
        preferred: u32,
        /// Largest payload (read or write length) per request.
        maximum: u32,
    },
    /// An info type this client does not know; ignored.
    Unknown(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply.
pub fn parse_info(payload: &[u8]) -> Result<Info> {
    let mut f = Fields::new("NBD_REP_INFO", payload);
    let info_type = f.u16("info type")?;
    let info = match info_type {
        INFO_EXPORT => {
            let size = f.u64("export size")?;
            let flags = f.u16("transmission flags")?;
            f.finish()?;
            Info::Export { size, flags }
        }
        INFO_NAME => Info::Name(f.rest_string()),
        INFO_DESCRIPTION => Info::Description(f.rest_string()),
        INFO_BLOCK_SIZE => {
            let minimum = f.u32("minimum block size")?;
            let preferred = f.u32("preferred block size")?;
            let maximum = f.u32("maximum payload size")?;
            f.finish()?;
            if !minimum.is_power_of_two()
                || !preferred.is_power_of_two()
                || preferred < minimum
                || maximum < minimum
            {
                return Err(Error::protocol(format!(
                    "NBD_REP_INFO: inconsistent block sizes min {minimum}, preferred {preferred}, max {maximum}"
                )));
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            }
        }
        other => Info::Unknown(other),
    };
    Ok(info)
}

/// Parses the payload of an `NBD_REP_META_CONTEXT` reply: context id 4 + name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String)> {
    let mut f = Fields::new("NBD_REP_META_CONTEXT", payload);
    let id = f.u32("context id")?;
    Ok((id, f.rest_string()))
}

/// The optional message of an option error reply.
pub fn parse_error_message(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_of_qemu_nbd_is_fixed_newstyle_with_no_zeroes() {
        let bytes = [
            0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, // "NBDMAGIC"
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // "IHAVEOPT"
            0x00, 0x03, // handshake flags: FIXED_NEWSTYLE | NO_ZEROES
        ];
        let flags = parse_greeting(&bytes).unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(encode_client_flags(flags), [0, 0, 0, 3]);
        assert_eq!(encode_client_flags(FLAG_FIXED_NEWSTYLE), [0, 0, 0, 1]);
    }

    #[test]
    fn greeting_errors_name_the_field_and_byte() {
        let mut bytes = *b"NBDMAGICIHAVEOPT\x00\x01";
        bytes[3] = b'X';
        let e = parse_greeting(&bytes).unwrap_err();
        assert!(e.to_string().contains("expected NBDMAGIC at byte 0"), "{e}");
        let e = parse_greeting(b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Unsupported);
        let e = parse_greeting(b"NBDMAGICIHAVEOPT\x00\x00").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Unsupported, "{e}");
        let e = parse_greeting(b"NBDMAGICIHAVE").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Protocol);
        assert!(e.to_string().contains("'IHAVEOPT' at byte 8"), "{e}");
    }

    #[test]
    fn go_request_bytes() {
        let data = encode_go("disk0", &[INFO_BLOCK_SIZE]).unwrap();
        let opt = encode_option(OPT_GO, &data);
        assert_eq!(
            opt,
            [
                0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
                0, 0, 0, 7, // option: NBD_OPT_GO
                0, 0, 0, 13, // data length
                0, 0, 0, 5, // export name length
                b'd', b'i', b's', b'k', b'0', // export name
                0, 1, // one info request
                0, 3, // NBD_INFO_BLOCK_SIZE
            ]
        );
    }

    #[test]
    fn set_meta_context_request_bytes() {
        let data =
            encode_set_meta_context("", &["base:allocation", "qemu:dirty-bitmap:b1"]).unwrap();
        let mut expected = vec![
            0, 0, 0, 0, // export name length (default export "")
            0, 0, 0, 2, // two queries
            0, 0, 0, 15, // length of "base:allocation"
        ];
        expected.extend_from_slice(b"base:allocation");
        expected.extend_from_slice(&[0, 0, 0, 20]); // length of the bitmap context
        expected.extend_from_slice(b"qemu:dirty-bitmap:b1");
        assert_eq!(data, expected);
        let long = "x".repeat(MAX_STRING + 1);
        assert_eq!(
            encode_go(&long, &[]).unwrap_err().kind(),
            &ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn option_reply_header_and_info_payloads() {
        let header = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // option reply magic
            0, 0, 0, 7, // answers NBD_OPT_GO
            0, 0, 0, 3, // NBD_REP_INFO
            0, 0, 0, 12, // payload length
        ];
        assert_eq!(
            parse_option_reply_header(&header).unwrap(),
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                length: 12
            }
        );
        let export = [
            0, 0, // NBD_INFO_EXPORT
            0, 0, 0, 0, 0x04, 0, 0, 0, // size: 64 MiB
            0x05, 0x8d, // flags: HAS_FLAGS|SEND_FLUSH|... |CAN_MULTI_CONN|SEND_CACHE
        ];
        assert_eq!(
            parse_info(&export).unwrap(),
            Info::Export {
                size: 64 << 20,
                flags: 0x058d
            }
        );
        let block = [
            0, 3, // NBD_INFO_BLOCK_SIZE
            0, 0, 0x02, 0x00, // minimum 512
            0, 0, 0x10, 0x00, // preferred 4096
            0x02, 0, 0, 0, // maximum 32 MiB
        ];
        assert_eq!(
            parse_info(&block).unwrap(),
            Info::BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20
            }
        );
        let mut name = vec![0, 1]; // NBD_INFO_NAME
        name.extend_from_slice(b"disk0");
        assert_eq!(parse_info(&name).unwrap(), Info::Name("disk0".into()));
        assert_eq!(parse_info(&[0, 9, 1, 2]).unwrap(), Info::Unknown(9));
    }

    #[test]
    fn bad_info_payloads_are_protocol_errors() {
        // NBD_INFO_EXPORT cut short after the size.
        let e = parse_info(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap_err();
        assert!(
            e.to_string().contains("'transmission flags' at byte 10"),
            "{e}"
        );
        // Trailing bytes after a fixed-size info.
        let e = parse_info(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 9]).unwrap_err();
        assert!(e.to_string().contains("1 unexpected trailing byte"), "{e}");
        // A minimum block size that is not a power of two.
        let e = parse_info(&[0, 3, 0, 0, 0, 3, 0, 0, 16, 0, 2, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("inconsistent block sizes"), "{e}");
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn meta_context_reply() {
        let mut p = vec![0, 0, 0, 1]; // context id 1
        p.extend_from_slice(b"qemu:dirty-bitmap:b1"); // context name
        assert_eq!(
            parse_meta_context(&p).unwrap(),
            (1, "qemu:dirty-bitmap:b1".to_string())
        );
        assert!(parse_meta_context(&[0, 0]).is_err());
    }
}
