//! Reading an image's metadata at open: the header, its extensions, the feature checks,
//! the snapshot table and the bitmap directory. Everything here is validated before any
//! allocation sized by it.

use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry};
use crate::format::extension::{
    self, BitmapsExt, CryptoHeaderExt, Extension, FeatureKind, FeatureName,
};
use crate::format::header::{autoclear, incompat, CryptMethod, Header};
use crate::format::snapshot::SnapshotEntry;
use crate::format::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES, MIN_CLUSTER_BITS};
use crate::storage::Storage;

/// What an image's first cluster and the tables it points to say.
#[derive(Debug, Clone)]
pub struct ImageMeta {
    pub header: Header,
    /// Every extension in file order, known and unknown.
    pub extensions: Vec<Extension>,
    pub feature_names: Vec<FeatureName>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub bitmaps_ext: Option<BitmapsExt>,
    pub crypto_header: Option<CryptoHeaderExt>,
    pub snapshots: Vec<SnapshotEntry>,
    /// Bytes the snapshot table takes in the file.
    pub snapshots_len: u64,
    pub bitmaps: Vec<BitmapEntry>,
    pub file_len: u64,
}

impl ImageMeta {
    pub fn load(storage: &dyn Storage) -> Result<ImageMeta> {
        Self::load_with(storage, false)
    }

    /// `check`: opened to be checked (QEMU's check mode), where a snapshot table
    /// that cannot be loaded is no error: the check reads it itself and reports
    /// what is wrong with it (`engine/snapcheck.rs`).
    pub fn load_with(storage: &dyn Storage, check: bool) -> Result<ImageMeta> {
        let file_len = storage.len()?;
        // Learn the cluster size from the fixed fields, then read cluster 0 whole; the
        // full parse below reports any field that is wrong.
        let mut first = [0u8; 24];
        storage.read_at(&mut first, 0)?;
        let bits = crate::format::be::u32_at(&first, 20);
        let cluster_size = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            1u64 << bits
        } else {
            4096
        };
        let mut c0 = vec![0u8; cluster_size.min(file_len) as usize];
        storage.read_at(&mut c0, 0)?;
        let header = Header::parse_with(&c0, !check)?;

        let unknown = header.incompatible_features & !incompat::KNOWN;
        let ext_start = header.extensions_offset();
        let ext_end = if header.backing_file_offset > ext_start {
            header.backing_file_offset
        } else {
            header.cluster_size()
        };
        let extensions = extension::parse_all(&c0, ext_start, ext_end)?;

