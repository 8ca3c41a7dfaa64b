//! `amend [-f FMT] [-t CACHE] [-p] [-q] [--force] -o OPTIONS FILENAME`: qemu-img's
//! img_amend over `Image::amend`. The `-o` list is parsed against qcow2's amend
//! options; an option that only creation knows is refused with QEMU's hint, and
//! `-o help` lists the amend options.

use super::create::{print_opts_help, valid_option_list, OptDesc, OptType, QemuOpts, QCOW2_OPTS};
use super::resize::warn_probed_raw;
use crate::common::{self, Ctx};
use crate::copyopts::{
    cache_mode_ok, image_opts_refusal, next_option, object_unsupported, qemu_knows_format,
    usage_error,
};
use crate::progress::Progress;
use crate::qopt::{long, Getopt, LongOpt};
use oxcow::engine::amend::AmendOptions;
use oxcow::{Format, Image, OpenOptions};

const CMD: &str = "amend";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("object", true, "object"),
    long("image-opts", false, "image-opts"),
    long("force", false, "force"),
];

const HELP: &str = "Usage:
Update format-specific options of the image.  Usage:

  PROG amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

";

const fn desc(name: &'static str, ty: OptType, help: &'static str) -> OptDesc {
    OptDesc {
        name,
        ty,
        help,
        default: None,
    }
}

