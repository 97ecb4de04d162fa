//! A bounds-checked big-endian field reader, so every parser reports a short
//! or oversized message as an error naming the message, the field and its
//! byte position, and none can panic on peer input.

use crate::error::{Error, Result};

pub(crate) struct Fields<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Fields { what, buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(Error::protocol(format!(
                "{}: field '{field}' at byte {} needs {n} bytes but the message has {left} left ({} bytes in all)",
                self.what,
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The rest of the message as text (peer strings are shown, not trusted).
    pub(crate) fn rest_string(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf[self.pos..]).into_owned();
        self.pos = self.buf.len();
        s
    }

    /// Fails when bytes are left over.
    pub(crate) fn finish(&self) -> Result<()> {
        let left = self.remaining();
        if left != 0 {
            return Err(Error::protocol(format!(
                "{}: {left} unexpected trailing byte{} at byte {}",
                self.what,
                if left == 1 { "" } else { "s" },
                self.pos
            )));
        }
        Ok(())
    }
}
