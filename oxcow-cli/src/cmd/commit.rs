//! `commit [-q] [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-r RATE] FILENAME`:
//! qemu-img's img_commit for qcow2 images.
//!
//! As QEMU's commit job does, every range that a layer above the base allocates
//! (marked in granules of the base's cluster size, between 4 KiB and 64 KiB) is
//! copied into the base, opened for writing on its own: data ranges as data, ranges
//! reading as zeros as zero writes (which may free the base's clusters). The base
//! grows to the image's size first if it is smaller. Then, unless `-d` (or `-b`), the
//! image is emptied, so that the data now shows through from the base. The backing
//! chain itself is not changed.

use crate::cmd::rebase::{chain_of, find_backing_image};
use crate::cmd::resize::{open_writable, qemu_length};
use crate::common::{self, Ctx};
use crate::copyopts::{cache_mode_ok, cvtnum, next_option, object_unsupported, usage_error};
use crate::progress::Progress;
use crate::qopt::{long, Getopt, LongOpt};
use oxcow::{BlockDevice, Image, OpenOptions, Preallocation};

const CMD: &str = "commit";

/// Bytes copied per request (the mirror job's default buffer over its requests).
const MAX_IO: u64 = 1 << 20;

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("quiet", false, "q"),
    long("progress", false, "p"),
    long("format", true, "f"),
    long("cache", true, "t"),
    long("base", true, "b"),
    long("drop", false, "d"),
    long("rate", true, "r"),
    long("object", true, "object"),
    long("image-opts", false, "image-opts"),
];

const HELP: &str = "Usage:
Commit image to its backing file.  Usage:

  PROG commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d]
        [-r RATE] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE_MODE image cache mode (writeback)
  -d, --drop
     skip emptying FILENAME on completion
  -b, --base BASE_IMG
     image in the backing chain to which to commit changes
     instead of the previous one (implies --drop)
  -r, --rate RATE
     I/O rate limit
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     name of the image file to operate on

";

