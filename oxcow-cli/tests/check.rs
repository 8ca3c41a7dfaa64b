//! `check` against qemu-img 10 as the oracle: the same command lines on copies of the
//! same images must give the same stdout, stderr and exit code from both tools, in
//! human and JSON output, with and without `-r leaks|all` and `-q`: clean images of
//! several layouts, leaked clusters, corruptions, compressed and fragmented images,
//! raw images (63), missing files and bad options. oxcow runs through a symlink named
//! `qemu-img`, so its messages carry the same program name.

mod support;

use std::path::Path;
use support::{have_qemu, Scratch as Dir, Setup, C_LOCALE};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            run_env: C_LOCALE,
            sh_prelude: "ulimit -c 0\n",
            ..Setup::default()
        })
    }

    /// `check ARGS IMAGE` by both tools, each on its own copy of `image` (named the
    /// same, in its own directory, so that messages name the same file). Returns
    /// qemu-img's exit code.
    fn same(&self, args: &[&str], image: &str) -> i32 {
        for d in ["q", "o"] {
            let _ = std::fs::remove_dir_all(self.path(d));
            std::fs::create_dir(self.path(d)).unwrap();
            if self.path(image).exists() {
                std::fs::copy(self.path(image), self.path(d).join(image)).unwrap();
            }
        }
        let mut full = vec!["check"];
        full.extend_from_slice(args);
        let qi = format!("q/{image}");
        let oi = format!("o/{image}");
        let q = self.run(Path::new("qemu-img"), &[&full[..], &[qi.as_str()]].concat());
        let o = self.run(&self.ox, &[&full[..], &[oi.as_str()]].concat());
        let t = |b: &[u8], d: &str| String::from_utf8_lossy(b).replace(&format!("{d}/"), "");
        assert_eq!(
            t(&o.stdout, "o"),
            t(&q.stdout, "q"),
            "stdout of {full:?} {image}"
        );
        assert_eq!(
            t(&o.stderr, "o"),
            t(&q.stderr, "q"),
            "stderr of {full:?} {image}"
        );
        assert_eq!(o.status.code(), q.status.code(), "exit of {full:?} {image}");
        // The repaired copies end up alike.
        if args.contains(&"-r") && q.status.code() != Some(1) {
            let cq = self.run(Path::new("qemu-img"), &["check", &qi]);
            let co = self.run(Path::new("qemu-img"), &["check", &oi]);
            assert_eq!(
                co.status.code(),
                cq.status.code(),
                "{full:?} {image}: re-check"
            );
        }
        q.status.code().unwrap_or(-1)
    }

    /// Every output mode of one image.
    fn all_modes(&self, image: &str) -> i32 {
        let code = self.same(&[], image);
        self.same(&["--output=json"], image);
        self.same(&["-q"], image);
        self.same(&["--output", "json", "-q"], image);
        self.same(&["-r", "leaks"], image);
        self.same(&["-r", "all"], image);
        self.same(&["--output=json", "-r", "all"], image);
        self.same(&["-q", "--repair=all"], image);
        code
    }
}

/// Host cluster of guest offset 0 and where its refcount is, for 64 KiB clusters
/// and 16-bit refcounts with one refcount block.
fn refcount_offset(path: &Path, cluster: u64) -> u64 {
    let f = std::fs::read(path).unwrap();
    let be = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
    let reftable = be(48) as usize;
    be(reftable) + cluster * 2
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

const WORKLOAD: &str = "qemu-io -c 'write -P 1 0 128k' -c 'write -c -P 2 1M 128k' \
    -c 'write -P 3 3M 64k' -c 'write -P 4 2M 64k' -c 'write -z 4M 64k' -c 'discard 0 64k'";

#[test]
fn clean_images() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(&format!(
        "qemu-img create -q -f qcow2 a.qcow2 64M; {WORKLOAD} a.qcow2 >/dev/null
         qemu-img create -q -f qcow2 empty.qcow2 1G
         qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k e.qcow2 64M; {WORKLOAD} e.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 64M; {WORKLOAD} v2.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o cluster_size=4k,preallocation=metadata p.qcow2 32M
         qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 over.qcow2; qemu-io -c 'write -P 9 1M 64k' over.qcow2 >/dev/null
         qemu-img create -q -f qcow2 s.qcow2 64M; {WORKLOAD} s.qcow2 >/dev/null
         qemu-img snapshot -c one s.qcow2; qemu-io -c 'write -P 8 0 1M' s.qcow2 >/dev/null
         qemu-img create -q -f qcow2 b.qcow2 8M; qemu-img bitmap --add b.qcow2 b0
         qemu-io -c 'write -P 1 0 64k' b.qcow2 >/dev/null; cp b.qcow2 inuse.qcow2"
    ));
    // A bitmap left in use (a crash of its writer): qemu-img check says nothing of it.
    let f = std::fs::read(d.path("inuse.qcow2")).unwrap();
    let ext = f
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap();
    let dir_off = u64::from_be_bytes(f[ext + 24..ext + 32].try_into().unwrap());
    let flags = u32::from_be_bytes(
        f[dir_off as usize + 12..dir_off as usize + 16]
            .try_into()
            .unwrap(),
    );
    patch(
        &d.path("inuse.qcow2"),
        dir_off + 12,
        &(flags | 1).to_be_bytes(),
    );
    for img in [
        "a.qcow2",
        "empty.qcow2",
        "e.qcow2",
        "v2.qcow2",
        "p.qcow2",
        "s.qcow2",
        "b.qcow2",
        "inuse.qcow2",
    ] {
        assert_eq!(d.all_modes(img), 0, "{img}");
    }
    // A backing file is opened (and its absence reported), not checked.
    d.same(&[], "over.qcow2");
    d.same(&["--output=json"], "over.qcow2");
}

