//! The read path against QEMU: images made by qemu-img / qemu-io across the format's
//! options; oxcow must read exactly what `qemu-img convert -O raw` gives and report
//! the block status `qemu-img map` reports.

mod common;

use common::*;
use oxcow::{BlockDevice, Image, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A sparse raw file of `size` bytes: random data in scattered extents (some of them
/// unaligned), holes elsewhere, and an explicit run of zero bytes.
fn make_raw(dir: &Path, name: &str, size: u64, rng: &mut Rng) {
    let f = std::fs::File::create(dir.join(name)).unwrap();
    f.set_len(size).unwrap();
    for _ in 0..24 {
        let off = rng.below(size);
        let len = rng.between(1, 512 << 10).min(size - off);
        f.write_all_at(&rng.bytes(len as usize), off).unwrap();
    }
    // Written zeros (data, not a hole) and the very last byte.
    f.write_all_at(&vec![0u8; 200_000], size / 3).unwrap();
    f.write_all_at(&[0xee], size - 1).unwrap();
}

/// One image per (compat, refcount_bits) at a cluster size, each with a random
/// workload of data, compressed, zero and discard writes.
fn cluster_matrix(cs: u64, size: u64, seed: u64) {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(seed);
    let pats = pattern_files(d, &mut rng, 3);
    for (compat, rb) in [("0.10", 16), ("1.1", 1), ("1.1", 16), ("1.1", 64)] {
        let name = format!("c{compat}-r{rb}.qcow2");
        let opts = format!("compat={compat},cluster_size={cs},refcount_bits={rb}");
        create_qcow2(d, &name, &opts, &size.to_string());
        let mut w = Workload::new(size, cs);
        qemu_io(d, &name, &w.commands(&mut rng, &pats));
        verify(d, &name, rng.next_u64());
        let img = open(&d.join(&name));
        let h = img.qcow2().unwrap().header();
        assert_eq!(h.cluster_size(), cs);
        assert_eq!(h.refcount_bits(), rb);
        assert_eq!(h.version, if compat == "0.10" { 2 } else { 3 });
    }
}

#[test]
fn matrix_cluster_512() {
    cluster_matrix(512, 8 * MIB, 1);
}

#[test]
fn matrix_cluster_4k() {
    cluster_matrix(4096, 16 * MIB, 2);
}

#[test]
fn matrix_cluster_64k() {
    cluster_matrix(65536, 32 * MIB, 3);
}

#[test]
fn matrix_cluster_2m() {
    cluster_matrix(2 * MIB, 64 * MIB, 4);
}

/// A virtual size that is not a multiple of the cluster size: the last cluster is
/// partial.
#[test]
fn odd_virtual_size() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(5);
    let pats = pattern_files(d, &mut rng, 2);
    for (cs, size) in [(65536u64, 5 * MIB + 12345 * 512), (4096, 3 * MIB + 512)] {
        let name = format!("odd{cs}.qcow2");
        create_qcow2(d, &name, &format!("cluster_size={cs}"), &size.to_string());
        verify(d, &name, rng.next_u64());
        // The last, partial cluster compressed, then a random workload, then a plain
        // write of its tail.
        let last = (size - 1) / cs * cs;
        let mut w = Workload::new(size, cs);
        w.touch(last, size - last);
        let mut cmds = vec![format!("write -c -P 3 {last} {}", size - last)];
        cmds.extend(w.commands(&mut rng, &pats));
        cmds.push(format!("write -P 9 {} 512", size - 512));
        qemu_io(d, &name, &cmds[..1]);
        verify(d, &name, rng.next_u64());
        assert!(oxcow_map(&open(&d.join(&name))).last().unwrap().compressed);
        qemu_io(d, &name, &cmds[1..]);
        verify(d, &name, rng.next_u64());
    }
}

/// Extended L2 entries: subcluster-sized writes, zero writes and discards leave
/// clusters partly allocated, partly zero and partly unallocated (showing a raw
/// backing file through).
fn extended_l2(cs: u64, seed: u64) {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(seed);
    let pats = pattern_files(d, &mut rng, 3);
    let size = (32 * MIB).max(32 * cs);
    make_raw(d, "base.raw", size - 3 * MIB, &mut rng);
    for backing in [false, true] {
        let name = format!("ext{cs}-{backing}.qcow2");
        let mut opts = format!("extended_l2=on,cluster_size={cs}");
        if backing {
            opts += ",backing_file=base.raw,backing_fmt=raw";
        }
        create_qcow2(d, &name, &opts, &size.to_string());
        let sc = cs / 32;
        // Deterministic partial clusters first: alternate subclusters of data, zero
        // and nothing, in clusters 1 and 2.
        let mut cmds = Vec::new();
        for i in 0..32 {
            let off = cs + i * sc;
            match i % 3 {
                0 => cmds.push(format!("write -P {} {off} {sc}", i + 1)),
                1 => cmds.push(format!("write -z {off} {sc}")),
                _ => {}
            }
        }
        cmds.push(format!("write -P 0x33 {} {}", 2 * cs + sc / 2, 3 * sc));
        cmds.push(format!("write -z {} {}", 2 * cs + 5 * sc, 2 * sc));
        let ops = if cs > 64 << 10 { 80 } else { 160 };
        let mut w = Workload::new(size, cs).extended_l2().ops(ops);
        w.touch(cs, 2 * cs);
        cmds.extend(w.commands(&mut rng, &pats));
        qemu_io(d, &name, &cmds);
        verify(d, &name, rng.next_u64());
        let img = open(&d.join(&name));
        assert!(img.qcow2().unwrap().header().has_extended_l2());
        // The workload did leave partial clusters of every kind.
        let map = oxcow_map(&img);
        let partial = |f: &dyn Fn(&MapRun) -> bool| map.iter().any(|r| f(r) && r.len < cs);
        assert!(partial(&|r| r.data && r.depth == 0), "{name}: partial data");
        assert!(
            partial(&|r| r.zero && r.present && !r.data),
            "{name}: partial zero"
        );
        if backing {
            assert!(partial(&|r| r.depth == 1), "{name}: partial backing");
        }
    }
}

#[test]
fn extended_l2_16k() {
    extended_l2(16 << 10, 11);
}

#[test]
fn extended_l2_64k() {
    extended_l2(64 << 10, 12);
}

#[test]
fn extended_l2_2m() {
    extended_l2(2 * MIB, 13);
}

/// lazy_refcounts, and images left with the dirty bit: by a qemu-io killed with
/// SIGKILL after its writes, and by patching the header bit.
#[test]
fn lazy_refcounts_and_dirty_bit() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(21);
    let pats = pattern_files(d, &mut rng, 2);
    let size = 16 * MIB;

    create_qcow2(d, "lazy.qcow2", "lazy_refcounts=on", "16M");
    let cmds = Workload::new(size, 65536).commands(&mut rng, &pats);
    qemu_io(d, "lazy.qcow2", &cmds);
    verify(d, "lazy.qcow2", 1);
    assert!(open(&d.join("lazy.qcow2"))
        .qcow2()
        .unwrap()
        .header()
        .lazy_refcounts());

    // Killed with its lazy refcounts unwritten: the dirty bit stays set.
    create_qcow2(
        d,
        "killed.qcow2",
        "lazy_refcounts=on,cluster_size=4096",
        "16M",
    );
    // (One process, so no compressed writes: see `common::qemu_io_with`.)
    let mut cmds = Workload::new(size, 4096)
        .no_compression()
        .commands(&mut rng, &pats);
    // Flushed (so that the image is consistent) but never closed.
    cmds.push("flush".into());
    cmds.push("sigraise 9".into());
    let out = std::process::Command::new("qemu-io")
        .current_dir(d)
        .args(cmds.iter().flat_map(|c| ["-c", c.as_str()]))
        .arg("killed.qcow2")
        .output()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9)
    );
    assert_eq!(read_be64(&d.join("killed.qcow2"), 72) & 1, 1, "dirty bit");
    assert!(open(&d.join("killed.qcow2"))
        .qcow2()
        .unwrap()
        .header()
        .is_dirty());
    verify(d, "killed.qcow2", 2);

    // The dirty bit set by hand on an image without lazy refcounts.
    create_qcow2(d, "patched.qcow2", "", "16M");
    qemu_io(
        d,
        "patched.qcow2",
        &Workload::new(size, 65536).commands(&mut rng, &pats),
    );
    let p = d.join("patched.qcow2");
    patch_be64(&p, 72, read_be64(&p, 72) | 1);
    assert!(open(&p).qcow2().unwrap().header().is_dirty());
    verify(d, "patched.qcow2", 3);
}

