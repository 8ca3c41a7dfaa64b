//! `check` of damaged snapshot tables against qemu-img 10 as the oracle. Images with
//! internal snapshots are made by qemu-img, then their snapshot table is damaged one
//! way at a time: nb_snapshots one too many or above 65536, a snapshot's L1 table
//! unaligned or too large, extra data too large or missing, the table offset
//! unaligned, the table past the end of the file, a table above 64 MiB. For each,
//! on copies of the same image, both tools must give the same stdout, stderr and
//! exit code for `check`, `--output=json`, `-r leaks` and `-r all`; then
//! `qemu-img check` must say the same of both repaired copies, and both must read
//! the same (and, where qemu-img's repair succeeds, the same as before the damage).

mod support;

use std::path::Path;
use support::{have_qemu, Scratch as Dir, Setup, C_LOCALE};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            run_env: C_LOCALE,
            sh_env: C_LOCALE,
            sh_prelude: "ulimit -c 0\n",
            ..Setup::default()
        })
    }

    /// Fresh copies of `image` as q/IMAGE (for qemu-img) and o/IMAGE (for oxcow).
    fn copies(&self, image: &str) {
        for d in ["q", "o"] {
            let _ = std::fs::remove_dir_all(self.path(d));
            std::fs::create_dir(self.path(d)).unwrap();
            std::fs::copy(self.path(image), self.path(d).join(image)).unwrap();
        }
    }

    /// `check ARGS IMAGE` by both tools on their own copies: same stdout, stderr and
    /// exit code. With `-r`, the repaired copies then check and read alike. Returns
    /// qemu-img's exit code.
    fn same(&self, args: &[&str], image: &str, before: &[u8]) -> i32 {
        self.copies(image);
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
        if args.contains(&"-r") {
            let cq = self.run(Path::new("qemu-img"), &["check", &qi]);
            let co = self.run(Path::new("qemu-img"), &["check", &oi]);
            assert_eq!(
                t(&co.stdout, "o"),
                t(&cq.stdout, "q"),
                "{full:?} {image}: qemu-img check of the repaired copies"
            );
            assert_eq!(
                t(&co.stderr, "o"),
                t(&cq.stderr, "q"),
                "{full:?} {image}: qemu-img check of the repaired copies"
            );
            assert_eq!(co.status.code(), cq.status.code(), "{full:?} {image}");
            let rq = self.raw(&qi);
            let ro = self.raw(&oi);
            assert!(
                rq == ro,
                "{full:?} {image}: the repaired copies read differently"
            );
            if q.status.code() == Some(0) {
                assert!(rq == before, "{full:?} {image}: the data changed");
            }
        }
        q.status.code().unwrap_or(-1)
    }

    /// The guest data, through qemu-img convert.
    fn raw(&self, image: &str) -> Vec<u8> {
        let out = format!("{image}.raw");
        let o = self.run(
            Path::new("qemu-img"),
            &["convert", "-O", "raw", image, &out],
        );
        if !o.status.success() {
            // Unreadable (compared by the caller): qemu-img's message.
            return String::from_utf8_lossy(&o.stderr)
                .replace(image, "IMAGE")
                .into_bytes();
        }
        let b = std::fs::read(self.path(&out)).unwrap();
        std::fs::remove_file(self.path(&out)).unwrap();
        b
    }

    fn modes(&self, image: &str, before: &[u8]) -> i32 {
        let code = self.same(&[], image, before);
        self.same(&["--output=json"], image, before);
        self.same(&["-r", "leaks"], image, before);
        self.same(&["-r", "all"], image, before);
        self.same(&["--output=json", "-r", "all"], image, before);
        code
    }
}

