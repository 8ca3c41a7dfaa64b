//! Resizing as QEMU's block layer does it (`bdrv_co_truncate` over
//! `qcow2_co_truncate`): the new size, then preallocation, then, when the image
//! grows over a backing file that reaches past its old end, zeros over the new area
//! so that the backing file does not show through it.

use super::create::Preallocation;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::l1l2::SUBCLUSTERS;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Changes the virtual size. Growing keeps every byte and the new area reads as
    /// zeros; shrinking needs `shrink` and drops everything past the new end.
    pub fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        self.resize_preallocated(new_size, shrink, Preallocation::Off)
    }

    /// Changes the virtual size, preallocating the new area with `prealloc`.
    pub fn resize_preallocated(
        &self,
        new_size: u64,
        shrink: bool,
        prealloc: Preallocation,
    ) -> Result<()> {
        let old_size = self.size.load(Ordering::Acquire);
        let backing_len = self.backing.as_ref().map_or(0, |b| b.size());
        let zero = new_size > old_size && backing_len > old_size;
        // `falloc` and `full` give the area new clusters that read as zeros.
        let zero_flags = zero && matches!(prealloc, Preallocation::Off | Preallocation::Metadata);
        if zero_flags && self.meta.header.version < 3 {
            self.check_resizable(new_size)?;
            // Zero flags are the only way QEMU zeroes the area, and v2 has none: it
            // refuses (here before the size changes; QEMU after preallocating).
            return Err(Error::Unsupported(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        self.change_size(new_size, shrink, !zero)?;
        self.preallocate_area(prealloc, old_size, new_size, zero)?;
        if zero_flags {
            self.zero_new_area(old_size, new_size)?;
        }
        Ok(())
    }

    /// Zero flags over the new area from the first (sub)cluster boundary, then zero
    /// bytes written for the head, in QEMU's order (which decides where the tables
    /// and the head's cluster land).
    fn zero_new_area(&self, old_size: u64, new_size: u64) -> Result<()> {
        let h = &self.meta.header;
        let granule = if h.has_extended_l2() {
            h.cluster_size() / SUBCLUSTERS as u64
        } else {
            h.cluster_size()
        };
        let zero_start = old_size.next_multiple_of(granule);
        if new_size > zero_start {
            self.write_zeroes(zero_start, new_size - zero_start, false)?;
        }
        if zero_start > old_size {
            let len = zero_start.min(new_size) - old_size;
            self.write_at(&vec![0u8; len as usize], old_size)?;
        }
        self.flush()
    }
}
