//! `convert`, `compare` and `dd` against qemu-img 10 as the oracle: images made by
//! qemu-img and qemu-io are converted by both tools and must give the same bytes; the
//! same command lines must give the same stdout, stderr and exit code. oxcow runs
//! through a symlink named `qemu-img`, so its messages carry the same program name.
//! Every test is skipped (with a note) when qemu-img is not installed.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use support::{have_qemu, Scratch as Dir, Setup};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup::default())
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// Bytes allocated on disk for a file.
    fn allocated(&self, name: &str) -> u64 {
        std::fs::metadata(self.path(name)).unwrap().blocks() * 512
    }

    /// Converts `src` to raw with both tools (extra options first) and checks the
    /// results are byte-identical and the progress output the same.
    fn convert_both(&self, extra: &[&str], srcs: &[&str]) {
        let mut q = vec!["convert", "-p"];
        q.extend_from_slice(extra);
        q.extend_from_slice(srcs);
        let mut x = q.clone();
        q.push("q.out");
        x.push("x.out");
        let qo = self.run(Path::new("qemu-img"), &q);
        assert!(qo.status.success(), "qemu-img {q:?}: {qo:?}");
        let xo = self.oxcow(&x);
        assert!(xo.status.success(), "oxcow {x:?}: {xo:?}");
        assert_eq!(
            String::from_utf8_lossy(&xo.stdout),
            String::from_utf8_lossy(&qo.stdout),
            "progress of {x:?}"
        );
        let (a, b) = (self.read("q.out"), self.read("x.out"));
        assert_eq!(a.len(), b.len(), "output size of {srcs:?}");
        assert!(a == b, "output bytes of {srcs:?} {extra:?}");
        // Same sparseness, give or take file system rounding.
        let (qa, xa) = (self.allocated("q.out"), self.allocated("x.out"));
        assert!(
            xa <= qa + 64 * 1024,
            "{srcs:?} {extra:?}: oxcow allocated {xa}, qemu-img {qa}"
        );
    }
}

/// Writes a few kinds of data (patterns, explicit zeros, a discard) into `img`.
fn workload(d: &Dir, img: &str, fmt: &str) {
    d.qemu_io(
        img,
        fmt,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 96k 8k",
            "write -P 0 200k 64k",
            "write -z 512k 128k",
            "write -P 0x33 1M 1M",
            "write -P 0x44 2500k 1k",
            "discard 1536k 64k",
            "write -P 0x55 4095k 1k",
        ],
    );
}

#[test]
fn convert_matches_qemu_on_many_layouts() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    // Plain qcow2 and the same data compressed with zlib and zstd.
    d.qemu_img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "4M"]);
    workload(&d, "plain.qcow2", "qcow2");
    d.qemu_img(&["convert", "-c", "-O", "qcow2", "plain.qcow2", "zlib.qcow2"]);
    d.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "plain.qcow2",
        "zstd.qcow2",
    ]);
    // Compressed writes by qemu-io, mixed with normal ones.
    d.qemu_img(&["create", "-q", "-f", "qcow2", "cw.qcow2", "4M"]);
    d.qemu_io(
        "cw.qcow2",
        "qcow2",
        &[
            "write -c -P 0x61 0 64k",
            "write -P 0x62 64k 64k",
            "write -c -P 0x63 1M 128k",
            "write -z 2M 64k",
        ],
    );
    // Extended L2 entries: subcluster writes.
    d.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "el2.qcow2",
        "4M",
    ]);
    d.qemu_io(
        "el2.qcow2",
        "qcow2",
        &[
            "write -P 0x71 4k 4k",
            "write -P 0x72 66k 2k",
            "write -z 128k 32k",
            "write -P 0x73 1M 200k",
        ],
    );
    // Backing chain over a raw base.
    d.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    d.qemu_io("base.raw", "raw", &["write -P 0x81 0 3M"]);
    d.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "over.qcow2",
        "5M",
    ]);
    d.qemu_io(
        "over.qcow2",
        "qcow2",
        &[
            "write -P 0x82 1M 64k",
            "write -z 2M 64k",
            "write -P 0x83 4600k 4k",
        ],
    );
    // External data files, plain and raw.
    d.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.data",
        "df.qcow2",
        "4M",
    ]);
    workload(&d, "df.qcow2", "qcow2");
    d.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=dfr.data,data_file_raw=on",
        "dfr.qcow2",
        "4M",
    ]);
    workload(&d, "dfr.qcow2", "qcow2");
    // Small and large clusters.
    for (name, cs) in [("c512.qcow2", "512"), ("c2m.qcow2", "2M")] {
        let opt = format!("cluster_size={cs}");
        d.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, name, "6M"]);
        workload(&d, name, "qcow2");
    }
    // A raw file whose size is not a multiple of 512.
    std::fs::write(d.path("odd.raw"), vec![0x5au8; 1000]).unwrap();

    for img in [
        "plain.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "cw.qcow2",
        "el2.qcow2",
        "over.qcow2",
        "df.qcow2",
        "dfr.qcow2",
        "c512.qcow2",
        "c2m.qcow2",
        "odd.raw",
        "base.raw",
    ] {
        d.convert_both(&["-O", "raw"], &[img]);
    }
    // Options that change what is written.
    d.convert_both(&["-S", "64k"], &["plain.qcow2"]);
    d.convert_both(&["-S", "0"], &["plain.qcow2"]);
    d.convert_both(&["-m", "1", "-W"], &["zstd.qcow2"]);
    d.convert_both(&["-f", "raw"], &["plain.qcow2"]);
    // Several sources are concatenated.
    d.convert_both(&[], &["plain.qcow2", "odd.raw", "el2.qcow2"]);
}

