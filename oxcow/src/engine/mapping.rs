//! Guest-to-host mapping: from a guest offset to a run of bytes that share one fate
//! (unallocated, zero, data at contiguous host offsets, or one compressed cluster).
//! Every host offset read from an L1 or L2 table is checked here before use.

use super::l2cache::L2Table;
use super::Qcow2;
use crate::device::{LayerStatus, StatusKind};
use crate::error::{Error, Result};
use crate::format::be::u64_table;
use crate::format::compressed::CompressedDescriptor;
use crate::format::l1l2::{self, L2Entry, SUBCLUSTERS};
use std::sync::Arc;

/// What a run of guest bytes maps to in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Not allocated here: the backing file shows through. `host` is where an
    /// allocated cluster of extended L2 entries holds the (unallocated) subcluster.
    Unallocated { host: Option<u64> },
    /// Reads as zeros; `host` is where a preallocated run lies.
    Zero { host: Option<u64> },
    /// Data at `host` in the data storage, contiguous for the whole run.
    Data { host: u64 },
    /// Part of one compressed cluster.
    Compressed(CompressedDescriptor),
}

impl Run {
    pub fn status(&self, len: u64) -> LayerStatus {
        let (kind, offset, compressed) = match *self {
            Run::Unallocated { host } => (StatusKind::Unallocated, host, false),
            Run::Zero { host } => (StatusKind::Zero, host, false),
            Run::Data { host } => (StatusKind::Data, Some(host), false),
            Run::Compressed(_) => (StatusKind::Data, None, true),
        };
        LayerStatus {
            kind,
            len,
            offset,
            compressed,
            file_zero: false,
        }
    }

    /// The same run seen `delta` bytes further on.
    fn advanced(&self, delta: u64) -> Run {
        match *self {
            Run::Zero { host: Some(h) } => Run::Zero {
                host: Some(h + delta),
            },
            Run::Unallocated { host: Some(h) } => Run::Unallocated {
                host: Some(h + delta),
            },
            Run::Data { host } => Run::Data { host: host + delta },
            other => other,
        }
    }
}

