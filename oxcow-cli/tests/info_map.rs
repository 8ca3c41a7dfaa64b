//! `info` and `map` against qemu-img 10 as the oracle. Images are made by qemu-img and
//! qemu-io across a matrix of qcow2 options (compat, cluster size, refcount width,
//! extended L2, lazy refcounts, preallocation, compression, backing chains with a raw
//! base, external data files, snapshots, bitmaps, dirty and corrupt flags) and raw
//! images; then the same command lines must give the same stdout, stderr and exit code
//! from both tools. JSON output is also compared as parsed JSON, to name the first
//! differing member. oxcow runs through a symlink named `qemu-img`, so its messages
//! carry the same program name. Every test is skipped (with a note) when qemu-img is
//! not installed.
//!
//! Nothing is excluded from the comparison: sizes on disk (`disk size`,
//! `actual-size`) and snapshot dates are read by both tools from the same files in the
//! same environment (TZ=UTC), one right after the other.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use support::{assert_same_output, have_qemu_and_io as have_qemu, text, Scratch as Dir, Setup};

/// The tools run with UTC dates and the C locale.
const TOOL_ENV: &[(&str, &str)] = &[("TZ", "UTC"), ("LC_ALL", "C")];

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            run_env: TOOL_ENV,
            sh_env: TOOL_ENV,
            sh_prelude: "ulimit -c 0\n",
            ..Setup::default()
        })
    }

    /// Flushes the page cache so that both tools see the same file extents.
    fn sync(&self) {
        let _ = Command::new("sync").status();
    }

    /// Runs `qemu-img ARGS` and `oxcow ARGS` and requires the same stdout, stderr and
    /// exit code. Returns qemu-img's stdout.
    fn same(&self, args: &[&str]) -> String {
        let q = self.run(Path::new("qemu-img"), args);
        let o = self.run(&self.ox, args);
        let (qs, os) = (text(&q.stdout), text(&o.stdout));
        if args.contains(&"--output=json") && q.status.success() && args[0] == "info" {
            let qv: Value = serde_json::from_str(&qs).expect("qemu-img JSON");
            let ov: Value = serde_json::from_str(&os)
                .unwrap_or_else(|e| panic!("oxcow {args:?}: not JSON ({e}):\n{os}"));
            assert_json_eq(args, &qv, &ov);
        }
        assert_same_output(&format!("{args:?}"), &o, &q);
        qs
    }

    /// Every info and map view of one image.
    fn check_image(&self, name: &str) {
        self.same(&["info", name]);
        self.same(&["info", "--output=json", name]);
        self.same(&["info", "--backing-chain", name]);
        self.same(&["info", "--backing-chain", "--output=json", name]);
        self.same(&["map", "--output=json", name]);
        self.same(&["map", name]);
    }
}

/// Compares parsed JSON, naming the path of the first difference.
fn assert_json_eq(args: &[&str], q: &Value, o: &Value) {
    fn walk(path: &str, q: &Value, o: &Value) -> Option<String> {
        match (q, o) {
            (Value::Object(a), Value::Object(b)) => {
                for k in a.keys().chain(b.keys()) {
                    match (a.get(k), b.get(k)) {
                        (Some(x), Some(y)) => {
                            if let Some(d) = walk(&format!("{path}.{k}"), x, y) {
                                return Some(d);
                            }
                        }
                        (x, y) => return Some(format!("{path}.{k}: qemu {x:?}, oxcow {y:?}")),
                    }
                }
                None
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
                .iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| walk(&format!("{path}[{i}]"), x, y)),
            _ if q == o => None,
            _ => Some(format!("{path}: qemu {q}, oxcow {o}")),
        }
    }
    if let Some(d) = walk("", q, o) {
        panic!("JSON of {args:?} differs at {d}");
    }
}