/// Every preallocation mode, then writes, zero writes and discards on top.
#[test]
fn preallocation_modes() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(31);
    let pats = pattern_files(d, &mut rng, 2);
    let size = 16 * MIB;
    let cases = [
        ("off", "cluster_size=65536"),
        ("metadata", "cluster_size=65536"),
        ("falloc", "cluster_size=65536"),
        ("full", "cluster_size=65536"),
        ("metadata", "cluster_size=4096"),
        ("full", "cluster_size=4096"),
        ("metadata", "compat=0.10,cluster_size=65536"),
        ("metadata", "extended_l2=on,cluster_size=65536"),
        ("falloc", "extended_l2=on,cluster_size=32768"),
    ];
    for (i, (mode, opts)) in cases.into_iter().enumerate() {
        let name = format!("prealloc-{mode}-{i}.qcow2");
        create_qcow2(d, &name, &format!("preallocation={mode},{opts}"), "16M");
        // Untouched first: allocated everywhere, reading zeros.
        verify(d, &name, rng.next_u64());
        let cs = open(&d.join(&name)).qcow2().unwrap().cluster_size();
        let mut w = Workload::new(size, cs).no_compression();
        if opts.contains("extended_l2") {
            w = w.extended_l2();
        }
        qemu_io(d, &name, &w.commands(&mut rng, &pats));
        verify(d, &name, rng.next_u64());
    }
}

