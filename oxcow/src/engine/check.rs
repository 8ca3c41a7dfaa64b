//! Checking and repairing an image, as `qemu-img check [-r leaks|all]` does: the
//! references counted by `refscan.rs` are compared with the refcounts on disk
//! (leaks: a refcount above the references; corruptions: below), then the COPIED
//! flags of the active L1 and L2 entries are compared with the refcounts. Repair
//! rewrites refcounts through the writer's `Refcounts` (and its flush order), fixes
//! COPIED flags, and rebuilds the whole refcount structure (`rebuild.rs`) when the
//! refcount blocks themselves are damaged. The messages are qemu-img's, word for word.

use super::refscan::{cluster_type, read_padded, ClusterType, Imrt, RefTable, Scan};
use super::writestate::WriteState;
use super::Qcow2;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::be::{put_u64, u64_at, u64_table};
use crate::format::header::{autoclear, incompat};
use crate::format::l1l2::COPIED;
use crate::format::refcount;
use crate::format::OFFSET_MASK;
use crate::storage::Storage;

/// What a check may repair (qemu-img check's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fix {
    /// Only report.
    #[default]
    None,
    /// Free leaked clusters (`-r leaks`).
    Leaks,
    /// Also fix refcounts that are too low, COPIED flags, and rebuild damaged
    /// refcount structures (`-r all`).
    All,
}

impl Fix {
    pub fn leaks(self) -> bool {
        self != Fix::None
    }

    pub fn errors(self) -> bool {
        self == Fix::All
    }
}

/// The reason a failed check gives.
fn reason(e: &Error) -> String {
    match e {
        Error::Io(io) => crate::error::strerror(io),
        other => other.to_string(),
    }
}

/// Marks the messages printed as error reports (see `CheckReport::lines`).
const REPORTED: &str = "\u{1}";

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub check_errors: u64,
    pub leaks: u64,
    pub corruptions: u64,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    /// The check could not be completed: the reason (qemu-img prints "Check failed:
    /// REASON").
    pub failure: Option<String>,
    /// What was found and repaired, one line each, as qemu-img prints them on stderr.
    pub messages: Vec<String>,
}

/// The most lines a report keeps: a damaged table can make every entry of every
/// L2 table it reaches an error, millions of lines a report would otherwise hold
/// in memory (qemu-img prints them as it goes).
pub const MAX_MESSAGES: usize = 100_000;

impl CheckReport {
    pub(crate) fn msg(&mut self, m: impl Into<String>) {
        match self.messages.len() {
            n if n < MAX_MESSAGES => self.messages.push(m.into()),
            MAX_MESSAGES => self
                .messages
                .push("(further messages not kept: too many problems to list)".into()),
            _ => {}
        }
    }

    /// A line qemu-img prints through error_report (after the program's name).
    pub(crate) fn report(&mut self, m: impl Into<String>) {
        self.messages.push(format!("{REPORTED}{}", m.into()));
    }

    /// The messages in order, each with whether it is an error report (printed
    /// after the program's name, as `qemu-img: MESSAGE`).
    pub fn lines(&self) -> impl Iterator<Item = (bool, &str)> {
        self.messages
            .iter()
            .map(|m| match m.strip_prefix(REPORTED) {
                Some(rest) => (true, rest),
                None => (false, m.as_str()),
            })
    }

    /// Adds another part's counters and messages (QEMU's qcow2_add_check_result
    /// without the cluster statistics).
    pub(crate) fn add(&mut self, other: &CheckReport) {
        self.check_errors += other.check_errors;
        self.leaks += other.leaks;
        self.corruptions += other.corruptions;
        self.leaks_fixed += other.leaks_fixed;
        self.corruptions_fixed += other.corruptions_fixed;
    }

    /// Nothing wrong was found (leaks count as wrong).
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.leaks == 0 && self.corruptions == 0 && self.failure.is_none()
    }

    fn counters_only(&self) -> CheckReport {
        CheckReport {
            messages: Vec::new(),
            ..self.clone()
        }
    }

    fn restore_counters(&mut self, from: &CheckReport) {
        let messages = std::mem::take(&mut self.messages);
        *self = from.counters_only();
        self.messages = messages;
    }
}

