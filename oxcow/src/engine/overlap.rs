//! The metadata overlap check QEMU makes in its default ("cached") mode, on every
//! fresh allocation: a range about to receive data must not cover the header, the
//! active L1 table, an active L2 table, the refcount table, a refcount block, the
//! snapshot table, a snapshot's L1 table or the bitmap directory (while the bitmaps
//! are kept). When it does, the refcounts are wrong:
//! the image is marked corrupt and writes stop. Everything checked is in memory.

use super::writestate::WriteState;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::autoclear;
use crate::format::l1l2;
use crate::format::OFFSET_MASK;

/// What a write would destroy, with QEMU's names, in the order of QEMU's bits (the
/// lowest found is reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metadata {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    BitmapDirectory,
}

impl Metadata {
    fn name(self) -> &'static str {
        match self {
            Metadata::Header => "qcow2_header",
            Metadata::ActiveL1 => "active L1 table",
            Metadata::ActiveL2 => "active L2 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::InactiveL1 => "inactive L1 table",
            Metadata::BitmapDirectory => "bitmap directory",
        }
    }
}

/// The start of the message of an overlap error (QEMU's words).
pub const OVERLAP_MESSAGE: &str = "Preventing invalid write on metadata";

impl Qcow2 {
    /// Whether a metadata overlap stopped writes (the image is marked corrupt); QEMU
    /// then takes the medium away for every request.
    pub fn writes_stopped(&self) -> bool {
        self.writer.as_ref().is_some_and(|w| w.state.lock().corrupt)
    }

    /// Refuses (and marks the image corrupt) when `off..off+len`, just allocated,
    /// covers metadata: the refcounts said metadata was free.
    pub(super) fn check_overlap(&self, st: &mut WriteState, off: u64, len: u64) -> Result<()> {
        // Every structure lies inside the file (new L2 tables count in `file_len`
        // before they are written): growing the file overlaps nothing, and costs no
        // walk over the tables.
        // (A damaged snapshot table being repaired may run past the end.)
        let h = &st.header;
        let snapshots_end = match h.nb_snapshots {
            0 => 0,
            _ => h.snapshots_offset.saturating_add(st.snapshots_len),
        };
        if off >= self.file_len() && off >= self.storage.len()? && off >= snapshots_end {
            return Ok(());
        }
        let Some(what) = self.overlapping_metadata(st, off, len) else {
            return Ok(());
        };
        // The allocation is dropped again (QEMU never writes it back either).
        st.refcounts.free(self.storage.as_ref(), off, len)?;
        self.mark_corrupt(st)?;
        Err(Error::corrupt(
            format!("{OVERLAP_MESSAGE} (overlaps with {})", what.name()),
            off,
        ))
    }

    fn overlapping_metadata(&self, st: &WriteState, off: u64, len: u64) -> Option<Metadata> {
        let cs = self.cluster_size();
        let h = &st.header;
        let overlaps = |start: u64, l: u64| l > 0 && off < start + l && start < off + len;
        let clusters = |bytes: u64| bytes.div_ceil(cs) * cs;
        if off < cs {
            return Some(Metadata::Header);
        }
        if overlaps(h.l1_table_offset, clusters(h.l1_size as u64 * 8)) {
            return Some(Metadata::ActiveL1);
        }
        if self.l1.read().iter().any(|&e| {
            let l2 = l1l2::l1_l2_offset(e);
            l2 != 0 && overlaps(l2, cs)
        }) {
            return Some(Metadata::ActiveL2);
        }
        let table = (
            st.refcounts.table_offset(),
            st.refcounts.table_clusters() as u64 * cs,
        );
        if overlaps(table.0, table.1) {
            return Some(Metadata::RefcountTable);
        }
        if st.refcounts.table().iter().any(|&e| {
            let block = e & OFFSET_MASK & !(cs - 1);
            block != 0 && overlaps(block, cs)
        }) {
            return Some(Metadata::RefcountBlock);
        }
        if h.nb_snapshots > 0 && overlaps(h.snapshots_offset, clusters(st.snapshots_len).max(cs)) {
            return Some(Metadata::SnapshotTable);
        }
        if st
            .snapshots
            .iter()
            .any(|s| overlaps(s.l1_table_offset, clusters(s.l1_size as u64 * 8)))
        {
            return Some(Metadata::InactiveL1);
        }
        if let Some(b) = &st.extras.bitmaps {
            let kept = st.header.autoclear_features & autoclear::BITMAPS != 0;
            if kept && overlaps(b.directory_offset, b.directory_size) {
                return Some(Metadata::BitmapDirectory);
            }
        }
        None
    }
}
