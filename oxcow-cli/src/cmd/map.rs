//! `map`: how the guest disk maps to files, as `qemu-img map` prints it: runs of equal
//! block status (which layer of the backing chain holds them, whether they are
//! allocated, read as zeros, hold data, are compressed, and where they lie in which
//! file), merged exactly as qemu-img merges them.

use super::info::{
    check_format, open_error, parse_output_format, print_help, report_stop, OutputFormat, Stop,
};
use crate::common::Ctx;
use crate::copyopts::OBJECT_UNSUPPORTED;
use crate::qopt::{long, Getopt, LongOpt};
use crate::sizearg::cvtnum;
use oxcow::{BlockDevice, Image, OpenOptions};
use std::io::Write;

const SHORTS: &str = "hf:s:l:U";
const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("start-offset", true, "s"),
    long("max-length", true, "l"),
    long("force-share", false, "U"),
    long("output", true, "output"),
    long("object", true, "object"),
];

const HELP: &str = "Usage:
Dump image metadata.  Usage:

  PROG map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --start-offset OFFSET
  --max-length LENGTH
  --output human|json
     specify output format name (default human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

/// qemu-img's `MapEntry`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    compressed: bool,
    offset: Option<u64>,
    depth: u32,
    present: bool,
    /// The file holding the bytes, for runs with an offset.
    filename: Option<String>,
}

/// `entry_mergeable()`.
fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
        || curr.filename != next.filename
        || curr.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    match (curr.offset, next.offset) {
        (Some(c), Some(n)) => c.checked_add(curr.length) == Some(n),
        _ => true,
    }
}

/// `printf("%#-16" PRIx64)`: 0 prints bare, anything else with 0x.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// `dump_map_entry()`: prints one entry; in human mode it may normalise `next`. An
/// error is the message to report.
fn dump_entry(
    out: &mut impl Write,
    fmt: OutputFormat,
    e: &MapEntry,
    next: Option<&mut MapEntry>,
) -> Result<(), String> {
    let io = |r: std::io::Result<()>| r.map_err(|_| String::new());
    match fmt {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err("File contains external, encrypted or compressed clusters.".into());
            }
            if e.data && !e.zero {
                io(writeln!(
                    out,
                    "{}{}{}{}",
                    hex16(e.start),
                    hex16(e.length),
                    hex16(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                ))?;
            }
            // This format ignores the difference between zero and data-that-reads-as-
            // zero: qemu-img normalises the next entry to merge more.
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
        }
        OutputFormat::Json => {
            io(write!(
                out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start as i64, e.length as i64, e.depth, e.present, e.zero, e.data, e.compressed
            ))?;
            if let Some(o) = e.offset {
                io(write!(out, ", \"offset\": {}", o as i64))?;
            }
            io(write!(out, "}}"))?;
            if next.is_some() {
                io(writeln!(out, ","))?;
            }
        }
    }
    Ok(())
}

/// The name of the file that holds a layer's bytes: its external data file, or the
/// image file itself.
fn layer_file(image: &Image, depth: u32) -> Option<String> {
    let mut layer = image;
    for _ in 0..depth {
        layer = layer.backing_image()?;
    }
    Some(match layer.data_file_path() {
        Some(d) => d.to_string(),
        None => layer.filename().to_string(),
    })
}

/// `get_block_status()`: the status of the run at `offset`.
fn block_status(image: &Image, offset: u64, len: u64) -> oxcow::Result<MapEntry> {
    let s = oxcow::block_status(image, offset, len)?;
    let filename = match s.offset {
        Some(_) => layer_file(image, s.depth),
        None => None,
    };
    Ok(MapEntry {
        start: offset,
        length: s.len,
        data: s.data,
        zero: s.zero,
        compressed: s.compressed,
        offset: s.offset,
        depth: s.depth,
        present: s.present,
        filename,
    })
}

/// The message after "Could not read file metadata: ".
fn metadata_error(e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Io(io) => super::info::strerror(io),
        oxcow::Error::Corrupt { what, .. } => {
            // QEMU prints table indexes with %#x: a zero index has no 0x.
            let what = what.replace("index: 0x0)", "index: 0)");
            eprintln!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            );
            "Input/output error".to_string()
        }
        other => super::info::strip_os_error(&other.to_string()),
    }
}

struct Args {
    output: OutputFormat,
    fmt: Option<String>,
    start: u64,
    max_length: Option<u64>,
    filename: String,
}

