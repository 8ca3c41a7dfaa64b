//! Raw images: the guest disk is the file itself.

use crate::device::{check_range, BlockDevice, LayerStatus, StatusKind};
use crate::error::Result;
use crate::storage::{Extent, Storage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
}

impl RawImage {
    pub fn open(storage: Arc<dyn Storage>) -> Result<RawImage> {
        // QEMU counts a file in 512-byte sectors, rounding up: the tail of a partial
        // last sector reads as zeros.
        let size = storage.len()?.div_ceil(512) * 512;
        Ok(RawImage {
            storage,
            size: AtomicU64::new(size),
        })
    }

    /// Changes the size of the file (new bytes read as zeros; `prealloc` reserves
    /// or writes them).
    pub fn resize(
        &self,
        new_size: u64,
        prealloc: crate::engine::create::Preallocation,
    ) -> Result<()> {
        use crate::engine::create::Preallocation;
        let old = self.storage.len()?;
        self.storage.set_len(new_size)?;
        if new_size > old && matches!(prealloc, Preallocation::Falloc | Preallocation::Full) {
            self.storage
                .preallocate(old, new_size - old, prealloc == Preallocation::Full)?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.storage.read_at(buf, offset)?)
    }

    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        check_range(offset, len, self.size())?;
        let (kind, n) = match self.storage.extent_at(offset, len)? {
            Extent::Data(n) => (StatusKind::Data, n),
            Extent::Hole(n) => (StatusKind::Zero, n),
        };
        Ok(LayerStatus {
            kind,
            len: n.clamp(1, len.max(1)),
            offset: Some(offset),
            compressed: false,
            file_zero: false,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.storage.write_at(buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(offset, len, self.size())?;
        if unmap {
            self.storage.punch_hole(offset, len)?;
            // Where holes cannot be punched, the bytes must still become zeros.
            if let crate::storage::Extent::Hole(n) = self.storage.extent_at(offset, len)? {
                if n >= len {
                    return Ok(());
                }
            }
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.storage.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        Ok(self.storage.punch_hole(offset, len)?)
    }

    fn flush(&self) -> Result<()> {
        Ok(self.storage.flush()?)
    }
}
