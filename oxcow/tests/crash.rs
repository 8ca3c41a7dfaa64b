//! Crash simulation: a recording storage logs every write and flush of random
//! workloads; every crash state (each prefix of the log, and random subsets of the
//! writes after the last flush) must open, pass `qemu-img check` with no corruption
//! (leaks are allowed), and hold every byte written before the last completed flush.

use oxcow::engine::create::format_qcow2;
use oxcow::engine::meta::ImageMeta;
use oxcow::engine::{EngineOptions, Qcow2};
use oxcow::storage::{MemoryStorage, Op, RecordingStorage, Storage};
use oxcow::{BlockDevice, CreateOptions};
use std::process::Command;
use std::sync::Arc;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A completed guest flush: the log length when it returned and the disk then.
struct Checkpoint {
    log_len: usize,
    model: Vec<u8>,
}

struct Recorded {
    base: Vec<u8>,
    log: Vec<Op>,
    checkpoints: Vec<Checkpoint>,
    /// Per span (after checkpoint i): how often each byte was written.
    touched: Vec<Vec<u8>>,
    size: u64,
    lazy: bool,
}

fn open(storage: Arc<dyn Storage>, writable: bool, cache: Option<u64>) -> oxcow::Result<Qcow2> {
    let meta = ImageMeta::load(storage.as_ref())?;
    Qcow2::open(
        meta,
        storage,
        None,
        None,
        &EngineOptions {
            l2_cache_bytes: cache,
            writable,
        },
    )
}

fn record(opts: &CreateOptions, seed: u64, steps: usize, cache: Option<u64>) -> Recorded {
    let mem = MemoryStorage::new();
    format_qcow2(&mem, opts).unwrap();
    let base = mem.to_vec();
    let rec = Arc::new(RecordingStorage::new(base.clone()));
    let img = open(rec.clone(), true, cache).unwrap();
    let size = opts.size;
    let cs = opts.cluster_size;
    let mut rng = Rng(seed | 1);
    let mut model = vec![0u8; size as usize];
    let mut checkpoints = vec![Checkpoint {
        log_len: 0,
        model: model.clone(),
    }];
    let mut touched = vec![vec![0u8; size as usize]];
    for _ in 0..steps {
        let op = rng.below(100);
        let align = if rng.below(2) == 0 { cs } else { 512 };
        let off = rng.below(size / align) * align;
        let len = ((1 + rng.below(cs * 2 / 512)) * 512).min(size - off);
        let range = off as usize..(off + len) as usize;
        let span = touched.last_mut().unwrap();
        if op < 60 {
            let fill = (rng.next() as u8) | 1;
            img.write_at(&vec![fill; len as usize], off).unwrap();
            model[range.clone()].fill(fill);
        } else if op < 75 {
            img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
            model[range.clone()].fill(0);
        } else if op < 85 {
            img.discard(off, len).unwrap();
            let start = off.div_ceil(cs) * cs;
            let end = (off + len) / cs * cs;
            if start < end {
                model[start as usize..end as usize].fill(0);
            }
        } else {
            img.flush().unwrap();
            checkpoints.push(Checkpoint {
                log_len: rec.log().len(),
                model: model.clone(),
            });
            touched.push(vec![0u8; size as usize]);
            continue;
        }
        for t in &mut span[range] {
            *t = t.saturating_add(1);
        }
    }
    let log = rec.log();
    std::mem::forget(img); // a crash: no final flush
    Recorded {
        base,
        log,
        checkpoints,
        touched,
        size,
        lazy: opts.lazy_refcounts,
    }
}

/// Crash states of span `i`: (ops applied in full, extra ops applied after them).
fn crash_states(r: &Recorded, i: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let start = r.checkpoints[i].log_len;
    let end = r
        .checkpoints
        .get(i + 1)
        .map(|c| c.log_len)
        .unwrap_or(r.log.len());
    let mut states = Vec::new();
    for p in start..=end {
        // Everything up to the last flush before p is durable; of the writes after
        // it, the prefix, and some random subsets.
        let f = (start..p)
            .rev()
            .find(|&j| r.log[j] == Op::Flush)
            .map(|j| j + 1)
            .unwrap_or(start);
        let free: Vec<usize> = (f..p).collect();
        states.push((0..p).collect());
        if free.len() > 1 {
            for _ in 0..3 {
                let mut s: Vec<usize> = (0..f).collect();
                s.extend(free.iter().filter(|_| rng.below(2) == 0));
                states.push(s);
            }
        }
    }
    states
}

