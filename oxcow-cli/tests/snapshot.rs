//! `snapshot` against qemu-img 10 as the oracle: each case copies a template
//! directory of images (made by qemu-img and qemu-io) twice, runs the same command
//! line through qemu-img and through oxcow (a symlink named `qemu-img`), and requires
//! the same stdout, stderr and exit code. Then both images must hold the same
//! snapshots (`snapshot -l`, dates aside when the command created one), the same
//! active disk (`qemu-img compare`) and pass `qemu-img check` cleanly.

mod support;

use std::path::{Path, PathBuf};
use support::{ok, oxcow_link, run, text};

struct Fixture {
    tmp: tempfile::TempDir,
    ox: PathBuf,
}

impl Fixture {
    /// Images: `snaps.qcow2` (three snapshots by QEMU, two named alike, one taken
    /// at another disk size), `empty.qcow2`, `plain.raw`, `df.qcow2` (an external
    /// data file), `rb1.qcow2` (1-bit refcounts, with data), `v2.qcow2` (a snapshot).
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let ox = oxcow_link(tmp.path(), "qemu-img");
        let tpl = tmp.path().join("tpl");
        std::fs::create_dir(&tpl).unwrap();
        let q = |args: &[&str]| ok(&tpl, "qemu-img", args);
        let io = |img: &str, cmds: &[&str]| {
            let mut a = Vec::new();
            for c in cmds {
                a.push("-c");
                a.push(c);
            }
            a.push(img);
            ok(&tpl, "qemu-io", &a);
        };
        q(&["create", "-q", "-f", "qcow2", "snaps.qcow2", "4M"]);
        io(
            "snaps.qcow2",
            &["write -P 1 0 256k", "write -c -P 2 1M 64k"],
        );
        q(&["snapshot", "-c", "one", "snaps.qcow2"]);
        io("snaps.qcow2", &["write -P 3 64k 64k"]);
        q(&["snapshot", "-c", "twin", "snaps.qcow2"]);
        q(&["resize", "-q", "snaps.qcow2", "6M"]);
        io("snaps.qcow2", &["write -P 4 5M 64k"]);
        q(&["snapshot", "-c", "twin", "snaps.qcow2"]);
        io("snaps.qcow2", &["write -P 5 0 64k"]);
        q(&["create", "-q", "-f", "qcow2", "empty.qcow2", "1M"]);
        q(&["create", "-q", "-f", "raw", "plain.raw", "1M"]);
        q(&["create", "-q", "-f", "qcow2", "zero.qcow2", "0"]);
        q(&["create", "-q", "-f", "qcow2", "bm.qcow2", "1M"]);
        io("bm.qcow2", &["write -P 9 0 64k"]);
        q(&["snapshot", "-c", "s", "bm.qcow2"]);
        q(&["bitmap", "--add", "bm.qcow2", "b0"]);
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.data",
            "df.qcow2",
            "1M",
        ]);
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            "rb1.qcow2",
            "1M",
        ]);
        io("rb1.qcow2", &["write -P 6 0 64k"]);
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ]);
        io("v2.qcow2", &["write -P 7 0 64k"]);
        q(&["snapshot", "-c", "old", "v2.qcow2"]);
        io("v2.qcow2", &["write -P 8 0 4k"]);
        q(&["create", "-q", "-f", "qcow2", "extra.qcow2", "1M"]);
        io("extra.qcow2", &["write -P 10 0 64k"]);
        q(&["snapshot", "-c", "unknown-extra", "extra.qcow2"]);
        io("extra.qcow2", &["write -P 11 0 4k"]);
        q(&["snapshot", "-c", "short-extra", "extra.qcow2"]);
        patch_extra_data(&tpl.join("extra.qcow2"));
        // The patch took: no instruction counter for the second snapshot.
        let l = q(&["snapshot", "-l", "extra.qcow2"]);
        assert!(l.lines().nth(3).unwrap().ends_with("--"), "{l}");
        Fixture { tmp, ox }
    }

    fn copy(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(self.tmp.path().join("tpl")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    }
}

