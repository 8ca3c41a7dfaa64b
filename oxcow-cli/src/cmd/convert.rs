//! `convert [-f fmt] [-O output_fmt] [-p] [-q] [-n] [-c] [-S sparse_size] [-m num] [-W]
//! [-t cache] [-T src_cache] [-U] [--target-is-zero] [-o options] [-B backing [-F fmt]]
//! filename [filename2 [...]] output_filename`: qemu-img's img_convert, for raw and
//! qcow2 output.
//!
//! Like qemu-img, the sources (concatenated) are first walked by block status to plan
//! the copy: zero and unallocated ranges are never read, data ranges are cut in chunks
//! of at most 2 MiB (one cluster each when compressing). Worker threads then read the
//! chunks through the shared images (decompressing on every core), find the zero
//! sectors in what they read, compress clusters for `-c`, and record the writes.
//!
//! A raw target is written by the workers themselves with positional writes, so it is
//! a sparse file. A qcow2 target is written by the main thread in guest order (its
//! allocations, hence the file's bytes, do not depend on timing or `-m`: the same
//! bytes as qemu-img's in-order writes), or by the workers with `-W`. With `-S 0` every
//! byte is written; with `-n` the existing target's zero ranges are zeroed; with a
//! backing file (`-B`) what the sources take from their own backing files is left to
//! the target's.
//!
//! One difference from qemu-img in the output: with zlib, clusters that deflate could
//! shrink by about 2% at most (random or already compressed data, told by their byte
//! entropy and repeats) are stored uncompressed without trying (see
//! `hardly_compressible`).

use super::create::{append_descs, QemuOpts, FILE_OPTS, QCOW2_OPTS};
use crate::common::Ctx;
use crate::copyopts::{
    cache_mode_ok, cvtnum, cvtnum_full, getopt_error, object_unsupported, qemu_knows_format,
};
use crate::pool::{is_zero, run_ordered, worker_count, Buffer};
use crate::progress::Progress;
use crate::qopt::{long, Getopt, LongOpt};
use crate::source::{self, error_reason, Source, SECTOR};
use oxcow::engine::compress::compress_cluster;
use oxcow::format::header::CompressionType;
use oxcow::{BlockDevice, Image, OpenOptions};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;

const CMD: &str = "convert";

/// Bytes per read/write request (qemu-img's IO_BUF_SIZE).
const BUF: u64 = 2 << 20;
/// Largest `-S` (MAX_BUF_SECTORS sectors).
const MAX_BUF_SECTORS: u64 = 32768;
/// Longest range one block status request covers (BDRV_REQUEST_MAX_SECTORS).
const MAX_REQUEST: u64 = ((i32::MAX as u64) >> 9) * SECTOR;

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("object", true, "object"),
    long("quiet", false, "q"),
    long("source-image-opts", false, "image-opts"),
    long("image-opts", false, "image-opts"),
    long("source-format", true, "f"),
    long("source-cache", true, "T"),
    long("snapshot", true, "l"),
    long("sparse-size", true, "S"),
    long("output-format", true, "O"),
    long("options", true, "o"),
    long("output-cache", true, "t"),
    long("backing", true, "B"),
    long("backing-format", true, "F"),
    long("force-share", false, "U"),
    long("target-image-opts", false, "target-image-opts"),
    long("salvage", false, "salvage"),
    long("target-is-zero", false, "target-is-zero"),
    long("bitmaps", false, "bitmaps"),
    long("skip-broken-bitmaps", false, "skip-broken-bitmaps"),
    long("rate", true, "r"),
    long("parallel", true, "m"),
    long("oob-writes", false, "W"),
    long("copy-range-offloading", false, "C"),
];

const HELP: &str = "Usage:
Copy one image to another with optional format conversion.  Usage:

  PROG convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
  -S, --sparse-size SPARSE_SIZE
     XXX todo
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit
  -m, --parallel NUM_COROUTINES
     specify parallelism (default 8)
  -C, --copy-range-offloading
     use copy_range offloading
  --salvage
     XXX todo
  -W, --oob-writes
     enable out-of-order writes to improve performance
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name

";

/// The options of one invocation.
struct Opts {
    fmt: Option<String>,
    out_fmt: Option<String>,
    progress: bool,
    quiet: bool,
    skip_create: bool,
    /// Sparse detection threshold in sectors; 0 writes everything.
    min_sparse: u64,
    explicit_min_sparse: bool,
    parallel: u64,
    target_is_zero: bool,
    options: Option<String>,
    cache: String,
    src_cache: String,
    backing: Option<String>,
    backing_fmt: Option<String>,
    compress: bool,
    copy_range: bool,
    snapshot: Option<crate::snapsel::SnapshotSel>,
    bitmaps: bool,
    skip_broken: bool,
    salvage: bool,
    image_opts: bool,
    target_image_opts: bool,
    /// `-W`: writes may complete out of guest order (the qcow2 layout then depends
    /// on timing).
    oob_writes: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            fmt: None,
            out_fmt: None,
            progress: false,
            quiet: false,
            skip_create: false,
            min_sparse: 8,
            explicit_min_sparse: false,
            parallel: 8,
            target_is_zero: false,
            options: None,
            cache: "unsafe".into(),
            src_cache: "writeback".into(),
            backing: None,
            backing_fmt: None,
            compress: false,
            copy_range: false,
            snapshot: None,
            bitmaps: false,
            skip_broken: false,
            salvage: false,
            image_opts: false,
            target_image_opts: false,
            oob_writes: false,
        }
    }
}

