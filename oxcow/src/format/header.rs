//! The qcow2 header (versions 2 and 3): every field, validated alone, encoded back
//! byte for byte, with unknown trailing header bytes kept.

use super::be::*;
use super::{
    MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
};
use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// header length QEMU writes for v3 (with the compression type byte and padding).
pub const V3_HEADER_LEN_WITH_COMPRESSION: u32 = 112;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Encryption method in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    None,
    Aes,
    Luks,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: CryptMethod,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes past the fields this version knows (from byte 112 up to
    /// header_length), kept so that rewriting the header preserves them.
    pub unknown_tail: Vec<u8>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.has_extended_l2() {
            16
        } else {
            8
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size() * self.cluster_size()
    }

    /// Where the header extensions begin.
    pub fn extensions_offset(&self) -> u64 {
        if self.version == 2 {
            V2_HEADER_LEN as u64
        } else {
            self.header_length as u64
        }
    }

    /// Parses and validates a header from the start of cluster 0. `buf` should hold at
    /// least the first cluster, or the whole file when it is shorter.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        Self::parse_with(buf, true)
    }

    /// Parses the header; `snapshots`: also validate the snapshot table fields (an
    /// open to be checked leaves them to the check, as QEMU's does).
    pub fn parse_with(buf: &[u8], snapshots: bool) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            if buf.len() >= 4 && u32_at(buf, 0) == MAGIC {
                return Err(Error::header(
                    "header",
                    format!("truncated: the file holds only {} bytes", buf.len()),
                ));
            }
            return Err(Error::NotQcow2);
        }
        if u32_at(buf, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = u32_at(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = u32_at(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::header(
                "cluster_bits",
                format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut h = Header {
            version,
            backing_file_offset: u64_at(buf, 8),
            backing_file_size: u32_at(buf, 16),
            cluster_bits,
            size: u64_at(buf, 24),
            crypt_method: match u32_at(buf, 32) {
                0 => CryptMethod::None,
                1 => CryptMethod::Aes,
                2 => CryptMethod::Luks,
                m => {
                    return Err(Error::header(
                        "crypt_method",
                        format!("unknown encryption method {m}"),
                    ))
                }
            },
            l1_size: u32_at(buf, 36),
            l1_table_offset: u64_at(buf, 40),
            refcount_table_offset: u64_at(buf, 48),
            refcount_table_clusters: u32_at(buf, 56),
            nb_snapshots: u32_at(buf, 60),
            snapshots_offset: u64_at(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        };

        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Error::header("header", "truncated v3 header"));
            }
            h.incompatible_features = u64_at(buf, 72);
            h.compatible_features = u64_at(buf, 80);
            h.autoclear_features = u64_at(buf, 88);
            h.refcount_order = u32_at(buf, 96);
            h.header_length = u32_at(buf, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(Error::header(
                    "header_length",
                    format!("{} is smaller than 104", h.header_length),
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(Error::header(
                    "header_length",
                    format!("{} is not a multiple of 8", h.header_length),
                ));
            }
            if h.header_length as u64 > cluster_size {
                return Err(Error::header(
                    "header_length",
                    format!("{} runs past the first cluster", h.header_length),
                ));
            }
            let hl = h.header_length as usize;
            if buf.len() < hl {
                return Err(Error::header(
                    "header",
                    "truncated: the file ends inside the header",
                ));
            }
            if hl > 104 {
                let ct = buf[104];
                h.compression_type = CompressionType::from_byte(ct).ok_or_else(|| {
                    Error::header("compression_type", format!("unknown compression type {ct}"))
                })?;
            }
            if hl > V3_HEADER_LEN_WITH_COMPRESSION as usize {
                h.unknown_tail = buf[V3_HEADER_LEN_WITH_COMPRESSION as usize..hl].to_vec();
            }
        }
        h.validate_fields()?;
        if snapshots {
            h.validate_snapshot_fields()?;
        }
        Ok(h)
    }

    /// The checks that need only the header's own fields.
    pub fn validate(&self) -> Result<()> {
        self.validate_fields()?;
        self.validate_snapshot_fields()
    }

    /// The header's fields but nb_snapshots and snapshots_offset.
    fn validate_fields(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(Error::header(
                "refcount_order",
                format!("{} is larger than 6", self.refcount_order),
            ));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(Error::header(
                "refcount_order",
                "version 2 images have 16-bit refcounts",
            ));
        }
        let has_ct_bit = self.incompatible_features & incompat::COMPRESSION != 0;
        match (self.compression_type, has_ct_bit) {
            (CompressionType::Zlib, true) => {
                return Err(Error::header(
                    "compression_type",
                    "the compression type bit is set for zlib",
                ))
            }
            (CompressionType::Zstd, false) => {
                return Err(Error::header(
                    "compression_type",
                    "zstd is used without the compression type bit",
                ))
            }
            _ => {}
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_NAME {
                return Err(Error::header(
                    "backing_file_size",
                    format!(
                        "backing file name of {} bytes is longer than {MAX_BACKING_NAME}",
                        self.backing_file_size
                    ),
                ));
            }
            let end = self
                .backing_file_offset
                .checked_add(self.backing_file_size as u64);
            if end.is_none_or(|e| e > cs) {
                return Err(Error::header(
                    "backing_file_offset",
                    "the backing file name runs past the first cluster",
                ));
            }
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::header(
                "l1_size",
                format!("L1 table of {} entries is too large", self.l1_size),
            ));
        }
        let needed = self.size.div_ceil(self.l2_coverage());
        if (self.l1_size as u64) < needed {
            return Err(Error::header(
                "l1_size",
                format!(
                    "L1 table of {} entries is too small for virtual size {}",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size > 0 {
            check_table(
                "l1_table_offset",
                self.l1_table_offset,
                self.l1_size as u64 * 8,
                cs,
            )?;
        } else if !self.l1_table_offset.is_multiple_of(cs) {
            return Err(Error::header("l1_table_offset", "unaligned"));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::header(
                "refcount_table_clusters",
                "the refcount table is empty",
            ));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::header(
                "refcount_table_clusters",
                format!(
                    "refcount table of {} clusters is too large",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
            cs,
        )?;
        Ok(())
    }

    /// nb_snapshots and snapshots_offset.
    fn validate_snapshot_fields(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::header(
                "nb_snapshots",
                format!(
                    "{} snapshots is more than {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        if self.nb_snapshots > 0 {
            check_table("snapshots_offset", self.snapshots_offset, 1, cs)?;
        }
        Ok(())
    }

    /// Bytes of the header proper (without extensions).
    pub fn encoded_len(&self) -> usize {
        if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            self.header_length as usize
        }
    }

    /// Encodes the header into `out`, which must hold `encoded_len()` bytes.
    pub fn write(&self, out: &mut [u8]) {
        out[..self.encoded_len()].fill(0);
        put_u32(out, 0, MAGIC);
        put_u32(out, 4, self.version);
        put_u64(out, 8, self.backing_file_offset);
        put_u32(out, 16, self.backing_file_size);
        put_u32(out, 20, self.cluster_bits);
        put_u64(out, 24, self.size);
        put_u32(
            out,
            32,
            match self.crypt_method {
                CryptMethod::None => 0,
                CryptMethod::Aes => 1,
                CryptMethod::Luks => 2,
            },
        );
        put_u32(out, 36, self.l1_size);
        put_u64(out, 40, self.l1_table_offset);
        put_u64(out, 48, self.refcount_table_offset);
        put_u32(out, 56, self.refcount_table_clusters);
        put_u32(out, 60, self.nb_snapshots);
        put_u64(out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_u64(out, 72, self.incompatible_features);
            put_u64(out, 80, self.compatible_features);
            put_u64(out, 88, self.autoclear_features);
            put_u32(out, 96, self.refcount_order);
            put_u32(out, 100, self.header_length);
            if self.header_length > V3_HEADER_LEN {
                out[104] = self.compression_type.to_byte();
            }
            let tail = V3_HEADER_LEN_WITH_COMPRESSION as usize;
            out[tail..tail + self.unknown_tail.len()].copy_from_slice(&self.unknown_tail);
        }
    }
}

/// A table must start on a cluster boundary, not at offset 0 (the header), and not
/// wrap the 64-bit offset space.
fn check_table(field: &'static str, offset: u64, bytes: u64, cluster_size: u64) -> Result<()> {
    if offset == 0 {
        return Err(Error::header(
            field,
            "table at offset 0 overlaps the header",
        ));
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::header(
            field,
            format!("offset {offset:#x} is not aligned to a cluster"),
        ));
    }
    if offset.checked_add(bytes).is_none_or(|e| e > (1u64 << 56)) {
        return Err(Error::header(
            field,
            format!("table at {offset:#x} runs past the largest host offset"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v3(size: u64, cluster_bits: u32) -> Header {
        let cs = 1u64 << cluster_bits;
        let cov = cs / 8 * cs;
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: CryptMethod::None,
            l1_size: size.div_ceil(cov) as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            unknown_tail: vec![],
        }
    }

    fn encode(h: &Header) -> Vec<u8> {
        let mut b = vec![0u8; h.cluster_size() as usize];
        h.write(&mut b);
        b
    }

    #[test]
    fn rejects_bad_magic_and_versions() {
        let mut b = encode(&v3(1 << 30, 16));
        b[3] = 0;
        assert!(matches!(Header::parse(&b), Err(Error::NotQcow2)));
        let mut b = encode(&v3(1 << 30, 16));
        b[7] = 4;
        assert!(matches!(Header::parse(&b), Err(Error::Unsupported(_))));
    }

    #[test]
    fn rejects_header_length_shapes() {
        for (len, word) in [
            (100u32, "smaller"),
            (108, "multiple of 8"),
            (1 << 17, "past the first cluster"),
        ] {
            let mut h = v3(1 << 30, 16);
            h.header_length = 112;
            let mut b = encode(&h);
            put_u32(&mut b, 100, len);
            let e = Header::parse(&b).unwrap_err().to_string();
            assert!(
                e.contains("header_length") && e.contains(word),
                "{len}: {e}"
            );
        }
    }

    #[test]
    fn keeps_unknown_tail() {
        let mut h = v3(1 << 20, 16);
        h.header_length = 128;
        h.unknown_tail = (0..16).collect();
        let b = encode(&h);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(encode(&p), b);
    }

    #[test]
    fn rejects_oversized_tables() {
        let mut h = v3(1 << 30, 16);
        h.l1_size = (MAX_L1_BYTES / 8 + 1) as u32;
        assert!(Header::parse(&encode(&h))
            .unwrap_err()
            .to_string()
            .contains("l1_size"));
        let mut h = v3(1 << 40, 16);
        h.l1_size = 1;
        assert!(Header::parse(&encode(&h))
            .unwrap_err()
            .to_string()
            .contains("too small"));
        let mut h = v3(1 << 20, 16);
        h.refcount_table_clusters = 0;
        assert!(Header::parse(&encode(&h))
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let mut h = v3(1 << 20, 16);
        h.l1_table_offset += 512;
        assert!(Header::parse(&encode(&h))
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        let mut h = v3(1 << 20, 16);
        h.nb_snapshots = MAX_SNAPSHOTS + 1;
        h.snapshots_offset = 1 << 16;
        assert!(Header::parse(&encode(&h))
            .unwrap_err()
            .to_string()
            .contains("snapshots"));
    }

    proptest! {
        #[test]
        fn roundtrip(bits in 9u32..=21, size_part in 0u64..=1 << 20, order in 0u32..=6, lazy: bool, ext: bool, zstd: bool, v2: bool) {
            // Any size up to the largest an L1 table of this cluster size can map.
            let largest = MAX_L1_BYTES / 8 * ((1u64 << bits) / 16 * (1u64 << bits));
            let size = (largest >> 20) * size_part;
            let mut h = v3(size, bits);
            if v2 {
                h.version = 2;
                h.header_length = 72;
            } else {
                h.refcount_order = order;
                h.compatible_features = lazy as u64;
                if ext {
                    h.incompatible_features |= incompat::EXTENDED_L2;
                    h.l1_size = size.div_ceil(h.l2_coverage()) as u32;
                }
                if zstd {
                    h.incompatible_features |= incompat::COMPRESSION;
                    h.compression_type = CompressionType::Zstd;
                }
            }
            // Sizes whose L1 table would not fit (or not fit a u32) are not valid images.
            prop_assume!(size.div_ceil(h.l2_coverage()) * 8 <= MAX_L1_BYTES);
            let b = encode(&h);
            let p = Header::parse(&b).unwrap();
            prop_assert_eq!(&p, &h);
            prop_assert_eq!(encode(&p), b);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = bytes;
            if b.len() >= 4 { b[..4].copy_from_slice(&MAGIC.to_be_bytes()); }
            let _ = Header::parse(&b);
        }
    }
}
