//! Preallocation of a new (or grown) range of the disk, with the layout QEMU gives:
//! `metadata` allocates an L2 table and then the data clusters it maps, table by
//! table; `falloc` and `full` first build refcount structures covering everything,
//! reserve the data area after them in one piece, then link L2 tables to it.

use super::create::Preallocation;
use super::writestate::WriteState;
use super::Qcow2;
use crate::error::Result;
use crate::format::l1l2::{L2Entry, COPIED};
use std::sync::atomic::Ordering;

/// The cluster holding the old end of the disk when it is not a cluster boundary:
/// what its bytes below the old end read as, and its L2 entry before preallocation.
struct Head {
    guest: u64,
    content: Vec<u8>,
    old: L2Entry,
    /// The old extended L2 bitmap (0 without subclusters).
    bitmap: u64,
}

impl Head {
    /// A cluster of this image alone: `metadata` keeps it.
    fn is_ours(&self) -> bool {
        match self.old {
            L2Entry::Normal { copied, .. } => copied,
            L2Entry::Extended { host, copied, .. } => host != 0 && copied,
            _ => false,
        }
    }
}

impl Qcow2 {
    /// Preallocates guest `old_size..new_size` (the disk is already `new_size`).
    pub fn preallocate(&self, mode: Preallocation, old_size: u64, new_size: u64) -> Result<()> {
        self.preallocate_area(mode, old_size, new_size, false)
    }

    /// Preallocates guest `old_size..new_size`. With `must_read_zeros` (the area
    /// would show a backing file otherwise), subclusters preallocated with `falloc` or
    /// `full` are marked allocated, as QEMU marks them.
    pub(super) fn preallocate_area(
        &self,
        mode: Preallocation,
        old_size: u64,
        new_size: u64,
        must_read_zeros: bool,
    ) -> Result<()> {
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
        let mut first = old_size / cs;
        let mut st = w.state.lock();
        // The cluster holding the old end keeps its bytes: `metadata` keeps a cluster
        // that is already ours, otherwise (and always with `falloc` and `full`) it
        // moves to a new cluster with what it reads as (copy-on-write), as QEMU does.
        let mut head = None;
        if !old_size.is_multiple_of(cs) && self.data_file.is_none() {
            let h = self.take_head(first * cs, old_size - first * cs)?;
            if mode == Preallocation::Metadata && h.is_ours() {
                first += 1;
            } else {
                head = Some(h);
            }
        }
        if first * cs >= new_size {
            return Ok(());
        }
        let clusters = new_size.div_ceil(cs) - first;
        let ext = self.meta.header.has_extended_l2();
        let bitmap = if ext && must_read_zeros && mode != Preallocation::Metadata {
            u32::MAX as u64
        } else {
            0
        };
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
                self.put_head(&mut st, head, bitmap == u32::MAX as u64)?;
                drop(st);
                self.flush()?;
                if self.data_file.is_none() && host_end > io.len()? {
                    io.set_len(host_end)?;
                }
            }
            Preallocation::Falloc | Preallocation::Full => {
                // Where the refcount structures covering the whole area begin: after
                // the last cluster in use.
                // (The head's L2 table may be new, not yet written.)
                let file_clusters = io.len()?.max(self.file_len()).div_ceil(cs);
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
                        self.set_l2_words(l2, guest + k * cs, (host + k * cs) | COPIED, bitmap)?;
                    }
                    host += n * cs;
                    c += n;
                }
                self.put_head(&mut st, head, bitmap == u32::MAX as u64)?;
                drop(st);
                self.flush()?;
            }
            Preallocation::Off => {}
        }
        Ok(())
    }

    /// The head cluster at guest `guest`, whose first `keep` bytes stay.
    /// (No L2 table is allocated here: QEMU allocates it later, with the others.)
    fn take_head(&self, guest: u64, keep: u64) -> Result<Head> {
        let l1_index = (guest / self.meta.header.l2_coverage()) as usize;
        let l1e = self.l1.read().get(l1_index).copied().unwrap_or(0);
        let l2 = crate::format::l1l2::l1_l2_offset(l1e);
        let (word, bitmap) = if l2 == 0 {
            (0, 0)
        } else {
            self.l2_words(l2, guest)?
        };
        let old = self.decode(word, bitmap);
        let mut content = vec![0u8; self.cluster_size() as usize];
        self.read_range(&mut content[..keep as usize], guest)?;
        Ok(Head {
            guest,
            content,
            old,
            bitmap,
        })
    }

    /// Writes the head cluster's bytes into the cluster preallocation gave it and
    /// drops its old cluster. With subclusters, those allocated before stay so
    /// (`all_allocated`: all of them), the others keep showing what they showed.
    fn put_head(&self, st: &mut WriteState, head: Option<Head>, all_allocated: bool) -> Result<()> {
        let Some(head) = head else {
            return Ok(());
        };
        let l2 = self.l2_for_write(st, head.guest)?;
        let (word, _) = self.l2_words(l2, head.guest)?;
        let host = word & crate::format::OFFSET_MASK;
        self.storage.write_at(&head.content, host)?;
        if self.meta.header.has_extended_l2() {
            let bitmap = if all_allocated || matches!(head.old, L2Entry::Compressed(_)) {
                u32::MAX as u64
            } else {
                head.bitmap
            };
            self.set_l2_words(l2, head.guest, host | COPIED, bitmap)?;
        }
        self.release(st, head.old, false);
        Ok(())
    }
}
