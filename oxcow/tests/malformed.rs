//! Malformed images: each made by qemu-img, then patched, and each refused with the
//! exact error (variant and key words) — never a panic, never a huge allocation. And a
//! fuzz-ish property: random byte flips in a small image's metadata never panic.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use common::*;
use counting_alloc::peak_alloc;
use oxcow::{block_status, BlockDevice, Error, Format, Image, OpenOptions};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

fn open_with(path: &Path, opts: &OpenOptions) -> oxcow::Result<Image> {
    Image::open(path, opts)
}

/// Opening must fail; the error is returned.
fn open_err(path: &Path) -> Error {
    match Image::open(path, &OpenOptions::default()) {
        Ok(img) => panic!("{} opened: {img:?}", path.display()),
        Err(e) => e,
    }
}

/// The image opens, but reading the whole of it fails; the error is returned.
fn read_err(path: &Path) -> Error {
    let img = open(path);
    let mut buf = vec![0u8; img.size() as usize];
    match img.read_at(&mut buf, 0) {
        Ok(()) => panic!("{}: the whole read succeeded", path.display()),
        Err(e) => e,
    }
}

/// The error of the block status walk over the whole image, which must fail too.
fn status_err(path: &Path) -> Error {
    let img = open(path);
    let size = img.size();
    let mut off = 0;
    while off < size {
        match block_status(&img, off, size - off) {
            Ok(s) => off += s.len,
            Err(e) => return e,
        }
    }
    panic!("{}: block status succeeded everywhere", path.display())
}

fn assert_msg(e: &Error, words: &[&str]) {
    let m = e.to_string();
    for w in words {
        assert!(m.contains(w), "error {e:?} ({m}) lacks {w:?}");
    }
}

fn bad_header(e: &Error, field: &str, words: &[&str]) {
    match e {
        Error::BadHeader { field: f, .. } if *f == field => assert_msg(e, words),
        _ => panic!("expected a bad {field} header, got {e:?} ({e})"),
    }
}

fn corrupt(e: &Error, words: &[&str]) {
    assert!(
        matches!(e, Error::Corrupt { .. }),
        "expected Corrupt: {e:?}"
    );
    assert_msg(e, words);
}

/// A fresh small image `name` in `dir`, made by qemu-img with `opts`.
fn image(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    create_qcow2(dir, name, opts, size)
}

