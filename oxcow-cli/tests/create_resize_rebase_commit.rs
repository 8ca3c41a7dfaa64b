//! `create`, `resize`, `rebase` and `commit` against qemu-img 10 as the oracle. Each
//! case copies one set of images (made by qemu-img and qemu-io) into two directories,
//! runs the same command line there through qemu-img and through oxcow (a symlink
//! named `qemu-img`), and requires the same stdout, stderr and exit code. Then the
//! images the command wrote must match: byte for byte for `create`; otherwise the
//! same guest content (`qemu-img compare`), a clean `qemu-img check` of oxcow's
//! result, and the same `qemu-img info` (virtual size, backing file and format,
//! format-specific data). Every test is skipped (with a note) when qemu-img is not
//! installed.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{assert_same_output, have_qemu, oxcow_link, run, text};

/// How the images written by a command are compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Byte for byte (and the same files exist).
    Bytes,
    /// Same content, clean check, same info.
    Same,
}

/// A template directory of images, copied for each case.
struct Fixture {
    tmp: tempfile::TempDir,
    ox: PathBuf,
    cases: AtomicUsize,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let ox = oxcow_link(tmp.path(), "qemu-img");
        std::fs::create_dir(tmp.path().join("tpl")).unwrap();
        Fixture {
            tmp,
            ox,
            cases: AtomicUsize::new(0),
        }
    }

    fn tpl(&self) -> PathBuf {
        self.tmp.path().join("tpl")
    }

    /// qemu-img in the template directory (must succeed).
    fn qemu_img(&self, args: &[&str]) {
        let o = run(Path::new("qemu-img"), &self.tpl(), args);
        assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
    }

    /// qemu-io on a template image (must succeed).
    fn qemu_io(&self, img: &str, fmt: &str, cmds: &[&str]) {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        let o = run(Path::new("qemu-io"), &self.tpl(), &args);
        assert!(o.status.success(), "qemu-io {args:?}: {o:?}");
    }

    /// Two fresh copies of the template: (qemu-img's, oxcow's).
    fn copies(&self) -> (PathBuf, PathBuf) {
        let n = self.cases.fetch_add(1, Ordering::Relaxed);
        let base = self.tmp.path().join(format!("case{n}"));
        let q = base.join("q");
        let x = base.join("x");
        copy_dir(&self.tpl(), &q);
        copy_dir(&self.tpl(), &x);
        (q, x)
    }

    /// Runs `args` through both tools on fresh copies; the outputs must be equal, and
    /// the `files` as `check` says. Returns oxcow's output and the two directories.
    fn case(&self, args: &[&str], files: &[&str], check: Check) -> (Output, PathBuf, PathBuf) {
        let (q, x) = self.copies();
        let qo = run(Path::new("qemu-img"), &q, args);
        let xo = run(&self.ox, &x, args);
        assert_same_output(&format!("{args:?}"), &xo, &qo);
        for f in files {
            let (qf, xf) = (q.join(f), x.join(f));
            assert_eq!(qf.exists(), xf.exists(), "{f} exists after {args:?}");
            if !qf.exists() {
                continue;
            }
            match check {
                Check::Bytes => {
                    let (a, b) = (std::fs::read(&qf).unwrap(), std::fs::read(&xf).unwrap());
                    if let Some(at) = a.iter().zip(&b).position(|(p, r)| p != r) {
                        panic!("{f} after {args:?}: first difference at byte {at:#x}");
                    }
                    assert_eq!(a.len(), b.len(), "length of {f} after {args:?}");
                }
                Check::Same => same_image(&q, &x, f, &format!("{f} after {args:?}")),
            }
        }
        (xo, q, x)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn is_qcow2(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"QFI\xfb"
}

/// `qemu-img` run in `dir` (external data files are found relative to it).
fn qemu_img_in(dir: &Path, args: &[&str]) -> Output {
    run(Path::new("qemu-img"), dir, args)
}

/// The `qemu-img info` fields that describe the image rather than its file.
fn info_fields(dir: &Path, f: &str) -> serde_json::Value {
    let o = qemu_img_in(dir, &["info", "-U", "--output=json", f]);
    assert!(o.status.success(), "info {f}: {o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut out = serde_json::Map::new();
    for k in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
        "dirty-flag",
        "encrypted",
    ] {
        if let Some(x) = v.get(k) {
            out.insert(k.to_string(), x.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// The guest content of an image with an external data file (which QEMU finds
/// relative to the current directory, so `qemu-img compare` cannot take two).
fn content(dir: &Path, f: &str) -> Vec<u8> {
    let out = "content-of-image.raw";
    let o = qemu_img_in(dir, &["convert", "-U", "-O", "raw", f, out]);
    assert!(o.status.success(), "convert {f}: {o:?}");
    let data = std::fs::read(dir.join(out)).unwrap();
    std::fs::remove_file(dir.join(out)).unwrap();
    data
}

/// qemu-img's and oxcow's versions of image `f` (in directories `q` and `x`): same
/// content and description, and oxcow's is clean.
fn same_image(q: &Path, x: &Path, f: &str, what: &str) {
    let info = info_fields(q, f);
    assert_eq!(info_fields(x, f), info, "info of {what}");
    if info["format-specific"]["data"].get("data-file").is_some() {
        assert!(content(q, f) == content(x, f), "content of {what}");
    } else {
        let o = Command::new("qemu-img")
            .args(["compare", "-U"])
            .arg(q.join(f))
            .arg(x.join(f))
            .output()
            .unwrap();
        assert!(o.status.success(), "compare {what}: {o:?}");
    }
    if is_qcow2(&x.join(f)) {
        let o = qemu_img_in(x, &["check", "-U", f]);
        assert!(
            o.status.success() && text(&o.stdout).contains("No errors were found"),
            "check {what}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

#[test]
fn create_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    f.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    f.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "3M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nothere.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "1M",
    ]);
    std::fs::write(f.tpl().join("existing"), b"hi\n").unwrap();
    std::fs::create_dir(f.tpl().join("d")).unwrap();
    let b = Check::Bytes;
    // Images, with every option and the Formatting line in its order.
    for (args, files) in [
        (&["create", "-f", "qcow2", "a.qcow2", "1G"][..], &["a.qcow2"][..]),
        (&["create", "-f", "qcow2", "-o", "compat=0.10", "b.qcow2", "1G"], &["b.qcow2"]),
        (&["create", "-f", "qcow2", "-o", "compat=v2", "b.qcow2", "1G"], &["b.qcow2"]),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=16k,lazy_refcounts=on,refcount_bits=8,extended_l2=on,compression_type=zstd",
                "c.qcow2",
                "1G",
            ],
            &["c.qcow2"],
        ),
        (
            &["create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "c.qcow2", "100M"],
            &["c.qcow2"],
        ),
        (&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "d.qcow2"], &["d.qcow2"]),
        (&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "d.qcow2", "5M"], &["d.qcow2"]),
        (&["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "raw", "d.qcow2"], &["d.qcow2"]),
        (&["create", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "d/c.qcow2"], &["d/c.qcow2"]),
        (
            &["create", "-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "d.qcow2"],
            &["d.qcow2"],
        ),
        (&["create", "-f", "qcow2", "-u", "-b", "we,ird", "-F", "qcow2", "d.qcow2", "1M"], &["d.qcow2"]),
        (
            &["create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2", "-o", "preallocation=metadata", "d.qcow2"],
            &["d.qcow2"],
        ),
        (&["create", "-f", "qcow2", "-o", "preallocation=metadata", "e.qcow2", "10M"], &["e.qcow2"]),
        (&["create", "-f", "qcow2", "-o", "preallocation=falloc", "e.qcow2", "10M"], &["e.qcow2"]),
        (&["create", "-f", "qcow2", "-o", "preallocation=full", "e.qcow2", "3M"], &["e.qcow2"]),
        (
            &["create", "-f", "qcow2", "-o", "data_file=x.data,data_file_raw=on", "f.qcow2", "1M"],
            &["f.qcow2", "x.data"],
        ),
        (&["create", "-f", "qcow2", "-o", "data_file=x.data", "f.qcow2", "1M"], &["f.qcow2", "x.data"]),
        (&["create", "-f", "qcow2", "-o", "size=5M,lazy_refcounts,nolazy_refcounts,id=x", "h.qcow2"], &["h.qcow2"]),
        (&["create", "-f", "qcow2", "-o", "lazy_refcounts=yes", "h.qcow2", "1M"], &["h.qcow2"]),
        (&["create", "-f", "qcow2", "h.qcow2", "1000"], &["h.qcow2"]),
        (&["create", "-f", "qcow2", "h.qcow2", "0"], &["h.qcow2"]),
        (&["create", "-q", "-f", "qcow2", "h.qcow2", "1.5k"], &["h.qcow2"]),
        (&["create", "r.img", "10M"], &["r.img"]),
        (&["create", "r.img", "1001"], &["r.img"]),
        (&["create", "-f", "raw", "-o", "preallocation=full", "r.img", "1M"], &["r.img"]),
        (&["create", "-f", "raw", "-o", "preallocation=falloc,nocow=on,extent_size_hint=1M", "r.img", "1M"], &["r.img"]),
        (&["create", "file:r.img", "1M"], &["r.img"]),
        (&["create", "r.img", "1M", "-f", "qcow2"], &["r.img"]),
    ] {
        f.case(args, files, b);
    }
    // Errors, before and after the Formatting line (a failed qcow2 creation deletes
    // the file, even one that existed).
    for (args, files) in [
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k,extended_l2=on",
                "existing",
                "1G",
            ][..],
            &["existing"][..],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=1.2",
                "existing",
                "1M",
            ],
            &["existing"],
        ),
        (
            &["create", "-f", "qcow2", "-o", "foo=1", "existing", "1M"],
            &["existing"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=8",
                "c.qcow2",
                "1G",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,extended_l2=on",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,compression_type=zstd",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,data_file=dd",
                "c.qcow2",
                "1G",
            ],
            &["c.qcow2", "dd"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=1000",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=3",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=-1",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "backing_fmt=raw",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "data_file_raw=on",
                "c.qcow2",
                "1G",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "data_file=d2,data_file_raw=on",
                "c.qcow2",
            ],
            &["c.qcow2", "d2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "c.qcow2",
            ],
            &[],
        ),
        (
            &["create", "-f", "qcow2", "-b", "base.qcow2", "c.qcow2", "1G"],
            &["c.qcow2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "base.qcow2",
                "c.qcow2",
                "1G",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "nonexist.qcow2",
                "-F",
                "qcow2",
                "c.qcow2",
                "1G",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "nonexist.qcow2",
                "-F",
                "qcow2",
                "c.qcow2",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "c.qcow2",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "c.qcow2",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "d/c.qcow2",
            ],
            &[],
        ),
        (
            &[
                "create", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", "c.qcow2",
            ],
            &[],
        ),
        (
            &["create", "-f", "qcow2", "-b", "", "-F", "qcow2", "c.qcow2"],
            &[],
        ),
        (
            &[
                "create", "-f", "qcow2", "-F", "foo", "-b", "base.raw", "c.qcow2",
            ],
            &[],
        ),
        (
            &[
                "create", "-f", "qcow2", "-F", "foo", "-u", "-b", "base.raw", "c.qcow2", "1M",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create", "-f", "raw", "-b", "base.raw", "-F", "raw", "c.raw",
            ],
            &[],
        ),
        (&["create", "-f", "raw", "-F", "raw", "c.raw", "1M"], &[]),
        (
            &["create", "-f", "qcow2", "-o", "size=1M", "c.qcow2", "1M"],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "preallocation=bogus",
                "c.qcow2",
                "1M",
            ],
            &["c.qcow2"],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compression_type=lz4",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=maybe",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=abc",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=16E",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=abc",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "encryption=on,encrypt.format=luks",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=1.2,preallocation=bogus,compression_type=lz4,refcount_bits=3",
                "c.qcow2",
                "1M",
            ],
            &[],
        ),
        (&["create", "-f", "qcow2", "c.qcow2", "100P"], &["c.qcow2"]),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "preallocation=metadata",
                "c.raw",
                "1M",
            ],
            &["c.raw"],
        ),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "preallocation=bogus",
                "c.raw",
                "1M",
            ],
            &["c.raw"],
        ),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "extent_size_hint=5G",
                "c.raw",
                "1M",
            ],
            &["c.raw"],
        ),
        (&["create", "-f", "raw", "c.raw", "100P"], &["c.raw"]),
        (&["create", "-f", "qcow2", "nodir/c.qcow2", "1M"], &[]),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "data_file=nodir/d",
                "c.qcow2",
                "1M",
            ],
            &["c.qcow2"],
        ),
        (&["create", "-f", "foo", "c", "1M"], &[]),
        (&["create", "a:b", "1M"], &[]),
        (&["create", "-f", "qcow2", "-o", ",", "c.qcow2", "1M"], &[]),
        (&["create", "-f", "qcow2", "-o", "a,", "c.qcow2", "1M"], &[]),
        (
            &["create", "-f", "qcow2", "-o", "a,,", "c.qcow2", "1M"],
            &[],
        ),
        (&["create"], &[]),
        (&["create", "x", "1M", "2M"], &[]),
        (&["create", "x", "-1"], &[]),
        (&["create", "x", "1x"], &[]),
        (&["create", "x", "9E"], &[]),
        (&["create", "--bogus"], &[]),
        (&["create", "-f"], &[]),
    ] {
        f.case(args, files, b);
    }
    // Option help and command help.
    for args in [
        &["create", "-f", "qcow2", "-o", "help"][..],
        &["create", "-f", "qcow2", "-o", "size=abc,?", "x.qcow2"],
        &["create", "-o", "help"],
        &["create", "-f", "raw", "-o", "help", "x"],
        &["create", "-f", "foo", "-o", "help"],
        &["create", "-o", "help", "a:b"],
        &["create", "--help"],
    ] {
        f.case(args, &[], b);
    }
}