/// A raw source with varied content: random, repeating, zero, and text-like runs.
fn mixed_source(dir: &Path, name: &str, size: u64, rng: &mut Rng) {
    let mut data = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < data.len() {
        let n = (rng.between(1, 300_000) as usize).min(data.len() - off);
        let piece = &mut data[off..off + n];
        match rng.below(4) {
            0 => rng.fill(piece),
            1 => piece.fill(rng.below(256) as u8),
            2 => {}
            _ => {
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
                }
            }
        }
        off += n;
    }
    std::fs::write(dir.join(name), data).unwrap();
}

/// zlib and zstd: `qemu-img convert -c` at every cluster size, then partial
/// overwrites of compressed clusters and `write -c` of more.
#[test]
fn compression_convert() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(41);
    let size = 6 * MIB + 4096;
    mixed_source(d, "src.raw", size, &mut rng);
    for ct in ["zlib", "zstd"] {
        for cs in [512u64, 4096, 65536, 2 * MIB] {
            let name = format!("conv-{ct}-{cs}.qcow2");
            let opts = format!("compression_type={ct},cluster_size={cs}");
            qemu_img(
                d,
                &[
                    "convert", "-c", "-O", "qcow2", "-o", &opts, "src.raw", &name,
                ],
            );
            let img = open(&d.join(&name));
            check_map(d, &name, &img);
            let want = std::fs::read(d.join("src.raw")).unwrap();
            let opts = OpenOptions::default();
            check_reads(&d.join(&name), &opts, &img, &want, &mut Rng::new(cs));
            // Partial overwrites (QEMU decompresses, then writes the cluster back
            // uncompressed) and zero writes over compressed clusters.
            let mut cmds = Vec::new();
            for _ in 0..20 {
                let off = rng.below(size - 8192);
                cmds.push(format!("write -P 0x5a {off} {}", rng.between(1, 8192)));
                let zo = rng.below(size / cs) * cs;
                cmds.push(format!("write -z {zo} {}", cs.min(size - zo)));
            }
            qemu_io(d, &name, &cmds);
            verify(d, &name, rng.next_u64());
        }
    }
}

