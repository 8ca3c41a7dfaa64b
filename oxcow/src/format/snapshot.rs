//! Snapshot table entries, with every field and unknown extra data kept.

use super::be::*;
use crate::error::{Error, Result};

/// QEMU's cap on a snapshot's extra data.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// The extra data QEMU knows and writes: VM state size, disk size, icount.
pub const KNOWN_EXTRA_DATA: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// The VM state size (the 64-bit one from extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// Instructions counter (extra data), if recorded.
    pub icount: Option<u64>,
    /// The whole extra data as stored, so unknown fields survive a rewrite.
    pub extra: Vec<u8>,
}

impl SnapshotEntry {
    /// Parses the entry at the start of `buf`; returns it and its encoded length.
    pub fn parse(buf: &[u8]) -> Result<(SnapshotEntry, usize)> {
        let bad = |what: &str| Error::header("snapshot table", what.to_string());
        if buf.len() < 40 {
            return Err(bad("entry truncated"));
        }
        let id_len = u16_at(buf, 12) as usize;
        let name_len = u16_at(buf, 14) as usize;
        let extra_len = u32_at(buf, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(bad(&format!(
                "extra data of {extra_len} bytes is too large"
            )));
        }
        let extra_len = extra_len as usize;
        let total = 40 + extra_len + id_len + name_len;
        if buf.len() < total {
            return Err(bad("entry runs past the end of the table"));
        }
        let extra = buf[40..40 + extra_len].to_vec();
        let id =
            String::from_utf8_lossy(&buf[40 + extra_len..40 + extra_len + id_len]).into_owned();
        let name = String::from_utf8_lossy(&buf[40 + extra_len + id_len..total]).into_owned();
        let mut vm_state_size = u32_at(buf, 32) as u64;
        if extra_len >= 8 {
            vm_state_size = u64_at(&extra, 0);
        }
        let disk_size = (extra_len >= 16).then(|| u64_at(&extra, 8));
        let icount = (extra_len >= 24).then(|| u64_at(&extra, 16));
        let e = SnapshotEntry {
            l1_table_offset: u64_at(buf, 0),
            l1_size: u32_at(buf, 8),
            id,
            name,
            date_sec: u32_at(buf, 16),
            date_nsec: u32_at(buf, 20),
            vm_clock_nsec: u64_at(buf, 24),
            vm_state_size,
            disk_size,
            icount,
            extra,
        };
        Ok((e, total.div_ceil(8) * 8))
    }

    /// Parses a whole snapshot table of `count` entries.
    pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<SnapshotEntry>> {
        Ok(Self::parse_table_with_len(buf, count)?.0)
    }

    /// Parses a whole snapshot table; also returns its length in bytes.
    pub fn parse_table_with_len(buf: &[u8], count: u32) -> Result<(Vec<SnapshotEntry>, usize)> {
        let mut out = Vec::with_capacity(count.min(1024) as usize);
        let mut at = 0usize;
        for _ in 0..count {
            let (e, len) = SnapshotEntry::parse(buf.get(at..).unwrap_or(&[]))?;
            out.push(e);
            at += len;
        }
        Ok((out, at))
    }

    /// The length of the encoded entry before its padding to 8 bytes.
    pub fn encoded_len(&self) -> usize {
        40 + self.extra.len().max(KNOWN_EXTRA_DATA) + self.id.len() + self.name.len()
    }

    /// Encodes the entry as QEMU writes it: at least the 24 bytes of extra data it
    /// knows (the 64-bit VM state size, the disk size and the instruction counter,
    /// all ones when not recorded), then any unknown extra data unchanged. The 32-bit
    /// VM state size is 0 when the size does not fit.
    pub fn encode(&self) -> Vec<u8> {
        let mut extra = self.extra.clone();
        if extra.len() < KNOWN_EXTRA_DATA {
            extra.resize(KNOWN_EXTRA_DATA, 0);
        }
        put_u64(&mut extra, 0, self.vm_state_size);
        put_u64(&mut extra, 8, self.disk_size.unwrap_or(0));
        put_u64(&mut extra, 16, self.icount.unwrap_or(u64::MAX));
        let total = 40 + extra.len() + self.id.len() + self.name.len();
        let mut b = vec![0u8; total.div_ceil(8) * 8];
        put_u64(&mut b, 0, self.l1_table_offset);
        put_u32(&mut b, 8, self.l1_size);
        put_u16(&mut b, 12, self.id.len() as u16);
        put_u16(&mut b, 14, self.name.len() as u16);
        put_u32(&mut b, 16, self.date_sec);
        put_u32(&mut b, 20, self.date_nsec);
        put_u64(&mut b, 24, self.vm_clock_nsec);
        put_u32(&mut b, 32, u32::try_from(self.vm_state_size).unwrap_or(0));
        put_u32(&mut b, 36, extra.len() as u32);
        b[40..40 + extra.len()].copy_from_slice(&extra);
        let at = 40 + extra.len();
        b[at..at + self.id.len()].copy_from_slice(self.id.as_bytes());
        b[at + self.id.len()..at + self.id.len() + self.name.len()]
            .copy_from_slice(self.name.as_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(l1 in 0u64..(1<<40), id in "[0-9]{1,4}", name in "[a-z ]{0,30}", vm in any::<u64>(), disk in any::<u64>(), icount in any::<u64>(), unknown in proptest::collection::vec(any::<u8>(), 0..40), sec: u32, nsec: u32, clock: u64) {
            let mut extra = vec![0u8; 24];
            put_u64(&mut extra, 0, vm);
            put_u64(&mut extra, 8, disk);
            put_u64(&mut extra, 16, icount);
            extra.extend_from_slice(&unknown);
            let icount = Some(icount);
            let e = SnapshotEntry { l1_table_offset: l1 << 16, l1_size: 3, id, name, date_sec: sec, date_nsec: nsec, vm_clock_nsec: clock, vm_state_size: vm, disk_size: Some(disk), icount, extra };
            let b = e.encode();
            prop_assert_eq!(b.len() % 8, 0);
            prop_assert_eq!(b.len(), e.encoded_len().div_ceil(8) * 8);
            let (p, len) = SnapshotEntry::parse(&b).unwrap();
            prop_assert_eq!(len, b.len());
            prop_assert_eq!(p, e);
        }

        #[test]
        fn short_extra_data_grows_to_what_qemu_writes(vm in 0u64..(1 << 32), disk: u64) {
            // A v2 entry of old: 16 bytes of extra data, no instruction counter.
            let mut extra = vec![0u8; 16];
            put_u64(&mut extra, 0, vm);
            put_u64(&mut extra, 8, disk);
            let e = SnapshotEntry { l1_table_offset: 1 << 16, l1_size: 1, id: "1".into(), name: "a".into(), date_sec: 0, date_nsec: 0, vm_clock_nsec: 0, vm_state_size: vm, disk_size: Some(disk), icount: None, extra };
            let b = e.encode();
            prop_assert_eq!(u32_at(&b, 36), 24);
            prop_assert_eq!(u32_at(&b, 32) as u64, vm);
            let (p, _) = SnapshotEntry::parse(&b).unwrap();
            prop_assert_eq!(p.icount, Some(u64::MAX));
            prop_assert_eq!(p.disk_size, Some(disk));
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200), n in 0u32..5) {
            let _ = SnapshotEntry::parse_table(&b, n);
        }
    }
}
