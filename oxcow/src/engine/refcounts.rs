//! Refcount management: the refcount table, a cache of refcount blocks, and cluster
//! allocation. The algorithms follow QEMU's choices (first fit from the lowest free
//! cluster; a new refcount block describes itself when it can; a refcount table that
//! is too small is replaced by a new table placed with its self-describing blocks past
//! the end of the covered area) so that images get the same layout as QEMU gives them.

use crate::error::{Error, Result};
use crate::format::be::{put_u32, put_u64, u64_table};
use crate::format::refcount;
use crate::format::{MAX_REFTABLE_BYTES, OFFSET_MASK};
use crate::storage::Storage;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// Bits 9..63 of a refcount table entry hold a refcount block's offset.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Where the refcount table's offset and cluster count sit in the header.
const HEADER_REFTABLE_FIELDS: u64 = 48;

/// Why an update stopped.
#[derive(Debug)]
pub enum Stop {
    /// A new refcount block was placed where the caller may have meant to put its
    /// data: search for free clusters again.
    Again,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Failed(e.into())
    }
}

type StopResult<T> = std::result::Result<T, Stop>;

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// The refcount structures of one image and the allocator over them.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    blocks: HashMap<u64, Block>,
    /// The lowest cluster that may be free.
    free_cluster_index: u64,
}

impl Refcounts {
    /// Loads the refcount table described by the header fields.
    pub fn load(
        io: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Refcounts> {
        let bytes = (table_clusters as u64) << cluster_bits;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::header(
                "refcount_table_clusters",
                "refcount table too large",
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        io.read_at(&mut raw, table_offset)?;
        Ok(Refcounts {
            cluster_bits,
            order,
            table: u64_table(&raw),
            table_offset,
            blocks: HashMap::new(),
            free_cluster_index: 0,
        })
    }

    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    pub fn table_clusters(&self) -> u32 {
        ((self.table.len() as u64 * 8) >> self.cluster_bits) as u32
    }

    pub fn table(&self) -> &[u64] {
        &self.table
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the refcount entries in one block.
    fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    fn entries_per_block(&self) -> u64 {
        1 << self.block_bits()
    }

    fn max_table_index(&self) -> usize {
        let mut i = self.table.len().saturating_sub(1);
        while i > 0 && self.table[i] & REFTABLE_OFFSET_MASK == 0 {
            i -= 1;
        }
        i
    }

    fn load_block(&mut self, io: &dyn Storage, offset: u64) -> Result<&mut Block> {
        let cs = self.cluster_size();
        let slot = match self.blocks.entry(offset) {
            Entry::Occupied(e) => return Ok(e.into_mut()),
            Entry::Vacant(v) => v,
        };
        if !offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                format!("Refblock offset {offset:#x} unaligned"),
                offset,
            ));
        }
        // A block past the end of the file holds no refcounts: writing there
        // would grow the file to wherever a damaged table entry points.
        if offset >= io.len()? {
            return Err(Error::corrupt(
                format!("Refblock offset {offset:#x} is past the end of the file"),
                offset,
            ));
        }
        let mut data = vec![0u8; cs as usize];
        io.read_at(&mut data, offset)?;
        Ok(slot.insert(Block { data, dirty: false }))
    }

    /// A zeroed block at `offset` in the cache, dirty.
    fn empty_block(&mut self, offset: u64) -> &mut Block {
        let cs = self.cluster_size() as usize;
        let b = self.blocks.entry(offset).or_insert_with(|| Block {
            data: Vec::new(),
            dirty: true,
        });
        b.data = vec![0u8; cs];
        b.dirty = true;
        b
    }

    /// The refcount of host cluster `index` (0 where no block covers it).
    pub fn get(&mut self, io: &dyn Storage, index: u64) -> Result<u64> {
        let t = (index >> self.block_bits()) as usize;
        let Some(&entry) = self.table.get(t) else {
            return Ok(0);
        };
        let off = entry & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.order;
        let i = (index & (self.entries_per_block() - 1)) as usize;
        let b = self.load_block(io, off)?;
        Ok(refcount::get(&b.data, order, i))
    }