/// Where the L2 entry of guest offset `guest` lies in the file (64 KiB clusters,
/// standard L2 entries, its L2 table allocated).
fn l2_entry_at(path: &Path, guest: u64) -> u64 {
    let cs = 1u64 << read_be32(path, 20);
    let l1 = read_be64(path, 40);
    let coverage = cs / 8 * cs;
    let l1e = read_be64(path, l1 + guest / coverage * 8);
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table for {guest:#x}");
    l2 + (guest % coverage) / cs * 8
}

/// The offset of the header extension `kind` (its 8-byte type/length header).
fn extension_at(path: &Path, kind: u32) -> Option<u64> {
    let mut at = read_be32(path, 100) as u64;
    loop {
        let t = read_be32(path, at);
        if t == 0 {
            return None;
        }
        if t == kind {
            return Some(at);
        }
        at += 8 + (read_be32(path, at + 4) as u64).div_ceil(8) * 8;
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

// ---------------------------------------------------------------------------------
// The header.
// ---------------------------------------------------------------------------------

#[test]
fn truncated_header() {
    let dir = tempdir();
    let p = image(dir.path(), "t.qcow2", "", "1M");
    let whole = std::fs::read(&p).unwrap();
    let cut = |n: usize| std::fs::write(&p, &whole[..n]).unwrap();
    cut(50);
    bad_header(&open_err(&p), "header", &["truncated", "50 bytes"]);
    // Long enough for a v2 header but not for v3's fields.
    cut(90);
    bad_header(&open_err(&p), "header", &["truncated v3 header"]);
    // The whole fixed header, but not up to header_length (112).
    cut(108);
    bad_header(
        &open_err(&p),
        "header",
        &["truncated", "ends inside the header"],
    );
    // Cluster 0 whole, but not the tables it points to.
    cut(65536);
    corrupt(&open_err(&p), &["past the end of the file"]);
    // Empty and 3-byte files are raw images.
    cut(0);
    assert_eq!(open(&p).format(), Format::Raw);
    cut(3);
    assert_eq!(open(&p).format(), Format::Raw);
}

#[test]
fn wrong_magic() {
    let dir = tempdir();
    let p = image(dir.path(), "m.qcow2", "", "1M");
    patch(&p, 0, b"QFI\xfc");
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    let e = open_with(&p, &opts).unwrap_err();
    assert!(matches!(e, Error::NotQcow2), "{e:?}");
    assert_msg(&e, &["not in qcow2 format"]);
    // Probed, it is a raw image of the file's size.
    let img = open(&p);
    assert_eq!(img.format(), Format::Raw);
    assert_eq!(img.size(), file_len(&p).div_ceil(512) * 512);
}

#[test]
fn version_4() {
    let dir = tempdir();
    let p = image(dir.path(), "v.qcow2", "", "1M");
    patch_be32(&p, 4, 4);
    let e = open_err(&p);
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert_msg(&e, &["Unsupported qcow2 version 4"]);
    for v in [0, 1, 5, u32::MAX] {
        patch_be32(&p, 4, v);
        assert_msg(&open_err(&p), &[&format!("version {v}")]);
    }
}

#[test]
fn l1_size_huge() {
    let dir = tempdir();
    let p = image(dir.path(), "l1.qcow2", "", "1M");
    // One entry over QEMU's 32 MiB cap.
    patch_be32(&p, 36, (32 << 20) / 8 + 1);
    let (e, peak) = peak_alloc(|| open_err(&p));
    bad_header(&e, "l1_size", &["too large"]);
    assert!(peak < 4 << 20, "refusing it allocated {peak} bytes");
    patch_be32(&p, 36, u32::MAX);
    bad_header(&open_err(&p), "l1_size", &["too large"]);
}

#[test]
fn l1_size_too_small() {
    let dir = tempdir();
    // 2 GiB with 64 KiB clusters: four L1 entries.
    let p = image(dir.path(), "l1s.qcow2", "", "2G");
    assert_eq!(read_be32(&p, 36), 4);
    patch_be32(&p, 36, 3);
    bad_header(&open_err(&p), "l1_size", &["too small", "2147483648"]);
    // Or the virtual size grown under the same L1.
    patch_be32(&p, 36, 4);
    patch_be64(&p, 24, 2 * 1024 * MIB + 1);
    bad_header(&open_err(&p), "l1_size", &["too small"]);
}

#[test]
fn l1_offset_misaligned() {
    let dir = tempdir();
    let p = image(dir.path(), "l1o.qcow2", "", "1M");
    let l1 = read_be64(&p, 40);
    patch_be64(&p, 40, l1 + 512);
    bad_header(&open_err(&p), "l1_table_offset", &["not aligned"]);
    patch_be64(&p, 40, 0);
    bad_header(&open_err(&p), "l1_table_offset", &["overlaps the header"]);
}

#[test]
fn backing_name_too_long() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("b.raw"), [0u8; 4096]).unwrap();
    let p = image(d, "bn.qcow2", "backing_file=b.raw,backing_fmt=raw", "1M");
    patch_be32(&p, 16, 1024);
    bad_header(&open_err(&p), "backing_file_size", &["longer than 1023"]);
    // Within the limit but past the first cluster.
    patch_be32(&p, 16, 1000);
    patch_be64(&p, 8, 65536 - 500);
    bad_header(
        &open_err(&p),
        "backing_file_offset",
        &["runs past the first cluster"],
    );
}

#[test]
fn header_length() {
    let dir = tempdir();
    let p = image(dir.path(), "hl.qcow2", "", "1M");
    patch_be32(&p, 100, 108);
    bad_header(&open_err(&p), "header_length", &["not a multiple of 8"]);
    patch_be32(&p, 100, 96);
    bad_header(&open_err(&p), "header_length", &["smaller than 104"]);
    patch_be32(&p, 100, 0);
    bad_header(&open_err(&p), "header_length", &["smaller than 104"]);
    patch_be32(&p, 100, 65536 + 8);
    bad_header(&open_err(&p), "header_length", &["past the first cluster"]);
}

#[test]
fn cluster_bits_out_of_range() {
    let dir = tempdir();
    let p = image(dir.path(), "cb.qcow2", "", "1M");
    for bits in [0, 8, 22, 64, u32::MAX] {
        patch_be32(&p, 20, bits);
        bad_header(&open_err(&p), "cluster_bits", &[&bits.to_string(), "9..21"]);
    }
}

#[test]
fn refcount_order_7() {
    let dir = tempdir();
    let p = image(dir.path(), "ro.qcow2", "", "1M");
    patch_be32(&p, 96, 7);
    bad_header(&open_err(&p), "refcount_order", &["7 is larger than 6"]);
}

#[test]
fn refcount_table_empty() {
    let dir = tempdir();
    let p = image(dir.path(), "rt.qcow2", "", "1M");
    patch_be32(&p, 56, 0);
    bad_header(&open_err(&p), "refcount_table_clusters", &["empty"]);
    patch_be32(&p, 56, 1);
    patch_be64(&p, 48, 0);
    bad_header(
        &open_err(&p),
        "refcount_table_offset",
        &["overlaps the header"],
    );
}

#[test]
fn too_many_snapshots() {
    let dir = tempdir();
    let d = dir.path();
    let p = image(d, "ts.qcow2", "", "1M");
    qemu_img(d, &["snapshot", "-c", "s", "ts.qcow2"]);
    patch_be32(&p, 60, 65537);
    bad_header(&open_err(&p), "nb_snapshots", &["65537", "65536"]);
    // Within the cap but more entries than the table holds.
    patch_be32(&p, 60, 65536);
    let (e, peak) = peak_alloc(|| open_err(&p));
    bad_header(&e, "snapshot table", &["truncated"]);
    assert!(peak < 4 << 20, "allocated {peak} bytes");
}

#[test]
fn snapshot_l1_too_large() {
    let dir = tempdir();
    let d = dir.path();
    let p = image(d, "sl.qcow2", "", "1M");
    qemu_img(d, &["snapshot", "-c", "s", "sl.qcow2"]);
    let table = read_be64(&p, 64);
    patch_be32(&p, table + 8, (32 << 20) / 8 + 1);
    bad_header(&open_err(&p), "snapshot table", &["too large"]);
    // The L1 table of a snapshot unaligned.
    patch_be32(&p, table + 8, 1);
    patch_be64(&p, table, read_be64(&p, table) + 8);
    bad_header(&open_err(&p), "snapshot table", &["unaligned"]);
}

#[test]
fn extension_past_cluster() {
    let dir = tempdir();
    let p = image(dir.path(), "ext.qcow2", "", "1M");
    // The first extension, right after the header.
    let at = read_be32(&p, 100) as u64;
    assert_ne!(read_be32(&p, at), 0);
    patch_be32(&p, at + 4, 65536);
    bad_header(&open_err(&p), "header extension", &["runs past"]);
    patch_be32(&p, at + 4, u32::MAX);
    bad_header(&open_err(&p), "header extension", &["runs past"]);
}

#[test]
fn unknown_incompatible_features() {
    let dir = tempdir();
    let p = image(dir.path(), "f.qcow2", "", "1M");
    // Rename the feature table's entry of bit 4 ("extended L2 entries") to a new
    // feature of bit 5, then set bits 5 and 6 (the latter unnamed).
    let table = extension_at(&p, 0x6803_f857).expect("feature name table");
    let len = read_be32(&p, table + 4) as u64;
    let entry = (0..len / 48)
        .map(|i| table + 8 + i * 48)
        .find(|&e| {
            let mut b = [0u8; 2];
            std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&p).unwrap(), &mut b, e)
                .unwrap();
            b == [0, 4]
        })
        .expect("entry of incompatible bit 4");
    let mut named = [0u8; 48];
    named[1] = 5;
    named[2..19].copy_from_slice(b"fancy new feature");
    patch(&p, entry, &named);
    let incompat = read_be64(&p, 72);
    patch_be64(&p, 72, incompat | 1 << 5);
    let e = open_err(&p);
    assert!(matches!(e, Error::UnknownFeatures(_)), "{e:?}");
    assert_msg(&e, &["fancy new feature"]);
    patch_be64(&p, 72, incompat | 1 << 5 | 1 << 6);
    let e = open_err(&p);
    assert_msg(
        &e,
        &["fancy new feature", "Unknown incompatible feature: 40"],
    );
    // Without a feature name table (a v3 header QEMU never wrote: no extensions).
    patch(&p, read_be32(&p, 100) as u64, &[0u8; 8]);
    patch_be64(&p, 72, incompat | 1 << 63);
    let e = open_err(&p);
    assert!(matches!(e, Error::UnknownFeatures(_)), "{e:?}");
    assert_msg(&e, &["Unknown incompatible feature: 8000000000000000"]);
}

