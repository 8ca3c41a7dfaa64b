//! `measure` against qemu-img 10 as the oracle: for sizes (0, odd, 1 T, 16 T...),
//! every cluster size, refcount widths, extended L2, compat levels and preallocation
//! modes, for raw and qcow2 targets, and for input images made by qemu-img and qemu-io
//! (raw with holes, qcow2 with data, zero clusters, compressed clusters, a backing
//! file, persistent bitmaps, internal snapshots with `-l`), the same command line must give the same stdout (human
//! and JSON), stderr and exit code from both tools. oxcow runs through a symlink named
//! `qemu-img`. Skipped (with a note) when qemu-img is not installed.

mod support;

use std::path::Path;
use std::process::Output;
use support::{assert_same_output, have_qemu_and_io as have_qemu, Scratch as Dir, Setup, C_LOCALE};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            run_env: C_LOCALE,
            sh_env: C_LOCALE,
            sh_sync: true,
            ..Setup::default()
        })
    }

    /// Runs `qemu-img ARGS` and `oxcow ARGS`; same stdout, stderr and exit code.
    /// Returns qemu-img's output.
    fn same(&self, args: &[&str]) -> Output {
        let q = self.run(Path::new("qemu-img"), args);
        let o = self.run(&self.ox, args);
        assert_same_output(&format!("{args:?}"), &o, &q);
        q
    }

    /// Human and JSON output of `measure ARGS` for both target formats and, for
    /// qcow2, each option list given.
    fn measure_all(&self, args: &[&str], qcow2_opts: &[&str]) {
        for output in ["--output=human", "--output=json"] {
            let mut raw = vec!["measure", output, "-O", "raw"];
            raw.extend_from_slice(args);
            self.same(&raw);
            for o in qcow2_opts {
                let mut a = vec!["measure", output, "-O", "qcow2"];
                if !o.is_empty() {
                    a.extend_from_slice(&["-o", o]);
                }
                a.extend_from_slice(args);
                self.same(&a);
            }
        }
    }
}

#[test]
fn sizes_and_options() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let mut ok = 0;
    for size in [
        "0", "512", "1001", "65536", "65537", "1G", "1T", "16T", "64T", "2E",
    ] {
        for cs in ["512", "4k", "16k", "64k", "2M"] {
            for rc in ["1", "16", "64"] {
                for extra in [
                    "",
                    ",extended_l2=on",
                    ",compat=0.10",
                    ",preallocation=metadata",
                    ",preallocation=falloc",
                    ",preallocation=full,extended_l2=on",
                ] {
                    let o = format!("cluster_size={cs},refcount_bits={rc}{extra}");
                    let out = d.same(&["measure", "-O", "qcow2", "-o", &o, "--size", size]);
                    ok += out.status.success() as u32;
                }
            }
        }
        d.same(&["measure", "--size", size]);
        d.same(&["measure", "--output=json", "-O", "qcow2", "--size", size]);
    }
    // The matrix must mostly measure, not only fail alike.
    assert!(ok > 500, "only {ok} successful measurements");
}

#[test]
fn option_errors() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(
        "qemu-img create -q -f qcow2 q.qcow2 1M; head -c 1000 /dev/zero > r.raw
         qemu-img create -q -f qcow2 --object secret,id=s0,data=abc \
             -o encrypt.format=luks,encrypt.key-secret=s0 enc.qcow2 1M",
    );
    for args in [
        &["measure"][..],
        &["measure", "--size", "1G", "q.qcow2"],
        &["measure", "q.qcow2", "r.raw"],
        &["measure", "-f", "qcow2"],
        &["measure", "-l", "snap"],
        &["measure", "--size", "abc"],
        &["measure", "--size", "-1"],
        &["measure", "--size", "9223372036854775808"],
        &["measure", "--output=xml", "--size", "1M"],
        &["measure", "-s", "1M"],
        &["measure", "-x"],
        &["measure", "missing.img"],
        &["measure", "-O", "qcow2", "enc.qcow2"],
        &["measure", "-f", "qcow2", "r.raw"],
        &["measure", "-f", "nosuchfmt", "r.raw"],
        &["measure", "-l", "snap", "r.raw"],
        &["measure", "-l", "snap", "q.qcow2"],
        &["measure", "-l", "snapshot.id=x,snapshot.foo=y", "q.qcow2"],
        &["measure", "-l", "snapshot.foo=x", "q.qcow2"],
        &["measure", "-O", "nosuchfmt", "--size", "1M"],
        &["measure", "-O", "vmdk", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", ",", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "help", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "help"],
        &["measure", "-O", "qcow2", "-o", "foo=bar", "--size", "1M"],
        &[
            "measure",
            "-O",
            "raw",
            "-o",
            "cluster_size=4k",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=x",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1000",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4M",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1000,compat=0.9",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.9,refcount_bits=3",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=128",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3,preallocation=x",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=maybe",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "encryption=on",
            "--size",
            "1M",
        ],
        &["measure", "-O", "qcow2", "-o", "size=5M", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "size=5M", "r.raw"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "backing_file=q.qcow2",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "data_file=x,compression_type=zstd",
            "--size",
            "1M",
        ],
        &[
            "measure",
            "-O",
            "raw",
            "-o",
            "preallocation=full",
            "--size",
            "1001",
        ],
    ] {
        d.same(args);
    }
}