/// `qemu-io write -c` on zstd images, over a backing file, with extended L2.
#[test]
fn compression_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(42);
    let pats = pattern_files(d, &mut rng, 3);
    let size = 16 * MIB;
    make_raw(d, "base.raw", size, &mut rng);
    let cases = [
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=4096",
        "compression_type=zlib,backing_file=base.raw,backing_fmt=raw",
        "compression_type=zstd,extended_l2=on,backing_file=base.raw,backing_fmt=raw",
        "compression_type=zlib,extended_l2=on,cluster_size=2M",
    ];
    for (i, opts) in cases.into_iter().enumerate() {
        let name = format!("io-{i}.qcow2");
        create_qcow2(d, &name, opts, "16M");
        let cs = open(&d.join(&name)).qcow2().unwrap().cluster_size();
        // Compressed writes first, into fresh clusters; then everything mixed.
        let mut w = Workload::new(size, cs);
        if opts.contains("extended_l2") {
            w = w.extended_l2();
        }
        let mut cmds = Vec::new();
        for c in 0..(size / cs).min(64) {
            if rng.percent(60) {
                let src = if rng.percent(60) {
                    format!("-s {}", rng.pick(&pats))
                } else {
                    format!("-P {}", rng.between(1, 255))
                };
                cmds.push(format!("write -c {src} {} {cs}", c * cs));
                w.touch(c * cs, cs);
            }
        }
        qemu_io(d, &name, &cmds);
        verify(d, &name, rng.next_u64());
        let img = open(&d.join(&name));
        let compressed = oxcow_map(&img).iter().filter(|r| r.compressed).count();
        assert!(compressed > 0, "{name}: no compressed cluster");
        qemu_io(d, &name, &w.commands(&mut rng, &pats));
        verify(d, &name, rng.next_u64());
    }
}

/// Backing chains three deep over a raw base, named relatively across directories;
/// each backing file shorter than its overlay (and, in the second chain, a top layer
/// shorter than its backing file).
#[test]
fn backing_chains() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(51);
    let pats = pattern_files(d, &mut rng, 3);
    std::fs::create_dir(d.join("base")).unwrap();
    std::fs::create_dir(d.join("mid")).unwrap();
    make_raw(d, "base/base.raw", 16 * MIB, &mut rng);
    let chains: [(&str, &str, u64, &str, u64); 2] = [
        ("mid/a.qcow2", "", 24 * MIB, "", 32 * MIB),
        (
            "mid/b.qcow2",
            "compat=0.10,cluster_size=4096,",
            24 * MIB,
            "extended_l2=on,cluster_size=32768,",
            12 * MIB,
        ),
    ];
    for (i, (mid, mid_opts, mid_size, top_opts, top_size)) in chains.into_iter().enumerate() {
        let mo = format!("{mid_opts}backing_file=../base/base.raw,backing_fmt=raw");
        create_qcow2(d, mid, &mo, &mid_size.to_string());
        let mcs = open(&d.join(mid)).qcow2().unwrap().cluster_size();
        qemu_io(
            d,
            mid,
            &Workload::new(mid_size, mcs).commands(&mut rng, &pats),
        );
        let top = format!("top{i}.qcow2");
        let to = format!("{top_opts}backing_file={mid},backing_fmt=qcow2");
        create_qcow2(d, &top, &to, &top_size.to_string());
        let tcs = open(&d.join(&top)).qcow2().unwrap().cluster_size();
        let mut w = Workload::new(top_size, tcs);
        if top_opts.contains("extended_l2") {
            w = w.extended_l2();
        }
        qemu_io(d, &top, &w.commands(&mut rng, &pats));

        verify(d, &top, rng.next_u64());
        verify(d, mid, rng.next_u64());
        let img = open(&d.join(&top));
        let b = img.backing_image().expect("backing opened");
        assert_eq!(b.filename(), d.join(mid).to_str().unwrap());
        let base = b.backing_image().expect("base opened");
        assert_eq!(base.format_name(), "raw");
        assert!(base.filename().ends_with("mid/../base/base.raw"));
        let depths: std::collections::BTreeSet<u32> =
            oxcow_map(&img).iter().map(|r| r.depth).collect();
        assert!(depths.len() >= 3, "chain {i}: depths {depths:?}");

        // Without the backing file: what QEMU reads with "backing": null.
        let json = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}},"backing":null}}"#
        );
        let opts = OpenOptions {
            no_backing: true,
            ..OpenOptions::default()
        };
        verify_opts(d, &top, &opts, &json, rng.next_u64());
    }
    verify(d, "base/base.raw", 5);
}