#[test]
fn encryption_refused() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "luks.qcow2",
            "1M",
        ],
    );
    let e = open_err(&d.join("luks.qcow2"));
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert_msg(&e, &["Encrypted", "not supported yet"]);
    // The legacy AES method, set by hand.
    let p = image(d, "aes.qcow2", "", "1M");
    patch_be32(&p, 32, 1);
    assert_msg(&open_err(&p), &["Encrypted", "not supported yet"]);
    patch_be32(&p, 32, 3);
    bad_header(
        &open_err(&p),
        "crypt_method",
        &["unknown encryption method 3"],
    );
}

// ---------------------------------------------------------------------------------
// Tables and clusters: the image opens, reading the broken part fails.
// ---------------------------------------------------------------------------------

/// A 1 MiB image (64 KiB clusters) with data in its first cluster.
fn written(dir: &Path, name: &str, opts: &str, cmd: &str) -> PathBuf {
    let p = image(dir, name, opts, "1M");
    qemu_io(dir, name, &[cmd.to_string()]);
    p
}

#[test]
fn l2_offset_misaligned() {
    let dir = tempdir();
    let p = written(dir.path(), "l2m.qcow2", "", "write -P 1 0 4k");
    let l1 = read_be64(&p, 40);
    let e = read_be64(&p, l1);
    patch_be64(&p, l1, e + 512);
    let err = read_err(&p);
    corrupt(&err, &["L2 table offset", "unaligned", "L1 index: 0x0"]);
    corrupt(&status_err(&p), &["L2 table offset", "unaligned"]);
}

