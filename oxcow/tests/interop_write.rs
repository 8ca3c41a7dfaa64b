//! oxcow and QEMU taking turns on one image, and the parts of an image oxcow must
//! keep when it writes: unknown header extensions and fields, autoclear bits, and
//! the corrupt bit when metadata would be overwritten.

mod common;

use common::{qemu_check_json, XorShift as Rng};
use oxcow::{BlockDevice, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

fn qemu(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_clean(path: &Path) {
    let out = qemu_check_json(path);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !s.contains("\"leaks\"") && !s.contains("\"corruptions\""),
        "qemu-img check:\n{s}"
    );
}

fn rw(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn alternating_workloads_with_qemu_io_stay_clean() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=8",
        "extended_l2=on",
        "compat=0.10",
        "lazy_refcounts=on",
    ] {
        let p = dir.path().join("alt.qcow2");
        let ps = p.to_str().unwrap();
        qemu(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, ps, "8M",
        ]);
        let mut rng = Rng(opts.len() as u64 * 31 + 7);
        let cs: u64 = if opts.contains("4096") { 4096 } else { 65536 };
        let mut model = vec![0u8; 8 << 20];
        for round in 0..6 {
            // QEMU's turn.
            let mut cmds = Vec::new();
            for _ in 0..8 {
                let off = rng.below(128) * 65536 + rng.below(16) * 4096;
                let len = (1 + rng.below(24)) * 4096;
                let len = len.min((8 << 20) - off);
                let pat = (rng.next() as u8) | 1;
                if rng.below(4) == 0 {
                    cmds.push(format!("write -z {off} {len}"));
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    cmds.push(format!("write -P {pat} {off} {len}"));
                    model[off as usize..(off + len) as usize].fill(pat);
                }
            }
            let mut args = vec!["qemu-io".to_string()];
            for c in cmds {
                args.push("-c".into());
                args.push(c);
            }
            args.push(ps.to_string());
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            qemu(&a);
            check_clean(&p);
            // oxcow's turn.
            let img = rw(&p);
            assert!(
                read_all(&img) == model,
                "{opts} round {round}: oxcow reads other bytes than qemu-io wrote"
            );
            for _ in 0..8 {
                let off = rng.below(128) * 65536 + rng.below(64) * 1024;
                let len = ((1 + rng.below(40)) * 1024).min((8 << 20) - off);
                match rng.below(5) {
                    0 => {
                        img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    1 => {
                        // Whole clusters inside the range read as zeros afterwards.
                        img.discard(off, len).unwrap();
                        let (s, e) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
                        if s < e {
                            model[s as usize..e as usize].fill(0);
                        }
                    }
                    _ => {
                        let pat = (rng.next() as u8) | 1;
                        img.write_at(&vec![pat; len as usize], off).unwrap();
                        model[off as usize..(off + len) as usize].fill(pat);
                    }
                }
            }
            assert!(
                read_all(&img) == model,
                "{opts} round {round}: oxcow reads other bytes than it wrote"
            );
            drop(img);
            check_clean(&p);
            let raw = dir.path().join("alt.raw");
            qemu(&[
                "qemu-img",
                "convert",
                "-O",
                "raw",
                ps,
                raw.to_str().unwrap(),
            ]);
            assert!(
                std::fs::read(&raw).unwrap() == model,
                "{opts} round {round}: qemu-img reads other bytes"
            );
        }
    }
}

#[test]
fn unknown_extensions_fields_and_autoclear_bits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.qcow2");
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        "4M",
    ]);
    // Add an unknown header extension before the end marker, and an unknown
    // autoclear bit.
    let mut b = std::fs::read(&p).unwrap();
    let hl = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    let mut at = hl;
    loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        if kind == 0 {
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let ext = [
        0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
    ];
    // Over the end marker; the zeros after it become the new end marker.
    assert!(b[at..at + 24].iter().all(|&x| x == 0));
    b[at..at + 16].copy_from_slice(&ext);
    b[95] |= 0x80; // autoclear bit 7: unknown
    std::fs::write(&p, &b).unwrap();
    {
        let img = rw(&p);
        img.write_at(&[7u8; 4096], 8192).unwrap();
    }
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after[95] & 0x80,
        0,
        "unknown autoclear bits are cleared by a writer"
    );
    let needle = &ext[..13];
    assert!(
        after[..65536].windows(needle.len()).any(|w| w == needle),
        "the unknown extension is kept"
    );
    check_clean(&p);
}