fn be32(f: &[u8], at: u64) -> u32 {
    u32::from_be_bytes(f[at as usize..at as usize + 4].try_into().unwrap())
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Where snapshot table entry `i` of the image starts.
fn entry_at(path: &Path, i: usize) -> u64 {
    let f = std::fs::read(path).unwrap();
    let mut at = u64::from_be_bytes(f[64..72].try_into().unwrap());
    for _ in 0..i {
        let id = u16::from_be_bytes(f[at as usize + 12..at as usize + 14].try_into().unwrap());
        let name = u16::from_be_bytes(f[at as usize + 14..at as usize + 16].try_into().unwrap());
        let extra = be32(&f, at + 36);
        at = (at + 40 + extra as u64 + id as u64 + name as u64).next_multiple_of(8);
    }
    at
}

/// A copy of `base` named `name`, damaged by `f`.
fn damaged(d: &Dir, base: &str, name: &str, f: impl FnOnce(&Path)) -> String {
    std::fs::copy(d.path(base), d.path(name)).unwrap();
    f(&d.path(name));
    name.to_string()
}

/// Two snapshots, data written before and after each.
const MAKE: &str = "qemu-img create -q -f qcow2 $O a.qcow2 4M
    qemu-io -c 'write -P 1 0 64k' a.qcow2 >/dev/null
    qemu-img snapshot -c s1 a.qcow2
    qemu-io -c 'write -P 2 64k 64k' a.qcow2 >/dev/null
    qemu-img snapshot -c s2 a.qcow2
    qemu-io -c 'write -P 3 0 32k' a.qcow2 >/dev/null";

fn make(d: &Dir, opts: &str) -> Vec<u8> {
    d.sh(&MAKE.replace("$O", opts));
    d.raw("a.qcow2")
}

#[test]
fn entries_and_count() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let before = make(&d, "");
    let len = std::fs::metadata(d.path("a.qcow2")).unwrap().len();
    let nb = |n: u32| move |p: &Path| patch(p, 60, &n.to_be_bytes());
    let cases = [
        // One entry too many: what follows the table is read as an entry.
        (damaged(&d, "a.qcow2", "nb3.qcow2", nb(3)), 2),
        // An entry's L1 table unaligned, too large: reported, never repaired.
        (
            damaged(&d, "a.qcow2", "l1off.qcow2", |p| {
                let at = entry_at(p, 0);
                let f = std::fs::read(p).unwrap();
                let l1 = u64::from_be_bytes(f[at as usize..at as usize + 8].try_into().unwrap());
                patch(p, at, &(l1 + 512).to_be_bytes());
            }),
            2,
        ),
        (
            damaged(&d, "a.qcow2", "l1size.qcow2", |p| {
                patch(p, entry_at(p, 0) + 8, &40_000_000u32.to_be_bytes())
            }),
            2,
        ),
        // Too much extra data: the check fails; -r all trims it to 1024 bytes.
        (
            damaged(&d, "a.qcow2", "extra.qcow2", |p| {
                patch(p, entry_at(p, 1) + 36, &2000u32.to_be_bytes())
            }),
            1,
        ),
        // No extra data (no disk size): incomplete.
        (
            damaged(&d, "a.qcow2", "extra0.qcow2", |p| {
                patch(p, entry_at(p, 1) + 36, &0u32.to_be_bytes())
            }),
            2,
        ),
        // The table offset unaligned: the check fails, nothing is repaired.
        (
            damaged(&d, "a.qcow2", "offun.qcow2", |p| {
                let f = std::fs::read(p).unwrap();
                let off = u64::from_be_bytes(f[64..72].try_into().unwrap());
                patch(p, 64, &(off + 8).to_be_bytes())
            }),
            1,
        ),
        // The table at the end of the file, far past it: read as zeros.
        (
            damaged(&d, "a.qcow2", "offeof.qcow2", |p| {
                patch(p, 64, &len.to_be_bytes())
            }),
            2,
        ),
        (
            damaged(&d, "a.qcow2", "offbeyond.qcow2", |p| {
                patch(p, 64, &(len * 10).next_multiple_of(65536).to_be_bytes())
            }),
            2,
        ),
    ];
    for (image, code) in &cases {
        assert_eq!(d.modes(image, &before), *code, "{image}");
    }
    // Combined output orders as qemu-img's (stdout held until the end).
    d.copies("l1off.qcow2");
    let q = d.sh("qemu-img check -r all q/l1off.qcow2 2>&1 || true");
    let o = d.sh("bin/qemu-img check -r all o/l1off.qcow2 2>&1 || true");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).replace("o/", ""),
        String::from_utf8_lossy(&q.stdout).replace("q/", "")
    );
}

#[test]
fn version2_and_too_many() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let before = make(&d, "-o compat=0.10");
    // A version 2 image has no incomplete entries.
    let image = damaged(&d, "a.qcow2", "v2nb3.qcow2", |p| {
        patch(p, 60, &3u32.to_be_bytes())
    });
    d.modes(&image, &before);
    // Above 65536 snapshots: the check fails (the repair, reading 65536 entries of
    // garbage, is not compared).
    let image = damaged(&d, "a.qcow2", "nbmax.qcow2", |p| {
        patch(p, 60, &65537u32.to_be_bytes())
    });
    assert_eq!(d.same(&[], &image, &before), 1);
    assert_eq!(d.same(&["--output=json"], &image, &before), 1);
}

#[test]
fn table_above_64_mib() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let before = make(&d, "");
    // 510 entries of 1024 bytes of extra data and 64 KiB names and IDs, all zeros
    // but their lengths, in a sparse file at the end: the 508th crosses 64 MiB.
    let image = damaged(&d, "a.qcow2", "big.qcow2", |p| {
        let len = std::fs::metadata(p).unwrap().len();
        let start = len.next_multiple_of(65536);
        let mut at = start;
        let mut head = [0u8; 40];
        head[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
        head[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        head[36..40].copy_from_slice(&1024u32.to_be_bytes());
        for _ in 0..510 {
            patch(p, at, &head);
            at = (at + 40 + 1024 + 2 * u16::MAX as u64).next_multiple_of(8);
        }
        patch(p, 60, &510u32.to_be_bytes());
        patch(p, 64, &start.to_be_bytes());
    });
    assert_eq!(d.same(&[], &image, &before), 1);
    d.same(&["--output=json"], &image, &before);
    d.same(&["-r", "all"], &image, &before);
}