#[test]
fn input_images() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(
        "qemu-img create -q -f raw holes.raw 10M
         qemu-io -f raw -c 'write -P 1 0 1000' -c 'write -P 2 1M 64k' \
                 -c 'write -P 3 5M 4k' -c 'write -P 0 7M 64k' holes.raw >/dev/null
         truncate -s 12345678 holes.raw
         head -c 1001 /dev/urandom > odd.raw
         truncate -s 0 empty.raw
         qemu-img create -q -f qcow2 mixed.qcow2 20M
         qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1000 3000' -c 'write -P 3 1M 192k' \
                 -c 'write -z 2M 64k' -c 'write -P 4 3M 64k' -c 'discard 3M 64k' \
                 -c 'write -P 5 5M 4k' -c 'write -P 0 6M 64k' -c 'write -c -P 6 8M 128k' \
                 -c 'write -z 10M 1M' mixed.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o cluster_size=4k,compat=0.10 v2.qcow2 3M
         qemu-io -c 'write -P 7 4k 8k' -c 'write -z 1M 64k' v2.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k sub.qcow2 5M
         qemu-io -c 'write -P 8 4k 4k' -c 'write -P 9 1M 8k' -c 'write -z 2M 4k' sub.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b mixed.qcow2 -F qcow2 top.qcow2 24M
         qemu-io -c 'write -P 10 2M 4k' -c 'write -z 0 64k' -c 'write -P 11 21M 64k' top.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b holes.raw -F raw overraw.qcow2
         qemu-io -c 'write -P 12 9M 64k' overraw.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o preallocation=metadata meta.qcow2 4M
         qemu-io -c 'write -P 13 1M 64k' meta.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o preallocation=full full.qcow2 2M
         qemu-img create -q -f qcow2 bm.qcow2 100M
         qemu-img bitmap --add bm.qcow2 first
         qemu-img bitmap --add -g 512 bm.qcow2 a-much-longer-bitmap-name-for-the-directory
         qemu-img bitmap --add -g 2M bm.qcow2 b
         qemu-io -c 'write -P 14 0 1M' bm.qcow2 >/dev/null
         qemu-img create -q -f qcow2 bm0.qcow2 1M
         qemu-img bitmap --add bm0.qcow2 x
         qemu-img create -q -f qcow2 snap.qcow2 10M
         qemu-io -c 'write -P 1 0 3M' -c 'write -z 3M 1M' snap.qcow2 >/dev/null
         qemu-img snapshot -c s1 snap.qcow2
         qemu-io -c 'write -P 2 5M 1M' -c 'write -c -P 3 8M 128k' snap.qcow2 >/dev/null
         qemu-img resize -q snap.qcow2 30M
         qemu-img snapshot -c 2 snap.qcow2
         qemu-io -c 'write -P 4 20M 1M' snap.qcow2 >/dev/null
         qemu-img resize -q snap.qcow2 40M",
    );
    let opts = [
        "",
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
        "compat=0.10",
        "preallocation=metadata",
        "preallocation=full",
        "backing_file=base.img",
    ];
    for name in [
        "holes.raw",
        "odd.raw",
        "empty.raw",
        "mixed.qcow2",
        "v2.qcow2",
        "sub.qcow2",
        "top.qcow2",
        "overraw.qcow2",
        "meta.qcow2",
        "full.qcow2",
        "bm.qcow2",
        "bm0.qcow2",
    ] {
        d.measure_all(&[name], &opts);
    }
    d.measure_all(&["-f", "raw", "mixed.qcow2"], &opts);
    // Snapshots: by id, by name, by both (a mismatch), an id that is also a name.
    for l in [
        "s1",
        "1",
        "2",
        "3",
        "",
        "snapshot.id=1",
        "snapshot.name=s1",
        "snapshot.name=2",
        "snapshot.id=1,snapshot.name=s1",
        "snapshot.id=1,snapshot.name=2",
    ] {
        d.measure_all(&["-l", l, "snap.qcow2"], &opts);
    }
    d.measure_all(&["snap.qcow2"], &opts);
}