#[test]
fn allocation_over_metadata_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        "4M",
    ]);
    // Claim the L1 table's cluster (3) is free: refcount block at cluster 2, 16-bit entries.
    let mut b = std::fs::read(&p).unwrap();
    let rb = 2 * 65536;
    b[rb + 6] = 0;
    b[rb + 7] = 0;
    std::fs::write(&p, &b).unwrap();
    let img = rw(&p);
    let e = img.write_at(&[1u8; 512], 0).unwrap_err().to_string();
    assert!(
        e.contains("Preventing invalid write on metadata (overlaps with active L1 table)"),
        "{e}"
    );
    assert!(
        img.write_at(&[1u8; 512], 65536).is_err(),
        "writes stop once the image is corrupt"
    );
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after[79] & 2, 2, "the corrupt bit is set");
    let e = Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("corrupt"), "{e}");
    // Reading still works.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&img), vec![0u8; 4 << 20]);
}

/// A 4 MiB image with data in its first cluster (L2 table at cluster 4) whose
/// refcount block (cluster 2, 16-bit entries) says cluster `free` is free.
fn damaged(path: &Path, free: usize) {
    let p = path.to_str().unwrap();
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p, "4M"]);
    qemu(&["qemu-io", "-c", "write -q -P 1 0 64k", p]);
    let mut b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[0x30000..0x30008],
        &[0x80, 0, 0, 0, 0, 4, 0, 0],
        "L2 table at cluster 4"
    );
    let rb = 2 * 65536 + 2 * free;
    assert_eq!(&b[rb..rb + 2], &[0, 1]);
    b[rb + 1] = 0;
    std::fs::write(path, &b).unwrap();
}

/// QEMU's default overlap check covers the active L2 tables and the refcount blocks
/// too: an allocation that lands on one (its refcount says free) marks the image
/// corrupt and is refused before anything is written, as qemu-io does on the same
/// image (the same bytes afterwards).
#[test]
fn allocation_over_an_l2_table_or_a_refcount_block_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    for (free, what) in [(4, "active L2 table"), (2, "refcount block")] {
        let (mine, theirs) = (
            dir.path().join("mine.qcow2"),
            dir.path().join("theirs.qcow2"),
        );
        damaged(&mine, free);
        damaged(&theirs, free);
        let before = std::fs::read(&mine).unwrap();
        let img = rw(&mine);
        let e = img
            .write_at(&[2u8; 65536], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "Preventing invalid write on metadata (overlaps with {what})"
            )),
            "{e}"
        );
        assert!(img.write_at(&[3u8; 4096], 2 << 20).is_err(), "writes stop");
        assert!(img.write_zeroes(0, 65536, true).is_err(), "writes stop");
        drop(img);
        let after = std::fs::read(&mine).unwrap();
        assert_eq!(after[79] & 2, 2, "the corrupt bit is set");
        let c = free * 65536;
        assert!(
            after[c..c + 65536] == before[c..c + 65536],
            "{what} untouched"
        );
        let out = Command::new("qemu-io")
            .args(["-c", "write -P 2 1M 64k", "-c", "write -P 3 2M 4k"])
            .arg(&theirs)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("(overlaps with {what})")), "{err}");
        assert!(
            std::fs::read(&theirs).unwrap() == after,
            "the same bytes as qemu-io leaves"
        );
        let img = Image::open(&mine, &OpenOptions::default()).unwrap();
        let mut first = vec![0u8; 65536];
        img.read_at(&mut first, 0).unwrap();
        assert_eq!(first, vec![1u8; 65536], "the data is still readable");
    }
}