/// Whether an `-o` list can be joined to others with ',' (qemu-img's
/// is_valid_option_list).
fn valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// Parses the options; `Err(code)` when the command is over (help printed, or an
/// error reported).
fn parse(ctx: &Ctx, args: &[String]) -> Result<(Opts, Vec<String>), u8> {
    let mut o = Opts::default();
    let mut g = Getopt::new(args, "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONGS);
    while let Some(item) = g.next_opt() {
        let opt = match item {
            Ok(opt) => opt,
            Err(msg) => return Err(getopt_error(ctx, CMD, &msg)),
        };
        let arg = opt.arg.unwrap_or_default();
        match opt.id.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return Err(0);
            }
            "f" => o.fmt = Some(arg),
            "image-opts" => o.image_opts = true,
            "T" => o.src_cache = arg,
            "l" => match crate::snapsel::SnapshotSel::parse(ctx, &arg) {
                Some(sel) => o.snapshot = Some(sel),
                None => return Err(1),
            },
            "bitmaps" => o.bitmaps = true,
            "skip-broken-bitmaps" => o.skip_broken = true,
            "salvage" => o.salvage = true,
            "O" => o.out_fmt = Some(arg),
            "target-image-opts" => o.target_image_opts = true,
            "o" => {
                if !valid_option_list(&arg) {
                    ctx.error(format!("Invalid option list: {arg}"));
                    return Err(1);
                }
                o.options = Some(match o.options.take() {
                    Some(prev) => format!("{prev},{arg}"),
                    None => arg,
                });
            }
            "t" => o.cache = arg,
            "B" => o.backing = Some(arg),
            "F" => o.backing_fmt = Some(arg),
            "S" => {
                let name = "buffer size for sparse output";
                let v = cvtnum(ctx, name, &arg, true).ok_or(1u8)?;
                if !v.is_multiple_of(SECTOR) || v / SECTOR > MAX_BUF_SECTORS {
                    ctx.error(format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are \
                         multiples of {SECTOR} up to {}. Select 0 to disable sparse \
                         detection (fully allocates output).",
                        MAX_BUF_SECTORS * SECTOR
                    ));
                    return Err(1);
                }
                o.min_sparse = v / SECTOR;
                o.explicit_min_sparse = true;
            }
            "n" => o.skip_create = true,
            "target-is-zero" => o.target_is_zero = true,
            "c" => o.compress = true,
            "U" => {}
            "r" => {
                cvtnum(ctx, "rate limit", &arg, true).ok_or(1u8)?;
            }
            "m" => {
                o.parallel =
                    cvtnum_full(ctx, "number of coroutines", &arg, false, 1, 16).ok_or(1u8)?;
            }
            "W" => o.oob_writes = true,
            "C" => o.copy_range = true,
            "p" => o.progress = true,
            "q" => o.quiet = true,
            "object" => return Err(object_unsupported(ctx)),
            _ => {}
        }
    }
    Ok((o, g.operands().to_vec()))
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let (mut o, files) = match parse(ctx, args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if o.out_fmt.is_none() && !o.target_image_opts {
        o.out_fmt = Some("raw".into());
    }
    let checks = [
        (
            o.skip_broken && !o.bitmaps,
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ),
        (
            o.compress && o.copy_range,
            "Cannot enable copy offloading when -c is used",
        ),
        (
            o.explicit_min_sparse && o.copy_range,
            "Cannot enable copy offloading when -S is used",
        ),
        (
            o.copy_range && o.salvage,
            "Cannot use copy offloading in salvaging mode",
        ),
        (
            o.target_image_opts && !o.skip_create,
            "--target-image-opts requires use of -n flag",
        ),
        (
            o.skip_create && o.options.is_some(),
            "-o has no effect when skipping image creation",
        ),
        (
            o.target_is_zero && !o.skip_create,
            "--target-is-zero requires use of -n flag",
        ),
    ];
    if let Some((_, msg)) = checks.iter().find(|c| c.0) {
        ctx.error(msg);
        return 1;
    }
    let out_filename = files.last().cloned();
    let src_num = files.len().saturating_sub(1);
    if let Some(opts) = &o.options {
        if has_help_option(opts) {
            return match &o.out_fmt {
                Some(f) => {
                    print_option_help(ctx, f, out_filename.as_deref().filter(|_| src_num >= 1))
                }
                None => {
                    ctx.error("Option help requires a format be specified");
                    1
                }
            };
        }
    }
    if src_num < 1 {
        ctx.error("Must specify image file name");
        return 1;
    }
    if !cache_mode_ok(ctx, "source cache", &o.src_cache) {
        return 1;
    }
    if o.quiet {
        o.progress = false;
    }
    let mut progress = Progress::new(o.progress, 1.0);
    progress.print(0.0, 100);
    let out_filename = out_filename.unwrap_or_default();
    let code = convert(ctx, &o, &files[..src_num], &out_filename, &mut progress);
    if code == 0 {
        progress.print(100.0, 0);
    }
    progress.end();
    code
}

fn has_help_option(list: &str) -> bool {
    super::create::has_help_option(list)
}

/// Splits an option list "a=1,b=x,,y,c" into (key, value) pairs (",," is a comma
/// inside a value; a key without '=' has no value).
fn split_options(list: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.find('=') {
            Some(i) => out.push((p[..i].to_string(), Some(p[i + 1..].to_string()))),
            None => out.push((p, None)),
        }
    }
    out
}

/// `-o help` for the output format.
fn print_option_help(ctx: &Ctx, fmt: &str, filename: Option<&str>) -> u8 {
    if fmt == "qcow2" {
        return super::create::print_option_help(ctx, fmt, filename);
    }
    if fmt != "raw" {
        return unknown_or_unsupported(ctx, fmt);
    }
    match filename {
        Some(_) => println!(
            "Supported options:\n  \
             extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n  \
             nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n  \
             preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n  \
             size=<size>            - Virtual disk size"
        ),
        None => println!(
            "Supported raw options:\n  \
             size=<size>            - Virtual disk size\n\n\
             The protocol level may support further options.\n\
             Specify the target filename to include those options."
        ),
    }
    0
}

fn unknown_or_unsupported(ctx: &Ctx, fmt: &str) -> u8 {
    if qemu_knows_format(fmt) {
        ctx.error(format!(
            "Output format '{fmt}' is not supported yet (only 'raw' and 'qcow2' can be written)"
        ));
    } else {
        ctx.error(format!("Unknown file format '{fmt}'"));
    }
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Off,
    Falloc,
    Full,
}

/// The raw creation options given with `-o`.
fn raw_create_options(ctx: &Ctx, list: Option<&str>) -> Result<Option<String>, u8> {
    let mut prealloc = None;
    for (k, v) in split_options(list.unwrap_or("")) {
        match k.as_str() {
            "size" | "extent_size_hint" => {
                let v = v.unwrap_or_default();
                if crate::sizearg::strtosz(&v).is_err() {
                    ctx.error(format!(
                        "Parameter '{k}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, \
                         tera-, peta-\nand exabytes, respectively."
                    ));
                    return Err(1);
                }
            }
            "nocow" => {
                if !matches!(v.as_deref(), None | Some("on") | Some("off")) {
                    ctx.error("Parameter 'nocow' expects 'on' or 'off'");
                    return Err(1);
                }
            }
            "preallocation" => prealloc = Some(v.unwrap_or_else(|| "on".into())),
            other => {
                ctx.error(format!("Invalid parameter '{other}'"));
                return Err(1);
            }
        }
    }
    Ok(prealloc)
}

