//! Crash simulation of snapshot create, apply and delete: a recording storage logs
//! every write and flush of one operation on an image that already holds snapshots
//! (taken at different disk sizes, over compressed and shared clusters). Every crash
//! state (the log up to each flush, random subsets of the writes after it, and the
//! last of them torn at 512 B and 4 KiB boundaries) must open (a dirty image through
//! a repairing read-write open, which must leave it exact), pass `qemu-img check`
//! with no corruption (leaks allowed), and read either the before or the after state
//! of the active disk, of the snapshot list, and of every snapshot in it (applied on
//! a copy of the state). v2 images, which have no dirty bit, may also show COPIED
//! flags that disagree with refcounts still above the references (QEMU's order has
//! the same window): only those, and `qemu-img check -r all` must make them exact.

mod common;

use common::crash::{open_engine, qemu_check, replay};
use common::{tempdir, Rng};
use oxcow::engine::create::format_qcow2;
use oxcow::engine::Qcow2;
use oxcow::storage::{MemoryStorage, Op, RecordingStorage, Storage};
use oxcow::{BlockDevice, CreateOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn open(storage: Arc<dyn Storage>, writable: bool) -> oxcow::Result<Qcow2> {
    open_engine(storage, writable, None, None)
}

fn read_all(q: &Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; q.size() as usize];
    q.read_at(&mut b, 0).unwrap();
    b
}

