//! An input image as qemu-img's copying commands see it: opened with its backing
//! chain, sized in whole 512-byte sectors the way QEMU sizes it (a raw file's length is
//! rounded up, a qcow2 size rounded down), reads past the file's end returning zeros.

use crate::common;
use oxcow::{BlockDevice, BlockStatus, Format, Image, OpenOptions, StatusKind};

pub const SECTOR: u64 = 512;

#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub img: Image,
    /// The device's own size in bytes.
    real: u64,
    /// The size QEMU uses: a whole number of sectors.
    pub len: u64,
    /// Request alignment for block status runs (the cluster size of a qcow2 image),
    /// in bytes.
    pub align: u64,
}

impl Source {
    /// Opens `name` read-only (with `-f fmt` if given); the error is the message
    /// qemu-img prints ("Could not open ...").
    pub fn open(name: &str, fmt: Option<&str>) -> Result<Source, String> {
        let img = common::open_image(name, fmt, &OpenOptions::default())?;
        Ok(Source::from_image(name, img))
    }

    /// The input as an already opened image (`name` as given on the command line).
    pub fn from_image(name: &str, img: Image) -> Source {
        let real = img.size();
        let (len, align) = match img.format() {
            Format::Raw => (real.div_ceil(SECTOR) * SECTOR, SECTOR),
            Format::Qcow2 => {
                let cs = img.qcow2().map(|q| q.cluster_size()).unwrap_or(SECTOR);
                (real / SECTOR * SECTOR, cs.max(SECTOR))
            }
        };
        Source {
            name: name.to_string(),
            img,
            real,
            len,
            align,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (inside `len`); bytes past the device's
    /// end read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> oxcow::Result<()> {
        let n = self.real.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            self.img.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Block status of the chain at `offset` for at most `len` bytes (`len` >= 1,
    /// inside `self.len`). The sector tail past the end of a raw file reads as an
    /// allocated hole.
    pub fn status(&self, offset: u64, len: u64) -> oxcow::Result<BlockStatus> {
        if offset >= self.real {
            return Ok(BlockStatus {
                len,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(offset),
            });
        }
        let len = len.min(self.real - offset);
        oxcow::block_status(&self.img, offset, len)
    }

    /// Block status of the image alone, above its backing file (what qemu-img asks
    /// when the target has a backing file of its own): unallocated ranges are
    /// neither data nor zero, except past the end of the backing file. An image
    /// without a backing file answers for itself as [`Source::status`] does.
    pub fn status_above_backing(&self, offset: u64, len: u64) -> oxcow::Result<BlockStatus> {
        let Some(backing) = self.img.backing_image() else {
            return self.status(offset, len);
        };
        if offset >= self.real {
            return self.status(offset, len);
        }
        let len = len.min(self.real - offset);
        let s = self.img.layer_status(offset, len)?;
        let (zero, data) = match s.kind {
            StatusKind::Data => (s.file_zero, true),
            StatusKind::Zero => (true, false),
            StatusKind::Unallocated => (offset >= qemu_len(backing), false),
        };
        Ok(BlockStatus {
            len: s.len,
            depth: 0,
            present: s.kind != StatusKind::Unallocated,
            zero,
            data,
            compressed: s.compressed,
            offset: s.offset,
        })
    }
}

/// An image's length as QEMU sees it: a raw file's length rounded up to whole
/// sectors, a qcow2 size rounded down.
pub fn qemu_len(img: &Image) -> u64 {
    let real = img.size();
    match img.format() {
        Format::Raw => real.div_ceil(SECTOR) * SECTOR,
        Format::Qcow2 => real / SECTOR * SECTOR,
    }
}

/// The reason text QEMU would print after "error while reading ...: ". A cluster
/// that does not decompress is an I/O error for QEMU (EIO); other library errors
/// (corruption QEMU would not notice) keep oxcow's own description.
pub fn error_reason(e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Io(io) => common::io_reason(io),
        oxcow::Error::Decompress { .. } => "Input/output error".to_string(),
        other => other.to_string(),
    }
}
