//! `-t none` / `-t directsync`: the image opened with O_DIRECT, as QEMU's
//! cache.direct=on opens it, so that requests bypass the page cache.
//!
//! The library opens files through the page cache only, so this module builds the
//! image itself from the library's public pieces (`ImageMeta`, `Qcow2::open`,
//! `RawImage::open`) over [`DirectStorage`], a [`Storage`] whose reads and writes go
//! through an O_DIRECT descriptor. O_DIRECT wants offsets, lengths and memory aligned
//! to the device's logical block; [`ALIGN`] (4 KiB) satisfies every common device.
//! Unaligned requests (small metadata updates, clusters smaller than 4 KiB) are
//! widened to whole blocks through an aligned bounce buffer, with a read-modify-write
//! for partial blocks, as QEMU's block layer does. Backing files are opened read-only
//! through the page cache.

use crate::common::open_error_message;
use oxcow::engine::meta::ImageMeta;
use oxcow::engine::EngineOptions;
use oxcow::image::{combine_paths, local_path, probe};
use oxcow::storage::{Extent, FileStorage, NoFlush, Storage};
use oxcow::{BlockDevice, Error, Format, Image, OpenOptions, Qcow2, RawImage};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// Alignment of offsets, lengths and buffers for O_DIRECT.
pub const ALIGN: usize = 4096;
const A: u64 = ALIGN as u64;

/// A file read and written with O_DIRECT.
#[derive(Debug)]
pub struct DirectStorage {
    direct: File,
    /// The same file through the page cache, for everything but data transfers
    /// (size, truncation, holes, identity).
    plain: FileStorage,
    /// Block-aligned ranges being written; overlapping writes wait, so that the
    /// read-modify-write of a partial block never loses a neighbour's bytes.
    writing: Mutex<Vec<(u64, u64)>>,
    written: Condvar,
    /// Writes share it; a write that must cut the file back after widening its last
    /// block past the end of the file takes it alone.
    grow: RwLock<()>,
}