#[test]
fn resize_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    f.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    f.qemu_io("a.qcow2", "qcow2", &["write -P 1 0 1M"]);
    f.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    f.qemu_io("r.raw", "raw", &["write -P 2 0 1M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    f.qemu_io("v2.qcow2", "qcow2", &["write -P 3 100k 1k"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4k",
        "l.qcow2",
        "1M",
    ]);
    f.qemu_io("l.qcow2", "qcow2", &["write -P 3 100k 100k"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,refcount_bits=1",
        "c.qcow2",
        "4M",
    ]);
    f.qemu_io(
        "c.qcow2",
        "qcow2",
        &["write -c -P 3 0 64k", "write -c -P 4 3M 64k"],
    );
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k",
        "x.qcow2",
        "1M",
    ]);
    f.qemu_io("x.qcow2", "qcow2", &["write -P 2 0 7k"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.data",
        "d.qcow2",
        "1M",
    ]);
    f.qemu_io("d.qcow2", "qcow2", &["write -P 5 0 1M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=e.data,data_file_raw=on",
        "e.qcow2",
        "1M",
    ]);
    f.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2",
    ]);
    std::fs::create_dir(f.tpl().join("sub")).unwrap();
    let s = Check::Same;
    for (args, files) in [
        (&["resize", "a.qcow2", "2M"][..], &["a.qcow2"][..]),
        (&["resize", "a.qcow2", "+1M"], &["a.qcow2"]),
        (&["resize", "-q", "a.qcow2", "+1000"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "-512k"], &["a.qcow2"]),
        (&["resize", "--shrink", "a.qcow2", "-512k"], &["a.qcow2"]),
        (&["resize", "--shrink", "a.qcow2", "-1000"], &["a.qcow2"]),
        (
            &["resize", "a.qcow2", "--shrink", "--", "-512k"],
            &["a.qcow2"],
        ),
        (
            &["resize", "-q", "a.qcow2", "-512k", "--shrink"],
            &["a.qcow2"],
        ),
        (&["resize", "a.qcow2", "-q", "-512k"], &["a.qcow2"]),
        (&["resize", "-512k", "a.qcow2"], &["a.qcow2"]),
        (
            &["resize", "--sh", "--pre=full", "a.qcow2", "3M"],
            &["a.qcow2"],
        ),
        (
            &["resize", "--preallocation=metadata", "a.qcow2", "+100M"],
            &["a.qcow2"],
        ),
        (
            &["resize", "--preallocation=falloc", "a.qcow2", "+1M"],
            &["a.qcow2"],
        ),
        (
            &["resize", "--preallocation=full", "a.qcow2", "512k"],
            &["a.qcow2"],
        ),
        (
            &["resize", "--preallocation=bogus", "a.qcow2", "+1M"],
            &["a.qcow2"],
        ),
        (&["resize", "a.qcow2", "0"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "-2M"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "100P"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "+8E"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "16E"], &["a.qcow2"]),
        (&["resize", "a.qcow2", "+-1M"], &["a.qcow2"]),
        (&["resize", "a.qcow2", ""], &["a.qcow2"]),
        (&["resize", "a.qcow2", " 2M"], &["a.qcow2"]),
        (&["resize", "a.qcow2"], &[]),
        (&["resize"], &[]),
        (&["resize", "a.qcow2", "1M", "2M", "--bogus"], &[]),
        (&["resize", "a.qcow2", "--bogus", "1M"], &[]),
        (&["resize", "a.qcow2", "-x"], &[]),
        (&["resize", "-U", "a.qcow2", "2M"], &[]),
        (&["resize", "nonexist", "1M"], &[]),
        (&["resize", "sub", "1M"], &[]),
        (&["resize", "r.raw", "2M"], &["r.raw"]),
        (&["resize", "r.raw", "+1000"], &["r.raw"]),
        (&["resize", "r.raw", "1000"], &["r.raw"]),
        (
            &["resize", "--shrink", "-f", "raw", "r.raw", "1000"],
            &["r.raw"],
        ),
        (
            &[
                "resize",
                "-f",
                "raw",
                "--preallocation=falloc",
                "r.raw",
                "+1M",
            ],
            &["r.raw"],
        ),
        (
            &[
                "resize",
                "-f",
                "raw",
                "--preallocation=full",
                "r.raw",
                "+1M",
            ],
            &["r.raw"],
        ),
        (
            &["resize", "--preallocation=metadata", "r.raw", "+1M"],
            &["r.raw"],
        ),
        (&["resize", "-f", "qcow2", "r.raw", "+1M"], &["r.raw"]),
        (&["resize", "-f", "raw", "a.qcow2", "+64k"], &["a.qcow2"]),
        (&["resize", "v2.qcow2", "4M"], &["v2.qcow2"]),
        (&["resize", "--shrink", "v2.qcow2", "64k"], &["v2.qcow2"]),
        (&["resize", "l.qcow2", "2G"], &["l.qcow2"]),
        (&["resize", "--shrink", "l.qcow2", "8k"], &["l.qcow2"]),
        (&["resize", "c.qcow2", "1G"], &["c.qcow2"]),
        (&["resize", "--shrink", "c.qcow2", "1M"], &["c.qcow2"]),
        (&["resize", "x.qcow2", "+1M"], &["x.qcow2"]),
        (&["resize", "--shrink", "x.qcow2", "5k"], &["x.qcow2"]),
        (&["resize", "d.qcow2", "2M"], &["d.qcow2", "d.data"]),
        (
            &["resize", "--shrink", "d.qcow2", "512k"],
            &["d.qcow2", "d.data"],
        ),
        (
            &["resize", "--preallocation=full", "d.qcow2", "3M"],
            &["d.qcow2", "d.data"],
        ),
        (&["resize", "e.qcow2", "2M"], &["e.qcow2", "e.data"]),
        (&["resize", "o.qcow2", "4M"], &["o.qcow2", "a.qcow2"]),
        (&["resize", "--help"], &[]),
    ] {
        f.case(args, files, s);
    }
    // Images qemu-img and oxcow lay out the same way stay byte-identical.
    for (args, files) in [
        (&["resize", "a.qcow2", "2G"][..], &["a.qcow2"][..]),
        (&["resize", "--shrink", "a.qcow2", "512k"], &["a.qcow2"]),
        (&["resize", "d.qcow2", "2M"], &["d.qcow2", "d.data"]),
        (
            &["resize", "--shrink", "d.qcow2", "512k"],
            &["d.qcow2", "d.data"],
        ),
        (&["resize", "e.qcow2", "2M"], &["e.qcow2", "e.data"]),
        (&["resize", "-f", "raw", "r.raw", "+1000"], &["r.raw"]),
    ] {
        f.case(args, files, Check::Bytes);
    }
}

