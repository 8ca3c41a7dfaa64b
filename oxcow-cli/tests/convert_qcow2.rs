//! `convert -O qcow2` against qemu-img 10 as the oracle: raw and qcow2 sources (with a
//! backing chain, zero clusters, compressed clusters, a size that ends inside a
//! cluster) converted by both tools with the qcow2 creation options, compression
//! (zlib, zstd), a backing file for the target, an existing target (`-n`).
//!
//! Every result must pass `qemu-img check` (no errors, no leaks), read the same as
//! the source and as qemu-img's own result (`qemu-img compare`), and have the same
//! cluster size, compression type and backing file in `qemu-img info`. Without
//! compression, oxcow's file is byte for byte qemu-img's (both write in guest order);
//! compressed streams differ (another deflate and zstd), but oxcow's bytes do not
//! depend on `-m`. oxcow runs through a symlink named `qemu-img`, so its messages
//! carry the same program name. Every test is skipped (with a note) when qemu-img is
//! not installed.

mod support;

use support::{have_qemu, Scratch as Dir, Setup};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup::default())
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn exists(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    /// `qemu-img check`: exit code 0 (no corruption, no leak).
    fn check(&self, img: &str) {
        let o = self.qemu(&["check", img]);
        assert!(
            o.status.success(),
            "qemu-img check {img}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `qemu-img compare`: the two images read the same.
    fn identical(&self, a: &str, b: &str) {
        let o = self.qemu(&["compare", a, b]);
        assert!(
            o.status.success(),
            "qemu-img compare {a} {b}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The lines of `qemu-img info` that name the cluster size, the compression type
    /// and the backing file.
    fn info_lines(&self, img: &str) -> Vec<String> {
        let o = self.qemu(&["info", img]);
        assert!(o.status.success(), "qemu-img info {img}: {o:?}");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| {
                l.starts_with("cluster_size:")
                    || l.starts_with("backing file")
                    || l.contains("compression type:")
                    || l.contains("compat:")
                    || l.contains("extended l2:")
                    || l.contains("refcount bits:")
                    || l.contains("lazy refcounts:")
            })
            .map(str::to_string)
            .collect()
    }

    /// Converts `src` with both tools (`extra` options first) to `q.qcow2` and
    /// `x.qcow2`; checks oxcow's result as the module says. `same_bytes`: the files
    /// must be identical too.
    fn convert_both(&self, extra: &[&str], src: &str, same_bytes: bool) {
        let mut q = vec!["convert", "-O", "qcow2"];
        q.extend_from_slice(extra);
        q.push(src);
        let mut x = q.clone();
        q.push("q.qcow2");
        x.push("x.qcow2");
        let qo = self.qemu(&q);
        assert!(qo.status.success(), "qemu-img {q:?}: {qo:?}");
        let xo = self.oxcow(&x);
        assert!(xo.status.success(), "oxcow {x:?}: {xo:?}");
        assert_eq!(
            String::from_utf8_lossy(&xo.stdout),
            String::from_utf8_lossy(&qo.stdout),
            "stdout of {x:?}"
        );
        self.check("x.qcow2");
        self.identical(src, "x.qcow2");
        self.identical("q.qcow2", "x.qcow2");
        assert_eq!(
            self.info_lines("x.qcow2"),
            self.info_lines("q.qcow2"),
            "info of {x:?}"
        );
        if same_bytes {
            assert!(
                self.read("x.qcow2") == self.read("q.qcow2"),
                "{x:?}: not the bytes qemu-img writes"
            );
        }
    }
}

/// Deterministic bytes that do not compress (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text that compresses well, with a run of zeros every 96 KiB.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut n = 0u64;
    while out.len() < len {
        if out.len() % (96 << 10) < 64 && out.len() > 64 {
            out.extend(std::iter::repeat_n(0u8, 8192));
        }
        out.extend_from_slice(
            format!("{n:08} the quick brown fox jumps over the lazy dog\n").as_bytes(),
        );
        n += 1;
    }
    out.truncate(len);
    out
}

/// The sources: `base.qcow2` (8 MiB), `top.qcow2` over it (9 MiB + 5 KiB: the disk
/// ends inside a cluster) with data, zeros, a compressed cluster and a discarded
/// one, and `flat.raw`, top's content as a raw file.
fn sources(d: &Dir) {
    d.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    d.qemu_io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 3M 64k",
            "write -P 0x13 6M 1M",
        ],
    );
    d.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "9221k",
    ]);
    d.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x21 512k 128k",
            "write -z 2M 64k",
            "write -P 0 4M 64k",
            "write -c -P 0x22 5M 64k",
            "write -P 0x23 6400k 3k",
            "discard 6M 64k",
            "write -P 0x24 8M 1029k",
        ],
    );
    // Some incompressible and some compressible data too.
    let mut payload = noise(192 << 10, 7);
    payload.extend(text(256 << 10));
    std::fs::write(d.path("payload.raw"), &payload).unwrap();
    d.qemu_io("top.qcow2", "qcow2", &["write -s payload.raw 1088k 448k"]);
    d.qemu_img(&["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
}

#[test]
fn qcow2_targets_read_like_qemus() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    sources(&d);
    // (options, oxcow writes qemu-img's very bytes)
    let cases: &[(&[&str], bool)] = &[
        (&[], true),
        (&["-c"], false),
        (&["-c", "-o", "compression_type=zstd"], false),
        (&["-o", "extended_l2=on"], true),
        (&["-c", "-o", "extended_l2=on"], false),
        (&["-o", "compat=0.10"], true),
        (&["-c", "-o", "compat=0.10"], false),
        (&["-o", "cluster_size=512"], false),
        (&["-c", "-o", "cluster_size=512"], false),
        (&["-o", "cluster_size=2M"], true),
        (
            &["-c", "-o", "cluster_size=2M,compression_type=zstd"],
            false,
        ),
        (&["-B", "base.qcow2", "-F", "qcow2"], true),
        (&["-c", "-B", "base.qcow2", "-F", "qcow2"], false),
        (&["-S", "0"], true),
        (&["-S", "64k"], true),
        (&["-o", "lazy_refcounts=on,refcount_bits=8"], true),
        (&["-o", "preallocation=metadata"], true),
        (&["-t", "writeback", "-T", "none"], true),
    ];
    for src in ["top.qcow2", "flat.raw"] {
        for (extra, same_bytes) in cases {
            d.convert_both(extra, src, *same_bytes);
        }
    }
    // Several sources make one disk.
    d.convert_both(&[], "base.qcow2", true);
    let q = d.qemu(&[
        "convert",
        "-O",
        "qcow2",
        "-c",
        "top.qcow2",
        "flat.raw",
        "q.qcow2",
    ]);
    assert!(q.status.success());
    let x = d.oxcow(&[
        "convert",
        "-O",
        "qcow2",
        "-c",
        "top.qcow2",
        "flat.raw",
        "x.qcow2",
    ]);
    assert!(x.status.success(), "{x:?}");
    d.check("x.qcow2");
    d.identical("q.qcow2", "x.qcow2");
}

