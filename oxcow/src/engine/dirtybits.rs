//! A dirty bitmap in memory: one bit per granule (`granularity` bytes) of the disk,
//! kept flat. Its serialized form is the qcow2 bitmap data: bit `k` of the bitmap is
//! bit `k % 8` of byte `k / 8`, so a little-endian u64 word holds 64 granules.

/// The dirty granules of a disk of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBits {
    granularity_bits: u8,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBits {
    /// A clean bitmap. `granularity_bits` is at most 63 (callers check QEMU's limit).
    pub fn new(size: u64, granularity_bits: u8) -> DirtyBits {
        let granularity_bits = granularity_bits.min(63);
        let bits = size.div_ceil(1u64 << granularity_bits);
        DirtyBits {
            granularity_bits,
            size,
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Marks every granule touching `offset..offset+len` (clipped to the disk).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
    }

    fn set_bits(&mut self, first: u64, end: u64) {
        let mut b = first;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - w as u64 * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = self.words.get_mut(w) {
                *word |= mask;
            }
            b = w as u64 * 64 + hi;
        }
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    pub fn is_dirty(&self, offset: u64) -> bool {
        let b = offset >> self.granularity_bits;
        self.words
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1u64 << (b % 64)) != 0)
    }

    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Dirty bytes: dirty granules times the granularity, the last one clipped.
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().iter().map(|r| r.1).sum()
    }

    /// The dirty byte ranges `(offset, len)`, merged, in order, clipped to the disk.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity_bits;
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let lo = w.trailing_zeros() as u64;
                let run = (!(w >> lo)).trailing_zeros() as u64;
                let start = ((i as u64 * 64 + lo) << g).min(self.size);
                let end = ((i as u64 * 64 + lo + run) << g).min(self.size);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += end - start,
                    _ if end > start => out.push((start, end - start)),
                    _ => {}
                }
                w = if lo + run >= 64 {
                    0
                } else {
                    w & !(((1u64 << run) - 1) << lo)
                };
            }
        }
        out
    }

    /// Marks everything `other` has dirty (any granularity; same disk size expected).
    pub fn merge(&mut self, other: &DirtyBits) {
        if other.granularity_bits == self.granularity_bits && other.words.len() == self.words.len()
        {
            for (a, b) in self.words.iter_mut().zip(&other.words) {
                *a |= b;
            }
            return;
        }
        for (off, len) in other.ranges() {
            self.set_range(off, len);
        }
    }

    /// Changes the disk size: granules past a new, smaller end are dropped; new ones
    /// are clean.
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        let bits = self.bits();
        self.words.resize(bits.div_ceil(64) as usize, 0);
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let bits = self.bits();
        if !bits.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
    }

    /// Bytes of serialized data.
    pub fn data_bytes(&self) -> u64 {
        self.bits().div_ceil(8)
    }

    /// Serializes data bytes `at..at+out.len()`; bytes past the data are zeros.
    pub fn serialize(&self, at: u64, out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            let byte = at + i as u64;
            *o = self
                .words
                .get((byte / 8) as usize)
                .map_or(0, |w| (w >> ((byte % 8) * 8)) as u8);
        }
    }

    /// Loads serialized data bytes at `at` (bits past the disk are ignored).
    pub fn deserialize(&mut self, at: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let byte = at + i as u64;
            if let Some(w) = self.words.get_mut((byte / 8) as usize) {
                let shift = (byte % 8) * 8;
                *w = (*w & !(0xffu64 << shift)) | ((b as u64) << shift);
            }
        }
        self.mask_tail();
    }

    /// Sets every bit of serialized bytes `at..at+len` (a table entry "all ones").
    pub fn fill_ones(&mut self, at: u64, len: u64) {
        let first = at.saturating_mul(8);
        let end = at.saturating_add(len).saturating_mul(8).min(self.bits());
        if first < end {
            self.set_bits(first, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn granules_touched_are_dirty() {
        let mut d = DirtyBits::new(1 << 20, 16);
        d.set_range(65535, 2);
        assert_eq!(d.ranges(), vec![(0, 131072)]);
        d.set_range((1 << 20) - 1, 100);
        assert_eq!(d.ranges(), vec![(0, 131072), ((1 << 20) - 65536, 65536)]);
        assert_eq!(d.dirty_bytes(), 3 * 65536);
    }

    #[test]
    fn last_granule_is_clipped() {
        let mut d = DirtyBits::new(100_000, 16);
        d.set_range(0, 100_000);
        assert_eq!(d.ranges(), vec![(0, 100_000)]);
        let mut b = [0u8; 2];
        d.serialize(0, &mut b);
        assert_eq!(b, [0b11, 0]);
    }

    proptest! {
        #[test]
        fn matches_a_model(size in 1u64..(1 << 24), g in 9u8..20, ops in proptest::collection::vec((0u64..(1 << 24), 0u64..(1 << 20)), 0..20)) {
            let mut d = DirtyBits::new(size, g);
            let gran = 1u64 << g;
            let n = size.div_ceil(gran);
            let mut model = vec![false; n as usize];
            for (off, len) in ops {
                d.set_range(off, len);
                if len > 0 && off < size {
                    let end = (off + len).min(size);
                    for b in off / gran..=(end - 1) / gran {
                        model[b as usize] = true;
                    }
                }
            }
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(d.is_dirty(i as u64 * gran), m);
            }
            let mut from_ranges = vec![false; n as usize];
            for (off, len) in d.ranges() {
                prop_assert!(off + len <= size);
                for b in off / gran..(off + len).div_ceil(gran) {
                    from_ranges[b as usize] = true;
                }
            }
            prop_assert_eq!(&from_ranges, &model);
            // Serialize and load back, in odd chunk sizes.
            let mut bytes = vec![0u8; d.data_bytes() as usize];
            d.serialize(0, &mut bytes);
            let mut e = DirtyBits::new(size, g);
            for (i, c) in bytes.chunks(7).enumerate() {
                e.deserialize(i as u64 * 7, c);
            }
            prop_assert_eq!(&e, &d);
            let mut f = DirtyBits::new(size, g.saturating_sub(1).max(9));
            f.merge(&d);
            prop_assert_eq!(f.ranges(), d.ranges());
        }
    }
}
