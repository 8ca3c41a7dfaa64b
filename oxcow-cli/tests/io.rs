//! `oxcow io` against qemu-io 10 as the oracle. The same command lines run through
//! qemu-io and through oxcow (as a `qemu-io` symlink, so that messages carry the same
//! program name) on copies of the same images, each copy in its own directory under
//! the same name; then stdout (without the timing lines, as QEMU's iotests filter
//! them), stderr and the exit status must be the same, the resulting images must be
//! identical to `qemu-img compare` (raw images byte for byte), and the image oxcow
//! wrote must pass `qemu-img check`. Every test is skipped (with a note) when qemu-io
//! is not installed.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use support::{have_qemu_and_io as have_qemu, Scratch as Dir, Setup, C_LOCALE};

impl Dir {
    /// A scratch directory: the original images in `img/`, the copies each tool works
    /// on in `qa/` (qemu-io) and `ox/` (oxcow), and a `qemu-io` symlink to oxcow.
    fn new() -> Dir {
        Dir::with(Setup {
            link: "qemu-io",
            run_env: C_LOCALE,
            sh_dir: "img",
            ..Setup::default()
        })
    }

    /// Fresh copies of every original image in `qa/` and `ox/`.
    fn copies(&self) {
        for side in ["qa", "ox"] {
            let dir = self.path(side);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            for e in std::fs::read_dir(self.path("img")).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
        }
    }

