//! Where bytes live. The engine sees storage only through [`Storage`], so images can sit
//! in a file, in memory, or behind a recording wrapper for crash tests.

mod file;
mod memory;
mod noflush;
mod recording;

pub use file::FileStorage;
pub use memory::MemoryStorage;
pub use noflush::NoFlush;
pub use recording::{Op, RecordingStorage};

use std::io;

/// What a range of a storage holds, as far as the storage knows (holes in sparse files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Bytes that may be non-zero.
    Data(u64),
    /// A hole: reads as zeros and occupies no space.
    Hole(u64),
}

/// A flat, byte-addressed store. Reads past the end return zeros, as a sparse file
/// read by QEMU does; every method takes `&self` so one storage serves many threads.
// `len` is a fallible query of the current size; an `is_empty` would only invite
// skipping its error.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; the part past the end of the storage reads as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends the storage to `offset + len`, reserving the new range on disk
    /// (`zero_fill` writes zeros instead, as preallocation=full does).
    fn preallocate(&self, offset: u64, len: u64, zero_fill: bool) -> io::Result<()> {
        let _ = zero_fill;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
    /// Deallocates a range so it reads as zeros; a no-op where unsupported.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the storage really occupies (a file's allocated blocks), if known.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// Data or hole at `offset`, and how far it extends (at most `len`).
    fn extent_at(&self, _offset: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent::Data(len))
    }
    /// Identity used to detect backing chain loops (device, inode) where available.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}
