//! The write path: allocation, copy-on-write, subclusters, zeroing, discard, flush
//! and resize.
//!
//! Ordering rules that keep every crash state consistent (see ARCHITECTURE.md):
//! guest data is written before the L2 entry that points to it changes; refcount
//! blocks reach the disk (and a flush) before the L2 tables that depend on them; L2
//! tables before the L1 entries that point to them; and a dropped reference reaches
//! the disk before its refcount is decreased (frees wait in `pending_frees` until a
//! flush has written the tables that dropped them).

use super::l2cache::L2Table;
use super::writestate::{WriteState, Writer};
use super::Qcow2;
use crate::device::check_range;
use crate::error::{Error, Result};
use crate::format::cluster0;
use crate::format::header::{autoclear, incompat};
use crate::format::l1l2::{self, L2Entry, COPIED, SUBCLUSTERS, ZERO};
use crate::format::OFFSET_MASK;
use parking_lot::MutexGuard;
use std::sync::atomic::Ordering;

/// All zero bits set, no allocation bits: an extended L2 bitmap reading as zeros.
const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// A (sub)cluster-aligned slice of one guest cluster.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Guest offset of the cluster.
    cluster: u64,
    /// Byte range inside the cluster.
    start: u64,
    end: u64,
}

impl Qcow2 {
    pub(super) fn writer(&self) -> Result<&Writer> {
        self.writer
            .as_ref()
            .ok_or_else(|| Error::Unsupported("the image is open read-only".into()))
    }

    /// Called once at a read-write open: clears the autoclear bits of features oxcow
    /// does not keep up to date (unknown ones), so that other programs know their data
    /// may be stale. Persistent bitmaps are kept up to date (engine/bitmaps.rs).
    pub(crate) fn prepare_for_writing(&self) -> Result<()> {
        let w = self.writer()?;
        let mut st = w.state.lock();
        let keep = if self.data_file.is_some() {
            autoclear::DATA_FILE_RAW | autoclear::BITMAPS
        } else {
            autoclear::BITMAPS
        };
        if st.header.autoclear_features & !keep != 0 {
            st.header.autoclear_features &= keep;
            self.write_header(&mut st)?;
            self.storage.flush()?;
        }
        Ok(())
    }

    /// Rewrites cluster 0 from the writer's header and extensions.
    pub(super) fn write_header(&self, st: &mut WriteState) -> Result<()> {
        st.header.refcount_table_offset = st.refcounts.table_offset();
        st.header.refcount_table_clusters = st.refcounts.table_clusters();
        st.header.size = self.size.load(Ordering::Acquire);
        let c0 = cluster0::encode(&mut st.header, &st.extras)?;
        self.storage.write_at(&c0, 0)?;
        Ok(())
    }

