//! `rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-F BACKING_FMT] [-u] [-p] [-q] [-U]
//! [-c] -b BACKING FILENAME`: qemu-img's img_rebase for qcow2 images.
//!
//! Safe mode walks the image in chunks of 2 MiB. Wherever the image itself holds
//! nothing, the old backing chain and the new backing file are read and compared
//! (sub)cluster by (sub)cluster; where they differ, the old data is written into the
//! image (zeros past the end of the old backing file). Only then is the header
//! switched to the new backing file. When the new backing file is already in the
//! image's chain, ranges no layer above it allocates are skipped without reading.
//! `-u` changes the header only; `-b ""` removes the backing file (after copying in
//! everything the old chain provided).

use crate::cmd::resize::{open_writable, qemu_length};
use crate::common::{self, Ctx};
use crate::copyopts::{
    cache_mode_ok, next_option, object_unsupported, qemu_knows_format, usage_error,
};
use crate::progress::Progress;
use crate::qopt::{long, Getopt, LongOpt};
use oxcow::image::{combine_paths, local_path};
use oxcow::{BlockDevice, Format, Image, OpenOptions, StatusKind};

const CMD: &str = "rebase";

/// Bytes looked at per step (qemu-img's IO_BUF_SIZE).
const IO_BUF_SIZE: u64 = 2 << 20;

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("quiet", false, "q"),
    long("progress", false, "p"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("cache", true, "t"),
    long("backing", true, "b"),
    long("backing-format", true, "F"),
    long("backing-cache", true, "T"),
    long("backing-unsafe", false, "u"),
    long("compress", false, "c"),
    long("force-share", false, "U"),
    long("object", true, "object"),
];

const HELP: &str = "Usage:
Change backing file of the image.  Usage:

  PROG rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]
        [--object OBJDEF] [-c] FILENAME
Rebases FILENAME on top of BACKING_FILENAME or no backing file

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress indicator
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -b, --backing BACKING_FILENAME|\"\"
     rebase onto this file (or no backing file)
  -F, --backing-format BACKING_FMT
     specify format for BACKING_FILENAME
  -T, --backing-cache CACHE
     BACKING_FILENAME cache mode (writeback)
  -u, --backing-unsafe
     do not fail if BACKING_FILENAME can not be read
  -c, --compress
     compress image (when image supports this)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

// ---------------------------------------------------------------------------------
// The backing chain as QEMU's block layer sees it (shared with commit).

/// The images of a chain, the top first.
pub(crate) fn chain_of(img: &Image) -> Vec<&Image> {
    let mut v = vec![img];
    while let Some(b) = v[v.len() - 1].backing_image() {
        v.push(b.as_ref());
    }
    v
}

/// The backing file name an image's header records.
fn stored_backing_name(img: &Image) -> Option<&str> {
    img.qcow2().and_then(|q| q.meta().backing_file.as_deref())
}

/// `path_has_protocol`.
fn path_has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// `bdrv_make_absolute_filename`: `name` relative to the directory of `img`.
fn make_absolute(img: &Image, name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    if path_has_protocol(name) || name.starts_with('/') {
        return Some(name.to_string());
    }
    let f = img.filename();
    let dir = match f.rfind('/') {
        Some(i) => &f[..=i],
        None => "",
    };
    Some(format!("{dir}{name}"))
}

/// `bdrv_find_backing_image`: the index in `chain` of the backing file that
/// `backing_file` names, compared as QEMU compares them (canonical paths of the name
/// taken relative to each image's directory).
pub(crate) fn find_backing_image(chain: &[&Image], backing_file: &str) -> Option<usize> {
    let is_protocol = path_has_protocol(backing_file);
    for (i, curr) in chain.iter().enumerate().take(chain.len().saturating_sub(1)) {
        let stored = stored_backing_name(curr).unwrap_or("");
        if is_protocol || path_has_protocol(stored) {
            if backing_file == stored
                || make_absolute(curr, stored).as_deref() == Some(backing_file)
            {
                return Some(i + 1);
            }
        } else {
            let canon = |p: Option<String>| p.and_then(|p| std::fs::canonicalize(p).ok());
            let Some(wanted) = canon(make_absolute(curr, backing_file)) else {
                continue;
            };
            let Some(have) = canon(make_absolute(curr, stored)) else {
                continue;
            };
            if wanted == have {
                return Some(i + 1);
            }
        }
    }
    None
}