/// Creates a qcow2 image with `opts` and runs qemu-io commands on it.
fn qcow2(d: &Dir, name: &str, opts: &str, size: &str, cmds: &[&str]) {
    let o = if opts.is_empty() {
        String::new()
    } else {
        format!("-o {opts}")
    };
    let mut script = format!("qemu-img create -q -f qcow2 {o} {name} {size}\n");
    if !cmds.is_empty() {
        script.push_str("qemu-io");
        for c in cmds {
            script.push_str(&format!(" -c '{c}'"));
        }
        script.push_str(&format!(" {name} >/dev/null\n"));
    }
    d.sh(&script);
}

/// Writes that leave data, zero clusters, partial clusters and discarded ranges.
const MIXED: &[&str] = &[
    "write -P 1 0 64k",
    "write -P 2 1000 3000",
    "write -P 3 1M 192k",
    "write -z 2M 64k",
    "write -P 4 3M 64k",
    "discard 3M 64k",
    "write -P 5 5M 4k",
    "write -P 0 6M 64k",
];

#[test]
fn qcow2_option_matrix() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let mut names = Vec::new();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("v3.qcow2", "compat=1.1"),
        ("c512.qcow2", "cluster_size=512"),
        ("c4k.qcow2", "cluster_size=4k"),
        ("c64k.qcow2", "cluster_size=64k"),
        ("c2m.qcow2", "cluster_size=2M"),
        ("rc1.qcow2", "refcount_bits=1"),
        ("rc16.qcow2", "refcount_bits=16"),
        ("rc64.qcow2", "refcount_bits=64"),
        (
            "rc64v2.qcow2",
            "compat=0.10,refcount_bits=16,cluster_size=4k",
        ),
        ("el2.qcow2", "extended_l2=on"),
        ("el2c2m.qcow2", "extended_l2=on,cluster_size=2M"),
        (
            "el2c16k.qcow2",
            "extended_l2=on,cluster_size=16k,refcount_bits=64",
        ),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        qcow2(&d, name, opts, "8M", MIXED);
        names.push(name);
    }
    // Subclusters: partial writes leave allocated clusters with unallocated and zero
    // subclusters.
    qcow2(
        &d,
        "sub.qcow2",
        "extended_l2=on",
        "1M",
        &[
            "write -P 1 0 4k",
            "write -P 2 10k 1k",
            "write -z 64k 2k",
            "write -z 130k 4k",
        ],
    );
    names.push("sub.qcow2");
    // Compressed clusters (human map stops at the first one with an error).
    for (name, ty) in [("zlib-c.qcow2", "zlib"), ("zstd-c.qcow2", "zstd")] {
        qcow2(
            &d,
            name,
            &format!("compression_type={ty}"),
            "4M",
            &[
                "write -P 1 0 64k",
                "write -c -P 2 64k 64k",
                "write -c -P 3 128k 64k",
                "write -c 1M 64k",
                "write -P 4 2M 64k",
            ],
        );
        names.push(name);
    }
    // Every preallocation mode.
    for mode in ["off", "metadata", "falloc", "full"] {
        let name = format!("prealloc-{mode}.qcow2");
        qcow2(
            &d,
            &name,
            &format!("preallocation={mode}"),
            "4M",
            &["write -P 1 64k 4k", "write -P 2 1M 64k"],
        );
        names.push(Box::leak(name.into_boxed_str()));
    }
    qcow2(
        &d,
        "prealloc-el2.qcow2",
        "preallocation=metadata,extended_l2=on",
        "4M",
        &["write -P 1 64k 4k"],
    );
    names.push("prealloc-el2.qcow2");
    // An empty image and one with a size that is not a whole number of sectors.
    qcow2(&d, "empty.qcow2", "", "0", &[]);
    qcow2(&d, "oddsize.qcow2", "", "1M", &["write -P 1 0 4k"]);
    let mut f = std::fs::read(d.path("oddsize.qcow2")).unwrap();
    f[24..32].copy_from_slice(&1_000_000u64.to_be_bytes());
    std::fs::write(d.path("oddsize.qcow2"), f).unwrap();
    names.extend(["empty.qcow2", "oddsize.qcow2"]);
    d.sync();
    for name in names {
        d.check_image(name);
    }
}

