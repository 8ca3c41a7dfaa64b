//! The qcow2 runtime: guest-to-host mapping, the L2 cache, reading through compressed
//! clusters, subclusters, external data files and backing chains.

pub mod amend;
mod bitmap_ops;
pub mod bitmaps;
pub mod check;
pub mod compress;
pub mod create;
pub mod decompress;
pub mod dirtybits;
mod empty;
pub mod l2cache;
pub mod mapping;
pub mod meta;
mod overlap;
mod prealloc;
mod preallocate;
mod read;
mod rebuild;
pub mod refcounts;
pub mod refscan;
mod snapcheck;
pub mod snapshot;
mod truncate;
mod write;
mod writestate;
mod zerov2;

pub use overlap::OVERLAP_MESSAGE;

use crate::device::{BlockDevice, LayerStatus, StatusKind};
use crate::error::{Error, Result};
use crate::format::be::u64_table;
use crate::storage::Storage;
use l2cache::L2Cache;
use meta::ImageMeta;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Options for the qcow2 runtime.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Bytes of decoded L2 tables to keep in memory; `None` picks enough to cover the
    /// whole disk, up to 32 MiB (QEMU's default policy).
    pub l2_cache_bytes: Option<u64>,
    /// Open for writing.
    pub writable: bool,
    /// Open to be checked and repaired (QEMU's BDRV_O_CHECK): an image marked
    /// corrupt may be opened for writing, a dirty image is not repaired at open, and
    /// the autoclear bits stay as they are.
    pub check: bool,
}

/// Default upper bound for the L2 cache.
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    meta: ImageMeta,
    storage: Arc<dyn Storage>,
    /// The external data file, when the image has one; guest data lives there.
    data_file: Option<Arc<dyn Storage>>,
    backing: Option<Arc<dyn BlockDevice>>,
    /// The active L1 table; changed only under the writer's lock.
    l1: RwLock<Vec<u64>>,
    l2_cache: L2Cache,
    /// Whether some allocated clusters may be holes in the file, so block status
    /// must ask the file (images with preallocation=metadata, detected as QEMU does).
    file_may_have_holes: bool,
    /// The virtual size (changes with resize).
    size: AtomicU64,
    /// The end of the image file, as far as allocations reach.
    file_len: AtomicU64,
    /// The write side; `None` for read-only images.
    writer: Option<writestate::Writer>,
    /// Guest writes hold it shared for their whole request; snapshot operations
    /// hold it exclusively, so that no write is half in a snapshot (QEMU drains).
    /// Fair: a waiting snapshot stops new requests, so it is never starved; a
    /// request therefore takes it once, at its outermost entry point.
    guest_io: RwLock<()>,
    /// Dirty bitmaps (of writable images); taken before the writer's lock.
    bitmaps: Mutex<bitmaps::BitmapSet>,
    /// Some bitmap records writes (lets writes skip the bitmap lock otherwise).
    tracking: AtomicBool,
    /// Opened to be checked: each check reads the snapshot table itself.
    check_mode: bool,
    /// The snapshot table as the last check of a read-only image read it.
    checked_snapshots: Mutex<Option<snapcheck::CheckedTable>>,
}

impl Qcow2 {
    /// Opens a qcow2 image from its parsed metadata, the external data file (required
    /// when the image names one) and the backing device (if it is to be used).
    pub fn open(
        meta: ImageMeta,
        storage: Arc<dyn Storage>,
        data_file: Option<Arc<dyn Storage>>,
        backing: Option<Arc<dyn BlockDevice>>,
        opts: &EngineOptions,
    ) -> Result<Qcow2> {
        meta.check_readable()?;
        let h = &meta.header;
        if h.has_data_file() && data_file.is_none() {
            return Err(Error::InvalidArgument(
                "the image needs its external data file".into(),
            ));
        }
        let l1 = read_u64_table(storage.as_ref(), h.l1_table_offset, h.l1_size as usize)?;
        let cs = h.cluster_size();
        let want = opts
            .l2_cache_bytes
            .unwrap_or_else(|| (l1.len() as u64 * cs).min(DEFAULT_L2_CACHE_MAX));
        let tables = (want / cs).max(4) as usize;
        let file_may_have_holes = prealloc::detect_metadata_preallocation(&meta, storage.as_ref());
        let writer = if opts.writable {
            Some(writestate::Writer::open(
                &meta,
                storage.as_ref(),
                opts.check,
            )?)
        } else {
            None
        };
        let q = Qcow2 {
            l2_cache: L2Cache::new(tables),
            size: AtomicU64::new(meta.header.size),
            file_len: AtomicU64::new(meta.file_len),
            meta,
            storage,
            data_file,
            backing,
            l1: RwLock::new(l1),
            file_may_have_holes,
            writer,
            guest_io: RwLock::new(()),
            bitmaps: Mutex::new(bitmaps::BitmapSet::default()),
            tracking: AtomicBool::new(false),
            check_mode: opts.check,
            checked_snapshots: Mutex::new(None),
        };
        if q.writer.is_some() && !opts.check {
            if q.meta.header.is_dirty() {
                // Refcounts may be stale after a crash with lazy refcounts.
                q.repair_dirty()?;
            }
            q.prepare_for_writing()?;
            q.open_bitmaps()?;
        }
        Ok(q)
    }

    /// The end of the image file as the engine knows it.
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// The file grew (to at least `len`) outside the allocator.
    pub(crate) fn note_file_len(&self, len: u64) {
        self.file_len.fetch_max(len, Ordering::AcqRel);
    }

    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    pub fn meta(&self) -> &ImageMeta {
        &self.meta
    }

    pub fn header(&self) -> &crate::format::header::Header {
        &self.meta.header
    }

    pub fn cluster_size(&self) -> u64 {
        self.meta.header.cluster_size()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.storage)
    }

    pub fn l2_cache_capacity(&self) -> usize {
        self.l2_cache.capacity()
    }

    pub fn backing_device(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.as_ref()
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::device::check_range(offset, buf.len() as u64, self.size())?;
        self.read_range(buf, offset)
    }

    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        crate::device::check_range(offset, len, self.size())?;
        let (run, n) = self.lookup_run(offset, len)?;
        let mut st = run.status(n);
        if st.kind == StatusKind::Data && !st.compressed && self.file_may_have_holes {
            if let Some(host) = st.offset {
                match self.data_storage().extent_at(host, st.len)? {
                    crate::storage::Extent::Hole(h) => {
                        st.len = h.clamp(1, st.len);
                        st.file_zero = true;
                    }
                    crate::storage::Extent::Data(d) => st.len = d.clamp(1, st.len),
                }
            }
        }
        Ok(st)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Qcow2::write_at(self, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        Qcow2::write_zeroes(self, offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Qcow2::discard(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        Qcow2::flush(self)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }
}

/// Reads a table of `n` big-endian u64 entries at `offset` through a small buffer, so
/// that the bytes of a large L1 table (up to 32 MiB) are never held whole beside the
/// decoded table.
fn read_u64_table(storage: &dyn Storage, offset: u64, n: usize) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; (n * 8).min(64 << 10)];
    while out.len() < n {
        let k = (n - out.len()).min(buf.len() / 8);
        let chunk = &mut buf[..k * 8];
        storage.read_at(chunk, offset + out.len() as u64 * 8)?;
        out.extend(u64_table(chunk));
    }
    Ok(out)
}