/// `bdrv_is_allocated_above(chain[top], chain[base], false, ...)`: whether a layer
/// from `top` down to `base` (exclusive) holds the range, and for how many bytes the
/// answer holds (0 when `offset` lies past the end of `top`).
fn allocated_above(
    chain: &[&Image],
    top: usize,
    base: usize,
    offset: u64,
    bytes: u64,
) -> oxcow::Result<(bool, u64)> {
    if top == base {
        return Ok((false, bytes));
    }
    let len = qemu_length(chain[top]);
    if offset >= len {
        return Ok((false, 0));
    }
    let st = chain[top].layer_status(offset, bytes.min(len - offset))?;
    if st.kind != StatusKind::Unallocated {
        return Ok((true, st.len));
    }
    let mut bytes = st.len;
    for layer in &chain[top + 1..base] {
        let len = qemu_length(*layer);
        if offset >= len {
            // Zeros past the end of a short layer count as allocated there.
            return Ok((true, bytes));
        }
        let st = layer.layer_status(offset, bytes.min(len - offset))?;
        if st.kind != StatusKind::Unallocated {
            return Ok((true, st.len));
        }
        bytes = st.len;
    }
    Ok((false, bytes))
}

// ---------------------------------------------------------------------------------

struct Opts {
    fmt: Option<String>,
    base_fmt: Option<String>,
    base: Option<String>,
    cache: String,
    src_cache: String,
    unsafe_mode: bool,
    progress: bool,
    quiet: bool,
    compress: bool,
    image_opts: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut o = Opts {
        fmt: None,
        base_fmt: None,
        base: None,
        cache: "writeback".into(),
        src_cache: "writeback".into(),
        unsafe_mode: false,
        progress: false,
        quiet: false,
        compress: false,
        image_opts: false,
    };
    let mut g = Getopt::new(args, "hf:F:b:upt:T:qUc", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => o.fmt = Some(arg),
            "F" => o.base_fmt = Some(arg),
            "b" => o.base = Some(arg),
            "u" => o.unsafe_mode = true,
            "p" => o.progress = true,
            "t" => o.cache = arg,
            "T" => o.src_cache = arg,
            "q" => o.quiet = true,
            "U" => {}
            "c" => o.compress = true,
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
    if !o.unsafe_mode && o.base.is_none() {
        return usage_error(
            ctx,
            CMD,
            "Must specify backing file (-b) or use unsafe mode (-u)",
        );
    }
    let mut progress = Progress::new(o.progress, 2.0);
    progress.print(0.0, 100);
    let code = rebase(ctx, &o, &files[0], &mut progress);
    progress.end();
    code
}

fn rebase(ctx: &Ctx, o: &Opts, filename: &str, progress: &mut Progress) -> u8 {
    if !cache_mode_ok(ctx, "cache", &o.cache) {
        return 1;
    }
    if !cache_mode_ok(ctx, "source cache", &o.src_cache) {
        return 1;
    }
    let Some(img) = open_writable(ctx, filename, o.fmt.as_deref(), o.image_opts, o.unsafe_mode)
    else {
        return 1;
    };
    if o.compress && img.format() != Format::Qcow2 {
        ctx.error("Compression not supported for this file format");
        return 1;
    }
    if let Some(f) = &o.base_fmt {
        if !qemu_knows_format(f) {
            ctx.error(format!("Invalid format name: '{f}'"));
            return 1;
        }
    }
    if !o.unsafe_mode {
        if let Err(msg) = copy_differences(o, &img, progress) {
            ctx.error(msg);
            return 1;
        }
    }
    let code = match change_backing_file(o, &img) {
        Ok(()) => 0,
        Err(msg) => {
            ctx.error(msg);
            1
        }
    };
    progress.print(100.0, 0);
    code
}

/// The new backing file for safe mode: a layer of the image's own chain when it names
/// one, otherwise the file opened on its own. `None` for "no backing file".
enum NewBacking {
    None,
    InChain(usize),
    Opened(Image),
}

fn open_new_backing(o: &Opts, chain: &[&Image]) -> Result<NewBacking, String> {
    let base = o.base.as_deref().unwrap_or("");
    if base.is_empty() {
        return Ok(NewBacking::None);
    }
    let fail = |reason: String| format!("Could not open new backing file '{base}': {reason}");
    let local = local_path(base, "backing file").map_err(|e| fail(e.to_string()))?;
    let real_path = if local.len() == base.len() {
        combine_paths(chain[0].filename(), base)
    } else {
        local
    };
    if let Some(i) = find_backing_image(chain, &real_path) {
        return Ok(NewBacking::InChain(i));
    }
    let format = match o.base_fmt.as_deref() {
        None => None,
        Some(f) => Some(
            Format::from_name(f)
                .map_err(|_| fail(format!("Format '{f}' is not supported by oxcow")))?,
        ),
    };
    let opts = OpenOptions {
        format,
        ..Default::default()
    };
    let img = Image::open(&real_path, &opts)
        .map_err(|e| fail(crate::cmd::info::strip_os_error(&e.to_string())))?;
    // The image being rebased is open for writing: QEMU's file locks refuse to open
    // it again inside the new backing chain.
    if let Some(me) = file_id(chain[0].filename()) {
        for (depth, layer) in chain_of(&img).into_iter().enumerate() {
            if file_id(layer.filename()) == Some(me) {
                return Err(fail(format!(
                    "{}Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                    "Could not open backing file: ".repeat(depth),
                    layer.filename()
                )));
            }
        }
    }
    Ok(NewBacking::Opened(img))
}

/// The (device, inode) of a file.
fn file_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// qemu-img's compare_buffers: whether the first `chunk` bytes differ, and how many
/// bytes (whole chunks) share that answer.
fn compare_buffers(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let n = a.len();
    let mut i = chunk.min(n);
    let res = a[..i] != b[..i];
    while i < n {
        let len = (n - i).min(chunk);
        if (a[i..i + len] != b[i..i + len]) != res {
            break;
        }
        i += len;
    }
    (res, i)
}

/// Reads `buf.len()` bytes at `offset` from a device, the part past `len` (its
/// length in whole sectors) as zeros.
fn read_padded(dev: &dyn BlockDevice, len: u64, buf: &mut [u8], offset: u64) -> oxcow::Result<()> {
    let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    if n > 0 {
        dev.read_at(&mut buf[..n], offset)?;
    }
    Ok(())
}

/// Safe mode: makes the image keep its content over the new backing file.
fn copy_differences(o: &Opts, img: &Image, progress: &mut Progress) -> Result<(), String> {
    let chain = chain_of(img);
    let old = chain.get(1).copied();
    let new = open_new_backing(o, &chain)?;
    let new_dev: Option<&Image> = match &new {
        NewBacking::None => None,
        NewBacking::InChain(i) => Some(chain[*i]),
        NewBacking::Opened(b) => Some(b),
    };
    let prefix = match new {
        NewBacking::InChain(i) => Some(i),
        _ => None,
    };
    let write_align = match img.qcow2() {
        Some(q) if o.compress => q.cluster_size(),
        Some(q) if q.header().has_extended_l2() => q.cluster_size() / 32,
        Some(q) => q.cluster_size(),
        None => 512,
    };
    let size = qemu_length(img);
    let old_size = old.map(|b| qemu_length(b)).unwrap_or(0);
    let new_size = new_dev.map(|b| qemu_length(b)).unwrap_or(0);
    let local_progress = if size != 0 {
        100.0f32 / (size / size.min(IO_BUF_SIZE)) as f32
    } else {
        0.0
    };
    let metadata_err = |e: oxcow::Error| {
        format!(
            "error while reading image metadata: {}",
            crate::source::error_reason(&e)
        )
    };
    let mut buf_old = Vec::new();
    let mut buf_new = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let mut n = IO_BUF_SIZE.min(size - offset);
        // Ranges the image holds itself need nothing.
        let st = img.layer_status(offset, n).map_err(metadata_err)?;
        n = st.len;
        if st.kind != StatusKind::Unallocated {
            offset += n;
            continue;
        }
        if let Some(p) = prefix {
            let bytes = n;
            let (allocated, m) = allocated_above(&chain, 1, p, offset, n).map_err(metadata_err)?;
            if !allocated && m > 0 {
                offset += m;
                continue;
            }
            n = if m == 0 { bytes } else { m };
        }
        // Whole (sub)clusters of the image, so that no write needs copy-on-write.
        let start = offset / write_align * write_align;
        n += offset - start;
        offset = start;
        n = (offset + n).div_ceil(write_align) * write_align - offset;
        n = n.min(size - offset);
        // Compressed writes take whole clusters: with subclusters, such a cluster may
        // be partly allocated already (qemu-img stops on an assertion there).
        if o.compress && !all_unallocated(img, offset, n).map_err(metadata_err)? {
            return Err(format!(
                "Cannot rebase with compression: the cluster at offset {offset} is partly \
                 allocated in the image"
            ));
        }

        let n_old = n.min(old_size.saturating_sub(offset));
        let n_new = n.min(new_size.saturating_sub(offset));
        buf_old.resize(n as usize, 0);
        buf_new.resize(n as usize, 0);
        let mut old_eof = n_old == 0;
        match old {
            Some(b) if n_old > 0 => read_padded(b, old_size, &mut buf_old, offset)
                .map_err(|_| "error while reading from old backing file".to_string())?,
            _ => buf_old.fill(0),
        }
        match new_dev {
            Some(b) if n_new > 0 => read_padded(b, new_size, &mut buf_new, offset)
                .map_err(|_| "error while reading from new backing file".to_string())?,
            _ => buf_new.fill(0),
        }
        let mut written = 0usize;
        while (written as u64) < n {
            let (differ, pnum) = compare_buffers(
                &buf_old[written..],
                &buf_new[written..],
                write_align as usize,
            );
            if differ {
                let at = offset + written as u64;
                let r = if old_eof {
                    img.write_zeroes(at, pnum as u64, false)
                } else {
                    write_data(img, o.compress, &buf_old[written..written + pnum], at)
                };
                r.map_err(|e| {
                    format!(
                        "Error while writing to COW image: {}",
                        crate::source::error_reason(&e)
                    )
                })?;
            }
            written += pnum;
            if offset + written as u64 >= old_size {
                old_eof = true;
            }
        }
        progress.print(local_progress, 100);
        offset += n;
    }
    img.flush().map_err(|e| {
        format!(
            "Error while writing to COW image: {}",
            crate::source::error_reason(&e)
        )
    })
}

