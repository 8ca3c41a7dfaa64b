//! Persistent dirty bitmaps of a writable image.
//!
//! At a read-write open every bitmap of the directory that is not in use is loaded
//! into memory and the directory is rewritten with the in-use flag set, so that a
//! crash leaves them marked as not to be trusted (bitmaps already in use are kept as
//! they are, "inconsistent": they can only be removed). Enabled bitmaps record every
//! guest write, write-zeroes and discard (`record_write`). On close (or `store_bitmaps`)
//! each persistent bitmap is written anew: data clusters for the clusters of bitmap
//! data that hold a dirty bit (all-zero clusters are table entries 0, as QEMU stores
//! them), a table, then a new directory with the in-use flags cleared; the header
//! points to it only once all of that is durable, and the old directory, tables and
//! data are freed after. A directory is never rewritten in place.

use super::dirtybits::DirtyBits;
use super::writestate::WriteState;
use super::Qcow2;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry, TableEntry};
use crate::format::extension::BitmapsExt;
use crate::format::header::autoclear;
use std::sync::atomic::Ordering;

/// A bitmap as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Records writes (the `auto` flag on disk).
    pub enabled: bool,
    /// Stored in the image on close.
    pub persistent: bool,
    /// Found in use (a program did not close the image): its contents are unknown
    /// and it can only be removed.
    pub in_use: bool,
}

/// How to create a bitmap.
#[derive(Debug, Clone)]
pub struct BitmapOptions {
    /// Bytes per bit; `None` picks QEMU's default (the cluster size, within 4 KiB to
    /// 64 KiB).
    pub granularity: Option<u64>,
    pub persistent: bool,
    /// Created disabled: records nothing until enabled.
    pub disabled: bool,
}

impl Default for BitmapOptions {
    fn default() -> Self {
        BitmapOptions {
            granularity: None,
            persistent: true,
            disabled: false,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Bitmap {
    pub(super) name: String,
    pub(super) enabled: bool,
    pub(super) persistent: bool,
    pub(super) inconsistent: bool,
    /// Granularity bits (kept apart from `bits`, which is empty when inconsistent).
    pub(super) granularity_bits: u8,
    pub(super) bits: DirtyBits,
}

impl Bitmap {
    pub(super) fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.name.clone(),
            granularity: 1u64 << self.granularity_bits,
            enabled: self.enabled,
            persistent: self.persistent,
            in_use: self.inconsistent,
        }
    }

    pub(super) fn usable(&self) -> Result<()> {
        if self.inconsistent {
            return Err(inconsistent(&self.name));
        }
        Ok(())
    }
}

pub(super) fn inconsistent(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

pub(super) fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

/// The bitmaps of a writable image and what the disk says about them.
#[derive(Debug, Default)]
pub(crate) struct BitmapSet {
    /// In memory: loaded ones in directory order, then added ones.
    pub(super) list: Vec<Bitmap>,
    /// The directory as it is on disk now.
    pub(super) dir: Vec<BitmapEntry>,
    /// Where that directory is (offset, bytes), when it is ours to free.
    dir_at: Option<(u64, u64)>,
    /// The disk marks our loaded bitmaps in use: they must be stored before closing.
    pub(super) in_use_on_disk: bool,
    /// Something changed since the bitmaps were last loaded or stored.
    pub(super) changed: bool,
}

impl BitmapSet {
    pub(super) fn find(&self, name: &str) -> Result<usize> {
        self.list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| not_found(name))
    }

    /// Whether any bitmap records writes.
    pub(super) fn tracking(&self) -> bool {
        self.list.iter().any(|b| b.enabled && !b.inconsistent)
    }
}

impl Qcow2 {
    /// Loads the bitmaps at a read-write open and marks them in use on disk.
    pub(crate) fn open_bitmaps(&self) -> Result<()> {
        let h = &self.meta.header;
        if h.version < 3 || h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.meta.bitmaps_ext else {
            return Ok(());
        };
        let mut set = self.bitmaps.lock();
        if ext.nb_bitmaps > 0 {
            set.dir_at = Some((ext.directory_offset, ext.directory_size));
        }
        let used: u64 = self
            .meta
            .bitmaps
            .iter()
            .map(|e| bitmap::entry_size(e.name.len(), e.extra.len()))
            .sum();
        if used != ext.directory_size {
            return Err(Error::header(
                "bitmap directory",
                "Broken bitmap directory: its entries do not fill it",
            ));
        }
        for e in &self.meta.bitmaps {
            if set.list.iter().any(|b| b.name == e.name) {
                return Err(Error::header(
                    "bitmap directory",
                    format!("Bitmap already exists: {}", e.name),
                ));
            }
            e.check(self.cluster_size(), self.size())?;
            let bits = if e.in_use() {
                DirtyBits::new(0, e.granularity_bits)
            } else {
                self.read_bitmap(e)?
            };
            set.list.push(Bitmap {
                name: e.name.clone(),
                enabled: e.auto(),
                persistent: true,
                inconsistent: e.in_use(),
                granularity_bits: e.granularity_bits,
                bits,
            });
        }
        set.dir = self.meta.bitmaps.clone();
        if set.list.iter().any(|b| !b.inconsistent) {
            self.mark_in_use(&mut set)?;
        }
        self.tracking.store(set.tracking(), Ordering::Release);
        Ok(())
    }