/// One random program, run through oxcow's library and through qemu-io on images
/// created the same way: `qemu-img compare` must find them identical, and both must
/// check clean.
fn same_workload(dir: &Path, name: &str, qemu_opts: &str, ours: oxcow::CreateOptions, seed: u64) {
    let size = ours.size;
    let cs = ours.cluster_size;
    let mine = dir.join(format!("{name}-oxcow.qcow2"));
    let theirs = dir.join(format!("{name}-qemu.qcow2"));
    oxcow::create_qcow2(&mine, &ours).unwrap();
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        qemu_opts,
        theirs.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut rng = Rng(seed);
    let mut cmds: Vec<String> = Vec::new();
    let img = rw(&mine);
    for _ in 0..60 {
        let align = if rng.below(2) == 0 { cs } else { 512 };
        let off = rng.below(size / align) * align;
        let len = ((1 + rng.below(cs * 3 / 512)) * 512).min(size - off);
        match rng.below(10) {
            0..=4 => {
                let pat = (rng.next() as u8) | 1;
                img.write_at(&vec![pat; len as usize], off).unwrap();
                cmds.push(format!("write -P {pat} {off} {len}"));
            }
            5 | 6 => {
                let unmap = rng.below(2) == 0;
                img.write_zeroes(off, len, unmap).unwrap();
                cmds.push(format!(
                    "write -z {} {off} {len}",
                    if unmap { "-u" } else { "" }
                ));
            }
            7 => {
                img.discard(off, len).unwrap();
                cmds.push(format!("discard {off} {len}"));
            }
            _ => {
                // Compressed whole clusters, on clusters neither side has written.
                let c = rng.below(size / cs) * cs;
                let st = oxcow::block_status(&img, c, cs).unwrap();
                if st.present || st.len < cs {
                    continue;
                }
                let pat = (rng.next() as u8) | 1;
                img.qcow2()
                    .unwrap()
                    .write_compressed(&vec![pat; cs as usize], c)
                    .unwrap();
                cmds.push(format!("write -c -P {pat} {c} {cs}"));
            }
        }
    }
    drop(img);
    // QEMU 10.0 can corrupt an image when one qemu-io process makes compressed writes
    // after zero writes with unmap and plain writes (seen by our read tests): every
    // compressed write starts a new qemu-io process.
    let mut groups: Vec<Vec<String>> = vec![Vec::new()];
    for c in cmds {
        if c.starts_with("write -c") {
            groups.push(Vec::new());
        }
        groups.last_mut().unwrap().push(c);
    }
    for g in groups.into_iter().filter(|g| !g.is_empty()) {
        let mut args = vec!["qemu-io".to_string()];
        for c in g {
            args.push("-c".into());
            args.push(c);
        }
        args.push(theirs.to_str().unwrap().to_string());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        qemu(&a);
    }
    check_clean(&mine);
    check_clean(&theirs);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&theirs)
        .arg(&mine)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn random_workloads_equal_qemu_io_for_every_creation_option() {
    use oxcow::format::header::CompressionType;
    use oxcow::{CreateOptions, Preallocation};
    let dir = tempfile::tempdir().unwrap();
    let base = |size| CreateOptions {
        size,
        ..Default::default()
    };
    let cases: Vec<(&str, &str, CreateOptions)> = vec![
        ("default", "cluster_size=65536", base(8 << 20)),
        (
            "v2",
            "compat=0.10",
            CreateOptions {
                version: 2,
                ..base(8 << 20)
            },
        ),
        (
            "512",
            "cluster_size=512",
            CreateOptions {
                cluster_size: 512,
                ..base(1 << 20)
            },
        ),
        (
            "4k-rb1",
            "cluster_size=4096,refcount_bits=1",
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 1,
                ..base(4 << 20)
            },
        ),
        (
            "rb64",
            "refcount_bits=64",
            CreateOptions {
                refcount_bits: 64,
                ..base(8 << 20)
            },
        ),
        (
            "2m",
            "cluster_size=2M",
            CreateOptions {
                cluster_size: 2 << 20,
                ..base(32 << 20)
            },
        ),
        (
            "lazy",
            "lazy_refcounts=on",
            CreateOptions {
                lazy_refcounts: true,
                ..base(8 << 20)
            },
        ),
        (
            "extl2",
            "extended_l2=on",
            CreateOptions {
                extended_l2: true,
                ..base(8 << 20)
            },
        ),
        (
            "extl2-32k",
            "extended_l2=on,cluster_size=32k",
            CreateOptions {
                extended_l2: true,
                cluster_size: 32768,
                ..base(4 << 20)
            },
        ),
        (
            "zstd",
            "compression_type=zstd",
            CreateOptions {
                compression_type: CompressionType::Zstd,
                ..base(8 << 20)
            },
        ),
        (
            "meta",
            "preallocation=metadata",
            CreateOptions {
                preallocation: Preallocation::Metadata,
                ..base(8 << 20)
            },
        ),
        (
            "falloc",
            "preallocation=falloc",
            CreateOptions {
                preallocation: Preallocation::Falloc,
                ..base(8 << 20)
            },
        ),
        (
            "full",
            "preallocation=full",
            CreateOptions {
                preallocation: Preallocation::Full,
                ..base(8 << 20)
            },
        ),
    ];
    for (i, (name, q, o)) in cases.into_iter().enumerate() {
        same_workload(dir.path(), name, q, o, 1000 + i as u64);
    }
}

