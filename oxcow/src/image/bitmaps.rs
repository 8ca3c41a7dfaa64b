//! Dirty bitmaps through [`Image`]: qcow2 images keep them (engine/bitmaps.rs); other
//! formats have none and refuse to store any, with QEMU's words.

use super::Image;
use crate::engine::bitmaps::{BitmapInfo, BitmapOptions};
use crate::engine::dirtybits::DirtyBits;
use crate::engine::Qcow2;
use crate::error::{Error, Result};

impl Image {
    fn bitmap_host(&self, name: &str) -> Result<&Qcow2> {
        self.qcow2
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))
    }

    /// The image's bitmaps (none for raw images).
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.qcow2
            .as_deref()
            .map(Qcow2::bitmaps)
            .unwrap_or_default()
    }

    /// Creates a bitmap (the image must be open for writing). A persistent one is
    /// written to the image when it is closed (or by [`Image::store_bitmaps`]).
    pub fn add_bitmap(&self, name: &str, opts: &BitmapOptions) -> Result<()> {
        match &self.qcow2 {
            Some(q) => q.add_bitmap(name, opts, &self.filename),
            None if opts.persistent => Err(Error::Unsupported(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                self.filename
            ))),
            None => Err(Error::Unsupported(
                "Operation not supported: raw images keep no bitmaps".into(),
            )),
        }
    }

    /// Deletes a bitmap, from the image at once.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_host(name)?.remove_bitmap(name)
    }

    /// Marks every granule of a bitmap clean.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_host(name)?.clear_bitmap(name)
    }

    /// Lets a bitmap record writes.
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_host(name)?.set_bitmap_enabled(name, true)
    }

    /// Stops a bitmap recording writes.
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_host(name)?.set_bitmap_enabled(name, false)
    }

    /// Marks dirty in bitmap `name` everything bitmap `source_name` of `source` (this
    /// image or another) has dirty.
    pub fn merge_bitmap(&self, name: &str, source: &Image, source_name: &str) -> Result<()> {
        let q = self.bitmap_host(name)?;
        // The target is looked up first, as QEMU does.
        if !q.bitmaps().iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Dirty bitmap '{name}' not found"
            )));
        }
        let bits = source.bitmap_bits(source_name)?;
        q.merge_bitmap(name, &bits)
    }

    /// A copy of a bitmap's bits.
    pub fn bitmap_bits(&self, name: &str) -> Result<DirtyBits> {
        self.bitmap_host(name)?.bitmap_bits(name)
    }

    /// The dirty ranges `(offset, len)` of a bitmap, in order.
    pub fn bitmap_dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        self.bitmap_host(name)?.bitmap_dirty_ranges(name)
    }

    /// Writes the persistent bitmaps to the image now (closing does it too, but
    /// cannot report a failure).
    pub fn store_bitmaps(&self) -> Result<()> {
        match &self.qcow2 {
            Some(q) => q.store_bitmaps(),
            None => Ok(()),
        }
    }
}