/// qcow2's amend options (block/qcow2.c, qcow2_amend_opts).
const QCOW2_AMEND_OPTS: &[OptDesc] = &[
    desc(
        "encrypt.state",
        OptType::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    desc(
        "encrypt.keyslot",
        OptType::Number,
        "Select a single keyslot to modify explicitly",
    ),
    desc(
        "encrypt.old-secret",
        OptType::Str,
        "Select all keyslots that match this password",
    ),
    desc(
        "encrypt.new-secret",
        OptType::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    desc(
        "encrypt.iter-time",
        OptType::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    desc("size", OptType::Size, "Virtual disk size"),
    desc(
        "compat",
        OptType::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    desc("backing_file", OptType::Str, "File name of a base image"),
    desc(
        "backing_fmt",
        OptType::Str,
        "Image format of the base image",
    ),
    desc(
        "data_file",
        OptType::Str,
        "File name of an external data file",
    ),
    desc(
        "data_file_raw",
        OptType::Bool,
        "The external data file must stay valid as a raw image",
    ),
    desc("lazy_refcounts", OptType::Bool, "Postpone refcount updates"),
    desc(
        "refcount_bits",
        OptType::Number,
        "Width of a reference count entry in bits",
    ),
];

#[derive(Default)]
struct Args {
    options: Option<String>,
    fmt: Option<String>,
    cache: Option<String>,
    progress: bool,
    quiet: bool,
    image_opts: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut a = Args::default();
    let mut g = Getopt::new(args, "ho:f:t:pq", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "o" => {
                if !valid_option_list(&arg) {
                    ctx.error(format!("Invalid option list: {arg}"));
                    return 1;
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{arg}"),
                    None => arg,
                });
            }
            "f" => a.fmt = Some(arg),
            "t" => a.cache = Some(arg),
            "p" => a.progress = true,
            "q" => a.quiet = true,
            "image-opts" => a.image_opts = true,
            "force" => {}
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    let Some(options) = a.options.clone() else {
        return usage_error(ctx, CMD, "Must specify options (-o)");
    };
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    let code = amend(ctx, &a, &options, g.operands(), &mut progress);
    progress.end();
    code
}

/// The command after option parsing.
fn amend(ctx: &Ctx, a: &Args, options: &str, operands: &[String], progress: &mut Progress) -> u8 {
    let help = super::create::has_help_option(options);
    if let (Some(fmt), true) = (&a.fmt, help) {
        return print_amend_help(ctx, fmt);
    }
    let [filename] = operands else {
        ctx.error("Expecting one image file name");
        return 1;
    };
    let cache = a.cache.as_deref().unwrap_or("writeback");
    if !cache_mode_ok(ctx, "cache", cache) {
        return 1;
    }
    if a.image_opts {
        ctx.error(image_opts_refusal(false, filename));
        return 1;
    }
    // Opened read-only to check it and for qemu-img's messages; the library opens it
    // for writing itself.
    if let Some(msg) = common::encrypted_without_key(filename, a.fmt.as_deref()) {
        ctx.error(msg);
        return 1;
    }
    let (format, meta) =
        match common::open_image(filename, a.fmt.as_deref(), &OpenOptions::default()) {
            Ok(img) => {
                warn_probed_raw(a.fmt.as_deref(), &img);
                (img.format(), img.qcow2().map(|q| q.meta().clone()))
            }
            Err(msg) => {
                ctx.error(msg);
                return 1;
            }
        };
    if help {
        return print_amend_help(ctx, format.name());
    }
    if format != Format::Qcow2 {
        ctx.error(format!(
            "Format driver '{}' does not support option amendment",
            format.name()
        ));
        return 1;
    }
    let mut opts = QemuOpts::new(QCOW2_AMEND_OPTS.iter().collect());
    if let Err(e) = opts.parse(options) {
        let mut all = QemuOpts::new(QCOW2_AMEND_OPTS.iter().chain(QCOW2_OPTS.iter()).collect());
        ctx.error(e);
        if all.parse(options).is_ok() {
            eprintln!("This option is only supported for image creation");
        }
        return 1;
    }
    let (amend, size) = match amend_options(&opts) {
        Ok(o) => o,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    progress.print(0.0, 0);
    let r = Image::amend(filename, &amend, size);
    if let Ok(repaired) = &r {
        for line in repaired {
            eprintln!("{line}");
        }
    }
    if let (Some(meta), Ok(_)) = (&meta, &r) {
        for (offset, total) in progress_plan(meta, &amend) {
            progress.print(100.0 * offset as f32 / total as f32, 0);
        }
    }
    progress.print(100.0, 0);
    match r {
        Ok(_) => 0,
        Err(e) => {
            ctx.error(match e {
                oxcow::Error::Io(io) => common::io_reason(&io),
                other => other.to_string(),
            });
            1
        }
    }
}

/// The progress QEMU reports for a successful amend of the image described by `meta`
/// (qcow2_amend_options' status callbacks through its helper that spreads the
/// operations over one scale): (done, total) pairs. The upgrade reports three steps;
/// the refcount width change one per refcount table entry in each of its walks over
/// the old table (two allocation walks, which is what QEMU needs unless the new
/// structures need more, then the walk writing them), and the end of each walk; the
/// downgrade one per L1 entry of the active and every snapshot's L1 table.
fn progress_plan(meta: &oxcow::engine::meta::ImageMeta, o: &AmendOptions) -> Vec<(u64, u64)> {
    let h = &meta.header;
    let version = o.version.unwrap_or(h.version);
    let refcount = o
        .refcount_bits
        .is_some_and(|b| b != h.refcount_bits() as u64);
    let mut ops: Vec<Vec<(u64, u64)>> = Vec::new();
    if version > h.version {
        ops.push(vec![(0, 2), (1, 2), (2, 2)]);
    }
    if refcount {
        let n = h.refcount_table_clusters as u64 * (h.cluster_size() / 8);
        let mut walk = Vec::new();
        for w in 0..3 {
            walk.extend((0..n).map(|i| (w * n + i, 3 * n)));
            walk.push(((w + 1) * n, 3 * n));
        }
        ops.push(walk);
    }
    if version < h.version {
        let l1: u64 =
            h.l1_size as u64 + meta.snapshots.iter().map(|s| s.l1_size as u64).sum::<u64>();
        ops.push((1..=l1).map(|v| (v, l1)).collect());
    }
    let total_ops = (version != h.version) as u64 + refcount as u64;
    let mut out = Vec::new();
    let (mut offset_completed, mut last_work) = (0u64, 0u64);
    for (done_ops, statuses) in ops.iter().enumerate() {
        if done_ops > 0 {
            offset_completed += last_work;
        }
        let done_ops = done_ops as u64;
        for &(offset, work) in statuses {
            last_work = work;
            let current = offset_completed + work;
            let projected = current * (total_ops - done_ops - 1) / (done_ops + 1);
            out.push((offset_completed + offset, current + projected));
        }
    }
    out
}

/// The options as the library takes them, refused with QEMU's messages.
fn amend_options(opts: &QemuOpts) -> Result<(AmendOptions, Option<u64>), String> {
    let mut o = AmendOptions::default();
    if let Some(v) = opts.get("compat") {
        o.version = Some(match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(format!("Unknown compatibility level {other}")),
        });
    }
    for name in [
        "encrypt.state",
        "encrypt.keyslot",
        "encrypt.old-secret",
        "encrypt.new-secret",
        "encrypt.iter-time",
    ] {
        if opts.get(name).is_some() {
            // oxcow opens no encrypted image, so every image it gets here has none.
            return Err("Can't amend encryption options - encryption not present".into());
        }
    }
    o.backing_file = opts.get("backing_file").map(str::to_string);
    o.backing_format = opts.get("backing_fmt").map(str::to_string);
    o.data_file = opts.get("data_file").map(str::to_string);
    o.data_file_raw = opts
        .get("data_file_raw")
        .map(|_| opts.get_bool("data_file_raw"));
    o.lazy_refcounts = opts
        .get("lazy_refcounts")
        .map(|_| opts.get_bool("lazy_refcounts"));
    o.refcount_bits = opts.get_number("refcount_bits");
    Ok((o, opts.get_number("size")))
}

/// `print_amend_option_help(fmt)`.
fn print_amend_help(ctx: &Ctx, fmt: &str) -> u8 {
    match fmt {
        "qcow2" => {
            println!("Amend options for 'qcow2':");
            print_opts_help(&QCOW2_AMEND_OPTS.iter().collect::<Vec<_>>());
            0
        }
        other if qemu_knows_format(other) => {
            ctx.error(format!(
                "Format driver '{other}' does not support option amendment"
            ));
            1
        }
        other => {
            ctx.error(format!("Unknown file format '{other}'"));
            1
        }
    }
}
