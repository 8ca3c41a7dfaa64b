//! Many threads writing, zeroing and discarding the same clusters at once while
//! others read: every thread owns interleaved 512-byte sectors (so allocations of one
//! cluster race), one thread owns whole clusters it zeroes and discards; each checks
//! its own bytes after every operation, and at the end the image must match the
//! merged model and pass `qemu-img check`.

mod common;

use common::{qemu_check_json, qemu_read_raw, XorShift as Rng};
use oxcow::format::header::CompressionType;
use oxcow::{create_qcow2, BlockDevice, CreateOptions, Image, OpenOptions};
use std::sync::Arc;

const SECTOR: u64 = 512;

fn stress(opts: CreateOptions, threads: u64, ops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    create_qcow2(&path, &opts).unwrap();
    let size = opts.size;
    let cs = opts.cluster_size;
    // The last quarter of the disk belongs to the discarding thread, by clusters.
    let shared_end = size / 4 * 3;
    let img = Arc::new(
        Image::open(
            &path,
            &OpenOptions {
                writable: true,
                l2_cache_bytes: Some(cs * 2),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let mut handles = Vec::new();
    for t in 0..threads {
        let img = img.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(t * 1_000_003 + 17);
            let mut model = vec![0u8; shared_end as usize];
            let sectors = shared_end / SECTOR;
            for i in 0..ops {
                // A run of this thread's own sectors: s, s+threads, s+2*threads...
                let first = rng.below(sectors / threads) * threads + t;
                let count = 1 + rng.below(8);
                let zero = rng.below(5) == 0;
                let fill = (rng.next() as u8) | 1;
                for k in 0..count {
                    let s = first + k * threads;
                    if s >= sectors {
                        break;
                    }
                    let off = s * SECTOR;
                    if zero {
                        img.write_zeroes(off, SECTOR, rng.below(2) == 0).unwrap();
                        model[off as usize..(off + SECTOR) as usize].fill(0);
                    } else {
                        img.write_at(&[fill; SECTOR as usize], off).unwrap();
                        model[off as usize..(off + SECTOR) as usize].fill(fill);
                    }
                }
                if i % 10 == 0 {
                    img.flush().unwrap();
                }
                // Read back a stretch and check this thread's sectors in it.
                let at = rng.below(sectors.saturating_sub(64)) * SECTOR;
                let mut buf = vec![0u8; (64 * SECTOR) as usize];
                img.read_at(&mut buf, at).unwrap();
                for (j, chunk) in buf.chunks(SECTOR as usize).enumerate() {
                    let s = at / SECTOR + j as u64;
                    if s % threads == t {
                        let want = &model[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
                        assert_eq!(chunk, want, "thread {t} op {i}: sector {s} differs");
                    }
                }
            }
            model
        }));
    }
    // The discarding thread: whole clusters of its own quarter.
    let discarder = {
        let img = img.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(4242);
            let clusters = (size - shared_end) / cs;
            let mut model = vec![0u8; (size - shared_end) as usize];
            for i in 0..ops {
                let c = rng.below(clusters);
                let off = shared_end + c * cs;
                let local = (c * cs) as usize..((c + 1) * cs) as usize;
                match rng.below(3) {
                    0 => {
                        let fill = (rng.next() as u8) | 1;
                        img.write_at(&vec![fill; cs as usize], off).unwrap();
                        model[local.clone()].fill(fill);
                    }
                    1 => {
                        img.discard(off, cs).unwrap();
                        model[local.clone()].fill(0);
                    }
                    _ => {
                        img.write_zeroes(off, cs, true).unwrap();
                        model[local.clone()].fill(0);
                    }
                }
                let mut buf = vec![0u8; cs as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(buf == model[local], "discarder op {i}: cluster {c} differs");
            }
            model
        })
    };
    let mut merged = vec![0u8; size as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let m = h.join().expect("writer thread panicked");
        for s in (t as u64..shared_end / SECTOR).step_by(threads as usize) {
            let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
            merged[r.clone()].copy_from_slice(&m[r]);
        }
    }
    let m = discarder.join().expect("discarder panicked");
    merged[shared_end as usize..].copy_from_slice(&m);
    img.flush().unwrap();
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == merged, "final contents differ from the merged model");
    drop(img);
    let out = qemu_check_json(&path);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !s.contains("\"leaks\"") && !s.contains("\"corruptions\""),
        "qemu-img check:\n{s}"
    );
    assert!(
        qemu_read_raw(&path, &dir.path().join("s.raw")) == merged,
        "qemu-img reads other bytes"
    );
}

#[test]
fn threads_racing_on_the_same_clusters() {
    stress(
        CreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
        4,
        300,
    );
}

#[test]
fn threads_racing_with_subclusters_and_small_clusters() {
    stress(
        CreateOptions {
            size: 4 << 20,
            extended_l2: true,
            cluster_size: 32768,
            compression_type: CompressionType::Zstd,
            ..Default::default()
        },
        4,
        300,
    );
    stress(
        CreateOptions {
            size: 2 << 20,
            cluster_size: 4096,
            refcount_bits: 2,
            ..Default::default()
        },
        3,
        300,
    );
}
