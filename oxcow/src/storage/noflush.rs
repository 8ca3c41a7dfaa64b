//! A storage whose flushes do nothing: QEMU's `cache=unsafe`, the mode qemu-img
//! convert writes its target in. Writes keep their order in the page cache, but a
//! power cut may lose or reorder them; only for images that are rebuilt from scratch
//! when that happens.

use super::{Extent, Storage};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct NoFlush(pub Arc<dyn Storage>);

impl Storage for NoFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn preallocate(&self, offset: u64, len: u64, zero_fill: bool) -> io::Result<()> {
        self.0.preallocate(offset, len, zero_fill)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        self.0.allocated_bytes()
    }
    fn extent_at(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.0.extent_at(offset, len)
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.0.identity()
    }
}