/// Rewrites the snapshot table in place: the first entry gets 8 bytes of extra
/// data nobody knows (to be kept byte for byte), the second only the 16 bytes of
/// older QEMUs (no instruction counter).
fn patch_extra_data(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let n = be32(&b, 60) as usize;
    let start = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    let mut at = start;
    let mut table = Vec::new();
    for i in 0..n {
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = be32(&b, at + 36) as usize;
        let mut hdr = b[at..at + 40].to_vec();
        let mut ex = b[at + 40..at + 40 + extra].to_vec();
        match i {
            0 => ex.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]),
            1 => ex.truncate(16),
            _ => {}
        }
        hdr[36..40].copy_from_slice(&(ex.len() as u32).to_be_bytes());
        table.resize(table.len().div_ceil(8) * 8, 0);
        table.extend_from_slice(&hdr);
        table.extend_from_slice(&ex);
        table.extend_from_slice(&b[at + 40 + extra..at + 40 + extra + id + name]);
        at += (40 + extra + id + name).div_ceil(8) * 8;
    }
    b[start..start + table.len()].copy_from_slice(&table);
    std::fs::write(path, b).unwrap();
}

/// `snapshot -l` without the DATE column (for images where each tool created one).
fn list_without_dates(dir: &Path, img: &str) -> Vec<String> {
    ok(dir, "qemu-img", &["snapshot", "-l", img])
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() >= 8 && w[0].bytes().all(|b| b.is_ascii_digit()) {
                // ID TAG VM_SIZE(2 words) DATE(2 words) VM_CLOCK ICOUNT
                format!("{} {} {} {} {} {}", w[0], w[1], w[2], w[3], w[6], w[7])
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn case(f: &Fixture, n: usize, args: &[&str], touched: Option<&str>) {
    let qd = f.copy(&format!("q{n}"));
    let od = f.copy(&format!("o{n}"));
    let want = run(Path::new("qemu-img"), &qd, args);
    let got = run(&f.ox, &od, args);
    assert_eq!(
        (text(&got.stdout), text(&got.stderr), got.status.code()),
        (text(&want.stdout), text(&want.stderr), want.status.code()),
        "qemu-img {args:?}: oxcow (left) and qemu-img (right) differ"
    );
    let Some(img) = touched else { return };
    assert_eq!(
        list_without_dates(&od, img),
        list_without_dates(&qd, img),
        "{args:?}: snapshot lists differ"
    );
    let ours = od.join(img);
    let theirs = qd.join(img);
    ok(
        Path::new("/"),
        "qemu-img",
        &["compare", ours.to_str().unwrap(), theirs.to_str().unwrap()],
    );
    let check = ok(&od, "qemu-img", &["check", img]);
    assert!(check.contains("No errors were found"), "{args:?}: {check}");
    // Every snapshot holds the same contents too.
    for line in list_without_dates(&qd, img).iter().skip(2) {
        let id = line.split(' ').next().unwrap();
        let opt = format!("snapshot.id={id}");
        let a = od.join("a.raw");
        let b = qd.join("b.raw");
        ok(
            &od,
            "qemu-img",
            &["convert", "-l", &opt, "-O", "raw", img, a.to_str().unwrap()],
        );
        ok(
            &qd,
            "qemu-img",
            &["convert", "-l", &opt, "-O", "raw", img, b.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{args:?}: snapshot {id} differs"
        );
    }
}

#[test]
fn list_text_and_errors_match_qemu_img() {
    let f = Fixture::new();
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["snapshot", "-l", "snaps.qcow2"], None),
        (&["snapshot", "snaps.qcow2"], None),
        (&["snapshot", "--list", "-U", "-q", "snaps.qcow2"], None),
        (&["snapshot", "-f", "qcow2", "-l", "v2.qcow2"], None),
        (&["snapshot", "-l", "empty.qcow2"], None),
        (&["snapshot", "-l", "extra.qcow2"], None),
        (&["snapshot", "-l", "plain.raw"], None),
        (&["snapshot", "-f", "raw", "-l", "snaps.qcow2"], None),
        (&["snapshot", "-l", "df.qcow2"], None),
        (&["snapshot", "-l", "missing.qcow2"], None),
        (&["snapshot", "-f", "foo", "-l", "snaps.qcow2"], None),
        (&["snapshot", "--help"], None),
        (&["snapshot"], None),
        (&["snapshot", "-l", "a", "b"], None),
        (&["snapshot", "-l", "-c", "x", "snaps.qcow2"], None),
        (&["snapshot", "-a", "x", "-d", "y", "snaps.qcow2"], None),
        (&["snapshot", "-x", "snaps.qcow2"], None),
        (&["snapshot", "snaps.qcow2", "-c"], None),
        (&["snapshot", "--list=3", "snaps.qcow2"], None),
        (
            &[
                "snapshot",
                "--image-opts",
                "-f",
                "qcow2",
                "-l",
                "snaps.qcow2",
            ],
            None,
        ),
        (&["snapshot", "-U", "-c", "x", "snaps.qcow2"], None),
        // Changes, and their errors.
        (
            &["snapshot", "-a", "nope", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        (
            &["snapshot", "-d", "nope", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        // -d finds by name only: an ID is not found.
        (&["snapshot", "-d", "1", "snaps.qcow2"], Some("snaps.qcow2")),
        (
            &["snapshot", "-d", "twin", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        (
            &["snapshot", "-d", "one", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        // -a finds by ID, then by name; the disk size comes back.
        (&["snapshot", "-a", "1", "snaps.qcow2"], Some("snaps.qcow2")),
        (
            &["snapshot", "-a", "twin", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        (&["snapshot", "-a", "3", "snaps.qcow2"], Some("snaps.qcow2")),
        (
            &["snapshot", "-q", "-c", "one", "snaps.qcow2"],
            Some("snaps.qcow2"),
        ),
        (
            &["snapshot", "-c", "new", "empty.qcow2"],
            Some("empty.qcow2"),
        ),
        (&["snapshot", "-c", "new", "v2.qcow2"], Some("v2.qcow2")),
        (&["snapshot", "-a", "old", "v2.qcow2"], Some("v2.qcow2")),
        (&["snapshot", "-d", "old", "v2.qcow2"], Some("v2.qcow2")),
        // qemu-img 10's long forms take no argument.
        (&["snapshot", "--create", "new", "v2.qcow2"], None),
        (&["snapshot", "--delete=old", "v2.qcow2"], None),
        (&["snapshot", "--apply", "v2.qcow2"], Some("v2.qcow2")),
        (&["snapshot", "-cfoo", "v2.qcow2"], Some("v2.qcow2")),
        (&["snapshot", "-lcfoo", "v2.qcow2"], None),
        (&["snapshot", "-c", "full", "rb1.qcow2"], None),
        // Persistent bitmaps forbid reverting (even to a missing snapshot), not the
        // rest.
        (&["snapshot", "-a", "s", "bm.qcow2"], Some("bm.qcow2")),
        (&["snapshot", "-a", "nope", "bm.qcow2"], Some("bm.qcow2")),
        (&["snapshot", "-c", "t", "bm.qcow2"], Some("bm.qcow2")),
        (&["snapshot", "-d", "s", "bm.qcow2"], Some("bm.qcow2")),
        // A disk of 0 bytes has no L1 table; its snapshot neither.
        (&["snapshot", "-c", "z", "zero.qcow2"], Some("zero.qcow2")),
        (&["snapshot", "-c", "x", "plain.raw"], None),
        (&["snapshot", "-a", "x", "plain.raw"], None),
        (&["snapshot", "-d", "x", "plain.raw"], None),
        (&["snapshot", "-f", "raw", "-c", "x", "plain.raw"], None),
        (&["snapshot", "-c", "x", "df.qcow2"], None),
        (&["snapshot", "-a", "x", "df.qcow2"], None),
        (&["snapshot", "-d", "x", "df.qcow2"], None),
        (&["snapshot", "-c", "x", "missing.qcow2"], None),
    ];
    for (n, (args, touched)) in cases.iter().enumerate() {
        case(&f, n, args, *touched);
    }
}

/// Names longer than QEMU's 255-byte buffer are cut as QEMU cuts them.
#[test]
fn long_names_are_cut_at_255_bytes() {
    let f = Fixture::new();
    let name = "n".repeat(300);
    case(
        &f,
        0,
        &["snapshot", "-c", &name, "empty.qcow2"],
        Some("empty.qcow2"),
    );
    // A 0-byte disk: snapshot, apply and delete leave it without any table, as
    // QEMU leaves it (the header compared byte for byte).
    let d = f.copy("zero");
    for args in [["-c", "z"], ["-a", "z"], ["-d", "z"]] {
        let o = run(&f.ox, &d, &["snapshot", args[0], args[1], "zero.qcow2"]);
        assert!(o.status.success(), "{o:?}");
    }
    let q = f.copy("zero-q");
    for args in [["-c", "z"], ["-a", "z"], ["-d", "z"]] {
        ok(
            &q,
            "qemu-img",
            &["snapshot", args[0], args[1], "zero.qcow2"],
        );
    }
    let ours = std::fs::read(d.join("zero.qcow2")).unwrap();
    let theirs = std::fs::read(q.join("zero.qcow2")).unwrap();
    assert_eq!(ours[..104], theirs[..104], "headers differ");
    assert_eq!(ours.len(), theirs.len(), "file lengths differ");
}

/// The image file with every snapshot's date (date_sec, date_nsec) zeroed.
fn without_dates(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let n = be32(&b, 60);
    let mut at = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    for _ in 0..n {
        b[at + 16..at + 24].fill(0);
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = be32(&b, at + 36) as usize;
        at += (40 + extra + id + name).div_ceil(8) * 8;
    }
    b
}

/// Creating and deleting a snapshot writes the very bytes qemu-img writes (the same
/// clusters allocated in the same order, the same table, freed clusters punched),
/// dates aside.
#[test]
fn create_and_delete_write_what_qemu_writes() {
    let f = Fixture::new();
    // extra.qcow2: unknown extra data kept, short extra data completed, as QEMU does.
    for img in ["snaps.qcow2", "v2.qcow2", "empty.qcow2", "extra.qcow2"] {
        let q = f.copy(&format!("q-{img}"));
        let o = f.copy(&format!("o-{img}"));
        let steps: [&[&str]; 3] = [
            &["snapshot", "-c", "fresh", img],
            &["snapshot", "-d", "fresh", img],
            &["snapshot", "-c", "again", img],
        ];
        for args in steps {
            ok(&q, "qemu-img", args);
            let out = run(&f.ox, &o, args);
            assert!(out.status.success(), "{args:?}: {out:?}");
            assert!(
                without_dates(&o.join(img)) == without_dates(&q.join(img)),
                "{args:?}: the image files differ"
            );
            if img == "extra.qcow2" {
                let b = std::fs::read(o.join(img)).unwrap();
                assert!(
                    b.windows(8)
                        .any(|w| w == [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]),
                    "{args:?}: unknown extra data lost"
                );
            }
        }
    }
}

/// `convert -l` reads a snapshot as qemu-img does (selection by `snapshot.id=` /
/// `snapshot.name=` or a bare ID-or-name, at the current disk size, on the first
/// source only), with its messages and exit codes; the outputs are identical.
#[test]
fn convert_reads_snapshots_as_qemu_img() {
    let f = Fixture::new();
    let cases: &[&[&str]] = &[
        &["-l", "one", "-O", "raw", "snaps.qcow2", "out.img"],
        &["-l", "1", "-O", "raw", "snaps.qcow2", "out.img"],
        &["-l", "twin", "-O", "raw", "snaps.qcow2", "out.img"],
        &["-l", "snapshot.id=3", "-O", "raw", "snaps.qcow2", "out.img"],
        &[
            "-l",
            "snapshot.name=twin",
            "-O",
            "raw",
            "snaps.qcow2",
            "out.img",
        ],
        &[
            "-l",
            "snapshot.id=2,snapshot.name=twin",
            "-O",
            "qcow2",
            "snaps.qcow2",
            "out.img",
        ],
        &[
            "-l",
            "snapshot.id=1,snapshot.name=twin",
            "-O",
            "raw",
            "snaps.qcow2",
            "out.img",
        ],
        &["-l", "nope", "-O", "raw", "snaps.qcow2", "out.img"],
        &["-l", "snapshot.id=9", "-O", "raw", "snaps.qcow2", "out.img"],
        &[
            "-l",
            "snapshot.foo=1",
            "-O",
            "raw",
            "snaps.qcow2",
            "out.img",
        ],
        &["-l", "snapshot.name", "-O", "raw", "snaps.qcow2", "out.img"],
        &[
            "-l",
            "one",
            "-l",
            "3",
            "-O",
            "raw",
            "snaps.qcow2",
            "out.img",
        ],
        &["-l", "old", "-O", "raw", "v2.qcow2", "out.img"],
        &["-l", "x", "-O", "raw", "plain.raw", "out.img"],
        &[
            "-l",
            "one",
            "-O",
            "raw",
            "snaps.qcow2",
            "v2.qcow2",
            "out.img",
        ],
        &[
            "-l",
            "snapshot.id=1",
            "-O",
            "raw",
            "snaps.qcow2",
            "v2.qcow2",
            "out.img",
        ],
    ];
    for (n, args) in cases.iter().enumerate() {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        case(&f, 100 + n, &a, None);
        let (q, o) = (
            f.tmp.path().join(format!("q{}", 100 + n)),
            f.tmp.path().join(format!("o{}", 100 + n)),
        );
        let (qo, oo) = (q.join("out.img"), o.join("out.img"));
        assert_eq!(qo.exists(), oo.exists(), "{args:?}: output file");
        if qo.exists() {
            ok(
                Path::new("/"),
                "qemu-img",
                &["compare", qo.to_str().unwrap(), oo.to_str().unwrap()],
            );
        }
    }
}
