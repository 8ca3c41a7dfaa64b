//! The snapshot table as qemu-img prints it (`info` and `snapshot -l`): QEMU's
//! bdrv_snapshot_dump columns.

use crate::human::size_to_str;
use oxcow::format::snapshot::SnapshotEntry;

/// The instruction count, unless the snapshot has none (absent, or stored as -1).
pub fn icount(s: &SnapshotEntry) -> Option<u64> {
    s.icount.filter(|&i| i != u64::MAX)
}

/// `bdrv_snapshot_dump(NULL)`.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// `bdrv_snapshot_dump(sn)`: one row of the snapshot table.
pub fn snapshot_row(s: &SnapshotEntry) -> String {
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        ((secs / 60) % 60) as i32,
        (secs % 60) as i32,
        ((s.vm_clock_nsec / 1_000_000) % 1000) as i32
    );
    let icount = match icount(s) {
        Some(i) => (i as i64).to_string(),
        None => "--".to_string(),
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        local_date(s.date_sec as i64),
        clock,
        icount
    )
}

/// A Unix time as "%Y-%m-%d %H:%M:%S" in local time (TZ applies).
fn local_date(secs: i64) -> String {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: localtime_r only writes the tm we give it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return String::new();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_columns() {
        assert_eq!(
            snapshot_header(),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
    }
}
