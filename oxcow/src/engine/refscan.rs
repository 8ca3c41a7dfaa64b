//! Counting references: walks every structure of an image (header, L1 and L2 tables
//! of the active state and of every snapshot, data and compressed clusters, the
//! refcount table and blocks, the snapshot table, the bitmap directory and tables,
//! the encryption header) and counts how often each host cluster is used, into one
//! flat array (QEMU's "in-memory refcount table"). While walking, it reports what is
//! wrong in the entries it reads, in qemu-img check's words. `engine/check.rs`
//! compares the counts against the refcounts.
//!
//! Tables are read in large sequential chunks (runs of L2 tables that follow each
//! other in the file are read with one `pread`), and nothing is allocated per cluster.

use super::check::{CheckReport, Fix};
use super::Qcow2;
use crate::error::Result;
use crate::format::be::{u64_at, u64_table};
use crate::format::l1l2::{COMPRESSED, COPIED, L1_RESERVED, ZERO};
use crate::format::OFFSET_MASK;
use crate::storage::Storage;

/// Reserved bits of a standard (uncompressed) L2 entry.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
pub(crate) const REFTABLE_RESERVED: u64 = 0x1ff;
/// Reserved bits of a bitmap table entry, and its "all ones" flag.
const BITMAP_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const BITMAP_ENTRY_ALL_ONES: u64 = 1;
/// The most clusters a repair extends the file by, in all (for refcount blocks past
/// its end). Every cluster of the file costs the check about 12 bytes of counts (24
/// while a rebuild counts again), so this keeps a damaged refcount table entry from
/// costing gigabytes of memory; QEMU has no such bound (its array grows until an
/// allocation fails). Past it the entry is reported ("could not resize image") and
/// the refcount structure rebuilt without it.
const MAX_GROWTH: u64 = 1 << 20;
/// The most L2 table bytes read at once.
const L2_BATCH_BYTES: u64 = 8 << 20;

/// How many references each host cluster has, as the metadata implies them.
#[derive(Debug)]
pub(crate) struct Imrt {
    counts: Vec<u32>,
    /// The largest refcount the image's refcount width holds (capped to the array).
    max: u64,
    cluster_bits: u32,
    /// The image file's length: references further than one cluster past it are
    /// errors, not counted.
    pub file_len: u64,
}

impl Imrt {
    pub fn new(file_len: u64, cluster_bits: u32, refcount_order: u32) -> Imrt {
        let n = file_len.div_ceil(1 << cluster_bits) as usize;
        Imrt {
            counts: vec![0; n],
            max: crate::format::refcount::max_value(refcount_order).min(u32::MAX as u64),
            cluster_bits,
            file_len,
        }
    }

    /// Clusters the array covers (QEMU's `nb_clusters`).
    /// Counts up to `u32::MAX` whatever the refcount width (for a caller that
    /// changes the width).
    pub fn unlimited(&mut self) {
        self.max = u32::MAX as u64;
    }

    pub fn into_counts(self) -> Vec<u32> {
        self.counts
    }

    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    pub fn get(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0) as u64
    }

    pub fn set(&mut self, cluster: u64, value: u32) {
        self.grow(cluster + 1);
        self.counts[cluster as usize] = value;
    }

    pub fn grow(&mut self, clusters: u64) {
        if clusters > self.len() {
            self.counts.resize(clusters as usize, 0);
        }
    }

    /// Counts one reference to every cluster touching `offset..offset+size`.
    pub fn inc(&mut self, res: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = 1u64 << self.cluster_bits;
        // The last cluster of an image may be partly in the file; a reference a whole
        // cluster or more past the end is not.
        let end = offset.saturating_add(size);
        if end >= self.file_len.saturating_add(cs) {
            res.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            res.corruptions += 1;
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        self.grow(last + 1);
        for k in first..=last {
            let r = &mut self.counts[k as usize];
            if *r as u64 >= self.max {
                res.msg(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    k << self.cluster_bits
                ));
                res.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
                res.corruptions += 1;
                continue;
            }
            *r += 1;
        }
    }
}

