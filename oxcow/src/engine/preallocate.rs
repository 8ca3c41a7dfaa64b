//! Preallocation of a new (or grown) range of the disk, with the layout QEMU gives:
//! `metadata` allocates an L2 table and then the data clusters it maps, table by
//! table; `falloc` and `full` first build refcount structures covering everything,
//! reserve the data area after them in one piece, then link L2 tables to it.

use super::create::Preallocation;
use super::Qcow2;
use crate::error::Result;
use crate::format::l1l2::COPIED;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Preallocates guest `old_size..new_size` (the disk is already `new_size`).
    pub fn preallocate(&self, mode: Preallocation, old_size: u64, new_size: u64) -> Result<()> {
        if mode == Preallocation::Off || new_size <= old_size {
            return Ok(());
        }
        let w = self.writer()?;
        let cs = self.cluster_size();
        let io = self.storage.as_ref();
        let mut mode = mode;
        if let Some(d) = &self.data_file {
            // With a data file, the data file itself is preallocated (falloc, full),
            // and the qcow2 file gets its L2 tables mapping it (as for metadata).
            if mode != Preallocation::Metadata {
                d.preallocate(old_size, new_size - old_size, mode == Preallocation::Full)?;
            }
            mode = Preallocation::Metadata;
        }
        let per_table = self.meta.header.l2_coverage() / cs;
        let first = old_size / cs;
        let clusters = new_size.div_ceil(cs) - first;
        let mut st = w.state.lock();
        let mut host_end = 0u64;
        match mode {
            Preallocation::Metadata => {
                let mut c = first;
                while c < first + clusters {
                    let guest = c * cs;
                    let l2 = self.l2_for_write(&mut st, guest)?;
                    let n = (per_table - c % per_table).min(first + clusters - c);
                    let host = if self.data_file.is_some() {
                        guest
                    } else {
                        self.alloc_clusters(&mut st, n)?
                    };
                    for k in 0..n {
                        self.set_l2_words(l2, guest + k * cs, (host + k * cs) | COPIED, 0)?;
                    }
                    host_end = host_end.max(host + n * cs);
                    c += n;
                }
                drop(st);
                self.flush()?;
                if self.data_file.is_none() && host_end > io.len()? {
                    io.set_len(host_end)?;
                }
            }
            Preallocation::Falloc | Preallocation::Full => {
                // Where the refcount structures covering the whole area begin: after
                // the last cluster in use.
                let file_clusters = io.len()?.div_ceil(cs);
                let mut last = None;
                for i in (0..file_clusters).rev() {
                    if st.refcounts.get(io, i)? != 0 {
                        last = Some(i);
                        break;
                    }
                }
                let start = last.map(|l| (l + 1) * cs).unwrap_or(0);
                let tables = clusters.div_ceil(per_table) + 1;
                st.refcounts.flush_blocks(io)?;
                let area_end =
                    st.refcounts
                        .refcount_area(io, start, clusters + tables, true, None)?;
                st.header.refcount_table_offset = st.refcounts.table_offset();
                st.header.refcount_table_clusters = st.refcounts.table_clusters();
                let taken = st.refcounts.alloc_at(io, area_end, clusters)?;
                debug_assert_eq!(taken, clusters);
                self.file_len
                    .fetch_max(area_end + clusters * cs, Ordering::AcqRel);
                let len = io.len()?;
                let end = area_end + clusters * cs;
                if end > len {
                    io.preallocate(len, end - len, mode == Preallocation::Full)?;
                }
                let mut c = first;
                let mut host = area_end;
                while c < first + clusters {
                    let guest = c * cs;
                    let n = (per_table - c % per_table).min(first + clusters - c);
                    let l2 = self.l2_for_write(&mut st, guest)?;
                    for k in 0..n {
                        self.set_l2_words(l2, guest + k * cs, (host + k * cs) | COPIED, 0)?;
                    }
                    host += n * cs;
                    c += n;
                }
                drop(st);
                self.flush()?;
            }
            Preallocation::Off => {}
        }
        Ok(())
    }
}