        let mut meta = ImageMeta {
            header,
            extensions,
            feature_names: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps_ext: None,
            crypto_header: None,
            snapshots: Vec::new(),
            snapshots_len: 0,
            bitmaps: Vec::new(),
            file_len,
        };
        for e in &meta.extensions {
            match e.kind {
                extension::FEATURE_TABLE => {
                    meta.feature_names = extension::parse_feature_table(&e.data)
                }
                extension::BACKING_FORMAT => {
                    meta.backing_format = Some(extension::parse_name("backing format", &e.data)?)
                }
                extension::DATA_FILE => {
                    meta.data_file = Some(extension::parse_name("data file name", &e.data)?)
                }
                extension::BITMAPS => meta.bitmaps_ext = Some(extension::parse_bitmaps(&e.data)?),
                extension::CRYPTO_HEADER => {
                    meta.crypto_header = Some(extension::parse_crypto_header(&e.data)?)
                }
                _ => {}
            }
        }
        if unknown != 0 {
            return Err(Error::UnknownFeatures(meta.describe_incompatible(unknown)));
        }
        let h = &meta.header;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let end = start + h.backing_file_size as usize;
            if end > c0.len() {
                return Err(Error::header(
                    "backing_file_offset",
                    "the backing file name runs past the end of the file",
                ));
            }
            let name = std::str::from_utf8(&c0[start..end])
                .map_err(|_| Error::header("backing file name", "not valid UTF-8"))?;
            meta.backing_file = Some(name.to_string());
        }
        if h.has_data_file() && meta.data_file.is_none() {
            return Err(Error::header(
                "data file",
                "the external data file bit is set but no data file name is given",
            ));
        }
        if h.l1_size > 0 && h.l1_table_offset + h.l1_size as u64 * 8 > file_len {
            return Err(Error::corrupt(
                "the L1 table runs past the end of the file",
                h.l1_table_offset,
            ));
        }
        (meta.snapshots, meta.snapshots_len) = match load_snapshots(storage, &meta.header, file_len)
        {
            Ok(t) => t,
            Err(_) if check => (Vec::new(), 0),
            Err(e) => return Err(e),
        };
        if meta.header.autoclear_features & autoclear::BITMAPS != 0 {
            if let Some(b) = meta.bitmaps_ext {
                meta.bitmaps = load_bitmaps(storage, &meta.header, &b, file_len)?;
            }
        }
        Ok(meta)
    }

    /// Refuses what the metadata describes but cannot be read: encrypted images (their
    /// metadata loads, for `info`; their data does not), and a raw external data file
    /// claimed without an external data file (QEMU refuses those too).
    pub fn check_readable(&self) -> Result<()> {
        if self.header.crypt_method != CryptMethod::None {
            return Err(Error::Unsupported(
                "Encrypted images are not supported yet by oxcow".to_string(),
            ));
        }
        if self.header.data_file_raw() && !self.header.has_data_file() {
            return Err(Error::InvalidArgument(
                "data-file-raw requires a data file".to_string(),
            ));
        }
        Ok(())
    }

    /// Names the incompatible features in `bits`, from the feature name table.
    pub fn describe_incompatible(&self, bits: u64) -> String {
        (0..64)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| {
                self.feature_names
                    .iter()
                    .find(|f| f.kind == FeatureKind::Incompatible && f.bit as u32 == b)
                    .map(|f| f.name.clone())
                    .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << b))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn load_snapshots(
    storage: &dyn Storage,
    h: &Header,
    file_len: u64,
) -> Result<(Vec<SnapshotEntry>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    if h.snapshots_offset >= file_len {
        return Err(Error::corrupt(
            "the snapshot table starts past the end of the file",
            h.snapshots_offset,
        ));
    }
    // Entries are variable-sized: read what the file can hold, up to the cap.
    let len = (file_len - h.snapshots_offset).min(MAX_SNAPSHOT_TABLE_BYTES) as usize;
    let mut buf = vec![0u8; len];
    storage.read_at(&mut buf, h.snapshots_offset)?;
    let (snaps, table_len) = SnapshotEntry::parse_table_with_len(&buf, h.nb_snapshots)?;
    for s in &snaps {
        if s.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::header(
                "snapshot table",
                format!(
                    "snapshot {} has an L1 table of {} entries, too large",
                    s.id, s.l1_size
                ),
            ));
        }
        if s.l1_table_offset % h.cluster_size() != 0 {
            return Err(Error::header(
                "snapshot table",
                format!(
                    "snapshot {} has an unaligned L1 table offset {:#x}",
                    s.id, s.l1_table_offset
                ),
            ));
        }
    }
    Ok((snaps, table_len as u64))
}

fn load_bitmaps(
    storage: &dyn Storage,
    h: &Header,
    ext: &BitmapsExt,
    file_len: u64,
) -> Result<Vec<BitmapEntry>> {
    if ext.nb_bitmaps == 0 {
        return Ok(Vec::new());
    }
    if ext.nb_bitmaps > bitmap::MAX_BITMAPS {
        return Err(Error::header(
            "bitmaps extension",
            format!("{} bitmaps is too many", ext.nb_bitmaps),
        ));
    }
    if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES {
        return Err(Error::header(
            "bitmaps extension",
            "the bitmap directory is too large",
        ));
    }
    if !ext.directory_offset.is_multiple_of(h.cluster_size()) || ext.directory_offset == 0 {
        return Err(Error::header(
            "bitmaps extension",
            format!(
                "bitmap directory offset {:#x} is not aligned",
                ext.directory_offset
            ),
        ));
    }
    if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
        return Err(Error::corrupt(
            "the bitmap directory runs past the end of the file",
            ext.directory_offset,
        ));
    }
    let mut buf = vec![0u8; ext.directory_size as usize];
    storage.read_at(&mut buf, ext.directory_offset)?;
    BitmapEntry::parse_directory(&buf, ext.nb_bitmaps)
}