#[test]
fn backing_file_of_the_target() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    sources(&d);
    // Only what the source holds above its backing file is copied: the result is
    // qemu-img's, and reads as the source through the backing file.
    d.convert_both(&["-B", "base.qcow2", "-F", "qcow2"], "top.qcow2", true);
    let map = |img: &str| d.qemu(&["map", "--output=json", img]).stdout;
    assert_eq!(map("x.qcow2"), map("q.qcow2"));
    // A source without a backing file is copied whole (qemu-img 10 does not compare
    // it with the new backing file): data, and zero clusters where it reads zeros.
    d.convert_both(&["-B", "base.qcow2", "-F", "qcow2"], "flat.raw", true);
    assert_eq!(map("x.qcow2"), map("q.qcow2"));
    // A backing file shorter than the disk: zeros past its end are left alone.
    d.qemu_img(&["create", "-q", "-f", "qcow2", "short.qcow2", "2M"]);
    d.qemu_io("short.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    d.convert_both(&["-B", "short.qcow2", "-F", "qcow2"], "flat.raw", true);
    d.qemu_img(&["convert", "-O", "raw", "short.qcow2", "short.raw"]);
    d.convert_both(&["-c", "-B", "short.raw", "-F", "raw"], "flat.raw", false);
    // (qemu-img takes the target's backing file to hold what the source's holds: a
    // source with a backing file of its own is copied above it.)
    // -o backing_file= too, and -B winning over it.
    d.convert_both(
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
        "top.qcow2",
        true,
    );
    d.convert_both(
        &[
            "-o",
            "backing_file=short.qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        "top.qcow2",
        true,
    );
}

#[test]
fn parallelism_does_not_change_the_bytes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    // 24 MiB: noise, text, zeros in 1 MiB stripes.
    let mut raw = Vec::new();
    for i in 0..24u64 {
        match i % 3 {
            0 => raw.extend(noise(1 << 20, i + 1)),
            1 => raw.extend(text(1 << 20)),
            _ => raw.extend(std::iter::repeat_n(0u8, 1 << 20)),
        }
    }
    std::fs::write(d.path("big.raw"), &raw).unwrap();
    d.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "big.raw",
        "big.qcow2",
    ]);
    let cases: &[&[&str]] = &[
        &[],
        &["-c"],
        &["-c", "-o", "compression_type=zstd"],
        &["-c", "-o", "cluster_size=4k"],
        &["-o", "cluster_size=4k"],
    ];
    for src in ["big.raw", "big.qcow2"] {
        for extra in cases {
            let mut first: Option<Vec<u8>> = None;
            for m in ["1", "2", "4", "16"] {
                let mut args = vec!["convert", "-O", "qcow2", "-m", m];
                args.extend_from_slice(extra);
                args.extend_from_slice(&[src, "x.qcow2"]);
                let o = d.oxcow(&args);
                assert!(o.status.success(), "{args:?}: {o:?}");
                let bytes = d.read("x.qcow2");
                match &first {
                    None => {
                        d.check("x.qcow2");
                        d.identical(src, "x.qcow2");
                        first = Some(bytes);
                    }
                    Some(f) => assert!(*f == bytes, "{args:?}: other bytes than with -m 1"),
                }
            }
        }
    }
    // Compressed output no bigger than qemu-img's, give or take 5%.
    for ct in ["zlib", "zstd"] {
        let opt = format!("compression_type={ct}");
        let q = d.qemu(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opt,
            "big.qcow2",
            "q.qcow2",
        ]);
        assert!(q.status.success());
        let x = d.oxcow(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opt,
            "big.qcow2",
            "x.qcow2",
        ]);
        assert!(x.status.success());
        let (qs, xs) = (d.read("q.qcow2").len(), d.read("x.qcow2").len());
        assert!(
            xs * 100 <= qs * 105,
            "{ct}: oxcow {xs} bytes, qemu-img {qs}"
        );
    }
    // Out-of-order writes: another layout, the same disk.
    for extra in [&[][..], &["-c"][..]] {
        let mut args = vec!["convert", "-O", "qcow2", "-W", "-m", "4"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["big.qcow2", "w.qcow2"]);
        let o = d.oxcow(&args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        d.check("w.qcow2");
        d.identical("big.raw", "w.qcow2");
    }
}