#[test]
fn l2_table_past_eof() {
    let dir = tempdir();
    let p = written(dir.path(), "l2e.qcow2", "", "write -P 1 0 4k");
    let l1 = read_be64(&p, 40);
    let past = file_len(&p).div_ceil(65536) * 65536 + 10 * 65536;
    patch_be64(&p, l1, past | 1 << 63);
    corrupt(&read_err(&p), &["L2 table", "past the end of the file"]);
    corrupt(&status_err(&p), &["L2 table", "past the end of the file"]);
}

#[test]
fn data_cluster_past_eof() {
    let dir = tempdir();
    let p = written(dir.path(), "dc.qcow2", "", "write -P 1 0 4k");
    let at = l2_entry_at(&p, 0);
    let past = file_len(&p).div_ceil(65536) * 65536 + 65536;
    patch_be64(&p, at, past | 1 << 63);
    corrupt(&read_err(&p), &["Data cluster", "past the end of the file"]);
    corrupt(
        &status_err(&p),
        &["Data cluster", "past the end of the file"],
    );
    // Unaligned data cluster.
    patch_be64(&p, at, (past - 65536 * 3 + 512) | 1 << 63);
    corrupt(&read_err(&p), &["unaligned"]);
}

/// A data cluster of an external data file must lie at its guest offset (QEMU
/// refuses any other since CVE-2024-4467): two swapped L2 entries are corrupt.
#[test]
fn data_file_offset_mismatch() {
    let dir = tempdir();
    let d = dir.path();
    for (name, opts) in [
        ("dfm.qcow2", "data_file={D}/dfm.raw"),
        ("dfx.qcow2", "data_file={D}/dfx.raw,extended_l2=on"),
    ] {
        let opts = opts.replace("{D}", d.to_str().unwrap());
        let p = image(d, name, &opts, "1M");
        qemu_io(
            d,
            name,
            &["write -P 1 0 64k".into(), "write -P 2 64k 64k".into()],
        );
        let es = if opts.contains("extended_l2") { 16 } else { 8 };
        let at = read_be64(&p, read_be64(&p, 40)) & 0x00ff_ffff_ffff_fe00;
        let (e0, e1) = (read_be64(&p, at), read_be64(&p, at + es));
        patch_be64(&p, at, e1);
        patch_be64(&p, at + es, e0);
        let words = [
            "External data file host cluster offset 0x10000",
            "guest cluster offset 0x0",
        ];
        corrupt(&read_err(&p), &words);
        corrupt(&status_err(&p), &words);
        // QEMU agrees.
        let q = std::process::Command::new("qemu-io")
            .current_dir(d)
            .args(["-r", "-c", "read 0 64k", name])
            .output()
            .unwrap();
        let out =
            String::from_utf8_lossy(&q.stderr).into_owned() + &String::from_utf8_lossy(&q.stdout);
        assert!(out.contains("does not match guest cluster offset"), "{out}");
    }
}

/// A 1 MiB image with one compressed cluster (random nibbles, so about half a
/// cluster of compressed bytes) at guest 0; returns it and the offset of its L2 entry.
fn compressed(dir: &Path, name: &str, ct: &str) -> (PathBuf, u64) {
    let mut rng = Rng::new(7);
    let pat: Vec<u8> = rng.bytes(65536).iter().map(|b| b & 0x0f).collect();
    std::fs::write(dir.join("nibbles"), pat).unwrap();
    let p = written(
        dir,
        name,
        &format!("compression_type={ct}"),
        "write -c -s nibbles 0 64k",
    );
    let at = l2_entry_at(&p, 0);
    assert_ne!(read_be64(&p, at) & 1 << 62, 0, "not compressed");
    (p, at)
}

