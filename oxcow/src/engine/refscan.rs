//! Counting references: walks every structure of an image (header, L1 and L2 tables
//! of the active state and of every snapshot, data and compressed clusters, the
//! refcount table and blocks, the snapshot table, the bitmap directory, tables and
//! data, the encryption header) and counts how often each host cluster is used.
//! This is what the refcounts should say; check and repair compare against it.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::be::u64_table;
use crate::format::l1l2::{self, L2Entry};
use crate::format::OFFSET_MASK;

/// Reference counts per host cluster, as the metadata implies them.
#[derive(Debug, Default)]
pub struct References {
    pub counts: Vec<u32>,
}

impl References {
    fn add(&mut self, cluster_bits: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> cluster_bits;
        let last = (offset + len - 1) >> cluster_bits;
        if last as usize >= self.counts.len() {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            let r = &mut self.counts[c as usize];
            *r = r.saturating_add(1);
        }
    }

    pub fn get(&self, cluster: u64) -> u32 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }
}

impl Qcow2 {
    /// Counts the references to every host cluster of the image file.
    pub fn count_references(&self) -> Result<References> {
        let h = &self.meta.header;
        let bits = h.cluster_bits;
        let cs = h.cluster_size();
        let file_len = self.file_len();
        let mut r = References::default();
        r.add(bits, 0, cs);
        let (l1_offset, l1_size, reftable, reftable_offset, reftable_clusters, snaps) =
            match &self.writer {
                Some(w) => {
                    let st = w.state.lock();
                    (
                        st.header.l1_table_offset,
                        st.header.l1_size,
                        st.refcounts.table().to_vec(),
                        st.refcounts.table_offset(),
                        st.refcounts.table_clusters(),
                        snapshot_tables(
                            st.header.nb_snapshots,
                            st.header.snapshots_offset,
                            st.snapshots_len,
                            &st.snapshots,
                        ),
                    )
                }
                None => {
                    let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
                    self.storage.read_at(&mut raw, h.refcount_table_offset)?;
                    (
                        h.l1_table_offset,
                        h.l1_size,
                        u64_table(&raw),
                        h.refcount_table_offset,
                        h.refcount_table_clusters,
                        snapshot_tables(
                            h.nb_snapshots,
                            h.snapshots_offset,
                            self.meta.snapshots_len,
                            &self.meta.snapshots,
                        ),
                    )
                }
            };
        // The active L1 table, then every snapshot's.
        r.add(bits, l1_offset, l1_size as u64 * 8);
        let active = self.l1.read().clone();
        self.count_l1(&mut r, &active, file_len)?;
        if let Some((snap_off, snap_len, l1s)) = snaps {
            r.add(bits, snap_off, snap_len);
            for (off, size) in l1s {
                r.add(bits, off, size as u64 * 8);
                let raw_l1 = super::read_u64_table(self.storage.as_ref(), off, size as usize)?;
                self.count_l1(&mut r, &raw_l1, file_len)?;
            }
        }
        // The refcount table and its blocks.
        r.add(bits, reftable_offset, reftable_clusters as u64 * cs);
        for e in &reftable {
            let off = e & super::refcounts::REFTABLE_OFFSET_MASK;
            if off != 0 {
                r.add(bits, off, cs);
            }
        }
        // Persistent bitmaps (only while the bitmaps extension is valid).
        if let Some(ext) = self.meta.bitmaps_ext {
            if h.autoclear_features & crate::format::header::autoclear::BITMAPS != 0
                && ext.nb_bitmaps > 0
            {
                r.add(bits, ext.directory_offset, ext.directory_size);
                for b in &self.meta.bitmaps {
                    r.add(bits, b.table_offset, b.table_size as u64 * 8);
                    let mut raw = vec![0u8; b.table_size as usize * 8];
                    self.storage.read_at(&mut raw, b.table_offset)?;
                    for e in u64_table(&raw) {
                        let off = e & OFFSET_MASK;
                        if off != 0 {
                            r.add(bits, off, cs);
                        }
                    }
                }
            }
        }
        if let Some(c) = self.meta.crypto_header {
            r.add(bits, c.offset, c.length);
        }
        Ok(r)
    }

    fn count_l1(&self, r: &mut References, l1: &[u64], file_len: u64) -> Result<()> {
        let h = &self.meta.header;
        let bits = h.cluster_bits;
        let cs = h.cluster_size();
        let ext = h.has_extended_l2();
        for &e in l1 {
            let l2 = l1l2::l1_l2_offset(e);
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) || l2 + cs > file_len {
                return Err(Error::corrupt(
                    format!("L2 table at {l2:#x} is unaligned or past the end of the file"),
                    l2,
                ));
            }
            r.add(bits, l2, cs);
            let table = self.l2_table(l2)?;
            let n = (cs / h.l2_entry_size()) as usize;
            for i in 0..n {
                let entry = if ext {
                    L2Entry::decode_extended(table[2 * i], table[2 * i + 1], bits)
                } else {
                    L2Entry::decode(table[i], bits, h.has_data_file())
                };
                match entry {
                    L2Entry::Compressed(d) => r.add(bits, d.offset & !511, (d.sectors + 1) * 512),
                    _ if self.data_file.is_some() => {}
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                        r.add(bits, host, cs)
                    }
                    L2Entry::Extended { host, .. } if host != 0 => r.add(bits, host, cs),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// The snapshot table (offset, length) and each snapshot's L1 table (offset, entries).
type SnapshotTables = Option<(u64, u64, Vec<(u64, u32)>)>;

fn snapshot_tables(
    nb: u32,
    offset: u64,
    len: u64,
    list: &[crate::format::snapshot::SnapshotEntry],
) -> SnapshotTables {
    (nb > 0).then(|| {
        (
            offset,
            len,
            list.iter()
                .map(|s| (s.l1_table_offset, s.l1_size))
                .collect(),
        )
    })
}

impl Qcow2 {
    /// Rewrites every refcount from the references the metadata holds, then clears
    /// the dirty bit: what a read-write open does after a crash with lazy refcounts.
    pub(crate) fn repair_refcounts(&self) -> Result<()> {
        let refs = self.count_references()?;
        let w = self.writer()?;
        let mut st = w.state.lock();
        let io = self.storage.as_ref();
        // Every cluster a refcount block describes gets its true count...
        for range in st.refcounts.covered_ranges() {
            for c in range {
                st.refcounts.set(io, c, refs.get(c) as u64)?;
            }
        }
        // ...and a used cluster that no block describes cannot be repaired here.
        if let Some(c) =
            (0..refs.counts.len() as u64).find(|&c| refs.get(c) != 0 && !st.refcounts.is_covered(c))
        {
            return Err(Error::corrupt(
                format!("cluster {c} is used but no refcount block covers it; repair with 'qemu-img check -r all'"),
                c << self.meta.header.cluster_bits,
            ));
        }
        st.refcounts.flush_blocks(io)?;
        io.flush()?;
        // The COPIED flags follow the refcounts (a crash in the middle of a snapshot
        // operation can leave them behind), as QEMU's repair sets them.
        self.fix_copied(&mut st)?;
        self.flush_locked(&mut st)?;
        self.set_dirty_bit(&mut st, false)?;
        Ok(())
    }
}
