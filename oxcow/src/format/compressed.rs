//! Compressed cluster descriptors, with the exact size rules of the spec: the offset
//! takes bits 0..x-1 and the count of additional 512-byte sectors takes bits x..61,
//! where x = 62 - (cluster_bits - 8).

/// Compressed data is counted in 512-byte sectors.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the first compressed byte (any alignment).
    pub offset: u64,
    /// Additional sectors beyond the one holding `offset`.
    pub sectors: u64,
}

fn offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

impl CompressedDescriptor {
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = offset_bits(cluster_bits);
        let size_mask = (1u64 << (cluster_bits - 8)) - 1;
        CompressedDescriptor {
            offset: entry & ((1u64 << x) - 1),
            sectors: (entry >> x) & size_mask,
        }
    }

    pub fn encode(&self, cluster_bits: u32) -> u64 {
        let x = offset_bits(cluster_bits);
        super::l1l2::COMPRESSED | self.offset | (self.sectors << x)
    }

    /// A descriptor for `len` compressed bytes at `offset`.
    pub fn for_range(offset: u64, len: u64) -> Self {
        let end = offset + len;
        CompressedDescriptor {
            offset,
            sectors: (end - 1) / SECTOR - offset / SECTOR,
        }
    }

    /// How many bytes to read: from `offset` to the end of its last sector. The stream
    /// may end earlier; the rest of the last sector is slack.
    pub fn byte_len(&self) -> u64 {
        (self.sectors + 1) * SECTOR - (self.offset % SECTOR)
    }

    /// Largest number of additional sectors a descriptor can express.
    pub fn max_sectors(cluster_bits: u32) -> u64 {
        (1u64 << (cluster_bits - 8)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn size_rule_matches_spec() {
        // 64 KiB clusters: x = 54, 8 size bits.
        let d = CompressedDescriptor {
            offset: 0x50000 + 100,
            sectors: 3,
        };
        assert_eq!(d.byte_len(), 4 * 512 - 100);
        let e = d.encode(16);
        assert_eq!(e >> 54 & 0xff, 3);
        assert_eq!(CompressedDescriptor::decode(e, 16), d);
    }

    proptest! {
        #[test]
        fn range_covers(bits in 9u32..=21, off in 0u64..(1 << 40), len in 1u64..4096) {
            let len = len.min((CompressedDescriptor::max_sectors(bits)) * SECTOR + 1);
            let d = CompressedDescriptor::for_range(off, len);
            prop_assert!(d.byte_len() >= len);
            prop_assert!(d.byte_len() < len + SECTOR);
            prop_assert_eq!(CompressedDescriptor::decode(d.encode(bits), bits), d);
        }
    }
}