#[test]
fn leaks_and_corruptions() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(&format!(
        "qemu-img create -q -f qcow2 a.qcow2 64M; {WORKLOAD} a.qcow2 >/dev/null"
    ));
    let base = d.path("a.qcow2");
    let len = std::fs::metadata(&base).unwrap().len();
    // A leaked cluster at the end of the file.
    std::fs::copy(&base, d.path("leak.qcow2")).unwrap();
    let end = len.div_ceil(65536);
    patch(&d.path("leak.qcow2"), refcount_offset(&base, end), &[0, 1]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("leak.qcow2"))
        .unwrap()
        .set_len((end + 1) * 65536)
        .unwrap();
    assert_eq!(d.all_modes("leak.qcow2"), 3);
    // A refcount too high on a data cluster: a leak and a COPIED flag error.
    let f = std::fs::read(&base).unwrap();
    let be = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
    let l2 = (be(be(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be(l2 + 8) & 0x00ff_ffff_ffff_fe00) >> 16;
    std::fs::copy(&base, d.path("high.qcow2")).unwrap();
    patch(&d.path("high.qcow2"), refcount_offset(&base, data), &[0, 2]);
    assert_eq!(d.all_modes("high.qcow2"), 2);
    // A refcount of zero: the refcount structure is rebuilt.
    std::fs::copy(&base, d.path("zero.qcow2")).unwrap();
    patch(&d.path("zero.qcow2"), refcount_offset(&base, data), &[0, 0]);
    assert_eq!(d.all_modes("zero.qcow2"), 2);
    // A misaligned data cluster: found, not repairable.
    std::fs::copy(&base, d.path("mis.qcow2")).unwrap();
    patch(
        &d.path("mis.qcow2"),
        l2 as u64 + 8,
        &(be(l2 + 8) | 0x200).to_be_bytes(),
    );
    assert_eq!(d.all_modes("mis.qcow2"), 2);
    // A dirty image (lazy refcounts, crash).
    d.sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 64M
          qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 5M 64k' -c abort dirty.qcow2 >/dev/null 2>&1 || true");
    assert_eq!(d.all_modes("dirty.qcow2"), 2);
}

#[test]
fn unsupported_formats_and_errors() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh("qemu-img create -q -f raw r.img 1M; qemu-img create -q -f qcow2 a.qcow2 1M");
    assert_eq!(d.same(&[], "r.img"), 63);
    assert_eq!(d.same(&["--output=json"], "r.img"), 63);
    assert_eq!(d.same(&["-f", "raw"], "a.qcow2"), 63);
    assert_eq!(d.same(&[], "missing.qcow2"), 1);
    assert_eq!(d.same(&["-r", "bogus"], "a.qcow2"), 1);
    assert_eq!(d.same(&["--output=xml"], "a.qcow2"), 1);
    assert_eq!(d.same(&["-r", "leaks", "-U"], "a.qcow2"), 1);
    assert_eq!(d.same(&["-T", "bogus"], "a.qcow2"), 1);
    assert_eq!(d.same(&["-T", "none", "-U"], "a.qcow2"), 0);
    assert_eq!(d.same(&["-f", "vmdk9"], "a.qcow2"), 1);
    // No file name, or two.
    let q = d.run(Path::new("qemu-img"), &["check"]);
    let o = d.run(&d.ox, &["check"]);
    assert_eq!(o.stderr, q.stderr);
    assert_eq!(o.status.code(), q.status.code());
}
