//! L1 and L2 table entries: standard, extended (with subcluster bitmaps) and compressed.

use super::compressed::CompressedDescriptor;
use super::OFFSET_MASK;

/// Bit 63 of L1 and standard L2 entries: the refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard (non-extended) L2 entry: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry (bits 1..8 and 56..62) that must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// An L1 entry: where an L2 table is, if any.
pub fn l1_l2_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// How one L2 entry maps its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Nothing here: read the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is the preallocated cluster, if any.
    Zero { host: Option<u64> },
    /// Data at `host` (in the image file, or the external data file).
    Normal { host: u64, copied: bool },
    /// Compressed data.
    Compressed(CompressedDescriptor),
    /// Extended L2 entry of an uncompressed cluster: per-subcluster state.
    /// `host` is 0 when no host cluster is allocated.
    Extended {
        host: u64,
        alloc: u32,
        zero: u32,
        copied: bool,
    },
}

impl L2Entry {
    /// Decodes a standard L2 entry. `data_file` is true for images with an external
    /// data file: there host offset 0 is a real cluster, and QEMU tells an entry with
    /// offset 0 and the COPIED flag (data file clusters always have refcount 1) from an
    /// unallocated one.
    pub fn decode(entry: u64, cluster_bits: u32, data_file: bool) -> L2Entry {
        // The compressed flag decides first: a compressed descriptor's low bits are
        // part of its offset, not a zero flag.
        if entry & COMPRESSED != 0 {
            return L2Entry::Compressed(CompressedDescriptor::decode(entry, cluster_bits));
        }
        let host = entry & OFFSET_MASK;
        if entry & ZERO != 0 {
            return L2Entry::Zero {
                host: (host != 0).then_some(host),
            };
        }
        if host == 0 && !(data_file && entry & COPIED != 0) {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal {
            host,
            copied: entry & COPIED != 0,
        }
    }

    /// Decodes an extended L2 entry (the standard word and the subcluster bitmap word).
    pub fn decode_extended(entry: u64, bitmap: u64, cluster_bits: u32) -> L2Entry {
        if entry & COMPRESSED != 0 {
            return L2Entry::Compressed(CompressedDescriptor::decode(entry, cluster_bits));
        }
        L2Entry::Extended {
            host: entry & OFFSET_MASK,
            alloc: bitmap as u32,
            zero: (bitmap >> 32) as u32,
            copied: entry & COPIED != 0,
        }
    }

    pub fn encode(&self, cluster_bits: u32) -> u64 {
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host } => host.unwrap_or(0) | ZERO,
            L2Entry::Normal { host, copied } => host | if copied { COPIED } else { 0 },
            L2Entry::Compressed(d) => d.encode(cluster_bits),
            L2Entry::Extended { host, copied, .. } => host | if copied { COPIED } else { 0 },
        }
    }

    /// The bitmap word of an extended entry.
    pub fn encode_bitmap(&self) -> u64 {
        match *self {
            L2Entry::Extended { alloc, zero, .. } => alloc as u64 | (zero as u64) << 32,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressed_is_checked_before_zero() {
        // A compressed descriptor whose offset is odd has bit 0 set.
        let d = CompressedDescriptor {
            offset: 0x10001,
            sectors: 2,
        };
        let e = d.encode(16);
        assert_eq!(e & ZERO, 1);
        assert_eq!(L2Entry::decode(e, 16, false), L2Entry::Compressed(d));
    }

    #[test]
    fn data_file_maps_cluster_zero() {
        assert_eq!(L2Entry::decode(COPIED, 16, false), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(COPIED, 16, true),
            L2Entry::Normal {
                host: 0,
                copied: true
            }
        );
    }

    proptest! {
        #[test]
        fn standard_roundtrip(host in 1u64..(1 << 40), copied: bool, kind in 0u8..3) {
            let host = host << 16;
            let e = match kind {
                0 => L2Entry::Normal { host, copied },
                1 => L2Entry::Zero { host: Some(host) },
                _ => L2Entry::Zero { host: None },
            };
            prop_assert_eq!(L2Entry::decode(e.encode(16), 16, false), e);
        }

        #[test]
        fn extended_roundtrip(host in 0u64..(1 << 40), alloc: u32, zero: u32, copied: bool) {
            let e = L2Entry::Extended { host: host << 16, alloc, zero, copied };
            prop_assert_eq!(L2Entry::decode_extended(e.encode(16), e.encode_bitmap(), 16), e);
        }
    }
}