/// Whether the image itself allocates nothing in `offset..offset+len`.
fn all_unallocated(img: &Image, offset: u64, len: u64) -> oxcow::Result<bool> {
    let mut pos = offset;
    while pos < offset + len {
        let st = img.layer_status(pos, offset + len - pos)?;
        if st.kind != StatusKind::Unallocated {
            return Ok(false);
        }
        pos += st.len;
    }
    Ok(true)
}

/// A write into the image, compressed cluster by cluster with `-c`.
fn write_data(img: &Image, compress: bool, data: &[u8], offset: u64) -> oxcow::Result<()> {
    match img.qcow2() {
        Some(q) if compress => {
            let cs = q.cluster_size() as usize;
            for (i, c) in data.chunks(cs).enumerate() {
                q.write_compressed(c, offset + (i * cs) as u64)?;
            }
            Ok(())
        }
        _ => img.write_at(data, offset),
    }
}

/// `bdrv_change_backing_file` and qemu-img's messages for its failures.
fn change_backing_file(o: &Opts, img: &Image) -> Result<(), String> {
    let (name, fmt) = match o.base.as_deref() {
        Some(b) if !b.is_empty() => (Some(b), o.base_fmt.as_deref()),
        _ => (None, None),
    };
    let shown = o.base.as_deref().unwrap_or("(null)");
    let fail = |why: &str| format!("Could not change the backing file to '{shown}': {why}");
    if name.is_some() && fmt.is_none() {
        return Err(fail("backing format must be specified"));
    }
    let Some(q) = img.qcow2() else {
        return Err(fail("Operation not supported"));
    };
    if let Some(n) = name {
        if q.header().data_file_raw() || n.len() > 1023 {
            return Err(fail("Invalid argument"));
        }
    }
    img.set_backing_file(name, fmt).map_err(|e| match e {
        oxcow::Error::Io(io) => fail(&common::io_reason(&io)),
        _ => fail("No space left in the file header"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_compared_chunk_by_chunk() {
        let a = [0u8; 8];
        let mut b = [0u8; 8];
        b[5] = 1;
        assert_eq!(compare_buffers(&a, &b, 2), (false, 4));
        assert_eq!(compare_buffers(&a[4..], &b[4..], 2), (true, 2));
        assert_eq!(compare_buffers(&a[6..], &b[6..], 2), (false, 2));
        assert_eq!(compare_buffers(&a[..3], &b[..3], 2), (false, 3));
    }

    #[test]
    fn protocols() {
        assert!(path_has_protocol("nbd:x"));
        assert!(!path_has_protocol("a/b:c"));
        assert!(!path_has_protocol("plain"));
    }
}