    /// Compares two copies of an image: `qemu-img compare` for qcow2, bytes for raw.
    fn images_equal(&self, name: &str) -> Result<(), String> {
        let (a, b) = (self.path("qa").join(name), self.path("ox").join(name));
        // An external data file is named relative to the working directory: each
        // image is read (converted to raw) from its own directory.
        let data_file = name.starts_with("df");
        if name.ends_with(".raw") || data_file {
            let (x, y) = if data_file {
                (self.to_raw("qa", name)?, self.to_raw("ox", name)?)
            } else {
                (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap())
            };
            if x != y {
                return Err(format!("images differ ({} vs {} bytes)", x.len(), y.len()));
            }
        } else {
            let o = Command::new("qemu-img")
                .args(["compare", "-U"])
                .arg(&a)
                .arg(&b)
                .output()
                .unwrap();
            if !o.status.success() {
                return Err(format!(
                    "qemu-img compare: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        // oxcow keeps persistent bitmaps: images with bitmaps must check clean too.
        if name.ends_with(".raw") {
            return Ok(());
        }
        let o = Command::new("qemu-img")
            .current_dir(self.path("ox"))
            .args(["check", "-U", name])
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(format!(
                "qemu-img check of oxcow's image: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(())
    }

    /// The guest-visible bytes of an image, as `qemu-img convert -O raw` run from
    /// the image's directory gives them.
    fn to_raw(&self, side: &str, name: &str) -> Result<Vec<u8>, String> {
        let out = format!("{name}.converted");
        let o = Command::new("qemu-img")
            .current_dir(self.path(side))
            .args(["convert", "-U", "-O", "raw", name, &out])
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(format!(
                "qemu-img convert in {side}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let bytes = std::fs::read(self.path(side).join(&out)).unwrap();
        let _ = std::fs::remove_file(self.path(side).join(&out));
        Ok(bytes)
    }

    /// Runs `args` through qemu-io (in `qa/`) and oxcow (in `ox/`) on fresh copies of
    /// the images and requires the same output, status and resulting `image`.
    fn same_io(&self, image: Option<&str>, args: &[&str], stdin: Option<&str>) -> Output {
        self.copies();
        self.same_io_again(image, args, stdin)
    }

    /// `same_io` on the copies as the last run left them.
    fn same_io_again(&self, image: Option<&str>, args: &[&str], stdin: Option<&str>) -> Output {
        self.compare_runs(image, args, stdin, true)
    }

    fn compare_runs(
        &self,
        image: Option<&str>,
        args: &[&str],
        stdin: Option<&str>,
        with_stderr: bool,
    ) -> Output {
        let q = self.run_at(Path::new("qemu-io"), "qa", args, stdin);
        let o = self.run_at(&self.ox, "ox", args, stdin);
        let what = format!("qemu-io {args:?} (stdin {stdin:?})");
        assert_eq!(
            filter(&o.stdout),
            filter(&q.stdout),
            "stdout of {what}\nqemu-io's:\n{}",
            String::from_utf8_lossy(&q.stdout)
        );
        if with_stderr {
            assert_eq!(
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&q.stderr),
                "stderr of {what}"
            );
        }
        assert_eq!(
            (o.status.code(), o.status.signal()),
            (q.status.code(), q.status.signal()),
            "exit status of {what}"
        );
        if let Some(img) = image {
            if let Err(e) = self.images_equal(img) {
                panic!("after {what}: {e}");
            }
        }
        o
    }

    /// `same_io` with the commands given as -c options, on `image`.
    fn same(&self, image: &str, opts: &[&str], cmds: &[&str]) -> Output {
        self.copies();
        self.again(image, opts, cmds)
    }

    /// `same` on the copies as the last run left them.
    fn again(&self, image: &str, opts: &[&str], cmds: &[&str]) -> Output {
        let mut args: Vec<&str> = opts.to_vec();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        self.same_io_again(Some(image), &args, None)
    }
}

/// Drops the timing lines, whose numbers naturally differ, as iotests'
/// `_filter_qemu_io` does ("64 KiB, 1 ops; 00.00 sec (... ops/sec)", and -C's
/// "bytes,ops,time,bytes/sec,ops/sec").
fn filter(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_inclusive('\n')
        .map(|l| {
            let t = l.trim_end_matches('\n');
            let timing = t.contains(" ops; ") && t.ends_with(" ops/sec)");
            let fields: Vec<&str> = t.split(',').collect();
            let c_timing = fields.len() == 5
                && fields[0].parse::<u64>().is_ok()
                && fields[1].parse::<u64>().is_ok()
                && fields[2].matches(':').count() == 2;
            if timing || c_timing {
                "TIMING\n".to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// The images most tests work on.
fn images(d: &Dir) {
    d.sh("qemu-img create -q -f qcow2 plain.qcow2 4M
         qemu-img create -q -f raw base.raw 2M
         qemu-io -f raw -c 'write -q -P 0x11 0 2M' base.raw
         qemu-img create -q -f qcow2 -b base.raw -F raw over.qcow2 4M
         qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw v2over.qcow2 1M
         qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw v2back.qcow2 4M
         qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 4M
         qemu-img create -q -f qcow2 -o extended_l2=on -b base.raw -F raw extover.qcow2 4M
         qemu-img create -q -f qcow2 -o cluster_size=4k small.qcow2 4M
         qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 4M
         qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 4M
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M
         qemu-img create -q -f qcow2 odd.qcow2 1000000
         qemu-img create -q -f qcow2 -o data_file=df.data df.qcow2 4M
         qemu-img create -q -f qcow2 -o data_file=dfr.data,data_file_raw=on dfr.qcow2 4M
         qemu-img create -q -f qcow2 bm.qcow2 4M
         qemu-img bitmap --add bm.qcow2 b0
         qemu-img bitmap --add -g 128k bm.qcow2 b1
         qemu-img bitmap --disable bm.qcow2 b1
         qemu-img create -q -f raw disk.raw 4M");
}

/// A workload touching every kind of cluster: data, zeros (with and without
/// unmapping), discards, compressed clusters, partial clusters, vectored and
/// asynchronous requests, with reads that verify what was written.
const WORKLOAD: &[&str] = &[
    "write -P 1 0 64k",
    "write -P 2 100k 50k",
    "write -z 64k 64k",
    "write -z 200k 10k",
    "write -z -u 0 64k",
    "discard 300k 200k",
    "write -c 512k 128k",
    "read -P 2 100k 28k",
    "read -P 0 64k 36k",
    "map",
    "alloc 0 1M",
    "write -z 1000k 3k",
    "write -z -u 1M 1M",
    "write -P 3 2M 4k",
    "discard 2M 64k",
    "map",
    "length",
    "readv -P 0 64k 4k 4k",
    "writev -P 9 3M 4k 8k",
    "aio_write -P 8 3100k 4k",
    "aio_flush",
    "aio_read -P 8 3100k 4k",
    "aio_flush",
    "read -P 9 3M 12k",
    "read -v 3M 40",
    "map",
];

#[test]
fn workload_matches_qemu_io_on_many_layouts() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    for img in [
        "plain.qcow2",
        "over.qcow2",
        "ext.qcow2",
        "extover.qcow2",
        "small.qcow2",
        "lazy.qcow2",
        "zstd.qcow2",
        "df.qcow2",
        "dfr.qcow2",
    ] {
        if img.starts_with("df") {
            // External data files take no compressed clusters.
            let w: Vec<&str> = WORKLOAD
                .iter()
                .map(|c| {
                    if c.starts_with("write -c") {
                        "write -c 512k 64k"
                    } else {
                        c
                    }
                })
                .collect();
            d.same(img, &[], &w);
            continue;
        }
        d.same(img, &[], WORKLOAD);
        d.same(img, &[], &["info", "map", "length", "alloc 0 4M"]);
    }
    // Version 2 images, which have no zero flag: zero writes unallocate whole
    // clusters when no backing file is behind them, and write zeros otherwise, as
    // QEMU does: the same allocations and the very same bytes.
    // (Clusters freed are reused later by oxcow than by QEMU, so the bytes are
    // compared after zero writes that free nothing reused afterwards.)
    for img in ["v2.qcow2", "v2back.qcow2"] {
        d.same(img, &[], WORKLOAD);
        d.same(
            img,
            &[],
            &[
                "write -P 1 0 1M",
                "write -z 64k 128k",
                "write -z 300k 10k",
                "write -z -u 400k 200k",
                "write -P 2 2M 64k",
                "write -z 2M 64k",
                "write -z 1000k 3k",
                "write -z 3968k 128k",
                "write -z 4090k 6k",
                "map",
            ],
        );
        let (q, x) = (d.path("qa").join(img), d.path("ox").join(img));
        assert!(
            std::fs::read(q).unwrap() == std::fs::read(x).unwrap(),
            "{img}: the same bytes as qemu-io leaves"
        );
    }
    d.same(
        "v2.qcow2",
        &[],
        &[
            "write -P 1 0 64k",
            "write -c 64k 64k",
            "discard 0 64k",
            "write -P 5 1000k 100k",
            "map",
            "info",
            "read -P 5 1000k 100k",
        ],
    );
    d.same(
        "disk.raw",
        &["-f", "raw"],
        &[
            "write -P 1 0 64k",
            "write -z 100k 10k",
            "write -z -u 1M 64k",
            "discard 0 4k",
            "map",
            "alloc 0 1M",
            "info",
            "length",
            "read -P 0 1M 64k",
            "write -c 0 64k",
        ],
    );
}

#[test]
fn reads_and_pattern_verification() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -P 0xab 0 64k",
            "write -P 0x41 64k 100",
            "read -P 0xab 0 64k",
            "read -P 0xac 0 4k",
            "read -P 0xab -s 4k -l 1k 0 64k",
            "read -P 0xab -s 60k 0 64k",
            "read -P 0 -s 100 64k 4k",
            "read -v 65520 48",
            "read -v 0 0",
            "read -C 0 512",
            "read -q -P 1 0 512",
            "read -qv 0 16",
            "read -vP0xab 0 20",
            "read 0 4 -v",
            "readv -v 64k 16 16",
            "readv -P 0xab 0 512 1k",
            "readv -P 0xab 0 512 64k",
            "r 0 1",
            "read 0x10 0x10",
            "read 1.5k 1",
            "read 4M 0",
        ],
    );
    // Pattern bytes in every base strtol takes, and refused ones.
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -P 010 0 512",
            "read -P 8 0 512",
            "write -P 255 512 512",
            "read -P 0xff 512 512",
            "read -P 0x1ff 0 1",
            "read -P -1 0 1",
            "read -P 08 0 1",
            "read -P abc 0 1",
            "write -P 256 0 1",
        ],
    );
    // A backing file shows through unallocated clusters.
    d.same(
        "over.qcow2",
        &[],
        &[
            "read -P 0x11 0 2M",
            "read -P 0 2M 2M",
            "write -P 7 1M 4k",
            "read -P 0x11 1M 0",
            "read -P 0x11 1020k 4k",
            "read -P 7 1M 4k",
            "read -P 0x11 1M 8k",
        ],
    );
}

#[test]
fn writes_zeroes_compression_and_discards() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    for img in ["plain.qcow2", "over.qcow2", "ext.qcow2", "small.qcow2"] {
        d.same(
            img,
            &[],
            &[
                "write -z 0 4k",
                "write -z 4k 130k",
                "map",
                "write -P 1 192k 64k",
                "write -z 196k 4k",
                "write -z -n 200k 4k",
                "write -z -n 256k 64k",
                "write -z -n 60k 8k",
                "write -z -u 192k 64k",
                "map",
                "write -P 1 512k 64k",
                "write -z -u -n 500k 100k",
                "write -c 1M 64k",
                "write -z -n 1M 2k",
                "write -z -n 1040k 128k",
                "write -z 1M 2k",
                "map",
                "read -P 0 0 2M",
            ],
        );
    }
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -c 0 64k",
            "write -c 0 64k",
            "write -c 4k 64k",
            "write -c 64k 4k",
            "write -c 0 100",
            "write -c 1000 512",
            "write -c 128k 128k",
            "write -c 0 0",
            "write -c -P 0 256k 64k",
            "write -f 300k 4k",
            "write -f -c 0 4k",
            "map",
            "read -P 0xcd 0 64k",
        ],
    );
    // The last cluster of a disk whose size is not a multiple of the cluster size.
    d.same(
        "odd.qcow2",
        &[],
        &[
            "write -c 983040 16960",
            "write -P 1 0 64k",
            "write -z 999k 424",
            "map",
            "read -P 0xcd 983040 16960",
            "length",
        ],
    );
    d.same(
        "zstd.qcow2",
        &[],
        &["write -c -P 3 0 256k", "map", "read -P 3 0 256k"],
    );
    // Data that does not compress (written as plain clusters) and data that barely
    // does, in clusters of several sizes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = vec![0u8; 256 << 10];
    for (i, b) in noise.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Every other 512-byte block is a run of one byte: compressible, but little.
        *b = if (i / 512) % 4 == 3 { 0x5a } else { x as u8 };
    }
    std::fs::write(d.path("noise.bin"), &noise).unwrap();
    let noise = d.path("noise.bin");
    let w = format!("write -c -s {} 0 256k", noise.to_str().unwrap());
    for img in ["plain.qcow2", "small.qcow2", "zstd.qcow2", "ext.qcow2"] {
        d.same(img, &[], &[&w, "map", "read -v 0 32"]);
    }
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -P 1 0 1M",
            "discard 0 64k",
            "discard 100k 100k",
            "discard 0 100",
            "discard -q 512k 64k",
            "discard -C 640k 64k",
            "d 768k 64k",
            "map",
            "read -P 0 0 64k",
            "read -P 1 64k 64k",
        ],
    );
    // With discard=ignore, discards and unmapping do nothing.
    d.same(
        "plain.qcow2",
        &["-d", "ignore"],
        &[
            "write -P 1 0 128k",
            "discard 0 64k",
            "write -z -u 64k 64k",
            "map",
            "read -P 1 0 64k",
        ],
    );
    // Writes from a file, repeated to fill the request.
    std::fs::write(d.path("pattern.bin"), b"oxcow").unwrap();
    let pat = d.path("pattern.bin");
    let pat = pat.to_str().unwrap();
    d.same(
        "plain.qcow2",
        &[],
        &[
            &format!("write -s {pat} 0 1k"),
            "read -v 0 32",
            "write -s /nonexistent 0 1k",
            "write -s /dev/null 0 1k",
            &format!("write -s {pat} -P 1 0 1k"),
        ],
    );
}