/// One qemu-img request: a range of the (concatenated) output, read from a source,
/// known to be zero, or left to the target's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Data,
    Zero,
    /// Left alone so that the target's backing file shows through.
    Backing,
}

/// A planned request of qemu-img's copy loop.
#[derive(Debug, Clone, Copy)]
struct Seg {
    status: Status,
    /// Offset in the output.
    out: u64,
    len: u64,
}

/// What shapes the plan besides the sources.
#[derive(Debug, Clone, Copy)]
struct PlanParams {
    min_sparse: u64,
    /// Bytes per data request (qemu-img's buf_sectors): 2 MiB, or one cluster when
    /// writing compressed clusters.
    buf: u64,
    /// The target's cluster size when writing compressed clusters: requests are
    /// whole clusters then.
    compress_cluster: Option<u64>,
    /// The target has a backing file: what the sources take from their own backing
    /// files is left to it.
    target_has_backing: bool,
    /// Length of the new target's backing file; zeros past it need no writing.
    target_backing_len: Option<u64>,
}

/// The planning walk of convert_iteration_sectors: block status per source (above
/// the source's backing file when the target has one), runs aligned to the
/// source's cluster size, data requests of at most `buf` bytes, whole clusters when
/// compressing.
fn plan(p: &PlanParams, srcs: &[Source]) -> Result<Vec<Seg>, (u64, String)> {
    let total: u64 = srcs.iter().map(|s| s.len).sum();
    let mut segs: Vec<Seg> = Vec::new();
    let mut pos = 0u64;
    let mut src_start = 0u64;
    let mut cur = 0usize;
    let mut next_status = 0u64;
    let mut status = Status::Zero;
    while pos < total {
        while pos - src_start >= srcs[cur].len {
            src_start += srcs[cur].len;
            cur += 1;
        }
        let s = &srcs[cur];
        let mut n = (total - pos).min(MAX_REQUEST);
        let mut post_backing_zero = false;
        if let Some(tb) = p.target_backing_len {
            if pos >= tb {
                post_backing_zero = true;
            } else if pos + n > tb {
                n = tb - pos;
            }
        }
        if next_status <= pos {
            let off = pos - src_start;
            let ask = n.min(s.len - off);
            let st = if p.target_has_backing {
                s.status_above_backing(off, ask)
            } else {
                s.status(off, ask)
            }
            .map_err(|e| (off, error_reason(&e)))?;
            let mut len = st.len.max(1).div_ceil(SECTOR) * SECTOR;
            let tail = (off + len) % s.align;
            if len > tail {
                len -= tail;
            }
            status = if st.zero {
                if post_backing_zero {
                    Status::Backing
                } else {
                    Status::Zero
                }
            } else if st.data || !p.target_has_backing {
                Status::Data
            } else {
                Status::Backing
            };
            next_status = pos + len;
        }
        n = n.min(next_status - pos);
        if status == Status::Data {
            n = n.min(p.buf);
        }
        // Compressed clusters are written whole: a shorter run is read as data
        // (and the rest of the current run too, as qemu-img's state changes).
        if let Some(cs) = p.compress_cluster {
            if n < cs {
                n = cs.min(total - pos);
                status = Status::Data;
            } else {
                n = n / cs * cs;
            }
        }
        if status == Status::Zero && p.min_sparse == 0 {
            n = n.min(p.buf);
        }
        // Consecutive requests that write nothing make one range.
        let quiet = |st: Status| st == Status::Backing || (st == Status::Zero && p.min_sparse != 0);
        if let Some(last) = segs.last_mut() {
            if status == last.status && quiet(status) && last.out + last.len == pos {
                last.len += n;
                pos += n;
                continue;
            }
        }
        segs.push(Seg {
            status,
            out: pos,
            len: n,
        });
        pos += n;
    }
    Ok(segs)
}

/// What the workers do with one job: requests grouped to at most 2 MiB, read with one
/// call, each request then written as qemu-img writes it.
#[derive(Debug, Clone, Copy)]
struct Job {
    /// Index of the first request in the plan.
    first: usize,
    count: usize,
    out: u64,
    len: u64,
    status: Status,
}

/// Where the copy goes.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// A raw file, written with positional writes.
    Raw(&'a File),
    /// A qcow2 image.
    Qcow2(&'a Image),
}

/// A write of the copy. Workers record the writes of a job, then carry them out
/// themselves (raw targets, and qcow2 targets with `-W`) or hand them to the main
/// thread, which carries them out in guest order (qcow2 targets: the image's layout
/// then does not depend on which worker finished first).
enum OpKind {
    /// Bytes `start..end` of the job's buffer.
    Data { start: usize, end: usize },
    /// Zeros, written as zeros or by unmapping.
    Zero { len: u64 },
    /// One compressed cluster: bytes `start..end` of the job's packed output.
    Compressed { start: usize, end: usize },
}

struct Op {
    /// Start of the request the write belongs to (named in error messages).
    req: u64,
    out: u64,
    kind: OpKind,
}

/// The writes of a job, and the compressed clusters they store one after another
/// (kept from job to job: no allocation per cluster).
#[derive(Default)]
struct Writes {
    ops: Vec<Op>,
    packed: Vec<u8>,
}

impl Writes {
    fn push(&mut self, req: u64, out: u64, kind: OpKind) {
        self.ops.push(Op { req, out, kind });
    }
}

/// A job's outcome: its writes (when the main thread is to carry them out) and the
/// buffer they refer to.
struct Done {
    first: usize,
    count: usize,
    result: Result<(), Failure>,
    writes: Option<Writes>,
    buf: Option<Buffer>,
}

/// The copy settings the workers share.
struct Copier<'a> {
    srcs: &'a [Source],
    /// Output offset where each source starts.
    starts: Vec<u64>,
    target: Target<'a>,
    segs: &'a [Seg],
    min_sparse: u64,
    alignment: u64,
    has_zero_init: bool,
    salvage: bool,
    quiet: bool,
    ctx: &'a Ctx,
    /// Serializes writes to a raw target.
    write_lock: std::sync::Mutex<()>,
    /// Compressed output: the target's compression type and cluster size.
    compress: Option<(CompressionType, u64)>,
    /// The main thread carries out the writes, in guest order.
    in_order: bool,
    /// Buffers handed back by the main thread after their writes.
    pool: std::sync::Mutex<Vec<Buffer>>,
    /// Write lists handed back likewise.
    writes_pool: std::sync::Mutex<Vec<Writes>>,
}

/// A failed request: "error while reading/writing at byte N: reason".
struct Failure {
    at: u64,
    write: bool,
    reason: String,
}

