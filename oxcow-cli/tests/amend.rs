//! `amend` against qemu-img 10 as the oracle. Images are made and filled by qemu-img
//! and qemu-io (data, zero clusters with and without a backing file, preallocated
//! zero clusters, compressed clusters, snapshots, persistent bitmaps, a dirty image
//! left by lazy refcounts, compat=0.10 images); each is copied twice, one copy amended
//! by `qemu-img amend`, the other by oxcow (through a symlink named `qemu-img`) with
//! the same options. Then:
//! - stdout, stderr and exit code are the same (the repair of a dirty image at open
//!   and `-p` progress included);
//! - oxcow's result passes `qemu-img check` with no error and no leak;
//! - both results read the same (`qemu-img compare`, and the original's data);
//! - `qemu-img info --output=json` is the same but for the sizes of the file, which
//!   legitimately differ: oxcow writes new refcount structures past the end of the
//!   file (a refcount width change, the recount after a downgrade or of a dirty
//!   image) where QEMU rebuilds them in place, and QEMU rewrites persistent bitmaps
//!   elsewhere when it closes an image it opened for writing;
//! - `qemu-img map` of both results is the same but for host offsets, which differ
//!   where the file sizes do.
//!
//! Where QEMU itself leaves an image that its check faults (a downgrade of images with
//! snapshots sets COPIED on shared clusters; a downgrade drops bitmaps but leaks their
//! clusters), only oxcow's result is required to check clean.

mod support;