/// The refcounts as the refcount blocks on disk say them, read block by block.
pub(crate) struct DiskRefcounts {
    values: Vec<u64>,
    /// Per refcount table index: the block's offset when it is unaligned (the block
    /// cannot be read), else 0.
    bad: Vec<u64>,
    /// Per refcount table index: reading the block failed.
    unreadable: Vec<bool>,
    /// The first unaligned block was reported.
    reported: bool,
    block_bits: u32,
}

impl DiskRefcounts {
    pub fn load(
        io: &dyn Storage,
        table: &[u64],
        cluster_bits: u32,
        order: u32,
        clusters: u64,
    ) -> Result<DiskRefcounts> {
        let cs = 1u64 << cluster_bits;
        let block_bits = cluster_bits + 3 - order;
        let epb = 1u64 << block_bits;
        let nblocks = clusters.div_ceil(epb);
        let mut values = vec![0u64; clusters as usize];
        let mut bad = vec![0u64; nblocks as usize];
        let mut unreadable = vec![false; nblocks as usize];
        let mut buf = vec![0u8; cs as usize];
        for t in 0..nblocks {
            let Some(&e) = table.get(t as usize) else {
                break;
            };
            let off = e & super::refcounts::REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                bad[t as usize] = off;
                continue;
            }
            if read_padded(io, &mut buf, off).is_err() {
                unreadable[t as usize] = true;
                continue;
            }
            let first = t * epb;
            let n = epb.min(clusters - first);
            for (j, v) in values[first as usize..(first + n) as usize]
                .iter_mut()
                .enumerate()
            {
                *v = refcount::get(&buf, order, j);
            }
        }
        Ok(DiskRefcounts {
            values,
            bad,
            unreadable,
            reported: false,
            block_bits,
        })
    }

    /// The refcount of `cluster`; `None` when its block cannot be read.
    pub fn get(&self, cluster: u64) -> Option<u64> {
        let t = (cluster >> self.block_bits) as usize;
        if self.bad_block(cluster).is_some() || self.unreadable.get(t).copied().unwrap_or(false) {
            return None;
        }
        Some(self.values.get(cluster as usize).copied().unwrap_or(0))
    }

    /// The unaligned offset of the block describing `cluster`, and its table index.
    fn bad_block(&self, cluster: u64) -> Option<(u64, u64)> {
        let t = cluster >> self.block_bits;
        match self.bad.get(t as usize) {
            Some(&off) if off != 0 => Some((off, t)),
            _ => None,
        }
    }

    fn set(&mut self, cluster: u64, v: u64) {
        if let Some(x) = self.values.get_mut(cluster as usize) {
            *x = v;
        }
    }
}