#[test]
fn convert_output_is_sparse() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "16G"]);
    d.qemu_io(
        "big.qcow2",
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 8G 1M",
            "write -P 3 16383M 1M",
        ],
    );
    // Holes are skipped, not read and written (bench/convert_raw.sh times it).
    let o = d.oxcow(&["convert", "-O", "raw", "big.qcow2", "big.raw"]);
    assert!(o.status.success(), "{o:?}");
    let len = std::fs::metadata(d.path("big.raw")).unwrap().len();
    assert_eq!(len, 16 << 30);
    let alloc = d.allocated("big.raw");
    assert!(
        alloc <= 4 << 20,
        "allocated {alloc} bytes for 3 MiB of data"
    );
    // -S 0 allocates everything.
    d.qemu_img(&["create", "-q", "-f", "qcow2", "small.qcow2", "8M"]);
    d.qemu_io("small.qcow2", "qcow2", &["write -P 1 0 64k"]);
    let o = d.oxcow(&["convert", "-S", "0", "-O", "raw", "small.qcow2", "full.raw"]);
    assert!(o.status.success(), "{o:?}");
    assert!(d.allocated("full.raw") >= 8 << 20);
    // Zero data inside allocated clusters is not written either.
    d.qemu_io("small.qcow2", "qcow2", &["write -P 0 1M 1M"]);
    let o = d.oxcow(&["convert", "-O", "raw", "small.qcow2", "s.raw"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        d.allocated("s.raw") <= 128 << 10,
        "{}",
        d.allocated("s.raw")
    );
}

#[test]
fn convert_into_existing_target() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "z.qcow2", "4M"]);
    d.qemu_io(
        "z.qcow2",
        "qcow2",
        &["write -P 1 0 4k", "write -z 64k 64k", "write -P 7 131584 1"],
    );
    for (flags, name) in [(&["-n"][..], "n"), (&["-n", "--target-is-zero"][..], "tz")] {
        let mut outs = Vec::new();
        for who in ["q", "x"] {
            let out = format!("{name}-{who}.raw");
            std::fs::write(d.path(&out), vec![0xffu8; 6 << 20]).unwrap();
            let mut args = vec!["convert"];
            args.extend_from_slice(flags);
            args.extend_from_slice(&["-O", "raw", "z.qcow2", &out]);
            let o = if who == "q" {
                d.run(Path::new("qemu-img"), &args)
            } else {
                d.oxcow(&args)
            };
            assert!(o.status.success(), "{args:?}: {o:?}");
            outs.push(d.read(&out));
        }
        assert!(outs[0] == outs[1], "{flags:?}");
    }
    std::fs::write(d.path("small.raw"), vec![0u8; 1 << 20]).unwrap();
    d.same_as_qemu_img(&["convert", "-n", "-O", "raw", "z.qcow2", "small.raw"]);
    d.same_as_qemu_img(&["convert", "-n", "-O", "raw", "z.qcow2", "missing.raw"]);
}