#[test]
fn truncate_map_alloc_info() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -P 1 0 1M",
            "write -P 2 3M 64k",
            "truncate 2M",
            "length",
            "map",
            "truncate 8M",
            "map",
            "read -P 0 2M 6M",
            "truncate -m full 9M",
            "truncate -m falloc 10M",
            "truncate -m metadata 11M",
            "map",
            "truncate -m full 1M",
            "truncate -m bad 1M",
            "truncate 1000",
            "truncate 0x2k",
            "truncate -m off",
            "truncate 1T",
            "length",
            "info",
            "truncate 0",
            "length",
            "map",
            "t 1M",
            "l",
        ],
    );
    // Growing over a backing file: the new area must not show the backing file.
    d.same(
        "over.qcow2",
        &[],
        &[
            "truncate 1M",
            "map",
            "truncate 8M",
            "map",
            "read -P 0x11 512k 4k",
            "read -P 0 1M 4k",
        ],
    );
    d.same(
        "over.qcow2",
        &[],
        &["truncate 1000k", "truncate 3000k", "map", "read -v 999k 16"],
    );
    // v2 has no zero flag: QEMU refuses to grow over the backing file, unless
    // preallocation gives the new area clusters of zeros.
    d.same(
        "v2over.qcow2",
        &[],
        &[
            "truncate 3M",
            "length",
            "truncate -m metadata 3M",
            "truncate -m falloc 3M",
            "length",
            "map",
            "read -P 0 1M 2M",
        ],
    );
    d.same(
        "plain.qcow2",
        &[],
        &[
            "write -P 1 100k 4k",
            "alloc 0",
            "alloc 100k",
            "alloc 96k 64k",
            "alloc 4092k 8k",
            "alloc 4M",
            "alloc 5M 1k",
            "alloc 0 9223372036854775807",
            "alloc -1",
            "alloc 0 x",
            "a 100k 1",
        ],
    );
    d.same("odd.qcow2", &[], &["map", "info", "length", "alloc 0 1M"]);
    // Bitmaps: QEMU marks them in use while the image is open for writing.
    d.same("bm.qcow2", &[], &["info", "map"]);
    d.same("bm.qcow2", &["-r"], &["info", "map"]);
    d.same("df.qcow2", &[], &["info", "truncate 8M", "length", "map"]);
    d.same(
        "disk.raw",
        &["-f", "raw"],
        &[
            "truncate 5M",
            "length",
            "truncate -m metadata 6M",
            "truncate -m full 6M",
            "truncate 1000",
            "length",
            "map",
            "read -v 990 34",
            "write -z 512 512",
            "discard 0 512",
            "alloc 0 2k",
        ],
    );
}

