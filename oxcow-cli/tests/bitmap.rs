//! `bitmap` and `convert --bitmaps` against qemu-img 10: each case copies a template
//! directory twice, runs the same command line through qemu-img and through oxcow (a
//! symlink named `qemu-img`), and requires the same stderr, stdout and exit code (the
//! node name QEMU prints, "#blockNNN", is where oxcow prints the file name). Then both
//! images must list the same bitmaps (`qemu-img info`), hold the same dirty ranges
//! and pass `qemu-img check` cleanly.

mod support;

use oxcow::{Image, OpenOptions};
use std::path::{Path, PathBuf};
use support::{ok, oxcow_link, run, text};

struct Fixture {
    tmp: tempfile::TempDir,
    ox: PathBuf,
    n: usize,
}

/// The bitmaps `qemu-img info` lists, as JSON text.
fn bitmap_list(dir: &Path, name: &str) -> String {
    let out = ok(dir, "qemu-img", &["info", "--output=json", "-U", name]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"].to_string()
}

/// Each bitmap's dirty ranges, or why they cannot be read.
type Ranges = Result<Vec<(u64, u64)>, String>;

fn dirty_ranges(path: &Path) -> Vec<(String, Ranges)> {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    img.bitmaps()
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                img.bitmap_dirty_ranges(&b.name).map_err(|e| e.to_string()),
            )
        })
        .collect()
}