/// Raw backing files whose size is not a multiple of 512: QEMU rounds a raw image's
/// size up to whole sectors, and the overlay reads zeros past the file's end.
#[test]
fn odd_sized_raw_backing() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(55);
    let pats = pattern_files(d, &mut rng, 2);
    for (i, len) in [MIB + 1000, 3 * MIB - 1, 4096 + 1].into_iter().enumerate() {
        let base = format!("odd{i}.raw");
        std::fs::write(d.join(&base), rng.bytes(len as usize)).unwrap();
        verify(d, &base, rng.next_u64());
        let top = format!("over{i}.qcow2");
        let opts = format!("cluster_size=4096,backing_file={base},backing_fmt=raw");
        create_qcow2(d, &top, &opts, "4M");
        verify(d, &top, rng.next_u64());
        let mut w = Workload::new(4 * MIB, 4096).ops(40);
        qemu_io(d, &top, &w.commands(&mut rng, &pats));
        verify(d, &top, rng.next_u64());
    }
}

/// Images without a backing format extension (as old QEMU versions wrote them): the
/// backing file's format is probed, qcow2 or raw.
#[test]
fn backing_format_probed() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(57);
    let pats = pattern_files(d, &mut rng, 2);
    make_raw(d, "base.raw", 6 * MIB, &mut rng);
    create_qcow2(
        d,
        "mid.qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "8M",
    );
    create_qcow2(
        d,
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "8M",
    );
    for name in ["mid.qcow2", "top.qcow2"] {
        let mut w = Workload::new(8 * MIB, 65536).ops(40);
        qemu_io(d, name, &w.commands(&mut rng, &pats));
        // Rename the backing format extension to an unknown one, which is ignored.
        let p = d.join(name);
        let mut at = read_be32(&p, 100) as u64;
        while read_be32(&p, at) != 0xe279_2aca {
            assert_ne!(read_be32(&p, at), 0, "no backing format extension");
            at += 8 + (read_be32(&p, at + 4) as u64).div_ceil(8) * 8;
        }
        patch_be32(&p, at, 0x0bad_cafe);
    }
    let img = open(&d.join("top.qcow2"));
    assert!(img.qcow2().unwrap().meta().backing_format.is_none());
    let mid = img.backing_image().unwrap();
    assert_eq!(mid.format_name(), "qcow2");
    assert_eq!(mid.backing_image().unwrap().format_name(), "raw");
    verify(d, "top.qcow2", 1);
}

/// Random workloads on both layers of a two-layer qcow2 chain, several seeds.
#[test]
fn random_workloads_over_backing() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(61);
    let pats = pattern_files(d, &mut rng, 4);
    for seed in 0..4u64 {
        let mut r = Rng::new(1000 + seed);
        let cs = r.pick(&[4096u64, 65536]);
        let size = r.pick(&[8 * MIB, 20 * MIB]);
        let base = format!("base{seed}.qcow2");
        let top = format!("top{seed}.qcow2");
        create_qcow2(d, &base, &format!("cluster_size={cs}"), &size.to_string());
        qemu_io(
            d,
            &base,
            &Workload::new(size, cs).ops(200).commands(&mut r, &pats),
        );
        let topts = format!("backing_file={base},backing_fmt=qcow2");
        create_qcow2(d, &top, &topts, &size.to_string());
        let tcs = 65536;
        qemu_io(
            d,
            &top,
            &Workload::new(size, tcs).ops(200).commands(&mut r, &pats),
        );
        verify(d, &top, r.next_u64());
    }
}