/// Small clusters need a new refcount block every few hundred clusters, often in
/// the middle of one request's allocation: sequential and random writes (partial
/// clusters, requests over several L2 tables) leave byte-identical images in
/// qemu-io and oxcow, which allocate in the same order and place refcount blocks
/// at the same offsets.
#[test]
fn small_cluster_writes_lay_out_refcount_blocks_as_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    d.sh(
        "qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 64M
         qemu-img create -q -f qcow2 -o cluster_size=1024,refcount_bits=64 c1k.qcow2 64M",
    );
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut random = Vec::new();
    for i in 0..150u64 {
        let align = if rnd(2) == 0 { 512 } else { 4096 };
        let off = rnd((64 << 20) / align) * align;
        let len = [512, 1024, 4096, 65536, 200 << 10, 1 << 20][rnd(6) as usize];
        let len = len.min((64 << 20) - off);
        random.push(format!("write -P {} {off} {len}", i % 250 + 1));
    }
    let sequential = vec![
        "write -P 1 0 12M".to_string(),
        "write -P 2 30M 5M".to_string(),
    ];
    for img in ["c512.qcow2", "c1k.qcow2"] {
        for cmds in [&sequential, &random] {
            let mut args: Vec<&str> = Vec::new();
            for c in cmds {
                args.push("-c");
                args.push(c);
            }
            args.push(img);
            d.same_io(Some(img), &args, None);
            let (q, x) = (d.path("qa").join(img), d.path("ox").join(img));
            assert!(
                std::fs::read(q).unwrap() == std::fs::read(x).unwrap(),
                "{img}: the same bytes as qemu-io leaves"
            );
        }
    }
}

