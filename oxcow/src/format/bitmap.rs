//! Bitmap directory entries (persistent dirty bitmaps).

use super::be::*;
use crate::error::{Error, Result};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// QEMU's caps on the number of bitmaps and the length of a name.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_NAME: u16 = 1023;
/// QEMU's cap on the directory: 1 KiB for each of the most bitmaps allowed.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// The one bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Granularity limits (bits), as QEMU's.
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Most entries in a bitmap table, and most bytes of bitmap data (QEMU's caps; the
/// second bounds the memory a bitmap takes).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// Bytes a directory entry takes, padding included.
pub fn entry_size(name_len: usize, extra_len: usize) -> u64 {
    (24 + name_len + extra_len).div_ceil(8) as u64 * 8
}

/// Bytes of bitmap data for a disk of `size` bytes: one bit per granule.
pub fn data_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits.min(63)).div_ceil(8)
}

/// Entries of the bitmap table for a disk of `size` bytes.
pub fn table_entries(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    data_bytes(size, granularity_bits).div_ceil(cluster_size)
}

/// One bitmap table entry: what a cluster's worth of bitmap data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    Zeros,
    Ones,
    Data(u64),
}

impl TableEntry {
    /// Decodes and checks an entry: reserved bits clear, data cluster aligned.
    pub fn decode(e: u64, cluster_size: u64) -> Result<TableEntry> {
        let off = e & TABLE_OFFSET;
        if e & TABLE_RESERVED != 0
            || (off != 0 && (e & TABLE_ALL_ONES != 0 || !off.is_multiple_of(cluster_size)))
        {
            return Err(Error::corrupt(
                format!("invalid bitmap table entry {e:#x}"),
                off,
            ));
        }
        Ok(match (off, e & TABLE_ALL_ONES) {
            (0, 0) => TableEntry::Zeros,
            (0, _) => TableEntry::Ones,
            (o, _) => TableEntry::Data(o),
        })
    }

    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => TABLE_ALL_ONES,
            TableEntry::Data(o) => o & TABLE_OFFSET,
        }
    }
}

/// Encodes a whole directory.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    entries.iter().flat_map(BitmapEntry::encode).collect()
}

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

    /// Checks an entry as QEMU does before using it (or writing it): table placement
    /// and size, granularity, flags, name, type, no extra data, and a table large
    /// enough for the disk (unless the bitmap is in use, so not to be trusted).
    pub fn check(&self, cluster_size: u64, disk_size: u64) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::header(
                "bitmap directory",
                format!(
                    "bitmap '{}' doesn't satisfy the constraints: {why}",
                    self.name
                ),
            ))
        };
        if !self.extra.is_empty() {
            return bad("bitmap extra data is not supported");
        }
        if self.table_size == 0
            || self.table_offset == 0
            || !self.table_offset.is_multiple_of(cluster_size)
        {
            return bad("invalid bitmap table offset or size");
        }
        if self.table_size > MAX_TABLE_SIZE || self.table_size as u64 * cluster_size > MAX_PHYS_SIZE
        {
            return bad("bitmap table too large");
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return bad("granularity out of range");
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return bad("reserved flags set");
        }
        if self.name.len() > MAX_NAME as usize {
            return bad("name too long");
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return bad("unknown bitmap type");
        }
        let covered = ((self.table_size as u64 * cluster_size) * 8) << self.granularity_bits;
        if !self.in_use() && disk_size > covered {
            return bad("bitmap table too small for the disk");
        }
        Ok(())
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

    #[test]
    fn table_entries_decode_like_the_spec() {
        assert_eq!(TableEntry::decode(0, 65536).unwrap(), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(1, 65536).unwrap(), TableEntry::Ones);
        assert_eq!(
            TableEntry::decode(0x30000, 65536).unwrap(),
            TableEntry::Data(0x30000)
        );
        // Bit 0 with an offset, reserved bits, unaligned offsets: refused.
        assert!(TableEntry::decode(0x30001, 65536).is_err());
        assert!(TableEntry::decode(2, 65536).is_err());
        assert!(TableEntry::decode(1 << 60, 65536).is_err());
        assert!(TableEntry::decode(0x30200, 65536).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(entry_size(2, 0), 32);
        assert_eq!(entry_size(8, 0), 32);
        assert_eq!(entry_size(9, 0), 40);
        // 64 MiB at 64 KiB granularity: 1024 bits, 128 bytes, one table entry.
        assert_eq!(data_bytes(64 << 20, 16), 128);
        assert_eq!(table_entries(64 << 20, 16, 65536), 1);
        assert_eq!(table_entries(1 << 40, 9, 65536), 4096);
    }

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
        fn table_entry_roundtrip(off in 1u64..(1<<38), cb in 9u32..22) {
            let cs = 1u64 << cb;
            let e = TableEntry::Data((off * cs) & TABLE_OFFSET);
            if let TableEntry::Data(o) = e { prop_assume!(o != 0); }
            prop_assert_eq!(TableEntry::decode(e.encode(), cs).unwrap(), e);
        }

        #[test]
        fn table_entry_never_panics(e: u64, cb in 9u32..22) {
            let _ = TableEntry::decode(e, 1u64 << cb);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200), n in 0u32..5) {
            let _ = BitmapEntry::parse_directory(&b, n);
        }
    }
}
