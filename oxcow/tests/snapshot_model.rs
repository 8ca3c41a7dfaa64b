//! Model-based tests of internal snapshots: random programs of write / write-zeroes /
//! discard / compressed write / resize / snapshot create / apply / delete / flush /
//! reopen against flat models (the active disk, and one Vec<u8> per snapshot). After
//! every step the active disk must read exactly as its model; applying a snapshot
//! must bring back exactly its model (contents and size). At the end `qemu-img check`
//! must find no errors and no leaks, and qemu-img must read the active disk and every
//! snapshot (convert -l snapshot.id=ID) as the models say.

mod common;

use common::model::{
    discard, open_rw, qemu_check_clean, write_compressed, write_pattern, write_zeroes, Program,
};
use common::{run, tempdir, Rng};
use oxcow::{create_qcow2, BlockDevice, CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

fn assert_reads(img: &Image, model: &[u8], step: &str) {
    assert_eq!(img.size(), model.len() as u64, "{step}: disk size");
    common::model::assert_reads(img, model, step);
}

/// qemu-img's reading of the active disk (`snapshot` None) or of a snapshot, at the
/// current disk size (QEMU reads a snapshot so: zeros past its own end).
fn qemu_reads(path: &Path, snapshot: Option<&str>, model: &[u8], size: usize) {
    let raw = path.with_extension("raw");
    let mut c = Command::new("qemu-img");
    c.arg("convert");
    if let Some(id) = snapshot {
        c.args(["-l", &format!("snapshot.id={id}")]);
    }
    run(c.args(["-O", "raw"]).arg(path).arg(&raw));
    let got = std::fs::read(&raw).unwrap();
    let mut want = model.to_vec();
    want.resize(size, 0);
    assert_eq!(got.len(), want.len(), "{snapshot:?}: length");
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "snapshot {snapshot:?}: qemu-img reads {:#04x} at {at:#x}, model has {:#04x}",
            got[at], want[at]
        );
    }
}

/// Runs a random program; returns the active model and the snapshots' (id, model).
fn run_program(path: &Path, prog: &Program) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let Program {
        cluster,
        v2,
        seed,
        steps,
        backing,
        cache,
        ..
    } = *prog;
    let mut rng = Rng::new(seed);
    let mut model = prog.initial_model();
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut img = open_rw(path, cache);
    let mut names = 0;
    for step in 0..steps {
        let size = model.len() as u64;
        let op = rng.below(100);
        let align = if rng.percent(50) { cluster } else { 512 };
        let off = rng.below(size / align) * align;
        let max_len = (size - off).min(cluster * 3);
        let len = ((1 + rng.below(max_len / 512)) * 512).min(size - off);
        let what;
        if op < 35 {
            let fill = rng.between(1, 255) as u8;
            what = write_pattern(&img, &mut model, off, len, fill);
        } else if op < 45 {
            let unmap = rng.percent(50);
            what = write_zeroes(&img, &mut model, off, len, unmap);
        } else if op < 53 {
            // v2 images over a backing file ignore discards, as QEMU does.
            let ignored = v2 && backing.is_some();
            what = discard(&img, &mut model, off, len, cluster, ignored);
        } else if op < 58 {
            let c = rng.below(size.div_ceil(cluster)) * cluster;
            let fill = rng.below(256) as u8;
            what = write_compressed(&img, &mut model, c, cluster, fill);
        } else if op < 61 && !v2 && backing.is_none() {
            let new_size = (size / 2 + rng.below(size * 3 / 2)) / 512 * 512 + 512;
            img.resize(new_size, true, oxcow::Preallocation::Off)
                .unwrap();
            model.resize(new_size as usize, 0);
            what = format!("resize {new_size:#x}");
        } else if op < 73 {
            names += 1;
            let name = format!("s{names}");
            let e = img.create_snapshot(&name).unwrap();
            assert!(!snaps.iter().any(|s| s.0 == e.id), "ID {} reused", e.id);
            snaps.push((e.id.clone(), model.clone()));
            what = format!("create snapshot {} ({name})", e.id);
        } else if op < 82 && !snaps.is_empty() {
            let (id, data) = snaps[rng.below(snaps.len() as u64) as usize].clone();
            img.apply_snapshot(&id).unwrap();
            model = data;
            what = format!("apply snapshot {id}");
        } else if op < 90 && !snaps.is_empty() {
            let i = rng.below(snaps.len() as u64) as usize;
            let id = snaps.remove(i).0;
            let e = img.delete_snapshot(&id).unwrap();
            assert_eq!(e.id, id);
            what = format!("delete snapshot {id}");
        } else if op < 95 {
            img.flush().unwrap();
            what = "flush".into();
        } else {
            drop(img);
            img = open_rw(path, cache);
            what = "reopen".into();
        }
        let step = format!("seed {seed} step {step} ({what})");
        assert_reads(&img, &model, &step);
        let ids: Vec<String> = img.snapshots().into_iter().map(|s| s.id).collect();
        let want: Vec<String> = snaps.iter().map(|s| s.0.clone()).collect();
        assert_eq!(ids, want, "{step}: snapshot list");
    }
    drop(img);
    (model, snaps)
}

