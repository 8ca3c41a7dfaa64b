//! Bitmap directory entries (persistent dirty bitmaps).

use super::be::*;
use crate::error::{Error, Result};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// QEMU's caps on the number of bitmaps and the length of a name.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_NAME: u16 = 1023;
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    pub fn parse(buf: &[u8]) -> Result<(BitmapEntry, usize)> {
        let bad = |what: String| Error::header("bitmap directory", what);
        if buf.len() < 24 {
            return Err(bad("entry truncated".into()));
        }
        let name_len = u16_at(buf, 18);
        let extra_len = u32_at(buf, 20) as usize;
        if name_len > MAX_NAME {
            return Err(bad(format!("bitmap name of {name_len} bytes is too long")));
        }
        if extra_len > buf.len() {
            return Err(bad("extra data runs past the directory".into()));
        }
        let total = 24 + extra_len + name_len as usize;
        if buf.len() < total {
            return Err(bad("entry runs past the directory".into()));
        }
        let e = BitmapEntry {
            table_offset: u64_at(buf, 0),
            table_size: u32_at(buf, 8),
            flags: u32_at(buf, 12),
            kind: buf[16],
            granularity_bits: buf[17],
            extra: buf[24..24 + extra_len].to_vec(),
            name: String::from_utf8_lossy(&buf[24 + extra_len..total]).into_owned(),
        };
        Ok((e, total.div_ceil(8) * 8))
    }

    pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapEntry>> {
        let mut out = Vec::new();
        let mut at = 0usize;
        for _ in 0..count {
            let (e, len) = BitmapEntry::parse(buf.get(at..).unwrap_or(&[]))?;
            out.push(e);
            at += len;
        }
        Ok(out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let total = 24 + self.extra.len() + self.name.len();
        let mut b = vec![0u8; total.div_ceil(8) * 8];
        put_u64(&mut b, 0, self.table_offset);
        put_u32(&mut b, 8, self.table_size);
        put_u32(&mut b, 12, self.flags);
        b[16] = self.kind;
        b[17] = self.granularity_bits;
        put_u16(&mut b, 18, self.name.len() as u16);
        put_u32(&mut b, 20, self.extra.len() as u32);
        b[24..24 + self.extra.len()].copy_from_slice(&self.extra);
        b[24 + self.extra.len()..total].copy_from_slice(self.name.as_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(off in 0u64..(1<<40), size: u32, flags in 0u32..8, gran in 9u8..31, name in "[a-z0-9]{1,40}") {
            let e = BitmapEntry { table_offset: off << 16, table_size: size, flags, kind: 1, granularity_bits: gran, name, extra: vec![] };
            let b = e.encode();
            let (p, len) = BitmapEntry::parse(&b).unwrap();
            prop_assert_eq!(len, b.len());
            prop_assert_eq!(p, e);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200), n in 0u32..5) {
            let _ = BitmapEntry::parse_directory(&b, n);
        }
    }
}
