//! The block-device vocabulary every image kind speaks: qcow2 images, raw images and
//! backing files are all [`BlockDevice`]s.

use crate::error::{Error, Result};

/// What one layer says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// The layer holds data for the range.
    Data,
    /// The layer says the range reads as zeros.
    Zero,
    /// The layer holds nothing: the backing file (or zeros) shows through.
    Unallocated,
}

/// The answer of one layer for a run starting at the asked offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStatus {
    pub kind: StatusKind,
    /// Length of the run, at least one byte when the asked length was not zero.
    pub len: u64,
    /// Where the run's bytes lie in the layer's file (data file for external data),
    /// when they have a place of their own.
    pub offset: Option<u64>,
    /// The run is a compressed cluster.
    pub compressed: bool,
    /// The run's bytes, although allocated, are a hole in the host file, so they
    /// read as zeros (metadata preallocation).
    pub file_zero: bool,
}

/// What the whole chain says about a guest range: as `qemu-img map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    pub len: u64,
    /// Which layer decided: 0 for the image itself, 1 for its backing file, ...
    pub depth: u32,
    /// Some layer allocated the range (as data or as zeros).
    pub present: bool,
    /// The range is known to read as zeros.
    pub zero: bool,
    /// The range holds data in the layer that decided.
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

/// A virtual disk: a fixed size, byte-addressed reads from many threads at once.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; the whole range must lie inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// What this layer alone holds at `offset` (for at most `len` bytes).
    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus>;
    /// The device below this one, whose data shows through unallocated ranges.
    fn backing(&self) -> Option<&dyn BlockDevice>;
    /// The format's name as qemu-img prints it ("qcow2", "raw").
    fn format_name(&self) -> &'static str;
    /// Writes `buf` at `offset`; the whole range must lie inside the device.
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only())
    }
    /// Makes the range read as zeros; with `unmap`, whole clusters may be freed.
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only())
    }
    /// Tells the device the range's contents are no longer needed.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn read_only() -> Error {
    Error::Unsupported("the image is open read-only".into())
}

/// Checks that a request lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Walks the chain below `dev` to say what `offset..offset+len` reads as, and which
/// layer decides. The returned run is never longer than `len`.
pub fn block_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<BlockStatus> {
    check_range(offset, len, dev.size())?;
    let mut layer = dev;
    let mut depth = 0;
    let mut len = len;
    loop {
        let s = layer.layer_status(offset, len)?;
        len = s.len;
        match s.kind {
            StatusKind::Data => {
                return Ok(BlockStatus {
                    len,
                    depth,
                    present: true,
                    zero: s.file_zero,
                    data: true,
                    compressed: s.compressed,
                    offset: s.offset,
                });
            }
            StatusKind::Zero => {
                return Ok(BlockStatus {
                    len,
                    depth,
                    present: true,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: s.offset,
                });
            }
            StatusKind::Unallocated => match layer.backing() {
                Some(b) if offset < b.size() => {
                    len = len.min(b.size() - offset);
                    layer = b;
                    depth += 1;
                }
                // Past the end of a shorter backing file, or no backing file: zeros,
                // owned by no layer; QEMU reports them at the depth of this layer, with
                // the host offset this layer gave (an unallocated subcluster of an
                // allocated cluster has one).
                _ => {
                    return Ok(BlockStatus {
                        len,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: s.offset,
                    });
                }
            },
        }
    }
}