impl Qcow2 {
    /// Checks the image as `qemu-img check` does and, with `fix`, repairs it (the
    /// image must be open for writing, ideally with `OpenOptions::check`).
    pub fn check(&self, fix: Fix) -> Result<CheckReport> {
        if fix != Fix::None && self.writer.is_none() {
            return Err(Error::Unsupported(
                "repairing needs the image open for writing".into(),
            ));
        }
        // Whatever a writer has cached reaches the disk first.
        self.flush()?;
        let mut st = self.writer.as_ref().map(|w| w.state.lock());
        let mut res = CheckReport::default();
        // The snapshot table's own problems (QEMU's snapshot_res): read first, the
        // table rewritten after the refcounts are repaired.
        let mut snap = CheckReport::default();
        if self.check_mode {
            match self.read_snapshot_table(st.as_deref_mut(), fix) {
                Ok(Ok(r)) => snap = r,
                Ok(Err(r)) => return Ok(r),
                Err(e) => {
                    res.check_errors += 1;
                    res.failure = Some(reason(&e));
                    return Ok(res);
                }
            }
            res.messages = std::mem::take(&mut snap.messages);
        }
        match self.check_locked(st.as_deref_mut(), fix, &mut res) {
            Ok(()) => {}
            Err(e) => {
                res.check_errors += 1;
                res.failure = Some(reason(&e));
            }
        }
        if let (Some(st), true, None) = (st.as_deref_mut(), fix.errors(), &res.failure) {
            if snap.corruptions != 0 {
                let list = st.snapshots.clone();
                match self.replace_snapshot_table(st, list) {
                    Ok(old) => {
                        snap.corruptions_fixed += snap.corruptions;
                        snap.corruptions = 0;
                        // As QEMU's qcow2_free_clusters: a failure leaks, no more.
                        if let Some((offset, len)) = old {
                            if let Err(e) = self.free_old_snapshot_table(st, offset, len) {
                                let why = match &e {
                                    Error::Io(io) => crate::error::strerror(io),
                                    _ => "Invalid argument".to_string(),
                                };
                                res.msg(format!("qcow2_free_clusters failed: {why}"));
                            }
                        }
                    }
                    Err(e) => {
                        snap.check_errors += 1;
                        let why = match &e {
                            Error::Corrupt { what, .. }
                                if what.starts_with(super::OVERLAP_MESSAGE) =>
                            {
                                res.msg(format!("qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"));
                                "Input/output error".to_string()
                            }
                            e => reason(e),
                        };
                        res.msg(format!("ERROR failed to update snapshot table: {why}"));
                        res.failure = Some(why);
                    }
                }
            }
        }
        res.add(&snap);
        if let Some(st) = st.as_deref_mut() {
            if fix != Fix::None
                && res.failure.is_none()
                && res.check_errors == 0
                && res.corruptions == 0
            {
                self.mark_clean_and_consistent(st)?;
            }
        }
        self.l2_cache.clear();
        Ok(res)
    }

    /// Reads the snapshot table as a check does (`snapcheck.rs`) and makes it the
    /// one the check counts and a repair rewrites. `Ok(Err(report))`: the table
    /// cannot be read, the check fails with that report.
    fn read_snapshot_table(
        &self,
        st: Option<&mut WriteState>,
        fix: Fix,
    ) -> Result<std::result::Result<CheckReport, CheckReport>> {
        let h = &self.meta.header;
        let io = self.storage.as_ref();
        let mut t = match super::snapcheck::read_for_check(io, h.cluster_size(), h.version, fix)? {
            Ok(t) => t,
            Err(super::snapcheck::Unreadable(r)) => return Ok(Err(r)),
        };
        let res = std::mem::take(&mut t.res);
        match st {
            Some(st) => {
                let size = self.size();
                st.header.nb_snapshots = t.entries.len() as u32;
                st.header.snapshots_offset = t.offset;
                st.snapshots_len = t.len;
                // An entry without a recorded disk size had the current one (QEMU).
                st.snapshots = t
                    .entries
                    .into_iter()
                    .map(|s| crate::format::snapshot::SnapshotEntry {
                        disk_size: s.disk_size.or(Some(size)),
                        ..s
                    })
                    .collect();
            }
            None => *self.checked_snapshots.lock() = Some(t),
        }
        Ok(Ok(res))
    }

    fn mark_clean_and_consistent(&self, st: &mut WriteState) -> Result<()> {
        let bits = incompat::DIRTY | incompat::CORRUPT;
        if st.header.incompatible_features & bits == 0 || st.header.version < 3 {
            return Ok(());
        }
        st.header.incompatible_features &= !bits;
        let mut b = [0u8; 8];
        put_u64(&mut b, 0, st.header.incompatible_features);
        self.storage.write_at(&b, 72)?;
        self.storage.flush()?;
        st.corrupt = false;
        Ok(())
    }

