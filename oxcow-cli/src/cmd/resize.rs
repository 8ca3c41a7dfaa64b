//! `resize [-f FMT] [--preallocation=MODE] [-q] [--shrink] FILENAME [+|-]SIZE`:
//! qemu-img's img_resize for qcow2 and raw images.
//!
//! As in qemu-img, the argument right after the file name is the size even when it
//! starts with '-' (so `resize img -1G` shrinks); a relative size is added to the
//! image's current length (whole sectors), and shrinking needs `--shrink`.

use crate::cmd::create::{OptDesc, OptType, QemuOpts};
use crate::common::{self, Ctx};
use crate::copyopts::{image_opts_refusal, next_option, object_unsupported, usage_error};
use crate::qopt::{long, Getopt, LongOpt};
use oxcow::{BlockDevice, Format, Image, OpenOptions, Preallocation};

const CMD: &str = "resize";

const SHORTS: &str = "f:hq";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("quiet", false, "q"),
    long("format", true, "f"),
    long("object", true, "object"),
    long("image-opts", false, "image-opts"),
    long("preallocation", true, "preallocation"),
    long("shrink", false, "shrink"),
];

const HELP: &str = "Usage:
Resize the image to the new size.  Usage:

  PROG resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

";

/// The one option of img_resize's QemuOpts.
const SIZE_OPT: &[OptDesc] = &[OptDesc {
    name: "size",
    ty: OptType::Size,
    help: "Virtual disk size",
    default: None,
}];

/// The message qemu's raw driver prints when it opens a probed raw image for writing.
pub(crate) fn warn_probed_raw(fmt: Option<&str>, img: &Image) {
    if fmt.is_none() && img.format() == Format::Raw {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations \
             on block 0 will be restricted.\n         Specify the 'raw' format explicitly to \
             remove the restrictions.",
            img.filename()
        );
    }
}

/// Opens an image for writing as qemu-img's img_open does (`--image-opts` is not
/// supported), printing qemu-img's message on failure.
pub(crate) fn open_writable(
    ctx: &Ctx,
    filename: &str,
    fmt: Option<&str>,
    image_opts: bool,
    no_backing: bool,
) -> Option<Image> {
    if image_opts {
        ctx.error(image_opts_refusal(fmt.is_some(), filename));
        return None;
    }
    // Opened for writing, a directory fails in open(2) itself.
    if !filename.is_empty() && std::path::Path::new(filename).is_dir() {
        ctx.error(format!(
            "Could not open '{filename}': Could not open '{filename}': Is a directory"
        ));
        return None;
    }
    let opts = OpenOptions {
        writable: true,
        no_backing,
        ..Default::default()
    };
    match common::open_image(filename, fmt, &opts) {
        Ok(img) => {
            warn_probed_raw(fmt, &img);
            Some(img)
        }
        Err(msg) => {
            ctx.error(msg);
            None
        }
    }
}

/// `blk_getlength`: the image's length in whole sectors (a raw file's length is
/// already rounded up, a qcow2 size is rounded down).
pub(crate) fn qemu_length(img: &dyn BlockDevice) -> u64 {
    img.size() / 512 * 512
}

/// Whether `name` (an abbreviation, possibly with "=value") names a long option that
/// takes its argument from the next word.
fn long_takes_next(body: &str) -> bool {
    if body.contains('=') {
        return false;
    }
    let exact = LONGS.iter().find(|o| o.name == body);
    match exact {
        Some(o) => o.has_arg,
        None => LONGS
            .iter()
            .filter(|o| o.name.starts_with(body))
            .any(|o| o.has_arg),
    }
}

/// Takes the size out of the arguments when it follows the file name and looks like
/// a negative number (which getopt would take for an option).
fn take_negative_size(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            if long_takes_next(body) {
                i += 1;
            }
        } else if a.len() > 1 && a.starts_with('-') {
            // A cluster of short options: 'f' takes the rest or the next word.
            if let Some(p) = a[1..].find('f') {
                if p + 2 == a.len() {
                    i += 1;
                }
            }
        } else {
            // The file name: is the next word a negative size?
            let next = args.get(i + 1);
            if next.is_some_and(|n| {
                n.starts_with('-') && n.as_bytes().get(1).is_some_and(u8::is_ascii_digit)
            }) {
                let mut rest = args.to_vec();
                let size = rest.remove(i + 1);
                return (rest, Some(size));
            }
            break;
        }
        i += 1;
    }
    (args.to_vec(), None)
}