/// `qemu-img map --output=json` of `f` in `dir`.
fn map_json(dir: &Path, f: &str) -> String {
    let o = qemu_img_in(dir, &["map", "-U", "--output=json", f]);
    assert!(o.status.success(), "map {f}: {o:?}");
    text(&o.stdout)
}

/// Growing an image whose backing file is longer than it: QEMU zeroes the new area
/// (zero flags, zero bytes for a partial head cluster) so that the backing file does
/// not show through, and refuses on v2 images, which have no zero flag (unless
/// `falloc`/`full` preallocation gives the area clusters of zeros). Same output,
/// content, clean check and the same map, every preallocation mode.
#[test]
fn resize_over_a_longer_backing_file_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    for (name, compat) in [("b3.qcow2", "1.1"), ("b2.qcow2", "0.10")] {
        f.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            name,
            "4M",
        ]);
        f.qemu_io(name, "qcow2", &["write -P 0xaa 0 4M"]);
    }
    let top = |name: &str, backing: &str, opts: &str, size: &str| {
        f.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-o", opts, "-b", backing, "-F", "qcow2", name, size,
        ]);
    };
    top("t3.qcow2", "b3.qcow2", "compat=1.1", "1M");
    top("u3.qcow2", "b3.qcow2", "compat=1.1", "1000k");
    top("w3.qcow2", "b3.qcow2", "compat=1.1", "1000k");
    f.qemu_io("w3.qcow2", "qcow2", &["write -P 0xbb 960k 8k"]);
    top("x3.qcow2", "b3.qcow2", "extended_l2=on", "1001k");
    f.qemu_io("x3.qcow2", "qcow2", &["write -P 0xbb 960k 8k"]);
    top("s3.qcow2", "b3.qcow2", "cluster_size=4k", "1001k");
    top("t2.qcow2", "b2.qcow2", "compat=0.10", "1M");
    top("u2.qcow2", "b2.qcow2", "compat=0.10", "1000k");
    top("p2.qcow2", "b2.qcow2", "compat=0.10", "1M");
    f.qemu_img(&["snapshot", "-c", "s1", "p2.qcow2"]);
    let mut cases: Vec<Vec<String>> = Vec::new();
    for img in ["t3", "u3", "w3", "x3", "s3", "t2", "u2"] {
        for size in ["3000k", "600M"] {
            for pre in ["off", "metadata", "falloc", "full"] {
                if size == "600M" && pre == "full" {
                    continue;
                }
                cases.push(
                    [
                        "resize",
                        "--preallocation",
                        pre,
                        &format!("{img}.qcow2"),
                        size,
                    ]
                    .map(String::from)
                    .to_vec(),
                );
            }
        }
    }
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let img = args[3];
        let (_, q, x) = f.case(&args, &[img], Check::Same);
        // QEMU preallocates before it fails on v2 (oxcow fails first).
        if !(img.ends_with("2.qcow2") && args[2] == "metadata") {
            assert_eq!(map_json(&x, img), map_json(&q, img), "map after {args:?}");
        }
    }
    // A v2 image with snapshots cannot be resized at all: that error comes first.
    f.case(&["resize", "p2.qcow2", "3M"], &["p2.qcow2"], Check::Bytes);
    // Without preallocation, the very same bytes.
    for img in ["t3.qcow2", "u3.qcow2", "w3.qcow2", "x3.qcow2", "s3.qcow2"] {
        f.case(&["resize", img, "3000k"], &[img], Check::Bytes);
        f.case(&["resize", img, "+1G"], &[img], Check::Bytes);
    }
}