/// A write whose allocation lands on an L2 table or a refcount block that the
/// refcounts wrongly call free: QEMU's corruption notice, EIO, then "No medium found"
/// for later writes, and the same bytes left in the image.
#[test]
fn write_over_metadata_marks_the_image_corrupt() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    // The L2 table is cluster 4; the refcount block (cluster 2) holds 16-bit entries.
    d.sh("qemu-img create -q -f qcow2 l2.qcow2 4M
         qemu-io -c 'write -q -P 1 0 64k' l2.qcow2
         cp l2.qcow2 rb.qcow2
         printf '\\000\\000' | dd of=l2.qcow2 bs=1 seek=131080 conv=notrunc status=none
         printf '\\000\\000' | dd of=rb.qcow2 bs=1 seek=131076 conv=notrunc status=none");
    for (img, what) in [
        ("l2.qcow2", "active L2 table"),
        ("rb.qcow2", "refcount block"),
    ] {
        let args = [
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -z 2M 4k",
            "-c",
            "discard 0 64k",
            "-c",
            "read -P 1 0 64k",
            "-c",
            "write -P 3 3M 4k",
            img,
        ];
        let o = d.same_io(None, &args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("(overlaps with {what})")), "{err}");
        let (q, x) = (d.path("qa").join(img), d.path("ox").join(img));
        assert!(
            std::fs::read(q).unwrap() == std::fs::read(x).unwrap(),
            "{img}: the same bytes as qemu-io leaves"
        );
    }
}