    /// Host clusters the current refcount blocks can describe (blocks that exist).
    pub fn is_covered(&self, index: u64) -> bool {
        let t = (index >> self.block_bits()) as usize;
        self.table
            .get(t)
            .is_some_and(|e| e & REFTABLE_OFFSET_MASK != 0)
    }

    /// The ranges of host clusters that existing refcount blocks describe.
    pub fn covered_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let bits = self.block_bits();
        self.table
            .iter()
            .enumerate()
            .filter(|(_, e)| *e & REFTABLE_OFFSET_MASK != 0)
            .map(|(i, _)| ((i as u64) << bits)..((i as u64 + 1) << bits))
            .collect()
    }

    /// Sets the refcount of host cluster `index`, whose refcount block must exist.
    pub fn set(&mut self, io: &dyn Storage, index: u64, value: u64) -> Result<()> {
        let t = (index >> self.block_bits()) as usize;
        let off = self
            .table
            .get(t)
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .unwrap_or(0);
        if off == 0 {
            return Err(Error::corrupt(
                format!("no refcount block covers cluster {index}"),
                index << self.cluster_bits,
            ));
        }
        if value > refcount::max_value(self.order) {
            return Err(Error::corrupt(
                format!("cluster {index} has {value} references, more than a refcount can hold"),
                index << self.cluster_bits,
            ));
        }
        let order = self.order;
        let i = (index & (self.entries_per_block() - 1)) as usize;
        let b = self.load_block(io, off)?;
        if refcount::get(&b.data, order, i) != value {
            refcount::set(&mut b.data, order, i, value);
            b.dirty = true;
        }
        if value == 0 && index < self.free_cluster_index {
            self.free_cluster_index = index;
        }
        Ok(())
    }

    /// Writes every dirty refcount block.
    pub fn flush_blocks(&mut self, io: &dyn Storage) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            if let Some(b) = self.blocks.get_mut(&off) {
                io.write_at(&b.data, off)?;
                b.dirty = false;
            }
        }
        Ok(())
    }

    pub fn has_dirty_blocks(&self) -> bool {
        self.blocks.values().any(|b| b.dirty)
    }

    /// Finds `n` free clusters in a row, from the lowest free cluster on, without
    /// taking them.
    fn find_free(&mut self, io: &dyn Storage, n: u64) -> Result<u64> {
        let mut found = 0;
        while found < n {
            let i = self.free_cluster_index;
            self.free_cluster_index += 1;
            if self.get(io, i)? != 0 {
                found = 0;
            } else {
                found += 1;
            }
        }
        let start = self.free_cluster_index - n;
        if (self.free_cluster_index << self.cluster_bits) > (1u64 << 56) {
            return Err(Error::Unsupported(
                "the image would grow past the largest host offset".into(),
            ));
        }
        Ok(start << self.cluster_bits)
    }

    /// The lowest free cluster, without taking it (the caller updates its refcount).
    pub fn find_free_cluster(&mut self, io: &dyn Storage) -> Result<u64> {
        self.find_free(io, 1)
    }

    /// Allocates `size` bytes of contiguous clusters and returns their offset.
    pub fn alloc(&mut self, io: &dyn Storage, size: u64) -> Result<u64> {
        let n = size.div_ceil(self.cluster_size()).max(1);
        loop {
            let off = self.find_free(io, n)?;
            match self.update(io, off, n << self.cluster_bits, 1, false) {
                Ok(()) => return Ok(off),
                Err(Stop::Again) => continue,
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
    }

    /// Takes up to `n` clusters starting at `offset`, as many as are free in a row;
    /// returns how many were taken.
    pub fn alloc_at(&mut self, io: &dyn Storage, offset: u64, n: u64) -> Result<u64> {
        loop {
            let first = offset >> self.cluster_bits;
            let mut free = 0;
            while free < n && self.get(io, first + free)? == 0 {
                free += 1;
            }
            if free == 0 {
                return Ok(0);
            }
            match self.update(io, offset, free << self.cluster_bits, 1, false) {
                Ok(()) => return Ok(free),
                Err(Stop::Again) => continue,
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
    }

    /// Drops one reference to each cluster of `offset..offset+len`.
    pub fn free(&mut self, io: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.update(io, offset, len, 1, true) {
            Ok(()) => Ok(()),
            Err(Stop::Again) => Err(Error::corrupt(
                "refcount block missing for a cluster being freed",
                offset,
            )),
            Err(Stop::Failed(e)) => Err(e),
        }
    }

    /// Adds (or with `decrease`, subtracts) `addend` to the refcount of every cluster
    /// touching `offset..offset+len`. On failure the clusters already changed are
    /// changed back.
    pub fn update(
        &mut self,
        io: &dyn Storage,
        offset: u64,
        len: u64,
        addend: u64,
        decrease: bool,
    ) -> StopResult<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let start = offset & !(cs - 1);
        let last = (offset + len - 1) & !(cs - 1);
        let mut cur = start;
        let mut block_off = None;
        let mut last_table_index = u64::MAX;
        let result: StopResult<()> = (|| {
            while cur <= last {
                let index = cur >> self.cluster_bits;
                let t = index >> self.block_bits();
                if t != last_table_index {
                    // Dropping a reference never places a refcount block: a cluster
                    // without one has no reference to drop (a damaged pointer, maybe
                    // far past the end of the file), and the caller reports it.
                    let found = if decrease {
                        self.existing_block(index).ok_or(Stop::Again)
                    } else {
                        self.block_for(io, index)
                    };
                    match found {
                        Ok(b) => block_off = Some(b),
                        Err(Stop::Again) => {
                            if self.free_cluster_index > start >> self.cluster_bits {
                                self.free_cluster_index = start >> self.cluster_bits;
                            }
                            return Err(Stop::Again);
                        }
                        Err(e) => return Err(e),
                    }
                }
                last_table_index = t;
                let order = self.order;
                let max = refcount::max_value(order);
                let i = (index & (self.entries_per_block() - 1)) as usize;
                let boff = block_off.unwrap_or(0);
                let b = self.load_block(io, boff)?;
                let rc = refcount::get(&b.data, order, i);
                let new = if decrease {
                    rc.checked_sub(addend)
                } else {
                    rc.checked_add(addend).filter(|v| *v <= max)
                };
                let Some(new) = new else {
                    return Err(Stop::Failed(Error::corrupt(
                        format!(
                            "refcount of cluster {index} would become invalid ({rc} {} {addend})",
                            if decrease { "-" } else { "+" }
                        ),
                        cur,
                    )));
                };
                refcount::set(&mut b.data, order, i, new);
                b.dirty = true;
                if new == 0 && index < self.free_cluster_index {
                    self.free_cluster_index = index;
                }
                cur += cs;
            }
            Ok(())
        })();
        if result.is_err() && cur > start {
            // Undo what was applied, so that a retry starts from a consistent state.
            let _ = self.update(io, offset, cur - offset.min(cur), addend, !decrease);
        }
        result
    }

    /// The offset of the refcount block covering host cluster `index`, if it has one.
    fn existing_block(&self, index: u64) -> Option<u64> {
        let t = usize::try_from(index >> self.block_bits()).ok()?;
        let off = self.table.get(t)? & REFTABLE_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    /// The offset of the refcount block covering host cluster `index`, allocating it
    /// (and growing the refcount table) when there is none.
    fn block_for(&mut self, io: &dyn Storage, index: u64) -> StopResult<u64> {
        let t = (index >> self.block_bits()) as usize;
        if let Some(off) = self.existing_block(index) {
            return Ok(off);
        }
        let cs = self.cluster_size();
        let new_block = self.find_free(io, 1)?;
        if new_block == 0 {
            return Err(Stop::Failed(Error::corrupt(
                "a new refcount block would be placed at offset 0",
                0,
            )));
        }
        let new_index = new_block >> self.cluster_bits;
        if new_index >> self.block_bits() == index >> self.block_bits() {
            // The new block covers itself.
            let order = self.order;
            let own = (new_index & (self.entries_per_block() - 1)) as usize;
            let b = self.empty_block(new_block);
            refcount::set(&mut b.data, order, own, 1);
        } else {
            // Described by another block; that may recurse, at most twice, before
            // reaching a block that describes itself.
            self.update(io, new_block, cs, 1, false)?;
            self.flush_blocks(io)?;
            self.empty_block(new_block);
        }
        self.flush_blocks(io)?;

        if t < self.table.len() {
            let mut e = [0u8; 8];
            put_u64(&mut e, 0, new_block);
            io.write_at(&e, self.table_offset + t as u64 * 8)?;
            io.flush()?;
            self.table[t] = new_block;
            return Err(Stop::Again);
        }

        // The table is too small: build a new one, with the blocks describing it,
        // past everything the current blocks could describe.
        let blocks_used = (index + 1)
            .max(new_index + 1)
            .div_ceil(self.entries_per_block());
        let meta_offset = blocks_used * self.entries_per_block() * cs;
        self.refcount_area(io, meta_offset, 0, false, Some((t, new_block)))?;
        Err(Stop::Again)
    }

    /// Creates refcount structures at `start` (cluster aligned, free to the end of the
    /// file) that cover every cluster below `start` plus `additional` clusters: new
    /// refcount blocks, then a new refcount table, which replaces the old one (freed).
    /// With `exact` false the table gets room to grow. Returns the end of the new
    /// structures.
    pub fn refcount_area(
        &mut self,
        io: &dyn Storage,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(usize, u64)>,
    ) -> Result<u64> {
        let cs = self.cluster_size();
        let per_table_cluster = cs / 8;
        let (total_blocks, _) = metadata_size(
            start / cs + additional,
            self.cluster_bits,
            self.order,
            !exact,
        );
        if total_blocks * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(
                "the refcount table would grow past its largest size".into(),
            ));
        }
        let total_blocks = total_blocks as usize;
        let area_index = ((start / cs) >> self.block_bits()) as usize;
        let total = total_blocks as u64;
        let mut table_size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_size = table_size.div_ceil(per_table_cluster) * per_table_cluster;
        if table_size * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(
                "the refcount table would grow past its largest size".into(),
            ));
        }
        let table_clusters = table_size * 8 / cs;
        let mut new_table = vec![0u64; table_size as usize];
        let keep = if table_size as usize > self.max_table_index() {
            self.max_table_index() + 1
        } else {
            table_size as usize
        };
        let keep = keep.min(self.table.len());
        new_table[..keep].copy_from_slice(&self.table[..keep]);
        if let Some((i, off)) = new_block {
            if i < new_table.len() {
                new_table[i] = off;
            }
        }
        let additional_blocks = (area_index..total_blocks)
            .filter(|&i| new_table[i] == 0)
            .count() as u64;
        let table_offset = start + additional_blocks * cs;
        let end = table_offset + table_clusters * cs;

        let mut block_offset = start;
        let order = self.order;
        let epb = self.entries_per_block();
        for (i, slot) in new_table
            .iter_mut()
            .enumerate()
            .take(total_blocks)
            .skip(area_index)
        {
            let off = if *slot != 0 {
                *slot & REFTABLE_OFFSET_MASK
            } else {
                self.empty_block(block_offset);
                *slot = block_offset;
                block_offset += cs;
                *slot
            };
            let first_covered = i as u64 * epb * cs;
            if first_covered < end {
                let j0 = if first_covered < start {
                    (start - first_covered) / cs
                } else {
                    0
                };
                let j1 = ((end - first_covered) / cs).min(epb);
                let b = self.load_block(io, off)?;
                for j in j0..j1 {
                    refcount::set(&mut b.data, order, j as usize, 1);
                }
                b.dirty = true;
            }
        }
        self.flush_blocks(io)?;
        write_table_and_switch(
            io,
            &new_table,
            table_size as usize * 8,
            table_offset,
            table_clusters as u32,
        )?;

        let old_offset = self.table_offset;
        let old_bytes = self.table.len() as u64 * 8;
        self.table = new_table;
        self.table_offset = table_offset;
        self.free(io, old_offset, old_bytes)?;
        Ok(end)
    }
}

