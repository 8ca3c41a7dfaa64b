//! `bench` against qemu-img 10 as the oracle: the same command lines give the same
//! stdout (apart from the measured seconds), stderr and exit code; images written by
//! `oxcow bench -w` pass `qemu-img check` and read back the pattern where the requests
//! went. oxcow runs through a symlink named `qemu-img`, so its messages carry the same
//! program name. Every test is skipped (with a note) when qemu-img is not installed.

mod support;

use std::path::Path;
use std::process::Command;
use support::{have_qemu, Scratch as Dir, Setup};

impl Dir {
    fn new() -> Dir {
        Dir::with(Setup {
            under: Some(env!("CARGO_TARGET_TMPDIR")),
            ..Setup::default()
        })
    }

    fn create(&self, name: &str, opts: &str, size: &str) {
        self.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, size]);
    }

    /// Runs `bench ARGS` through qemu-img, then oxcow: same exit code, stderr and
    /// stdout once the seconds are masked.
    fn same(&self, args: &[&str]) {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let q = self.run(Path::new("qemu-img"), &full);
        let x = self.oxcow(&full);
        assert_eq!(
            String::from_utf8_lossy(&x.stderr),
            String::from_utf8_lossy(&q.stderr),
            "stderr of {args:?}"
        );
        assert_eq!(
            mask_seconds(&x.stdout),
            mask_seconds(&q.stdout),
            "stdout of {args:?}"
        );
        assert_eq!(x.status.code(), q.status.code(), "exit code of {args:?}");
    }

    /// Checks the image is clean for qemu-img and reads `pattern` at every offset.
    fn verify(&self, img: &str, fmt: &str, offsets: &[u64], len: u64, pattern: u8) {
        if fmt == "qcow2" {
            let o = self.qemu_img(&["check", img]);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains("No errors were found"), "check {img}: {out}");
        }
        let mut args: Vec<String> = vec!["-r".into(), "-f".into(), fmt.into()];
        for off in offsets {
            args.push("-c".into());
            args.push(format!("read -P {pattern} {off} {len}"));
        }
        args.push(img.into());
        let o = Command::new("qemu-io")
            .args(&args)
            .current_dir(self.tmp.path())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "qemu-io on {img}: {o:?}");
        assert!(!out.contains("Pattern verification failed"), "{img}: {out}");
        assert_eq!(out.matches("read ").count(), offsets.len(), "{img}: {out}");
    }
}

