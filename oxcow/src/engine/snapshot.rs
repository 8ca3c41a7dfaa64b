//! Internal snapshots: list, create, apply (revert to) and delete, with QEMU's
//! semantics (block/qcow2-snapshot.c) and reference counting
//! (qcow2_update_snapshot_refcount).
//!
//! A snapshot is a copy of the active L1 table plus one more reference to every L2
//! table and data cluster it reaches; the write path then copies shared clusters on
//! write (their COPIED flag is clear). Every operation:
//! - runs under the writer's lock, once no allocation is under way, after a flush;
//! - on v3 images, sets the dirty bit first (synced) and clears it last: a crash in
//!   between leaves refcounts and COPIED flags for the next read-write open to
//!   recount and repair (`check.rs`, `repair_dirty`), whichever writes reached the disk;
//! - orders its writes so that no reference reaches the disk before the refcount
//!   covering it, and no refcount is decreased before the reference is gone from the
//!   disk, so a crash of a v2 image leaks clusters at worst;
//! - switches the visible state with one small header write: the snapshot table
//!   (nb_snapshots, snapshots_offset) or, for apply, the new active L1 table (size,
//!   l1_size, l1_table_offset), each written whole to newly allocated clusters and
//!   synced before the header names it.

use super::refcounts::Stop;
use super::writestate::{WriteState, Writer};
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::be::{put_u32, put_u64};
use crate::format::l1l2::{self, L2Entry, COPIED};
use crate::format::snapshot::SnapshotEntry;
use crate::format::{MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES};
use parking_lot::MutexGuard;
use std::sync::atomic::Ordering;

/// Where nb_snapshots and snapshots_offset sit in the header (contiguous).
const HEADER_SNAPSHOT_FIELDS: u64 = 60;
/// Where size, crypt_method, l1_size and l1_table_offset sit (contiguous).
const HEADER_SIZE_FIELDS: u64 = 24;
/// QEMU keeps snapshot names in a 256-byte buffer: longer names are cut.
const MAX_NAME_BYTES: usize = 255;

/// The index of the snapshot `id_or_name` names: an ID first, then a name, as QEMU
/// (and `qemu-img snapshot -a/-d`) looks them up.
pub fn find_snapshot(list: &[SnapshotEntry], id_or_name: &str) -> Option<usize> {
    list.iter()
        .position(|s| s.id == id_or_name)
        .or_else(|| list.iter().position(|s| s.name == id_or_name))
}

/// The ID QEMU gives a new snapshot: one more than the largest numeric ID (an ID is
/// read as strtoul does: its leading digits, 0 when there are none).
pub fn next_snapshot_id(list: &[SnapshotEntry]) -> String {
    let max = list
        .iter()
        .map(|s| {
            let digits: String = s.id.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits
                .parse::<u64>()
                .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX - 1 })
        })
        .max()
        .unwrap_or(0);
    (max.saturating_add(1)).to_string()
}

fn not_found(id_or_name: &str) -> Error {
    Error::InvalidArgument(format!("snapshot '{id_or_name}' not found"))
}

impl Qcow2 {
    /// The snapshots of the image, in table order.
    pub fn snapshots(&self) -> Vec<SnapshotEntry> {
        match &self.writer {
            Some(w) => w.state.lock().snapshots.clone(),
            None => self.meta.snapshots.clone(),
        }
    }

    /// Creates a snapshot of the active disk named `name`; returns its entry.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotEntry> {
        let w = self.writer()?;
        let _drained = self.guest_io.write();
        let mut st = self.lock_for_snapshots(w)?;
        if st.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let mut cut = name.len().min(MAX_NAME_BYTES);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let name = &name[..cut];
        self.flush_locked(&mut st)?;
        let marked = self.mark_dirty(&mut st)?;
        let io = self.storage.as_ref();
        let cs = self.cluster_size();

