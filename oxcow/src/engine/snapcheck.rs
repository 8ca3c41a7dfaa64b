//! The snapshot table as `qemu-img check` reads it (QEMU's check-mode open does not
//! read it at all): the table pointer is read again from the header, too many
//! snapshots, a table too large, entries with too much extra data are reported and,
//! with `-r all`, cut or trimmed; v3 entries without a disk size are reported as
//! incomplete. Cut snapshots are dropped from the header's count at once (their
//! clusters leak, and the refcount check frees them); the other repairs need the
//! table rewritten, which `Qcow2::check` does after the refcounts are repaired.

use super::check::{CheckReport, Fix};
use crate::error::Result;
use crate::format::be::{put_u16, put_u32, u16_at, u32_at, u64_at};
use crate::format::snapshot::{SnapshotEntry, MAX_EXTRA_DATA};
use crate::format::{MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES};
use crate::storage::Storage;

/// Where the header keeps nb_snapshots (then snapshots_offset).
const NB_SNAPSHOTS_AT: u64 = 60;
/// The fixed part of a snapshot table entry.
const ENTRY_HEADER: u64 = 40;
/// The extra data an entry of a version 3 image must have (VM state and disk size).
const V3_EXTRA_MIN: usize = 16;

/// The snapshot table as a check read it.
#[derive(Debug, Clone, Default)]
pub(crate) struct CheckedTable {
    pub offset: u64,
    pub len: u64,
    pub entries: Vec<SnapshotEntry>,
    /// What the table read found; its corruptions are the entries the table must be
    /// rewritten for.
    pub res: CheckReport,
}

/// Why the table could not be read: the check fails with this reason.
pub(crate) struct Unreadable(pub CheckReport);