#[test]
fn convert_messages_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    d.qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        "orphan.qcow2",
        "1M",
    ]);
    for args in [
        &["convert"][..],
        &["convert", "a.qcow2"],
        &["convert", "-O", "raw", "nonexist.qcow2", "o.raw"],
        &["convert", "-O", "raw", "orphan.qcow2", "o.raw"],
        &["convert", "-f", "bogus", "a.qcow2", "o.raw"],
        &["convert", "-O", "bogus", "a.qcow2", "o.raw"],
        &["convert", "-S", "1000", "a.qcow2", "o.raw"],
        &["convert", "-S", "abc", "a.qcow2", "o.raw"],
        &["convert", "-S", "-1", "a.qcow2", "o.raw"],
        &["convert", "-m", "0", "a.qcow2", "o.raw"],
        &["convert", "-m", "abc", "a.qcow2", "o.raw"],
        &["convert", "-r", "abc", "a.qcow2", "o.raw"],
        &["convert", "-t", "bogus", "a.qcow2", "o.raw"],
        &["convert", "-T", "bogus", "a.qcow2", "o.raw"],
        &["convert", "-c", "-O", "raw", "a.qcow2", "o.raw"],
        &["convert", "-B", "a.qcow2", "a.qcow2", "o.raw"],
        &["convert", "-o", "bogus=1", "a.qcow2", "o.raw"],
        &["convert", "-o", ",x", "a.qcow2", "o.raw"],
        &["convert", "-n", "-o", "size=1M", "a.qcow2", "o.raw"],
        &["convert", "--target-is-zero", "a.qcow2", "o.raw"],
        &["convert", "-O", "raw", "a.qcow2", "/nonexistent-dir/o.raw"],
        &["convert", "-x", "a.qcow2", "o.raw"],
        &["convert", "--bogus", "a.qcow2", "o.raw"],
        &["convert", "--target", "a.qcow2", "o.raw"],
        &["convert", "-O"],
        &["convert", "-O", "raw", "-o", "help"],
        &["convert", "--help"],
        &["convert", "-q", "-p", "a.qcow2", "o.raw"],
    ] {
        d.same_as_qemu_img(args);
    }
    // Formats qemu-img writes but oxcow does not yet: a clear error.
    let o = d.oxcow(&["convert", "-O", "vmdk", "a.qcow2", "o.vmdk"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'vmdk' is not supported yet"), "{err}");
}

#[test]
fn compare_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    d.qemu_io(
        "a.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 1M"],
    );
    d.qemu_img(&["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    d.qemu_img(&["convert", "-c", "-O", "qcow2", "a.qcow2", "ac.qcow2"]);
    d.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
    d.qemu_io(
        "b.qcow2",
        "qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 1M",
            "write -P 3 100001 1",
        ],
    );
    d.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "8M"]);
    d.qemu_io(
        "big.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 1M"],
    );
    d.qemu_img(&["create", "-q", "-f", "qcow2", "bigd.qcow2", "8M"]);
    d.qemu_io(
        "bigd.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 1M", "write -P 3 6M 512"],
    );
    d.qemu_img(&["create", "-q", "-f", "qcow2", "e.qcow2", "4M"]);
    for args in [
        &["compare", "a.qcow2", "a.qcow2"][..],
        &["compare", "a.qcow2", "a.raw"],
        &["compare", "-p", "a.qcow2", "a.raw"],
        &["compare", "a.qcow2", "ac.qcow2"],
        &["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
        &["compare", "a.qcow2", "b.qcow2"],
        &["compare", "-p", "a.qcow2", "b.qcow2"],
        &["compare", "-q", "a.qcow2", "b.qcow2"],
        &["compare", "-s", "a.qcow2", "b.qcow2"],
        &["compare", "-s", "a.qcow2", "a.raw"],
        &["compare", "a.qcow2", "big.qcow2"],
        &["compare", "-p", "big.qcow2", "a.qcow2"],
        &["compare", "-s", "a.qcow2", "big.qcow2"],
        &["compare", "bigd.qcow2", "a.qcow2"],
        &["compare", "a.raw", "bigd.qcow2"],
        &["compare", "a.qcow2", "e.qcow2"],
        &["compare", "-f", "raw", "a.qcow2", "a.raw"],
        &["compare", "-F", "qcow2", "a.qcow2", "a.raw"],
        &["compare", "a.qcow2", "nonexist.qcow2"],
        &["compare", "-f", "bogus", "a.qcow2", "a.raw"],
        &["compare", "-T", "bogus", "a.qcow2", "a.raw"],
        &["compare", "a.qcow2"],
        &["compare", "-x", "a", "b"],
        &["compare", "--image-opts", "-f", "raw", "a", "b"],
        &["compare", "--help"],
    ] {
        d.same_as_qemu_img(args);
    }
}