#[test]
fn compressed_cluster_past_eof() {
    let dir = tempdir();
    let (p, at) = compressed(dir.path(), "cp.qcow2", "zlib");
    let e = read_be64(&p, at);
    // 64 KiB clusters: the offset takes bits 0..53, the sector count bits 54..61.
    let off = e & ((1 << 54) - 1);
    let sectors = (e >> 54) & 0xff;
    assert!(sectors > 1);
    patch_be64(&p, at, 1 << 62 | 0xff << 54 | off);
    corrupt(
        &read_err(&p),
        &["Compressed cluster", "past the end of the file"],
    );
    corrupt(&status_err(&p), &["Compressed cluster", "past the end"]);
    // Its offset itself past the end.
    patch_be64(&p, at, 1 << 62 | sectors << 54 | (file_len(&p) + 4096));
    corrupt(
        &read_err(&p),
        &["Compressed cluster", "past the end of the file"],
    );
}

#[test]
fn compressed_stream_short() {
    for ct in ["zlib", "zstd"] {
        let dir = tempdir();
        let (p, at) = compressed(dir.path(), "cs.qcow2", ct);
        let e = read_be64(&p, at);
        let off = e & ((1 << 54) - 1);
        // Only the first sector of the stream: it inflates to less than a cluster.
        patch_be64(&p, at, 1 << 62 | off);
        let err = read_err(&p);
        assert!(matches!(err, Error::Decompress { .. }), "{ct}: {err:?}");
        assert_msg(
            &err,
            &[
                "Could not decompress",
                &format!("{off:#x}"),
                "of 65536 bytes",
            ],
        );
        // The whole stream, garbled.
        patch_be64(&p, at, e);
        patch(&p, off, &[0xff; 64]);
        let err = read_err(&p);
        assert!(matches!(err, Error::Decompress { .. }), "{ct}: {err:?}");
        let codec = if ct == "zlib" { "deflate" } else { "zstd" };
        assert_msg(&err, &["Could not decompress", codec]);
        // A read of part of the cluster fails the same way.
        let img = open(&p);
        assert!(matches!(
            img.read_at(&mut [0u8; 10], 100),
            Err(Error::Decompress { .. })
        ));
    }
}

#[test]
fn compressed_stream_longer_than_cluster() {
    // A stream that inflates to more than a cluster: the extra bytes are refused?
    // QEMU only asks for one cluster of output and ignores the rest, as does oxcow.
    let dir = tempdir();
    let (p, at) = compressed(dir.path(), "cl.qcow2", "zlib");
    let e = read_be64(&p, at);
    let off = e & ((1 << 54) - 1);
    // Replace the stream by one of two clusters of zeros (a few hundred bytes).
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut enc, &vec![0u8; 131072]).unwrap();
    let z = enc.finish().unwrap();
    patch(&p, off, &z);
    patch_be64(&p, at, 1 << 62 | off);
    let mut buf = vec![1u8; 65536];
    open(&p).read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let json = qemu_raw(dir.path(), "cl.qcow2");
    assert_eq!(&json[..65536], &buf[..]);
}

// ---------------------------------------------------------------------------------
// Backing chains.
// ---------------------------------------------------------------------------------

#[test]
fn backing_loop() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ],
    );
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    );
    let e = open_err(&d.join("a.qcow2"));
    assert!(matches!(e, Error::Backing(_)), "{e:?}");
    assert_msg(&e, &["loop", "a.qcow2"]);
    // An image that is its own backing file, named another way.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "./self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
            "1M",
        ],
    );
    assert_msg(&open_err(&d.join("self.qcow2")), &["loop", "self.qcow2"]);
    // A symlink loop of files is a loop too.
    std::os::unix::fs::symlink(d.join("a.qcow2"), d.join("link.qcow2")).unwrap();
    assert_msg(&open_err(&d.join("link.qcow2")), &["loop"]);
}