#[test]
fn existing_targets() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    sources(&d);
    // A larger target full of old data, part of it discarded.
    let old = |name: &str| {
        d.qemu_img(&["create", "-q", "-f", "qcow2", name, "12M"]);
        d.qemu_io(name, "qcow2", &["write -P 0x99 0 12M", "discard 2M 1M"]);
    };
    let cases: &[&[&str]] = &[
        &[],
        &["--target-is-zero"],
        &["-S", "0"],
        &["-B", "base.qcow2"],
        &["-p"],
        // Compression cannot overwrite allocated clusters: both fail alike.
        &["-c"],
    ];
    for src in ["top.qcow2", "flat.raw"] {
        for extra in cases {
            old("q.qcow2");
            old("x.qcow2");
            let mut args = vec!["convert", "-n", "-O", "qcow2"];
            args.extend_from_slice(extra);
            args.push(src);
            let mut q = args.clone();
            q.push("q.qcow2");
            args.push("x.qcow2");
            let qo = d.qemu(&q);
            let xo = d.oxcow(&args);
            assert_eq!(xo.status.code(), qo.status.code(), "{args:?}");
            assert_eq!(
                String::from_utf8_lossy(&xo.stderr),
                String::from_utf8_lossy(&qo.stderr),
                "{args:?}"
            );
            assert_eq!(xo.stdout, qo.stdout, "{args:?}");
            d.check("x.qcow2");
            d.identical("q.qcow2", "x.qcow2");
            assert!(
                d.read("x.qcow2") == d.read("q.qcow2"),
                "{args:?}: not the bytes qemu-img writes"
            );
        }
    }
    // A fresh, empty target of the same size.
    d.qemu_img(&["create", "-q", "-f", "qcow2", "e.qcow2", "9221k"]);
    let o = d.oxcow(&["convert", "-n", "-O", "qcow2", "-c", "top.qcow2", "e.qcow2"]);
    assert!(o.status.success(), "{o:?}");
    d.check("e.qcow2");
    d.identical("top.qcow2", "e.qcow2");
}

