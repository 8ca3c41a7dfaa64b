//! Crash simulation (../shared/TESTING.md): a recording storage logs every write and
//! flush of random workloads (writes of every shape, write-zeroes, discard,
//! compressed writes, writes over a backing file; tiny metadata caches; cluster sizes
//! from 512 B to 2 MiB; lazy refcounts on and off). Every crash state (each prefix of
//! the log, random subsets of the writes after the last flush, and torn writes at
//! 512 B and 4 KiB boundaries) must open, pass `qemu-img check` with no corruption
//! (leaks are allowed; a dirty image must repair exactly), hold every byte written
//! before the last completed flush (unflushed bytes are old, new or zero), and take
//! more writes. A second test makes the n-th write or flush fail and requires the
//! error to be reported and the image to stay consistent.

mod common;

use common::crash::{open_engine as open, qemu_check, replay};
use common::XorShift as Rng;
use oxcow::engine::create::format_qcow2;
use oxcow::storage::{MemoryStorage, Op, RecordingStorage, Storage};
use oxcow::{BlockDevice, CreateOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    backing: Option<Vec<u8>>,
}

/// One crash state: log entries applied in order; a torn entry applies only a prefix.
type CrashState = Vec<(usize, Option<usize>)>;

struct Workload<'a> {
    opts: CreateOptions,
    seed: u64,
    steps: usize,
    cache: Option<u64>,
    /// A raw backing file: its path (stored in the image) and contents.
    backing: Option<(&'a Path, Vec<u8>)>,
}

