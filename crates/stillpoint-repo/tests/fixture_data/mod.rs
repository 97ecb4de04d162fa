//! The disk contents stored in the pinned fixture repositories (`tests/fixtures/v1-*`), made
//! by plain deterministic code (no repository code), and their fixed parameters.
#![allow(dead_code)] // each test binary uses part of it

/// The passphrase of `tests/fixtures/v1/encrypted`.
pub const PASSPHRASE: &str = "stillpoint fixture passphrase";
/// The fixture repositories' chunk size.
pub const CHUNK_SIZE: u32 = 64 << 10;

fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut n = 0u32;
    while out.len() < len {
        out.extend_from_slice(format!("stillpoint fixture line {n}\n").as_bytes());
        n += 1;
    }
    out.truncate(len);
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Disk `vda`: a text chunk, a zero chunk, the same text chunk again (dedup), a short
/// incompressible tail (stored raw).
pub fn vda() -> Vec<u8> {
    let chunk = CHUNK_SIZE as usize;
    let mut out = text(chunk);
    out.extend(std::iter::repeat_n(0u8, chunk));
    out.extend(text(chunk));
    out.extend(noise(3000, 1));
    out
}

/// Disk `vdb`: smaller than one chunk.
pub fn vdb() -> Vec<u8> {
    let mut out = b"vdb: ".to_vec();
    out.extend(text(995));
    out
}
