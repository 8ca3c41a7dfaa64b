//! Refcount blocks of every width (1 to 64 bits per entry, refcount_order 0..6).
//! Entries narrower than a byte are packed from the least significant bit.

use super::be::*;

/// Reads entry `index` of a refcount block with entries of 2^order bits.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let byte = block[bit / 8];
            ((byte >> (bit % 8)) & ((1u8 << bits) - 1)) as u64
        }
        8 => block[index] as u64,
        16 => u16_at(block, index * 2) as u64,
        32 => u32_at(block, index * 4) as u64,
        _ => u64_at(block, index * 8),
    }
}

/// Writes entry `index`. The caller keeps `value` within `max_value(order)`.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        8 => block[index] = value as u8,
        16 => put_u16(block, index * 2, value as u16),
        32 => put_u32(block, index * 4, value as u32),
        _ => put_u64(block, index * 8, value),
    }
}

/// The largest refcount an entry of 2^order bits holds.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Entries in one refcount block of `cluster_bits` clusters.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn set_get_every_width(order in 0u32..=6, writes in proptest::collection::vec((0usize..64, any::<u64>()), 1..40)) {
            let mut block = vec![0u8; 512];
            let mut model = vec![0u64; 64];
            for (i, v) in writes {
                let v = v & max_value(order);
                set(&mut block, order, i, v);
                model[i] = v;
                for (j, m) in model.iter().enumerate() {
                    prop_assert_eq!(get(&block, order, j), *m);
                }
            }
        }
    }

    #[test]
    fn entry_counts() {
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(entries_per_block(9, 0), 4096);
        assert_eq!(entries_per_block(9, 6), 64);
        assert_eq!(max_value(0), 1);
        assert_eq!(max_value(4), 65535);
    }
}