/// An aligned, zeroed buffer of `len` bytes (inside a slightly larger vector).
struct Bounce {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize) -> Bounce {
        let v = vec![0u8; len + ALIGN];
        let start = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
        Bounce { v, start, len }
    }
    fn bytes(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    offset.is_multiple_of(A)
        && buf.len().is_multiple_of(ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(ALIGN)
}

impl DirectStorage {
    pub fn open(path: &Path, writable: bool) -> io::Result<DirectStorage> {
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let plain = FileStorage::open(path, writable)?;
        Ok(DirectStorage {
            direct,
            plain,
            writing: Mutex::new(Vec::new()),
            written: Condvar::new(),
            grow: RwLock::new(()),
        })
    }

    /// Reads whole blocks at the aligned `offset` into the aligned `buf`; what lies
    /// past the end of the file reads as zeros.
    fn read_blocks(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.direct.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A short read ends inside a block only at the end of the file.
                    if !done.is_multiple_of(ALIGN) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Waits until no write overlaps `a..e`, then claims it.
    fn claim(&self, a: u64, e: u64) {
        let mut w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        while w.iter().any(|&(s, t)| s < e && a < t) {
            w = self.written.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        w.push((a, e));
    }

    fn release(&self, a: u64, e: u64) {
        let mut w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.iter().position(|&r| r == (a, e)) {
            w.swap_remove(i);
        }
        self.written.notify_all();
    }

    /// Writes `buf` at `offset` as whole blocks `a..e` (a read-modify-write when the
    /// request covers part of a block).
    fn write_blocks(&self, buf: &[u8], offset: u64, a: u64, e: u64) -> io::Result<()> {
        if aligned(buf, offset) {
            return self.direct.write_all_at(buf, offset);
        }
        let mut b = Bounce::new((e - a) as usize);
        let at = (offset - a) as usize;
        let end = offset + buf.len() as u64;
        let bytes = b.bytes();
        if offset != a {
            self.read_blocks(&mut bytes[..ALIGN], a)?;
        }
        if end != e && (e - A != a || offset == a) {
            let last = bytes.len() - ALIGN;
            self.read_blocks(&mut bytes[last..], e - A)?;
        }
        bytes[at..at + buf.len()].copy_from_slice(buf);
        self.direct.write_all_at(bytes, a)
    }
}

impl Storage for DirectStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if aligned(buf, offset) {
            return self.read_blocks(buf, offset);
        }
        let a = offset - offset % A;
        let e = (offset + buf.len() as u64).div_ceil(A) * A;
        let mut b = Bounce::new((e - a) as usize);
        self.read_blocks(b.bytes(), a)?;
        let at = (offset - a) as usize;
        let n = buf.len();
        buf.copy_from_slice(&b.bytes()[at..at + n]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past 2^64"))?;
        let a = offset - offset % A;
        let e = end.div_ceil(A) * A;
        // Only a write whose last block is partial can leave the file longer than
        // asked for (the whole block is written); it then cuts the file back, alone.
        let shared = self.grow.read().unwrap_or_else(|p| p.into_inner());
        if e != end && e > self.plain.len()? {
            drop(shared);
            let _alone = self.grow.write().unwrap_or_else(|p| p.into_inner());
            let old = self.plain.len()?;
            self.claim(a, e);
            let r = self.write_blocks(buf, offset, a, e);
            self.release(a, e);
            r?;
            if e > old.max(end) {
                self.plain.set_len(old.max(end))?;
            }
            return Ok(());
        }
        self.claim(a, e);
        let r = self.write_blocks(buf, offset, a, e);
        self.release(a, e);
        r
    }

    fn flush(&self) -> io::Result<()> {
        self.direct.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.plain.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _alone = self.grow.write().unwrap_or_else(|p| p.into_inner());
        self.plain.set_len(len)
    }

    fn preallocate(&self, offset: u64, len: u64, zero_fill: bool) -> io::Result<()> {
        if !zero_fill {
            return self.plain.preallocate(offset, len, false);
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plain.punch_hole(offset, len)
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        self.plain.allocated_bytes()
    }

    fn extent_at(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.plain.extent_at(offset, len)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.plain.identity()
    }
}

fn open_storage(path: &str, writable: bool, no_flush: bool) -> oxcow::Result<Arc<dyn Storage>> {
    let s = DirectStorage::open(Path::new(path), writable).map_err(|source| Error::Open {
        path: path.into(),
        source,
    })?;
    let s: Arc<dyn Storage> = Arc::new(s);
    Ok(if writable && no_flush {
        Arc::new(NoFlush(s))
    } else {
        s
    })
}

/// Opens `filename` as `Image::open` would, but with O_DIRECT for the image file and
/// its external data file; the message on failure is qemu-img's.
pub fn open(
    filename: &str,
    fmt: Option<&str>,
    writable: bool,
    no_flush: bool,
) -> Result<Box<dyn BlockDevice>, String> {
    if filename.is_empty() {
        return Err("Could not open '': The 'file' block driver requires a file name".into());
    }
    if Path::new(filename).is_dir() {
        return Err(format!(
            "Could not open '{filename}': 'file' driver requires '{filename}' to be a regular file"
        ));
    }
    open_device(filename, fmt, writable, no_flush).map_err(|e| open_error_message(filename, &e))
}

fn open_device(
    filename: &str,
    fmt: Option<&str>,
    writable: bool,
    no_flush: bool,
) -> oxcow::Result<Box<dyn BlockDevice>> {
    let format = fmt.map(Format::from_name).transpose()?;
    let storage = open_storage(filename, writable, no_flush)?;
    let format = match format {
        Some(f) => f,
        None => probe(storage.as_ref())?,
    };
    if format == Format::Raw {
        return Ok(Box::new(RawImage::open(storage)?));
    }
    let meta = ImageMeta::load(storage.as_ref())?;
    meta.check_readable()?;
    let data_file = match &meta.data_file {
        Some(name) if meta.header.has_data_file() => {
            // Relative to the current directory, as QEMU (and Image::open) has it.
            Some(open_storage(
                &local_path(name, "data file")?,
                writable,
                no_flush,
            )?)
        }
        _ => None,
    };
    let backing = match &meta.backing_file {
        Some(name) => {
            let local = local_path(name, "backing file")?;
            let full = if local.len() == name.len() {
                combine_paths(filename, name)
            } else {
                local
            };
            let opts = OpenOptions {
                format: meta
                    .backing_format
                    .as_deref()
                    .map(Format::from_name)
                    .transpose()?,
                ..Default::default()
            };
            let b = Image::open(&full, &opts).map_err(|e| match e {
                Error::Open { path, source } => Error::Backing(format!(
                    "Could not open backing file: Could not open '{}': {source}",
                    path.display()
                )),
                other => other,
            })?;
            Some(Arc::new(b) as Arc<dyn BlockDevice>)
        }
        None => None,
    };
    let engine = EngineOptions {
        l2_cache_bytes: None,
        writable,
        check: false,
    };
    Ok(Box::new(Qcow2::open(
        meta, storage, data_file, backing, &engine,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_writes_and_reads_keep_their_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x11u8; 10000]).unwrap();
        let s = match DirectStorage::open(&path, true) {
            Ok(s) => s,
            // tmpfs and some others refuse O_DIRECT.
            Err(_) => return,
        };
        s.write_at(&[0xaa; 100], 4090).unwrap();
        s.write_at(&[0xbb; 8], 9996).unwrap();
        assert_eq!(s.len().unwrap(), 10004);
        s.write_at(&[0xcc; 4096], 8192).unwrap();
        assert_eq!(s.len().unwrap(), 12288);
        let mut all = vec![0u8; 12288];
        s.read_at(&mut all, 0).unwrap();
        let mut want = vec![0x11u8; 10000];
        want[4090..4190].fill(0xaa);
        want.resize(12288, 0);
        want[9996..10004].fill(0xbb);
        want[8192..12288].fill(0xcc);
        assert!(all == want);
        let mut some = [0u8; 10];
        s.read_at(&mut some, 4085).unwrap();
        assert_eq!(
            some,
            [0x11, 0x11, 0x11, 0x11, 0x11, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]
        );
        let mut past = [1u8; 8];
        s.read_at(&mut past, 12284).unwrap();
        assert_eq!(past, [0xcc, 0xcc, 0xcc, 0xcc, 0, 0, 0, 0]);
    }
}