    /// Locks the writer state once no allocation of guest cluster `cluster` is under
    /// way.
    pub(super) fn lock_cluster<'a>(
        &'a self,
        w: &'a Writer,
        cluster: u64,
    ) -> Result<MutexGuard<'a, WriteState>> {
        let mut st = w.state.lock();
        while st.inflight.contains(&cluster) {
            w.done.wait(&mut st);
        }
        if st.corrupt {
            // QEMU takes the medium away once it marked the image corrupt.
            return Err(Error::Io(std::io::Error::from_raw_os_error(
                libc::ENOMEDIUM,
            )));
        }
        Ok(st)
    }

    pub(super) fn finish_inflight(&self, w: &Writer, st: &mut WriteState, cluster: u64) {
        st.inflight.remove(&cluster);
        w.done.notify_all();
    }

    /// Allocates up to `n` contiguous host clusters at `next` when some are free
    /// there (as many as are, in a row), else `n` from the lowest free cluster, as
    /// QEMU's handle_alloc does; returns (offset, count).
    pub(super) fn alloc_continuing(
        &self,
        st: &mut WriteState,
        next: Option<u64>,
        n: u64,
    ) -> Result<(u64, u64)> {
        if let Some(at) = next {
            self.before_refcount_change(st)?;
            let cs = self.cluster_size();
            let k = st.refcounts.alloc_at(self.storage.as_ref(), at, n)?;
            if k > 0 {
                self.check_overlap(st, at, k * cs)?;
                self.file_len.fetch_max(at + k * cs, Ordering::AcqRel);
                return Ok((at, k));
            }
        }
        Ok((self.alloc_clusters(st, n)?, n))
    }

    /// Allocates `n` contiguous host clusters and checks they overlap no metadata.
    pub(super) fn alloc_clusters(&self, st: &mut WriteState, n: u64) -> Result<u64> {
        self.before_refcount_change(st)?;
        let cs = self.cluster_size();
        let off = st.refcounts.alloc(self.storage.as_ref(), n * cs)?;
        self.check_overlap(st, off, n * cs)?;
        self.file_len.fetch_max(off + n * cs, Ordering::AcqRel);
        Ok(off)
    }

    /// With lazy refcounts, refcount blocks may reach the disk later than the tables
    /// that depend on them: the dirty bit goes to disk first, so that a crash leads
    /// to a repair.
    pub(super) fn before_refcount_change(&self, st: &mut WriteState) -> Result<()> {
        if st.header.lazy_refcounts() && !st.header.is_dirty() {
            self.set_dirty_bit(st, true)?;
        }
        Ok(())
    }

    /// Sets or clears the dirty bit on disk (synchronously).
    pub(super) fn set_dirty_bit(&self, st: &mut WriteState, on: bool) -> Result<()> {
        if st.header.version < 3 {
            return Ok(());
        }
        if on {
            st.header.incompatible_features |= incompat::DIRTY;
        } else {
            st.header.incompatible_features &= !incompat::DIRTY;
        }
        let mut b = [0u8; 8];
        crate::format::be::put_u64(&mut b, 0, st.header.incompatible_features);
        self.storage.write_at(&b, 72)?;
        self.storage.flush()?;
        Ok(())
    }

    pub(super) fn mark_corrupt(&self, st: &mut WriteState) -> Result<()> {
        st.corrupt = true;
        st.header.incompatible_features |= incompat::CORRUPT;
        let mut b = [0u8; 8];
        crate::format::be::put_u64(&mut b, 0, st.header.incompatible_features);
        if st.header.version >= 3 {
            self.storage.write_at(&b, 72)?;
            self.storage.flush()?;
        }
        Ok(())
    }

    /// The L2 table (host offset) that maps guest `guest`, ready to be changed: a new
    /// one when there is none, a private copy when it is shared with a snapshot.
    pub(super) fn l2_for_write(&self, st: &mut WriteState, guest: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let l1_index = (guest / self.meta.header.l2_coverage()) as usize;
        let entry = self
            .l1
            .read()
            .get(l1_index)
            .copied()
            .ok_or_else(|| Error::OutOfRange {
                offset: guest,
                len: 1,
                size: self.size.load(Ordering::Acquire),
            })?;
        let old = l1l2::l1_l2_offset(entry);
        if old != 0 && entry & COPIED != 0 {
            self.l2_table(old)?;
            return Ok(old);
        }
        let new = self.alloc_clusters(st, 1)?;
        let table = if old != 0 {
            let t = self.l2_table(old)?;
            st.pending_frees.push((old, cs, false));
            t.as_ref().clone()
        } else {
            vec![0u64; (cs / 8) as usize]
        };
        self.l2_cache.insert_dirty(new, table);
        self.l1.write()[l1_index] = new | COPIED;
        st.l1_dirty = true;
        Ok(new)
    }

    /// The raw words (entry, bitmap) of guest cluster `guest` in table `l2`.
    pub(super) fn l2_words(&self, l2: u64, guest: u64) -> Result<(u64, u64)> {
        let t = self.l2_table(l2)?;
        Ok(self.words_in(&t, guest))
    }

    fn words_in(&self, t: &L2Table, guest: u64) -> (u64, u64) {
        let h = &self.meta.header;
        let i = ((guest % h.l2_coverage()) / h.cluster_size()) as usize;
        if h.has_extended_l2() {
            (t[2 * i], t[2 * i + 1])
        } else {
            (t[i], 0)
        }
    }

    pub(super) fn set_l2_words(&self, l2: u64, guest: u64, word: u64, bitmap: u64) -> Result<()> {
        let h = &self.meta.header;
        let i = ((guest % h.l2_coverage()) / h.cluster_size()) as usize;
        let ext = h.has_extended_l2();
        loop {
            let done = self.l2_cache.modify(l2, |t| {
                if ext {
                    t[2 * i] = word;
                    t[2 * i + 1] = bitmap;
                } else {
                    t[i] = word;
                }
            });
            if done {
                return Ok(());
            }
            // Evicted while clean: read it again, then change it.
            self.l2_table(l2)?;
        }
    }

    pub(super) fn decode(&self, word: u64, bitmap: u64) -> L2Entry {
        let h = &self.meta.header;
        if h.has_extended_l2() {
            L2Entry::decode_extended(word, bitmap, h.cluster_bits)
        } else {
            L2Entry::decode(word, h.cluster_bits, h.has_data_file())
        }
    }

    /// Drops a reference held by an L2 entry (after the entry has changed in memory).
    pub(super) fn release(&self, st: &mut WriteState, old: L2Entry, punch: bool) {
        let cs = self.cluster_size();
        match old {
            L2Entry::Compressed(d) => {
                st.pending_frees
                    .push((d.offset & !511, (d.sectors + 1) * 512, punch))
            }
            _ if self.data_file.is_some() => {}
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                st.pending_frees.push((host, cs, punch))
            }
            L2Entry::Extended { host, .. } if host != 0 => st.pending_frees.push((host, cs, punch)),
            _ => {}
        }
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let w = self.writer()?;
        let _guest = self.guest_io.read();
        check_range(offset, buf.len() as u64, self.size.load(Ordering::Acquire))?;
        self.record_write(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        // Where the host cluster after the last one this request touched lies: QEMU
        // (qcow2_alloc_host_offset) allocates there first, so that a request stays
        // contiguous in the file, and only then searches from the lowest free one.
        let mut next = None;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cluster = pos - pos % cs;
            let n = ((cluster + cs - pos) as usize).min(buf.len() - done);
            let k = self.write_new_clusters(w, pos, &buf[done..], &mut next)?;
            if k > 0 {
                done += k;
                continue;
            }
            let piece = Piece {
                cluster,
                start: pos - cluster,
                end: pos - cluster + n as u64,
            };
            self.write_piece(w, piece, &buf[done..done + n], &mut next)?;
            done += n;
        }
        self.writeback_if_needed(w)
    }

    /// Writes the clusters from guest `pos` on that hold no data yet, as QEMU's
    /// handle_alloc does: as many in a row as need a new cluster and lie in one L2
    /// table get contiguous host clusters in one allocation and one write, partial
    /// clusters at either end included (their other bytes copied from what they read
    /// as now; not with subclusters). Returns the bytes of `data` written: 0 when the
    /// run is not worth it (a single partial cluster, or the first cluster holds
    /// data), which then takes the general path.
    fn write_new_clusters(
        &self,
        w: &Writer,
        pos: u64,
        data: &[u8],
        next: &mut Option<u64>,
    ) -> Result<usize> {
        let cs = self.cluster_size();
        let h = &self.meta.header;
        let ext = h.has_extended_l2();
        if self.data_file.is_some() || (ext && !pos.is_multiple_of(cs)) {
            return Ok(0);
        }
        let start = pos - pos % cs;
        let req_end = pos + data.len() as u64;
        let table_end = (start / h.l2_coverage() + 1) * h.l2_coverage();
        let span = req_end.min(table_end) - start;
        let max = if ext { span / cs } else { span.div_ceil(cs) };
        let first = start / cs;
        let mut st = w.state.lock();
        if max == 0 || st.corrupt || st.inflight.contains(&first) {
            return Ok(0);
        }
        let l2 = self.l2_for_write(&mut st, start)?;
        let mut count = 0u64;
        while count < max && !st.inflight.contains(&(first + count)) {
            let (word, bitmap) = self.l2_words(l2, start + count * cs)?;
            match self.decode(word, bitmap) {
                L2Entry::Unallocated | L2Entry::Zero { host: None } => {}
                L2Entry::Extended { host: 0, .. } => {}
                _ => break,
            }
            count += 1;
        }
        let single_partial = count == 1 && (pos != start || req_end < start + cs);
        if count == 0 || single_partial {
            return Ok(0);
        }
        let (host, count) = self.alloc_continuing(&mut st, *next, count)?;
        *next = Some(host + count * cs);
        for i in 0..count {
            st.inflight.insert(first + i);
        }
        drop(st);
        let run_end = start + count * cs;
        let data_end = req_end.min(run_end);
        let used = (data_end - pos) as usize;
        let written = if pos == start && data_end == run_end {
            self.storage
                .write_at(&data[..used], host)
                .map_err(Error::from)
        } else {
            // Copy-on-write of the partial clusters at either end.
            let mut content = vec![0u8; (count * cs) as usize];
            let head = (pos - start) as usize;
            let tail = (data_end - start) as usize;
            self.read_range(&mut content[..head], start)
                .and_then(|()| self.read_range(&mut content[tail..], data_end))
                .and_then(|()| {
                    content[head..tail].copy_from_slice(&data[..used]);
                    Ok(self.storage.write_at(&content, host)?)
                })
        };
        let mut st = w.state.lock();
        let res = written.and_then(|()| {
            let l2 = self.l2_for_write(&mut st, start)?;
            // The whole cluster is data: every subcluster allocated, none zero.
            let bitmap = if ext { u32::MAX as u64 } else { 0 };
            for i in 0..count {
                self.set_l2_words(l2, start + i * cs, (host + i * cs) | COPIED, bitmap)?;
            }
            Ok(())
        });
        if res.is_err() {
            st.pending_frees.push((host, count * cs, false));
        }
        for i in 0..count {
            st.inflight.remove(&(first + i));
        }
        w.done.notify_all();
        res.map(|()| used)
    }

    fn write_piece(&self, w: &Writer, p: Piece, data: &[u8], next: &mut Option<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let h = &self.meta.header;
        let ext = h.has_extended_l2();
        let gidx = p.cluster / cs;
        let mut st = self.lock_cluster(w, gidx)?;
        let l2 = self.l2_for_write(&mut st, p.cluster)?;
        let (word, bitmap) = self.l2_words(l2, p.cluster)?;
        let old = self.decode(word, bitmap);
        let sc = cs / SUBCLUSTERS as u64;
        let (s0, s1) = ((p.start / sc) as u32, p.end.div_ceil(sc) as u32);
        let touched: u32 = if ext { range_bits(s0, s1) } else { 0 };

        // Overwrite in place: the cluster is ours alone (or lives in a data file).
        let private = |copied: bool| copied || self.data_file.is_some();
        match old {
            L2Entry::Normal { host, copied } if private(copied) => {
                drop(st);
                *next = Some(host + cs);
                return Ok(self.data_storage().write_at(data, host + p.start)?);
            }
            L2Entry::Extended {
                host,
                alloc,
                copied,
                ..
            } if host != 0 && private(copied) && alloc & touched == touched => {
                drop(st);
                *next = Some(host + cs);
                return Ok(self.data_storage().write_at(data, host + p.start)?);
            }
            _ => {}
        }

        // Anything else allocates (a cluster, or subclusters of our own cluster).
        let (host, fresh) = match old {
            L2Entry::Extended { host, copied, .. } if host != 0 && private(copied) => (host, false),
            L2Entry::Zero { host: Some(host) }
                if word & COPIED != 0 || self.data_file.is_some() =>
            {
                (host, false)
            }
            _ if self.data_file.is_some() => (p.cluster, false),
            _ => (self.alloc_continuing(&mut st, *next, 1)?.0, true),
        };
        *next = Some(host + cs);
        // A new cluster at or past the end of the file already reads as zeros. When
        // the rest of the cluster must read as zeros too (no backing file shows
        // through), only the new bytes are written, after the cluster is reserved
        // (so that it is not left sparse), as QEMU does with a zero-range write
        // instead of copying zeros. Decided under the lock: nobody else writes this
        // cluster, and nothing past the end of the file can appear in it.
        let zero_cow = fresh
            && !ext
            && self.backing.is_none()
            && matches!(old, L2Entry::Unallocated | L2Entry::Zero { .. })
            && self.storage.len().is_ok_and(|end| host >= end);
        st.inflight.insert(gidx);
        drop(st);

        // Which bytes of the cluster to write: with subclusters, only the touched
        // subclusters of a cluster that had no data; otherwise the whole cluster.
        let whole = !ext
            || matches!(old, L2Entry::Compressed(_))
            || matches!(old, L2Entry::Extended { host, copied, .. } if host != 0 && !private(copied));
        let (b0, b1) = if whole {
            (0, cs)
        } else {
            (s0 as u64 * sc, s1 as u64 * sc)
        };
        let result = (|| -> Result<()> {
            if p.start == b0 && p.end == b1 {
                // The write covers all it allocates: no copy-on-write, no copy.
                self.data_storage().write_at(data, host + b0)?;
                return Ok(());
            }
            if zero_cow {
                self.data_storage().preallocate(host, cs, false)?;
                self.data_storage().write_at(data, host + p.start)?;
                return Ok(());
            }
            let mut content = vec![0u8; (b1 - b0) as usize];
            if p.start > b0 || p.end < b1 {
                // Copy-on-write: what the cluster reads as now.
                self.read_range(&mut content, p.cluster + b0)?;
            }
            content[(p.start - b0) as usize..(p.end - b0) as usize].copy_from_slice(data);
            self.data_storage().write_at(&content, host + b0)?;
            Ok(())
        })();

        let mut st = w.state.lock();
        if let Err(e) = result {
            if fresh {
                st.pending_frees.push((host, cs, false));
            }
            self.finish_inflight(w, &mut st, gidx);
            return Err(e);
        }
        let (new_word, new_bitmap) = if ext {
            let bits = if whole { u32::MAX } else { range_bits(s0, s1) };
            let (alloc, zero) = match old {
                L2Entry::Extended {
                    host: h0,
                    alloc,
                    zero,
                    copied,
                } if h0 != 0 && private(copied) => (alloc | bits, zero & !bits),
                L2Entry::Extended { host: 0, zero, .. } => (bits, zero & !bits),
                _ => (bits, 0),
            };
            (host | COPIED, alloc as u64 | (zero as u64) << 32)
        } else {
            (host | COPIED, 0)
        };
        let res = self
            .l2_for_write(&mut st, p.cluster)
            .and_then(|l2| self.set_l2_words(l2, p.cluster, new_word, new_bitmap));
        if res.is_ok() && fresh {
            self.release(&mut st, old, false);
        }
        self.finish_inflight(w, &mut st, gidx);
        res
    }

    /// Makes `offset..offset+len` read as zeros. With `unmap`, clusters entirely
    /// inside the range are freed.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let w = self.writer()?;
        let _guest = self.guest_io.read();
        check_range(offset, len, self.size.load(Ordering::Acquire))?;
        self.record_write(offset, len)?;
        let h = &self.meta.header;
        if h.version < 3 && self.backing.is_none() {
            return self.zero_v2_by_unallocating(w, offset, len);
        }
        let cs = self.cluster_size();
        // The granule a zero flag covers: a subcluster, or a cluster.
        let granule = if h.has_extended_l2() {
            cs / SUBCLUSTERS as u64
        } else {
            cs
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster = pos - pos % cs;
            let n = (cluster + cs).min(end) - pos;
            let p = Piece {
                cluster,
                start: pos - cluster,
                end: pos - cluster + n,
            };
            let g0 = p.start.div_ceil(granule) * granule;
            let g1 = (p.end / granule) * granule;
            let at_end = cluster + cs >= self.size.load(Ordering::Acquire)
                && p.end + cluster == self.size.load(Ordering::Acquire);
            if h.version >= 3 && (g0 < g1 || (at_end && p.start.is_multiple_of(granule))) {
                let g1 = if at_end && p.start == 0 {
                    // The last cluster, zeroed from its start: as a whole cluster.
                    cs
                } else if at_end {
                    p.end.div_ceil(granule) * granule
                } else {
                    g1
                };
                // Head and tail that do not cover a whole granule get zero bytes.
                if p.start < g0 {
                    self.write_zero_bytes(w, cluster + p.start, g0 - p.start)?;
                }
                self.zero_granules(w, cluster, g0, g1.min(cs), unmap)?;
                if g1 < p.end {
                    self.write_zero_bytes(w, cluster + g1, p.end - g1)?;
                }
            } else {
                self.write_zero_bytes(w, pos, n)?;
            }
            pos += n;
        }
        self.writeback_if_needed(w)
    }

    pub(super) fn write_zero_bytes(&self, w: &Writer, pos: u64, n: u64) -> Result<()> {
        let cs = self.cluster_size();
        let cluster = pos - pos % cs;
        // Nothing to do when the bytes already read as zeros and nothing is allocated.
        let st = self.lock_cluster(w, cluster / cs)?;
        let (run, run_len) = self.lookup_run(pos, n)?;
        drop(st);
        if run_len >= n
            && (matches!(run, super::mapping::Run::Zero { .. })
                || (matches!(run, super::mapping::Run::Unallocated { .. })
                    && self.backing.is_none()))
        {
            return Ok(());
        }
        let zeros = vec![0u8; n as usize];
        self.write_piece(
            w,
            Piece {
                cluster,
                start: pos - cluster,
                end: pos - cluster + n,
            },
            &zeros,
            &mut None,
        )
    }

    /// Sets the zero flag (or zero bits) for bytes `g0..g1` of the cluster at guest
    /// `cluster`, which are granule aligned.
    fn zero_granules(&self, w: &Writer, cluster: u64, g0: u64, g1: u64, unmap: bool) -> Result<()> {
        if g0 >= g1 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let ext = self.meta.header.has_extended_l2();
        let mut st = self.lock_cluster(w, cluster / cs)?;
        let l2 = self.l2_for_write(&mut st, cluster)?;
        let (word, bitmap) = self.l2_words(l2, cluster)?;
        let old = self.decode(word, bitmap);
        let whole = g0 == 0 && g1 == cs;
        let (new_word, new_bitmap, free) = if ext {
            let sc = cs / SUBCLUSTERS as u64;
            let bits = range_bits((g0 / sc) as u32, (g1 / sc) as u32) as u64;
            match old {
                L2Entry::Compressed(_) if !whole => {
                    drop(st);
                    return self.write_zero_bytes(w, cluster + g0, g1 - g0);
                }
                L2Entry::Compressed(_) => (0, BITMAP_ALL_ZEROES, true),
                _ if whole && unmap && word & OFFSET_MASK != 0 => (0, BITMAP_ALL_ZEROES, true),
                _ => (word, (bitmap & !bits) | (bits << 32), false),
            }
        } else {
            let allocated = matches!(
                old,
                L2Entry::Normal { .. } | L2Entry::Zero { host: Some(_) }
            );
            let compressed = matches!(old, L2Entry::Compressed(_));
            if compressed || (unmap && allocated) {
                (ZERO, 0, true)
            } else {
                (word | ZERO, 0, false)
            }
        };
        if (new_word, new_bitmap) != (word, bitmap) {
            self.set_l2_words(l2, cluster, new_word, new_bitmap)?;
            if free {
                self.release(&mut st, old, true);
            }
        }
        Ok(())
    }

    /// Discards whole clusters of `offset..offset+len` (partial clusters are left
    /// alone, as QEMU does): they read as zeros afterwards and their host clusters
    /// are freed. A v2 image over a backing file is left alone, as QEMU leaves it.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _guest = self.guest_io.read();
        self.discard_clusters(offset, len)
    }

    /// `discard` inside a guest request that already holds `guest_io`.
    pub(super) fn discard_clusters(&self, offset: u64, len: u64) -> Result<()> {
        let w = self.writer()?;
        let size = self.size.load(Ordering::Acquire);
        check_range(offset, len, size)?;
        self.record_write(offset, len)?;
        let cs = self.cluster_size();
        let h = &self.meta.header;
        if h.version < 3 && self.backing.is_some() {
            // Without a zero flag, a discarded cluster would show the backing file:
            // QEMU does not discard at all (the request succeeds).
            return Ok(());
        }
        let ext = h.has_extended_l2();
        let mut pos = offset.div_ceil(cs) * cs;
        let end = if offset + len == size {
            offset + len
        } else {
            (offset + len) / cs * cs
        };
        while pos < end {
            let mut st = self.lock_cluster(w, pos / cs)?;
            let l1_index = (pos / h.l2_coverage()) as usize;
            let l1e = self.l1.read().get(l1_index).copied().unwrap_or(0);
            if l1l2::l1_l2_offset(l1e) == 0 && self.backing.is_none() {
                // Nothing is allocated in this whole table's range.
                pos = (pos / h.l2_coverage() + 1) * h.l2_coverage();
                continue;
            }
            let l2 = self.l2_for_write(&mut st, pos)?;
            let (word, bitmap) = self.l2_words(l2, pos)?;
            let old = self.decode(word, bitmap);
            let allocated = !matches!(old, L2Entry::Unallocated | L2Entry::Zero { host: None })
                && !matches!(old, L2Entry::Extended { host: 0, .. });
            let (new_word, new_bitmap) = if self.backing.is_some() || allocated {
                if ext {
                    (0, BITMAP_ALL_ZEROES)
                } else if h.version >= 3 {
                    (ZERO, 0)
                } else {
                    (0, 0)
                }
            } else {
                (word, bitmap)
            };
            if (new_word, new_bitmap) != (word, bitmap) {
                self.set_l2_words(l2, pos, new_word, new_bitmap)?;
                self.release(&mut st, old, true);
            }
            drop(st);
            pos += cs;
        }
        self.writeback_if_needed(w)
    }

    /// Writes dirty L2 tables when the cache holds more than it should (after the
    /// refcount blocks they depend on).
    pub(super) fn writeback_if_needed(&self, w: &Writer) -> Result<()> {
        if !self.l2_cache.over_capacity() {
            return Ok(());
        }
        let mut st = w.state.lock();
        self.write_refcounts_then_l2(&mut st)
    }

    pub(super) fn write_refcounts_then_l2(&self, st: &mut WriteState) -> Result<()> {
        let dirty = self.l2_cache.dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        // Refcount blocks first (not needed while the dirty bit covers them with
        // lazy refcounts); the sync also makes the data the tables point to durable.
        let lazy = st.header.lazy_refcounts() && st.header.is_dirty();
        if st.refcounts.has_dirty_blocks() && !lazy {
            st.refcounts.flush_blocks(self.storage.as_ref())?;
        }
        self.sync_data()?;
        let mut raw = vec![0u8; self.cluster_size() as usize];
        for (off, t) in dirty {
            for (i, e) in t.iter().enumerate() {
                crate::format::be::put_u64(&mut raw, i * 8, *e);
            }
            self.storage.write_at(&raw, off)?;
            self.l2_cache.mark_clean(off, &t);
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        if let Some(d) = &self.data_file {
            d.flush()?;
        }
        self.storage.flush()?;
        Ok(())
    }

    /// Makes everything written so far durable, in dependency order.
    pub fn flush(&self) -> Result<()> {
        let Some(w) = self.writer.as_ref() else {
            return Ok(());
        };
        let mut st = w.state.lock();
        self.flush_locked(&mut st)
    }

    /// `flush` with the writer's lock held.
    pub(super) fn flush_locked(&self, st: &mut WriteState) -> Result<()> {
        let io = self.storage.as_ref();
        // 1 and 2: refcount blocks, then L2 tables.
        st.refcounts.flush_blocks(io)?;
        self.write_refcounts_then_l2(st)?;
        self.sync_data()?;
        // 3: the L1 table, now that every table it points to is on disk.
        if st.l1_dirty {
            let l1 = self.l1.read();
            let mut raw = vec![0u8; l1.len() * 8];
            for (i, e) in l1.iter().enumerate() {
                crate::format::be::put_u64(&mut raw, i * 8, *e);
            }
            io.write_at(&raw, st.header.l1_table_offset)?;
            drop(l1);
            io.flush()?;
            st.l1_dirty = false;
        }
        // 4: the frees whose references are now gone from the disk.
        if !st.pending_frees.is_empty() {
            let frees = std::mem::take(&mut st.pending_frees);
            let cs = self.cluster_size();
            for (off, len, punch) in frees {
                st.refcounts.free(io, off, len)?;
                let mut c = off & !(cs - 1);
                while c < off + len {
                    if st.refcounts.get(io, c / cs)? == 0 {
                        self.l2_cache.remove(c);
                        // The next compressed cluster must not go into a free
                        // cluster that something else may take meanwhile.
                        if st.free_byte_offset / cs == c / cs {
                            st.free_byte_offset = 0;
                        }
                        if punch {
                            io.punch_hole(c, cs)?;
                        }
                    }
                    c += cs;
                }
            }
            st.refcounts.flush_blocks(io)?;
            io.flush()?;
        }
        Ok(())
    }

    /// The checks QEMU makes before it changes anything in a resize.
    pub(super) fn check_resizable(&self, new_size: u64) -> Result<()> {
        let w = self.writer()?;
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(
                "Image size must be a multiple of 512 bytes".into(),
            ));
        }
        let old_size = self.size.load(Ordering::Acquire);
        self.check_bitmaps_resizable(new_size)?;
        let st = w.state.lock();
        if st.header.version < 3 && st.header.nb_snapshots > 0 && new_size != old_size {
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        Ok(())
    }

    /// Changes the virtual size: the L1 table, the header, the data file. Growing
    /// keeps every byte (and, with `zero_old_tail`, zeroes what the last cluster
    /// holds past the old end); shrinking needs `shrink` and drops everything past
    /// the new end.
    pub(super) fn change_size(
        &self,
        new_size: u64,
        shrink: bool,
        zero_old_tail: bool,
    ) -> Result<()> {
        let w = self.writer()?;
        self.check_resizable(new_size)?;
        let old_size = self.size.load(Ordering::Acquire);
        if new_size < old_size {
            if !shrink {
                return Err(Error::InvalidArgument(
                    "Use the --shrink option to perform a shrink operation.".into(),
                ));
            }
            self.discard_tail(w, new_size, old_size)?;
        }
        self.flush()?;
        if new_size < old_size {
            // Give back the space past the last cluster still in use.
            let mut st = w.state.lock();
            let io = self.storage.as_ref();
            let cs = self.cluster_size();
            let mut end = io.len()?.div_ceil(cs);
            while end > 1 && st.refcounts.get(io, end - 1)? == 0 {
                end -= 1;
            }
            if end * cs < io.len()? {
                io.set_len(end * cs)?;
            }
        }
        let mut st = w.state.lock();
        let h = &self.meta.header;
        let cs = self.cluster_size();
        let needed = new_size.div_ceil(h.l2_coverage());
        if needed * 8 > crate::format::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(
                "The image size is too large for this cluster size".into(),
            ));
        }
        let io = self.storage.as_ref();
        let cur = self.l1.read().len() as u64;
        if needed > cur {
            // A new, larger L1 table, written before the header points to it.
            let bytes = needed * 8;
            let new_off = self.alloc_clusters(&mut st, bytes.div_ceil(cs))?;
            st.refcounts.flush_blocks(io)?;
            io.flush()?;
            let mut l1 = self.l1.write();
            l1.resize(needed as usize, 0);
            let mut raw = vec![0u8; bytes as usize];
            for (i, e) in l1.iter().enumerate() {
                crate::format::be::put_u64(&mut raw, i * 8, *e);
            }
            io.write_at(&raw, new_off)?;
            io.flush()?;
            let old_off = st.header.l1_table_offset;
            let old_bytes = cur * 8;
            st.header.l1_table_offset = new_off;
            st.header.l1_size = needed as u32;
            drop(l1);
            self.size.store(new_size, Ordering::Release);
            self.write_header(&mut st)?;
            io.flush()?;
            if old_bytes > 0 {
                st.refcounts.free(io, old_off, old_bytes)?;
                st.refcounts.flush_blocks(io)?;
                io.flush()?;
            }
        } else {
            self.size.store(new_size, Ordering::Release);
            self.write_header(&mut st)?;
            io.flush()?;
        }
        drop(st);
        self.resize_bitmaps(new_size)?;
        // The external data file follows the disk exactly, as QEMU resizes it.
        if let Some(d) = &self.data_file {
            if d.len()? != new_size {
                d.set_len(new_size)?;
            }
        }
        // Bytes past the old end inside its last cluster may hold old data: zero them.
        let tail_end = old_size.div_ceil(cs) * cs;
        if zero_old_tail && new_size > old_size && !old_size.is_multiple_of(cs) {
            let len = tail_end.min(new_size) - old_size;
            if !self.reads_as_zeros(old_size, len)? {
                self.write_zeroes(old_size, len, false)?;
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Whether `offset..offset+len` reads as zeros without a look at any data:
    /// zero clusters, or unallocated ones with no backing file under them.
    fn reads_as_zeros(&self, offset: u64, len: u64) -> Result<bool> {
        use super::mapping::Run;
        let (run, n) = self.lookup_run(offset, len)?;
        let no_backing = self.backing.as_ref().is_none_or(|b| b.size() <= offset);
        Ok(n >= len
            && match run {
                Run::Zero { .. } => true,
                Run::Unallocated { .. } => no_backing,
                _ => false,
            })
    }

    /// Points the image at another backing file (or none), changing only the header,
    /// as `qemu-img rebase -u` does. The open image keeps reading its old backing.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let w = self.writer()?;
        if let Some(n) = name {
            if n.len() > crate::format::MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument("Backing file name too long".into()));
            }
        }
        let mut st = w.state.lock();
        st.extras.backing_file = name.map(str::to_string);
        st.extras.backing_format = name.and(format).map(str::to_string);
        self.write_header(&mut st)?;
        self.storage.flush()?;
        Ok(())
    }

    /// Frees everything at or past `new_size` (for shrinking).
    fn discard_tail(&self, w: &Writer, new_size: u64, old_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let h = &self.meta.header;
        let start = new_size.div_ceil(cs) * cs;
        if start < old_size && !new_size.is_multiple_of(cs) {
            // The last cluster is partly kept: zero its tail so growing later reads zeros.
            self.write_zeroes(new_size, start.min(old_size) - new_size, false)?;
        }
        let mut pos = start;
        while pos < old_size {
            let mut st = self.lock_cluster(w, pos / cs)?;
            let l1_index = (pos / h.l2_coverage()) as usize;
            let l1e = self.l1.read().get(l1_index).copied().unwrap_or(0);
            if l1l2::l1_l2_offset(l1e) != 0 {
                let l2 = self.l2_for_write(&mut st, pos)?;
                let (word, bitmap) = self.l2_words(l2, pos)?;
                if (word, bitmap) != (0, 0) {
                    let old = self.decode(word, bitmap);
                    self.set_l2_words(l2, pos, 0, 0)?;
                    self.release(&mut st, old, true);
                }
            }
            pos += cs;
        }
        Ok(())
    }
}

/// Bits s0..s1 set.
fn range_bits(s0: u32, s1: u32) -> u32 {
    let hi = if s1 >= 32 { u32::MAX } else { (1u32 << s1) - 1 };
    let lo = if s0 >= 32 { u32::MAX } else { (1u32 << s0) - 1 };
    hi & !lo
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Some(w) = &self.writer {
            // Bitmaps left in use are not trusted by anyone: that is what a failed
            // store leaves behind.
            let _ = self.store_bitmaps();
            if self.flush().is_ok() {
                // Everything is on disk: a lazy-refcounts image is clean again.
                let mut st = w.state.lock();
                if st.header.is_dirty() && !st.corrupt {
                    let _ = self.set_dirty_bit(&mut st, false);
                }
            }
        }
    }
}