fn record(w: &Workload) -> Recorded {
    let opts = &w.opts;
    let mem = MemoryStorage::new();
    format_qcow2(&mem, opts).unwrap();
    let base = mem.to_vec();
    let rec = Arc::new(RecordingStorage::new(base.clone()));
    let backing = w.backing.as_ref().map(|(_, b)| b.clone());
    let img = open(rec.clone(), true, w.cache, backing.as_deref()).unwrap();
    let size = opts.size;
    let cs = opts.cluster_size;
    let mut rng = Rng(w.seed | 1);
    let mut model = vec![0u8; size as usize];
    if let Some(b) = &backing {
        let n = b.len().min(model.len());
        model[..n].copy_from_slice(&b[..n]);
    }
    let mut checkpoints = vec![Checkpoint {
        log_len: 0,
        model: model.clone(),
    }];
    let mut touched = vec![vec![0u8; size as usize]];
    for _ in 0..w.steps {
        let op = rng.below(100);
        let align = if rng.below(2) == 0 { cs } else { 512 };
        let off = rng.below(size / align) * align;
        let len = ((1 + rng.below(cs * 2 / 512)) * 512).min(size - off);
        let mut range = off as usize..(off + len) as usize;
        if op < 55 {
            let fill = (rng.next() as u8) | 1;
            img.write_at(&vec![fill; len as usize], off).unwrap();
            model[range.clone()].fill(fill);
        } else if op < 68 {
            img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
            model[range.clone()].fill(0);
        } else if op < 78 {
            img.discard(off, len).unwrap();
            let start = off.div_ceil(cs) * cs;
            let end = (off + len) / cs * cs;
            if start < end {
                model[start as usize..end as usize].fill(0);
            }
        } else if op < 86 {
            // A compressed cluster, where nothing is allocated yet.
            let c = rng.below(size / cs) * cs;
            let st = oxcow::block_status(&img, c, cs).unwrap();
            if st.depth != 0 || st.present || st.len < cs {
                continue;
            }
            let fill = (rng.next() as u8) | 1;
            let data: Vec<u8> = (0..cs)
                .map(|i| fill.wrapping_add((i / 1024) as u8))
                .collect();
            img.write_compressed(&data, c).unwrap();
            range = c as usize..(c + cs) as usize;
            model[range.clone()].copy_from_slice(&data);
        } else {
            img.flush().unwrap();
            checkpoints.push(Checkpoint {
                log_len: rec.log().len(),
                model: model.clone(),
            });
            touched.push(vec![0u8; size as usize]);
            continue;
        }
        for t in &mut touched.last_mut().unwrap()[range] {
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
        backing,
    }
}

/// Crash states of span `i`.
fn crash_states(r: &Recorded, i: usize, rng: &mut Rng) -> Vec<CrashState> {
    let start = r.checkpoints[i].log_len;
    let end = r
        .checkpoints
        .get(i + 1)
        .map(|c| c.log_len)
        .unwrap_or(r.log.len());
    let whole =
        |ops: &mut dyn Iterator<Item = usize>| -> CrashState { ops.map(|j| (j, None)).collect() };
    let mut states = Vec::new();
    for p in start..=end {
        // Everything up to the last flush before p is durable; of the writes after
        // it, the prefix, some random subsets, and the prefix with its last write
        // torn at a 512 B or 4 KiB boundary.
        let f = (start..p)
            .rev()
            .find(|&j| r.log[j] == Op::Flush)
            .map(|j| j + 1)
            .unwrap_or(start);
        states.push(whole(&mut (0..p)));
        if p > f {
            if let Op::Write { data, .. } = &r.log[p - 1] {
                for unit in [512usize, 4096] {
                    if data.len() > unit {
                        let cut =
                            (1 + rng.below((data.len() / unit) as u64 - 1 + 1) as usize) * unit;
                        if cut < data.len() {
                            let mut s = whole(&mut (0..p - 1));
                            s.push((p - 1, Some(cut)));
                            states.push(s);
                        }
                    }
                }
            }
        }
        if p - f > 1 {
            for _ in 0..2 {
                let mut s = whole(&mut (0..f));
                s.extend((f..p).filter(|_| rng.below(2) == 0).map(|j| (j, None)));
                states.push(s);
            }
        }
    }
    states
}

fn apply(r: &Recorded, state: &CrashState) -> Vec<u8> {
    let mut bytes = r.base.clone();
    replay(&mut bytes, &r.log, state.iter().copied());
    bytes
}

fn check_state(r: &Recorded, span: usize, state: &CrashState, dir: &Path, n: usize) {
    let mut bytes = apply(r, state);
    if r.lazy {
        // A dirty image is repaired by its next read-write open, and must then be
        // exactly right: no leaks either.
        let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
        drop(
            open(st.clone(), true, None, r.backing.as_deref())
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
    let (code, s) = qemu_check(&path);
    let clean = code == Some(0) || (!r.lazy && code == Some(3));
    assert!(
        !s.contains("\"corruptions\"") && !s.contains("check-errors\": 1") && clean,
        "state {n} (span {span}, {} ops): qemu-img check:\n{s}",
        state.len()
    );

    let img = open(
        Arc::new(MemoryStorage::from_vec(bytes.clone())),
        false,
        None,
        r.backing.as_deref(),
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
        let img = open(st.clone(), true, None, r.backing.as_deref()).unwrap();
        img.write_at(&[0x5a; 4096], 0).unwrap();
        img.flush().unwrap();
        drop(img);
        let mut after = vec![0u8; st.len().unwrap() as usize];
        st.read_at(&mut after, 0).unwrap();
        std::fs::write(&path, &after).unwrap();
        let (_, s) = qemu_check(&path);
        assert!(
            !s.contains("\"corruptions\""),
            "state {n} after more writes:\n{s}"
        );
    }
}

fn simulate(name: &str, w: Workload) -> usize {
    let r = record(&w);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(w.seed ^ 0x9e37_79b9);
    let mut n = 0;
    for span in 0..r.checkpoints.len() {
        for state in crash_states(&r, span, &mut rng) {
            check_state(&r, span, &state, dir.path(), n);
            n += 1;
        }
    }
    eprintln!(
        "{name}: {n} crash states checked ({} logged operations)",
        r.log.len()
    );
    n
}

fn workload(opts: CreateOptions, seed: u64, steps: usize, cache: Option<u64>) -> Workload<'static> {
    Workload {
        opts,
        seed,
        steps,
        cache,
        backing: None,
    }
}

// One test per workload, so that they run in parallel. Each prints how many crash
// states it checked (run with --nocapture); together they check about 2,800.
fn o(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

fn enough(n: usize) {
    assert!(n > 150, "too few crash states ({n}) to mean anything");
}

#[test]
fn crash_states_64k_clusters() {
    enough(simulate("64k", workload(o(4 << 20), 11, 60, None)));
}

#[test]
fn crash_states_512b_clusters_tiny_cache() {
    enough(simulate(
        "512b-tiny-cache",
        workload(
            CreateOptions {
                cluster_size: 512,
                ..o(1 << 20)
            },
            12,
            50,
            Some(512),
        ),
    ));
}

#[test]
fn crash_states_extended_l2() {
    enough(simulate(
        "extl2",
        workload(
            CreateOptions {
                extended_l2: true,
                ..o(4 << 20)
            },
            13,
            50,
            None,
        ),
    ));
}

#[test]
fn crash_states_1bit_refcounts_4k_clusters() {
    enough(simulate(
        "rb1-4k",
        workload(
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 1,
                ..o(2 << 20)
            },
            14,
            50,
            Some(4096),
        ),
    ));
}

#[test]
fn crash_states_v2_and_2m_clusters() {
    enough(simulate(
        "v2",
        workload(
            CreateOptions {
                version: 2,
                ..o(2 << 20)
            },
            15,
            40,
            None,
        ),
    ));
    enough(simulate(
        "2m",
        workload(
            CreateOptions {
                cluster_size: 2 << 20,
                ..o(16 << 20)
            },
            18,
            30,
            None,
        ),
    ));
}

#[test]
fn crash_states_lazy_refcounts() {
    enough(simulate(
        "lazy-refcounts",
        workload(
            CreateOptions {
                lazy_refcounts: true,
                ..o(4 << 20)
            },
            16,
            60,
            Some(65536),
        ),
    ));
    enough(simulate(
        "lazy-refcounts-4k",
        workload(
            CreateOptions {
                cluster_size: 4096,
                lazy_refcounts: true,
                ..o(2 << 20)
            },
            17,
            50,
            None,
        ),
    ));
}

#[test]
fn crash_states_over_a_backing_file() {
    // Partial writes copy from the backing file.
    let dir = tempfile::tempdir().unwrap();
    let bpath = dir.path().join("base.raw");
    let mut rng = Rng(77);
    let bytes: Vec<u8> = (0..(3 << 20)).map(|_| rng.next() as u8).collect();
    std::fs::write(&bpath, &bytes).unwrap();
    let opts = CreateOptions {
        backing_file: Some(bpath.to_string_lossy().into()),
        backing_format: Some("raw".into()),
        ..o(4 << 20)
    };
    enough(simulate(
        "backing",
        Workload {
            opts: opts.clone(),
            seed: 19,
            steps: 50,
            cache: None,
            backing: Some((&bpath, bytes.clone())),
        },
    ));
    let opts = CreateOptions {
        extended_l2: true,
        cluster_size: 32768,
        ..opts
    };
    enough(simulate(
        "backing-extl2",
        Workload {
            opts,
            seed: 20,
            steps: 50,
            cache: None,
            backing: Some((&bpath, bytes)),
        },
    ));
}

/// Storage that fails the n-th write (or flush) and every one after it, as a full or
/// failing disk does.
#[derive(Debug)]
struct Failing {
    inner: MemoryStorage,
    count: AtomicUsize,
    fail_at: usize,
    flushes: bool,
    enospc: bool,
}

impl Failing {
    fn tick(&self) -> io::Result<()> {
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.fail_at {
            return Err(io::Error::from_raw_os_error(if self.enospc {
                libc_enospc()
            } else {
                5
            }));
        }
        Ok(())
    }
}

fn libc_enospc() -> i32 {
    28
}

impl Storage for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.flushes {
            self.tick()?;
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if self.flushes {
            self.tick()?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

#[test]
fn failing_writes_and_flushes_are_reported_and_leave_the_image_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_size: 4096,
        ..Default::default()
    };
    let mem = MemoryStorage::new();
    format_qcow2(&mem, &opts).unwrap();
    let base = mem.to_vec();
    let mut cases = 0;
    let mut failures = 0;
    for flushes in [false, true] {
        for fail_at in (0..120).step_by(3) {
            let f = Arc::new(Failing {
                inner: MemoryStorage::from_vec(base.clone()),
                count: AtomicUsize::new(0),
                fail_at,
                flushes,
                enospc: fail_at % 2 == 0,
            });
            let img = open(f.clone(), true, Some(4096), None).unwrap();
            let mut rng = Rng(fail_at as u64 + 1);
            let mut failed = false;
            // (Enough operations that most injected failures hit one: a request
            // allocating several clusters writes them in one piece.)
            for _ in 0..160 {
                let off = rng.below(1024) * 4096 + rng.below(8) * 512;
                let len = (1 + rng.below(16)) * 512;
                let len = len.min((4 << 20) - off);
                let r = match rng.below(6) {
                    0 => img.write_zeroes(off, len, true),
                    1 => img.discard(off, len),
                    2 => img.flush(),
                    _ => img.write_at(&vec![0x33; len as usize], off),
                };
                if let Err(e) = r {
                    let s = e.to_string();
                    assert!(
                        s.contains("Input/output error") || s.contains("No space left"),
                        "the error is reported as it happened: {s}"
                    );
                    failed = true;
                    break;
                }
            }
            failures += failed as usize;
            drop(img);
            let mut bytes = vec![0u8; f.len().unwrap() as usize];
            f.read_at(&mut bytes, 0).unwrap();
            let path = dir.path().join("failed.qcow2");
            std::fs::write(&path, &bytes).unwrap();
            let (code, s) = qemu_check(&path);
            assert!(
                !s.contains("\"corruptions\"") && matches!(code, Some(0) | Some(3)),
                "fail_at {fail_at} (flushes: {flushes}):\n{s}"
            );
            // And it opens and reads.
            let img = open(Arc::new(MemoryStorage::from_vec(bytes)), false, None, None).unwrap();
            let mut all = vec![0u8; 4 << 20];
            img.read_at(&mut all, 0).unwrap();
            cases += 1;
        }
    }
    eprintln!("failure injection: {cases} cases, {failures} with a failed operation");
    assert!(
        failures > cases / 2,
        "too few injected failures hit an operation ({failures} of {cases})"
    );
}