    /// The bitmap directory the header `h` (with bitmaps extension `ext`) points to,
    /// read from the disk, when the extension is valid: what reference counting must
    /// see while the image is open (the directory moves when bitmaps are marked in
    /// use, stored, added or removed). Takes no lock.
    pub(crate) fn bitmaps_on_disk(
        &self,
        h: &crate::format::header::Header,
        ext: Option<BitmapsExt>,
    ) -> Result<Option<(BitmapsExt, Vec<BitmapEntry>)>> {
        let Some(ext) = ext else {
            return Ok(None);
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(None);
        }
        if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES
            || ext.directory_offset.saturating_add(ext.directory_size) > self.storage.len()?
        {
            return Err(Error::corrupt(
                "the bitmap directory runs past the end of the file",
                ext.directory_offset,
            ));
        }
        let mut raw = vec![0u8; ext.directory_size as usize];
        self.storage.read_at(&mut raw, ext.directory_offset)?;
        let entries = BitmapEntry::parse_directory(&raw, ext.nb_bitmaps)?;
        Ok(Some((ext, entries)))
    }

    /// Reads a bitmap's data (its entry already checked).
    pub(crate) fn read_bitmap(&self, e: &BitmapEntry) -> Result<DirtyBits> {
        let cs = self.cluster_size();
        let size = self.size();
        let want = bitmap::table_entries(size, e.granularity_bits, cs);
        if want != e.table_size as u64 {
            return Err(Error::corrupt(
                format!(
                    "bitmap '{}' has a table of {} entries; the disk needs {want}",
                    e.name, e.table_size
                ),
                e.table_offset,
            ));
        }
        let file_len = self.storage.len()?;
        let table_bytes = e.table_size as u64 * 8;
        if e.table_offset.saturating_add(table_bytes) > file_len {
            return Err(Error::corrupt(
                format!(
                    "the table of bitmap '{}' runs past the end of the file",
                    e.name
                ),
                e.table_offset,
            ));
        }
        let table =
            super::read_u64_table(self.storage.as_ref(), e.table_offset, e.table_size as usize)?;
        let mut bits = DirtyBits::new(size, e.granularity_bits);
        let total = bits.data_bytes();
        let mut buf = vec![0u8; cs as usize];
        for (i, &raw) in table.iter().enumerate() {
            let at = i as u64 * cs;
            let n = (total - at.min(total)).min(cs);
            match TableEntry::decode(raw, cs)? {
                TableEntry::Zeros => {}
                TableEntry::Ones => bits.fill_ones(at, n),
                TableEntry::Data(off) => {
                    if off.saturating_add(cs) > file_len {
                        return Err(Error::corrupt(
                            format!("data of bitmap '{}' past the end of the file", e.name),
                            off,
                        ));
                    }
                    self.storage.read_at(&mut buf, off)?;
                    bits.deserialize(at, &buf[..n as usize]);
                }
            }
        }
        Ok(bits)
    }