/// How many L2 tables from L1 index `i` on lie one after the other in the file (at
/// most 8 MiB of them): they are read with one `pread`.
pub(crate) fn l2_run(l1: &[u64], i: usize, cs: u64) -> usize {
    let l2 = l1[i] & OFFSET_MASK;
    let mut n = 1;
    while i + n < l1.len()
        && (n as u64 + 1) * cs <= L2_BATCH_BYTES
        && l1[i + n] & OFFSET_MASK == l2 + n as u64 * cs
    {
        n += 1;
    }
    n
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
pub(crate) fn read_padded(io: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    io.read_at(buf, offset)?;
    Ok(())
}

/// The kinds of L2 entries, as QEMU tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

pub(crate) fn cluster_type(entry: u64, extended: bool, data_file: bool) -> ClusterType {
    if entry & COMPRESSED != 0 {
        ClusterType::Compressed
    } else if entry & ZERO != 0 && !extended {
        if entry & OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry & OFFSET_MASK == 0 {
        if data_file && entry & COPIED != 0 {
            ClusterType::Normal
        } else {
            ClusterType::Unallocated
        }
    } else {
        ClusterType::Normal
    }
}

/// One counting pass over an image.
pub(crate) struct Scan<'a> {
    pub q: &'a Qcow2,
    pub imrt: Imrt,
    pub fix: Fix,
    /// The refcount structures must be rebuilt from scratch.
    pub rebuild: bool,
}

/// What the walk needs of the refcount table.
pub(crate) struct RefTable {
    /// Where the active L1 table is (the writer's header may be newer than `meta`).
    pub l1_offset: u64,
    pub offset: u64,
    pub entries: Vec<u64>,
    /// The snapshot table: where, how long, its entries (the writer's when the
    /// image is writable: snapshots change while it is open).
    pub snapshots_offset: u64,
    pub snapshots_len: u64,
    pub snapshots: Vec<crate::format::snapshot::SnapshotEntry>,
    /// The bitmap directory and its entries, when the bitmaps extension is valid (a
    /// writable image rewrites its directory while open: read from the disk then).
    pub bitmaps: Option<(
        crate::format::extension::BitmapsExt,
        Vec<crate::format::bitmap::BitmapEntry>,
    )>,
}

impl<'a> Scan<'a> {
    fn io(&self) -> &'a dyn Storage {
        self.q.storage.as_ref()
    }

    fn cluster_size(&self) -> u64 {
        self.q.meta.header.cluster_size()
    }

    /// QEMU's calculate_refcounts: count every reference of the image, reporting the
    /// entries that are wrong on the way.
    pub fn calculate(&mut self, res: &mut CheckReport, reftable: &RefTable) -> Result<()> {
        let q = self.q;
        let cs = self.cluster_size();
        // The header.
        self.imrt.inc(res, 0, cs);
        // The active L1 table.
        let l1 = q.l1.read().clone();
        self.check_l1(res, reftable.l1_offset, &l1, true)?;
        // Snapshots.
        let snaps = &reftable.snapshots;
        if q.data_file.is_some() && !snaps.is_empty() {
            res.msg(format!(
                "ERROR {} snapshots in image with data file",
                snaps.len()
            ));
            res.corruptions += 1;
        }
        for s in snaps {
            if !s.l1_table_offset.is_multiple_of(cs) {
                res.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_table_offset
                ));
                res.corruptions += 1;
                continue;
            }
            if s.l1_size as u64 * 8 > crate::format::MAX_L1_BYTES {
                res.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                res.corruptions += 1;
                continue;
            }
            let mut raw = vec![0u8; s.l1_size as usize * 8];
            if read_padded(self.io(), &mut raw, s.l1_table_offset).is_err() {
                res.msg("ERROR: I/O error in check_refcounts_l1");
                res.check_errors += 1;
                continue;
            }
            self.check_l1(res, s.l1_table_offset, &u64_table(&raw), false)?;
        }
        if !snaps.is_empty() {
            self.imrt
                .inc(res, reftable.snapshots_offset, reftable.snapshots_len);
        }
        // The refcount table.
        self.imrt
            .inc(res, reftable.offset, reftable.entries.len() as u64 * 8);
        // The encryption header.
        if let Some(c) = q.meta.crypto_header {
            self.imrt.inc(res, c.offset, c.length);
        }
        self.check_bitmaps(res, reftable)?;
        self.check_refblocks(res, reftable)
    }

    /// QEMU's check_refcounts_l1: the L1 table itself, then each L2 table. L2 tables
    /// that follow each other in the file are read together.
    fn check_l1(
        &mut self,
        res: &mut CheckReport,
        l1_offset: u64,
        l1: &[u64],
        active: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        self.imrt.inc(res, l1_offset, l1.len() as u64 * 8);
        let mut buf: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < l1.len() {
            let l2 = l1[i] & OFFSET_MASK;
            if l2 == 0 {
                i += 1;
                continue;
            }
            let n = l2_run(l1, i, cs);
            buf.resize(n * cs as usize, 0);
            let read_ok = read_padded(self.io(), &mut buf, l2).is_ok();
            for k in 0..n {
                let entry = l1[i + k];
                let l2_offset = entry & OFFSET_MASK;
                if entry & L1_RESERVED != 0 {
                    res.msg(format!(
                        "ERROR found L1 entry with reserved bits set: {entry:x}"
                    ));
                    res.corruptions += 1;
                }
                self.imrt.inc(res, l2_offset, cs);
                if !l2_offset.is_multiple_of(cs) {
                    res.msg(format!(
                        "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                    ));
                    res.corruptions += 1;
                }
                if !read_ok {
                    res.msg("ERROR: I/O error in check_refcounts_l2");
                    res.check_errors += 1;
                    return Ok(());
                }
                let table = &buf[k * cs as usize..(k + 1) * cs as usize];
                self.check_l2(res, table, l2_offset, active)?;
            }
            i += n;
        }
        Ok(())
    }

    /// QEMU's check_refcounts_l2: counts the clusters an L2 table references and
    /// checks its entries. With `active`, also the allocation statistics.
    fn check_l2(
        &mut self,
        res: &mut CheckReport,
        table: &[u8],
        l2_offset: u64,
        active: bool,
    ) -> Result<()> {
        let q = self.q;
        let h = &q.meta.header;
        let bits = h.cluster_bits;
        let cs = 1u64 << bits;
        let ext = h.has_extended_l2();
        let esize = h.l2_entry_size() as usize;
        let data_file = q.data_file.is_some();
        let x = 62 - (bits - 8);
        let coffset_mask = (1u64 << x) - 1;
        let csize_mask = (1u64 << (bits - 8)) - 1;
        let mut next_contiguous = 0u64;
        for i in 0..table.len() / esize {
            let entry = u64_at(table, i * esize);
            let bitmap = if ext { u64_at(table, i * esize + 8) } else { 0 };
            let ty = cluster_type(entry, ext, data_file);
            if ty != ClusterType::Compressed && entry & L2_STD_RESERVED != 0 {
                res.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    let coffset = entry & coffset_mask;
                    if entry & COPIED != 0 {
                        res.msg(format!(
                            "ERROR: coffset=0x{coffset:x}: copied flag must never be set for compressed clusters"
                        ));
                        res.corruptions += 1;
                    }
                    if data_file {
                        res.msg(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{entry:x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        res.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let sectors = ((entry >> x) & csize_mask) + 1;
                    let csize = sectors * 512 - (coffset & 511);
                    self.imrt.inc(res, coffset, csize);
                    if active {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        res.corruptions += 1;
                        res.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !offset.is_multiple_of(cs) {
                        res.corruptions += 1;
                        let contains_data = if ext {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            entry & ZERO == 0
                        };
                        if contains_data {
                            res.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            // Only the active tables are rewritten (QEMU rewrites
                            // snapshot tables too): a damaged snapshot L1 entry can make
                            // any cluster, guest data included, look like an L2 table,
                            // and rewriting it would destroy what it really holds.
                            let fix = self.fix.errors() && active;
                            res.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if fix { "Repairing" } else { "ERROR" }
                            ));
                            if fix {
                                // The cluster only reads as zeros: make it a plain zero
                                // cluster, which needs no host cluster.
                                let new = if ext { 0 } else { ZERO };
                                let at = l2_offset + (i * esize) as u64;
                                match self.io().write_at(&new.to_be_bytes(), at) {
                                    Ok(()) => {
                                        q.l2_cache.remove(l2_offset);
                                        res.corruptions -= 1;
                                        res.corruptions_fixed += 1;
                                        continue;
                                    }
                                    Err(e) => {
                                        res.msg(format!(
                                            "ERROR: Failed to overwrite L2 table entry: {}",
                                            crate::error::strerror(&e)
                                        ));
                                        res.check_errors += 1;
                                    }
                                }
                            }
                        }
                    }
                    if active {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    if !data_file {
                        self.imrt.inc(res, offset, cs);
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        res.corruptions += 1;
                        res.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// QEMU's qcow2_check_bitmaps_refcounts: the bitmap directory, each bitmap table
    /// and the clusters they point to (only while the bitmaps extension is valid).
    fn check_bitmaps(&mut self, res: &mut CheckReport, reftable: &RefTable) -> Result<()> {
        let Some((ext, entries)) = &reftable.bitmaps else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        self.imrt.inc(res, ext.directory_offset, ext.directory_size);
        // A bad table is counted as a corruption and skipped: the bitmaps after it
        // are still counted, or their clusters would look leaked and a leak
        // repair would free them while they are in use.
        for b in entries {
            self.imrt.inc(res, b.table_offset, b.table_size as u64 * 8);
            if !b.table_offset.is_multiple_of(cs) {
                res.corruptions += 1;
                continue;
            }
            // A table past the end of the file is not read (nor allocated for):
            // QEMU reads zeros there, entries that reference nothing.
            let bytes = b.table_size as u64 * 8;
            if b.table_offset.saturating_add(bytes) > self.imrt.file_len.saturating_add(cs) {
                res.corruptions += 1;
                continue;
            }
            let mut raw = vec![0u8; bytes as usize];
            if read_padded(self.io(), &mut raw, b.table_offset).is_err() {
                res.corruptions += 1;
                continue;
            }
            for e in u64_table(&raw) {
                let off = e & OFFSET_MASK;
                if e & BITMAP_ENTRY_RESERVED != 0
                    || !off.is_multiple_of(cs)
                    || (e & BITMAP_ENTRY_ALL_ONES != 0 && off != 0)
                {
                    res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.imrt.inc(res, off, cs);
                }
            }
        }
        Ok(())
    }

    /// QEMU's check_refblocks: each refcount block must be aligned, inside the file
    /// and referenced exactly once.
    fn check_refblocks(&mut self, res: &mut CheckReport, reftable: &RefTable) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.q.meta.header.cluster_bits;
        // The bound is from the file's length before any growth, so that many
        // entries each a little further on cannot add up past it.
        let max_clusters = self.imrt.len() + MAX_GROWTH;
        for (i, &e) in reftable.entries.iter().enumerate() {
            let offset = e & super::refcounts::REFTABLE_OFFSET_MASK;
            let cluster = offset >> bits;
            if e & REFTABLE_RESERVED != 0 {
                res.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if !offset.is_multiple_of(cs) {
                res.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.imrt.len() {
                let fix = self.fix.errors();
                res.msg(format!(
                    "{} refcount block {i} is outside image",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if !fix {
                    res.corruptions += 1;
                    continue;
                }
                // Make the file long enough to hold the block; the block then reads as
                // zeros, which the comparison finds and a rebuild repairs. (Not by
                // more than MAX_GROWTH clusters: the counts grow with the file.)
                let new_len = offset.checked_add(cs).filter(|l| l >> bits <= max_clusters);
                let grown = if offset > i64::MAX as u64 - cs {
                    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
                } else {
                    match new_len {
                        Some(l) => self.io().set_len(l),
                        None => Err(std::io::Error::from_raw_os_error(libc::EFBIG)),
                    }
                };
                match grown {
                    Ok(()) => {
                        self.imrt.file_len = offset + cs;
                        self.q.note_file_len(offset + cs);
                        self.imrt.grow(cluster + 1);
                        res.corruptions_fixed += 1;
                        self.imrt.inc(res, offset, cs);
                    }
                    Err(e) => {
                        res.corruptions += 1;
                        self.rebuild = true;
                        res.msg(format!(
                            "ERROR could not resize image: {}",
                            crate::error::strerror(&e)
                        ));
                    }
                }
                continue;
            }
            if offset != 0 {
                self.imrt.inc(res, offset, cs);
                let n = self.imrt.get(cluster);
                if n != 1 {
                    res.msg(format!("ERROR refcount block {i} refcount={n}"));
                    res.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }
}