/// QEMU's qcow2_check_read_snapshot_table. `version` is the image's qcow2 version.
pub(crate) fn read_for_check(
    io: &dyn Storage,
    cluster_size: u64,
    version: u32,
    fix: Fix,
) -> Result<std::result::Result<CheckedTable, Unreadable>> {
    let mut res = CheckReport::default();
    let mut ptr = [0u8; 12];
    io.read_at(&mut ptr, NB_SNAPSHOTS_AT)?;
    let mut nb = u32_at(&ptr, 0);
    let offset = u64_at(&ptr, 4);
    let mut reduced: u32 = 0;
    if nb > MAX_SNAPSHOTS && fix.errors() {
        res.msg(format!(
            "Discarding {} overhanging snapshots",
            nb - MAX_SNAPSHOTS
        ));
        reduced += nb - MAX_SNAPSHOTS;
        nb = MAX_SNAPSHOTS;
    }
    // QEMU's qcow2_validate_table with 40-byte entries.
    let failure = if nb > MAX_SNAPSHOTS {
        Some(("snapshot table too large", "File too large"))
    } else if (i64::MAX as u64) - nb as u64 * ENTRY_HEADER < offset
        || !offset.is_multiple_of(cluster_size)
    {
        Some(("snapshot table offset invalid", "Invalid argument"))
    } else {
        None
    };
    if let Some((what, reason)) = failure {
        res.check_errors += 1;
        res.report(format!("ERROR {what}"));
        if nb > MAX_SNAPSHOTS {
            res.msg(format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                nb - MAX_SNAPSHOTS
            ));
        }
        res.failure = Some(reason.into());
        return Ok(Err(Unreadable(res)));
    }

    let repair = fix.errors();
    let mut entries = Vec::with_capacity(nb.min(1024) as usize);
    let mut dropped = 0u64;
    let mut at = offset;
    let mut table_len = 0u64;
    let mut i = 0u32;
    while i < nb {
        let before = at;
        table_len = table_len.next_multiple_of(8);
        at = at.next_multiple_of(8);
        let mut head = [0u8; ENTRY_HEADER as usize];
        io.read_at(&mut head, at)?;
        at += ENTRY_HEADER;
        let id_len = u16_at(&head, 12) as u64;
        let name_len = u16_at(&head, 14) as u64;
        let extra_len = u32_at(&head, 36) as u64;
        let mut kept_extra = extra_len;
        if extra_len > MAX_EXTRA_DATA as u64 {
            if !repair {
                res.check_errors += 1;
                res.report(format!(
                    "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}"
                ));
                res.msg("You can force-remove this extra metadata with qemu-img check -r all");
                res.failure = Some("File too large".into());
                return Ok(Err(Unreadable(res)));
            }
            res.msg(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra_len} > {MAX_EXTRA_DATA})"
            ));
            dropped += 1;
            kept_extra = MAX_EXTRA_DATA as u64;
        }
        // The entry as it will be kept: its fixed part, the extra data (cut to the
        // cap), the ID and the name (C strings to QEMU: cut at a NUL); parsed by the
        // table's own parser.
        let mut raw = head.to_vec();
        raw.resize((ENTRY_HEADER + kept_extra) as usize, 0);
        io.read_at(&mut raw[ENTRY_HEADER as usize..], at)?;
        at += extra_len;
        let mut strings = vec![0u8; (id_len + name_len) as usize];
        io.read_at(&mut strings, at)?;
        at += id_len + name_len;
        let (id, name) = strings.split_at(id_len as usize);
        let (id, name) = (c_string(id), c_string(name));
        put_u32(&mut raw, 36, kept_extra as u32);
        put_u16(&mut raw, 12, id.len() as u16);
        put_u16(&mut raw, 14, name.len() as u16);
        raw.extend_from_slice(id);
        raw.extend_from_slice(name);
        let (entry, _) = SnapshotEntry::parse(&raw)?;
        table_len += ENTRY_HEADER + kept_extra + id_len + name_len;
        if table_len > MAX_SNAPSHOT_TABLE_BYTES || at - offset > i32::MAX as u64 {
            let over = nb - i;
            if !repair {
                res.check_errors += 1;
                res.report("ERROR failed to read the snapshot table: Snapshot table is too big");
                res.msg(format!(
                    "You can force-remove all {over} overhanging snapshots with qemu-img check -r all"
                ));
                res.failure = Some("File too large".into());
                return Ok(Err(Unreadable(res)));
            }
            res.msg(format!(
                "Discarding {over} overhanging snapshots (snapshot table is too big)"
            ));
            reduced += over;
            nb = i;
            at = before;
            break;
        }
        entries.push(entry);
        i += 1;
    }
    let len = at - offset;
    res.corruptions += reduced as u64 + dropped;
    if reduced != 0 {
        // The header's count first: the refcount check counts what it says, and
        // frees what the cut snapshots held.
        let mut b = [0u8; 4];
        put_u32(&mut b, 0, nb);
        if let Err(e) = io.write_at(&b, NB_SNAPSHOTS_AT).and_then(|_| io.flush()) {
            res.check_errors += 1;
            let why = crate::error::strerror(&e);
            res.msg(format!(
                "ERROR failed to update the snapshot count in the image header: {why}"
            ));
            res.failure = Some(why);
            return Ok(Err(Unreadable(res)));
        }
        res.corruptions_fixed += reduced as u64;
        res.corruptions -= reduced as u64;
    }
    if version >= 3 {
        let word = if repair { "Repairing" } else { "ERROR" };
        for (i, e) in entries.iter().enumerate() {
            if e.extra.len() < V3_EXTRA_MIN {
                res.corruptions += 1;
                res.msg(format!("{word} snapshot table entry {i} is incomplete"));
            }
        }
    }
    Ok(Ok(CheckedTable {
        offset: if entries.is_empty() { 0 } else { offset },
        len: if entries.is_empty() { 0 } else { len },
        entries,
        res,
    }))
}

/// The bytes of a C string stored in `b`: up to the first NUL.
fn c_string(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}