#[test]
fn bad_arguments_and_errors() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    let cmds: &[&str] = &[
        "read 4M 512",
        "read 4092k 8k",
        "write 4092k 8k",
        "write -z 4092k 8k",
        "discard 4092k 8k",
        "read 9223372036854775807 1",
        "read 9223372036854775808 1",
        "write 18446744073709551615 1",
        "read 0 3G",
        "write 0 3G",
        "discard 0 3G",
        "read 0 9E",
        "read 0 1E",
        "read 0 1x",
        "read abc 1",
        "read -1 4",
        "read -x 0 1",
        "read -P",
        "read 0 -P",
        "read -s 4 0 8",
        "read -P 1 -s 4 -l 8 0 8",
        "read -P 1 -s 10 0 8",
        "read -l x -P 1 0 8",
        "read -P 0x1ff -x 0 1",
        "read -v 0 4 -- -q",
        "read -b 0 100",
        "write -P 0xcd -z 0 4k",
        "write -z -s x 0 4k",
        "write -n 0 4k",
        "write -u 0 4k",
        "write -f -c 0 4k",
        "write -b -z 0 512",
        "write -r -z 0 512",
        "write 0",
        "write 0 1 2",
        "writev 0",
        "writev 0 3G 1",
        "readv 0 2G 2G",
        "readv 0 x",
        "aio_write -z 0 4k 4k",
        "aio_write -u 0 4k",
        "aio_write -i 0 4k",
        "aio_read -i 0 4k",
        "discard -x 0 1",
        "discard 0",
        "length x",
        "flush x",
        "info x",
        "map x",
        "alloc",
        "alloc 0 1 2",
        "truncate",
        "truncate 1 2 3 4",
        "truncate -m",
        "sigraise 99",
        "sigraise x",
        "sleep x",
        "sleep",
        "sleep 1",
        "abort x",
        "close x",
        "help a b",
        "help bogus",
        "bogus",
        "exit",
        "break a b",
        "remove_break a",
        "resume a",
        "zone_report 0 1",
        "zone_report 0 9999999999",
        "zone_open 0 1",
        "zone_reset x 1",
        "zone_append 0 512 512",
        "reopen -x",
        "reopen -r -w",
        "reopen -o foo=bar",
        "reopen -c bogus",
        "reopen x",
        "open plain.qcow2",
        "  read   0   4  ",
        "read\t0 4",
    ];
    d.same("plain.qcow2", &[], cmds);
    // Each command alone, so that the exit status of each one is compared.
    for c in cmds {
        d.same("plain.qcow2", &[], &[c]);
    }
    // Every command's help, and the list.
    let mut helps: Vec<String> = vec!["help".into(), "? q".into()];
    for c in [
        "abort",
        "aio_flush",
        "aio_read",
        "aio_write",
        "alloc",
        "break",
        "close",
        "discard",
        "flush",
        "help",
        "info",
        "length",
        "map",
        "open",
        "quit",
        "read",
        "readv",
        "remove_break",
        "reopen",
        "resume",
        "sigraise",
        "sleep",
        "truncate",
        "wait_break",
        "write",
        "writev",
        "zone_append",
        "zone_close",
        "zone_finish",
        "zone_open",
        "zone_report",
        "zone_reset",
        "r",
        "w",
        "zrp",
    ] {
        helps.push(format!("help {c}"));
    }
    let helps: Vec<&str> = helps.iter().map(String::as_str).collect();
    d.same_io(
        None,
        &helps.iter().flat_map(|h| ["-c", h]).collect::<Vec<_>>(),
        None,
    );
}