/// The stdout of a bench run with the measured time replaced by `X`.
fn mask_seconds(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) => {
                let secs = rest.strip_suffix(" seconds.").unwrap_or("?");
                assert!(
                    secs.parse::<f64>().is_ok() && secs.split('.').nth(1).map(str::len) == Some(3),
                    "time shape: {l}"
                );
                "Run completed in X seconds.".to_string()
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The offsets qemu-img bench sends `count` requests to.
fn offsets(start: u64, step: u64, size: u64, count: u64) -> Vec<u64> {
    (0..count)
        .map(|k| {
            if k == 0 {
                start
            } else {
                (start + k * step) % size
            }
        })
        .collect()
}

#[test]
fn option_errors_and_output_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.create("a.qcow2", "cluster_size=65536", "64M");
    std::fs::write(d.path("r.raw"), vec![0u8; 10000]).unwrap();
    std::fs::write(d.path("z.raw"), b"").unwrap();
    let cases: &[&[&str]] = &[
        // Numbers and their ranges.
        &["-c", "0", "a.qcow2"],
        &["-c", "abc", "a.qcow2"],
        &["-c", "1k", "a.qcow2"],
        &["-c", "-1", "a.qcow2"],
        &["-c", "2147483648", "a.qcow2"],
        &["-d", "0", "a.qcow2"],
        &["-d", "x", "a.qcow2"],
        &["-s", "0", "a.qcow2"],
        &["-s", "3G", "a.qcow2"],
        &["-s", "x", "a.qcow2"],
        &["-S", "x", "a.qcow2"],
        &["-S", "2G", "a.qcow2"],
        &["-o", "x", "a.qcow2"],
        &["-o", "-1", "a.qcow2"],
        &["--pattern", "256", "a.qcow2"],
        &["--pattern", "x", "a.qcow2"],
        &["-w", "--flush-interval", "x", "a.qcow2"],
        &["-w", "--flush-interval=-1", "a.qcow2"],
        // Modes.
        &["-t", "bogus", "a.qcow2"],
        &["-c", "1", "-t", "unsafe", "-t", "bogus", "a.qcow2"],
        &["-t", "bogus", "-c", "0", "a.qcow2"],
        &["-i", "bogus", "a.qcow2"],
        &["-i", "native", "a.qcow2"],
        &["-n", "-c", "1", "a.qcow2"],
        &["-c", "1", "-i", "io_uring", "-n", "a.qcow2"],
        &["-c", "1", "-i", "native", "-i", "threads", "a.qcow2"],
        &["-n", "-c", "1", "nonexistent"],
        // Flush interval rules.
        &["--flush-interval", "5", "a.qcow2"],
        &["-w", "--flush-interval", "5", "a.qcow2"],
        &["-w", "-d", "100", "--flush-interval", "50", "a.qcow2"],
        // getopt and operands.
        &["-x", "a.qcow2"],
        &["--foo", "a.qcow2"],
        &["--quiet", "a.qcow2"],
        &["--object", "x", "a.qcow2"],
        &["--f", "x", "a.qcow2"],
        &["--n", "a.qcow2"],
        &["--c", "1", "a.qcow2"],
        &["-c"],
        &[],
        &["-c", "1", "a.qcow2", "b"],
        &["-c", "0", "-h"],
        // Opening.
        &["-c", "1", "nonexistent"],
        &["-w", "-U", "-c", "1", "a.qcow2"],
        &["-w", "-U", "-c", "1", "nonexistent"],
        &["--image-opts", "-f", "qcow2", "-c", "1", "a.qcow2"],
        &["-f", "foo", "-c", "1", "a.qcow2"],
        // Requests that do not fit.
        &["-c", "1", "-o", "64M", "a.qcow2"],
        &["-c", "1", "-o", "67104769", "a.qcow2"],
        &[
            "-f", "raw", "-w", "-c", "3", "-d", "1", "-S", "8192", "r.raw",
        ],
        &["-f", "raw", "-w", "-c", "3", "-d", "1", "z.raw"],
        &["-f", "raw", "-c", "3", "-d", "1", "-o", "20000", "r.raw"],
        // Runs: the output lines.
        &["-c", "100", "a.qcow2"],
        &[
            "--count",
            "100",
            "-q",
            "-s",
            "1k",
            "--step-size",
            "0",
            "a.qcow2",
        ],
        &["-c", "5", "--pattern=0x41", "-o", "67104768", "a.qcow2"],
        &["-c", "2", "-s", "1", "-S", "67108863", "a.qcow2"],
        &["-c", "10", "--no-drain", "a.qcow2"],
        &[
            "-w",
            "-c",
            "50",
            "-d",
            "4",
            "--flush-interval",
            "8",
            "a.qcow2",
        ],
        &[
            "-w",
            "-c",
            "50",
            "-d",
            "2",
            "--flush-interval=2",
            "--no-drain",
            "a.qcow2",
        ],
        &["-w", "-c", "20", "-t", "writethrough", "a.qcow2"],
        &[
            "-w",
            "-c",
            "20",
            "-t",
            "unsafe",
            "--pattern",
            "7",
            "a.qcow2",
        ],
        &["-c", "20", "-U", "-f", "qcow2", "a.qcow2"],
        &["-c", "20", "-f", "raw", "-s", "512", "r.raw"],
        &["-h"],
        &["--help"],
        &["-h", "-c", "0"],
    ];
    for args in cases {
        d.same(args);
    }
}