    fn reftable(&self, st: Option<&WriteState>) -> Result<RefTable> {
        Ok(match st {
            Some(st) => RefTable {
                l1_offset: st.header.l1_table_offset,
                offset: st.refcounts.table_offset(),
                entries: st.refcounts.table().to_vec(),
                snapshots_offset: st.header.snapshots_offset,
                snapshots_len: st.snapshots_len,
                snapshots: st.snapshots.clone(),
                bitmaps: self.bitmaps_on_disk(&st.header, st.extras.bitmaps)?,
            },
            None => {
                let h = &self.meta.header;
                let checked = self.checked_snapshots.lock().clone();
                let (snapshots_offset, snapshots_len, snapshots) = match checked {
                    Some(t) => (t.offset, t.len, t.entries),
                    None => (
                        h.snapshots_offset,
                        self.meta.snapshots_len,
                        self.meta.snapshots.clone(),
                    ),
                };
                let mut raw =
                    vec![0u8; (h.refcount_table_clusters as u64 * h.cluster_size()) as usize];
                read_padded(self.storage.as_ref(), &mut raw, h.refcount_table_offset)?;
                RefTable {
                    l1_offset: h.l1_table_offset,
                    offset: h.refcount_table_offset,
                    entries: u64_table(&raw),
                    snapshots_offset,
                    snapshots_len,
                    snapshots,
                    bitmaps: self
                        .meta
                        .bitmaps_ext
                        .filter(|_| h.autoclear_features & autoclear::BITMAPS != 0)
                        .map(|e| (e, self.meta.bitmaps.clone())),
                }
            }
        })
    }