/// The disk and its snapshots: (id, contents).
#[derive(Clone, PartialEq, Eq, Debug)]
struct State {
    active: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

/// An image with snapshots "a" and "b" (and, with `resize`, b at a larger size).
fn setup(opts: &CreateOptions, resize: bool, seed: u64) -> (Vec<u8>, State) {
    let mem = Arc::new(MemoryStorage::new());
    format_qcow2(mem.as_ref(), opts).unwrap();
    let q = open(mem.clone(), true).unwrap();
    let cs = opts.cluster_size;
    let mut rng = Rng::new(seed);
    let mut scribble = |q: &Qcow2, n: usize| {
        let size = q.size();
        for _ in 0..n {
            let off = rng.below(size / 512) * 512;
            let len = (rng.between(1, cs * 2 / 512) * 512).min(size - off);
            q.write_at(&vec![rng.between(1, 255) as u8; len as usize], off)
                .unwrap();
        }
    };
    let c: Vec<u8> = (0..cs).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    q.write_compressed(&c, cs).unwrap();
    scribble(&q, 8);
    let a = q.create_snapshot("a").unwrap();
    let a_data = read_all(&q);
    scribble(&q, 6);
    if resize {
        q.resize(q.size() + 2 * cs + 512, false).unwrap();
        scribble(&q, 4);
    }
    let b = q.create_snapshot("b").unwrap();
    let b_data = read_all(&q);
    scribble(&q, 6);
    let active = read_all(&q);
    drop(q);
    (
        mem.to_vec(),
        State {
            active,
            snaps: vec![(a.id, a_data), (b.id, b_data)],
        },
    )
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Create,
    Apply,
    Delete,
}

/// Runs `action` on the image `base` through a recording storage.
fn record(base: &[u8], before: &State, action: Action) -> (Vec<Op>, State) {
    let rec = Arc::new(RecordingStorage::new(base.to_vec()));
    let q = open(rec.clone(), true).unwrap();
    let mut after = before.clone();
    match action {
        Action::Create => {
            let e = q.create_snapshot("new").unwrap();
            after.snaps.push((e.id, before.active.clone()));
        }
        Action::Apply => {
            q.apply_snapshot("a").unwrap();
            after.active = before.snaps[0].1.clone();
        }
        Action::Delete => {
            q.delete_snapshot("a").unwrap();
            after.snaps.remove(0);
        }
    }
    drop(q);
    (rec.log(), after)
}

/// Crash states: (ops applied in order, the last one torn after n bytes).
fn crash_states(log: &[Op], rng: &mut Rng) -> Vec<(Vec<usize>, Option<usize>)> {
    let mut flushes: Vec<usize> = (0..log.len()).filter(|&i| log[i] == Op::Flush).collect();
    flushes.push(log.len());
    // Every prefix of the log.
    let mut states: Vec<(Vec<usize>, Option<usize>)> =
        (0..=log.len()).map(|p| ((0..p).collect(), None)).collect();
    let mut start = 0;
    for &f in &flushes {
        let writes: Vec<usize> = (start..f)
            .filter(|&j| matches!(log[j], Op::Write { .. }))
            .collect();
        if writes.len() > 1 {
            for _ in 0..3 {
                let mut s: Vec<usize> = (0..start).collect();
                s.extend(writes.iter().copied().filter(|_| rng.percent(50)));
                states.push((s, None));
            }
        }
        for unit in [512usize, 4096] {
            if let Some(&last) = writes.last() {
                if let Op::Write { data, .. } = &log[last] {
                    if data.len() > unit {
                        let cut =
                            (1 + rng.below((data.len() / unit - 1).max(1) as u64) as usize) * unit;
                        if cut < data.len() {
                            states.push(((0..=last).collect(), Some(cut)));
                        }
                    }
                }
            }
        }
        start = f + 1;
    }
    states
}

/// `ops` of `log` replayed onto `base`, the last one torn after `torn` bytes if given.
fn apply_log(base: &[u8], log: &[Op], ops: &[usize], torn: Option<usize>) -> Vec<u8> {
    let mut bytes = base.to_vec();
    let last = ops.len().saturating_sub(1);
    let ops = ops.iter().enumerate();
    replay(
        &mut bytes,
        log,
        ops.map(|(k, &j)| (j, torn.filter(|_| k == last))),
    );
    bytes
}

fn check_state(bytes: Vec<u8>, before: &State, after: &State, dir: &Path, n: usize, what: &str) {
    let mut bytes = bytes;
    let dirty = bytes[79] & 1 != 0;
    if dirty {
        // A dirty image is repaired by its next read-write open, and is then exact.
        let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
        drop(open(st.clone(), true).unwrap_or_else(|e| panic!("{what}: repairing open: {e}")));
        bytes = vec![0u8; st.len().unwrap() as usize];
        st.read_at(&mut bytes, 0).unwrap();
        assert_eq!(bytes[79] & 1, 0, "{what}: still dirty after repair");
    }
    let path = dir.join(format!("crash{n}.qcow2"));
    std::fs::write(&path, &bytes).unwrap();
    let (code, s) = qemu_check(&path);
    let clean = code == Some(0) || (!dirty && code == Some(3));
    let v2 = bytes[7] == 2;
    if v2 && code == Some(2) {
        // v2 has no dirty bit: between a refcount change and the COPIED flags that
        // follow it, QEMU's order (ours too) leaves flags that disagree with the
        // refcount, always on the safe side (refcounts never below the references:
        // the flag only costs a copy-on-write, or spares one of a cluster nobody
        // else uses). Nothing else may be wrong, and a repair makes it exact.
        let errors: Vec<&str> = s.lines().filter(|l| l.starts_with("ERROR")).collect();
        assert!(
            !errors.is_empty() && errors.iter().all(|l| l.contains("OFLAG_COPIED")),
            "{what}: qemu-img check:\n{s}"
        );
        let out = Command::new("qemu-img")
            .args(["check", "-q", "-r", "all"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: check -r all: {out:?}");
        let (code, s) = qemu_check(&path);
        assert_eq!(code, Some(0), "{what}: after check -r all:\n{s}");
    } else {
        assert!(
            clean && !s.contains("\"corruptions\"") && !s.contains("check-errors\": 1"),
            "{what}: qemu-img check:\n{s}"
        );
    }
    std::fs::remove_file(&path).unwrap();

    let q = open(Arc::new(MemoryStorage::from_vec(bytes.clone())), false)
        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let active = read_all(&q);
    assert!(
        active == before.active || active == after.active,
        "{what}: the active disk is neither the old nor the new one"
    );
    let ids: Vec<String> = q.snapshots().into_iter().map(|s| s.id).collect();
    let ids_of = |s: &State| s.snaps.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert!(
        ids == ids_of(before) || ids == ids_of(after),
        "{what}: snapshot list {ids:?}"
    );
    drop(q);
    // Every snapshot listed reads as it did (applied on a copy of the state).
    for id in ids {
        let want = before
            .snaps
            .iter()
            .chain(&after.snaps)
            .find(|s| s.0 == id)
            .map(|s| s.1.clone())
            .unwrap();
        let q = open(Arc::new(MemoryStorage::from_vec(bytes.clone())), true).unwrap();
        q.apply_snapshot(&id).unwrap();
        assert!(read_all(&q) == want, "{what}: snapshot {id} reads wrong");
    }
}

fn simulate(name: &str, opts: CreateOptions, resize: bool, seed: u64) {
    let (base, before) = setup(&opts, resize, seed);
    let dir = tempdir();
    let mut rng = Rng::new(seed ^ 0x77);
    let mut total = 0;
    for action in [Action::Create, Action::Apply, Action::Delete] {
        let (log, after) = record(&base, &before, action);
        let states = crash_states(&log, &mut rng);
        for (n, (ops, torn)) in states.iter().enumerate() {
            let what = format!(
                "{name} {action:?} state {n} ({} ops, torn {torn:?})",
                ops.len()
            );
            check_state(
                apply_log(&base, &log, ops, *torn),
                &before,
                &after,
                dir.path(),
                n,
                &what,
            );
        }
        total += states.len();
    }
    eprintln!("{name}: {total} crash states checked");
    assert!(total > 30, "{name}: too few crash states ({total})");
}

fn o(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

#[test]
fn crash_64k_clusters_with_resize() {
    simulate("64k", o(2 << 20), true, 1);
}

#[test]
fn crash_512b_clusters() {
    simulate(
        "512b",
        CreateOptions {
            cluster_size: 512,
            ..o(128 << 10)
        },
        true,
        2,
    );
}

#[test]
fn crash_v2() {
    simulate(
        "v2",
        CreateOptions {
            version: 2,
            ..o(1 << 20)
        },
        false,
        4,
    );
}

#[test]
fn crash_lazy_refcounts_extended_l2() {
    simulate(
        "lazy-extl2",
        CreateOptions {
            lazy_refcounts: true,
            extended_l2: true,
            ..o(2 << 20)
        },
        false,
        3,
    );
}
