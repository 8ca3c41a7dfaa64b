//! Shared helpers of the integration tests: running qemu-img / qemu-io (the oracle),
//! a tiny seeded RNG, random qemu-io workloads, and the checks that compare oxcow's
//! view of an image (bytes and block status) with QEMU's.
//!
//! Environment knobs: OXCOW_TEST_SEED=n shifts every seed (other random workloads,
//! same checks); OXCOW_TEST_KEEP=1 keeps each test's directory and writes the qemu-io
//! commands it ran to `qemu-io.log` there; OXCOW_FUZZ_CASES=n sets the number of
//! cases of the corruption fuzz test in malformed.rs.

#![allow(dead_code)]

use oxcow::{block_status, BlockDevice, Image, OpenOptions};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------
// Seeded randomness: xorshift64*, no dependency.
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; the environment variable OXCOW_TEST_SEED, when set,
    /// shifts every seed (to run the same tests on other random workloads).
    pub fn new(seed: u64) -> Rng {
        let shift = std::env::var("OXCOW_TEST_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        // Mix the seed so that small seeds give unrelated streams; never zero.
        let mut s = seed.wrapping_add(shift.wrapping_mul(0x1000_0000_01b3)) ^ 0x9e37_79b9_7f4a_7c15;
        s = (s ^ (s >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        s = (s ^ (s >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((s ^ (s >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`%.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Plain xorshift64 (shifts 13, 7, 17) from a raw, non-zero state: the generator of
/// the write, crash and concurrency tests, whose seeds pick their programs.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------
// Running QEMU's tools.
// ---------------------------------------------------------------------------------

/// Whether qemu-img runs; says so when it does not.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("qemu-img not found: skipping");
    }
    ok
}

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {stderr}",
            out.status,
            tail(&stdout)
        );
    }
    stdout
}

fn tail(s: &str) -> &str {
    let n = s.len();
    if n > 4000 {
        let mut i = n - 4000;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    } else {
        s
    }
}

/// `qemu-img ARGS` run inside `dir` (so that relative names resolve there).
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

/// `qemu-io` on `image` (inside `dir`) with one `-c` per command; every command must
/// succeed.
pub fn qemu_io(dir: &Path, image: &str, cmds: &[String]) {
    qemu_io_with(dir, image, &[], cmds)
}

pub fn qemu_io_with(dir: &Path, image: &str, extra: &[&str], cmds: &[String]) {
    if keep_dirs() {
        // A replayable log: `qemu-io $(cat qemu-io.log | ...)`.
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("qemu-io.log"))
            .unwrap();
        writeln!(log, "# {image} {extra:?}").unwrap();
        for c in cmds {
            writeln!(log, "{c}").unwrap();
        }
    }
    // A compressed write that follows other writes starts a new qemu-io process.
    // QEMU 10.0 keeps the end of its last compressed write in memory
    // (free_byte_offset) and appends the next compressed write there, even when that
    // host cluster was freed and reused as a data cluster meanwhile (`write -c` A;
    // `write -c` B; `write -z -u` over part of B; a plain write; `write -c` C: C's
    // bytes overwrite the data cluster, and qemu-img check reports "OFLAG_COPIED data
    // cluster ... refcount=2"). A new process starts from a fresh host cluster.
    // Batches also keep command lines short.
    let mut batches: Vec<&[String]> = Vec::new();
    let (mut start, mut seen_compressed, mut others_since) = (0, false, false);
    for (i, c) in cmds.iter().enumerate() {
        let compressed = c.starts_with("write -c");
        if (compressed && seen_compressed && others_since) || i - start == 400 {
            batches.push(&cmds[start..i]);
            (start, seen_compressed, others_since) = (i, false, false);
        }
        if compressed {
            (seen_compressed, others_since) = (true, false);
        } else if seen_compressed {
            others_since = true;
        }
    }
    batches.push(&cmds[start..]);
    batches.retain(|b| !b.is_empty());
    for batch in batches {
        let mut c = Command::new("qemu-io");
        // No fsync when it closes the image: nothing here survives a crash anyway,
        // and hundreds of fsyncs would dominate the run time.
        c.current_dir(dir).args(["-t", "unsafe"]).args(extra);
        for cmd in batch {
            c.arg("-c").arg(cmd);
        }
        c.arg(image);
        let out = c.output().expect("cannot run qemu-io");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stdout.contains("failed") || stderr.contains("failed") {
            // Name the commands that failed: qemu-io prints one result line per command.
            let fails: Vec<&str> = stdout
                .lines()
                .chain(stderr.lines())
                .filter(|l| l.contains("fail") || l.contains("rror"))
                .take(10)
                .collect();
            panic!(
                "qemu-io on {image} failed ({}): {fails:#?}\ncommands: {:?}",
                out.status,
                &batch[..batch.len().min(400)]
            );
        }
    }
}

/// `qemu-img create -f qcow2 [-o OPTS] NAME SIZE` in `dir`.
pub fn create_qcow2(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(name);
    args.push(size);
    qemu_img(dir, &args);
    dir.join(name)
}

/// Writes `count` files of random bytes named `pat0`, `pat1`, ... in `dir`, for
/// `write -s`; their odd lengths make qemu-io's repetition of them unaligned. The
/// odd-numbered ones hold random nibbles: still different at every byte, but they
/// compress, so that compressed writes of them stay compressed (QEMU stores a
/// cluster that does not compress as a plain one).
pub fn pattern_files(dir: &Path, rng: &mut Rng, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let name = format!("pat{i}");
            let len = (1 << 20) + 4096 * i + 777;
            let mut data = rng.bytes(len);
            if i % 2 == 1 {
                data.iter_mut().for_each(|b| *b &= 0x0f);
            }
            std::fs::write(dir.join(&name), data).unwrap();
            name
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Random workloads.
// ---------------------------------------------------------------------------------

/// What a random workload may do to an image.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Virtual size of the image.
    pub size: u64,
    pub cluster: u64,
    /// Subcluster size (the cluster size without extended L2).
    pub subcluster: u64,
    pub ops: usize,
    /// Compressed writes (only to clusters nothing has touched yet).
    pub compressed: bool,
    /// `write -z` and `write -z -u`.
    pub zero: bool,
    pub discard: bool,
    /// Byte-granular offsets and lengths (otherwise 512-byte multiples).
    pub unaligned: bool,
    /// Clusters some earlier command touched: QEMU refuses compressed writes to
    /// allocated clusters, so they only go to the others.
    touched: HashSet<u64>,
}

impl Workload {
    pub fn new(size: u64, cluster: u64) -> Workload {
        Workload {
            size,
            cluster,
            subcluster: cluster,
            ops: 120,
            compressed: true,
            zero: true,
            discard: true,
            unaligned: true,
            touched: HashSet::new(),
        }
    }

    pub fn extended_l2(mut self) -> Self {
        self.subcluster = self.cluster / 32;
        self
    }

    pub fn ops(mut self, n: usize) -> Self {
        self.ops = n;
        self
    }

    pub fn no_compression(mut self) -> Self {
        self.compressed = false;
        self
    }

    /// Records that `off..off+len` was written by other means.
    pub fn touch(&mut self, off: u64, len: u64) {
        for c in off / self.cluster..(off + len).div_ceil(self.cluster) {
            self.touched.insert(c);
        }
    }

    /// The qemu-io commands of one random workload. `patterns` are files for `-s`.
    pub fn commands(&mut self, rng: &mut Rng, patterns: &[String]) -> Vec<String> {
        let mut cmds = Vec::new();
        let mut touched = std::mem::take(&mut self.touched);
        let cs = self.cluster;
        let clusters = self.size.div_ceil(cs);
        let mark = |touched: &mut HashSet<u64>, off: u64, len: u64| {
            for c in off / cs..(off + len).div_ceil(cs) {
                touched.insert(c);
            }
        };
        for _ in 0..self.ops {
            let kind = rng.below(100);
            if self.compressed && kind < 12 {
                // A compressed write of 1..3 fresh clusters (the last one may be the
                // partial last cluster of the image).
                let first = rng.below(clusters);
                let n = rng.between(1, 3).min(clusters - first);
                if (first..first + n).any(|c| touched.contains(&c)) {
                    continue;
                }
                let off = first * cs;
                let len = (n * cs).min(self.size - off);
                mark(&mut touched, off, len);
                let src = if patterns.len() > 1 && rng.percent(70) {
                    // A compressible pattern file.
                    format!(
                        "-s {}",
                        patterns[1 + 2 * rng.below(patterns.len() as u64 / 2) as usize]
                    )
                } else {
                    data_src(rng, patterns)
                };
                cmds.push(format!("write -c {src} {off} {len}"));
                continue;
            }
            let (off, len) = self.extent(rng);
            mark(&mut touched, off, len);
            let cmd = match kind {
                _ if self.zero && kind < 30 => {
                    let unmap = if rng.percent(50) { "-u " } else { "" };
                    format!("write -z {unmap}{off} {len}")
                }
                _ if self.discard && kind < 40 => format!("discard {off} {len}"),
                _ => format!("write {} {off} {len}", data_src(rng, patterns)),
            };
            cmds.push(cmd);
        }
        self.touched = touched;
        cmds
    }

    /// A random extent inside the image, of one of several typical shapes.
    fn extent(&self, rng: &mut Rng) -> (u64, u64) {
        let (cs, sc) = (self.cluster, self.subcluster);
        let align = if self.unaligned && rng.percent(40) {
            1
        } else {
            512.min(sc)
        };
        let (off, len) = match rng.below(100) {
            // Small: a few bytes to two subclusters.
            0..=29 => (rng.below(self.size), rng.between(1, 2 * sc)),
            // Whole subclusters.
            30..=59 => (rng.below(self.size / sc) * sc, rng.between(1, 8) * sc),
            // Whole clusters.
            60..=84 => (rng.below(self.size / cs) * cs, rng.between(1, 3) * cs),
            // Large: up to a MiB anywhere.
            _ => (rng.below(self.size), rng.between(1, 1 << 20)),
        };
        let off = off / align * align;
        let len = (len / align * align).max(align);
        let off = off.min(self.size - align);
        (off, len.min(self.size - off))
    }
}

/// The data part of a write command: a pattern byte or a random pattern file.
fn data_src(rng: &mut Rng, patterns: &[String]) -> String {
    if patterns.is_empty() || rng.percent(30) {
        format!("-P {}", rng.between(1, 255))
    } else {
        format!("-s {}", rng.pick(patterns))
    }
}

// ---------------------------------------------------------------------------------
// What QEMU says an image holds.
// ---------------------------------------------------------------------------------

/// `qemu-img check --output=json PATH`, whatever it answers.
pub fn qemu_check_json(path: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap()
}

/// `qemu-img convert -O raw PATH RAW`, which must succeed: the guest bytes as
/// qemu-img reads them (RAW stays next to the image).
pub fn qemu_read_raw(path: &Path, raw: &Path) -> Vec<u8> {
    assert!(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(raw)
        .status()
        .unwrap()
        .success());
    std::fs::read(raw).unwrap()
}

/// `qemu-img convert -O raw` of `name` (in `dir`), read back whole.
pub fn qemu_raw(dir: &Path, name: &str) -> Vec<u8> {
    let out = qemu_raw_file(dir, name);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `qemu-img convert -O raw` of `name` (in `dir`) into a new sparse file.
pub fn qemu_raw_file(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!(
        "{}.oracle.raw",
        name.replace(['/', ':', '{', '}', '"', ','], "_")
    ));
    let out_s = out.to_str().unwrap();
    qemu_img(dir, &["convert", "-t", "unsafe", "-O", "raw", name, out_s]);
    out
}

/// One run of block status, as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRun {
    pub start: u64,
    pub len: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl MapRun {
    fn same_kind(&self, o: &MapRun) -> bool {
        (
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed,
        ) == (o.depth, o.present, o.zero, o.data, o.compressed)
    }
}

/// `qemu-img map --output=json NAME`, parsed (the entries are flat objects of
/// numbers and booleans).
pub fn qemu_map(dir: &Path, name: &str) -> Vec<MapRun> {
    parse_map(&qemu_img(dir, &["map", "--output=json", name]))
}

pub fn parse_map(json: &str) -> Vec<MapRun> {
    let mut runs = Vec::new();
    for obj in json.split('{').skip(1) {
        let body = obj.split('}').next().unwrap();
        let mut r = MapRun {
            start: u64::MAX,
            len: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        for field in body.split(',') {
            let Some((k, v)) = field.split_once(':') else {
                continue;
            };
            let k = k.trim().trim_matches('"');
            let v = v.trim();
            let num = || v.parse::<u64>().unwrap_or_else(|_| panic!("bad {k}: {v}"));
            match k {
                "start" => r.start = num(),
                "length" => r.len = num(),
                "depth" => r.depth = num() as u32,
                "present" => r.present = v == "true",
                "zero" => r.zero = v == "true",
                "data" => r.data = v == "true",
                "compressed" => r.compressed = v == "true",
                "offset" => r.offset = Some(num()),
                _ => {}
            }
        }
        assert_ne!(r.start, u64::MAX, "no start in {body}");
        runs.push(r);
    }
    runs
}

/// oxcow's block status of the whole device, run by run.
pub fn oxcow_map(dev: &dyn BlockDevice) -> Vec<MapRun> {
    let size = dev.size();
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let s = block_status(dev, off, size - off)
            .unwrap_or_else(|e| panic!("block_status at {off}: {e}"));
        assert!(s.len > 0 && s.len <= size - off, "bad run length {s:?}");
        runs.push(MapRun {
            start: off,
            len: s.len,
            depth: s.depth,
            present: s.present,
            zero: s.zero,
            data: s.data,
            compressed: s.compressed,
            offset: s.offset,
        });
        off += s.len;
    }
    runs
}

/// Merges adjacent runs of the same kind (offsets ignored).
pub fn merge_kinds(runs: &[MapRun]) -> Vec<MapRun> {
    let mut out: Vec<MapRun> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.same_kind(r) && l.start + l.len == r.start => l.len += r.len,
            _ => out.push(MapRun { offset: None, ..*r }),
        }
    }
    out
}

/// Checks that oxcow's runs and QEMU's agree on every byte: kind (depth, present,
/// zero, data, compressed) after merging, and the host offset wherever either names
/// one.
pub fn assert_maps_agree(what: &str, qemu: &[MapRun], ours: &[MapRun]) {
    let (mq, mo) = (merge_kinds(qemu), merge_kinds(ours));
    if mq != mo {
        let first = mq
            .iter()
            .zip(&mo)
            .position(|(a, b)| a != b)
            .unwrap_or(mq.len().min(mo.len()));
        panic!(
            "{what}: block status differs from qemu-img map at merged run {first}:\n qemu:  {:?}\n oxcow: {:?}",
            &mq[first..(first + 3).min(mq.len())],
            &mo[first..(first + 3).min(mo.len())]
        );
    }
    // Offsets, over each intersection of a QEMU run and an oxcow run.
    let (mut i, mut j) = (0, 0);
    while i < qemu.len() && j < ours.len() {
        let (q, o) = (&qemu[i], &ours[j]);
        let lo = q.start.max(o.start);
        let hi = (q.start + q.len).min(o.start + o.len);
        if lo < hi {
            let qo = q.offset.map(|x| x + (lo - q.start));
            let oo = o.offset.map(|x| x + (lo - o.start));
            assert_eq!(
                qo, oo,
                "{what}: host offset of guest {lo:#x} differs (qemu run {q:?}, oxcow run {o:?})"
            );
        }
        if q.start + q.len <= o.start + o.len {
            i += 1;
        } else {
            j += 1;
        }
    }
}

// ---------------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------------

/// Opens `path` read-write with default options.
pub fn open_writable(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("oxcow cannot open {}: {e}", path.display()))
}

/// Panics at the first differing byte, without printing whole buffers.
pub fn assert_bytes(what: &str, got: &[u8], want: &[u8], base: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: byte at guest offset {:#x} differs: oxcow {:02x?}, qemu {:02x?}",
            base + i as u64,
            &got[i..end],
            &want[i..end]
        );
    }
}

/// Reads the whole device with oxcow in several ways and compares with `want`:
/// one whole read, sequential reads of random sizes, random reads at random offsets,
/// two threads at once, and a reopen with a tiny L2 cache.
pub fn check_reads(path: &Path, opts: &OpenOptions, img: &Image, want: &[u8], rng: &mut Rng) {
    let what = path.display().to_string();
    let size = img.size();
    assert_eq!(size, want.len() as u64, "{what}: virtual size");
    let mut whole = vec![0u8; size as usize];
    img.read_at(&mut whole, 0)
        .unwrap_or_else(|e| panic!("{what}: whole read: {e}"));
    assert_bytes(&format!("{what} (whole read)"), &whole, want, 0);
    drop(whole);

    // Sequential chunks of random sizes.
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 21];
    while off < size {
        let n = match rng.below(4) {
            0 => rng.between(1, 511),
            1 => rng.between(1, 8) * 512,
            2 => rng.between(1, 256 << 10),
            _ => rng.between(1, 2 << 20),
        }
        .min(size - off) as usize;
        img.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("{what}: read {n} at {off}: {e}"));
        assert_bytes(
            &format!("{what} (chunk at {off} of {n})"),
            &buf[..n],
            &want[off as usize..off as usize + n],
            off,
        );
        off += n as u64;
    }

    // Random reads, and two threads reading at once.
    random_reads(&what, img, want, rng.next_u64(), 100);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let seed = rng.next_u64() + t;
            let what = &what;
            s.spawn(move || random_reads(what, img, want, seed, 50));
        }
    });

    // The smallest L2 cache: every table is evicted again and again.
    let small = Image::open(
        path,
        &OpenOptions {
            l2_cache_bytes: Some(1),
            ..opts.clone()
        },
    )
    .unwrap();
    random_reads(
        &format!("{what} (small L2 cache)"),
        &small,
        want,
        rng.next_u64(),
        50,
    );

    // Reads outside the device are refused, not truncated.
    let mut b = [0u8; 2];
    assert!(img.read_at(&mut b, size - 1).is_err());
    assert!(img.read_at(&mut b, u64::MAX).is_err());
}

fn random_reads(what: &str, img: &Image, want: &[u8], seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let size = want.len() as u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..count {
        let off = rng.below(size);
        let n = rng.between(1, 1 << 20).min(size - off) as usize;
        let n = if rng.percent(50) { n.min(4096) } else { n };
        img.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("{what}: read {n} at {off}: {e}"));
        assert_bytes(
            &format!("{what} (random read at {off} of {n})"),
            &buf[..n],
            &want[off as usize..off as usize + n],
            off,
        );
    }
}

/// Compares oxcow's block status of the image with `qemu-img map`.
pub fn check_map(dir: &Path, name: &str, img: &Image) {
    let q = qemu_map(dir, name);
    let o = oxcow_map(img);
    assert_maps_agree(name, &q, &o);
}

/// The whole check of one image file in `dir`: oxcow opens it, reads exactly what
/// `qemu-img convert -O raw` gives, and its block status agrees with `qemu-img map`.
///
/// Block status is compared first, before anything reads the image's data: on ext4,
/// reading a range that QEMU zeroed with fallocate (an unwritten extent) brings zero
/// pages into the page cache, and from then on SEEK_DATA reports that range as data,
/// so the answer QEMU's metadata-preallocation heuristic sees would change under us.
pub fn verify(dir: &Path, name: &str, seed: u64) {
    verify_opts(dir, name, &OpenOptions::default(), name, seed)
}

/// `verify` with open options; `qemu_name` is what QEMU opens for the same view
/// (a `json:` name without the backing file, for example).
pub fn verify_opts(dir: &Path, name: &str, opts: &OpenOptions, qemu_name: &str, seed: u64) {
    let path = dir.join(name);
    let img = Image::open(&path, opts)
        .unwrap_or_else(|e| panic!("oxcow cannot open {}: {e}", path.display()));
    check_map(dir, qemu_name, &img);
    let want = qemu_raw(dir, qemu_name);
    let mut rng = Rng::new(seed);
    check_reads(&path, opts, &img, &want, &mut rng);
}

/// The check for images too large to read whole: QEMU's map guides where to read.
/// Every run of the map is compared with the raw conversion (whole when it is small,
/// else its first and last MiB and a random MiB), and oxcow's map must agree.
pub fn verify_sparse(dir: &Path, name: &str, seed: u64) {
    let path = dir.join(name);
    let raw_path = qemu_raw_file(dir, name);
    let raw = std::fs::File::open(&raw_path).unwrap();
    let img = open(&path);
    let size = img.size();
    assert_eq!(raw.metadata().unwrap().len(), size);
    let mut rng = Rng::new(seed);
    // Block status first: see `verify`.
    let q = qemu_map(dir, name);
    assert_maps_agree(name, &q, &oxcow_map(&img));
    let mut pieces = Vec::new();
    for r in &q {
        const MB: u64 = 1 << 20;
        if r.len <= 4 * MB {
            pieces.push((r.start, r.len));
        } else {
            pieces.push((r.start, MB));
            pieces.push((r.start + r.len - MB, MB));
            pieces.push((r.start + rng.below(r.len - MB), MB));
        }
        // Straddle the run's end too.
        let end = r.start + r.len;
        if end < size {
            let a = end.saturating_sub(700).max(r.start);
            pieces.push((a, (end + 700).min(size) - a));
        }
    }
    for _ in 0..100 {
        let off = rng.below(size);
        pieces.push((off, rng.between(1, 1 << 20).min(size - off)));
    }
    let mut got = vec![0u8; 4 << 20];
    let mut want = vec![0u8; 4 << 20];
    for (off, len) in pieces {
        let n = len as usize;
        img.read_at(&mut got[..n], off)
            .unwrap_or_else(|e| panic!("{name}: read {n} at {off}: {e}"));
        raw.read_exact_at(&mut want[..n], off).unwrap();
        assert_bytes(name, &got[..n], &want[..n], off);
    }
    drop(raw);
    std::fs::remove_file(raw_path).unwrap();
}

// ---------------------------------------------------------------------------------
// Header patching.
// ---------------------------------------------------------------------------------

pub fn read_be64(path: &Path, at: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

pub fn read_be32(path: &Path, at: u64) -> u32 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_be_bytes(b)
}

pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

pub fn patch_be64(path: &Path, at: u64, v: u64) {
    patch(path, at, &v.to_be_bytes())
}

pub fn patch_be32(path: &Path, at: u64, v: u32) {
    patch(path, at, &v.to_be_bytes())
}

pub fn patch_be16(path: &Path, at: u64, v: u16) {
    patch(path, at, &v.to_be_bytes())
}

/// Flushes every file under `dir` to disk. Until the file system has written them
/// back, the holes it reports (SEEK_HOLE) inside freshly written or zeroed ranges can
/// change from one call to the next, and both QEMU's block status and oxcow's look
/// at them.
pub fn sync_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            sync_dir(&e.path());
        } else if t.is_file() {
            std::fs::File::open(e.path()).unwrap().sync_all().unwrap();
        }
    }
}

/// Whether OXCOW_TEST_KEEP is set (to anything but the empty string).
pub fn keep_dirs() -> bool {
    std::env::var_os("OXCOW_TEST_KEEP").is_some_and(|v| !v.is_empty())
}

/// A new temporary directory for one test; kept after the test when the
/// environment variable OXCOW_TEST_KEEP is set, to look at what failed.
pub fn tempdir() -> tempfile::TempDir {
    let keep = keep_dirs();
    let dir = tempfile::Builder::new()
        .prefix("oxcow-test-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

pub mod bitmaps;
pub mod crash;
pub mod model;
