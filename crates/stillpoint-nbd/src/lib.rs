//! NBD client: fixed-newstyle handshake, structured replies, block status (reads captures).
//!
//! (Design note to be written with the crate's first real code.)
