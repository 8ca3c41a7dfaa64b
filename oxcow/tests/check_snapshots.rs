//! The library side of checking damaged snapshot tables (the command's output is
//! compared with qemu-img's in `oxcow-cli/tests/check_snapshots.rs`): a normal open
//! refuses the image, a check-mode open takes it; the check reports the table's
//! problems with qemu-img's counters; `Fix::All` rewrites the table, after which the
//! image opens normally, reads the same, keeps its snapshots and passes
//! `qemu-img check`.

mod common;

use common::have_qemu;
use common::*;
use oxcow::engine::check::Fix;
use oxcow::{Image, OpenOptions};
use std::path::Path;

fn check_open(path: &Path, writable: bool) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable,
            check: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Where snapshot table entry `i` starts.
fn entry_at(path: &Path, i: usize) -> u64 {
    let mut at = read_be64(path, 64);
    for _ in 0..i {
        let f = std::fs::read(path).unwrap();
        let a = at as usize;
        let id = u16::from_be_bytes([f[a + 12], f[a + 13]]) as u64;
        let name = u16::from_be_bytes([f[a + 14], f[a + 15]]) as u64;
        let extra = read_be32(path, at + 36) as u64;
        at = (at + 40 + extra + id + name).next_multiple_of(8);
    }
    at
}

#[test]
fn extra_data_and_incomplete_entries_are_repaired() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(d, "a.qcow2", "", "4M");
    qemu_io(d, "a.qcow2", &["write -P 1 0 64k".into()]);
    qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]);
    qemu_io(d, "a.qcow2", &["write -P 2 64k 64k".into()]);
    qemu_img(d, &["snapshot", "-c", "s2", "a.qcow2"]);
    qemu_io(d, "a.qcow2", &["write -P 3 0 32k".into()]);
    let before = qemu_raw(d, "a.qcow2");
    let p = d.join("a.qcow2");

    let l1s = [
        read_be64(&p, entry_at(&p, 0)),
        read_be64(&p, entry_at(&p, 1)),
    ];
    // Entry 0 without extra data (incomplete), entry 1 with 2000 bytes of it.
    let e1 = entry_at(&p, 1);
    patch_be32(&p, e1 + 36, 2000);
    let e0 = entry_at(&p, 0);
    // Entry 0's 24 bytes of extra data become part of its ID and name: give them
    // to the name, keeping the entry's length.
    let f = std::fs::read(&p).unwrap();
    let name_len = u16::from_be_bytes([f[e0 as usize + 14], f[e0 as usize + 15]]);
    patch_be32(&p, e0 + 36, 0);
    patch_be16(&p, e0 + 14, name_len + 24);

    assert!(Image::open(&p, &OpenOptions::default()).is_err());
    let r = check_open(&p, false).check(Fix::None).unwrap();
    assert_eq!(r.failure.as_deref(), Some("File too large"));
    assert_eq!(r.check_errors, 1);
    let lines: Vec<_> = r.lines().collect();
    assert_eq!(
        lines,
        [
            (
                true,
                "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 1"
            ),
            (
                false,
                "You can force-remove this extra metadata with qemu-img check -r all"
            )
        ]
    );

    let r = check_open(&p, true).check(Fix::All).unwrap();
    assert_eq!(r.failure, None);
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 2));
    assert_eq!(
        r.messages,
        [
            "Discarding too much extra metadata in snapshot table entry 1 (2000 > 1024)",
            "Repairing snapshot table entry 0 is incomplete",
        ]
    );
    let img = open(&p);
    let extra: Vec<_> = img.snapshots().into_iter().map(|s| s.extra.len()).collect();
    assert_eq!(extra, [24, 1024]);
    // IDs and names were read from the wrong places (the lengths say so): C
    // strings, empty, as QEMU reads them. The L1 tables stay.
    let got: Vec<_> = img
        .snapshots()
        .into_iter()
        .map(|s| (s.id, s.name, s.l1_table_offset))
        .collect();
    assert_eq!(
        got,
        [
            (String::new(), String::new(), l1s[0]),
            (String::new(), String::new(), l1s[1])
        ]
    );
    drop(img);
    let out = qemu_img(d, &["check", "a.qcow2"]);
    assert!(out.starts_with("No errors were found"), "{out}");
    assert!(qemu_raw(d, "a.qcow2") == before, "the data changed");
}

/// A damaged entry whose extra data runs over live clusters (data written after
/// the snapshot): `-r all` counts the old table's whole extent, so those clusters
/// have two references while the COPIED flags are repaired; freeing the old table
/// then leaves them one. The flags must end right for that (found by
/// fuzz_maintenance, seed 2000252). QEMU's own repair stops there (its overlap
/// check refuses the COPIED write into the old table), so the data is compared
/// with the image before the damage.
#[test]
fn dropping_extra_data_over_live_clusters_leaves_copied_flags_right() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(d, "a.qcow2", "cluster_size=512", "1M");
    qemu_io(d, "a.qcow2", &["write -P 1 0 32k".into()]);
    qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]);
    // Copy-on-write: new clusters right after the snapshot table.
    qemu_io(d, "a.qcow2", &["write -P 2 0 16k".into()]);
    let before = qemu_raw(d, "a.qcow2");
    let p = d.join("a.qcow2");
    let e0 = entry_at(&p, 0);
    // 8 KiB of extra data: the entry's extent now covers the 16 clusters past
    // the table, all of them in use (COPIED set).
    patch_be32(&p, e0 + 36, 8192);

    let r = check_open(&p, true).check(Fix::All).unwrap();
    assert_eq!(r.failure, None, "{r:?}");
    assert_eq!(r.corruptions, 0, "{r:?}");
    assert_eq!(
        r.messages[0],
        "Discarding too much extra metadata in snapshot table entry 0 (8192 > 1024)"
    );
    // The flags were cleared while the old table still counted, then set again.
    assert!(
        r.messages
            .iter()
            .any(|m| m.starts_with("Repairing OFLAG_COPIED data cluster")
                && m.ends_with("refcount=1")),
        "{r:?}"
    );
    let again = check_open(&p, false).check(Fix::None).unwrap();
    assert!(again.is_clean(), "{again:?}");
    let out = qemu_img(d, &["check", "a.qcow2"]);
    assert!(out.starts_with("No errors were found"), "{out}");
    assert!(qemu_raw(d, "a.qcow2") == before, "the data changed");
    assert_eq!(open(&p).snapshots().len(), 1);
}