/// Writes a refcount table of `bytes` bytes (the entries, then zeros) at `offset` and
/// syncs it, then points the header at it (offset and cluster count, one write) and
/// syncs again: the table is durable before anything refers to it.
pub(crate) fn write_table_and_switch(
    io: &dyn Storage,
    entries: &[u64],
    bytes: usize,
    offset: u64,
    clusters: u32,
) -> Result<()> {
    let mut raw = vec![0u8; bytes.max(entries.len() * 8)];
    for (i, e) in entries.iter().enumerate() {
        put_u64(&mut raw, i * 8, *e);
    }
    io.write_at(&raw, offset)?;
    io.flush()?;
    let mut fields = [0u8; 12];
    put_u64(&mut fields, 0, offset);
    put_u32(&mut fields, 8, clusters);
    io.write_at(&fields, HEADER_REFTABLE_FIELDS)?;
    io.flush()?;
    Ok(())
}

/// The refcount blocks and table clusters needed so that `clusters` host clusters and
/// the refcount structures themselves are all counted (a fixed point, as QEMU
/// computes it). With `generous`, leave room for half the table again. Returns
/// (blocks, table clusters).
pub fn metadata_size(clusters: u64, cluster_bits: u32, order: u32, generous: bool) -> (u64, u64) {
    let cs = 1u64 << cluster_bits;
    let per_table_cluster = cs / 8;
    let per_block = refcount::entries_per_block(cluster_bits, order);
    let mut clusters = clusters;
    let mut generous = generous;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
            continue;
        }
        if n == last {
            return (blocks, table);
        }
    }
}