#[test]
fn dd_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "p.qcow2", "4M"]);
    d.qemu_io(
        "p.qcow2",
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 2M 64k",
            "write -c -P 3 3M 64k",
        ],
    );
    let cases: &[&[&str]] = &[
        &[],
        &["bs=1M", "count=2"],
        &["bs=1M", "count=2", "skip=10"],
        &["bs=1000", "count=3"],
        &["bs=1k", "count=3", "skip=1"],
        &["bs=1M", "skip=4"],
        &["bs=1", "count=7", "skip=3"],
        &["count=0x10", "bs=1M", "bs=512"],
        &["bs=64k", "skip=20"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let (q, x) = (format!("q{i}.raw"), format!("x{i}.raw"));
        let mut qa = vec![
            "dd".to_string(),
            "if=p.qcow2".to_string(),
            format!("of={q}"),
        ];
        qa.extend(extra.iter().map(|s| s.to_string()));
        let mut xa = qa.clone();
        xa[2] = format!("of={x}");
        let qa: Vec<&str> = qa.iter().map(|s| s.as_str()).collect();
        let xa: Vec<&str> = xa.iter().map(|s| s.as_str()).collect();
        let qo = d.run(Path::new("qemu-img"), &qa);
        let xo = d.oxcow(&xa);
        assert_eq!(xo.status.code(), qo.status.code(), "{extra:?}");
        assert_eq!(
            String::from_utf8_lossy(&xo.stderr),
            String::from_utf8_lossy(&qo.stderr),
            "{extra:?}"
        );
        assert!(d.read(&q) == d.read(&x), "{extra:?}");
    }
    for args in [
        &["dd", "if=p.qcow2", "of=o", "bs=0"][..],
        &["dd", "if=p.qcow2", "of=o", "bs=3G"],
        &["dd", "if=p.qcow2", "of=o", "bs=abc"],
        &["dd", "if=p.qcow2", "of=o", "count=-1"],
        &["dd", "if=p.qcow2", "of=o", "count=1k"],
        &["dd", "if=p.qcow2", "of=o", "skip=abc"],
        &["dd", "if=p.qcow2"],
        &["dd"],
        &["dd", "if=p.qcow2", "of=o", "osize=1M"],
        &["dd", "if=p.qcow2", "of=o", "garbage"],
        &["dd", "if=nonexist", "of=o"],
        &["dd", "-f", "bogus", "if=p.qcow2", "of=o"],
        &["dd", "-O", "bogus", "if=p.qcow2", "of=o"],
        &["dd", "if=p.qcow2", "of=/nonexistent-dir/o"],
        &["dd", "-p", "if=p.qcow2", "of=o"],
        &["dd", "--help"],
    ] {
        d.same_as_qemu_img(args);
    }
}

#[test]
fn read_errors_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.qemu_img(&["create", "-q", "-f", "qcow2", "cc.qcow2", "1M"]);
    d.qemu_io(
        "cc.qcow2",
        "qcow2",
        &[
            "write -c -P 0x41 0 64k",
            "write -c -P 0x42 64k 64k",
            "write -P 0x43 512k 64k",
        ],
    );
    // Break the first compressed cluster: find it through L1[0] and L2[0] (64 KiB
    // clusters: the host offset is the low 54 bits of the entry).
    let mut bytes = d.read("cc.qcow2");
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(l2);
    assert!(entry & (1 << 62) != 0, "cluster 0 is compressed");
    let start = (entry & ((1 << 54) - 1)) as usize + 5;
    bytes[start..start + 8].fill(0xff);
    std::fs::write(d.path("bad.qcow2"), &bytes).unwrap();
    for args in [
        &["convert", "-O", "raw", "bad.qcow2", "o.raw"][..],
        &["convert", "-p", "-O", "raw", "bad.qcow2", "o.raw"],
        &[
            "convert",
            "-p",
            "-m",
            "1",
            "-O",
            "raw",
            "bad.qcow2",
            "o.raw",
        ],
        &["compare", "bad.qcow2", "cc.qcow2"],
        &["dd", "if=bad.qcow2", "of=o.raw"],
    ] {
        d.same_as_qemu_img(args);
    }
}