/// A chain base <- mid <- top (and the same under sub/), other images to rebase onto.
fn chain_fixture() -> Fixture {
    let f = Fixture::new();
    f.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    f.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 1M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    f.qemu_io("mid.qcow2", "qcow2", &["write -P 2 1M 1M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    f.qemu_io(
        "top.qcow2",
        "qcow2",
        &["write -P 3 2M 64k", "write -z 3M 64k", "discard 0 64k"],
    );
    std::fs::create_dir(f.tpl().join("sub")).unwrap();
    for n in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(f.tpl().join(n), f.tpl().join("sub").join(n)).unwrap();
    }
    f.qemu_img(&["create", "-q", "-f", "qcow2", "other.qcow2", "8M"]);
    f.qemu_io(
        "other.qcow2",
        "qcow2",
        &["write -P 1 0 512k", "write -P 7 3M 1M", "write -z 6M 64k"],
    );
    f.qemu_img(&["create", "-q", "-f", "raw", "small.raw", "1536k"]);
    f.qemu_io("small.raw", "raw", &["write -P 9 0 1536k"]);
    f.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    // Other layouts over a base with 4 KiB clusters.
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "b4k.qcow2",
        "3M",
    ]);
    f.qemu_io(
        "b4k.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -P 4 2044k 8k"],
    );
    for (name, opts) in [
        ("ext.qcow2", "extended_l2=on"),
        ("v2.qcow2", "compat=0.10"),
        ("c512.qcow2", "cluster_size=512"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("df.qcow2", "data_file=df.data"),
    ] {
        f.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "b4k.qcow2",
            "-F",
            "qcow2",
            name,
            "8M",
        ]);
        f.qemu_io(
            name,
            "qcow2",
            &[
                "write -P 3 100k 4k",
                "write -P 5 5M 1k",
                "write -z 2040k 8k",
            ],
        );
    }
    f.qemu_img(&["create", "-q", "-f", "qcow2", "nob.qcow2", "8M"]);
    f.qemu_io("nob.qcow2", "qcow2", &["write -P 8 0 64k"]);
    f
}