#[test]
fn raw_images() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh("qemu-img create -q -f raw r.raw 4M
qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 3M 4k' r.raw >/dev/null
qemu-img create -q -f raw empty.raw 0
head -c 1000 /dev/zero | tr '\\0' 'x' > odd.raw
truncate -s 10000 sparse-tail.raw");
    d.sync();
    for name in ["r.raw", "empty.raw", "odd.raw", "sparse-tail.raw"] {
        d.check_image(name);
        d.same(&["info", "-f", "raw", name]);
        d.same(&["map", "-f", "raw", "--output=json", name]);
    }
    // A qcow2 image read as raw.
    qcow2(&d, "q.qcow2", "", "1M", &["write -P 1 0 64k"]);
    d.sync();
    d.same(&["info", "-f", "raw", "q.qcow2"]);
    d.same(&["info", "-f", "raw", "--output=json", "q.qcow2"]);
    d.same(&["map", "-f", "raw", "q.qcow2"]);
    d.same(&["info", "-f", "qcow2", "r.raw"]);
}

#[test]
fn backing_chains() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(
        "mkdir chain
qemu-img create -q -f raw chain/base.raw 8M
qemu-io -f raw -c 'write -P 17 0 1M' -c 'write -P 18 7M 4k' chain/base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw chain/mid.qcow2
qemu-io -c 'write -P 34 1M 1M' -c 'write -z 5M 64k' chain/mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain/top.qcow2
qemu-io -c 'write -P 51 2M 64k' -c 'write -z 3M 128k' -c 'write -P 52 1536k 4k' chain/top.qcow2 >/dev/null
qemu-img snapshot -c snap chain/mid.qcow2
qemu-img create -q -f raw small.raw 1M
qemu-io -f raw -c 'write -P 1 0 1M' small.raw >/dev/null
qemu-img create -q -f qcow2 -b small.raw -F raw big.qcow2 3M
qemu-io -c 'write -P 2 2M 64k' big.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b big.qcow2 -F qcow2 bigger.qcow2 5M
qemu-img create -q -f qcow2 -o extended_l2=on -b chain/base.raw -F raw el2top.qcow2
qemu-io -c 'write -P 3 2k 2k' -c 'write -z 70k 6k' -c 'write -P 4 200k 1k' el2top.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b \"$PWD/chain/top.qcow2\" -F qcow2 abs.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 -b chain/top.qcow2 -F qcow2 v2top.qcow2
qemu-img create -q -f qcow2 -u -b missing.qcow2 -F qcow2 orphan.qcow2 1M
qemu-img create -q -f qcow2 -u -b lb.qcow2 -F qcow2 la.qcow2 1M
qemu-img create -q -f qcow2 -u -b la.qcow2 -F qcow2 lb.qcow2 1M",
    );
    d.sync();
    for name in [
        "chain/top.qcow2",
        "chain/mid.qcow2",
        "chain/base.raw",
        "big.qcow2",
        "bigger.qcow2",
        "el2top.qcow2",
        "abs.qcow2",
        "v2top.qcow2",
    ] {
        d.check_image(name);
    }
    let abs = d.path("chain/top.qcow2");
    let abs = abs.to_str().unwrap();
    d.same(&["info", "--backing-chain", abs]);
    d.same(&["info", "--backing-chain", "--output=json", abs]);
    d.same(&["map", abs]);
    // A missing backing file: info alone works, the chain and map do not.
    d.same(&["info", "orphan.qcow2"]);
    d.same(&["info", "--backing-chain", "orphan.qcow2"]);
    d.same(&["map", "orphan.qcow2"]);
    // A loop (qemu-img map would never finish on it, so only info).
    d.same(&["info", "la.qcow2"]);
    d.same(&["info", "--backing-chain", "la.qcow2"]);
    d.same(&["info", "--backing-chain", "--output=json", "la.qcow2"]);
}

