//! Model-based tests of the write path: random programs of write / write-zeroes /
//! discard / flush / reopen against a flat in-memory model of the disk. After every
//! step the image must read exactly as the model; at the end `qemu-img check` must
//! find no errors and no leaks, and qemu-img must read the same bytes.

mod common;

use common::model::{
    assert_reads, discard, open_rw, qemu_check_clean, write_compressed, write_pattern,
    write_zeroes, Program,
};
use common::{qemu_read_raw, XorShift as Rng};
use oxcow::format::header::CompressionType;
use oxcow::{create_qcow2, BlockDevice, CreateOptions};
use std::path::Path;
use std::process::Command;

fn qemu_reads(path: &Path, model: &[u8]) {
    let got = qemu_read_raw(path, &path.with_extension("raw"));
    assert_eq!(got.len(), model.len());
    if let Some(at) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "qemu-img reads {:#04x} at {at:#x}, model has {:#04x}",
            got[at], model[at]
        );
    }
}

/// Runs a random program; returns the model.
fn run_program(path: &Path, prog: &Program) -> Vec<u8> {
    let Program {
        size,
        cluster,
        v2,
        seed,
        steps,
        backing,
        cache,
    } = *prog;
    let mut rng = Rng(seed | 1);
    let mut model = prog.initial_model();
    let mut img = open_rw(path, cache);
    let mut size = size;
    for step in 0..steps {
        let op = rng.below(100);
        // Offsets cluster-aligned half of the time, lengths from bytes to clusters.
        let align = if rng.below(2) == 0 { cluster } else { 512 };
        let off = rng.below(size / align) * align;
        let max_len = (size - off).min(cluster * 3);
        let len = (1 + rng.below(max_len / 512)) * 512;
        let len = len.min(size - off);
        let what;
        if op < 55 {
            let fill = (rng.next() & 0xff) as u8 | 1;
            what = write_pattern(&img, &mut model, off, len, fill);
        } else if op < 72 {
            let unmap = rng.below(2) == 0;
            what = write_zeroes(&img, &mut model, off, len, unmap);
        } else if op < 85 {
            let ignored = v2 && backing.is_some();
            what = discard(&img, &mut model, off, len, cluster, ignored);
        } else if op < 90 {
            // A compressed cluster, which only unallocated clusters can take.
            let c = rng.below(size.div_ceil(cluster)) * cluster;
            let fill = (rng.next() & 0xff) as u8;
            what = write_compressed(&img, &mut model, c, cluster, fill);
        } else if op < 93 && backing.is_none() {
            // Grow or shrink (to any multiple of 512); new space reads as zeros.
            let new_size = (size / 2 + rng.below(size * 3 / 2)) / 512 * 512 + 512;
            img.resize(new_size, true, oxcow::Preallocation::Off)
                .unwrap();
            model.resize(new_size as usize, 0);
            size = new_size;
            what = format!("resize {new_size:#x}");
        } else if op < 93 {
            img.flush().unwrap();
            what = "flush".into();
        } else {
            drop(img);
            img = open_rw(path, cache);
            what = "reopen".into();
        }
        assert_reads(&img, &model, &format!("seed {seed} step {step} ({what})"));
    }
    drop(img);
    model
}

fn create(path: &Path, o: CreateOptions) {
    create_qcow2(path, &o).unwrap();
}

