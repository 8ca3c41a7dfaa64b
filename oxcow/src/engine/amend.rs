//! Changing an existing qcow2 image's options in place (`qemu-img amend`): the
//! compatibility level both ways, the refcount width, lazy refcounts, the external
//! data file's name and raw flag, and the checks
//! QEMU makes on what cannot be changed.
//!
//! Every step works on the file itself, one crash-safe change after another:
//! - new refcount structures (another width, or a recount) are written whole past the
//!   end of the file and synced before one header write switches to them; the old
//!   ones simply become free clusters;
//! - the downgrade sets the dirty bit first (a crash then leaves an image that any
//!   read-write open repairs), turns zero clusters into what v2 understands, recounts
//!   every reference into new refcount structures and writes the v2 header last.

use super::meta::ImageMeta;
use super::refcounts::{metadata_size, REFTABLE_OFFSET_MASK};
use super::{EngineOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::be::{put_u64, u64_table};
use crate::format::cluster0::{self, HeaderExtras};
use crate::format::header::{compat, incompat, CompressionType, Header, V2_HEADER_LEN};
use crate::format::l1l2::{self, COMPRESSED, COPIED, ZERO};
use crate::format::{refcount, OFFSET_MASK};
use crate::storage::Storage;
use std::sync::Arc;

/// What to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    pub refcount_bits: Option<u64>,
    pub lazy_refcounts: Option<bool>,
    /// Must name the current backing file (QEMU refuses changes: use rebase).
    pub backing_file: Option<String>,
    /// Must name the current backing format.
    pub backing_format: Option<String>,
    /// A new name for the external data file (only for images that have one; empty
    /// removes the name, as QEMU does).
    pub data_file: Option<String>,
    /// Can be turned off, not on.
    pub data_file_raw: Option<bool>,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

const V3_HINT: &str = "(use compat=1.1 or greater)";

/// The checks qemu-img makes before it changes anything, with its messages, in the
/// order of qcow2_amend_options.
pub fn check(meta: &ImageMeta, o: &AmendOptions) -> Result<()> {
    let h = &meta.header;
    if let Some(v) = o.version {
        if v != 2 && v != 3 {
            return Err(invalid("Unknown compatibility level"));
        }
    }
    if let Some(b) = o.refcount_bits {
        if b == 0 || b > 64 || !b.is_power_of_two() {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
    }
    if o.data_file.is_some() && !h.has_data_file() {
        return Err(invalid(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if o.data_file_raw == Some(true) && !h.data_file_raw() {
        return Err(invalid("data-file-raw cannot be set on existing images"));
    }
    if (o.backing_file.is_some() || o.backing_format.is_some())
        && (o.backing_file != meta.backing_file || o.backing_format != meta.backing_format)
    {
        return Err(invalid(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    let version = o.version.unwrap_or(h.version);
    let lazy = o.lazy_refcounts.unwrap_or(h.lazy_refcounts());
    if lazy && !h.lazy_refcounts() && version < 3 {
        return Err(invalid(format!(
            "Lazy refcounts only supported with compatibility level 1.1 and above {V3_HINT}"
        )));
    }
    let bits = o.refcount_bits.unwrap_or(h.refcount_bits() as u64);
    if bits != h.refcount_bits() as u64 && version < 3 && bits != 16 {
        return Err(invalid(format!(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above {V3_HINT}"
        )));
    }
    if version < h.version {
        if bits != 16 {
            return Err(invalid("compat=0.10 requires refcount_bits=16"));
        }
        if h.has_data_file() {
            return Err(invalid("Cannot downgrade an image with a data file"));
        }
        let left = h.incompatible_features & !(incompat::DIRTY | incompat::COMPRESSION);
        if left != 0 {
            return Err(invalid(format!(
                "Cannot downgrade an image with incompatible features {left:#x} set"
            )));
        }
    }
    Ok(())
}

/// Applies `o` to the image in `io` (its external data file, if any, in `data`), in
/// QEMU's order: upgrade, lazy refcounts, refcount width, downgrade last.
pub fn amend(
    io: &Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    o: &AmendOptions,
) -> Result<()> {
    let meta = load(io.as_ref())?;
    check(&meta, o)?;
    if meta.header.is_dirty() {
        // Refcounts left behind by lazy refcounts: recount before anything else.
        recount(io, &data, meta.header.refcount_order)?;
    }
    let old_version = meta.header.version;
    let version = o.version.unwrap_or(old_version);
    if version > old_version {
        let mut m = load(io.as_ref())?;
        m.header.version = version;
        write_header(io.as_ref(), &mut m.header.clone(), extras_of(&m))?;
    }
    if let Some(lazy) = o.lazy_refcounts {
        let m = load(io.as_ref())?;
        if lazy != m.header.lazy_refcounts() {
            let mut h = m.header.clone();
            if lazy {
                h.compatible_features |= compat::LAZY_REFCOUNTS;
            } else {
                h.compatible_features &= !compat::LAZY_REFCOUNTS;
            }
            write_header(io.as_ref(), &mut h, extras_of(&m))?;
        }
    }
    if o.data_file.is_some() || o.data_file_raw == Some(false) {
        let m = load(io.as_ref())?;
        let mut h = m.header.clone();
        let mut x = extras_of(&m);
        if let Some(name) = &o.data_file {
            x.data_file = (!name.is_empty()).then(|| name.clone());
        }
        if o.data_file_raw == Some(false) {
            h.autoclear_features &= !crate::format::header::autoclear::DATA_FILE_RAW;
        }
        write_header(io.as_ref(), &mut h, x)?;
    }
    if let Some(bits) = o.refcount_bits {
        let m = load(io.as_ref())?;
        if bits != m.header.refcount_bits() as u64 {
            recount(io, &data, bits.trailing_zeros())?;
        }
    }
    if version < old_version {
        downgrade(io, &data)?;
    }
    Ok(())
}

fn load(io: &dyn Storage) -> Result<ImageMeta> {
    let m = ImageMeta::load(io)?;
    m.check_readable()?;
    if m.header.is_corrupt() {
        return Err(Error::Unsupported(
            "qcow2: Image is corrupt; cannot be opened read/write".into(),
        ));
    }
    if m.header.crypt_method != crate::format::header::CryptMethod::None {
        return Err(Error::Unsupported(
            "Encrypted images are not supported yet by oxcow".into(),
        ));
    }
    Ok(m)
}

/// The header extensions of an image as they will be rewritten.
fn extras_of(m: &ImageMeta) -> HeaderExtras {
    super::writestate::extras_of(m)
}

/// Rewrites cluster 0 with header `h` (its refcount fields as given) and `x`, then
/// syncs.
fn write_header(io: &dyn Storage, h: &mut Header, x: HeaderExtras) -> Result<()> {
    let c0 = cluster0::encode(h, &x)?;
    io.write_at(&c0, 0)?;
    io.flush()?;
    Ok(())
}

/// The references every host cluster has (counted from all the metadata, the current
/// refcount structures left out), as a read-only open of the file sees them.
fn count_without_refcounts(
    io: &Arc<dyn Storage>,
    data: &Option<Arc<dyn Storage>>,
    meta: ImageMeta,
) -> Result<Vec<u32>> {
    let h = meta.header.clone();
    let cs = h.cluster_size();
    let q = Qcow2::open(
        meta,
        io.clone(),
        data.clone(),
        None,
        &EngineOptions {
            l2_cache_bytes: None,
            writable: false,
            check: false,
        },
    )?;
    let mut counts = q.count_references()?;
    let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
    io.read_at(&mut raw, h.refcount_table_offset)?;
    let mut drop_one = |off: u64| {
        if let Some(c) = counts.get_mut((off / cs) as usize) {
            *c = c.saturating_sub(1);
        }
    };
    for i in 0..h.refcount_table_clusters as u64 {
        drop_one(h.refcount_table_offset + i * cs);
    }
    for e in u64_table(&raw) {
        let off = e & REFTABLE_OFFSET_MASK;
        if off != 0 {
            drop_one(off);
        }
    }
    Ok(counts)
}

/// Writes new refcount structures of width 2^`order` bits holding the true count of
/// every cluster past the end of the file, syncs, then switches the header to them
/// (and to the width) in one write. The old structures become free clusters.
fn recount(io: &Arc<dyn Storage>, data: &Option<Arc<dyn Storage>>, order: u32) -> Result<()> {
    let meta = load(io.as_ref())?;
    let mut h = meta.header.clone();
    let x = extras_of(&meta);
    let cs = h.cluster_size();
    let bits = h.cluster_bits;
    let counts = count_without_refcounts(io, data, meta.clone())?;
    let max = refcount::max_value(order);
    if let Some((c, n)) = counts.iter().enumerate().find(|(_, &n)| n as u64 > max) {
        return Err(invalid(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {n}",
            1u32 << order,
            (c as u64) << bits
        )));
    }
    let end = io.len()?.div_ceil(cs).max(counts.len() as u64);
    let (blocks, table) = metadata_size(end, bits, order, false);
    let table = table.max(1);
    let table_offset = end * cs;
    let first_block = end + table;
    let total = first_block + blocks;
    let per_block = refcount::entries_per_block(bits, order);
    if table * cs > crate::format::MAX_REFTABLE_BYTES {
        return Err(invalid("the refcount table would exceed 8 MiB"));
    }
    let mut entries = vec![0u8; (table * cs) as usize];
    let mut buf = vec![0u8; cs as usize];
    for b in 0..blocks {
        buf.fill(0);
        for j in 0..per_block {
            let c = b * per_block + j;
            if c >= total {
                break;
            }
            let n = if c >= end {
                1
            } else {
                counts.get(c as usize).copied().unwrap_or(0) as u64
            };
            if n != 0 {
                refcount::set(&mut buf, order, j as usize, n);
            }
        }
        let at = (first_block + b) * cs;
        io.write_at(&buf, at)?;
        put_u64(&mut entries, (b * 8) as usize, at);
    }
    io.write_at(&entries, table_offset)?;
    io.flush()?;
    h.refcount_order = order;
    h.refcount_table_offset = table_offset;
    h.refcount_table_clusters = table as u32;
    h.incompatible_features &= !incompat::DIRTY;
    write_header(io.as_ref(), &mut h, x)
}

/// compat=1.1 -> 0.10: zero clusters become what v2 reads the same way, compatible and
/// autoclear features are dropped (persistent bitmaps with them: their clusters are
/// freed), the compression type goes back to zlib (refused when compressed clusters
/// use another), and the header becomes a version 2 header.
fn downgrade(io: &Arc<dyn Storage>, data: &Option<Arc<dyn Storage>>) -> Result<()> {
    let meta = load(io.as_ref())?;
    let mut h = meta.header.clone();
    if h.compression_type != CompressionType::Zlib && has_compressed_clusters(io, &meta)? {
        return Err(invalid(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }
    // From here on, a crash leaves an image whose refcounts a read-write open repairs.
    h.incompatible_features |= incompat::DIRTY;
    let x = extras_of(&meta);
    write_header(io.as_ref(), &mut h, x.clone())?;

    expand_zero_clusters(io, data, &meta)?;

    let mut h2 = h.clone();
    h2.compatible_features = 0;
    h2.autoclear_features = 0;
    h2.incompatible_features &= !incompat::COMPRESSION;
    h2.compression_type = CompressionType::Zlib;
    let mut x2 = x;
    x2.bitmaps = None;
    // The refcounts from the metadata as it now is (the bitmaps no longer counted).
    write_header(io.as_ref(), &mut h2, x2.clone())?;
    recount(io, data, h2.refcount_order)?;

    let m = load(io.as_ref())?;
    let mut v2 = m.header.clone();
    v2.version = 2;
    v2.header_length = V2_HEADER_LEN;
    v2.incompatible_features = 0;
    v2.unknown_tail.clear();
    write_header(io.as_ref(), &mut v2, x2)
}

/// Every L1 table of the image: the active one and each snapshot's.
fn all_l1_tables(io: &dyn Storage, meta: &ImageMeta) -> Result<Vec<Vec<u64>>> {
    let mut out = Vec::new();
    let h = &meta.header;
    let mut tables = vec![(h.l1_table_offset, h.l1_size)];
    tables.extend(
        meta.snapshots
            .iter()
            .map(|s| (s.l1_table_offset, s.l1_size)),
    );
    for (off, size) in tables {
        let mut raw = vec![0u8; size as usize * 8];
        io.read_at(&mut raw, off)?;
        out.push(u64_table(&raw));
    }
    Ok(out)
}

/// The distinct L2 tables the L1 tables point to, in order of first appearance.
fn l2_tables(meta: &ImageMeta, l1s: &[Vec<u64>]) -> Result<Vec<u64>> {
    let cs = meta.header.cluster_size();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for l1 in l1s {
        for &e in l1 {
            let l2 = l1l2::l1_l2_offset(e);
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) || l2.saturating_add(cs) > meta.file_len {
                return Err(Error::corrupt(
                    format!("L2 table at {l2:#x} is unaligned or past the end of the file"),
                    l2,
                ));
            }
            if seen.insert(l2) {
                out.push(l2);
            }
        }
    }
    Ok(out)
}

fn has_compressed_clusters(io: &Arc<dyn Storage>, meta: &ImageMeta) -> Result<bool> {
    let cs = meta.header.cluster_size();
    let l1s = all_l1_tables(io.as_ref(), meta)?;
    let mut buf = vec![0u8; cs as usize];
    for l2 in l2_tables(meta, &l1s)? {
        io.read_at(&mut buf, l2)?;
        if u64_table(&buf).iter().any(|e| e & COMPRESSED != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// QEMU's qcow2_expand_zero_clusters: a zero cluster with a host cluster of its own
/// becomes that cluster filled with zeros; one without (or whose host cluster is
/// shared) becomes unallocated when nothing is below
/// the image, or a new zero-filled cluster (appended to the file) when a backing
/// file would show through. Standard L2 entries only (extended L2 images cannot be
/// downgraded). COPIED is set when the cluster will have one reference.
fn expand_zero_clusters(
    io: &Arc<dyn Storage>,
    data: &Option<Arc<dyn Storage>>,
    meta: &ImageMeta,
) -> Result<()> {
    let cs = meta.header.cluster_size();
    let backing = meta.backing_file.is_some();
    let refs = count_without_refcounts(io, data, meta.clone())?;
    let refs_of = |off: u64| refs.get((off / cs) as usize).copied().unwrap_or(0);
    let l1s = all_l1_tables(io.as_ref(), meta)?;
    let zeros = vec![0u8; cs as usize];
    let mut next = io.len()?.div_ceil(cs) * cs;
    let mut buf = vec![0u8; cs as usize];
    for l2 in l2_tables(meta, &l1s)? {
        io.read_at(&mut buf, l2)?;
        let mut changed = false;
        for (i, e) in u64_table(&buf).into_iter().enumerate() {
            if e & COMPRESSED != 0 || e & ZERO == 0 {
                continue;
            }
            let host = e & OFFSET_MASK;
            if host != 0 && (!host.is_multiple_of(cs) || host.saturating_add(cs) > meta.file_len) {
                return Err(Error::corrupt(
                    format!("zero cluster at host offset {host:#x} in the L2 table at {l2:#x} is unaligned or past the end of the file"),
                    l2,
                ));
            }
            // A host cluster with other references (a snapshot's data) must not be
            // overwritten: the entry is treated as one without a host cluster.
            let new = if host != 0 && refs_of(host) == 1 {
                io.write_at(&zeros, host)?;
                host | COPIED
            } else if backing {
                let at = next;
                next += cs;
                io.write_at(&zeros, at)?;
                at | if refs_of(l2) == 1 { COPIED } else { 0 }
            } else {
                0
            };
            put_u64(&mut buf, i * 8, new);
            changed = true;
        }
        if changed {
            io.flush()?;
            io.write_at(&buf, l2)?;
        }
    }
    io.flush()?;
    Ok(())
}