#[test]
fn written_images_are_clean_and_hold_the_pattern() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    // (cluster options, size, bench arguments, start, step, count, request size, pattern)
    type Case<'a> = (&'a str, u64, &'a [&'a str], u64, u64, u64, u64, u8);
    let cases: &[Case] = &[
        (
            "cluster_size=65536",
            256 << 20,
            &["-c", "2000", "-S", "1048577", "--pattern", "0x5a"],
            0,
            1048577,
            2000,
            4096,
            0x5a,
        ),
        (
            "cluster_size=512",
            64 << 20,
            &["-c", "1500", "-s", "1000", "-S", "77777", "--pattern", "7"],
            0,
            77777,
            1500,
            1000,
            7,
        ),
        (
            "cluster_size=4096",
            64 << 20,
            &[
                "-c",
                "1000",
                "-d",
                "16",
                "--flush-interval",
                "100",
                "-o",
                "12288",
                "-S",
                "12345",
                "--pattern",
                "9",
            ],
            12288,
            12345,
            1000,
            4096,
            9,
        ),
        (
            "cluster_size=65536,extended_l2=on",
            64 << 20,
            &[
                "-c",
                "800",
                "-d",
                "8",
                "--flush-interval",
                "8",
                "--no-drain",
                "-s",
                "3000",
                "-S",
                "99999",
                "--pattern",
                "1",
            ],
            0,
            99999,
            800,
            3000,
            1,
        ),
        (
            "cluster_size=2097152",
            64 << 20,
            &[
                "-c",
                "100",
                "-s",
                "100000",
                "-S",
                "3000001",
                "-t",
                "writethrough",
                "--pattern",
                "0xff",
            ],
            0,
            3000001,
            100,
            100000,
            0xff,
        ),
        (
            "cluster_size=65536,lazy_refcounts=on",
            64 << 20,
            &[
                "-c",
                "1000",
                "-S",
                "1048577",
                "-t",
                "unsafe",
                "--pattern",
                "3",
            ],
            0,
            1048577,
            1000,
            4096,
            3,
        ),
    ];
    for (i, (opts, size, args, start, step, count, len, pattern)) in cases.iter().enumerate() {
        let name = format!("w{i}.qcow2");
        d.create(&name, opts, &size.to_string());
        let mut full = vec!["bench", "-w"];
        full.extend_from_slice(args);
        full.push(&name);
        let o = d.oxcow(&full);
        assert!(o.status.success(), "{full:?}: {o:?}");
        // Later requests may overwrite earlier ones, all with the same pattern.
        let offs = offsets(*start, *step, *size, *count);
        d.verify(&name, "qcow2", &offs[..offs.len().min(300)], *len, *pattern);
    }
    // A raw image.
    std::fs::write(d.path("w.raw"), vec![0u8; 1 << 20]).unwrap();
    let o = d.oxcow(&[
        "bench",
        "-w",
        "-f",
        "raw",
        "-c",
        "99",
        "-s",
        "700",
        "-S",
        "7777",
        "--pattern",
        "0x21",
        "w.raw",
    ]);
    assert!(o.status.success(), "{o:?}");
    d.verify("w.raw", "raw", &offsets(0, 7777, 1 << 20, 99), 700, 0x21);
}

/// Whether files under the test directory open with O_DIRECT.
fn direct_io_works(d: &Dir) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::write(d.path("probe"), b"").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(d.path("probe"))
        .is_ok()
}

#[test]
fn direct_io_writes_are_clean_and_hold_the_pattern() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    if !direct_io_works(&d) {
        eprintln!("no O_DIRECT on this file system: skipping");
        return;
    }
    for (i, (cs, mode, s, step)) in [
        (65536u64, "none", 4096u64, 1048577u64),
        (512, "none", 1000, 77777),
        (4096, "directsync", 5000, 123457),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("d{i}.qcow2");
        d.create(&name, &format!("cluster_size={cs}"), "32M");
        let (s_arg, step_arg) = (s.to_string(), step.to_string());
        let args = [
            "bench",
            "-w",
            "-t",
            mode,
            "-c",
            "400",
            "-s",
            &s_arg,
            "-S",
            &step_arg,
            "--pattern",
            "0x66",
            &name,
        ];
        let o = d.oxcow(&args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        d.verify(&name, "qcow2", &offsets(0, *step, 32 << 20, 400), *s, 0x66);
        // And the same reads through O_DIRECT.
        let o = d.oxcow(&[
            "bench", "-t", "none", "-c", "400", "-s", &s_arg, "-S", &step_arg, &name,
        ]);
        assert!(o.status.success(), "{o:?}");
    }
    // Same lines as qemu-img.
    d.create("x.qcow2", "cluster_size=65536", "16M");
    d.same(&["-w", "-t", "none", "-c", "50", "-n", "x.qcow2"]);
    d.same(&["-t", "directsync", "-c", "50", "-i", "native", "x.qcow2"]);
}

