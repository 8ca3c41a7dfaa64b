//! Header extensions: the typed ones qcow2 defines, and unknown ones kept as bytes.

use super::be::*;
use crate::error::{Error, Result};

pub const END: u32 = 0x0000_0000;
pub const BACKING_FORMAT: u32 = 0xe279_2aca;
pub const FEATURE_TABLE: u32 = 0x6803_f857;
pub const BITMAPS: u32 = 0x2385_2875;
pub const CRYPTO_HEADER: u32 = 0x0537_be77;
pub const DATA_FILE: u32 = 0x4441_5441;

/// One header extension as stored: its type and its data (without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// Which feature bitmap a feature name table entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// The full disk encryption header pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeaderExt {
    pub offset: u64,
    pub length: u64,
}

/// Parses the extensions that start at `start` in cluster 0 (`buf` is cluster 0, or the
/// whole file when shorter). Stops at the end marker; refuses an extension whose length
/// runs past the cluster, or past the backing file name when there is one.
pub fn parse_all(buf: &[u8], start: u64, limit: u64) -> Result<Vec<Extension>> {
    let mut out = Vec::new();
    let limit = limit.min(buf.len() as u64);
    let mut at = start;
    loop {
        if at + 8 > limit {
            // QEMU accepts a header area that simply ends without an end marker only
            // when there is no room for another extension header.
            if at >= limit {
                break;
            }
            return Err(Error::header(
                "header extension",
                format!("extension header at {at:#x} is truncated"),
            ));
        }
        let kind = u32_at(buf, at as usize);
        let len = u32_at(buf, at as usize + 4) as u64;
        at += 8;
        if kind == END {
            break;
        }
        if at + len > limit {
            return Err(Error::header(
                "header extension",
                format!(
                    "extension {kind:#010x} of length {len} at {:#x} runs past the header area",
                    at - 8
                ),
            ));
        }
        out.push(Extension {
            kind,
            data: buf[at as usize..(at + len) as usize].to_vec(),
        });
        at += len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Encodes extensions (each padded to 8 bytes) followed by the end marker.
pub fn encode_all(exts: &[Extension]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in exts {
        let mut h = [0u8; 8];
        put_u32(&mut h, 0, e.kind);
        put_u32(&mut h, 4, e.data.len() as u32);
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    out
}

pub fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(48)
        .filter_map(|c| {
            let kind = match c[0] {
                0 => FeatureKind::Incompatible,
                1 => FeatureKind::Compatible,
                2 => FeatureKind::Autoclear,
                _ => return None,
            };
            let name = &c[2..48];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            Some(FeatureName {
                kind,
                bit: c[1],
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
            })
        })
        .collect()
}

pub fn encode_feature_table(names: &[FeatureName]) -> Vec<u8> {
    let mut out = vec![0u8; names.len() * 48];
    for (i, f) in names.iter().enumerate() {
        let e = &mut out[i * 48..(i + 1) * 48];
        e[0] = match f.kind {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        };
        e[1] = f.bit;
        let n = f.name.as_bytes();
        let l = n.len().min(46);
        e[2..2 + l].copy_from_slice(&n[..l]);
    }
    out
}

/// The feature names QEMU writes into every v3 image.
pub fn default_feature_table() -> Vec<FeatureName> {
    use FeatureKind::*;
    [
        (Incompatible, 0, "dirty bit"),
        (Incompatible, 1, "corrupt bit"),
        (Incompatible, 2, "external data file"),
        (Incompatible, 3, "compression type"),
        (Incompatible, 4, "extended L2 entries"),
        (Compatible, 0, "lazy refcounts"),
        (Autoclear, 0, "bitmaps"),
        (Autoclear, 1, "raw external data"),
    ]
    .into_iter()
    .map(|(kind, bit, name)| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    })
    .collect()
}

pub fn parse_bitmaps(data: &[u8]) -> Result<BitmapsExt> {
    if data.len() < 24 {
        return Err(Error::header(
            "bitmaps extension",
            format!("length {} is shorter than 24", data.len()),
        ));
    }
    if u32_at(data, 4) != 0 {
        return Err(Error::header(
            "bitmaps extension",
            "reserved field is not zero",
        ));
    }
    Ok(BitmapsExt {
        nb_bitmaps: u32_at(data, 0),
        directory_size: u64_at(data, 8),
        directory_offset: u64_at(data, 16),
    })
}

pub fn encode_bitmaps(b: &BitmapsExt) -> Vec<u8> {
    let mut d = vec![0u8; 24];
    put_u32(&mut d, 0, b.nb_bitmaps);
    put_u64(&mut d, 8, b.directory_size);
    put_u64(&mut d, 16, b.directory_offset);
    d
}

pub fn parse_crypto_header(data: &[u8]) -> Result<CryptoHeaderExt> {
    if data.len() < 16 {
        return Err(Error::header(
            "encryption header extension",
            "shorter than 16 bytes",
        ));
    }
    Ok(CryptoHeaderExt {
        offset: u64_at(data, 0),
        length: u64_at(data, 8),
    })
}

/// A name stored in an extension (backing format, data file): UTF-8, no NULs.
pub fn parse_name(field: &'static str, data: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(data).map_err(|_| Error::header(field, "not valid UTF-8"))?;
    if s.contains('\0') {
        return Err(Error::header(field, "contains a NUL byte"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn feature_table_roundtrip() {
        let t = default_feature_table();
        assert_eq!(parse_feature_table(&encode_feature_table(&t)), t);
    }

    #[test]
    fn rejects_extension_past_area() {
        let exts = [Extension {
            kind: BACKING_FORMAT,
            data: b"qcow2".to_vec(),
        }];
        let mut b = vec![0u8; 112];
        b.extend(encode_all(&exts));
        // Claim a length that runs past the buffer.
        put_u32(&mut b, 116, 10_000);
        let e = parse_all(&b, 112, 4096).unwrap_err().to_string();
        assert!(e.contains("runs past"), "{e}");
    }

    proptest! {
        #[test]
        fn roundtrip(exts in proptest::collection::vec((1u32.., proptest::collection::vec(any::<u8>(), 0..40)), 0..6)) {
            let exts: Vec<Extension> = exts.into_iter().map(|(kind, data)| Extension { kind, data }).collect();
            let b = encode_all(&exts);
            let p = parse_all(&b, 0, b.len() as u64).unwrap();
            prop_assert_eq!(p, exts);
        }
    }
}