fn check_program(name: &str, opts: CreateOptions, prog: Program) {
    let dir = tempdir();
    let path = dir.path().join(name);
    if let Some(b) = prog.backing {
        std::fs::write(dir.path().join("base.raw"), b).unwrap();
    }
    create_qcow2(&path, &opts).unwrap();
    let (model, snaps) = run_program(&path, &prog);
    qemu_check_clean(&path);
    qemu_reads(&path, None, &model, model.len());
    for (id, data) in &snaps {
        qemu_reads(&path, Some(id), data, model.len());
    }
    // Every snapshot applied once more, after a reopen, reads as its model.
    let img = open_rw(&path, prog.cache);
    for (id, data) in &snaps {
        img.apply_snapshot(id).unwrap();
        assert_reads(&img, data, &format!("{name}: final apply of {id}"));
    }
    drop(img);
    qemu_check_clean(&path);
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

#[test]
fn model_64k_clusters() {
    for seed in [1, 2] {
        check_program(
            "a.qcow2",
            opts(4 << 20),
            Program {
                size: 4 << 20,
                cluster: 65536,
                v2: false,
                seed,
                steps: 120,
                backing: None,
                cache: None,
            },
        );
    }
}

#[test]
fn model_512b_clusters_tiny_cache() {
    check_program(
        "b.qcow2",
        CreateOptions {
            cluster_size: 512,
            ..opts(256 << 10)
        },
        Program {
            size: 256 << 10,
            cluster: 512,
            v2: false,
            seed: 3,
            steps: 150,
            backing: None,
            cache: Some(2048),
        },
    );
}

#[test]
fn model_v2_backing_file() {
    let mut rng = Rng::new(44);
    let base = rng.bytes(1 << 20);
    check_program(
        "c.qcow2",
        CreateOptions {
            version: 2,
            cluster_size: 4096,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..opts(2 << 20)
        },
        Program {
            size: 2 << 20,
            cluster: 4096,
            v2: true,
            seed: 4,
            steps: 120,
            backing: Some(&base),
            cache: Some(8192),
        },
    );
}

#[test]
fn model_extended_l2_lazy_refcounts_16bit() {
    check_program(
        "d.qcow2",
        CreateOptions {
            extended_l2: true,
            lazy_refcounts: true,
            refcount_bits: 16,
            ..opts(4 << 20)
        },
        Program {
            size: 4 << 20,
            cluster: 65536,
            v2: false,
            seed: 5,
            steps: 120,
            backing: None,
            cache: None,
        },
    );
}

/// Snapshots taken while threads write: every write request is wholly in a snapshot
/// or wholly out of it. Each thread rewrites its own two-cluster region with one
/// value per request, so each region of each snapshot must hold a single value.
#[test]
fn snapshots_during_concurrent_writes_hold_whole_requests() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempdir();
    let path = dir.path().join("c.qcow2");
    let cs = 65536u64;
    let threads = 4u64;
    let region = 2 * cs;
    create_qcow2(&path, &opts(threads * 2 * region)).unwrap();
    // No fsyncs: this is about ordering in memory, not durability.
    let img = Arc::new(
        Image::open(
            &path,
            &OpenOptions {
                writable: true,
                cache_unsafe: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (img, stop) = (img.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = 0u8;
                while !stop.load(Ordering::Acquire) {
                    v = v.wrapping_add(1).max(1);
                    img.write_at(&vec![v; region as usize], t * 2 * region)
                        .unwrap();
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(img.create_snapshot(&format!("c{i}")).unwrap().id);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.join().unwrap();
    }
    drop(img);
    qemu_check_clean(&path);
    for id in &ids {
        let ro = Image::open(&path, &OpenOptions::default()).unwrap();
        ro.load_snapshot_tmp(Some(id), None).unwrap();
        for t in 0..threads {
            let mut buf = vec![0u8; region as usize];
            ro.read_at(&mut buf, t * 2 * region).unwrap();
            assert!(
                buf.iter().all(|&b| b == buf[0]),
                "snapshot {id}, thread {t}: a write is split by the snapshot ({:#x} and {:#x})",
                buf[0],
                buf[region as usize - 1]
            );
        }
    }
}