#[test]
fn external_data_files() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh("qemu-img create -q -f qcow2 -o data_file=d.data d.qcow2 4M
qemu-io -c 'write -P 1 64k 128k' -c 'write -z 1M 64k' -c 'write -P 2 2M 4k' d.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=dr.data,data_file_raw=on dr.qcow2 4M
qemu-io -c 'write -P 1 64k 128k' -c 'write -z 1M 64k' dr.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=dp.data,preallocation=metadata dp.qcow2 4M
qemu-io -c 'write -P 1 64k 64k' dp.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=de.data,extended_l2=on de.qcow2 4M
qemu-io -c 'write -P 1 4k 8k' -c 'write -z 64k 4k' de.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=gone.data gone.qcow2 4M
rm gone.data
qemu-img create -q -f qcow2 -o data_file=x.data nobit.qcow2 1M
qemu-img create -q -f qcow2 -o data_file=y.data,data_file_raw=on nobitraw.qcow2 1M
printf '\\000' | dd of=nobit.qcow2 bs=1 seek=79 conv=notrunc status=none
printf '\\000' | dd of=nobitraw.qcow2 bs=1 seek=79 conv=notrunc status=none
qemu-img create -q -f qcow2 -b d.qcow2 -F qcow2 over-d.qcow2
qemu-io -c 'write -P 9 2M 64k' over-d.qcow2 >/dev/null");
    d.sync();
    for name in [
        "d.qcow2",
        "dr.qcow2",
        "dp.qcow2",
        "de.qcow2",
        "over-d.qcow2",
    ] {
        d.check_image(name);
    }
    // info does not open the data file; map does.
    d.check_image("gone.qcow2");
    // A data file named, but the incompatible feature bit clear.
    d.check_image("nobit.qcow2");
    d.check_image("nobitraw.qcow2");
}

#[test]
fn snapshots_bitmaps_and_flags() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh("qemu-img create -q -f qcow2 snap.qcow2 8M
qemu-io -c 'write -P 1 0 1M' snap.qcow2 >/dev/null
qemu-img snapshot -c first snap.qcow2
qemu-io -c 'write -P 2 512k 1M' snap.qcow2 >/dev/null
qemu-img snapshot -c a-very-long-snapshot-name-here snap.qcow2
qemu-img snapshot -c 3rd snap.qcow2
qemu-img snapshot -d first snap.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 snapv2.qcow2 8M
qemu-img snapshot -c old snapv2.qcow2
qemu-img create -q -f qcow2 bm.qcow2 8M
qemu-img bitmap --add bm.qcow2 bitmap0
qemu-img bitmap --add -g 128k --disable bm.qcow2 b1
qemu-img bitmap --add -g 4k bm.qcow2 'name with spaces/and \"quotes\"'
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 8M
qemu-img bitmap --add dirty.qcow2 live
qemu-io -c 'write -P 1 0 64k' -c abort dirty.qcow2 >/dev/null 2>&1 || true
qemu-img create -q -f qcow2 corrupt.qcow2 8M
qemu-io -c 'write -P 1 0 64k' corrupt.qcow2 >/dev/null
printf '\\002' | dd of=corrupt.qcow2 bs=1 seek=79 conv=notrunc status=none");
    // Bitmaps left behind by a program that does not know them (autoclear bit clear).
    d.sh("qemu-img create -q -f qcow2 stale.qcow2 1M\nqemu-img bitmap --add stale.qcow2 b0");
    let mut f = std::fs::read(d.path("stale.qcow2")).unwrap();
    f[95] &= !1;
    std::fs::write(d.path("stale.qcow2"), f).unwrap();
    d.sh("qemu-img create -q -f qcow2 -b stale.qcow2 -F qcow2 over-stale.qcow2");
    // Snapshot fields qemu-img never writes itself: a VM clock, a VM state size, no
    // instruction count.
    for (name, icount) in [("clock.qcow2", 12345u64), ("noicount.qcow2", u64::MAX)] {
        d.sh(&format!(
            "qemu-img create -q -f qcow2 {name} 1M\nqemu-img snapshot -c s {name}"
        ));
        let mut f = std::fs::read(d.path(name)).unwrap();
        let at = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
        f[at + 24..at + 32].copy_from_slice(&3_723_456_789_000u64.to_be_bytes());
        f[at + 32..at + 36].copy_from_slice(&5_000_000u32.to_be_bytes());
        let extra = u32::from_be_bytes(f[at + 36..at + 40].try_into().unwrap());
        assert!(extra >= 24, "snapshot extra data of {extra} bytes");
        f[at + 40..at + 48].copy_from_slice(&5_000_000u64.to_be_bytes());
        f[at + 56..at + 64].copy_from_slice(&icount.to_be_bytes());
        std::fs::write(d.path(name), f).unwrap();
    }
    d.sync();
    for name in [
        "stale.qcow2",
        "over-stale.qcow2",
        "clock.qcow2",
        "noicount.qcow2",
        "snap.qcow2",
        "snapv2.qcow2",
        "bm.qcow2",
        "dirty.qcow2",
        "corrupt.qcow2",
    ] {
        d.check_image(name);
    }
}

