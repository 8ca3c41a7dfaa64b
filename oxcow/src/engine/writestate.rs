//! The write side of an open image: the state that only writers touch (refcounts,
//! the header as it will be written, frees waiting for their references to reach the
//! disk, guest clusters being allocated), behind one lock that is never held across
//! guest data I/O.

use super::meta::ImageMeta;
use super::refcounts::Refcounts;
use crate::error::{Error, Result};
use crate::format::cluster0::HeaderExtras;
use crate::format::extension;
use crate::format::header::Header;
use crate::format::snapshot::SnapshotEntry;
use crate::storage::Storage;
use parking_lot::{Condvar, Mutex};
use std::collections::HashSet;

#[derive(Debug)]
pub(crate) struct WriteState {
    /// The header as it is (or will be) on disk.
    pub header: Header,
    pub extras: HeaderExtras,
    pub refcounts: Refcounts,
    /// The in-memory L1 table differs from the disk.
    pub l1_dirty: bool,
    /// References already dropped in memory whose refcounts may only be decreased
    /// once the tables that dropped them are on disk: (offset, length, punch a hole).
    pub pending_frees: Vec<(u64, u64, bool)>,
    /// Guest clusters whose allocation is under way; other writers wait for them.
    pub inflight: HashSet<u64>,
    /// Where the next compressed cluster may go (0: start a new host cluster).
    pub free_byte_offset: u64,
    /// Set once a metadata overlap was found: no more writes.
    pub corrupt: bool,
    /// The snapshot table as it is on disk (changed by engine/snapshot.rs).
    pub snapshots: Vec<SnapshotEntry>,
    /// Bytes the snapshot table takes in the file.
    pub snapshots_len: u64,
}

#[derive(Debug)]
pub(crate) struct Writer {
    pub state: Mutex<WriteState>,
    /// Signalled when an in-flight allocation finishes.
    pub done: Condvar,
}

impl Writer {
    pub fn open(meta: &ImageMeta, io: &dyn Storage, check: bool) -> Result<Writer> {
        let h = &meta.header;
        if h.is_corrupt() && !check {
            return Err(Error::Unsupported(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        if h.crypt_method != crate::format::header::CryptMethod::None {
            return Err(Error::Unsupported(
                "Encrypted images are not supported yet by oxcow".into(),
            ));
        }
        let refcounts = Refcounts::load(
            io,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?;
        let extras = extras_of(meta);
        Ok(Writer {
            state: Mutex::new(WriteState {
                header: h.clone(),
                extras,
                refcounts,
                l1_dirty: false,
                pending_frees: Vec::new(),
                inflight: HashSet::new(),
                free_byte_offset: 0,
                corrupt: false,
                // An entry without a recorded disk size had the current one (QEMU).
                snapshots: meta
                    .snapshots
                    .iter()
                    .map(|s| SnapshotEntry {
                        disk_size: s.disk_size.or(Some(h.size)),
                        ..s.clone()
                    })
                    .collect(),
                snapshots_len: meta.snapshots_len,
            }),
            done: Condvar::new(),
        })
    }
}

/// The header extensions of an image as a rewrite of cluster 0 keeps them (those
/// oxcow knows are re-encoded, the others kept as they were).
pub(crate) fn extras_of(meta: &ImageMeta) -> HeaderExtras {
    let unknown = meta
        .extensions
        .iter()
        .filter(|e| {
            !matches!(
                e.kind,
                extension::BACKING_FORMAT
                    | extension::FEATURE_TABLE
                    | extension::BITMAPS
                    | extension::CRYPTO_HEADER
                    | extension::DATA_FILE
            )
        })
        .cloned()
        .collect();
    HeaderExtras {
        backing_file: meta.backing_file.clone(),
        backing_format: meta.backing_format.clone(),
        data_file: meta.data_file.clone(),
        crypto_header: meta.crypto_header,
        bitmaps: meta.bitmaps_ext,
        unknown,
    }
}