#[test]
fn options_open_and_read_only() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    // Read-only: every command that writes is refused before it parses anything.
    d.same(
        "plain.qcow2",
        &["-r"],
        &[
            "write 0 4k",
            "write -x",
            "writev 0 4k",
            "aio_write 0 4k",
            "discard 0 64k",
            "truncate 8M",
            "write -z 0 4k",
            "read 0 4k",
            "flush",
            "map",
        ],
    );
    d.same("plain.qcow2", &["--read-only"], &["write 0 1"]);
    // Without a file.
    d.same_io(
        None,
        &[
            "-c",
            "read 0 4k",
            "-c",
            "map",
            "-c",
            "help quit",
            "-c",
            "sigraise 0",
            "-c",
            "length",
            "-c",
            "close",
            "-c",
            "sleep 1",
        ],
        None,
    );
    // Files that do not open.
    d.same_io(None, &["-c", "read 0 1", "nonexistent.qcow2"], None);
    d.same_io(None, &["-c", "read 0 1", "."], None);
    d.same_io(None, &["-f", "foo", "plain.qcow2"], None);
    d.same_io(None, &["-f", "qcow2", "disk.raw"], None);
    // Formats and cache, discard and aio modes.
    d.same(
        "plain.qcow2",
        &["-f", "raw"],
        &["info", "map", "write -c 0 64k"],
    );
    d.same(
        "plain.qcow2",
        &["-f", "qcow2", "-t", "writeback"],
        &["write 0 64k"],
    );
    d.same(
        "plain.qcow2",
        &["-t", "unsafe", "-d", "unmap"],
        &["write 0 64k"],
    );
    d.same("plain.qcow2", &["-n", "-k"], &["read 0 1"]);
    d.same(
        "plain.qcow2",
        &["-t", "none", "-i", "native"],
        &["read 0 1"],
    );
    d.same(
        "plain.qcow2",
        &["-i", "io_uring", "-U", "-m"],
        &["read 0 1"],
    );
    d.same(
        "plain.qcow2",
        &["-r", "-U", "-m"],
        &["read 0 1", "open -U -r plain.qcow2"],
    );
    d.same(
        "plain.qcow2",
        &[],
        &["close", "open -U plain.qcow2", "open -rU plain.qcow2"],
    );
    d.same(
        "plain.qcow2",
        &[
            "--cache=writethrough",
            "--discard=on",
            "--aio=threads",
            "--force-share",
        ],
        &["read 0 1"],
    );
    d.same(
        "plain.qcow2",
        &["--cach", "directsync", "--form", "qcow2"],
        &["read 0 1"],
    );
    for bad in [
        &["-t", "bogus"][..],
        &["-d", "bogus"],
        &["-i", "bogus"],
        &["-i", "native"],
        &["-k"],
    ] {
        d.same("plain.qcow2", bad, &["read 0 1"]);
    }
    // Several -c options run in order; quit ends them; the status is that of all.
    d.same(
        "plain.qcow2",
        &[],
        &["read 0 1", "bogus", "read 0 2", "quit", "read 0 3"],
    );
    d.same("plain.qcow2", &[], &["bogus", "read 0 2", "q"]);
    // open, close and reopen.
    d.same(
        "plain.qcow2",
        &[],
        &[
            "read 0 1",
            "open plain.qcow2",
            "close",
            "read 0 1",
            "open -r plain.qcow2",
            "write 0 1",
            "reopen -w",
            "write -P 4 0 1",
            "reopen -r",
            "write 0 1",
            "reopen -o read-only=off",
            "write -P 5 1 1",
            "close",
            "open -o driver=raw plain.qcow2",
            "info",
            "close",
            "open -t bad plain.qcow2",
            "open -o foo=bar plain.qcow2",
            "open nonexistent",
            "open",
            "open -o driver=qcow2",
            "o -r plain.qcow2",
            "read -v 0 4",
        ],
    );
    // A raw image whose format was probed: a warning, and no writes that would make
    // it look like a qcow2 image.
    let qcow2_header = "write -s plain.qcow2 0 512";
    d.same(
        "disk.raw",
        &[],
        &[
            "write -P 0x51 0 512",
            qcow2_header,
            "write -s plain.qcow2 512 512",
            "write -P 0 0 4",
            "write -s plain.qcow2 4 4",
            "write -s plain.qcow2 0 4",
            "read -v 0 16",
        ],
    );
    d.same("disk.raw", &["-r"], &["read 0 1"]);
    d.same("disk.raw", &["-f", "raw"], &[qcow2_header, "read -v 0 8"]);
}

#[test]
fn usage_and_version() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    // The usage text is qemu-io's but for its last lines (QEMU's bug report address).
    for args in [&["-h"][..], &["-x"], &["a", "b"], &["--bogus"]] {
        d.copies();
        let q = d.run_at(Path::new("qemu-io"), "qa", args, None);
        let o = d.run_at(&d.ox, "ox", args, None);
        assert_eq!(o.status.code(), q.status.code(), "{args:?}");
        assert_eq!(o.stderr, q.stderr, "{args:?}");
        let (qs, os) = (
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&o.stdout),
        );
        let cut = |s: &str| s.lines().take(27).collect::<Vec<_>>().join("\n");
        assert_eq!(cut(&os), cut(&qs), "{args:?}");
    }
    let o = d.run_at(&d.ox, "ox", &["-V"], None);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("qemu-io version "));
}