#[test]
fn map_ranges() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    qcow2(
        &d,
        "m.qcow2",
        "",
        "8M",
        &[
            "write -P 17 0 64k",
            "write -P 18 64k 128k",
            "write -z 256k 64k",
            "write -z -u 320k 64k",
            "write -P 21 1M 64k",
            "discard 1M 64k",
            "write -P 22 2112k 64k",
            "write -P 23 2M 64k",
            "write -P 0 3M 64k",
            "write -P 24 4M 4k",
        ],
    );
    d.sh("mkdir chain
qemu-img create -q -f raw chain/base.raw 8M
qemu-io -f raw -c 'write -P 17 0 1M' chain/base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw chain/top.qcow2
qemu-io -c 'write -P 34 1M 1M' -c 'write -z 3M 128k' chain/top.qcow2 >/dev/null");
    d.sync();
    for image in ["m.qcow2", "chain/top.qcow2"] {
        for range in [
            &[][..],
            &["--start-offset", "1.5k", "--max-length", "200000"],
            &["--start-offset=100000"],
            &["-s", "1M", "-l", "1M"],
            &["-s", "9M"],
            &["-l", "0"],
            &["-s", "7", "-l", "5"],
            &["-s", "0x10000", "-l", "3M"],
            &["--max-length", "8E"],
            &["-s", "4194303", "-l", "2"],
        ] {
            for out in ["--output=json", "--output=human"] {
                let mut args = vec!["map", out];
                args.extend_from_slice(range);
                args.push(image);
                d.same(&args);
            }
        }
    }
}

#[test]
fn encrypted_images() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(
        "qemu-img create -q -f qcow2 --object secret,id=sec0,data=123456 \
   -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 luks.qcow2 1M
qemu-img create -q -f qcow2 --object secret,id=sec0,data=123456 \
   -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512 \
   luks2.qcow2 1M
qemu-img create -q -f qcow2 aes.qcow2 1M",
    );
    // The legacy AES method, set by hand (qemu-img no longer creates it).
    let mut f = std::fs::read(d.path("aes.qcow2")).unwrap();
    f[32..36].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(d.path("aes.qcow2"), f).unwrap();
    for name in ["luks.qcow2", "luks2.qcow2", "aes.qcow2"] {
        d.check_image(name);
    }
}

