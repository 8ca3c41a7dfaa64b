//! Write-zeroes on v2 images without a backing file. v2 has no zero flag, but an
//! unallocated cluster reads as zeros when nothing is behind it: QEMU
//! (`qcow2_subcluster_zeroize`) then discards whole clusters instead of writing
//! zeros, and writes zero bytes only into partial clusters that hold data. With a
//! backing file it cannot, and writes zeros (the general path).

use super::writestate::Writer;
use super::Qcow2;
use crate::error::Result;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Zeroes `offset..offset+len` (inside the disk): zero bytes for the partial
    /// clusters at either end (nothing when they already read as zeros), whole
    /// clusters unallocated between them; the last cluster of the disk counts as
    /// whole when the range reaches the end.
    pub(super) fn zero_v2_by_unallocating(&self, w: &Writer, offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let size = self.size.load(Ordering::Acquire);
        let end = offset + len;
        let mid_start = offset.div_ceil(cs) * cs;
        let mid_end = if end == size { end } else { end / cs * cs };
        let head_end = mid_start.min(end);
        if offset < head_end {
            self.write_zero_bytes(w, offset, head_end - offset)?;
        }
        if mid_start < mid_end {
            self.discard_clusters(mid_start, mid_end - mid_start)?;
        }
        let tail_start = mid_end.max(head_end);
        if tail_start < end {
            self.write_zero_bytes(w, tail_start, end - tail_start)?;
        }
        self.writeback_if_needed(w)
    }
}