fn check_state(r: &Recorded, span: usize, ops: &[usize], dir: &std::path::Path, n: usize) {
    let mut bytes = r.base.clone();
    RecordingStorage::replay(&mut bytes, ops.iter().map(|&i| &r.log[i]));
    if r.lazy {
        // A dirty image is repaired by its next read-write open, and must then be
        // exactly right: no leaks either.
        let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
        drop(
            open(st.clone(), true, None)
                .unwrap_or_else(|e| panic!("state {n}: repairing open: {e}")),
        );
        bytes = vec![0u8; st.len().unwrap() as usize];
        st.read_at(&mut bytes, 0).unwrap();
        assert_eq!(
            bytes[79] & 1,
            0,
            "state {n}: still dirty after the repairing open"
        );
    }
    let path = dir.join(format!("crash{n}.qcow2"));
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&path)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        !s.contains("\"corruptions\"")
            && !s.contains("check-errors\": 1")
            && (out.status.code() == Some(0) || (!r.lazy && out.status.code() == Some(3))),
        "state {n} (span {span}, {} ops): qemu-img check:\n{s}{}",
        ops.len(),
        String::from_utf8_lossy(&out.stderr)
    );

    let img = open(
        Arc::new(MemoryStorage::from_vec(bytes.clone())),
        false,
        None,
    )
    .unwrap_or_else(|e| panic!("state {n}: open: {e}"));
    let mut got = vec![0u8; r.size as usize];
    img.read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("state {n}: read: {e}"));
    let old = &r.checkpoints[span].model;
    let new = r.checkpoints.get(span + 1).map(|c| &c.model);
    let touched = &r.touched[span];
    for b in 0..got.len() {
        let ok = match touched[b] {
            0 => got[b] == old[b],
            1 => got[b] == old[b] || got[b] == 0 || new.is_none_or(|m| got[b] == m[b]),
            _ => true,
        };
        assert!(
            ok,
            "state {n} (span {span}): guest byte {b:#x} reads {:#04x}, flushed {:#04x}",
            got[b], old[b]
        );
    }
    // The crashed image takes more writes and stays consistent.
    if n.is_multiple_of(7) {
        let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
        let img = open(st.clone(), true, None).unwrap();
        img.write_at(&[0x5a; 4096], 0).unwrap();
        img.flush().unwrap();
        drop(img);
        let mem = st.as_ref();
        let mut after = vec![0u8; mem.len().unwrap() as usize];
        mem.read_at(&mut after, 0).unwrap();
        std::fs::write(&path, &after).unwrap();
        let out = Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            !s.contains("\"corruptions\""),
            "state {n} after more writes:\n{s}"
        );
    }
}

fn simulate(name: &str, opts: CreateOptions, seed: u64, steps: usize, cache: Option<u64>) -> usize {
    let r = record(&opts, seed, steps, cache);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed ^ 0x9e37_79b9);
    let mut n = 0;
    for span in 0..r.checkpoints.len() {
        for ops in crash_states(&r, span, &mut rng) {
            check_state(&r, span, &ops, dir.path(), n);
            n += 1;
        }
    }
    eprintln!(
        "{name}: {n} crash states checked ({} logged operations)",
        r.log.len()
    );
    n
}

#[test]
fn every_crash_state_is_consistent() {
    let mut total = 0;
    total += simulate(
        "64k",
        CreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
        11,
        60,
        None,
    );
    total += simulate(
        "512b-tiny-cache",
        CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        },
        12,
        50,
        Some(512),
    );
    total += simulate(
        "extl2",
        CreateOptions {
            size: 4 << 20,
            extended_l2: true,
            ..Default::default()
        },
        13,
        50,
        None,
    );
    total += simulate(
        "rb1-4k",
        CreateOptions {
            size: 2 << 20,
            cluster_size: 4096,
            refcount_bits: 1,
            ..Default::default()
        },
        14,
        50,
        Some(4096),
    );
    total += simulate(
        "v2",
        CreateOptions {
            size: 2 << 20,
            version: 2,
            ..Default::default()
        },
        15,
        40,
        None,
    );
    total += simulate(
        "lazy-refcounts",
        CreateOptions {
            size: 4 << 20,
            lazy_refcounts: true,
            ..Default::default()
        },
        16,
        60,
        Some(65536),
    );
    total += simulate(
        "lazy-refcounts-4k",
        CreateOptions {
            size: 2 << 20,
            cluster_size: 4096,
            lazy_refcounts: true,
            ..Default::default()
        },
        17,
        50,
        None,
    );
    eprintln!("crash simulation: {total} crash states in all");
    assert!(
        total > 500,
        "too few crash states ({total}) to mean anything"
    );
}