impl Fixture {
    /// Images: `a.qcow2` (bitmaps `e` enabled and `d` disabled, with dirty bits),
    /// `src.qcow2` (bitmap `s`, 4 KiB granularity), `bad.qcow2` (bitmap `u` left in
    /// use by a crash, `ok` fine), `v2.qcow2` (compat 0.10), `r.raw`.
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let ox = oxcow_link(tmp.path(), "qemu-img");
        let tpl = tmp.path().join("tpl");
        std::fs::create_dir(&tpl).unwrap();
        let q = |args: &[&str]| ok(&tpl, "qemu-img", args);
        let io = |img: &str, cmd: &str| ok(&tpl, "qemu-io", &["-c", cmd, img]);
        q(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
        q(&["bitmap", "--add", "a.qcow2", "e"]);
        q(&["bitmap", "--add", "-g", "8k", "--disable", "a.qcow2", "d"]);
        io("a.qcow2", "write 100k 10k");
        q(&["bitmap", "--enable", "a.qcow2", "d"]);
        io("a.qcow2", "write 3M 1k");
        q(&["bitmap", "--disable", "a.qcow2", "d"]);
        q(&["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
        q(&["bitmap", "--add", "-g", "4k", "src.qcow2", "s"]);
        io("src.qcow2", "write 1M 9k");
        q(&["create", "-q", "-f", "qcow2", "big.qcow2", "8M"]);
        q(&["bitmap", "--add", "big.qcow2", "s"]);
        q(&["create", "-q", "-f", "qcow2", "bad.qcow2", "4M"]);
        q(&["bitmap", "--add", "bad.qcow2", "u"]);
        q(&["bitmap", "--add", "bad.qcow2", "ok"]);
        io("bad.qcow2", "write 0 4k");
        // Crash with the image open: qemu-io's abort leaves the bitmaps in use;
        // then QEMU removes the use flag of `ok` (a clean open and close).
        let _ = run(
            Path::new("qemu-io"),
            &tpl,
            &["-c", "write 64k 4k", "-c", "abort", "bad.qcow2"],
        );
        q(&["bitmap", "--remove", "bad.qcow2", "ok"]);
        q(&["bitmap", "--add", "bad.qcow2", "ok"]);
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
        q(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
        Fixture { tmp, ox, n: 0 }
    }

    fn copy(&self, to: &Path) {
        std::fs::create_dir(to).unwrap();
        for e in std::fs::read_dir(self.tmp.path().join("tpl")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    /// Runs `args` through both programs and compares everything; returns qemu's
    /// directory.
    fn same(&mut self, args: &[&str]) -> PathBuf {
        self.n += 1;
        let qd = self.tmp.path().join(format!("q{}", self.n));
        let od = self.tmp.path().join(format!("o{}", self.n));
        self.copy(&qd);
        self.copy(&od);
        let q = run(Path::new("qemu-img"), &qd, args);
        let o = run(&self.ox, &od, args);
        let image = args.len().checked_sub(2).map_or("", |i| args[i]);
        let node = node_to_file(&text(&q.stderr), image);
        assert_eq!(text(&o.stderr), node, "stderr of {args:?}");
        assert_eq!(text(&o.stdout), text(&q.stdout), "stdout of {args:?}");
        assert_eq!(o.status.code(), q.status.code(), "exit code of {args:?}");
        for e in std::fs::read_dir(&qd).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if !name.ends_with(".qcow2") || name == "v2.qcow2" {
                continue;
            }
            assert_eq!(
                bitmap_list(&od, &name),
                bitmap_list(&qd, &name),
                "{args:?}: bitmaps of {name}"
            );
            assert_eq!(
                dirty_ranges(&od.join(&name)),
                dirty_ranges(&qd.join(&name)),
                "{args:?}: {name}"
            );
            if name != "bad.qcow2" {
                let c = run(Path::new("qemu-img"), &od, &["check", &name]);
                assert!(
                    c.status.success(),
                    "{args:?}: check {name}: {}",
                    text(&c.stdout)
                );
            }
        }
        qd
    }
}

/// QEMU names images by node name ("'#block123'") in some messages; oxcow by the
/// file name given.
fn node_to_file(s: &str, image: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 6..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(image);
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[test]
fn bitmap_command_like_qemu_img() {
    let mut f = Fixture::new();
    let long = "x".repeat(1024);
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["a.qcow2"],
        vec!["a.qcow2", "b"],
        vec!["--add", "a.qcow2"],
        vec!["--add", "a.qcow2", "b"],
        vec!["--add", "a.qcow2", "e"],
        vec!["--add", "-g", "1000", "a.qcow2", "b"],
        vec!["--add", "-g", "256", "a.qcow2", "b"],
        vec!["--add", "-g", "4G", "a.qcow2", "b"],
        vec!["--add", "-g", "2G", "a.qcow2", "b"],
        vec!["--add", "--granularity=512", "a.qcow2", "b"],
        vec!["--add", "-g", "0", "a.qcow2", "b"],
        vec!["--add", "-g", "1x", "a.qcow2", "b"],
        vec!["--add", "-g", "-5", "a.qcow2", "b"],
        vec!["--add", "a.qcow2", ""],
        vec!["--add", "a.qcow2", &long],
        vec!["--add", "a.qcow2", &long[1..]],
        vec!["--remove", "a.qcow2", "nope"],
        vec!["--remove", "a.qcow2", "e"],
        vec!["--clear", "a.qcow2", "e"],
        vec!["--enable", "a.qcow2", "d"],
        vec!["--disable", "a.qcow2", "e"],
        vec!["--merge", "e", "a.qcow2", "nope"],
        vec!["--merge", "nope", "a.qcow2", "e"],
        vec!["--merge", "e", "a.qcow2", "d"],
        vec!["--merge", "s", "-b", "src.qcow2", "a.qcow2", "d"],
        vec![
            "--merge",
            "s",
            "--source-file",
            "src.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "e",
        ],
        vec![
            "--merge",
            "s",
            "-b",
            "src.qcow2",
            "-F",
            "raw",
            "a.qcow2",
            "e",
        ],
        vec!["--merge", "s", "-b", "big.qcow2", "a.qcow2", "e"],
        vec!["--merge", "s", "-b", "nofile", "a.qcow2", "e"],
        vec!["-g", "64k", "--remove", "a.qcow2", "e"],
        vec!["-b", "a.qcow2", "--add", "a.qcow2", "b"],
        vec!["-F", "qcow2", "--merge", "e", "a.qcow2", "e"],
        vec!["--add", "--disable", "a.qcow2", "b"],
        vec!["--disable", "--add", "a.qcow2", "b"],
        vec!["--add", "--add", "a.qcow2", "w"],
        vec![
            "--add", "--clear", "--merge", "d", "--remove", "a.qcow2", "w",
        ],
        vec!["--add", "-f", "raw", "a.qcow2", "x"],
        vec!["--add", "-f", "raw", "r.raw", "x"],
        vec!["--clear", "-f", "raw", "r.raw", "x"],
        vec!["--add", "a.qcow2", "b", "extra"],
        vec!["--bogus", "a.qcow2", "b"],
        vec!["--format", "qcow2", "--add", "a.qcow2", "b"],
        vec!["--add", "v2.qcow2", "x"],
        vec!["--add", "nofile.qcow2", "x"],
        vec!["--clear", "bad.qcow2", "u"],
        vec!["--enable", "bad.qcow2", "u"],
        vec!["--merge", "ok", "bad.qcow2", "u"],
        vec!["--merge", "u", "bad.qcow2", "ok"],
        vec!["--clear", "bad.qcow2", "ok"],
        vec!["--remove", "bad.qcow2", "u"],
        vec!["--help"],
    ];
    for c in cases {
        let mut args = vec!["bitmap"];
        args.extend(c);
        f.same(&args);
    }
}

#[test]
fn convert_bitmaps_like_qemu_img() {
    let mut f = Fixture::new();
    for c in [
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "a.qcow2",
            "out.qcow2",
        ][..],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "a.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "bad.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "bad.qcow2",
            "out.qcow2",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "r.raw", "out.qcow2"],
        &["convert", "--bitmaps", "-O", "raw", "a.qcow2", "out.raw"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "a.qcow2",
            "src.qcow2",
            "out.qcow2",
        ],
        // Into an existing image that has bitmaps of its own.
        &[
            "convert",
            "-n",
            "--bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "a.qcow2",
        ],
    ] {
        f.same(c);
    }
}