#[test]
fn random_programs_agree_with_the_model_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<(&str, CreateOptions)> = vec![
        (
            "default",
            CreateOptions {
                size: 8 << 20,
                ..Default::default()
            },
        ),
        (
            "512b",
            CreateOptions {
                size: 2 << 20,
                cluster_size: 512,
                ..Default::default()
            },
        ),
        (
            "4k-rb1",
            CreateOptions {
                size: 4 << 20,
                cluster_size: 4096,
                refcount_bits: 1,
                ..Default::default()
            },
        ),
        (
            "rb64",
            CreateOptions {
                size: 8 << 20,
                refcount_bits: 64,
                ..Default::default()
            },
        ),
        (
            "v2",
            CreateOptions {
                size: 8 << 20,
                version: 2,
                ..Default::default()
            },
        ),
        (
            "extl2",
            CreateOptions {
                size: 8 << 20,
                extended_l2: true,
                ..Default::default()
            },
        ),
        (
            "extl2-32k",
            CreateOptions {
                size: 4 << 20,
                extended_l2: true,
                cluster_size: 32768,
                ..Default::default()
            },
        ),
        (
            "2m",
            CreateOptions {
                size: 16 << 20,
                cluster_size: 2 << 20,
                ..Default::default()
            },
        ),
        (
            "zstd",
            CreateOptions {
                size: 4 << 20,
                compression_type: CompressionType::Zstd,
                ..Default::default()
            },
        ),
    ];
    for (name, o) in configs {
        for seed in 1..=3u64 {
            let p = dir.path().join(format!("{name}-{seed}.qcow2"));
            let (size, cs, v2) = (o.size, o.cluster_size, o.version == 2);
            create(&p, o.clone());
            // A tiny cache (one table) makes eviction happen in the middle of updates.
            let cache = if seed == 2 { Some(cs) } else { None };
            let model = run_program(
                &p,
                &Program {
                    size,
                    cluster: cs,
                    v2,
                    seed: seed * 7919 + name.len() as u64,
                    steps: 120,
                    backing: None,
                    cache,
                },
            );
            qemu_check_clean(&p);
            qemu_reads(&p, &model);
        }
    }
}

#[test]
fn writes_over_a_backing_file_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let base = dir.path().join("base.raw");
    let mut rng = Rng(99);
    let base_bytes: Vec<u8> = (0..size - (64 << 10))
        .map(|_| (rng.next() & 0xff) as u8)
        .collect();
    std::fs::write(&base, &base_bytes).unwrap();
    for (name, ext, v2, cs) in [
        ("plain", false, false, 65536u64),
        ("extl2", true, false, 65536),
        ("v2", false, true, 65536),
        ("4k", false, false, 4096),
    ] {
        let p = dir.path().join(format!("over-{name}.qcow2"));
        create(
            &p,
            CreateOptions {
                size,
                cluster_size: cs,
                extended_l2: ext,
                version: if v2 { 2 } else { 3 },
                backing_file: Some(base.to_string_lossy().into()),
                backing_format: Some("raw".into()),
                ..Default::default()
            },
        );
        let model = run_program(
            &p,
            &Program {
                size,
                cluster: cs,
                v2,
                seed: 4242,
                steps: 150,
                backing: Some(&base_bytes),
                cache: None,
            },
        );
        qemu_check_clean(&p);
        qemu_reads(&p, &model);
    }
}

#[test]
fn qemu_made_images_with_compressed_clusters_and_snapshots_are_written_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let size = 4u64 << 20;
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(size.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args([
            "-c",
            "write -c -P 0x11 0 256k",
            "-c",
            "write -P 0x22 1M 512k",
            "-c",
            "write -z 2M 128k",
        ])
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-img")
        .args(["snapshot", "-c", "snap"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success());
    let mut model = vec![0u8; size as usize];
    model[..256 << 10].fill(0x11);
    model[1 << 20..(1 << 20) + (512 << 10)].fill(0x22);
    let model = {
        let img = open_rw(&p, None);
        assert_reads(&img, &model, "as qemu wrote it");
        // Partial overwrites of compressed clusters and of clusters shared with the
        // snapshot.
        img.write_at(&[0xaa; 1000], 100).unwrap();
        model[100..1100].fill(0xaa);
        img.write_at(&[0xbb; 4096], (1 << 20) + 8192).unwrap();
        model[(1 << 20) + 8192..(1 << 20) + 8192 + 4096].fill(0xbb);
        img.write_zeroes(64 << 10, 64 << 10, true).unwrap();
        model[64 << 10..128 << 10].fill(0);
        img.discard(1 << 20, 64 << 10).unwrap();
        model[1 << 20..(1 << 20) + (64 << 10)].fill(0);
        assert_reads(&img, &model, "after writes");
        model
    };
    qemu_check_clean(&p);
    qemu_reads(&p, &model);
    // The snapshot still holds the old data.
    let st = Command::new("qemu-img")
        .args(["snapshot", "-a", "snap"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success());
    let mut old = vec![0u8; size as usize];
    old[..256 << 10].fill(0x11);
    old[1 << 20..(1 << 20) + (512 << 10)].fill(0x22);
    qemu_reads(&p, &old);
    qemu_check_clean(&p);
}
