//! The operations on dirty bitmaps (engine/bitmaps.rs keeps them and their place on
//! disk): listing, reading, adding (with QEMU's checks), removing, clearing,
//! enabling, disabling, merging, and following a resize.

use super::bitmaps::{inconsistent, not_found, Bitmap, BitmapInfo, BitmapOptions, BitmapSet};
use super::dirtybits::DirtyBits;
use super::Qcow2;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::bitmap;
use std::sync::atomic::Ordering;

const TOO_BIG: &str = "Too much space will be occupied by the bitmap. Use larger granularity";

impl Qcow2 {
    /// The bitmaps, in directory order then newest last.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        if self.writer.is_none() {
            return self
                .meta
                .bitmaps
                .iter()
                .map(|e| BitmapInfo {
                    name: e.name.clone(),
                    granularity: e.granularity(),
                    enabled: e.auto(),
                    persistent: true,
                    in_use: e.in_use(),
                })
                .collect();
        }
        self.bitmaps.lock().list.iter().map(Bitmap::info).collect()
    }

    /// A copy of a bitmap's dirty bits (read from disk on a read-only image).
    pub fn bitmap_bits(&self, name: &str) -> Result<DirtyBits> {
        if self.writer.is_none() {
            let e = self
                .meta
                .bitmaps
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| not_found(name))?;
            e.check(self.cluster_size(), self.size())?;
            if e.in_use() {
                return Err(inconsistent(name));
            }
            return self.read_bitmap(e);
        }
        let set = self.bitmaps.lock();
        let b = &set.list[set.find(name)?];
        b.usable()?;
        Ok(b.bits.clone())
    }

    /// The dirty ranges `(offset, len)` of a bitmap: what an incremental backup
    /// copies.
    pub fn bitmap_dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        Ok(self.bitmap_bits(name)?.ranges())
    }

    /// Creates a bitmap, checked as QEMU checks it (`node` names the image in
    /// messages). A persistent bitmap reaches the disk when the image is closed.
    pub fn add_bitmap(&self, name: &str, opts: &BitmapOptions, node: &str) -> Result<()> {
        self.writer()?;
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        let gran = match opts.granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(Error::InvalidArgument(
                    "Granularity must be power of 2 and at least 512".into(),
                ))
            }
            Some(g) => g,
            None => self.cluster_size().clamp(4096, 65536),
        };
        let gbits = gran.trailing_zeros() as u8;
        let mut set = self.bitmaps.lock();
        if set.list.iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if opts.persistent {
            self.can_store(&set, name, gbits).map_err(|why| {
                Error::InvalidArgument(format!(
                    "Can't make bitmap '{name}' persistent in '{node}': {why}"
                ))
            })?;
        } else if name.len() > bitmap::MAX_NAME as usize {
            return Err(Error::InvalidArgument(format!(
                "Bitmap name too long: {name}"
            )));
        }
        if bitmap::data_bytes(self.size(), gbits) > bitmap::MAX_PHYS_SIZE {
            // Memory is bounded for bitmaps that stay in memory too.
            return Err(Error::InvalidArgument(TOO_BIG.into()));
        }
        set.list.push(Bitmap {
            name: name.to_string(),
            enabled: !opts.disabled,
            persistent: opts.persistent,
            inconsistent: false,
            granularity_bits: gbits,
            bits: DirtyBits::new(self.size(), gbits),
        });
        if opts.persistent {
            set.changed = true;
        }
        self.tracking.store(set.tracking(), Ordering::Release);
        Ok(())
    }

    fn can_store(&self, set: &BitmapSet, name: &str, gbits: u8) -> std::result::Result<(), String> {
        if self.meta.header.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        if gbits > bitmap::MAX_GRANULARITY_BITS {
            return Err(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << bitmap::MAX_GRANULARITY_BITS
            ));
        }
        if gbits < bitmap::MIN_GRANULARITY_BITS {
            return Err(format!(
                "Granularity is under minimum ({} bytes)",
                1u64 << bitmap::MIN_GRANULARITY_BITS
            ));
        }
        let bytes = bitmap::data_bytes(self.size(), gbits);
        if bytes > bitmap::MAX_PHYS_SIZE
            || bytes > bitmap::MAX_TABLE_SIZE as u64 * self.cluster_size()
        {
            return Err(TOO_BIG.into());
        }
        if name.len() > bitmap::MAX_NAME as usize {
            return Err(format!(
                "Name length exceeds maximum ({} characters)",
                bitmap::MAX_NAME
            ));
        }
        let persistent = set.list.iter().filter(|b| b.persistent);
        let count = persistent.clone().count() as u64 + 1;
        let dir: u64 = persistent
            .map(|b| bitmap::entry_size(b.name.len(), 0))
            .sum::<u64>()
            + bitmap::entry_size(name.len(), 0);
        if count > bitmap::MAX_BITMAPS as u64 {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        if dir > bitmap::MAX_DIRECTORY_BYTES {
            return Err("Not enough space in the bitmap directory".into());
        }
        Ok(())
    }

    /// Deletes a bitmap (an inconsistent one too), from the disk at once.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.writer()?;
        let mut set = self.bitmaps.lock();
        let i = set.find(name)?;
        if let Some(pos) = set.dir.iter().position(|e| e.name == name) {
            let w = self.writer()?;
            let mut st = w.state.lock();
            let mut entries = set.dir.clone();
            let old = entries.remove(pos);
            self.write_directory(&mut st, &mut set, entries)?;
            self.free_bitmap_clusters(&mut st, old.table_offset, old.table_size)?;
            st.refcounts.flush_blocks(self.storage.as_ref())?;
            self.storage.flush()?;
        }
        set.list.remove(i);
        if !set.list.iter().any(|b| !b.inconsistent && b.persistent) {
            set.in_use_on_disk = set.dir.iter().any(|e| e.in_use()) && set.in_use_on_disk;
        }
        self.tracking.store(set.tracking(), Ordering::Release);
        Ok(())
    }

    fn change_bitmap(&self, name: &str, f: impl FnOnce(&mut Bitmap)) -> Result<()> {
        self.writer()?;
        let mut set = self.bitmaps.lock();
        let i = set.find(name)?;
        set.list[i].usable()?;
        if set.list[i].persistent {
            self.touch(&mut set)?;
        }
        f(&mut set.list[i]);
        self.tracking.store(set.tracking(), Ordering::Release);
        Ok(())
    }

    /// Marks every granule clean.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |b| b.bits.clear())
    }

    /// Starts or stops recording writes.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.change_bitmap(name, |b| b.enabled = enabled)
    }

    /// Marks dirty everything `source` has dirty (bitmaps of one disk size; any
    /// granularity).
    pub fn merge_bitmap(&self, name: &str, source: &DirtyBits) -> Result<()> {
        {
            let set = self.bitmaps.lock();
            let i = set.find(name)?;
            set.list[i].usable()?;
            let (dst, src) = (set.list[i].bits.size(), source.size());
            if dst != src {
                return Err(Error::InvalidArgument(format!(
                    "Bitmaps are of different sizes (destination size is {dst}, source \
                     size is {src}) and can't be merged"
                )));
            }
        }
        self.change_bitmap(name, |b| b.bits.merge(source))
    }

    /// Follows a change of the disk size: bitmaps keep their bits, new granules are
    /// clean. Refused while an inconsistent bitmap is stored (as QEMU refuses).
    pub(crate) fn check_bitmaps_resizable(&self, new_size: u64) -> Result<()> {
        let set = self.bitmaps.lock();
        if let Some(b) = set.list.iter().find(|b| b.inconsistent) {
            return Err(inconsistent(&b.name));
        }
        // Memory stays bounded as the bitmaps grow.
        match set
            .list
            .iter()
            .find(|b| bitmap::data_bytes(new_size, b.granularity_bits) > bitmap::MAX_PHYS_SIZE)
        {
            Some(b) => Err(Error::InvalidArgument(format!(
                "Bitmap '{}' would be too big for the new size",
                b.name
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn resize_bitmaps(&self, size: u64) -> Result<()> {
        let mut set = self.bitmaps.lock();
        if set.list.is_empty() {
            return Ok(());
        }
        self.touch(&mut set)?;
        for b in set.list.iter_mut() {
            b.bits.resize(size);
        }
        Ok(())
    }
}