/// `n` images, `c000.qcow2` on top of `c001.qcow2` ... on top of `base.qcow2`,
/// made from one qemu-img template with the backing name patched.
fn chain(d: &Path, n: usize) {
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "XXXXXXXXXX",
            "-F",
            "qcow2",
            "tpl.qcow2",
            "1M",
        ],
    );
    let tpl = std::fs::read(d.join("tpl.qcow2")).unwrap();
    let name_at = u64::from_be_bytes(tpl[8..16].try_into().unwrap()) as usize;
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for i in 0..n {
        let mut img = tpl.clone();
        let next = if i + 1 == n {
            "base.qcow2".to_string()
        } else {
            format!("c{:03}.qcow2", i + 1)
        };
        assert_eq!(next.len(), 10);
        img[name_at..name_at + 10].copy_from_slice(next.as_bytes());
        std::fs::write(d.join(format!("c{i:03}.qcow2")), img).unwrap();
    }
}

#[test]
fn backing_chain_depth_cap() {
    let dir = tempdir();
    let d = dir.path();
    chain(d, 300);
    // 300 images below c000, plus the base: refused by the cap of 256.
    let e = open_err(&d.join("c000.qcow2"));
    assert!(matches!(e, Error::Backing(_)), "{e:?}");
    assert_msg(&e, &["deeper than 256"]);
    // c045 has 255 images below it (c046..c299 and the base): 256 in all, accepted,
    // and readable through every layer.
    let img = open(&d.join("c045.qcow2"));
    let mut depth = 0;
    let mut layer: &dyn BlockDevice = &img;
    while let Some(b) = layer.backing() {
        layer = b;
        depth += 1;
    }
    assert_eq!(depth, 255);
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(block_status(&img, 0, 4096).unwrap().depth, 255);
    assert_msg(&open_err(&d.join("c044.qcow2")), &["deeper than 256"]);
    // A lower cap.
    let opts = OpenOptions {
        max_chain_depth: 10,
        ..OpenOptions::default()
    };
    assert!(open_with(&d.join("c291.qcow2"), &opts).is_ok());
    assert_msg(
        &open_with(&d.join("c290.qcow2"), &opts).unwrap_err(),
        &["deeper than 10"],
    );
}

#[test]
fn protocol_backing_names_refused() {
    let dir = tempdir();
    let d = dir.path();
    for (name, proto) in [
        (
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}"#,
            "json",
        ),
        ("nbd://localhost:10809/x", "nbd"),
        ("http://localhost/disk.img", "http"),
        ("ssh://localhost/disk.img", "ssh"),
    ] {
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", "p.qcow2", "1M",
            ],
        );
        let e = open_err(&d.join("p.qcow2"));
        assert!(matches!(e, Error::Backing(_)), "{name}: {e:?}");
        assert_msg(&e, &[&format!("protocol '{proto}'"), "backing file"]);
        // Without the backing file, the image itself opens.
        let opts = OpenOptions {
            no_backing: true,
            ..OpenOptions::default()
        };
        assert!(open_with(&d.join("p.qcow2"), &opts).is_ok());
    }
    // A plain file: prefix is a local file.
    std::fs::write(d.join("b.raw"), vec![5u8; 1 << 20]).unwrap();
    let b = format!("file:{}", d.join("b.raw").display());
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", &b, "-F", "raw", "f.qcow2", "1M",
        ],
    );
    let mut buf = [0u8; 16];
    open(&d.join("f.qcow2")).read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [5u8; 16]);
}

#[test]
fn missing_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "m.qcow2",
            "1M",
        ],
    );
    let e = open_err(&d.join("m.qcow2"));
    assert!(matches!(e, Error::Backing(_)), "{e:?}");
    assert_msg(
        &e,
        &["Could not open backing file", "gone.qcow2", "No such file"],
    );
}

// ---------------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------------

#[test]
fn one_pib_virtual_size() {
    let dir = tempdir();
    let d = dir.path();
    for (name, opts, max_alloc) in [
        // A 64 KiB L1 table, a 2 MiB cluster 0.
        ("p2m.qcow2", "cluster_size=2M", 8 * MIB),
        // A 16 MiB L1 table: read whole, as QEMU does, and nothing else sized by the
        // disk (its bytes are not held whole beside the decoded table).
        ("p64k.qcow2", "", 24 * MIB),
    ] {
        let p = image(d, name, opts, "1P");
        qemu_io(
            d,
            name,
            &[format!("write -P 9 {} 4096", (1u64 << 50) - 4096)],
        );
        // No allocation proportional to the claimed size (speed is measured by
        // benchmarks, not asserted here).
        let (img, peak) = peak_alloc(|| open(&p));
        assert!(
            peak < max_alloc as usize,
            "{name}: open allocated {peak} bytes"
        );
        assert_eq!(img.size(), 1 << 50);
        let (_, peak) = peak_alloc(|| {
            let mut buf = vec![0u8; 8192];
            img.read_at(&mut buf, (1 << 50) - 8192).unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert!(buf[4096..].iter().all(|&b| b == 9));
            img.read_at(&mut buf, 1 << 49).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        });
        assert!(
            peak < 8 * MIB as usize,
            "{name}: reading allocated {peak} bytes"
        );
        // The block status walk of the whole disk ends, with the data at the end.
        let runs = oxcow_map(&img);
        let last = runs.last().unwrap();
        assert!(last.data && last.start + last.len == 1 << 50);
    }
}