#[test]
fn rebase_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = chain_fixture();
    let s = Check::Same;
    for (args, files) in [
        (
            &[
                "rebase",
                "-p",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ][..],
            &["top.qcow2", "mid.qcow2"][..],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            &["top.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            &["top.qcow2"],
        ),
        (
            &["rebase", "-p", "-b", "small.raw", "-F", "raw", "top.qcow2"],
            &["top.qcow2"],
        ),
        (&["rebase", "-p", "-b", "", "top.qcow2"], &["top.qcow2"]),
        (
            &["rebase", "-b", "", "-F", "qcow2", "top.qcow2"],
            &["top.qcow2"],
        ),
        (&["rebase", "-b", "base.qcow2", "top.qcow2"], &["top.qcow2"]),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "base.qcow2",
            ],
            &["base.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "sub/top.qcow2",
            ],
            &["sub/top.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "../base.qcow2",
                "-F",
                "qcow2",
                "sub/top.qcow2",
            ],
            &["sub/top.qcow2"],
        ),
        (
            &["rebase", "-p", "-b", "", "sub/top.qcow2"],
            &["sub/top.qcow2"],
        ),
        (
            &[
                "rebase",
                "-q",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "ext.qcow2",
            ],
            &["ext.qcow2"],
        ),
        (&["rebase", "-p", "-b", "", "ext.qcow2"], &["ext.qcow2"]),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "v2.qcow2",
            ],
            &["v2.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "c512.qcow2",
            ],
            &["c512.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "lazy.qcow2",
            ],
            &["lazy.qcow2"],
        ),
        (&["rebase", "-p", "-b", "", "df.qcow2"], &["df.qcow2"]),
        (
            &[
                "rebase",
                "-p",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
                "nob.qcow2",
            ],
            &["nob.qcow2"],
        ),
        (&["rebase", "-c", "-b", "", "top.qcow2"], &["top.qcow2"]),
        (&["rebase", "top.qcow2"], &[]),
        (&["rebase", "-b", "x"], &[]),
        (&["rebase", "-b", "x", "a", "b"], &[]),
        (
            &["rebase", "-b", "nonexist.qcow2", "-F", "qcow2", "top.qcow2"],
            &["top.qcow2"],
        ),
        (
            &["rebase", "-p", "-b", "base.qcow2", "-F", "foo", "top.qcow2"],
            &["top.qcow2"],
        ),
        (&["rebase", "-b", "base.qcow2", "nonexist"], &[]),
        (
            &["rebase", "-b", "mid.qcow2", "-F", "qcow2", "mid.qcow2"],
            &["mid.qcow2"],
        ),
        (
            &["rebase", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2"],
            &["base.qcow2"],
        ),
        (
            &[
                "rebase",
                "-p",
                "-t",
                "bogus",
                "-b",
                "base.qcow2",
                "top.qcow2",
            ],
            &[],
        ),
        (
            &["rebase", "-T", "bogus", "-b", "base.qcow2", "top.qcow2"],
            &[],
        ),
        (
            &["rebase", "-b", "base.qcow2", "-F", "qcow2", "r.raw"],
            &["r.raw"],
        ),
        (&["rebase", "-u", "-f", "raw", "r.raw"], &["r.raw"]),
        (
            &["rebase", "-u", "-b", "", "-f", "raw", "r.raw"],
            &["r.raw"],
        ),
        (
            &[
                "rebase",
                "-c",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-f",
                "raw",
                "r.raw",
            ],
            &["r.raw"],
        ),
        (&["rebase", "--help"], &[]),
    ] {
        f.case(args, files, s);
    }
    // -u changes the header only: the same bytes as qemu-img's.
    for (args, files) in [
        (
            &["rebase", "-u", "-b", "foo.qcow2", "-F", "raw", "top.qcow2"][..],
            &["top.qcow2"][..],
        ),
        (
            &["rebase", "-u", "-p", "-b", "", "top.qcow2"],
            &["top.qcow2"],
        ),
        (&["rebase", "-u", "top.qcow2"], &["top.qcow2"]),
        (
            &["rebase", "-u", "-b", "foo.qcow2", "top.qcow2"],
            &["top.qcow2"],
        ),
    ] {
        f.case(args, files, Check::Bytes);
    }
}

