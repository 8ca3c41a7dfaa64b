//! QEMU's guess whether an image was created with `preallocation=metadata`: only then
//! does its block status look at the host file for holes inside allocated clusters
//! (qcow2_detect_metadata_preallocation). Matching the guess keeps `map` and the zero
//! detection of `convert` equal to qemu-img's.

use super::meta::ImageMeta;
use crate::format::be::u64_table;
use crate::format::refcount;
use crate::storage::Storage;

/// Bits 9..63 of a refcount table entry: the refcount block's offset.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// True when more clusters of the file carry a refcount than the file has allocated
/// blocks for (by QEMU's margin: a ninth more, at least two): the file has holes in
/// allocated clusters. Any error reading the refcounts means "no", as in QEMU.
pub(crate) fn detect_metadata_preallocation(meta: &ImageMeta, storage: &dyn Storage) -> bool {
    detect(meta, storage).unwrap_or(false)
}

fn detect(meta: &ImageMeta, storage: &dyn Storage) -> Option<bool> {
    let h = &meta.header;
    let cs = h.cluster_size();
    let real_allocation = storage.allocated_bytes().ok()??;
    let real_clusters = real_allocation / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = meta.file_len.div_ceil(cs);

    let table_bytes = (h.refcount_table_clusters as u64).checked_mul(cs)?;
    if table_bytes > crate::format::MAX_REFTABLE_BYTES {
        return None;
    }
    let mut raw = vec![0u8; table_bytes as usize];
    storage.read_at(&mut raw, h.refcount_table_offset).ok()?;
    let table = u64_table(&raw);

    let per_block = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
    let mut block = vec![0u8; cs as usize];
    let mut loaded: Option<usize> = None;
    let mut count = 0u64;
    let mut i = 0u64;
    while i < end_cluster && count < threshold {
        let t = (i / per_block) as usize;
        let block_offset = table.get(t).map_or(0, |e| e & REFTABLE_OFFSET_MASK);
        if block_offset == 0 {
            // No refcount block: every cluster it would cover has refcount 0.
            i = (t as u64 + 1) * per_block;
            continue;
        }
        if !block_offset.is_multiple_of(cs) {
            return None;
        }
        if loaded != Some(t) {
            storage.read_at(&mut block, block_offset).ok()?;
            loaded = Some(t);
        }
        if refcount::get(&block, h.refcount_order, (i % per_block) as usize) != 0 {
            count += 1;
        }
        i += 1;
    }
    Some(count >= threshold)
}