use serde_json::Value;
use std::path::Path;
use support::{
    assert_same_output, have_qemu_and_io as have_qemu, text, Scratch as Dir, Setup, C_LOCALE,
};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            run_env: C_LOCALE,
            sh_env: C_LOCALE,
            ..Setup::default()
        })
    }

    fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.tmp.path().join(from), self.tmp.path().join(to)).unwrap();
    }

    /// `qemu-img info --output=json` without what depends on the file's size.
    fn info(&self, name: &str) -> Value {
        let o = self.qemu(&["info", "--output=json", name]);
        assert!(o.status.success(), "info {name}: {}", text(&o.stderr));
        let mut v: Value = serde_json::from_slice(&o.stdout).unwrap();
        strip_sizes(&mut v);
        v
    }

    /// `qemu-img map --output=json` without host offsets.
    fn map(&self, name: &str) -> Value {
        let o = self.qemu(&["map", "--output=json", name]);
        assert!(o.status.success(), "map {name}: {}", text(&o.stderr));
        let mut v: Value = serde_json::from_slice(&o.stdout).unwrap();
        if let Value::Array(runs) = &mut v {
            for r in runs {
                if let Value::Object(m) = r {
                    m.remove("offset");
                }
            }
        }
        v
    }

    /// No error and no leak.
    fn assert_clean(&self, name: &str, what: &str) {
        let o = self.qemu(&["check", name]);
        assert!(
            o.status.success() && text(&o.stdout).contains("No errors were found"),
            "qemu-img check {name} after {what}:\n{}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }

    /// Amends copies of `image` with both tools and compares everything. Returns
    /// whether the amend succeeded.
    fn amend(&self, image: &str, args: &[&str]) -> bool {
        let (q, o) = (format!("q-{image}"), format!("o-{image}"));
        self.copy(image, &q);
        self.copy(image, &o);
        let what = format!("amend {args:?} {image}");
        let with = |name: &str| {
            let mut v = vec!["amend"];
            v.extend_from_slice(args);
            v.push(name);
            v.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let qa = with(&q);
        let oa = with(&o);
        let qo = self.run(
            Path::new("qemu-img"),
            &qa.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let oo = self.run(&self.ox, &oa.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(text(&oo.stdout), text(&qo.stdout), "stdout of {what}");
        assert_eq!(
            text(&oo.stderr).replace(&o, "IMG"),
            text(&qo.stderr).replace(&q, "IMG"),
            "stderr of {what}"
        );
        assert_eq!(oo.status.code(), qo.status.code(), "exit code of {what}");
        self.assert_clean(&o, &what);
        let cmp = self.qemu(&["compare", &q, &o]);
        assert!(
            cmp.status.success(),
            "compare after {what}: {}",
            text(&cmp.stdout)
        );
        if !args.iter().any(|a| a.contains("size=")) {
            let cmp = self.qemu(&["compare", image, &o]);
            assert!(
                cmp.status.success(),
                "data changed by {what}: {}",
                text(&cmp.stdout)
            );
        }
        let (qi, oi) = (self.info(&q), self.info(&o));
        let (qi, oi) = (rename(qi, &q), rename(oi, &o));
        assert_eq!(oi, qi, "info after {what}");
        assert_eq!(self.map(&o), self.map(&q), "map after {what}");
        qo.status.success()
    }
}

/// Removes the sizes that depend on the file's layout (and the child's file length).
fn strip_sizes(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("actual-size");
            // The file node's size is the file's length.
            if m.get("format") == Some(&Value::String("file".into())) {
                m.remove("virtual-size");
            }
            if let Some(Value::Object(f)) = m.get_mut("format-specific") {
                if let Some(Value::Object(d)) = f.get_mut("data") {
                    d.remove("file-length");
                }
            }
            for (_, x) in m.iter_mut() {
                strip_sizes(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_sizes),
        _ => {}
    }
}

/// The JSON with the copy's name replaced.
fn rename(v: Value, name: &str) -> Value {
    let s = v.to_string().replace(name, "IMG");
    serde_json::from_str(&s).unwrap()
}

const ZEROS: &str = "-c 'write -P 1 0 64k' -c 'write -z 1M 128k' -c 'write -P 2 2M 64k' \
     -c 'write -z 2M 64k' -c 'write -z -u 3M 64k' -c 'write -P 3 5M 100k'";

fn build(d: &Dir) {
    d.sh(&format!(
        "qemu-img create -q -f qcow2 base.qcow2 10M
         qemu-io -c 'write -P 9 0 10M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 z.qcow2 10M
         qemu-io {ZEROS} z.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2
         qemu-io {ZEROS} ov.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o cluster_size=4k c.qcow2 3M
         qemu-io -c 'write -c -P 4 0 64k' -c 'write -P 5 1M 8k' -c 'write -z 2M 4k' c.qcow2 >/dev/null
         cp z.qcow2 sn.qcow2
         qemu-img snapshot -c s1 sn.qcow2
         qemu-io -c 'write -z 0 64k' -c 'write -P 6 6M 64k' -c 'write -z 7M 64k' sn.qcow2 >/dev/null
         qemu-img snapshot -c s2 sn.qcow2
         qemu-io -c 'write -z 6M 64k' sn.qcow2 >/dev/null
         cp ov.qcow2 ovsn.qcow2
         qemu-img snapshot -c s1 ovsn.qcow2
         qemu-io -c 'write -z 5M 64k' -c 'write -z 6M 64k' ovsn.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 10M
         qemu-io -c 'write -P 7 0 64k' -c 'write -z 1M 128k' -c 'write -P 8 3M 1M' v2.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b base.qcow2 -F qcow2 v2b.qcow2
         qemu-io -c 'write -P 7 4k 8k' v2b.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 10M
         qemu-io -c 'write -P 1 0 1M' lazy.qcow2 >/dev/null
         qemu-img create -q -f qcow2 bm.qcow2 10M
         qemu-img bitmap --add bm.qcow2 b1
         qemu-io -c 'write -P 1 0 1M' bm.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k ext.qcow2 10M
         qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 10M
         qemu-io -c 'write -c -P 1 0 64k' zstd.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compression_type=zstd zstd0.qcow2 10M
         qemu-io -c 'write -P 1 0 64k' zstd0.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o refcount_bits=8 rc8.qcow2 10M
         qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 1M' rc8.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o data_file=df.raw df.qcow2 10M
         qemu-io -c 'write -P 1 0 64k' df.qcow2 >/dev/null
         qemu-img create -q -f raw r.raw 1M
         qemu-img create -q -f qcow2 --object secret,id=s0,data=abc \
             -o encrypt.format=luks,encrypt.key-secret=s0 enc.qcow2 1M"
    ));
}

#[test]
fn compat_both_ways() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    build(&d);
    for img in [
        "z.qcow2",
        "ov.qcow2",
        "c.qcow2",
        "lazy.qcow2",
        "zstd0.qcow2",
    ] {
        assert!(d.amend(img, &["-o", "compat=0.10"]), "{img}");
        // And back up again.
        d.copy(&format!("o-{img}"), &format!("down-{img}"));
        assert!(d.amend(&format!("down-{img}"), &["-o", "compat=1.1"]));
    }
    for img in ["v2.qcow2", "v2b.qcow2"] {
        assert!(d.amend(img, &["-o", "compat=v3"]));
        assert!(d.amend(img, &["-o", "compat=1.1,lazy_refcounts=on,refcount_bits=4"]));
    }
    assert!(d.amend("z.qcow2", &["-o", "compat=v2"]));
    assert!(d.amend("z.qcow2", &["-p", "-o", "compat=0.10"]));
    assert!(d.amend("z.qcow2", &["-q", "-p", "-o", "compat=1.1"]));
    // Two operations on one progress scale: the width back to 16 bits, then down.
    assert!(d.amend("rc8.qcow2", &["-p", "-o", "refcount_bits=16,compat=0.10"]));
    // Refused: what v2 cannot hold.
    for (img, o) in [
        ("ext.qcow2", "compat=0.10"),
        ("zstd.qcow2", "compat=0.10"),
        ("rc8.qcow2", "compat=0.10"),
        ("df.qcow2", "compat=0.10"),
        ("z.qcow2", "compat=0.10,refcount_bits=8"),
        ("z.qcow2", "compat=0.10,lazy_refcounts=on"),
    ] {
        assert!(!d.amend(img, &["-o", o]), "{img} {o}");
    }
}

#[test]
fn downgrade_with_snapshots_and_bitmaps() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    build(&d);
    // QEMU's own results fail its check here (see the file's comment): oxcow's must
    // not, and both must read the same.
    for img in ["sn.qcow2", "ovsn.qcow2", "bm.qcow2"] {
        let (q, o) = (format!("q-{img}"), format!("o-{img}"));
        d.copy(img, &q);
        d.copy(img, &o);
        assert!(d.qemu(&["amend", "-o", "compat=0.10", &q]).status.success());
        let out = d.run(&d.ox, &["amend", "-o", "compat=0.10", &o]);
        assert!(out.status.success(), "{img}: {}", text(&out.stderr));
        d.assert_clean(&o, img);
        assert!(d.qemu(&["compare", &q, &o]).status.success(), "{img}");
        for sn in ["s1", "s2"] {
            if img == "bm.qcow2" || (img == "ovsn.qcow2" && sn == "s2") {
                continue;
            }
            // Every snapshot still reads as before.
            let before = d.qemu(&["convert", "-l", sn, "-O", "raw", img, "before.raw"]);
            assert!(before.status.success());
            let after = d.qemu(&["convert", "-l", sn, "-O", "raw", &o, "after.raw"]);
            assert!(after.status.success(), "{}", text(&after.stderr));
            assert!(d
                .qemu(&[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "raw",
                    "before.raw",
                    "after.raw"
                ])
                .status
                .success());
        }
        assert_eq!(
            d.info(&format!("q-{img}"))["format-specific"]["data"]["compat"],
            "0.10"
        );
        assert_eq!(d.info(&o)["format-specific"]["data"]["compat"], "0.10");
    }
}

#[test]
fn refcount_widths() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    build(&d);
    for bits in ["1", "2", "4", "8", "16", "32", "64"] {
        let o = format!("refcount_bits={bits}");
        let images: &[&str] = match bits {
            "1" => &["z.qcow2", "sn.qcow2", "c.qcow2"],
            "8" => &["ov.qcow2", "bm.qcow2", "c.qcow2"],
            "64" => &["z.qcow2", "sn.qcow2"],
            _ => &["z.qcow2"],
        };
        for &img in images {
            let ok = d.amend(img, &["-o", &o]);
            if ok && bits != "16" {
                // And back to 16 bits.
                let down = format!("w{bits}-{img}");
                d.copy(&format!("o-{img}"), &down);
                assert!(d.amend(&down, &["-o", "refcount_bits=16"]));
            }
        }
    }
    assert!(d.amend("rc8.qcow2", &["-o", "refcount_bits=16"]));
    assert!(d.amend("z.qcow2", &["-p", "-q", "-o", "refcount_bits=64"]));
    // QEMU's progress: one step per refcount table entry and walk.
    assert!(d.amend("z.qcow2", &["-p", "-o", "refcount_bits=8"]));
    assert!(d.amend("c.qcow2", &["-p", "-o", "refcount_bits=64"]));
    assert!(d.amend("v2.qcow2", &["-p", "-o", "compat=1.1,refcount_bits=2"]));
}

#[test]
fn lazy_refcounts_and_size() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    build(&d);
    for img in ["z.qcow2", "lazy.qcow2", "bm.qcow2", "sn.qcow2"] {
        assert!(d.amend(img, &["-o", "lazy_refcounts=on"]));
        assert!(d.amend(img, &["-o", "lazy_refcounts=off"]));
    }
    assert!(d.amend("z.qcow2", &["-o", "size=20M"]));
    assert!(d.amend("z.qcow2", &["-o", "size=4M"]));
    assert!(d.amend(
        "ov.qcow2",
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"]
    ));
    // The external data file: renamed (to a copy), its raw flag turned off.
    d.sh("cp df.raw df2.raw
          qemu-img create -q -f qcow2 -o data_file=dr.raw,data_file_raw=on dr.qcow2 1M");
    assert!(d.amend("df.qcow2", &["-o", "data_file=df2.raw"]));
    assert!(d.amend("df.qcow2", &["-o", "data_file=df2.raw,data_file_raw=off"]));
    assert!(!d.amend("df.qcow2", &["-o", "data_file_raw=on"]));
    assert!(d.amend("df.qcow2", &["-o", "data_file_raw=off,lazy_refcounts=on"]));
    assert!(d.amend("df.qcow2", &["-o", "refcount_bits=2"]));
    assert!(d.amend("dr.qcow2", &["-o", "data_file_raw=off"]));
    assert!(d.amend("dr.qcow2", &["-o", "data_file_raw=on"]));
    // A dirty image (lazy refcounts, killed while writing).
    d.sh(
        "qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 10M
          qemu-io -c 'write -P 3 0 1M' -c 'sigraise 9' dirty.qcow2 >/dev/null 2>&1 || true",
    );
    // Both repair it at open (printing the same repair lines), then amend it.
    for o in [
        "lazy_refcounts=off",
        "compat=0.10",
        "refcount_bits=32",
        "lazy_refcounts=on",
    ] {
        assert!(d.amend("dirty.qcow2", &["-o", o]), "{o}");
    }
    assert!(d.amend("dirty.qcow2", &["-p", "-o", "refcount_bits=1"]));
}

#[test]
fn refusals_and_help() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    build(&d);
    for args in [
        &["amend", "-o", "help", "z.qcow2"][..],
        &["amend", "-o", "?", "z.qcow2"],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["amend", "-f", "raw", "-o", "help"],
        &["amend", "-f", "nosuch", "-o", "help"],
        &["amend", "-o", "help"],
        &["amend", "-o", "help", "r.raw"],
        &["amend", "-f", "raw", "-o", "compat=1.1", "r.raw"],
        &["amend", "-o", "compat=1.1", "r.raw"],
        &["amend", "z.qcow2"],
        &["amend", "-o"],
        &["amend", "-x", "-o", "compat=1.1", "z.qcow2"],
        &["amend", "-o", "compat=1.1"],
        &["amend", "-o", "compat=1.1", "a", "b"],
        &["amend", "-p", "-o", "compat=1.1"],
        &["amend", "-o", ",", "z.qcow2"],
        &["amend", "-o", "compat=1.1", "missing.qcow2"],
        &["amend", "-t", "nosuch", "-o", "compat=1.1", "z.qcow2"],
        &["amend", "-f", "nosuch", "-o", "compat=1.1", "z.qcow2"],
        &["amend", "-o", "compat=1.1", "enc.qcow2"],
    ] {
        let q = d.qemu(args);
        let o = d.run(&d.ox, args);
        assert_same_output(&format!("{args:?}"), &o, &q);
    }
    for o in [
        "cluster_size=4k",
        "cluster_size=64k",
        "encryption=on",
        "encrypt.format=luks",
        "encrypt.new-secret=x",
        "encrypt.state=active",
        "encrypt.keyslot=1",
        "encrypt.iter-time=10",
        "encrypt.old-secret=y",
        "preallocation=full",
        "compression_type=zstd",
        "extended_l2=on",
        "data_file=x",
        "data_file_raw=on",
        "compat=0.9",
        "refcount_bits=3",
        "refcount_bits=128",
        "refcount_bits=0",
        "refcount_bits=abc",
        "lazy_refcounts=maybe",
        "foo=bar",
        "nocow=on",
        "backing_file=base.qcow2",
        "backing_fmt=raw",
        "backing_file=other.qcow2,backing_fmt=qcow2",
    ] {
        assert!(!d.amend("z.qcow2", &["-o", o]), "{o}");
    }
    for o in [
        "backing_fmt=qcow2",
        "backing_file=base.qcow2",
        "backing_file=x,backing_fmt=qcow2",
    ] {
        assert!(!d.amend("ov.qcow2", &["-o", o]), "{o}");
    }
    // Refcounts of 2 (snapshots, compressed clusters sharing a host cluster) do not fit
    // in one bit.
    assert!(!d.amend("sn.qcow2", &["-o", "refcount_bits=1"]));
    assert!(!d.amend("c.qcow2", &["-o", "refcount_bits=1"]));
}
