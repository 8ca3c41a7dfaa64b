//! Encoding cluster 0 whole: the header, then the header extensions in the order QEMU
//! writes them, the end marker, and the backing file name right after it.

use super::extension::{self, BitmapsExt, CryptoHeaderExt, Extension};
use super::header::{Header, V3_HEADER_LEN_WITH_COMPRESSION};
use crate::error::{Error, Result};

/// What cluster 0 holds besides the header fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderExtras {
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub crypto_header: Option<CryptoHeaderExt>,
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions this implementation does not know, kept as they were.
    pub unknown: Vec<Extension>,
}

/// Encodes cluster 0. Updates `h`'s header_length and backing name fields to what is
/// written. Fails when everything does not fit in one cluster.
pub fn encode(h: &mut Header, x: &HeaderExtras) -> Result<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    if h.version >= 3 {
        h.header_length = V3_HEADER_LEN_WITH_COMPRESSION + h.unknown_tail.len() as u32;
    }
    let mut exts = Vec::new();
    if let Some(f) = &x.backing_format {
        exts.push(Extension {
            kind: extension::BACKING_FORMAT,
            data: f.as_bytes().to_vec(),
        });
    }
    if h.has_data_file() {
        if let Some(f) = &x.data_file {
            exts.push(Extension {
                kind: extension::DATA_FILE,
                data: f.as_bytes().to_vec(),
            });
        }
    }
    if let Some(c) = &x.crypto_header {
        let mut d = vec![0u8; 16];
        super::be::put_u64(&mut d, 0, c.offset);
        super::be::put_u64(&mut d, 8, c.length);
        exts.push(Extension {
            kind: extension::CRYPTO_HEADER,
            data: d,
        });
    }
    // QEMU leaves the feature table out of images with clusters of 4 KiB or less, to
    // keep room for a backing file name.
    if h.version >= 3 && cs > 4096 {
        exts.push(Extension {
            kind: extension::FEATURE_TABLE,
            data: extension::encode_feature_table(&extension::default_feature_table()),
        });
    }
    if let Some(b) = &x.bitmaps {
        if b.nb_bitmaps > 0 {
            exts.push(Extension {
                kind: extension::BITMAPS,
                data: extension::encode_bitmaps(b),
            });
        }
    }
    exts.extend(x.unknown.iter().cloned());
    let ext_bytes = extension::encode_all(&exts);

    let head = h.encoded_len();
    let backing = x.backing_file.as_deref().unwrap_or("");
    let total = head + ext_bytes.len() + backing.len();
    if total > cs {
        return Err(Error::InvalidArgument(format!(
            "the header, its extensions and the backing file name need {total} bytes, more than one cluster ({cs})"
        )));
    }
    if backing.is_empty() {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    } else {
        h.backing_file_offset = (head + ext_bytes.len()) as u64;
        h.backing_file_size = backing.len() as u32;
    }
    let mut out = vec![0u8; cs];
    h.write(&mut out);
    out[head..head + ext_bytes.len()].copy_from_slice(&ext_bytes);
    let at = head + ext_bytes.len();
    out[at..at + backing.len()].copy_from_slice(backing.as_bytes());
    Ok(out)
}