struct Opts {
    fmt: Option<String>,
    cache: String,
    base: Option<String>,
    drop: bool,
    progress: bool,
    quiet: bool,
    image_opts: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut o = Opts {
        fmt: None,
        cache: "writeback".into(),
        base: None,
        drop: false,
        progress: false,
        quiet: false,
        image_opts: false,
    };
    let mut g = Getopt::new(args, "f:ht:b:dpqr:", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => o.fmt = Some(arg),
            "t" => o.cache = arg,
            "b" => {
                o.base = Some(arg);
                o.drop = true;
            }
            "d" => o.drop = true,
            "p" => o.progress = true,
            "q" => o.quiet = true,
            // The rate is checked; oxcow copies as fast as it can.
            "r" if cvtnum(ctx, "rate limit", &arg, true).is_none() => return 1,
            "image-opts" => o.image_opts = true,
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    if o.quiet {
        o.progress = false;
    }
    let files = g.operands();
    if files.len() != 1 {
        return usage_error(ctx, CMD, "Expecting one image file name");
    }
    let filename = &files[0];
    if !cache_mode_ok(ctx, "cache", &o.cache) {
        return 1;
    }
    let Some(top) = open_writable(ctx, filename, o.fmt.as_deref(), o.image_opts, false) else {
        return 1;
    };
    let mut progress = Progress::new(o.progress, 1.0);
    progress.print(0.0, 100);
    let result = commit(&o, filename, &top, &mut progress);
    progress.end();
    match result {
        Ok(()) => {
            if !o.quiet {
                println!("Image committed.");
            }
            0
        }
        Err(msg) => {
            ctx.error(msg);
            1
        }
    }
}

fn commit(o: &Opts, filename: &str, top: &Image, progress: &mut Progress) -> Result<(), String> {
    let chain = chain_of(top);
    let base_idx = match &o.base {
        Some(b) => find_backing_image(&chain, b)
            .ok_or_else(|| format!("Did not find '{b}' in the backing chain of '{filename}'"))?,
        None if chain.len() > 1 => 1,
        None => return Err("Image does not have a backing file".into()),
    };
    let base_in_chain = chain[base_idx];
    let base = Image::open(
        base_in_chain.filename(),
        &OpenOptions {
            format: Some(base_in_chain.format()),
            writable: true,
            ..Default::default()
        },
    )
    .map_err(|e| common::open_error_message(base_in_chain.filename(), &e))?;
    copy_into_base(&chain, base_idx, &base, progress)?;
    base.flush().map_err(|e| crate::source::error_reason(&e))?;
    drop(base);
    progress.print(100.0, 0);
    if !o.drop {
        top.make_empty()
            .map_err(|e| crate::source::error_reason(&e))?;
    }
    top.flush().map_err(|e| crate::source::error_reason(&e))
}

/// The commit job: everything the layers above the base allocate, copied into it.
fn copy_into_base(
    chain: &[&Image],
    base_idx: usize,
    base: &Image,
    progress: &mut Progress,
) -> Result<(), String> {
    let top = chain[0];
    let len = qemu_length(top);
    if len > qemu_length(base) {
        base.resize(len, false, Preallocation::Off)
            .map_err(|e| crate::source::error_reason(&e))?;
    }
    let (granularity, base_subcluster) = match base.qcow2() {
        Some(q) => {
            let cs = q.cluster_size();
            let sc = if q.header().has_extended_l2() {
                cs / 32
            } else {
                cs
            };
            (cs.clamp(4096, 65536), sc)
        }
        None => (65536, 1),
    };
    let dirty = dirty_runs(chain, base_idx, len, granularity)?;
    let total: u64 = dirty.iter().map(|r| r.1 - r.0).sum();
    let mut done = 0u64;
    let mut buf = Vec::new();
    let err = |e: oxcow::Error| crate::source::error_reason(&e);
    for (start, end) in dirty {
        let mut pos = start;
        while pos < end {
            let st = oxcow::block_status(top, pos, end - pos).map_err(err)?;
            let mut n = if st.data { st.len.min(MAX_IO) } else { st.len };
            n -= n % granularity;
            n = n.max(granularity).min(end - pos);
            let aligned = pos % base_subcluster == 0 && n % base_subcluster == 0;
            if !st.data && aligned {
                base.write_zeroes(pos, n, true).map_err(err)?;
            } else {
                buf.resize(n as usize, 0);
                top.read_at(&mut buf, pos).map_err(err)?;
                base.write_at(&buf, pos).map_err(err)?;
            }
            pos += n;
            done += n;
            progress.print(done as f32 / total as f32 * 100.0, 0);
        }
    }
    Ok(())
}

/// The granules (as byte ranges, merged) holding anything allocated in the layers
/// above the base.
fn dirty_runs(
    chain: &[&Image],
    base_idx: usize,
    len: u64,
    granularity: u64,
) -> Result<Vec<(u64, u64)>, String> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(1 << 30);
        let (allocated, count) = allocated_in_layers(&chain[..base_idx], offset, n)
            .map_err(|e| crate::source::error_reason(&e))?;
        if allocated {
            let s = offset / granularity * granularity;
            let e = ((offset + count).div_ceil(granularity) * granularity).min(len);
            match runs.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => runs.push((s, e)),
            }
        }
        offset += count;
    }
    Ok(runs)
}

/// `bdrv_is_allocated_above(top, base_overlay, true, ...)`: whether one of `layers`
/// allocates the range, for how many bytes.
fn allocated_in_layers(layers: &[&Image], offset: u64, bytes: u64) -> oxcow::Result<(bool, u64)> {
    let mut bytes = bytes;
    for (i, layer) in layers.iter().enumerate() {
        let len = qemu_length(*layer);
        if offset >= len {
            // Zeros past the end of a short layer count as allocated there.
            return Ok((i > 0, bytes));
        }
        let st = layer.layer_status(offset, bytes.min(len - offset))?;
        if st.kind != oxcow::StatusKind::Unallocated {
            return Ok((true, st.len));
        }
        bytes = st.len;
    }
    Ok((false, bytes))
}
