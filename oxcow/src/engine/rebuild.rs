//! Rebuilding the refcount structure from the references alone, for a check that
//! found the refcount table or blocks themselves damaged. The allocation policy is
//! QEMU's (so that a rebuilt image has the same layout as qemu-img gives it): every
//! refcount block goes to the first free cluster at or after the start of the range
//! it describes, the new table to the first free clusters of the file; placing the
//! table may call for more blocks, and then for a larger table, until nothing
//! changes. Blocks are written as they are placed; the table last, then the header
//! points at it. The old structures become leaks, which the check frees right after.

use super::refcounts::{write_table_and_switch, Refcounts};
use super::refscan::Imrt;
use super::writestate::WriteState;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::{refcount, MAX_REFTABLE_BYTES};
use crate::storage::Storage;

/// Takes `count` free clusters in a row from the counts, searching from
/// `*first_free` (which moves to the first free cluster seen); past the end of the
/// array the file grows. Returns the first cluster taken.
fn alloc_in_counts(imrt: &mut Imrt, count: u64, first_free: &mut u64) -> u64 {
    let mut cluster = *first_free;
    let mut run = 0;
    let mut first_gap = true;
    while cluster < imrt.len() && run < count {
        if imrt.get(cluster) == 0 {
            run += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        cluster += 1;
    }
    if run < count {
        imrt.grow(cluster + count - run);
    }
    let start = cluster - run;
    for c in start..start + count {
        imrt.set(c, 1);
    }
    start
}

/// The refcount geometry of an image.
struct Geometry {
    cluster_bits: u32,
    order: u32,
    block_bits: u32,
}

impl Geometry {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount block describing clusters `index << block_bits ..`, from the counts.
    fn encode_block(&self, imrt: &Imrt, index: u64) -> Vec<u8> {
        let mut b = vec![0u8; self.cluster_size() as usize];
        let max = refcount::max_value(self.order);
        let first = index << self.block_bits;
        for j in 0..1u64 << self.block_bits {
            let v = imrt.get(first + j).min(max);
            if v != 0 {
                refcount::set(&mut b, self.order, j as usize, v);
            }
        }
        b
    }

    /// Places and writes the refcount blocks for every cluster in use in
    /// `first..end`. Returns whether the table had to grow.
    fn write_blocks(
        &self,
        io: &dyn Storage,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
    ) -> Result<bool> {
        let cs = self.cluster_size();
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.block_bits;
            let block_start = index << self.block_bits;
            let offset = match table.get(index as usize) {
                Some(&off) if off != 0 => off,
                _ => {
                    // Never inside a range whose block is already written.
                    first_free = first_free.max(block_start);
                    let c = alloc_in_counts(imrt, 1, &mut first_free);
                    if c >= end {
                        // The block holding this block's own refcount is written too.
                        end = c + 1;
                    }
                    if table.len() as u64 <= index {
                        let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[index as usize] = c << self.cluster_bits;
                    c << self.cluster_bits
                }
            };
            io.write_at(&self.encode_block(imrt, index), offset)?;
            cluster = block_start + (1 << self.block_bits);
        }
        Ok(grown)
    }
}

impl Qcow2 {
    /// Writes a new refcount structure describing `imrt` (which then counts the new
    /// structure too) and makes the header use it.
    pub(crate) fn rebuild_refcounts(&self, st: &mut WriteState, imrt: &mut Imrt) -> Result<()> {
        let h = &self.meta.header;
        let g = Geometry {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            block_bits: h.cluster_bits + 3 - h.refcount_order,
        };
        let cs = g.cluster_size();
        let io = self.storage.as_ref();

        let mut table: Vec<u64> = Vec::new();
        g.write_blocks(io, imrt, 0, imrt.len(), &mut table)?;
        let (table_offset, table_clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(cs);
            if clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::Unsupported(
                    "the rebuilt refcount table would be larger than 8 MiB".into(),
                ));
            }
            let mut first_free = 0;
            let start = alloc_in_counts(imrt, clusters, &mut first_free);
            let grown = g.write_blocks(io, imrt, start, start + clusters, &mut table)?;
            if !grown {
                break (start << g.cluster_bits, clusters);
            }
            // A larger table is needed: give this place back and look again.
            for c in start..start + clusters {
                imrt.set(c, 0);
            }
        };

        write_table_and_switch(
            io,
            &table,
            (table_clusters * cs) as usize,
            table_offset,
            table_clusters as u32,
        )?;
        let end = imrt.len() * cs;
        self.note_file_len(end);
        imrt.file_len = imrt.file_len.max(io.len()?);

        st.header.refcount_table_offset = table_offset;
        st.header.refcount_table_clusters = table_clusters as u32;
        st.refcounts = Refcounts::load(
            io,
            g.cluster_bits,
            g.order,
            table_offset,
            table_clusters as u32,
        )?;
        Ok(())
    }
}