        // The snapshot's own copy of the active L1 table, flags and all as QEMU
        // copies it (COPIED means nothing in a snapshot's table).
        let l1 = self.l1.read().clone();
        let l1_offset = if l1.is_empty() {
            0
        } else {
            self.alloc_clusters(&mut st, (l1.len() as u64 * 8).div_ceil(cs))?
        };
        if !l1.is_empty() {
            io.write_at(&encode_table(&l1), l1_offset)?;
        }
        // One more reference to everything the active tables reach; the active
        // tables lose COPIED where they are now shared.
        self.update_references(&mut st, &l1, false)?;
        self.fix_copied(&mut st)?;

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let entry = SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            id: next_snapshot_id(&st.snapshots),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // QEMU takes the time in microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size.load(Ordering::Acquire)),
            icount: Some(0),
            extra: Vec::new(),
        };
        let mut list = st.snapshots.clone();
        list.push(entry.clone());
        self.write_snapshot_table(&mut st, list)?;
        self.unmark_dirty(&mut st, marked)?;
        Ok(entry)
    }

    /// Makes the active disk what snapshot `id_or_name` holds (its contents and its
    /// disk size); the snapshot stays.
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        let w = self.writer()?;
        let _drained = self.guest_io.write();
        // QEMU refuses to revert a disk that persistent bitmaps describe.
        if !self.bitmaps().is_empty() {
            return Err(Error::Unsupported("Device has active dirty bitmaps".into()));
        }
        let mut st = self.lock_for_snapshots(w)?;
        let idx = find_snapshot(&st.snapshots, id_or_name).ok_or_else(|| not_found(id_or_name))?;
        let sn = st.snapshots[idx].clone();
        let cur_size = self.size.load(Ordering::Acquire);
        let new_size = sn.disk_size.unwrap_or(cur_size);
        let h = &self.meta.header;
        if h.version < 3 && new_size != cur_size {
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let cs = self.cluster_size();
        let cur_len = self.l1.read().len() as u64;
        let entries = cur_len
            .max(sn.l1_size as u64)
            .max(new_size.div_ceil(h.l2_coverage()));
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(
                "The image size is too large for this cluster size".into(),
            ));
        }
        self.flush_locked(&mut st)?;
        let marked = self.mark_dirty(&mut st)?;
        let io = self.storage.as_ref();

        // 1. The snapshot's references gain the active disk as a holder.
        self.update_references(&mut st, &sn_l1, false)?;
        // 2. The new active L1 table, in clusters of its own, durable (with the
        //    refcounts) before the header names it.
        let mut new_l1: Vec<u64> = sn_l1.iter().map(|e| e & !COPIED).collect();
        new_l1.resize(entries as usize, 0);
        // (An empty disk has no L1 table at all, as QEMU leaves it.)
        let new_off = if entries == 0 {
            0
        } else {
            self.alloc_clusters(&mut st, (entries * 8).div_ceil(cs))?
        };
        st.refcounts.flush_blocks(io)?;
        if entries > 0 {
            io.write_at(&encode_table(&new_l1), new_off)?;
        }
        io.flush()?;
        // 3. One header write switches the active disk.
        let mut fields = [0u8; 24];
        put_u64(&mut fields, 0, new_size);
        // crypt_method stays 0: encrypted images are never open for writing.
        put_u32(&mut fields, 12, entries as u32);
        put_u64(&mut fields, 16, new_off);
        io.write_at(&fields, HEADER_SIZE_FIELDS)?;
        io.flush()?;
        let old_off = st.header.l1_table_offset;
        st.header.l1_table_offset = new_off;
        st.header.l1_size = entries as u32;
        st.header.size = new_size;
        self.size.store(new_size, Ordering::Release);
        let old_l1 = std::mem::replace(&mut *self.l1.write(), new_l1);
        st.l1_dirty = false;
        // 4. The old active tables are unreferenced on disk: drop their references.
        self.update_references(&mut st, &old_l1, true)?;
        if !old_l1.is_empty() {
            self.change_refcount(&mut st, old_off, old_l1.len() as u64 * 8, true)?;
        }
        self.l2_cache.clear();
        // 5. COPIED where the new active clusters are ours alone.
        self.fix_copied(&mut st)?;
        self.flush_locked(&mut st)?;
        self.unmark_dirty(&mut st, marked)?;
        Ok(())
    }

    /// Deletes snapshot `id_or_name`, freeing what only it used.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<SnapshotEntry> {
        let w = self.writer()?;
        let _drained = self.guest_io.write();
        let mut st = self.lock_for_snapshots(w)?;
        let idx = find_snapshot(&st.snapshots, id_or_name).ok_or_else(|| not_found(id_or_name))?;
        let sn = st.snapshots[idx].clone();
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        self.flush_locked(&mut st)?;
        let marked = self.mark_dirty(&mut st)?;
        let mut list = st.snapshots.clone();
        list.remove(idx);
        // The table without it reaches the disk first; then its references go.
        self.write_snapshot_table(&mut st, list)?;
        self.update_references(&mut st, &sn_l1, true)?;
        if sn.l1_size > 0 {
            self.change_refcount(&mut st, sn.l1_table_offset, sn.l1_size as u64 * 8, true)?;
        }
        self.fix_copied(&mut st)?;
        self.flush_locked(&mut st)?;
        self.unmark_dirty(&mut st, marked)?;
        Ok(sn)
    }

    /// Reads the snapshot that `id` and `name` select (both must match when both are
    /// given) instead of the active disk from now on, as QEMU's
    /// bdrv_snapshot_load_tmp does: read-only images only; the disk size stays, and
    /// past the snapshot's own L1 table nothing is allocated.
    pub fn load_snapshot_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if self.writer.is_some() {
            return Err(Error::InvalidArgument("Device is not readonly".into()));
        }
        let found = (id.is_some() || name.is_some())
            .then(|| {
                self.meta
                    .snapshots
                    .iter()
                    .find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
            })
            .flatten()
            .ok_or_else(|| Error::InvalidArgument("Can't find snapshot".into()))?;
        let l1 = self.read_snapshot_l1(found)?;
        *self.l1.write() = l1;
        self.l2_cache.clear();
        Ok(())
    }

    /// The writer's lock, once no guest cluster allocation is under way.
    fn lock_for_snapshots<'a>(&'a self, w: &'a Writer) -> Result<MutexGuard<'a, WriteState>> {
        let mut st = w.state.lock();
        while !st.inflight.is_empty() {
            w.done.wait(&mut st);
        }
        if st.corrupt {
            return Err(Error::Unsupported(
                "the image was marked corrupt; writes are stopped".into(),
            ));
        }
        if self.data_file.is_some() {
            return Err(Error::Unsupported("Operation not supported".into()));
        }
        Ok(st)
    }

    /// Sets the dirty bit (v3) unless it is set already; says whether it did.
    fn mark_dirty(&self, st: &mut WriteState) -> Result<bool> {
        if st.header.version < 3 || st.header.is_dirty() {
            return Ok(false);
        }
        self.set_dirty_bit(st, true)?;
        Ok(true)
    }

    /// Clears the dirty bit set by `mark_dirty`, once everything is on disk. Also
    /// ends the current compressed cluster: references were dropped outside the
    /// write path, and the cluster it packs into may be free (and reused) now.
    fn unmark_dirty(&self, st: &mut WriteState, marked: bool) -> Result<()> {
        st.free_byte_offset = 0;
        if marked {
            self.flush_locked(st)?;
            self.set_dirty_bit(st, false)?;
        }
        Ok(())
    }

    /// A snapshot's L1 table, checked before use.
    fn read_snapshot_l1(&self, sn: &SnapshotEntry) -> Result<Vec<u64>> {
        let bytes = sn.l1_size as u64 * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(
                format!("snapshot {} has an L1 table too large", sn.id),
                sn.l1_table_offset,
            ));
        }
        if bytes == 0 {
            return Ok(Vec::new());
        }
        if !sn.l1_table_offset.is_multiple_of(self.cluster_size())
            || sn.l1_table_offset.saturating_add(bytes) > self.file_len()
        {
            return Err(Error::corrupt(
                format!(
                    "snapshot {} has its L1 table at {:#x}, unaligned or past the end of the file",
                    sn.id, sn.l1_table_offset
                ),
                sn.l1_table_offset,
            ));
        }
        super::read_u64_table(
            self.storage.as_ref(),
            sn.l1_table_offset,
            sn.l1_size as usize,
        )
    }

    /// Adds (or removes) one reference to every L2 table `l1` points to and to every
    /// cluster those tables point to, as qcow2_update_snapshot_refcount does with
    /// +1 / -1.
    fn update_references(&self, st: &mut WriteState, l1: &[u64], decrease: bool) -> Result<()> {
        let h = &self.meta.header;
        let cs = h.cluster_size();
        let n = (cs / h.l2_entry_size()) as usize;
        let ext = h.has_extended_l2();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = l1l2::l1_l2_offset(e);
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                return Err(Error::corrupt(
                    format!("L2 table at {l2:#x} (L1 index {i}) is unaligned"),
                    l2,
                ));
            }
            let t = self.l2_table(l2)?;
            for k in 0..n {
                let entry = if ext {
                    self.decode(t[2 * k], t[2 * k + 1])
                } else {
                    self.decode(t[k], 0)
                };
                let (off, len) = match entry {
                    L2Entry::Compressed(d) => (d.offset & !511, (d.sectors + 1) * 512),
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => (host, cs),
                    L2Entry::Extended { host, .. } if host != 0 => (host, cs),
                    _ => continue,
                };
                self.change_refcount(st, off, len, decrease)?;
            }
            self.change_refcount(st, l2, cs, decrease)?;
        }
        Ok(())
    }

    /// One reference more (or less) for every cluster of `offset..offset+len`.
    fn change_refcount(
        &self,
        st: &mut WriteState,
        offset: u64,
        len: u64,
        decrease: bool,
    ) -> Result<()> {
        let io = self.storage.as_ref();
        if !decrease {
            self.check_inside_file(offset, len)?;
            // A refcount at its largest cannot take one more reference (with
            // refcount_bits=1, any shared cluster): QEMU's update fails with EINVAL.
            let cs = self.cluster_size();
            let max = crate::format::refcount::max_value(st.header.refcount_order);
            let mut c = offset / cs;
            while c * cs < offset + len {
                if st.refcounts.get(io, c)? >= max {
                    return Err(Error::InvalidArgument("Invalid argument".into()));
                }
                c += 1;
            }
        }
        loop {
            match st.refcounts.update(io, offset, len, 1, decrease) {
                Ok(()) if decrease => return self.discard_freed(st, offset, len),
                Ok(()) => return Ok(()),
                // A new refcount block was placed; nothing was changed: again.
                Err(Stop::Again) if !decrease => continue,
                Err(Stop::Again) => {
                    return Err(Error::corrupt(
                        "refcount block missing for a cluster being freed",
                        offset,
                    ))
                }
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
    }

    /// Clusters of `offset..offset+len` left without references leave the L2 cache
    /// and become holes, as QEMU discards what snapshot operations free
    /// (pass-discard-snapshot). Only called once nothing on disk points to them.
    fn discard_freed(&self, st: &mut WriteState, offset: u64, len: u64) -> Result<()> {
        let io = self.storage.as_ref();
        let cs = self.cluster_size();
        let mut c = offset / cs * cs;
        while c < offset + len {
            if st.refcounts.get(io, c / cs)? == 0 {
                self.l2_cache.remove(c);
                io.punch_hole(c, cs)?;
            }
            c += cs;
        }
        Ok(())
    }

    /// A reference taken from an image must point inside the file.
    fn check_inside_file(&self, offset: u64, len: u64) -> Result<()> {
        if offset == 0 || offset.saturating_add(len) > self.file_len() {
            return Err(Error::corrupt(
                format!("a snapshot references {len} bytes at {offset:#x}, outside the file"),
                offset,
            ));
        }
        Ok(())
    }

    /// Sets COPIED on the active L1 and L2 entries whose cluster has exactly one
    /// reference and clears it elsewhere (qcow2_update_snapshot_refcount with 0).
    /// Changed tables are left dirty in the cache (and the L1 in memory) for the
    /// next flush.
    pub(super) fn fix_copied(&self, st: &mut WriteState) -> Result<()> {
        if self.data_file.is_some() {
            return Ok(());
        }
        let h = &self.meta.header;
        let cs = h.cluster_size();
        let io = self.storage.as_ref();
        let n = (cs / h.l2_entry_size()) as usize;
        let step = if h.has_extended_l2() { 2 } else { 1 };
        let l1 = self.l1.read().clone();
        let mut new_l1 = l1.clone();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = l1l2::l1_l2_offset(e);
            if l2 == 0 {
                continue;
            }
            let t = self.l2_table(l2)?;
            let mut table: Option<Vec<u64>> = None;
            for k in 0..n {
                let word = t[k * step];
                let bitmap = if step == 2 { t[k * step + 1] } else { 0 };
                let host = match self.decode(word, bitmap) {
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => host,
                    L2Entry::Extended { host, .. } if host != 0 => host,
                    _ => continue,
                };
                let alone = st.refcounts.get(io, host / cs)? == 1;
                let want = if alone { word | COPIED } else { word & !COPIED };
                if want != word {
                    table.get_or_insert_with(|| t.as_ref().clone())[k * step] = want;
                }
            }
            if let Some(changed) = table {
                self.l2_cache.insert_dirty(l2, changed);
                // Dirty tables stay cached until written: keep the cache bounded
                // (refcount blocks first, as every write-back does).
                if self.l2_cache.over_capacity() {
                    self.write_refcounts_then_l2(st)?;
                }
            }
            let alone = st.refcounts.get(io, l2 / cs)? == 1;
            new_l1[i] = if alone { l2 | COPIED } else { l2 };
        }
        if new_l1 != l1 {
            *self.l1.write() = new_l1;
            st.l1_dirty = true;
        }
        Ok(())
    }

    /// Writes `list` as the new snapshot table, as QEMU does: new clusters for it,
    /// everything (refcounts, tables) synced, the table written and synced, then the
    /// header's nb_snapshots and snapshots_offset in one synced write, then the old
    /// table freed.
    pub(super) fn write_snapshot_table(
        &self,
        st: &mut WriteState,
        list: Vec<SnapshotEntry>,
    ) -> Result<()> {
        match self.replace_snapshot_table(st, list)? {
            Some((offset, len)) => self.free_old_snapshot_table(st, offset, len),
            None => Ok(()),
        }
    }

    /// `write_snapshot_table` up to the header update; returns the old table (where,
    /// how long) for the caller to free.
    pub(super) fn replace_snapshot_table(
        &self,
        st: &mut WriteState,
        list: Vec<SnapshotEntry>,
    ) -> Result<Option<(u64, u64)>> {
        let io = self.storage.as_ref();
        let cs = self.cluster_size();
        let mut bytes = Vec::new();
        for s in &list {
            bytes.extend_from_slice(&s.encode());
        }
        // Entries start 8-byte aligned; QEMU's table ends right after the last name.
        if let Some(last) = list.last() {
            let len = last.encoded_len();
            bytes.truncate(bytes.len() - (len.div_ceil(8) * 8 - len));
        }
        if bytes.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let len = bytes.len() as u64;
        let offset = if list.is_empty() {
            0
        } else {
            self.alloc_clusters(st, len.div_ceil(cs))?
        };
        self.flush_locked(st)?;
        if !list.is_empty() {
            io.write_at(&bytes, offset)?;
            io.flush()?;
        }
        let mut fields = [0u8; 12];
        put_u32(&mut fields, 0, list.len() as u32);
        put_u64(&mut fields, 4, offset);
        io.write_at(&fields, HEADER_SNAPSHOT_FIELDS)?;
        io.flush()?;
        let (old_off, old_len, old_n) = (
            st.header.snapshots_offset,
            st.snapshots_len,
            st.header.nb_snapshots,
        );
        st.header.nb_snapshots = list.len() as u32;
        st.header.snapshots_offset = offset;
        st.snapshots = list;
        st.snapshots_len = len;
        Ok((old_n > 0 && old_len > 0).then_some((old_off, old_len)))
    }

    /// Frees the clusters of a snapshot table no longer in use.
    pub(super) fn free_old_snapshot_table(
        &self,
        st: &mut WriteState,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let io = self.storage.as_ref();
        self.change_refcount(st, offset, len, true)?;
        st.refcounts.flush_blocks(io)?;
        io.flush()?;
        Ok(())
    }
}

fn encode_table(t: &[u64]) -> Vec<u8> {
    let mut raw = vec![0u8; t.len() * 8];
    for (i, e) in t.iter().enumerate() {
        put_u64(&mut raw, i * 8, *e);
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn ids_as_qemu_picks_them() {
        assert_eq!(next_snapshot_id(&[]), "1");
        let l = [entry("1", "a"), entry("7x", "b"), entry("abc", "c")];
        assert_eq!(next_snapshot_id(&l), "8");
    }

    #[test]
    fn lookup_by_id_first_then_name() {
        let l = [entry("1", "2"), entry("2", "x"), entry("3", "x")];
        assert_eq!(find_snapshot(&l, "2"), Some(1));
        assert_eq!(find_snapshot(&l, "x"), Some(1));
        assert_eq!(find_snapshot(&l, "3"), Some(2));
        assert_eq!(find_snapshot(&l, "nope"), None);
    }
}
