//! Creating a new qcow2 image on empty storage, with the layout QEMU gives it: the
//! header in cluster 0, the refcount table in cluster 1, the first refcount block in
//! cluster 2, and the L1 table allocated next (first fit), then the header rewritten
//! whole with its extensions.

use super::meta::ImageMeta;
use super::refcounts::Refcounts;
use super::{EngineOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::be::put_u64;
use crate::format::cluster0::{self, HeaderExtras};
use crate::format::header::{
    autoclear, compat, incompat, CompressionType, CryptMethod, Header,
    V3_HEADER_LEN_WITH_COMPRESSION,
};
use crate::format::{MAX_BACKING_NAME, MAX_L1_BYTES};
use crate::storage::Storage;
use std::sync::Arc;

/// How much of a new image is allocated up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::InvalidArgument(format!(
                "Invalid parameter '{other}'"
            ))),
        }
    }
}

/// Every qcow2 creation option qemu-img knows (but encryption).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub preallocation: Preallocation,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// The checks qemu-img makes before creating anything, in QEMU's order
    /// (qcow2_co_create) and with its messages.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        let v3 = "use version=v3 or greater";
        let cs = self.cluster_size;
        if !self.size.is_multiple_of(512) {
            return bad("Image size must be a multiple of 512 bytes");
        }
        if self.version != 2 && self.version != 3 {
            return bad("Invalid compatibility level");
        }
        let v2 = self.version == 2;
        if self.extended_l2 && v2 {
            return bad(&format!("Extended L2 entries are only supported with compatibility level 1.1 and above ({v3})"));
        }
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if self.extended_l2 && cs < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return bad("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if self.lazy_refcounts && v2 {
            return bad(&format!(
                "Lazy refcounts only supported with compatibility level 1.1 and above ({v3})"
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if v2 && self.refcount_bits != 16 {
            return bad(&format!("Different refcount widths than 16 bits require compatibility level 1.1 or above ({v3})"));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.data_file.is_some() && v2 {
            return bad(&format!("External data files are only supported with compatibility level 1.1 and above ({v3})"));
        }
        if self.compression_type != CompressionType::Zlib && v2 {
            return bad(&format!("Non-zlib compression type is only supported with compatibility level 1.1 and above ({v3})"));
        }
        let l2_entry = if self.extended_l2 { 16 } else { 8 };
        let coverage = cs / l2_entry * cs;
        if self.size.div_ceil(coverage) * 8 > MAX_L1_BYTES {
            return bad(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            );
        }
        if let Some(b) = &self.backing_file {
            if b.len() > MAX_BACKING_NAME as usize {
                return bad("Backing file name too long");
            }
        }
        Ok(())
    }
}

/// Formats empty `io` as a qcow2 image and preallocates as asked. `data_file` is the
/// external data file the options name (created by the caller).
pub fn create_on(
    io: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    opts: &CreateOptions,
) -> Result<()> {
    format_qcow2(io.as_ref(), opts)?;
    // A raw data file must be readable without the qcow2 metadata, so QEMU maps the
    // whole disk up front for it.
    let mode = if opts.data_file_raw && opts.preallocation == Preallocation::Off {
        Preallocation::Metadata
    } else {
        opts.preallocation
    };
    if mode == Preallocation::Off {
        return Ok(());
    }
    let meta = ImageMeta::load(io.as_ref())?;
    let q = Qcow2::open(
        meta,
        io,
        data_file,
        None,
        &EngineOptions {
            l2_cache_bytes: None,
            writable: true,
            check: false,
        },
    )?;
    q.preallocate(mode, 0, opts.size)?;
    q.flush()
}

/// Formats empty `io` as a qcow2 image without preallocation. The external data
/// file, when named, must be created by the caller.
pub fn format_qcow2(io: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let order = opts.refcount_bits.trailing_zeros();
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: CryptMethod::None,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: order,
        header_length: if opts.version >= 3 {
            V3_HEADER_LEN_WITH_COMPRESSION
        } else {
            72
        },
        compression_type: opts.compression_type,
        unknown_tail: Vec::new(),
    };
    if opts.lazy_refcounts {
        h.compatible_features |= compat::LAZY_REFCOUNTS;
    }
    if opts.data_file.is_some() {
        h.incompatible_features |= incompat::DATA_FILE;
    }
    if opts.data_file_raw {
        h.autoclear_features |= autoclear::DATA_FILE_RAW;
    }
    if opts.compression_type != CompressionType::Zlib {
        h.incompatible_features |= incompat::COMPRESSION;
    }
    if opts.extended_l2 {
        h.incompatible_features |= incompat::EXTENDED_L2;
    }

    // A minimal image: header, a one-cluster refcount table, one refcount block.
    let mut c0 = vec![0u8; cs as usize];
    h.write(&mut c0);
    io.write_at(&c0, 0)?;
    let mut rt = vec![0u8; 2 * cs as usize];
    put_u64(&mut rt, 0, 2 * cs);
    io.write_at(&rt, cs)?;

    let mut rc = Refcounts::load(io, cluster_bits, order, cs, 1)?;
    rc.alloc(io, 3 * cs)?;

    // The L1 table, exactly as large as the disk needs.
    let l2_entry = if opts.extended_l2 { 16 } else { 8 };
    let l1_size = opts.size.div_ceil(cs / l2_entry * cs);
    if l1_size > 0 {
        let l1_bytes = l1_size * 8;
        let l1_offset = rc.alloc(io, l1_bytes)?;
        rc.flush_blocks(io)?;
        io.write_at(&vec![0u8; l1_bytes as usize], l1_offset)?;
        h.l1_table_offset = l1_offset;
        h.l1_size = l1_size as u32;
    }
    rc.flush_blocks(io)?;
    h.size = opts.size;
    h.refcount_table_offset = rc.table_offset();
    h.refcount_table_clusters = rc.table_clusters();

    let extras = HeaderExtras {
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        ..Default::default()
    };
    let c0 = cluster0::encode(&mut h, &extras)?;
    io.write_at(&c0, 0)?;
    io.flush()?;
    Ok(())
}