    /// How many references each host cluster of the file has (for changing the
    /// refcount width: not capped by the current one). Any inconsistency found on
    /// the way is an error.
    pub fn count_references(&self) -> Result<Vec<u32>> {
        let guard = self.writer.as_ref().map(|w| w.state.lock());
        let mut res = CheckReport::default();
        let (imrt, _, _) = self.count_with(&mut res, Fix::None, guard.as_deref(), true)?;
        if res.corruptions != 0 || res.check_errors != 0 {
            return Err(Error::corrupt(
                res.messages
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "inconsistent metadata".into()),
                0,
            ));
        }
        Ok(imrt.into_counts())
    }

    fn count(
        &self,
        res: &mut CheckReport,
        fix: Fix,
        st: Option<&WriteState>,
    ) -> Result<(Imrt, bool, RefTable)> {
        self.count_with(res, fix, st, false)
    }

    fn count_with(
        &self,
        res: &mut CheckReport,
        fix: Fix,
        st: Option<&WriteState>,
        unlimited: bool,
    ) -> Result<(Imrt, bool, RefTable)> {
        let h = &self.meta.header;
        let reftable = self.reftable(st)?;
        let file_len = self.storage.len()?;
        let mut scan = Scan {
            q: self,
            imrt: Imrt::new(file_len, h.cluster_bits, h.refcount_order),
            fix,
            rebuild: false,
        };
        if unlimited {
            scan.imrt.unlimited();
        }
        scan.calculate(res, &reftable)?;
        Ok((scan.imrt, scan.rebuild, reftable))
    }

    fn disk_refcounts(&self, table: &RefTable, clusters: u64) -> Result<DiskRefcounts> {
        let h = &self.meta.header;
        DiskRefcounts::load(
            self.storage.as_ref(),
            &table.entries,
            h.cluster_bits,
            h.refcount_order,
            clusters,
        )
    }

    /// QEMU's qcow2_check_refcounts, then the COPIED flags.
    fn check_locked(
        &self,
        mut st: Option<&mut WriteState>,
        fix: Fix,
        res: &mut CheckReport,
    ) -> Result<()> {
        let cs = self.cluster_size();
        res.total_clusters = self.size().div_ceil(cs);
        let (mut imrt, mut rebuild, reftable) = self.count(res, fix, st.as_deref())?;
        let pre_compare = res.counters_only();
        let mut disk = self.disk_refcounts(&reftable, imrt.len())?;
        let mut highest = self.compare(
            st.as_deref_mut(),
            res,
            Fix::None,
            &imrt,
            &mut disk,
            &mut rebuild,
        )?;

        if rebuild && fix.errors() {
            let Some(st) = st.as_deref_mut() else {
                return Err(Error::Unsupported("the image is open read-only".into()));
            };
            let old = res.counters_only();
            res.msg("Rebuilding refcount structure");
            self.rebuild_refcounts(st, &mut imrt)?;
            res.corruptions = 0;
            res.leaks = 0;
            // The references are counted again against the new structure.
            let (imrt2, _, reftable2) = self.count(res, Fix::None, Some(st))?;
            imrt = imrt2;
            let mut fresh_leaks = 0;
            disk = self.disk_refcounts(&reftable2, imrt.len())?;
            // The old structures are leaked now: free them.
            let saved = res.counters_only();
            let mut r2 = CheckReport::default();
            let mut still_broken = false;
            highest = self.compare(
                Some(st),
                &mut r2,
                Fix::Leaks,
                &imrt,
                &mut disk,
                &mut still_broken,
            )?;
            res.messages.append(&mut r2.messages);
            if still_broken {
                res.msg("ERROR rebuilt refcount structure is still broken");
            }
            fresh_leaks += r2.leaks;
            res.restore_counters(&saved);
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if fix != Fix::None {
            if rebuild {
                res.msg("ERROR need to rebuild refcount structures");
                res.check_errors += 1;
                res.failure = Some("Input/output error".into());
                return Ok(());
            }
            if res.leaks != 0 || res.corruptions != 0 {
                res.restore_counters(&pre_compare);
                highest =
                    self.compare(st.as_deref_mut(), res, fix, &imrt, &mut disk, &mut rebuild)?;
            }
        }

        self.check_oflag_copied(st, res, fix, &disk)?;
        res.image_end_offset = (highest + 1) * cs;
        Ok(())
    }

    /// QEMU's compare_refcounts: every cluster's refcount against its references.
    /// Returns the highest cluster in use.
    fn compare(
        &self,
        mut st: Option<&mut WriteState>,
        res: &mut CheckReport,
        fix: Fix,
        imrt: &Imrt,
        disk: &mut DiskRefcounts,
        rebuild: &mut bool,
    ) -> Result<u64> {
        let io = self.storage.as_ref();
        let mut highest = 0;
        let mut changed = false;
        for i in 0..imrt.len() {
            let Some(r1) = disk.get(i) else {
                if !disk.reported {
                    disk.reported = true;
                    if let Some((off, t)) = disk.bad_block(i) {
                        let t = if t == 0 {
                            "0".to_string()
                        } else {
                            format!("{t:#x}")
                        };
                        let what =
                            format!("Refblock offset {off:#x} unaligned (reftable index: {t})");
                        match st.as_deref_mut() {
                            Some(st) => {
                                res.msg(format!("qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"));
                                self.mark_corrupt(st)?;
                            }
                            None => res.msg(format!("qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed")),
                        }
                    }
                }
                res.msg(format!(
                    "Can't get refcount for cluster {i}: Input/output error"
                ));
                res.check_errors += 1;
                continue;
            };
            let r2 = imrt.get(i);
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 == r2 {
                continue;
            }
            let mut fixing = None;
            if r1 == 0 {
                *rebuild = true;
            } else if r1 > r2 && fix.leaks() {
                fixing = Some(true);
            } else if r1 < r2 && fix.errors() {
                fixing = Some(false);
            }
            let what = if fixing.is_some() {
                "Repairing"
            } else if r1 < r2 {
                "ERROR"
            } else {
                "Leaked"
            };
            res.msg(format!("{what} cluster {i} refcount={r1} reference={r2}"));
            if let (Some(leak), Some(st)) = (fixing, st.as_deref_mut()) {
                if st.refcounts.set(io, i, r2).is_ok() {
                    disk.set(i, r2);
                    changed = true;
                    if leak {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    continue;
                }
            }
            if r1 < r2 {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
        if changed {
            if let Some(st) = st {
                st.refcounts.flush_blocks(io)?;
                io.flush()?;
            }
        }
        Ok(highest)
    }

    /// QEMU's check_oflag_copied: the COPIED flag of every active L1 and L2 entry
    /// must be set exactly when the refcount is 1.
    fn check_oflag_copied(
        &self,
        st: Option<&mut WriteState>,
        res: &mut CheckReport,
        fix: Fix,
        disk: &DiskRefcounts,
    ) -> Result<()> {
        let repair = match fix {
            Fix::All => true,
            Fix::Leaks => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
            Fix::None => false,
        };
        let h = &self.meta.header;
        let bits = h.cluster_bits;
        let cs = h.cluster_size();
        let ext = h.has_extended_l2();
        let esize = h.l2_entry_size() as usize;
        let data_file = self.data_file.is_some();
        let io = self.storage.as_ref();
        let l1_offset = st
            .as_deref()
            .map(|s| s.header.l1_table_offset)
            .unwrap_or(h.l1_table_offset);
        let l1 = self.l1.read().clone();
        // Runs of consecutive L2 tables are read together: `run` holds L1 entries
        // `run_start..run_start + run_len`.
        let mut run: Vec<u8> = Vec::new();
        let (mut run_start, mut run_len) = (0usize, 0usize);
        let word = if repair { "Repairing" } else { "ERROR" };
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Some(rc) = disk.get(l2_offset >> bits) else {
                continue;
            };
            if (rc == 1) != (l1_entry & COPIED != 0) {
                res.corruptions += 1;
                res.msg(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}"
                ));
                if repair {
                    let new = if rc == 1 {
                        l1_entry | COPIED
                    } else {
                        l1_entry & !COPIED
                    };
                    if let Err(e) = io.write_at(&new.to_be_bytes(), l1_offset + i as u64 * 8) {
                        res.check_errors += 1;
                        return Err(e.into());
                    }
                    io.flush()?;
                    self.l1.write()[i] = new;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            if i < run_start || i >= run_start + run_len {
                run_start = i;
                run_len = super::refscan::l2_run(&l1, i, cs);
                run.resize(run_len * cs as usize, 0);
                if let Err(e) = read_padded(io, &mut run, l2_offset) {
                    res.msg(format!("ERROR: Could not read L2 table: {e}"));
                    res.check_errors += 1;
                    return Ok(());
                }
            }
            let k = i - run_start;
            let table = &mut run[k * cs as usize..(k + 1) * cs as usize];
            let mut dirty = 0;
            for j in 0..table.len() / esize {
                let entry = u64_at(table, j * esize);
                let ty = cluster_type(entry, ext, data_file);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let rc = if data_file {
                    1
                } else {
                    match disk.get((entry & OFFSET_MASK) >> bits) {
                        Some(rc) => rc,
                        None => continue,
                    }
                };
                if (rc == 1) != (entry & COPIED != 0) {
                    res.corruptions += 1;
                    res.msg(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                    if repair {
                        let new = if rc == 1 {
                            entry | COPIED
                        } else {
                            entry & !COPIED
                        };
                        put_u64(table, j * esize, new);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) = io.write_at(table, l2_offset) {
                    res.msg(format!(
                        "ERROR: Could not write L2 table: {}",
                        crate::error::strerror(&e)
                    ));
                    res.check_errors += 1;
                    return Ok(());
                }
                self.l2_cache.remove(l2_offset);
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        if st.is_some() {
            io.flush()?;
        }
        Ok(())
    }

    /// A read-write open of an image whose dirty bit is set (lazy refcounts, then a
    /// crash): the refcounts may be stale, so repair everything, as QEMU does.
    pub(crate) fn repair_dirty(&self) -> Result<()> {
        let r = self.check(Fix::All)?;
        if r.check_errors != 0 || r.failure.is_some() {
            return Err(Error::corrupt(
                format!(
                    "Could not repair dirty image{}",
                    r.failure.map(|f| format!(": {f}")).unwrap_or_default()
                ),
                0,
            ));
        }
        Ok(())
    }
}