fn parse_args(ctx: &Ctx, args: &[String]) -> Result<Option<Args>, Stop> {
    let mut g = Getopt::new(args, SHORTS, LONGS);
    let mut output = OutputFormat::Human;
    let mut fmt = None;
    let mut image_opts = false;
    let mut start = 0;
    let mut max_length = None;
    while let Some(o) = g.next_opt() {
        let o = o.map_err(Stop::Getopt)?;
        let arg = o.arg.as_deref().unwrap_or("");
        match o.id.as_str() {
            "h" => {
                print_help(ctx, HELP);
                return Ok(None);
            }
            "f" => fmt = o.arg.clone(),
            "image-opts" => image_opts = true,
            "s" => start = cvtnum("start offset", arg).map_err(Stop::Error)?,
            "l" => max_length = Some(cvtnum("max length", arg).map_err(Stop::Error)?),
            "U" => {}
            "output" => output = parse_output_format(arg)?,
            "object" => return Err(Stop::Error(OBJECT_UNSUPPORTED.into())),
            _ => {}
        }
    }
    let [filename] = g.operands() else {
        return Err(Stop::Usage("Expecting one image file name".into()));
    };
    if image_opts {
        if fmt.is_some() {
            return Err(Stop::Error(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        return Err(Stop::Error("--image-opts is not supported by oxcow".into()));
    }
    Ok(Some(Args {
        output,
        fmt,
        start,
        max_length,
        filename: filename.clone(),
    }))
}

/// Opens the image with its backing chain and data file, with qemu-img's messages.
fn open(arg: &str, fmt: Option<&str>) -> Result<Image, String> {
    let format = check_format(arg, fmt)?;
    // The file itself first, for the protocol driver's messages.
    let (filename, storage, _) = super::info::open_file(arg)?;
    // Without a key (oxcow takes no --object), qemu-img cannot open an encrypted image.
    if format != Some(oxcow::Format::Raw)
        && oxcow::image::probe(&storage).ok() == Some(oxcow::Format::Qcow2)
    {
        if let Ok(meta) = oxcow::engine::meta::ImageMeta::load(&storage) {
            if meta.header.crypt_method != oxcow::format::header::CryptMethod::None {
                return Err(format!(
                    "Could not open '{arg}': Parameter 'encrypt.key-secret' is required for cipher"
                ));
            }
        }
    }
    drop(storage);
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    Image::open(&filename, &opts).map_err(|e| open_error(arg, &e))
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let a = match parse_args(ctx, args) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(stop) => return report_stop(ctx, "map", stop),
    };
    let image = match open(&a.filename, a.fmt.as_deref()) {
        Ok(i) => i,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    let mut layer = Some(&image);
    while let Some(l) = layer {
        if let Some(q) = l.qcow2() {
            super::info::warn_stale_bitmaps(ctx, q.meta());
        }
        layer = l.backing_image().map(|b| b.as_ref());
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let header = match a.output {
        OutputFormat::Human => writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        ),
        OutputFormat::Json => write!(out, "["),
    };
    if header.is_err() {
        return 1;
    }
    // QEMU counts whole sectors of a qcow2 image's size.
    let mut length = match image.qcow2() {
        Some(q) => q.header().size / 512 * 512,
        None => image.size(),
    }
    .min(image.size());
    if let Some(max) = a.max_length {
        length = length.min(a.start.saturating_add(max));
    }

    let mut curr = MapEntry {
        start: a.start,
        ..MapEntry::default()
    };
    let mut result: Result<(), String> = Ok(());
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let mut next = match block_status(&image, offset, length - offset) {
            Ok(n) => n,
            Err(e) => {
                result = Err(format!(
                    "Could not read file metadata: {}",
                    metadata_error(&e)
                ));
                break;
            }
        };
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            if let Err(e) = dump_entry(&mut out, a.output, &curr, Some(&mut next)) {
                result = Err(e);
                break;
            }
        }
        curr = next;
    }
    if result.is_ok() {
        result = dump_entry(&mut out, a.output, &curr, None);
        if a.output == OutputFormat::Json && result.is_ok() {
            result = writeln!(out, "]").map_err(|_| String::new());
        }
    }
    // Like qemu-img writing to a pipe, the error goes out before the buffered lines.
    if let Err(msg) = &result {
        if !msg.is_empty() {
            ctx.error(msg);
        }
    }
    let flushed = out.flush();
    if result.is_ok() && flushed.is_ok() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_columns() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(0x10000), "0x10000         ");
    }

    #[test]
    fn merge_rule() {
        let a = MapEntry {
            start: 0,
            length: 512,
            data: true,
            offset: Some(4096),
            present: true,
            filename: Some("f".into()),
            ..MapEntry::default()
        };
        let mut b = MapEntry {
            start: 512,
            offset: Some(4608),
            ..a.clone()
        };
        assert!(mergeable(&a, &b));
        b.offset = Some(8192);
        assert!(!mergeable(&a, &b));
        let empty = MapEntry::default();
        assert!(!mergeable(&empty, &empty));
    }
}