/// qemu-img map's runs without the host offsets (the allocation order may differ,
/// which splits runs differently): (start, length, depth, present, zero, data,
/// compressed), neighbours with the same flags merged.
fn map_shape(d: &Dir, img: &str) -> Vec<(u64, u64, u64, bool, bool, bool, bool)> {
    let o = d.qemu_img(&["map", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut out: Vec<(u64, u64, u64, bool, bool, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let n = |k: &str| e[k].as_u64().unwrap();
        let b = |k: &str| e[k].as_bool().unwrap();
        let run = (
            n("start"),
            n("length"),
            n("depth"),
            b("present"),
            b("zero"),
            b("data"),
            b("compressed"),
        );
        match out.last_mut() {
            Some(last)
                if (last.2, last.3, last.4, last.5, last.6)
                    == (run.2, run.3, run.4, run.5, run.6) =>
            {
                last.1 += run.1
            }
            _ => out.push(run),
        }
    }
    out
}

#[test]
fn written_images_match_qemu_img_bench_writes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let cases: &[(&str, &[&str])] = &[
        // Partial writes into new clusters: the rest of each cluster reads as zeros
        // and is allocated, not left sparse, as with QEMU's zero-range writes.
        (
            "cluster_size=65536",
            &["-c", "40", "-o", "1000", "-s", "100", "-S", "1048577"],
        ),
        (
            "cluster_size=65536",
            &["-c", "40", "-s", "4096", "-S", "3211264"],
        ),
        (
            "cluster_size=4096",
            &["-c", "60", "-S", "123457", "--pattern", "0x31"],
        ),
        (
            "cluster_size=512",
            &["-c", "60", "-s", "1000", "-S", "77777"],
        ),
        (
            "cluster_size=65536,extended_l2=on",
            &["-c", "40", "-s", "3000", "-S", "99999"],
        ),
    ];
    for (i, (opts, args)) in cases.iter().enumerate() {
        let (q, x) = (format!("q{i}.qcow2"), format!("x{i}.qcow2"));
        d.create(&q, opts, "64M");
        d.create(&x, opts, "64M");
        let mut qa = vec!["bench", "-w", "-d", "1", "--pattern", "0x5c"];
        qa.extend_from_slice(args);
        let mut xa = qa.clone();
        qa.push(&q);
        xa.push(&x);
        d.qemu_img(&qa);
        let o = d.oxcow(&xa);
        assert!(o.status.success(), "{xa:?}: {o:?}");
        let c = d.run(Path::new("qemu-img"), &["compare", &q, &x]);
        assert!(c.status.success(), "compare {opts} {args:?}: {c:?}");
        assert_eq!(
            map_shape(&d, &x),
            map_shape(&d, &q),
            "map of {opts} {args:?}"
        );
        let o = d.qemu_img(&["check", &x]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found"));
        // As much of the file is allocated as with qemu-img (file system rounding
        // aside).
        use std::os::unix::fs::MetadataExt;
        let blocks = |n: &str| std::fs::metadata(d.path(n)).unwrap().blocks() * 512;
        let (qb, xb) = (blocks(&q), blocks(&x));
        assert!(
            xb + (256 << 10) >= qb && xb <= qb + (256 << 10),
            "{opts} {args:?}: oxcow file has {xb} bytes allocated, qemu-img's {qb}"
        );
    }
}