impl Qcow2 {
    /// The run at guest `offset`, at most `len` bytes long (and never crossing an L2
    /// table's coverage). `len` must be at least 1.
    pub fn lookup_run(&self, offset: u64, len: u64) -> Result<(Run, u64)> {
        let h = &self.meta.header;
        let cs = h.cluster_size();
        let coverage = h.l2_coverage();
        let l1_index = (offset / coverage) as usize;
        let table_end = (offset / coverage + 1) * coverage;
        let max = len.min(table_end - offset);
        let Some(l1_entry) = self.l1.read().get(l1_index).copied() else {
            return Ok((Run::Unallocated { host: None }, max));
        };
        let l2_offset = l1l2::l1_l2_offset(l1_entry);
        if l2_offset == 0 {
            return Ok((Run::Unallocated { host: None }, max));
        }
        if !l2_offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                format!("L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})"),
                l2_offset,
            ));
        }
        let table = self.l2_table(l2_offset)?;
        let end = offset + max;
        let (first, mut unit_end) = self.classify(&table, l2_offset, offset)?;
        if let Run::Compressed(_) = first {
            return Ok((first, unit_end.min(end) - offset));
        }
        while unit_end < end {
            let (next, next_end) = self.classify(&table, l2_offset, unit_end)?;
            if next != first.advanced(unit_end - offset) {
                break;
            }
            unit_end = next_end;
        }
        Ok((first, unit_end.min(end) - offset))
    }

    /// The run kind of the (sub)cluster holding guest `pos`, and where that unit ends.
    fn classify(&self, table: &[u64], l2_offset: u64, pos: u64) -> Result<(Run, u64)> {
        let h = &self.meta.header;
        let bits = h.cluster_bits;
        let cs = h.cluster_size();
        let index = ((pos % h.l2_coverage()) / cs) as usize;
        let in_cluster = pos % cs;
        let cluster_end = pos - in_cluster + cs;
        let corrupt = |what: String, at: u64| {
            Error::corrupt(
                format!("{what} (L2 offset: {l2_offset:#x}, L2 index: {index:#x})"),
                at,
            )
        };
        let entry = if h.has_extended_l2() {
            L2Entry::decode_extended(table[index * 2], table[index * 2 + 1], bits)
        } else {
            L2Entry::decode(table[index], bits, h.has_data_file())
        };
        let run = match entry {
            L2Entry::Unallocated => Run::Unallocated { host: None },
            L2Entry::Zero { host } => {
                if let Some(host) = host {
                    if host % cs != 0 {
                        return Err(corrupt(
                            format!("Preallocated zero cluster offset {host:#x} unaligned"),
                            host,
                        ));
                    }
                }
                Run::Zero { host }
            }
            L2Entry::Normal { host, .. } => {
                self.check_data_cluster(host, &corrupt)?;
                self.check_data_file_offset(host, pos - in_cluster, &corrupt)?;
                Run::Data {
                    host: host + in_cluster,
                }
            }
            L2Entry::Compressed(d) => {
                if self.data_file.is_some() {
                    return Err(corrupt(
                        "Compressed cluster in an image with an external data file".into(),
                        d.offset,
                    ));
                }
                if d.offset.saturating_add(d.byte_len()) > self.file_len().div_ceil(512) * 512
                    || d.offset >= self.file_len()
                {
                    return Err(corrupt(
                        format!(
                            "Compressed cluster at {:#x} of {} bytes runs past the end of the file",
                            d.offset,
                            d.byte_len()
                        ),
                        d.offset,
                    ));
                }
                Run::Compressed(d)
            }
            L2Entry::Extended {
                host,
                alloc,
                zero,
                copied,
            } => {
                let sc_size = cs / SUBCLUSTERS as u64;
                let sc = (in_cluster / sc_size) as u32;
                let unit_end = pos - in_cluster + (sc as u64 + 1) * sc_size;
                if alloc & zero != 0 {
                    return Err(corrupt(format!("Invalid subcluster bitmap: allocated and zero bits both set ({alloc:#x}, {zero:#x})"), l2_offset));
                }
                // Host offset 0 is a real cluster of an external data file: QEMU tells
                // it from "no cluster" by the COPIED flag (data file clusters always
                // have refcount 1).
                let allocated = host != 0 || (h.has_data_file() && copied);
                if !allocated && alloc != 0 {
                    return Err(corrupt(
                        "Subclusters allocated in an unallocated cluster".into(),
                        l2_offset,
                    ));
                }
                if allocated {
                    self.check_data_cluster(host, &corrupt)?;
                }
                let run = if alloc & (1 << sc) != 0 {
                    self.check_data_file_offset(host, pos - in_cluster, &corrupt)?;
                    Run::Data {
                        host: host + in_cluster,
                    }
                } else if zero & (1 << sc) != 0 {
                    Run::Zero {
                        host: allocated.then_some(host + in_cluster),
                    }
                } else {
                    Run::Unallocated {
                        host: allocated.then_some(host + in_cluster),
                    }
                };
                return Ok((run, unit_end));
            }
        };
        Ok((run, cluster_end))
    }

    /// In an external data file a guest cluster lives at its own offset: QEMU (since
    /// the fix of CVE-2024-4467) refuses any other host offset of a data cluster.
    fn check_data_file_offset(
        &self,
        host: u64,
        guest: u64,
        corrupt: &dyn Fn(String, u64) -> Error,
    ) -> Result<()> {
        if self.meta.header.has_data_file() && host != guest {
            return Err(corrupt(
                format!(
                    "External data file host cluster offset {host:#x} does not match guest cluster offset {guest:#x}"
                ),
                host,
            ));
        }
        Ok(())
    }

    fn check_data_cluster(&self, host: u64, corrupt: &dyn Fn(String, u64) -> Error) -> Result<()> {
        let cs = self.meta.header.cluster_size();
        if !host.is_multiple_of(cs) {
            return Err(corrupt(
                format!("Cluster allocation offset {host:#x} unaligned"),
                host,
            ));
        }
        if self.data_file.is_none() && host >= self.file_len() {
            return Err(corrupt(
                format!("Data cluster at {host:#x} lies past the end of the file"),
                host,
            ));
        }
        Ok(())
    }

    /// The decoded L2 table at `offset`, from the cache or from disk.
    pub(crate) fn l2_table(&self, offset: u64) -> Result<L2Table> {
        if let Some(t) = self.l2_cache.get(offset) {
            return Ok(t);
        }
        let cs = self.meta.header.cluster_size();
        if offset.saturating_add(cs) > self.file_len() {
            return Err(Error::corrupt(
                format!("L2 table at {offset:#x} lies past the end of the file"),
                offset,
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        self.storage.read_at(&mut raw, offset)?;
        Ok(self
            .l2_cache
            .insert_clean(offset, Arc::new(u64_table(&raw))))
    }
}