#[test]
fn commit_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = chain_fixture();
    // Commits of other layouts into their bases.
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "b2m.qcow2",
        "4M",
    ]);
    f.qemu_io("b2m.qcow2", "qcow2", &["write -P 1 0 3M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "b2m.qcow2",
        "-F",
        "qcow2",
        "t2.qcow2",
    ]);
    f.qemu_io(
        "t2.qcow2",
        "qcow2",
        &["write -P 3 100k 8k", "write -z 1M 64k", "write -z 2M 2k"],
    );
    f.qemu_img(&["create", "-q", "-f", "raw", "braw.raw", "4M"]);
    f.qemu_io("braw.raw", "raw", &["write -P 1 0 1M"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "braw.raw",
        "-F",
        "raw",
        "t3.qcow2",
    ]);
    f.qemu_io(
        "t3.qcow2",
        "qcow2",
        &["write -P 3 100k 8k", "write -z 2M 64k"],
    );
    f.qemu_img(&["create", "-q", "-f", "qcow2", "bs.qcow2", "4M"]);
    f.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "bs.qcow2", "-F", "qcow2", "t4.qcow2",
    ]);
    f.qemu_io("t4.qcow2", "qcow2", &["write -P 3 0 128k"]);
    f.qemu_img(&["snapshot", "-c", "s1", "t4.qcow2"]);
    f.qemu_io("t4.qcow2", "qcow2", &["write -P 4 64k 128k"]);
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=t6.data",
        "-b",
        "bs.qcow2",
        "-F",
        "qcow2",
        "t6.qcow2",
    ]);
    f.qemu_io(
        "t6.qcow2",
        "qcow2",
        &["write -P 3 0 128k", "write -P 3 1M 1k"],
    );

    let s = Check::Same;
    for (args, files) in [
        (
            &["commit", "top.qcow2"][..],
            &["top.qcow2", "mid.qcow2"][..],
        ),
        (&["commit", "-q", "mid.qcow2"], &["mid.qcow2", "base.qcow2"]),
        (&["commit", "-d", "top.qcow2"], &["top.qcow2", "mid.qcow2"]),
        (
            &["commit", "-b", "base.qcow2", "top.qcow2"],
            &["top.qcow2", "mid.qcow2", "base.qcow2"],
        ),
        (
            &["commit", "-b", "./base.qcow2", "-r", "1M", "top.qcow2"],
            &["top.qcow2", "base.qcow2"],
        ),
        (
            &["commit", "-b", "base.qcow2", "sub/top.qcow2"],
            &["sub/top.qcow2", "sub/base.qcow2"],
        ),
        (
            &["commit", "-b", "sub/base.qcow2", "sub/top.qcow2"],
            &["sub/top.qcow2"],
        ),
        (&["commit", "-b", "nothere", "top.qcow2"], &["top.qcow2"]),
        (&["commit", "-b", "top.qcow2", "top.qcow2"], &["top.qcow2"]),
        (&["commit", "base.qcow2"], &["base.qcow2"]),
        (&["commit", "ext.qcow2"], &["ext.qcow2", "b4k.qcow2"]),
        (&["commit", "v2.qcow2"], &["v2.qcow2", "b4k.qcow2"]),
        (&["commit", "c512.qcow2"], &["c512.qcow2", "b4k.qcow2"]),
        (&["commit", "lazy.qcow2"], &["lazy.qcow2", "b4k.qcow2"]),
        (&["commit", "t2.qcow2"], &["t2.qcow2", "b2m.qcow2"]),
        (&["commit", "t3.qcow2"], &["t3.qcow2", "braw.raw"]),
        (&["commit", "t4.qcow2"], &["t4.qcow2", "bs.qcow2"]),
        (&["commit", "t6.qcow2"], &["t6.qcow2", "bs.qcow2"]),
        (&["commit"], &[]),
        (&["commit", "a", "b"], &[]),
        (&["commit", "-t", "bogus", "top.qcow2"], &[]),
        (&["commit", "-r", "abc", "top.qcow2"], &[]),
        (&["commit", "nonexist"], &[]),
        (&["commit", "r.raw"], &["r.raw"]),
        (&["commit", "-f", "raw", "top.qcow2"], &["top.qcow2"]),
        (&["commit", "--help"], &[]),
    ] {
        f.case(args, files, s);
    }
    // The common case gives qemu-img's very bytes: the base's data and the emptied
    // image.
    f.case(
        &["commit", "top.qcow2"],
        &["top.qcow2", "mid.qcow2"],
        Check::Bytes,
    );
    f.case(
        &["commit", "t3.qcow2"],
        &["t3.qcow2", "braw.raw"],
        Check::Bytes,
    );
    // Progress: qemu-img's updates depend on timing, its first and last do not.
    let (q, x) = f.copies();
    let o = run(&f.ox, &x, &["commit", "-p", "top.qcow2"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(
        out.ends_with("    (100.00/100%)\r\nImage committed.\n"),
        "{out:?}"
    );
    let qo = run(Path::new("qemu-img"), &q, &["commit", "-p", "top.qcow2"]);
    assert!(text(&qo.stdout).ends_with("    (100.00/100%)\r\nImage committed.\n"));
    same_image(&q, &x, "mid.qcow2", "commit -p");
}

/// oxcow's own results chained: create, write, resize, rebase, commit, and every
/// image stays clean and reads as qemu-img's.
#[test]
fn command_sequence_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let (q, x) = f.copies();
    let steps: &[&[&str]] = &[
        &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
        &["resize", "top.qcow2", "+4M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "new.qcow2",
            "8M",
        ],
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
        &["commit", "top.qcow2"],
        &["resize", "--shrink", "new.qcow2", "6M"],
        &["rebase", "-b", "", "top.qcow2"],
    ];
    let writes: &[(usize, &str, &str)] = &[
        (1, "base.qcow2", "write -P 1 0 2M"),
        (3, "top.qcow2", "write -P 2 3M 2M"),
        (4, "new.qcow2", "write -P 3 1M 4k"),
        (6, "top.qcow2", "write -P 4 5M 64k"),
    ];
    for (i, args) in steps.iter().enumerate() {
        for (at, img, cmd) in writes {
            if *at == i {
                for d in [&q, &x] {
                    let o = run(Path::new("qemu-io"), d, &["-c", cmd, img]);
                    assert!(o.status.success(), "{o:?}");
                }
            }
        }
        let qo = run(Path::new("qemu-img"), &q, args);
        let xo = run(&f.ox, &x, args);
        assert_same_output(&format!("{args:?}"), &xo, &qo);
        for img in ["base.qcow2", "top.qcow2", "new.qcow2"] {
            if q.join(img).exists() {
                same_image(&q, &x, img, &format!("{img} after {args:?}"));
            }
        }
    }
}