#[test]
fn commands_from_standard_input() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    for input in [
        "read 0 1\nbogus\nwrite -P 1 0 1\nread -P 1 0 1\n",
        "read 0 1\nquit\nread 0 2\n",
        "read 0 1",
        "",
        "\n\n  \nhelp length\n",
        // (When an asynchronous request reports in qemu-io depends on timing, so
        // aio_flush makes it report.)
        "write -P 3 0 4k\naio_read -P 3 0 4k\naio_flush\nlength\n",
        "read -P 5 0 1\n",
    ] {
        d.same_io(Some("plain.qcow2"), &["plain.qcow2"], Some(input));
    }
    // Without a file, and with -c (standard input is then not read).
    d.same_io(None, &[], Some("read 0 1\nopen plain.qcow2\nread 0 1\n"));
    d.same_io(
        Some("plain.qcow2"),
        &["-c", "read 0 2", "plain.qcow2"],
        Some("write 0 1\n"),
    );
    // A line longer than qemu-io's 1023-byte buffer is cut in pieces.
    let long = format!("read 0 1{}\n", " ".repeat(1100));
    d.same_io(Some("plain.qcow2"), &["plain.qcow2"], Some(&long));
}

#[test]
fn crash_by_abort_leaves_a_consistent_image() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    let work = [
        "write -P 1 0 64k",
        "write -c 128k 64k",
        "write -z 64k 64k",
        "write -P 2 1M 64k",
        "writev -P 3 2M 4k 4k",
        "write -z -u 0 64k",
        "truncate 8M",
        "write -P 4 7M 1M",
    ];
    for img in ["plain.qcow2", "lazy.qcow2", "over.qcow2", "ext.qcow2"] {
        // abort: the process dies of SIGABRT, standard output unflushed (lost).
        let mut cmds = work.to_vec();
        cmds.push("abort");
        let o = d.same(img, &[], &cmds);
        assert_eq!(o.status.signal(), Some(libc_sigabrt()));
        // What was written before the crash is there, and nothing else changed: each
        // tool reads back the image it left. (A dirty image with lazy refcounts gets
        // its refcounts rebuilt on opening; QEMU lists what it repaired, which depends
        // on where its own clusters lie, on stderr: that is not compared.)
        let mut args = vec![];
        for c in [
            "read -P 0 0 64k",
            "read -P 0 64k 64k",
            "read -P 2 1M 64k",
            "read -P 3 2M 8k",
            "read -P 4 7M 1M",
            "map",
            "length",
        ] {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        d.compare_runs(Some(img), &args, None, img != "lazy.qcow2");
        // A signal after the writes: standard output is flushed first.
        let mut cmds = work.to_vec();
        cmds.push("sigraise 9");
        d.same(img, &[], &cmds);
    }
    // The image oxcow left behind after abort opens again and reads back.
    for img in ["plain.qcow2", "lazy.qcow2"] {
        d.copies();
        let mut args = vec![];
        for c in work.iter().chain(["abort"].iter()) {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        let o = d.run_at(&d.ox, "ox", &args, None);
        assert_eq!(o.status.signal(), Some(libc_sigabrt()));
        let check = Command::new("qemu-img")
            .args(["check", "-U"])
            .arg(d.path("ox").join(img))
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check after abort: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let o = d.run_at(
            &d.ox,
            "ox",
            &[
                "-c",
                "read -P 1 128k 0",
                "-c",
                "read -q -P 0 0 64k",
                "-c",
                "read -q -P 2 1M 64k",
                "-c",
                "read -q -P 4 7M 1M",
                img,
            ],
            None,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
}

fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn oxcow_io_under_its_own_name() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    images(&d);
    d.copies();
    let ox = Path::new(env!("CARGO_BIN_EXE_oxcow"));
    let args = [
        "io",
        "-c",
        "write -P 7 0 4k",
        "-c",
        "read -P 7 0 4k",
        "-c",
        "truncate 1000",
        "-c",
        "bogus",
        "plain.qcow2",
    ];
    let o = d.run_at(ox, "ox", &args, None);
    let q = d.run_at(Path::new("qemu-io"), "qa", &args[1..], None);
    assert_eq!(filter(&o.stdout), filter(&q.stdout));
    let oe = String::from_utf8_lossy(&o.stderr).replace("oxcow io:", "qemu-io:");
    assert_eq!(oe, String::from_utf8_lossy(&q.stderr));
    assert_eq!(o.status.code(), q.status.code());
    d.images_equal("plain.qcow2").unwrap();
    // Its prompt and messages name it.
    let o = d.run_at(ox, "ox", &["io", "plain.qcow2"], Some("read 0 1\n"));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("oxcow io> read 1/1"));
    let o = d.run_at(ox, "ox", &["io", "nonexistent"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "oxcow io: can't open device nonexistent: Could not open 'nonexistent': No such file or directory\n"
    );
}
