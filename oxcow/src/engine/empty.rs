//! Emptying an image, as `qemu-img commit` does to the image it committed: every
//! guest cluster becomes unallocated, so the backing file shows through again.
//!
//! Like QEMU (qcow2_make_empty), a version 3 image without snapshots, persistent
//! bitmaps or an external data file is rebuilt from scratch: the header stays, the
//! refcount table moves to cluster 1, its one refcount block to cluster 2, the
//! (zeroed) L1 table to cluster 3, and the file ends right after it. Other images
//! have every cluster discarded, which gives each L1 entry an L2 table of its own.

use super::refcounts::Refcounts;
use super::Qcow2;
use crate::error::Result;
use crate::format::header::autoclear;
use crate::format::header::CryptMethod;
use crate::format::l1l2::L2Entry;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Drops every guest cluster of the image (the backing file shows through).
    pub fn make_empty(&self) -> Result<()> {
        self.flush()?;
        if self.can_empty_completely() {
            self.empty_completely()
        } else {
            self.discard_everything()
        }
    }

    fn can_empty_completely(&self) -> bool {
        let h = &self.meta.header;
        let cs = h.cluster_size();
        let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
        let block_entries = (cs * 8) >> h.refcount_order;
        let bitmaps = h.autoclear_features & autoclear::BITMAPS != 0
            && self.meta.bitmaps_ext.is_some_and(|b| b.nb_bitmaps > 0)
            || self.has_persistent_bitmaps();
        h.version >= 3
            && self
                .writer
                .as_ref()
                .map_or(h.nb_snapshots, |w| w.state.lock().header.nb_snapshots)
                == 0
            && !bitmaps
            && 3 + l1_clusters <= block_entries
            && h.crypt_method == CryptMethod::None
            && self.data_file.is_none()
    }

    /// QEMU's make_completely_empty, step by step.
    fn empty_completely(&self) -> Result<()> {
        let w = self.writer()?;
        let mut st = w.state.lock();
        let io = self.storage.as_ref();
        let h = self.meta.header.clone();
        let cs = h.cluster_size();
        let l1_size = self.l1.read().len() as u64;
        let l1_clusters = (l1_size * 8).div_ceil(cs);

        // Refcounts will be wrong until the end: the dirty bit says so.
        self.set_dirty_bit(&mut st, true)?;
        io.write_at(
            &vec![0u8; (l1_clusters * cs) as usize],
            st.header.l1_table_offset,
        )?;
        self.l1.write().iter_mut().for_each(|e| *e = 0);
        io.write_at(&vec![0u8; ((2 + l1_clusters) * cs) as usize], cs)?;

        // The new places of the L1 table and the refcount table, in the header.
        let mut fields = [0u8; 20];
        crate::format::be::put_u64(&mut fields, 0, 3 * cs);
        crate::format::be::put_u64(&mut fields, 8, cs);
        fields[16..20].copy_from_slice(&1u32.to_be_bytes());
        io.write_at(&fields, 40)?;
        io.flush()?;
        st.header.l1_table_offset = 3 * cs;

        // The refcount table's first block, then the references of the clusters in
        // use: header, refcount table, refcount block and L1 table.
        let mut entry = [0u8; 8];
        crate::format::be::put_u64(&mut entry, 0, 2 * cs);
        io.write_at(&entry, cs)?;
        io.flush()?;
        let mut rc = Refcounts::load(io, h.cluster_bits, h.refcount_order, cs, 1)?;
        for c in 0..3 + l1_clusters {
            rc.set(io, c, 1)?;
        }
        rc.flush_blocks(io)?;
        st.refcounts = rc;
        st.l1_dirty = false;
        st.pending_frees.clear();
        st.free_byte_offset = 0;
        self.l2_cache.clear();

        // Clean again: the whole header is rewritten, and the file cut after the L1.
        st.header.incompatible_features &= !crate::format::header::incompat::DIRTY;
        self.write_header(&mut st)?;
        io.flush()?;
        let end = (3 + l1_clusters) * cs;
        io.set_len(end)?;
        self.file_len.store(end, Ordering::Release);
        io.flush()?;
        Ok(())
    }

    /// QEMU's fallback: a full discard of every cluster (entries become 0, not zero
    /// flags), each L1 entry getting a table of its own first.
    fn discard_everything(&self) -> Result<()> {
        let w = self.writer()?;
        let cs = self.cluster_size();
        let size = self.size.load(Ordering::Acquire);
        let mut pos = 0;
        while pos < size {
            let mut st = self.lock_cluster(w, pos / cs)?;
            let l2 = self.l2_for_write(&mut st, pos)?;
            let (word, bitmap) = self.l2_words(l2, pos)?;
            if (word, bitmap) != (0, 0) {
                let old = self.decode(word, bitmap);
                self.set_l2_words(l2, pos, 0, 0)?;
                self.release(&mut st, old, true);
                // Clusters of an external data file are not refcounted: QEMU passes
                // the discard down to the data file.
                if let Some(d) = &self.data_file {
                    let host = match old {
                        L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                            Some(host)
                        }
                        L2Entry::Extended { host, alloc, .. } if alloc != 0 || host != 0 => {
                            Some(host)
                        }
                        _ => None,
                    };
                    if let Some(h) = host {
                        d.punch_hole(h, cs.min(size - pos))?;
                    }
                }
            }
            drop(st);
            self.writeback_if_needed(w)?;
            pos += cs;
        }
        self.flush()
    }
}
