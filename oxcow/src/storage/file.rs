//! A regular file (or block device) as storage, through positional I/O.

use super::{Extent, Storage};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
}

impl FileStorage {
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileStorage { file, writable })
    }

    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileStorage {
            file,
            writable: true,
        })
    }

    pub fn from_file(file: File, writable: bool) -> Self {
        FileStorage { file, writable }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let md = self.file.metadata()?;
        if md.file_type().is_file() {
            return Ok(md.len());
        }
        // Block devices report 0 in metadata; ask the end of the file instead.
        Ok(self.seek(0, libc::SEEK_END)?.unwrap_or(0))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn preallocate(&self, offset: u64, len: u64, zero_fill: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !zero_fill {
            let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range too large",
                ));
            };
            // SAFETY: posix_fallocate on a file descriptor we own; no memory is passed.
            let r = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), off, l) };
            if r == 0 {
                return Ok(());
            }
            if r != libc::EOPNOTSUPP && r != libc::EINVAL {
                return Err(io::Error::from_raw_os_error(r));
            }
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
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Not every file system can punch holes; the range then keeps its bytes,
            // which is allowed: callers treat punching as an optimisation.
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn extent_at(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let end = self.len()?;
        if offset >= end {
            return Ok(Extent::Hole(len));
        }
        let avail = (end - offset).min(len);
        match self.seek(offset, libc::SEEK_DATA)? {
            None => Ok(Extent::Hole(len)),
            Some(d) if d > offset => Ok(Extent::Hole((d - offset).min(len))),
            Some(_) => {
                let h = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(end);
                Ok(Extent::Data((h.max(offset + 1) - offset).min(avail)))
            }
        }
    }

    fn identity(&self) -> Option<(u64, u64)> {
        let md = self.file.metadata().ok()?;
        Some((md.dev(), md.ino()))
    }
}