/// A virtual size whose L1 table would be larger than the file: refused at open,
/// before reading or allocating the table.
#[test]
fn l1_table_past_eof() {
    let dir = tempdir();
    let p = image(dir.path(), "lp.qcow2", "", "1M");
    // 1 PiB needs 2^21 L1 entries (16 MiB) in a file of a few hundred KiB.
    patch_be64(&p, 24, 1 << 50);
    patch_be32(&p, 36, 1 << 21);
    let (e, peak) = peak_alloc(|| open_err(&p));
    corrupt(&e, &["L1 table", "past the end of the file"]);
    assert!(peak < 4 * MIB as usize, "allocated {peak} bytes");
}

// ---------------------------------------------------------------------------------
// Fuzz-ish: random corruption of a small image's metadata never panics.
// ---------------------------------------------------------------------------------

/// A small image that uses most of the format, and the byte ranges of its file that
/// hold metadata (where flips are aimed).
struct FuzzSeed {
    bytes: Vec<u8>,
    hot: Vec<(u64, u64)>,
}

fn fuzz_seed(d: &Path, name: &'static str, opts: &str, cs: u64) -> FuzzSeed {
    let size = (256u64 << 10).max(64 * cs);
    let p = image(d, name, opts, &size.to_string());
    let mut rng = Rng::new(cs);
    let pats = pattern_files(d, &mut rng, 2);
    // Random workloads in the first half, compressed clusters kept in the second.
    let mut w = Workload::new(size / 2, cs).ops(20);
    if opts.contains("extended_l2") {
        w = w.extended_l2();
    }
    let mut cmds: Vec<String> = (0..6)
        .map(|i| format!("write -c -s pat1 {} {cs}", size / 2 + i * 3 * cs))
        .collect();
    cmds.extend(w.commands(&mut rng, &pats));
    qemu_io(d, name, &cmds);
    qemu_img(d, &["snapshot", "-c", "snap1", name]);
    qemu_io(d, name, &w.commands(&mut rng, &pats));
    qemu_img(d, &["snapshot", "-c", "snap2", name]);
    if !opts.contains("compat=0.10") {
        qemu_img(d, &["bitmap", "--add", name, "bm"]);
    }
    qemu_io(d, name, &w.commands(&mut rng, &pats));
    // Still readable as made.
    let img = open(&p);
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(oxcow_map(&img).iter().any(|r| r.compressed), "{name}");

    let bytes = std::fs::read(&p).unwrap();
    let be64 =
        |at: u64| u64::from_be_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap());
    let be32 =
        |at: u64| u32::from_be_bytes(bytes[at as usize..at as usize + 4].try_into().unwrap());
    // The first clusters (header, extensions, backing name, refcount structures, L1,
    // the first L2 tables), then every L2 table, the snapshot table and the
    // snapshots' L1 tables.
    let mut hot = vec![(0, cs.min(1024)), (0, 16 * cs)];
    let (l1, l1_size) = (be64(40), be32(36) as u64);
    hot.push((l1, l1_size * 8));
    for i in 0..l1_size {
        let l2 = be64(l1 + i * 8) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 {
            hot.push((l2, cs));
        }
    }
    let snaps = be64(64);
    hot.push((snaps, 512));
    let mut at = snaps;
    for _ in 0..be32(60) {
        hot.push((be64(at), be32(at + 8) as u64 * 8));
        let extra = be32(at + 36) as u64;
        let (id, nm) = (
            u16::from_be_bytes(
                bytes[at as usize + 12..at as usize + 14]
                    .try_into()
                    .unwrap(),
            ),
            u16::from_be_bytes(
                bytes[at as usize + 14..at as usize + 16]
                    .try_into()
                    .unwrap(),
            ),
        );
        at += (40 + extra + id as u64 + nm as u64).div_ceil(8) * 8;
    }
    hot.retain(|&(a, n)| n > 0 && a + n <= bytes.len() as u64);
    FuzzSeed { bytes, hot }
}

/// What became of one corrupted image.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    opened: bool,
    read_errors: usize,
    status_errors: usize,
}