    /// Writes a new directory (never over the old one), points the header at it
    /// once it is durable, then frees the old one.
    pub(super) fn write_directory(
        &self,
        st: &mut WriteState,
        set: &mut BitmapSet,
        entries: Vec<BitmapEntry>,
    ) -> Result<()> {
        let io = self.storage.as_ref();
        let cs = self.cluster_size();
        let raw = bitmap::encode_directory(&entries);
        let mut new_at = None;
        if !entries.is_empty() {
            let off = self.alloc_clusters(st, (raw.len() as u64).div_ceil(cs))?;
            st.refcounts.flush_blocks(io)?;
            io.write_at(&raw, off)?;
            io.flush()?;
            new_at = Some((off, raw.len() as u64));
        }
        match new_at {
            Some((off, len)) => {
                st.extras.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: entries.len() as u32,
                    directory_size: len,
                    directory_offset: off,
                });
                st.header.autoclear_features |= autoclear::BITMAPS;
            }
            None => {
                st.extras.bitmaps = None;
                st.header.autoclear_features &= !autoclear::BITMAPS;
            }
        }
        self.write_header(st)?;
        io.flush()?;
        if let Some((off, len)) = std::mem::replace(&mut set.dir_at, new_at) {
            st.refcounts.free(io, off, len)?;
            st.refcounts.flush_blocks(io)?;
            io.flush()?;
        }
        set.dir = entries;
        Ok(())
    }

    /// Rewrites the directory with our loaded bitmaps marked in use.
    fn mark_in_use(&self, set: &mut BitmapSet) -> Result<()> {
        let w = self.writer()?;
        let mut entries = set.dir.clone();
        for e in entries.iter_mut() {
            if set.list.iter().any(|b| b.name == e.name && !b.inconsistent) {
                e.flags |= bitmap::FLAG_IN_USE;
            }
        }
        let mut st = w.state.lock();
        self.write_directory(&mut st, set, entries)?;
        set.in_use_on_disk = true;
        Ok(())
    }

    /// Before a bitmap changes: the disk must say that its stored copy is stale.
    pub(super) fn touch(&self, set: &mut BitmapSet) -> Result<()> {
        set.changed = true;
        let stored = set
            .dir
            .iter()
            .any(|e| !e.in_use() && set.list.iter().any(|b| b.name == e.name));
        if stored && !set.in_use_on_disk {
            self.mark_in_use(set)?;
        }
        Ok(())
    }

    /// Records a guest write of `offset..offset+len` in every enabled bitmap.
    pub(crate) fn record_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.tracking.load(Ordering::Acquire) || len == 0 {
            return Ok(());
        }
        let mut set = self.bitmaps.lock();
        if !set.in_use_on_disk {
            self.touch(&mut set)?;
        }
        set.changed = true;
        for b in set.list.iter_mut().filter(|b| b.enabled && !b.inconsistent) {
            b.bits.set_range(offset, len);
        }
        Ok(())
    }

    /// Whether the image holds (or will hold, once closed) persistent bitmaps.
    pub(crate) fn has_persistent_bitmaps(&self) -> bool {
        let set = self.bitmaps.lock();
        !set.dir.is_empty() || set.list.iter().any(|b| b.persistent)
    }

    /// Writes every persistent bitmap to the image and clears their in-use flags.
    /// Called when the image is dropped; call it to see its errors. Later writes mark
    /// the bitmaps in use again.
    pub fn store_bitmaps(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let mut set = self.bitmaps.lock();
        if !set.changed && !set.in_use_on_disk {
            return Ok(());
        }
        self.flush()?;
        let w = self.writer()?;
        let mut st = w.state.lock();
        let io = self.storage.as_ref();
        let mut entries = Vec::new();
        let mut stale = Vec::new();
        let mut stored = Vec::new();
        for e in &set.dir {
            match set.list.iter().find(|b| b.name == e.name) {
                Some(b) if b.persistent && !b.inconsistent => {
                    entries.push(self.store_one(&mut st, b)?);
                    stale.push((e.table_offset, e.table_size));
                    stored.push(b.name.clone());
                }
                _ => entries.push(e.clone()),
            }
        }
        // New bitmaps go last, the newest first (QEMU's order).
        for b in set.list.iter().rev() {
            if b.persistent && !b.inconsistent && !stored.contains(&b.name) {
                entries.push(self.store_one(&mut st, b)?);
            }
        }
        st.refcounts.flush_blocks(io)?;
        io.flush()?;
        self.write_directory(&mut st, &mut set, entries)?;
        for (off, n) in stale {
            self.free_bitmap_clusters(&mut st, off, n)?;
        }
        st.refcounts.flush_blocks(io)?;
        io.flush()?;
        set.in_use_on_disk = false;
        set.changed = false;
        Ok(())
    }

    /// Writes one bitmap's data and table; returns its new directory entry.
    fn store_one(&self, st: &mut WriteState, b: &Bitmap) -> Result<BitmapEntry> {
        let io = self.storage.as_ref();
        let cs = self.cluster_size();
        let n = bitmap::table_entries(b.bits.size(), b.granularity_bits, cs);
        if n > bitmap::MAX_TABLE_SIZE as u64 || n * cs > bitmap::MAX_PHYS_SIZE {
            return Err(Error::InvalidArgument(format!(
                "Bitmap '{}' is too big",
                b.name
            )));
        }
        let mut table = vec![0u64; n as usize];
        let mut buf = vec![0u8; cs as usize];
        for (i, t) in table.iter_mut().enumerate() {
            b.bits.serialize(i as u64 * cs, &mut buf);
            if buf.iter().all(|&x| x == 0) {
                continue;
            }
            let off = self.alloc_clusters(st, 1)?;
            io.write_at(&buf, off)?;
            *t = TableEntry::Data(off).encode();
        }
        let table_bytes = (n * 8).max(8);
        let table_at = self.alloc_clusters(st, table_bytes.div_ceil(cs))?;
        let mut raw = vec![0u8; (n * 8) as usize];
        for (i, e) in table.iter().enumerate() {
            crate::format::be::put_u64(&mut raw, i * 8, *e);
        }
        io.write_at(&raw, table_at)?;
        Ok(BitmapEntry {
            table_offset: table_at,
            table_size: n as u32,
            flags: if b.enabled { bitmap::FLAG_AUTO } else { 0 },
            kind: bitmap::TYPE_DIRTY_TRACKING,
            granularity_bits: b.granularity_bits,
            name: b.name.clone(),
            extra: Vec::new(),
        })
    }

    /// Frees a bitmap table and the data clusters it points to (once no directory on
    /// disk names it). A table that cannot be read is left alone (a leak).
    pub(super) fn free_bitmap_clusters(&self, st: &mut WriteState, off: u64, n: u32) -> Result<()> {
        let io = self.storage.as_ref();
        let cs = self.cluster_size();
        let bytes = n as u64 * 8;
        if off == 0 || n == 0 || n > bitmap::MAX_TABLE_SIZE || off + bytes > io.len()? {
            return Ok(());
        }
        let table = super::read_u64_table(io, off, n as usize)?;
        for raw in table {
            if let Ok(TableEntry::Data(d)) = TableEntry::decode(raw, cs) {
                st.refcounts.free(io, d, cs)?;
            }
        }
        st.refcounts.free(io, off, bytes)
    }
}
