//! Every number of the NBD protocol this client uses, in one place.
//!
//! Values are from the NBD protocol specification (NetworkBlockDevice/nbd
//! `doc/proto.md`); all integers on the wire are big-endian.

// ---- handshake (fixed newstyle) ----

/// First 8 bytes from the server: ASCII `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Next 8 bytes from the server, and the prefix of every client option: ASCII `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply from the server.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flag: fixed newstyle (option haggling with replies).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: we speak fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: we do not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_ABORT`: end the handshake without entering transmission.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`: select an export, get its info, enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: replies come in typed chunks (needed for block status and holes).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_SET_META_CONTEXT`: choose the metadata contexts block status reports.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`: the option is done.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`: one piece of export information (to `NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one selected context and its id.
pub const REP_META_CONTEXT: u32 = 4;
/// Replies with this bit set are errors.
pub const REP_FLAG_ERROR: u32 = 1 << 31;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Longest string we send or accept in the handshake (the spec's limit).
pub const MAX_STRING: usize = 4096;

// ---- transmission flags (from NBD_INFO_EXPORT) ----

/// The flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Several connections see the same data (multi-conn safe).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---- requests ----

/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Request header length: magic 4 + flags 2 + type 2 + handle 8 + offset 8 + length 4.
pub const REQUEST_LEN: usize = 28;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---- replies ----

/// Prefix of a simple reply (16 bytes: magic, error, handle).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk (20 bytes: magic, flags, type, handle, length).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Simple reply header length.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header length.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Structured chunk flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `NBD_REPLY_TYPE_NONE`: no payload, only valid with DONE.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: offset (8) + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: offset (8) + hole size (4); reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id (4) + (length 4, flags 4)*.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk types with this bit set are errors.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: error (4) + message length (2) + message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: as ERROR, then the offset (8) it concerns.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---- block status ----

/// `base:allocation`: the extent is not allocated (a hole).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The allocation context every server with block status offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty-bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// ---- sizes ----

/// Largest payload a client may send or request when the server did not say
/// (the spec's default maximum: 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Preferred block size when the server did not say.
pub const DEFAULT_PREFERRED_BLOCK: u32 = 4096;

/// A name for an NBD error number, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// A name for an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "option",
    }
}

/// A name for an option error reply, for messages.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply {
        0x8000_0001 => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        _ => "NBD_REP_ERR",
    }
}

/// `NBD_REP_ERR_UNSUP`: the server does not know the option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