impl Copier<'_> {
    /// The source holding output offset `out` and the offset inside it.
    fn locate(&self, out: u64) -> (usize, u64) {
        let i = self.starts.partition_point(|&s| s <= out).saturating_sub(1);
        (i, out - self.starts[i])
    }

    /// Reads output range `out..out+buf.len()` from the sources (a compressed
    /// cluster may span two of them).
    fn read(&self, buf: &mut [u8], out: u64) -> Result<(), oxcow::Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = out + done as u64;
            let (i, off) = self.locate(at);
            let left = self.srcs[i].len.saturating_sub(off);
            let n = if left == 0 {
                buf.len() - done
            } else {
                (left.min((buf.len() - done) as u64)) as usize
            };
            self.srcs[i].read(&mut buf[done..done + n], off)?;
            done += n;
        }
        Ok(())
    }

    fn read_salvaging(&self, buf: &mut [u8], out: u64) -> Result<(), oxcow::Error> {
        if self.read(buf, out).is_ok() {
            return Ok(());
        }
        for (k, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = out + k as u64 * SECTOR;
            if let Err(e) = self.read(sector, at) {
                if !self.quiet {
                    let (_, off) = self.locate(at);
                    self.ctx.error(format!(
                        "warning: error while reading offset {off}: {}",
                        error_reason(&e)
                    ));
                }
                sector.fill(0);
            }
        }
        Ok(())
    }

    /// A buffer for the next job: one handed back, or a new one.
    fn pooled(&self) -> Buffer {
        let reused = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| Buffer::new(BUF as usize))
    }

    fn give_back(&self, buf: Buffer) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
    }

    fn give_back_writes(&self, mut w: Writes) {
        w.ops.clear();
        w.packed.clear();
        self.writes_pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    /// Runs one job on a worker: reads it, decides its writes, and carries them out
    /// or hands them on.
    fn work(&self, buf: &mut Buffer, job: Job) -> Done {
        let reused = self
            .writes_pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut w = reused.unwrap_or_default();
        let (first, count) = (job.first, job.count);
        if let Err(f) = self.process(buf, job, &mut w) {
            self.give_back_writes(w);
            return Done {
                first,
                count,
                result: Err(f),
                writes: None,
                buf: None,
            };
        }
        if self.in_order {
            let needs_buf = w
                .ops
                .iter()
                .any(|op| matches!(op.kind, OpKind::Data { .. }));
            let buf = needs_buf.then(|| std::mem::replace(buf, self.pooled()));
            return Done {
                first,
                count,
                result: Ok(()),
                writes: Some(w),
                buf,
            };
        }
        let result = self.execute(buf, &w);
        self.give_back_writes(w);
        Done {
            first,
            count,
            result,
            writes: None,
            buf: None,
        }
    }

    /// Reads a job and records its writes.
    fn process(&self, buf: &mut Buffer, job: Job, ops: &mut Writes) -> Result<(), Failure> {
        let segs = &self.segs[job.first..job.first + job.count];
        if buf.len() < job.len as usize {
            *buf = Buffer::new(job.len as usize);
        }
        match job.status {
            Status::Backing => Ok(()),
            Status::Zero if self.min_sparse != 0 => {
                if !self.has_zero_init {
                    for s in segs {
                        ops.push(s.out, s.out, OpKind::Zero { len: s.len });
                    }
                }
                Ok(())
            }
            Status::Zero => {
                // -S 0: zeros are written as data.
                let n = job.len as usize;
                buf[..n].fill(0);
                self.record_writes(&buf[..n], job, segs, ops)
            }
            Status::Data => {
                let n = job.len as usize;
                let data = &mut buf[..n];
                let read = if self.salvage {
                    self.read_salvaging(data, job.out)
                } else {
                    self.read(data, job.out)
                };
                if read.is_err() {
                    // Name the failing request as qemu-img does.
                    for s in segs {
                        let at = (s.out - job.out) as usize;
                        if let Err(e) = self.read(&mut data[at..at + s.len as usize], s.out) {
                            return Err(Failure {
                                at: s.out,
                                write: false,
                                reason: error_reason(&e),
                            });
                        }
                    }
                }
                self.record_writes(&buf[..n], job, segs, ops)
            }
        }
    }

    fn record_writes(
        &self,
        data: &[u8],
        job: Job,
        segs: &[Seg],
        ops: &mut Writes,
    ) -> Result<(), Failure> {
        for s in segs {
            let at = (s.out - job.out) as usize;
            self.write_request(data, at, s.len as usize, s.out, ops)?;
        }
        Ok(())
    }

    /// convert_co_write for a data request (`data[at..at+len]`, at output offset
    /// `out`): with sparse detection, zero runs are skipped (or zeroed on a target
    /// that is not known to be zero); compressed output compresses whole clusters.
    fn write_request(
        &self,
        data: &[u8],
        at: usize,
        len: usize,
        out: u64,
        ops: &mut Writes,
    ) -> Result<(), Failure> {
        let req = &data[at..at + len];
        if let Some((kind, cs)) = self.compress {
            if self.min_sparse != 0 && is_zero(req) {
                if !self.has_zero_init {
                    ops.push(out, out, OpKind::Zero { len: len as u64 });
                }
                return Ok(());
            }
            let mut padded = Vec::new();
            let whole = if len as u64 == cs {
                req
            } else {
                // The last cluster of a disk that ends inside it, padded with zeros.
                padded.resize(cs as usize, 0);
                padded[..len].copy_from_slice(req);
                &padded[..]
            };
            let compressed = if kind == CompressionType::Zlib && hardly_compressible(whole) {
                Ok(None)
            } else {
                compress_cluster(kind, whole)
            };
            match compressed {
                Ok(Some(c)) => {
                    let start = ops.packed.len();
                    ops.packed.extend_from_slice(&c);
                    let end = ops.packed.len();
                    ops.push(out, out, OpKind::Compressed { start, end });
                }
                // Data that does not shrink is written as a normal cluster.
                Ok(None) => ops.push(
                    out,
                    out,
                    OpKind::Data {
                        start: at,
                        end: at + len,
                    },
                ),
                Err(_) => {
                    return Err(Failure {
                        at: out,
                        write: true,
                        reason: "Invalid argument".into(),
                    })
                }
            }
            return Ok(());
        }
        if self.min_sparse == 0 {
            ops.push(
                out,
                out,
                OpKind::Data {
                    start: at,
                    end: at + len,
                },
            );
            return Ok(());
        }
        let sectors = len.div_ceil(SECTOR as usize);
        let mut done = 0usize;
        while done < sectors {
            let start = done * SECTOR as usize;
            let (alloc, n) = is_allocated_sectors_min(
                &req[start..],
                sectors - done,
                self.min_sparse as usize,
                out / SECTOR + done as u64,
                self.alignment as usize,
            );
            let end = ((done + n) * SECTOR as usize).min(len);
            let kind = if alloc {
                Some(OpKind::Data {
                    start: at + start,
                    end: at + end,
                })
            } else if !self.has_zero_init {
                Some(OpKind::Zero {
                    len: (end - start) as u64,
                })
            } else {
                None
            };
            if let Some(kind) = kind {
                ops.push(out, out + start as u64, kind);
            }
            done += n;
        }
        Ok(())
    }

    /// Carries out recorded writes; `buf` is the buffer their data lies in.
    fn execute(&self, buf: &[u8], w: &Writes) -> Result<(), Failure> {
        let mut scratch = Vec::new();
        for op in &w.ops {
            let r = match (self.target, &op.kind) {
                (Target::Raw(_), OpKind::Data { start, end }) => self
                    .raw_write(&buf[*start..*end], op.out)
                    .map_err(|e| crate::common::io_reason(&e)),
                (Target::Raw(_), OpKind::Zero { len }) => self
                    .raw_zeroes(&mut scratch, op.out, *len)
                    .map_err(|e| crate::common::io_reason(&e)),
                (Target::Raw(_), OpKind::Compressed { .. }) => {
                    Err("Operation not supported".to_string())
                }
                (Target::Qcow2(img), OpKind::Data { start, end }) => img
                    .write_at(&buf[*start..*end], op.out)
                    .map_err(|e| write_reason(&e)),
                (Target::Qcow2(img), OpKind::Zero { len }) => img
                    .write_zeroes(op.out, *len, true)
                    .map_err(|e| write_reason(&e)),
                (Target::Qcow2(img), OpKind::Compressed { start, end }) => match img.qcow2() {
                    Some(q) => q
                        .write_compressed_prepared(&w.packed[*start..*end], op.out)
                        .map_err(|e| write_reason(&e)),
                    None => Err("Operation not supported".to_string()),
                },
            };
            r.map_err(|reason| Failure {
                at: op.req,
                write: true,
                reason,
            })?;
        }
        Ok(())
    }

    /// Writes to a raw target. Writes are serialized: a buffered write holds the
    /// file's inode lock anyway, and threads contending for it only burn CPU spinning.
    fn raw_write(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Target::Raw(f) = self.target else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all_at(data, offset)
    }

    /// Makes `offset..offset+len` of a raw target read as zeros: punches a hole, or
    /// writes zeros where the file system cannot.
    fn raw_zeroes(&self, buf: &mut Vec<u8>, offset: u64, len: u64) -> std::io::Result<()> {
        let Target::Raw(f) = self.target else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        if punch_hole(f, offset, len).is_ok() {
            return Ok(());
        }
        buf.clear();
        buf.resize(BUF.min(len) as usize, 0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.raw_write(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The reason QEMU gives when a write to a qcow2 target fails.
fn write_reason(e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Io(io) => crate::common::io_reason(io),
        oxcow::Error::Unsupported(m) if m.starts_with("Compression is not supported") => {
            "Operation not supported".to_string()
        }
        oxcow::Error::Unsupported(m) if m.starts_with("Compression can't overwrite") => {
            "Input/output error".to_string()
        }
        other => other.to_string(),
    }
}

fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// qemu-img's is_allocated_sectors: whether the first sector of `buf` holds data, and
/// how many sectors (up to `n`) share its state, with the end of the run moved to an
/// `alignment` boundary to spare the target read-modify-write cycles.
fn is_allocated_sectors(buf: &[u8], n: usize, sector_num: u64, alignment: usize) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let sector = |i: usize| {
        let s = i * SECTOR as usize;
        &buf[s..(s + SECTOR as usize).min(buf.len())]
    };
    let mut zero = is_zero(sector(0));
    let mut i = 1;
    while i < n && is_zero(sector(i)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = ((sector_num + i as u64) & (alignment as u64 - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            zero = false;
        }
        if !zero {
            i = (i + alignment - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's is_allocated_sectors_min: like [`is_allocated_sectors`], but when the
/// buffer starts with data, zero runs shorter than `min` sectors count as data.
fn is_allocated_sectors_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector_num: u64,
    alignment: usize,
) -> (bool, usize) {
    let min = min.min(n);
    let (alloc, first) = is_allocated_sectors(buf, n, sector_num, alignment);
    if !alloc {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let (a, p) = is_allocated_sectors(
            &buf[checked * SECTOR as usize..],
            n - checked,
            sector_num + checked as u64,
            alignment,
        );
        checked += p;
        if a {
            used = checked;
        } else if p >= min {
            break;
        }
    }
    (true, used)
}

/// Whether deflate with QEMU's 4 KiB window would save at most about 2% on a
/// cluster: an order-0 entropy of at least 7.9 bits a byte (Huffman coding saves at
/// most 1.25%) and repeats within the window covering at most 1% of it. Such
/// clusters (random or already compressed data) are stored as they are without
/// trying deflate, which costs as much on them as on any data (unlike zstd, which
/// gives up on them quickly); qemu-img would store a few of them compressed, a
/// percent or two smaller.
fn hardly_compressible(data: &[u8]) -> bool {
    let n = data.len();
    if n < 4096 {
        return false;
    }
    // Four histograms, so that consecutive bytes do not wait on the same counter.
    let mut hist = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        hist[0][q[0] as usize] += 1;
        hist[1][q[1] as usize] += 1;
        hist[2][q[2] as usize] += 1;
        hist[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        hist[0][b as usize] += 1;
    }
    let total = n as f64;
    let mut entropy = 0.0;
    let [h0, h1, h2, h3] = &hist;
    for (((a, b), c), d) in h0.iter().zip(h1).zip(h2).zip(h3) {
        let c = a + b + c + d;
        if c > 0 {
            let p = c as f64 / total;
            entropy -= p * p.log2();
        }
    }
    if entropy < 7.9 {
        return false;
    }
    // Repeats within deflate's reach (the window less its lookahead), looked up at
    // anchors: positions whose next 4 bytes hash to a multiple of 16, one in 16 and
    // chosen by content alone, so that a copy has its anchors where the original has
    // them. A match found at an anchor is extended both ways.
    const REACH: usize = 4096 - 262;
    let mut last = [u32::MAX; 1 << 12];
    let mut matched = 0usize;
    let mut covered = 0usize;
    let mut i = 0usize;
    while i + 4 <= n {
        let key = u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let h = (key.wrapping_mul(0x9E37_79B1) >> 16) as usize;
        if h & 15 == 0 {
            let slot = h >> 4;
            let prev = last[slot] as usize;
            last[slot] = i as u32;
            if prev < i
                && i - prev <= REACH
                && i >= covered
                && data[prev..prev + 4] == data[i..i + 4]
            {
                let d = i - prev;
                let mut start = i;
                while start > covered && start > d && data[start - 1] == data[start - 1 - d] {
                    start -= 1;
                }
                let mut end = i + 4;
                while end < n && data[end] == data[end - d] {
                    end += 1;
                }
                matched += end - start;
                covered = end;
                if matched * 100 > n {
                    return false;
                }
            }
        }
        i += 1;
    }
    true
}

/// The largest power of two not above `n` (n >= 1).
fn pow2floor(n: u64) -> u64 {
    1u64 << (63 - n.leading_zeros())
}

/// Groups planned requests into worker jobs, from request `next` on: contiguous
/// data requests of one source up to 2 MiB (or zero requests to write, with `-S 0`).
fn next_job(segs: &[Seg], next: &mut usize, starts: &[u64], min_sparse: u64) -> Option<Job> {
    let source_of = |off: u64| starts.partition_point(|&s| s <= off);
    let first = *next;
    let s = segs.get(first)?;
    let mut job = Job {
        first,
        count: 1,
        out: s.out,
        len: s.len,
        status: s.status,
    };
    *next += 1;
    while let Some(s) = segs.get(*next) {
        let fits = match s.status {
            Status::Data => {
                job.len + s.len <= BUF && source_of(job.out) == source_of(s.out + s.len - 1)
            }
            Status::Zero => min_sparse == 0 && job.len + s.len <= BUF,
            Status::Backing => false,
        };
        if s.status != job.status || job.out + job.len != s.out || !fits {
            break;
        }
        job.count += 1;
        job.len += s.len;
        *next += 1;
    }
    Some(job)
}

/// Creates (truncates) the raw target as qemu's file driver does: the full size as a
/// hole, the first block written so it is allocated, preallocation as asked.
fn create_target(path: &str, size: u64, prealloc: Prealloc) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.set_len(0)?;
    f.set_len(size)?;
    match prealloc {
        Prealloc::Off => {}
        Prealloc::Falloc | Prealloc::Full => {
            if size > 0 {
                let l = libc::off_t::try_from(size)
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
                // SAFETY: posix_fallocate on a descriptor we own.
                let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, l) };
                if r != 0 {
                    return Err(std::io::Error::from_raw_os_error(r));
                }
            }
        }
    }
    let first = size.min(4096) as usize;
    if first > 0 {
        f.write_all_at(&vec![0u8; first], 0)?;
    }
    // Reopen for the copy, as qemu-img does: ext4 flushes a file that was truncated
    // to zero when it is closed, which is cheap now and would cost a long wait at the
    // end of the copy.
    drop(f);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Whether two paths name the same file.
fn same_file(a: &str, b: &str) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn lock_message(name: &str) -> String {
    format!("Failed to get \"write\" lock\nIs another process using the image [{name}]?")
}

fn convert(ctx: &Ctx, o: &Opts, inputs: &[String], out_name: &str, progress: &mut Progress) -> u8 {
    if o.image_opts {
        if o.fmt.is_some() {
            ctx.error("--image-opts and --format are mutually exclusive");
        } else {
            ctx.error(format!(
                "Could not open '{}': --image-opts is not supported by oxcow",
                inputs[0]
            ));
        }
        return 1;
    }
    let mut srcs = Vec::with_capacity(inputs.len());
    for name in inputs {
        match Source::open(name, o.fmt.as_deref()) {
            Ok(s) => srcs.push(s),
            Err(msg) => {
                ctx.error(msg);
                return 1;
            }
        }
    }
    // The source's internal snapshot (-l): loaded on the first source only, and a
    // bare name refuses several sources, as qemu-img does.
    if let Some(sel) = &o.snapshot {
        if srcs.len() > 1 && matches!(sel, crate::snapsel::SnapshotSel::IdOrName(_)) {
            ctx.error("No support for concatenating multiple snapshot");
            return 1;
        }
        if let Err(e) = sel.load(&srcs[0].img) {
            ctx.error(format!("Failed to load snapshot: {e}"));
            return 1;
        }
    }
    let total: u64 = srcs.iter().map(|s| s.len).sum();
    let out_fmt = o.out_fmt.clone().unwrap_or_else(|| "raw".into());
    let qcow2 = match out_fmt.as_str() {
        "raw" => false,
        "qcow2" => true,
        other => return unknown_or_unsupported(ctx, other),
    };

    // The creation options (qemu-img parses them before it checks anything else).
    let mut raw_prealloc = None;
    let mut qopts = None;
    if !o.skip_create {
        if qcow2 {
            let mut list = QemuOpts::new(append_descs(&[QCOW2_OPTS, FILE_OPTS]));
            if let Some(opts) = &o.options {
                if let Err(msg) = list.parse(opts) {
                    ctx.error(msg);
                    return 1;
                }
            }
            list.set_number("size", total);
            // add_old_style_options: -B and -F win over -o.
            for (name, v) in [
                ("backing_file", &o.backing),
                ("backing_fmt", &o.backing_fmt),
            ] {
                if let Some(v) = v {
                    if let Err(msg) = list.set(name, v) {
                        ctx.error(msg);
                        return 1;
                    }
                }
            }
            qopts = Some(list);
        } else {
            raw_prealloc = match raw_create_options(ctx, o.options.as_deref()) {
                Ok(p) => p,
                Err(code) => return code,
            };
            if o.backing.is_some() {
                ctx.error("Backing file not supported for file format 'raw'");
                return 1;
            }
            if o.backing_fmt.is_some() {
                ctx.error("Backing file format not supported for file format 'raw'");
                return 1;
            }
        }
    }
    // The target's backing file: -B, or backing_file in -o (-B wins).
    let out_backing = match &qopts {
        Some(l) => l.get("backing_file").map(str::to_string),
        None => o.backing.clone(),
    };
    let target_has_backing = out_backing.is_some();
    if o.target_is_zero && target_has_backing {
        // qemu-img reports this, then exits with success.
        ctx.error("Cannot use --target-is-zero when the destination image has a backing file");
        return 0;
    }
    if srcs.len() > 1 && target_has_backing {
        ctx.error(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        );
        return 1;
    }
    if let Some(l) = &qopts {
        if l.get("backing_file").is_some() && l.get("backing_fmt").is_none() {
            ctx.error("Use of backing file requires explicit backing format");
            return 1;
        }
    }
    if o.compress {
        if !o.skip_create && !qcow2 {
            ctx.error("Compression not supported for this file format");
            return 1;
        }
        if let Some(l) = &qopts {
            if l.get_bool("encryption") || l.get("encrypt.format").is_some() {
                ctx.error("Compression and encryption not supported at the same time");
                return 1;
            }
            if l.get("preallocation").is_some_and(|p| p != "off") {
                ctx.error("Compression and preallocation not supported at the same time");
                return 1;
            }
        }
    }
    if o.bitmaps {
        if srcs.len() > 1 {
            ctx.error("Copying bitmaps only possible with single source");
            return 1;
        }
        match srcs[0].img.qcow2() {
            None => {
                ctx.error("Source lacks bitmap support");
                return 1;
            }
            Some(_) => {
                if !super::convert_bitmaps::check(ctx, &srcs[0].img, o.skip_broken) {
                    return 1;
                }
            }
        }
    }

    // Create the target.
    if !o.skip_create {
        if inputs.iter().any(|i| same_file(i, out_name)) {
            ctx.error(format!(
                "{out_name}: error while converting {out_fmt}: {}",
                lock_message(out_name)
            ));
            return 1;
        }
        let created = match &qopts {
            Some(l) => super::create::create_qcow2(out_name, total, l),
            None => create_raw_target(out_name, total, raw_prealloc.as_deref()),
        };
        if let Err(msg) = created {
            ctx.error(format!(
                "{out_name}: error while converting {out_fmt}: {msg}"
            ));
            return 1;
        }
    }
    if !cache_mode_ok(ctx, "cache", &o.cache) {
        return 1;
    }
    if o.skip_create && inputs.iter().any(|i| same_file(i, out_name)) {
        ctx.error(format!(
            "Could not open '{out_name}': {}",
            lock_message(out_name)
        ));
        return 1;
    }
    let (raw_target, qcow2_target) = if qcow2 {
        let opts = OpenOptions {
            writable: true,
            cache_unsafe: o.cache == "unsafe",
            ..Default::default()
        };
        match crate::common::open_image(out_name, Some("qcow2"), &opts) {
            Ok(img) => (None, Some(img)),
            Err(msg) => {
                ctx.error(msg);
                return 1;
            }
        }
    } else {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(out_name)
        {
            Ok(f) => (Some(f), None),
            Err(e) => {
                ctx.error(format!(
                    "Could not open '{out_name}': Could not open '{out_name}': {}",
                    crate::common::io_reason(&e)
                ));
                return 1;
            }
        }
    };
    if o.bitmaps && !qcow2 {
        ctx.error("Format driver 'raw' does not support bitmaps");
        return 1;
    }
    if o.compress && !qcow2 {
        ctx.error("Compression not supported for this file format");
        return 1;
    }
    let target = match (&raw_target, &qcow2_target) {
        (Some(f), _) => Target::Raw(f),
        (None, Some(img)) => Target::Qcow2(img),
        (None, None) => return 1,
    };
    if o.skip_create {
        let len = match target {
            Target::Qcow2(img) => source::qemu_len(img),
            Target::Raw(f) => {
                let len = match f.metadata() {
                    Ok(m) if m.file_type().is_file() => m.len(),
                    _ => {
                        use std::io::Seek;
                        let mut t = f;
                        t.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
                    }
                };
                len.div_ceil(SECTOR) * SECTOR
            }
        };
        if len < total {
            ctx.error("output file is smaller than input file");
            return 1;
        }
    }
    // Zeros past the end of a new target's backing file need no writing.
    let target_backing_len = match target {
        Target::Qcow2(img) if target_has_backing && !o.skip_create => {
            img.backing_image().map(|b| source::qemu_len(b))
        }
        _ => None,
    };
    let (compress, cluster) = match target {
        Target::Qcow2(img) => {
            let q = img.qcow2();
            let cs = q.map_or(0, |q| q.cluster_size());
            let kind = q.map_or(CompressionType::Zlib, |q| q.header().compression_type);
            (o.compress.then_some((kind, cs)), cs)
        }
        Target::Raw(_) => (None, 0),
    };
    if compress.is_some() && (cluster == 0 || cluster > BUF) {
        ctx.error("invalid cluster size");
        return 1;
    }

    let params = PlanParams {
        min_sparse: o.min_sparse,
        buf: if compress.is_some() { cluster } else { BUF },
        compress_cluster: compress.map(|c| c.1),
        target_has_backing,
        target_backing_len,
    };
    let segs = match plan(&params, &srcs) {
        Ok(s) => s,
        Err((off, reason)) => {
            ctx.error(format!(
                "error while reading block status at offset {off}: {reason}"
            ));
            return 1;
        }
    };
    // A new target reads as zeros (when sparse detection is on and no backing file
    // shows through).
    let has_zero_init =
        o.target_is_zero || (!o.skip_create && o.min_sparse != 0 && !target_has_backing);
    let counted =
        |s: &Seg| s.status == Status::Data || (o.min_sparse == 0 && s.status == Status::Zero);
    let allocated: u64 = segs.iter().filter(|s| counted(s)).map(|s| s.len).sum();
    let mut starts = Vec::with_capacity(srcs.len());
    let mut acc = 0;
    for s in &srcs {
        starts.push(acc);
        acc += s.len;
    }
    let copier = Copier {
        srcs: &srcs,
        starts: starts.clone(),
        target,
        segs: &segs,
        min_sparse: o.min_sparse,
        alignment: if o.min_sparse == 0 {
            1
        } else {
            pow2floor(o.min_sparse)
        },
        has_zero_init,
        salvage: o.salvage,
        quiet: o.quiet,
        ctx,
        write_lock: std::sync::Mutex::new(()),
        compress,
        in_order: qcow2 && !o.oob_writes,
        pool: std::sync::Mutex::new(Vec::new()),
        writes_pool: std::sync::Mutex::new(Vec::new()),
    };
    // A qcow2 target: no more workers than CPUs, which the main thread shares with
    // them (more only take the CPU from the thread that writes).
    let threads = match target {
        Target::Qcow2(_) => worker_count(o.parallel as usize).min(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        ),
        Target::Raw(_) => worker_count(o.parallel as usize),
    };
    // Jobs in flight. Compressing, workers must not run dry while the main thread
    // waits for the CPU; copying, buffers are better reused while still in cache.
    let depth = if compress.is_some() {
        (threads * 4).max(16)
    } else {
        threads * 2
    };
    let mut next = 0usize;
    let mut done = 0u64;
    let mut code = 0u8;
    let _ = run_ordered(
        threads,
        depth,
        || {
            // Jobs with nothing to do (zeros on a zeroed target, ranges left to the
            // backing file) are not queued.
            while let Some(j) = next_job(&segs, &mut next, &starts, o.min_sparse) {
                if j.status == Status::Backing
                    || (j.status == Status::Zero && o.min_sparse != 0 && has_zero_init)
                {
                    continue;
                }
                return Ok::<_, ()>(Some(j));
            }
            Ok(None)
        },
        || Buffer::new(BUF as usize),
        |buf: &mut Buffer, job: Job| copier.work(buf, job),
        |d: Done| {
            let (first, count) = (d.first, d.count);
            let mut r = d.result;
            if let Some(w) = d.writes {
                if r.is_ok() {
                    r = copier.execute(d.buf.as_deref().unwrap_or(&[]), &w);
                }
                copier.give_back_writes(w);
            }
            if let Some(b) = d.buf {
                copier.give_back(b);
            }
            let mut failed_at = None;
            for (i, s) in segs.iter().enumerate().skip(first).take(count) {
                if let Err(f) = &r {
                    if f.at < s.out {
                        break;
                    }
                    failed_at = Some(i);
                }
                if counted(s) {
                    done += s.len;
                    progress.print((100.0 * done as f64 / allocated as f64) as f32, 0);
                }
            }
            if let Err(f) = r {
                // qemu-img's other coroutines had taken (and counted) the next
                // requests before the failure was seen.
                let after = failed_at.map_or(first + count, |i| i + 1);
                for s in segs[after..]
                    .iter()
                    .filter(|s| counted(s))
                    .take(o.parallel as usize - 1)
                {
                    done += s.len;
                    progress.print((100.0 * done as f64 / allocated as f64) as f32, 0);
                }
                ctx.error(format!(
                    "error while {} at byte {}: {}",
                    if f.write { "writing" } else { "reading" },
                    f.at,
                    f.reason
                ));
                code = 1;
                return Ok(false);
            }
            Ok(true)
        },
    );
    drop(copier);
    if let (Some(img), true, 0) = (&qcow2_target, o.bitmaps, code) {
        code = super::convert_bitmaps::copy(ctx, &srcs[0].img, img, o.skip_broken);
    }
    if let Some(img) = qcow2_target {
        // What the copy left in caches goes to the file now (and to the disk unless
        // the cache mode is unsafe).
        if let Err(e) = img.flush() {
            if code == 0 {
                ctx.error(format!(
                    "Failed to flush the target image: {}",
                    write_reason(&e)
                ));
                code = 1;
            }
        }
    }
    code
}

/// Creates the raw target (a `-o preallocation` value, if given).
fn create_raw_target(out_name: &str, total: u64, prealloc: Option<&str>) -> Result<(), String> {
    let prealloc = match prealloc {
        None | Some("off") => Prealloc::Off,
        Some("falloc") => Prealloc::Falloc,
        Some("full") => Prealloc::Full,
        Some(other) => return Err(format!("invalid parameter value: {other}")),
    };
    create_target(out_name, total, prealloc)
        .map(drop)
        .map_err(|e| {
            format!(
                "Could not create '{out_name}': {}",
                crate::common::io_reason(&e)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(pattern: &[bool]) -> Vec<u8> {
        let mut v = Vec::new();
        for &d in pattern {
            v.extend(std::iter::repeat_n(if d { 1u8 } else { 0 }, 512));
        }
        v
    }

    #[test]
    fn allocated_sectors_like_qemu() {
        // 8 data sectors, 8 zero, 8 data: alignment 8, min 8.
        let mut p = vec![true; 8];
        p.extend([false; 8]);
        p.extend([true; 8]);
        let b = sectors(&p);
        assert_eq!(is_allocated_sectors(&b, 24, 0, 8), (true, 8));
        assert_eq!(is_allocated_sectors_min(&b, 24, 8, 0, 8), (true, 8));
        assert_eq!(is_allocated_sectors_min(&b, 24, 16, 0, 8), (true, 24));
        // A leading zero run that ends on an alignment boundary is skipped; one that
        // ends inside an aligned block is written with the data after it.
        let mut p = vec![false; 3];
        p.extend([true; 5]);
        let b = sectors(&p);
        assert_eq!(is_allocated_sectors(&b, 8, 5, 8), (false, 3));
        assert_eq!(is_allocated_sectors(&b, 8, 0, 8), (true, 8));
        assert_eq!(is_allocated_sectors(&b, 8, 2, 8), (true, 6));
    }

    #[test]
    fn incompressible_clusters() {
        let mut x = 12345u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let cs = 65536;
        assert!(hardly_compressible(&noise(cs)));
        // Zeros, text, a zero tail, repeats within the window: deflate's business.
        assert!(!hardly_compressible(&vec![0u8; cs]));
        let text: Vec<u8> = (0..cs).map(|i| b"lorem ipsum dolor "[i % 18]).collect();
        assert!(!hardly_compressible(&text));
        let mut tail = noise(cs);
        tail[cs - 2048..].fill(0);
        assert!(!hardly_compressible(&tail));
        for rep in [8usize, 64, 2048] {
            let mut v = noise(cs);
            let mut i = 4096;
            let mut k = 0;
            while i + rep <= cs {
                if k % 10 == 0 {
                    let d = (1024 + k * 97 % 2048).max(rep);
                    let (a, b) = v.split_at_mut(i);
                    b[..rep].copy_from_slice(&a[i - d..i - d + rep]);
                }
                i += rep;
                k += 1;
            }
            assert!(!hardly_compressible(&v), "repeats of {rep} bytes");
        }
        // Short clusters are always tried.
        assert!(!hardly_compressible(&noise(2048)));
    }

    #[test]
    fn option_lists() {
        assert!(valid_option_list("a=1,b=2"));
        assert!(!valid_option_list(",a"));
        assert!(!valid_option_list("a=1,"));
        assert!(valid_option_list("a=1,,"));
        assert_eq!(
            split_options("preallocation=full,size=1M,x"),
            vec![
                ("preallocation".to_string(), Some("full".to_string())),
                ("size".to_string(), Some("1M".to_string())),
                ("x".to_string(), None)
            ]
        );
        assert!(has_help_option("size=1,help"));
    }
}