/// External data files, with and without data_file_raw.
#[test]
fn external_data_file() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(71);
    let pats = pattern_files(d, &mut rng, 3);
    std::fs::create_dir(d.join("data")).unwrap();
    let size = 16 * MIB;
    make_raw(d, "base.raw", 12 * MIB, &mut rng);
    // QEMU opens a relative data file name from its current directory, not the
    // image's: absolute names keep these images readable from anywhere.
    let cases = [
        "data_file={D}/data/a.raw",
        "data_file={D}/data/b.raw,data_file_raw=on",
        "data_file={D}/c.raw,extended_l2=on,cluster_size=32768",
        "data_file={D}/d.raw,data_file_raw=on,cluster_size=4096",
        "data_file={D}/e.raw,preallocation=metadata",
        "data_file={D}/f.raw,extended_l2=on,preallocation=metadata",
        "data_file={D}/g.raw,backing_file=base.raw,backing_fmt=raw",
        "data_file={D}/h.raw,extended_l2=on,backing_file=base.raw,backing_fmt=raw",
    ];
    for (i, opts) in cases.into_iter().enumerate() {
        let name = format!("df{i}.qcow2");
        let opts = opts.replace("{D}", d.to_str().unwrap());
        create_qcow2(d, &name, &opts, "16M");
        verify(d, &name, rng.next_u64());
        let cs = open(&d.join(&name)).qcow2().unwrap().cluster_size();
        let mut w = Workload::new(size, cs).no_compression();
        if opts.contains("extended_l2") {
            w = w.extended_l2();
        }
        qemu_io(d, &name, &w.commands(&mut rng, &pats));
        verify(d, &name, rng.next_u64());
        let img = open(&d.join(&name));
        assert!(img.data_file_path().is_some());
        assert_eq!(
            img.qcow2().unwrap().header().data_file_raw(),
            opts.contains("data_file_raw=on")
        );
    }

    // A relative name: QEMU (and oxcow) look for it in the current directory, where
    // it is not, although it lies next to the image.
    create_qcow2(d, "rel.qcow2", "data_file=oxcow-rel-data.raw", "1M");
    assert!(d.join("oxcow-rel-data.raw").exists());
    let elsewhere = std::env::current_dir().unwrap();
    assert!(!elsewhere.join("oxcow-rel-data.raw").exists());
    let q = std::process::Command::new("qemu-img")
        .args(["map", d.join("rel.qcow2").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!q.status.success());
    let e = Image::open(d.join("rel.qcow2"), &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("oxcow-rel-data.raw"), "{e}");
}

/// Internal snapshots: the active state after writes that follow snapshots (clusters
/// shared with snapshots get copied on write), and after deleting one.
#[test]
fn internal_snapshots() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(81);
    let pats = pattern_files(d, &mut rng, 3);
    let size = 16 * MIB;
    let cases = [
        ("snap-v3.qcow2", ""),
        ("snap-v2.qcow2", "compat=0.10,cluster_size=4096"),
        ("snap-ext.qcow2", "extended_l2=on,cluster_size=65536"),
        ("snap-r64.qcow2", "refcount_bits=64,cluster_size=2M"),
    ];
    for (name, opts) in cases {
        create_qcow2(d, name, opts, "16M");
        let cs = open(&d.join(name)).qcow2().unwrap().cluster_size();
        let mut w = Workload::new(size, cs).ops(60);
        if opts.contains("extended_l2") {
            w = w.extended_l2();
        }
        for step in 0..4 {
            qemu_io(d, name, &w.commands(&mut rng, &pats));
            qemu_img(d, &["snapshot", "-c", &format!("s{step}"), name]);
        }
        qemu_io(d, name, &w.commands(&mut rng, &pats));
        verify(d, name, rng.next_u64());
        qemu_img(d, &["snapshot", "-d", "s1", name]);
        qemu_io(d, name, &w.commands(&mut rng, &pats));
        verify(d, name, rng.next_u64());
        let img = open(&d.join(name));
        let names: Vec<&str> = img
            .qcow2()
            .unwrap()
            .meta()
            .snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["s0", "s2", "s3"], "{name}");
    }
}

