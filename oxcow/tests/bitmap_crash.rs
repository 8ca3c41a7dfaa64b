//! Crash simulation of the bitmap paths (as crash.rs does for guest writes): a
//! recording storage logs every write and flush while oxcow opens an image with
//! bitmaps (marking them in use), writes, adds or removes a bitmap and closes it
//! (storing them). Every crash state (each prefix of the log, and random subsets of
//! the writes after each flush) must pass `qemu-img check` with no corruption (leaks
//! are allowed), list the bitmaps of the old state or of the new state, each either
//! in use (reported so, not trusted) or holding exactly its old or its new dirty
//! ranges, and open read-write in oxcow again.

mod common;

use common::bitmaps::qemu_bitmap_list;
use common::crash::open_engine;
use common::qemu_check_json;
use common::XorShift as Rng;
use common::{create_qcow2, qemu_img, qemu_io, tempdir};
use oxcow::engine::Qcow2;
use oxcow::storage::{Op, RecordingStorage, Storage};
use oxcow::{BitmapOptions, BlockDevice, Image, OpenOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

type Ranges = Vec<(u64, u64)>;
/// Name -> dirty ranges.
type State = BTreeMap<String, Ranges>;

fn open(storage: Arc<dyn Storage>) -> Qcow2 {
    open_engine(storage, true, None, None).unwrap()
}

fn state_of(path: &Path) -> State {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    img.bitmaps()
        .iter()
        .map(|b| (b.name.clone(), img.bitmap_dirty_ranges(&b.name).unwrap()))
        .collect()
}

/// Checks one crash state written at `path`.
fn check_state(path: &Path, old: &State, new: &State, what: &str) {
    let out = qemu_check_json(path);
    let text = String::from_utf8_lossy(&out.stdout);
    // 0: clean; 3: leaks only.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("\"corruptions\""), "{what}: {text}");
    let listed = qemu_bitmap_list(path);
    let names: Vec<&String> = listed.iter().map(|b| &b.0).collect();
    let old_names: Vec<&String> = old.keys().collect();
    let new_names: Vec<&String> = new.keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert!(
        sorted == old_names || sorted == new_names,
        "{what}: bitmaps {names:?}, expected {old_names:?} or {new_names:?}"
    );
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    for (name, _, flags) in &listed {
        if flags.iter().any(|f| f == "in-use") {
            assert!(
                img.bitmap_dirty_ranges(name).is_err(),
                "{what}: {name} in use but readable"
            );
            continue;
        }
        let got = img.bitmap_dirty_ranges(name).unwrap();
        assert!(
            Some(&got) == old.get(name) || Some(&got) == new.get(name),
            "{what}: bitmap {name} holds {got:?}: neither {:?} nor {:?}",
            old.get(name),
            new.get(name)
        );
    }
    drop(img);
    // oxcow takes it over, and leaves it consistent.
    {
        let img = Image::open(
            path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: oxcow cannot open: {e}"));
        img.write_at(&[9; 512], 0).unwrap();
    }
    let out = qemu_check_json(path);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: after oxcow: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Records `session` on a copy of `base` (an image file), then checks every crash
/// state between `old` (the state of `base`) and the state the session leaves.
fn crash_every_point(dir: &Path, base: &Path, session: impl FnOnce(&Qcow2)) {
    let bytes = std::fs::read(base).unwrap();
    let old = state_of(base);
    let rec = Arc::new(RecordingStorage::new(bytes.clone()));
    {
        let q = open(rec.clone());
        session(&q);
    }
    let log = rec.log();
    let end = dir.join("end.qcow2");
    std::fs::write(&end, rec.contents()).unwrap();
    let new = state_of(&end);
    assert_ne!(old, new, "the session must change the bitmaps");
    let state = dir.join("state.qcow2");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let flushes: Vec<usize> = (0..log.len()).filter(|&i| log[i] == Op::Flush).collect();
    let mut states: Vec<(String, Vec<&Op>)> = Vec::new();
    for i in 0..=log.len() {
        states.push((
            format!("prefix {i}/{}", log.len()),
            log[..i].iter().collect(),
        ));
    }
    // After each flush, random subsets of the writes up to the next flush.
    let mut starts = vec![0];
    starts.extend(flushes.iter().map(|f| f + 1));
    for (k, &s) in starts.iter().enumerate() {
        let e = starts.get(k + 1).map_or(log.len(), |n| n - 1);
        for t in 0..3 {
            let mut ops: Vec<&Op> = log[..s].iter().collect();
            ops.extend(log[s..e].iter().filter(|_| rng.next().is_multiple_of(2)));
            states.push((format!("subset {t} of {s}..{e}"), ops));
        }
    }
    for (what, ops) in states {
        let mut b = bytes.clone();
        RecordingStorage::replay(&mut b, ops);
        std::fs::write(&state, &b).unwrap();
        check_state(&state, &old, &new, &what);
    }
}

fn base_image(dir: &Path, bitmaps: &[&str]) -> std::path::PathBuf {
    let p = create_qcow2(dir, "base.qcow2", "cluster_size=4k", "4M");
    for b in bitmaps {
        qemu_img(dir, &["bitmap", "--add", "-g", "8k", "base.qcow2", b]);
    }
    qemu_io(dir, "base.qcow2", &["write 1M 20k".to_string()]);
    p
}

#[test]
fn crash_while_storing() {
    let d = tempdir();
    let base = base_image(d.path(), &["b0", "b1"]);
    qemu_img(d.path(), &["bitmap", "--disable", "base.qcow2", "b1"]);
    crash_every_point(d.path(), &base, |q| {
        q.write_at(&[1; 3000], 100_000).unwrap();
        q.write_zeroes(2 << 20, 70_000, true).unwrap();
        q.discard(3 << 20, 8192).unwrap();
    });
}

#[test]
fn crash_while_adding() {
    let d = tempdir();
    let base = base_image(d.path(), &["b0"]);
    crash_every_point(d.path(), &base, |q| {
        q.add_bitmap(
            "n",
            &BitmapOptions {
                granularity: Some(512),
                ..Default::default()
            },
            "s",
        )
        .unwrap();
        q.write_at(&[1; 3000], 300_000).unwrap();
    });
}

#[test]
fn crash_while_removing() {
    let d = tempdir();
    let base = base_image(d.path(), &["b0", "gone", "b2"]);
    crash_every_point(d.path(), &base, |q| {
        q.remove_bitmap("gone").unwrap();
        q.clear_bitmap("b2").unwrap();
    });
}