struct Opts {
    fmt: Option<String>,
    quiet: bool,
    image_opts: bool,
    shrink: bool,
    prealloc: Preallocation,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let (args, mut size) = take_negative_size(args);
    let max_operands = if size.is_some() { 1 } else { 2 };
    let mut o = Opts {
        fmt: None,
        quiet: false,
        image_opts: false,
        shrink: false,
        prealloc: Preallocation::Off,
    };
    let mut g = Getopt::new(&args, SHORTS, LONGS);
    loop {
        let item = g.next_opt();
        if g.operands().len() > max_operands {
            return usage_error(ctx, CMD, "Extra argument(s) in command line");
        }
        let Some(item) = item else { break };
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => o.fmt = Some(arg),
            "q" => o.quiet = true,
            "image-opts" => o.image_opts = true,
            "shrink" => o.shrink = true,
            "preallocation" => {
                o.prealloc = match Preallocation::from_name(&arg) {
                    Ok(p) => p,
                    Err(_) => {
                        ctx.error(format!("Invalid preallocation mode '{arg}'"));
                        return 1;
                    }
                }
            }
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    let operands = g.operands();
    if size.is_none() {
        size = operands.get(1).cloned();
    }
    let (Some(filename), Some(size)) = (operands.first(), size) else {
        return usage_error(ctx, CMD, "Expecting image file name and size");
    };
    resize(ctx, &o, filename, &size)
}

fn resize(ctx: &Ctx, o: &Opts, filename: &str, size: &str) -> u8 {
    let (relative, digits) = match size.as_bytes().first() {
        Some(b'+') => (1i64, &size[1..]),
        Some(b'-') => (-1i64, &size[1..]),
        _ => (0, size),
    };
    let mut param = QemuOpts::new(SIZE_OPT.iter().collect());
    if let Err(msg) = param.set("size", digits) {
        ctx.error(msg);
        return 1;
    }
    let n = param.get_number("size").unwrap_or(0) as i64;
    let Some(img) = open_writable(ctx, filename, o.fmt.as_deref(), o.image_opts, false) else {
        return 1;
    };
    let current = qemu_length(&img) as i64;
    let total = if relative != 0 {
        current.wrapping_add(n.wrapping_mul(relative))
    } else {
        n
    };
    if total <= 0 {
        ctx.error("New image size must be positive");
        return 1;
    }
    if total <= current && o.prealloc != Preallocation::Off {
        ctx.error("Preallocation can only be used for growing images");
        return 1;
    }
    if total < current && !o.shrink {
        ctx.error("Use the --shrink option to perform a shrink operation.");
        ctx.error(
            "warning: Shrinking an image will delete all data beyond the shrunken image's \
             end. Before performing such an operation, make sure there is no important data \
             there.",
        );
        return 1;
    }
    match truncate(&img, total as u64, o.prealloc) {
        Ok(()) => {
            if !o.quiet {
                println!("Image resized.");
            }
            0
        }
        Err(msg) => {
            ctx.error(msg);
            1
        }
    }
}

/// `blk_truncate` on the image, with the checks and messages of QEMU's drivers.
fn truncate(img: &Image, new_size: u64, prealloc: Preallocation) -> Result<(), String> {
    match img.qcow2() {
        Some(q) => {
            if !new_size.is_multiple_of(512) {
                return Err("The new size must be a multiple of 512".into());
            }
            let h = q.header();
            let coverage = h.l2_coverage();
            if new_size.div_ceil(coverage) > oxcow::format::MAX_L1_BYTES / 8 {
                return Err("Failed to grow the L1 table: File too large".into());
            }
        }
        None => {
            if prealloc == Preallocation::Metadata {
                return Err("Unsupported preallocation mode: metadata".into());
            }
        }
    }
    img.resize(new_size, true, prealloc).map_err(|e| match e {
        oxcow::Error::Io(io) if img.format() == Format::Raw => {
            let what = match prealloc {
                Preallocation::Falloc => "Could not preallocate new data",
                Preallocation::Full => "Could not write zeros for preallocation",
                _ => "Could not resize file",
            };
            format!("{what}: {}", common::io_reason(&io))
        }
        oxcow::Error::Io(io) => common::io_reason(&io),
        other => crate::cmd::info::strip_os_error(&other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn negative_size_right_after_the_file_name() {
        assert_eq!(
            take_negative_size(&s(&["a", "-1M", "-q"])),
            (s(&["a", "-q"]), Some("-1M".to_string()))
        );
        assert_eq!(
            take_negative_size(&s(&["-f", "qcow2", "a", "-1M"])),
            (s(&["-f", "qcow2", "a"]), Some("-1M".to_string()))
        );
        assert_eq!(take_negative_size(&s(&["a", "-q", "-1M"])).1, None);
        assert_eq!(take_negative_size(&s(&["-1M", "a"])).1, None);
        assert_eq!(
            take_negative_size(&s(&["--pre", "full", "a", "-1M"]))
                .1
                .as_deref(),
            Some("-1M")
        );
        assert_eq!(take_negative_size(&s(&["--", "a", "-1M"])).1, None);
    }
}