/// Persistent dirty bitmaps: enabled, disabled, and one left in use by a killed
/// qemu-io.
#[test]
fn persistent_bitmaps() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(91);
    let pats = pattern_files(d, &mut rng, 2);
    let size = 16 * MIB;
    let name = "bm.qcow2";
    create_qcow2(d, name, "", "16M");
    qemu_img(d, &["bitmap", "--add", name, "b1"]);
    qemu_img(d, &["bitmap", "--add", "-g", "4096", name, "b2"]);
    let mut w = Workload::new(size, 65536);
    qemu_io(d, name, &w.commands(&mut rng, &pats));
    qemu_img(d, &["bitmap", "--disable", name, "b1"]);
    qemu_io(d, name, &w.commands(&mut rng, &pats));
    verify(d, name, 1);
    let img = open(&d.join(name));
    let bms = &img.qcow2().unwrap().meta().bitmaps;
    let got: Vec<(&str, u64, bool)> = bms
        .iter()
        .map(|b| (b.name.as_str(), b.granularity(), b.auto()))
        .collect();
    assert_eq!(got, [("b1", 65536, false), ("b2", 4096, true)]);
    assert!(bms.iter().all(|b| !b.in_use()));

    // qemu-io killed while the bitmaps are loaded: they stay marked in use.
    // (One process, so no compressed writes: see `common::qemu_io_with`.)
    w.compressed = false;
    let mut cmds = w.commands(&mut rng, &pats);
    // Flushed (so that the image is consistent) but never closed.
    cmds.push("flush".into());
    cmds.push("sigraise 9".into());
    let st = std::process::Command::new("qemu-io")
        .current_dir(d)
        .args(cmds.iter().flat_map(|c| ["-c", c.as_str()]))
        .arg(name)
        .output()
        .unwrap()
        .status;
    assert!(!st.success());
    verify(d, name, 2);
    let img = open(&d.join(name));
    assert!(img
        .qcow2()
        .unwrap()
        .meta()
        .bitmaps
        .iter()
        .any(|b| b.in_use()));
}

/// One large sparse image (1 TiB, and 4 TiB with 2 MiB clusters), checked where QEMU's
/// map says something is and at random places.
#[test]
fn sparse_large_image() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(101);
    let d = &*Box::leak(Box::new(d.to_path_buf()));
    eprintln!("DIR {}", d.display());
    std::mem::forget(dir);
    let pats = pattern_files(d, &mut rng, 2);
    for (name, opts, size) in [
        ("big.qcow2", "", 1u64 << 40),
        ("bigger.qcow2", "cluster_size=2M,extended_l2=on", 4u64 << 40),
    ] {
        create_qcow2(d, name, opts, &size.to_string());
        let mut cmds = vec![
            format!("write -s {} 0 3M", pats[0]),
            format!("write -P 7 {} 1234567", size / 3 + 99),
            format!("write -z {} 64M", size / 2),
            format!("write -P 8 {} 70000", size / 2 + 5 * MIB),
            format!("write -c -s {} {} 2M", pats[1], size - 4 * MIB),
            format!("write -P 9 {} 1", size - 1),
        ];
        cmds.push(format!("discard {} 1M", MIB));
        qemu_io(d, name, &cmds);
        verify_sparse(d, name, rng.next_u64());
    }
}