// The L1/L2 offset mask and the refcount table mask differ only above bit 55.
const _: () = assert!(OFFSET_MASK & REFTABLE_OFFSET_MASK == OFFSET_MASK);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    /// 512-byte clusters, 16-bit refcounts: header cluster, refcount table (64
    /// entries, 8 MiB described) at cluster 1, its only block at cluster 2, four
    /// clusters in use.
    fn small_image() -> (MemoryStorage, Refcounts) {
        let mut bytes = vec![0u8; 4 * 512];
        put_u64(&mut bytes, 512, 1024);
        for c in 0..4 {
            bytes[1024 + c * 2 + 1] = 1;
        }
        let io = MemoryStorage::from_vec(bytes);
        let rc = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        (io, rc)
    }

    #[test]
    fn freeing_a_cluster_without_refcount_block_allocates_nothing() {
        // Inside what the table describes (entry missing), and far past it (the
        // table would have to grow): both are a damaged reference, not a reason to
        // place refcount structures.
        for offset in [1 << 20, 16 << 20] {
            let (io, mut rc) = small_image();
            let before = io.to_vec();
            let err = rc.free(&io, offset, 512).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { .. }),
                "freeing {offset:#x}: {err:?}"
            );
            assert_eq!(io.to_vec(), before, "freeing {offset:#x} changed the file");
            assert_eq!(rc.table().iter().filter(|&&e| e != 0).count(), 1);
            // The allocator still works and places the next cluster right after.
            assert_eq!(rc.alloc(&io, 512).unwrap(), 4 * 512);
        }
    }

    #[test]
    fn freeing_a_described_cluster_drops_its_reference() {
        let (io, mut rc) = small_image();
        rc.free(&io, 3 * 512, 512).unwrap();
        assert_eq!(rc.get(&io, 3).unwrap(), 0);
        assert_eq!(rc.get(&io, 2).unwrap(), 1);
    }
}