/// Opens the image at `p` and uses all of it, bounded: reads (the first 4 MiB and the
/// last 64 KiB, in chunks) and block status (at most 20000 runs). Errors are fine.
fn exercise(p: &Path) -> Outcome {
    let mut out = Outcome::default();
    let Ok(img) = Image::open(p, &OpenOptions::default()) else {
        return out;
    };
    out.opened = true;
    let size = img.size();
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < size.min(4 * MIB) {
        let n = (size - off).min(65536);
        out.read_errors += img.read_at(&mut buf[..n as usize], off).is_err() as usize;
        off += n;
    }
    if size > 4 * MIB {
        let n = 65536.min(size);
        let _ = img.read_at(&mut buf[..n as usize], size - n);
        let _ = img.read_at(&mut buf[..1], size / 2);
    }
    let _ = img.read_at(&mut buf[..1], size);
    let mut off = 0;
    for _ in 0..20000 {
        if off >= size {
            break;
        }
        match block_status(&img, off, size - off) {
            Ok(s) => {
                assert!(s.len > 0 && s.len <= size - off, "{s:?}");
                off += s.len;
            }
            Err(_) => {
                out.status_errors += 1;
                off += 512;
            }
        }
    }
    out
}

#[test]
fn random_corruption_never_panics() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), common::Rng::new(1).bytes(300 << 10)).unwrap();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    );
    let seeds = [
        fuzz_seed(
            d,
            "small.qcow2",
            "cluster_size=512,backing_file=mid.qcow2,backing_fmt=qcow2",
            512,
        ),
        fuzz_seed(
            d,
            "ext.qcow2",
            "cluster_size=16384,extended_l2=on,compression_type=zstd,backing_file=base.raw,backing_fmt=raw",
            16384,
        ),
        fuzz_seed(d, "v2.qcow2", "compat=0.10,cluster_size=4096", 4096),
    ];
    let target = d.join("fuzz.qcow2");
    // One flip: (which hot range, where in it, how: xor a byte / set a big-endian
    // u32 / set a u64 to a small or a random value, the value).
    let flip = (any::<u32>(), any::<u32>(), 0u8..5, any::<u64>());
    let strategy = (0..seeds.len(), proptest::collection::vec(flip, 1..6));
    // OXCOW_FUZZ_CASES=n runs more (or fewer) cases.
    let cases = std::env::var("OXCOW_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(600);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let stats = std::cell::RefCell::new(Vec::new());
    runner
        .run(&strategy, |(s, flips)| {
            let seed = &seeds[s];
            let mut b = seed.bytes.clone();
            for (range, pos, how, v) in flips {
                // A quarter of the flips hit the header and its extensions.
                let (start, len) = match range % 4 {
                    0 => seed.hot[0],
                    _ => seed.hot[(range / 4) as usize % seed.hot.len()],
                };
                let at = (start + pos as u64 % len) as usize;
                match how {
                    0 => b[at] ^= (v as u8).max(1),
                    1 => b[at] = v as u8,
                    2 if at + 4 <= b.len() => {
                        let at = at & !3;
                        b[at..at + 4].copy_from_slice(&(v as u32).to_be_bytes())
                    }
                    3 if at + 8 <= b.len() => {
                        // A small value: offsets, sizes and counts that stay plausible.
                        let at = at & !7;
                        b[at..at + 8].copy_from_slice(&(v % (1 << 20)).to_be_bytes())
                    }
                    _ if at + 8 <= b.len() => {
                        let at = at & !7;
                        b[at..at + 8].copy_from_slice(&v.to_be_bytes())
                    }
                    _ => {}
                }
            }
            std::fs::write(&target, &b).unwrap();
            stats.borrow_mut().push(exercise(&target));
            Ok(())
        })
        .unwrap();
    // The corruption must not be so crude that every image is refused at open, nor
    // so mild that nothing ever fails to read.
    let stats = stats.into_inner();
    let n = stats.len();
    let opened = stats.iter().filter(|o| o.opened).count();
    let read_failed = stats.iter().filter(|o| o.read_errors > 0).count();
    let status_failed = stats.iter().filter(|o| o.status_errors > 0).count();
    eprintln!("{n} cases: {opened} opened, {read_failed} with read errors, {status_failed} with block status errors");
    assert!(opened * 4 > n, "only {opened} of {n} opened");
    assert!(
        read_failed * 50 > n,
        "only {read_failed} of {n} failed to read"
    );
    assert!(
        status_failed * 50 > n,
        "only {status_failed} of {n} failed block status"
    );
}