#[test]
fn discard_frees_space_for_reuse_and_punches_holes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.qcow2");
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        "64M",
    ]);
    let img = rw(&p);
    img.write_at(&vec![9u8; 32 << 20], 0).unwrap();
    img.flush().unwrap();
    let full = std::fs::metadata(&p).unwrap();
    img.discard(0, 32 << 20).unwrap();
    img.flush().unwrap();
    let after = std::fs::metadata(&p).unwrap();
    assert!(
        after.blocks() * 512 < full.blocks() * 512 - (30 << 20),
        "discarded clusters are punched out of the file ({} -> {} bytes)",
        full.blocks() * 512,
        after.blocks() * 512
    );
    // The freed clusters are reused: writing again does not grow the file.
    img.write_at(&vec![7u8; 32 << 20], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        full.len(),
        "freed clusters are reused"
    );
    drop(img);
    check_clean(&p);
}

/// Growing over a longer backing file through the library (`Image::resize`): the
/// new area reads as zeros and the image is the one `qemu-img resize` makes, byte
/// for byte (v3); a v2 image refuses, as QEMU does, and keeps its size.
#[test]
fn resize_over_a_longer_backing_file_zeroes_the_new_area() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    for compat in ["1.1", "0.10"] {
        let base = path(&format!("base{compat}.qcow2"));
        let opts = format!("compat={compat}");
        qemu(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, &base, "4M",
        ]);
        qemu(&["qemu-io", "-c", "write -q -P 0xaa 0 4M", &base]);
        let (theirs, mine) = (path("theirs.qcow2"), path("mine.qcow2"));
        qemu(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, "-b", &base, "-F", "qcow2",
            &theirs, "1000k",
        ]);
        qemu(&["qemu-io", "-c", "write -q -P 0xbb 960k 8k", &theirs]);
        std::fs::copy(&theirs, &mine).unwrap();
        let img = rw(Path::new(&mine));
        let res = img.resize(3000 << 10, false, oxcow::Preallocation::Off);
        if compat == "0.10" {
            let e = res.unwrap_err().to_string();
            assert_eq!(
                e,
                "Failed to zero out new clusters: Operation not supported"
            );
            assert_eq!(img.size(), 1000 << 10, "the size is kept");
            drop(img);
            check_clean(Path::new(&mine));
            continue;
        }
        res.unwrap();
        let all = read_all(&img);
        assert!(
            all[..960 << 10].iter().all(|&b| b == 0xaa),
            "backing data kept"
        );
        assert!(
            all[960 << 10..968 << 10].iter().all(|&b| b == 0xbb),
            "own data kept"
        );
        assert!(all[968 << 10..1000 << 10].iter().all(|&b| b == 0xaa));
        assert!(
            all[1000 << 10..].iter().all(|&b| b == 0),
            "the new area reads zeros"
        );
        drop(img);
        qemu(&["qemu-img", "resize", "-q", &theirs, "3000k"]);
        check_clean(Path::new(&mine));
        assert!(
            std::fs::read(&mine).unwrap() == std::fs::read(&theirs).unwrap(),
            "the same bytes as qemu-img resize"
        );
    }
}