#[test]
fn messages_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    sources(&d);
    d.qemu_img(&["create", "-q", "-f", "qcow2", "t4.qcow2", "4M"]);
    let cases: &[&[&str]] = &[
        &["-o", "bogus=1"],
        &["-o", "compat=0.11"],
        &["-o", "cluster_size=1000"],
        &["-o", "cluster_size=abc"],
        &["-o", "refcount_bits=3"],
        &["-o", "refcount_bits=abc"],
        &["-o", "lazy_refcounts=maybe"],
        &["-o", "extended_l2=on,cluster_size=4k"],
        &["-o", "compression_type=lz4"],
        &["-o", "compat=0.10,compression_type=zstd"],
        &["-o", "compat=0.10,lazy_refcounts=on"],
        &["-o", "data_file_raw=on"],
        &["-o", "preallocation=bogus"],
        &["-o", "backing_file=base.qcow2"],
        &["-B", "base.qcow2"],
        &["-F", "qcow2"],
        &["-B", "nonexist.qcow2", "-F", "qcow2"],
        &["-B", "base.qcow2", "-F", "bogus"],
        &["-c", "-o", "preallocation=metadata"],
        &["-c", "-o", "encryption=on"],
        &["-t", "bogus"],
        &["-n"],
        &["-n", "--target-is-zero", "-B", "base.qcow2"],
        &["-o", "help"],
        &["-q", "-p"],
    ];
    for extra in cases {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["top.qcow2", "o.qcow2"]);
        let _ = std::fs::remove_file(d.path("o.qcow2"));
        let _ = d.qemu(&args);
        let q_left = d.exists("o.qcow2");
        let _ = std::fs::remove_file(d.path("o.qcow2"));
        d.same_as_qemu_img(&args);
        assert_eq!(d.exists("o.qcow2"), q_left, "{args:?}: target left behind");
    }
    for args in [
        &["convert", "-O", "qcow2", "-o", "help"][..],
        &["convert", "-O", "qcow2", "-n", "top.qcow2", "t4.qcow2"],
        &["convert", "-O", "qcow2", "top.qcow2", "top.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "flat.raw",
            "o.qcow2",
        ],
        &["convert", "-O", "qcow2", "--bitmaps", "flat.raw", "o.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "top.qcow2",
            "/nonexistent-dir/o.qcow2",
        ],
    ] {
        d.same_as_qemu_img(args);
    }
    // A failing check deletes the image file and the data file qemu-img created.
    std::fs::write(d.path("o.data"), b"old").unwrap();
    d.same_as_qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "data_file=o.data,compat=0.10",
        "top.qcow2",
        "o.qcow2",
    ]);
    assert!(!d.exists("o.data") && !d.exists("o.qcow2"));
    // Compression into an image with an external data file fails at the first write.
    d.same_as_qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "data_file=o.data",
        "top.qcow2",
        "o.qcow2",
    ]);
}

#[test]
fn progress_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    sources(&d);
    for extra in [
        &[][..],
        &["-c"],
        &["-S", "0"],
        &["-B", "base.qcow2", "-F", "qcow2"],
        &["-c", "-o", "cluster_size=2M"],
    ] {
        for src in ["top.qcow2", "flat.raw"] {
            let mut args = vec!["convert", "-p", "-O", "qcow2"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[src, "o.qcow2"]);
            d.same_as_qemu_img(&args);
        }
    }
}