#[test]
fn broken_headers() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    qcow2(&d, "a.qcow2", "", "4M", &["write -P 1 0 64k"]);
    let base = std::fs::read(d.path("a.qcow2")).unwrap();
    // (name, byte offset, big-endian value, width)
    let cases: &[(&str, usize, u64, usize)] = &[
        ("version4.qcow2", 4, 4, 4),
        ("cluster8.qcow2", 20, 8, 4),
        ("cluster22.qcow2", 20, 22, 4),
        ("l1big.qcow2", 36, 0x7fff_ffff, 4),
        ("l1off.qcow2", 40, 0x1234, 8),
        ("rtoff.qcow2", 48, 0x1234, 8),
        ("incompat.qcow2", 72, 1 << 63, 8),
        ("compat.qcow2", 80, 1 << 40, 8),
        ("autoclear.qcow2", 88, 1 << 40, 8),
        ("rorder.qcow2", 96, 7, 4),
        ("hlen.qcow2", 100, 100, 4),
    ];
    for &(name, at, value, width) in cases {
        let mut f = base.clone();
        f[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
        std::fs::write(d.path(name), f).unwrap();
        d.same(&["info", name]);
        d.same(&["info", "--output=json", name]);
        d.same(&["map", "--output=json", name]);
    }
    // A snapshot table at an unaligned offset.
    let mut f = base.clone();
    f[60..64].copy_from_slice(&1u32.to_be_bytes());
    f[64..72].copy_from_slice(&0x1234u64.to_be_bytes());
    std::fs::write(d.path("snapoff.qcow2"), f).unwrap();
    d.same(&["info", "snapoff.qcow2"]);
}

#[test]
fn protocol_prefixes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    qcow2(&d, "plain.qcow2", "", "1M", &["write -P 1 0 64k"]);
    d.sh("cp plain.qcow2 x:y.qcow2
qemu-img create -q -f qcow2 -b file:plain.qcow2 -F qcow2 fb.qcow2");
    d.sync();
    for name in [
        "file:plain.qcow2",
        "./x:y.qcow2",
        "file:x:y.qcow2",
        "fb.qcow2",
    ] {
        d.check_image(name);
    }
    for name in ["a:b.qcow2", "file:nonexist", "bogus:plain.qcow2"] {
        d.same(&["info", name]);
        d.same(&["map", name]);
    }
}

#[test]
fn command_line_errors() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    qcow2(&d, "a.qcow2", "", "1M", &["write -P 1 0 64k"]);
    d.sh("qemu-img create -q -f raw r.raw 1M\nmkdir dir");
    let cases: &[&[&str]] = &[
        &["info"],
        &["info", "a.qcow2", "r.raw"],
        &["info", "nonexist.qcow2"],
        &["info", "dir"],
        &["info", "--output=xml", "a.qcow2"],
        &["info", "--output", "json", "a.qcow2"],
        &["info", "--out=json", "a.qcow2"],
        &["info", "a.qcow2", "--output=json"],
        &["info", "-x", "a.qcow2"],
        &["info", "-t", "none", "a.qcow2"],
        &["info", "--foo", "a.qcow2"],
        &["info", "--f", "qcow2", "a.qcow2"],
        &["info", "--format"],
        &["info", "-f"],
        &["info", "--backing-chain=1", "a.qcow2"],
        &["info", "-f", "qcow2", "r.raw"],
        &["info", "-f", "bogus", "r.raw"],
        &["info", "-f", "bogus", "nonexist"],
        &["info", "-fraw", "a.qcow2"],
        &["info", "-Ub", "a.qcow2"],
        &["info", "--force", "--back", "a.qcow2"],
        &["info", "--", "a.qcow2"],
        &["info", "--image-opts", "-f", "qcow2", "a.qcow2"],
        &["info", "--help"],
        &["info", "-h", "--bogus"],
        &["map"],
        &["map", "a.qcow2", "r.raw"],
        &["map", "nonexist.qcow2"],
        &["map", "--output=bogus", "a.qcow2"],
        &["map", "-s", "abc", "a.qcow2"],
        &["map", "-s", "-1", "a.qcow2"],
        &["map", "--start-offset", "1e3", "a.qcow2"],
        &["map", "-l", "-5k", "a.qcow2"],
        &["map", "--max-length", "abc", "a.qcow2"],
        &["map", "-l", "16E", "a.qcow2"],
        &["map", "-l"],
        &["map", "-b", "a.qcow2"],
        &["map", "-f", "qcow2", "r.raw"],
        &["map", "-f", "raw", "a.qcow2"],
        &["map", "--help"],
        &["map", "-h"],
    ];
    for args in cases {
        d.same(args);
    }
}
