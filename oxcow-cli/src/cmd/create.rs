//! `create [-q] [--object OBJDEF] [-f FMT] [-b BACKING [-F BACKING_FMT]] [-u]
//! [-o OPTIONS] FILENAME [SIZE]`: qemu-img's img_create and bdrv_img_create, for
//! qcow2 and raw images.
//!
//! The `-o` list is parsed as QemuOpts parses it, against the format's creation
//! options followed by the file protocol's: unknown names and values of the wrong type
//! are refused before anything happens. The backing file is opened (unless `-u`) to
//! check it and to take the size from it, then the "Formatting ..." line lists every
//! option in the drivers' order, given or defaulted. The image file is created
//! (truncated) first; errors of the qcow2 driver come after that and delete it again,
//! as QEMU does.

use crate::common::Ctx;
use crate::copyopts::{
    cvtnum, next_option, object_unsupported, qemu_knows_format, strtou64, usage_error,
};
use crate::qopt::{long, Getopt, LongOpt};
use crate::sizearg::{strtosz, SizeError};
use oxcow::format::header::CompressionType;
use oxcow::image::{combine_paths, local_path};
use oxcow::{BlockDevice, CreateOptions, Format, Image, OpenOptions, Preallocation};
use std::fs::File;
use std::os::unix::fs::FileExt;

const CMD: &str = "create";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("quiet", false, "q"),
    long("object", true, "object"),
    long("format", true, "f"),
    long("backing", true, "b"),
    long("backing-format", true, "F"),
    long("backing-unsafe", false, "u"),
    long("options", true, "o"),
];

const HELP: &str = "Usage:
Create and format new image file.  Usage:

  PROG create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

";

// ---------------------------------------------------------------------------------
// QemuOpts: option descriptions, parsing and printing.

/// The type of a creation option (QemuOptType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OptType {
    Str,
    Bool,
    Number,
    Size,
}

impl OptType {
    fn name(self) -> &'static str {
        match self {
            OptType::Str => "str",
            OptType::Bool => "bool (on/off)",
            OptType::Number => "num",
            OptType::Size => "size",
        }
    }
}

/// One creation option of a driver (QemuOptDesc).
#[derive(Debug)]
pub(crate) struct OptDesc {
    pub name: &'static str,
    pub ty: OptType,
    pub help: &'static str,
    /// The default printed in the "Formatting" line when the option is not given.
    pub default: Option<&'static str>,
}

const fn desc(
    name: &'static str,
    ty: OptType,
    help: &'static str,
    default: Option<&'static str>,
) -> OptDesc {
    OptDesc {
        name,
        ty,
        help,
        default,
    }
}

/// qcow2's creation options, in the driver's order (block/qcow2.c).
pub(crate) const QCOW2_OPTS: &[OptDesc] = &[
    desc(
        "encryption",
        OptType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
    ),
    desc(
        "encrypt.format",
        OptType::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
        None,
    ),
    desc(
        "encrypt.key-secret",
        OptType::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
        None,
    ),
    desc(
        "encrypt.cipher-alg",
        OptType::Str,
        "Name of encryption cipher algorithm",
        None,
    ),
    desc(
        "encrypt.cipher-mode",
        OptType::Str,
        "Name of encryption cipher mode",
        None,
    ),
    desc(
        "encrypt.ivgen-alg",
        OptType::Str,
        "Name of IV generator algorithm",
        None,
    ),
    desc(
        "encrypt.ivgen-hash-alg",
        OptType::Str,
        "Name of IV generator hash algorithm",
        None,
    ),
    desc(
        "encrypt.hash-alg",
        OptType::Str,
        "Name of encryption hash algorithm",
        None,
    ),
    desc(
        "encrypt.iter-time",
        OptType::Number,
        "Time to spend in PBKDF in milliseconds",
        None,
    ),
    desc(
        "cluster_size",
        OptType::Size,
        "qcow2 cluster size",
        Some("65536"),
    ),
    desc(
        "extended_l2",
        OptType::Bool,
        "Extended L2 tables",
        Some("off"),
    ),
    desc(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
        None,
    ),
    desc(
        "compression_type",
        OptType::Str,
        "Compression method used for image cluster compression",
        Some("zlib"),
    ),
    desc("size", OptType::Size, "Virtual disk size", None),
    desc(
        "compat",
        OptType::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
        None,
    ),
    desc(
        "backing_file",
        OptType::Str,
        "File name of a base image",
        None,
    ),
    desc(
        "backing_fmt",
        OptType::Str,
        "Image format of the base image",
        None,
    ),
    desc(
        "data_file",
        OptType::Str,
        "File name of an external data file",
        None,
    ),
    desc(
        "data_file_raw",
        OptType::Bool,
        "The external data file must stay valid as a raw image",
        None,
    ),
    desc(
        "lazy_refcounts",
        OptType::Bool,
        "Postpone refcount updates",
        Some("off"),
    ),
    desc(
        "refcount_bits",
        OptType::Number,
        "Width of a reference count entry in bits",
        Some("16"),
    ),
];

/// The raw format's creation options.
pub(crate) const RAW_OPTS: &[OptDesc] = &[desc("size", OptType::Size, "Virtual disk size", None)];

/// The file protocol's creation options (block/file-posix.c).
pub(crate) const FILE_OPTS: &[OptDesc] = &[
    desc("size", OptType::Size, "Virtual disk size", None),
    desc(
        "nocow",
        OptType::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
        None,
    ),
    desc(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
        None,
    ),
    desc(
        "extent_size_hint",
        OptType::Size,
        "Extent size hint for the image file, 0 to disable",
        None,
    ),
];

/// `qemu_opts_append`: the descriptions of `lists`, a name given twice kept once
/// (the first time).
pub(crate) fn append_descs(lists: &[&'static [OptDesc]]) -> Vec<&'static OptDesc> {
    let mut out: Vec<&'static OptDesc> = Vec::new();
    for list in lists {
        for d in list.iter() {
            if !out.iter().any(|o| o.name == d.name) {
                out.push(d);
            }
        }
    }
    out
}

/// `qemu_opts_print_help`: one line per option, sorted.
pub(crate) fn print_opts_help(descs: &[&OptDesc]) {
    let mut lines: Vec<String> = descs
        .iter()
        .map(|d| {
            let head = format!("  {}=<{}>", d.name, d.ty.name());
            format!("{head:<24} - {}", d.help)
        })
        .collect();
    lines.sort();
    for l in lines {
        println!("{l}");
    }
}

/// `is_valid_option_list`: whether an `-o` argument can be joined to others.
pub(crate) fn valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// `get_opt_value`: the text up to a single ',' (",," is a comma), and the rest
/// (starting at that ',', or empty).
fn opt_value(s: &str) -> (String, &str) {
    let b = s.as_bytes();
    let mut v = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                v.push(b',');
                i += 2;
                continue;
            }
            break;
        }
        v.push(b[i]);
        i += 1;
    }
    (String::from_utf8_lossy(&v).into_owned(), &s[i..])
}

/// `has_help_option`: an element of the list is "help" or "?".
pub(crate) fn has_help_option(list: &str) -> bool {
    let mut rest = list;
    while !rest.is_empty() {
        let (v, r) = opt_value(rest);
        if v == "help" || v == "?" {
            return true;
        }
        rest = r.strip_prefix(',').unwrap_or(r);
    }
    false
}

/// `qapi_bool_parse`.
fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// One option set: its string and, for numbers and sizes, its value.
#[derive(Debug, Clone)]
struct OptValue {
    name: String,
    text: String,
    number: u64,
}

/// A QemuOpts: the options given, checked against the descriptions.
#[derive(Debug)]
pub(crate) struct QemuOpts {
    descs: Vec<&'static OptDesc>,
    values: Vec<OptValue>,
}

impl QemuOpts {
    pub fn new(descs: Vec<&'static OptDesc>) -> QemuOpts {
        QemuOpts {
            descs,
            values: Vec::new(),
        }
    }

    /// `qemu_opt_set`: checks and adds one option (a later one wins).
    pub fn set(&mut self, name: &str, text: &str) -> Result<(), String> {
        let Some(d) = self.descs.iter().find(|d| d.name == name) else {
            return Err(format!("Invalid parameter '{name}'"));
        };
        let number = match d.ty {
            OptType::Str => 0,
            OptType::Bool => parse_bool(name, text)? as u64,
            OptType::Number => match strtou64(text) {
                Some(Ok(v)) => v,
                Some(Err(())) => {
                    return Err(format!(
                        "Value '{text}' is too large for parameter '{name}'"
                    ))
                }
                None => return Err(format!("Parameter '{name}' expects a number")),
            },
            OptType::Size => match strtosz(text) {
                Ok(v) => v,
                Err(SizeError::Range) => {
                    return Err(format!(
                        "Value '{text}' is out of range for parameter '{name}'"
                    ))
                }
                Err(SizeError::Invalid) => {
                    return Err(format!(
                        "Parameter '{name}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, \
                         tera-, peta-\nand exabytes, respectively."
                    ))
                }
            },
        };
        self.values.push(OptValue {
            name: name.to_string(),
            text: text.to_string(),
            number,
        });
        Ok(())
    }

    /// `qemu_opt_set_number`.
    pub fn set_number(&mut self, name: &str, v: u64) {
        self.values.push(OptValue {
            name: name.to_string(),
            text: (v as i64).to_string(),
            number: v,
        });
    }

    /// `qemu_opts_do_parse`: every element of an `-o` list ("name=value", a bare
    /// "name" for name=on, "noname" for name=off; "id" is ignored).
    pub fn parse(&mut self, list: &str) -> Result<(), String> {
        let mut rest = list;
        while !rest.is_empty() {
            let len = rest.find(['=', ',']).unwrap_or(rest.len());
            let name = &rest[..len];
            let (name, value, r) = if rest[len..].starts_with('=') {
                let (v, r) = opt_value(&rest[len + 1..]);
                (name.to_string(), v, r)
            } else {
                let r = &rest[len..];
                match name.strip_prefix("no") {
                    Some(n) => (n.to_string(), "off".to_string(), r),
                    None => (name.to_string(), "on".to_string(), r),
                }
            };
            rest = r.strip_prefix(',').unwrap_or(r);
            if name == "id" {
                continue;
            }
            self.set(&name, &value)?;
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&OptValue> {
        self.values.iter().rev().find(|v| v.name == name)
    }

    /// The string of an option, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).map(|v| v.text.as_str())
    }

    /// The value of a number or size option, if given.
    pub fn get_number(&self, name: &str) -> Option<u64> {
        self.find(name).map(|v| v.number)
    }

    /// A boolean option, false unless given as true.
    pub fn get_bool(&self, name: &str) -> bool {
        self.find(name).is_some_and(|v| v.number != 0)
    }

    /// `qemu_opts_print(opts, " ")`: every option given or with a default, in the
    /// drivers' order.
    pub fn print(&self) -> String {
        let mut parts = Vec::new();
        for d in &self.descs {
            let opt = self.find(d.name);
            let Some(text) = opt.map(|o| o.text.as_str()).or(d.default) else {
                continue;
            };
            parts.push(match (d.ty, opt) {
                (OptType::Str, _) => format!("{}={}", d.name, text.replace(',', ",,")),
                (OptType::Size | OptType::Number, Some(o)) => {
                    format!("{}={}", d.name, o.number as i64)
                }
                _ => format!("{}={}", d.name, text),
            });
        }
        parts.join(" ")
    }
}

// ---------------------------------------------------------------------------------

/// The formats `create` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Qcow2,
    Raw,
}

/// The drivers' creation options for a format.
fn format_descs(fmt: Fmt, with_protocol: bool) -> Vec<&'static OptDesc> {
    let own: &'static [OptDesc] = match fmt {
        Fmt::Qcow2 => QCOW2_OPTS,
        Fmt::Raw => RAW_OPTS,
    };
    if with_protocol {
        append_descs(&[own, FILE_OPTS])
    } else {
        append_descs(&[own])
    }
}

/// Looks a `-f` name up: a format oxcow creates, or qemu-img's message.
fn find_format(name: &str) -> Result<Fmt, String> {
    match name {
        "qcow2" => Ok(Fmt::Qcow2),
        "raw" => Ok(Fmt::Raw),
        other if qemu_knows_format(other) => Err(format!(
            "Format '{other}' is not supported by oxcow yet (only 'qcow2' and 'raw' can be created)"
        )),
        other => Err(format!("Unknown file format '{other}'")),
    }
}

/// `bdrv_find_protocol` for a file name: the local path it names ("file:" removed),
/// or qemu-img's message for another protocol.
fn local_target(filename: &str) -> Result<String, String> {
    let stop = filename.find(['/', ':']);
    if let Some(i) = stop {
        if filename.as_bytes()[i] == b':' {
            let proto = &filename[..i];
            return match proto {
                "file" => Ok(filename[i + 1..].to_string()),
                "nbd" | "nbd+tcp" | "nbd+unix" | "http" | "https" | "ftp" | "ftps" | "ssh"
                | "iscsi" | "iser" | "nfs" | "gluster" | "gluster+tcp" | "gluster+unix"
                | "gluster+rdma" | "rbd" | "fat" | "null-co" | "null-aio" | "blkdebug"
                | "blkverify" | "nvme" | "host_device" | "host_cdrom" => Err(format!(
                    "Protocol '{proto}' is not supported by oxcow (only local files)"
                )),
                _ => Err(format!("Unknown protocol '{proto}'")),
            };
        }
    }
    Ok(filename.to_string())
}

#[derive(Default)]
struct Args {
    fmt: Option<String>,
    base_filename: Option<String>,
    base_fmt: Option<String>,
    options: Option<String>,
    quiet: bool,
    unsafe_backing: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut a = Args::default();
    let mut g = Getopt::new(args, "F:b:f:ho:qu", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "F" => a.base_fmt = Some(arg),
            "b" => a.base_filename = Some(arg),
            "f" => a.fmt = Some(arg),
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
            "q" => a.quiet = true,
            "u" => a.unsafe_backing = true,
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    let operands = g.operands();
    let fmt_name = a.fmt.clone().unwrap_or_else(|| "raw".to_string());
    let filename = operands.first();
    if let Some(opts) = &a.options {
        if has_help_option(opts) {
            return print_option_help(ctx, &fmt_name, filename.map(String::as_str));
        }
    }
    let Some(filename) = filename else {
        return usage_error(ctx, CMD, "Expecting image file name");
    };
    let mut img_size = None;
    if let Some(s) = operands.get(1) {
        match cvtnum(ctx, "image size", s, true) {
            Some(v) => img_size = Some(v),
            None => return 1,
        }
    }
    if let Some(extra) = operands.get(2) {
        return usage_error(ctx, CMD, format!("Unexpected argument: {extra}"));
    }
    match img_create(&a, &fmt_name, filename, img_size) {
        Ok(()) => 0,
        Err(msg) => {
            ctx.error(format!("{filename}: {msg}"));
            1
        }
    }
}

/// `-o help`: the options of the format (and of the file protocol, when a file name
/// is given).
pub(crate) fn print_option_help(ctx: &Ctx, fmt_name: &str, filename: Option<&str>) -> u8 {
    let fmt = match find_format(fmt_name) {
        Ok(f) => f,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    if let Some(f) = filename {
        if let Err(msg) = local_target(f) {
            ctx.error(msg);
            return 1;
        }
        println!("Supported options:");
    } else {
        println!("Supported {fmt_name} options:");
    }
    print_opts_help(&format_descs(fmt, filename.is_some()));
    if filename.is_none() {
        println!(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options."
        );
    }
    0
}

/// The text of a library error as QEMU words such errors.
fn reason(e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Io(io) => crate::common::io_reason(io),
        other => crate::cmd::info::strip_os_error(&other.to_string()),
    }
}

/// Opens the backing file as bdrv_img_create does (relative to the new image),
/// returning its format and length.
fn open_backing(filename: &str, backing: &str, fmt: Option<&str>) -> Result<(Format, u64), String> {
    let hint = "\nCould not open backing image.";
    let local = local_path(backing, "backing file").map_err(|e| format!("{}{hint}", reason(&e)))?;
    let full = if local.len() == backing.len() {
        combine_paths(filename, backing)
    } else {
        local
    };
    let format = match fmt {
        None => None,
        Some("qcow2") => Some(Format::Qcow2),
        Some("raw") => Some(Format::Raw),
        Some(other) if qemu_knows_format(other) => {
            return Err(format!(
                "Backing file format '{other}' is not supported by oxcow yet{hint}"
            ))
        }
        Some(other) => return Err(format!("Unknown driver '{other}'{hint}")),
    };
    if std::path::Path::new(&full).is_dir() {
        return Err(format!(
            "'file' driver requires '{full}' to be a regular file{hint}"
        ));
    }
    let opts = OpenOptions {
        format,
        ..Default::default()
    };
    let img = Image::open(&full, &opts).map_err(|e| format!("{}{hint}", reason(&e)))?;
    // bdrv_getlength: whole sectors (a raw file's length is rounded up already).
    let len = match img.format() {
        Format::Qcow2 => img.size() / 512 * 512,
        Format::Raw => img.size(),
    };
    Ok((img.format(), len))
}

/// bdrv_img_create.
fn img_create(
    a: &Args,
    fmt_name: &str,
    filename: &str,
    img_size: Option<u64>,
) -> Result<(), String> {
    let fmt = find_format(fmt_name)?;
    let path = local_target(filename)?;
    let mut opts = QemuOpts::new(format_descs(fmt, true));
    if let Some(list) = &a.options {
        opts.parse(list)?;
    }
    match (opts.get("size").is_some(), img_size) {
        (false, Some(s)) => opts.set_number("size", s),
        (false, None) => {}
        (true, Some(_)) => return Err("The image size must be specified only once".into()),
        (true, None) => {}
    }
    if let Some(b) = &a.base_filename {
        if fmt == Fmt::Raw {
            return Err(format!(
                "Backing file not supported for file format '{fmt_name}'"
            ));
        }
        opts.set("backing_file", b)?;
    }
    if let Some(f) = &a.base_fmt {
        if fmt == Fmt::Raw {
            return Err(format!(
                "Backing file format not supported for file format '{fmt_name}'"
            ));
        }
        opts.set("backing_fmt", f)?;
    }
    let backing_file = opts.get("backing_file").map(str::to_string);
    if let Some(b) = &backing_file {
        if b == filename {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".into());
        }
    }
    let backing_fmt = opts.get("backing_fmt").map(str::to_string);
    let mut size = opts.get_number("size");
    match &backing_file {
        Some(b) if !a.unsafe_backing => {
            let (detected, len) = open_backing(filename, b, backing_fmt.as_deref())?;
            if backing_fmt.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    detected.name()
                ));
            }
            if size.is_none() {
                size = Some(len);
                opts.set_number("size", len);
            }
        }
        Some(_) if backing_fmt.is_none() => {
            return Err("Backing file specified without backing format".into());
        }
        _ => {}
    }
    let Some(size) = size else {
        return Err("Image creation needs a size parameter".into());
    };
    if !a.quiet {
        println!("Formatting '{filename}', fmt={fmt_name} {}", opts.print());
    }
    match fmt {
        Fmt::Raw => create_raw(&path, size, &opts),
        Fmt::Qcow2 => create_qcow2(&path, size, &opts),
    }
}

/// qemu's "Could not create" for a file that cannot be opened for writing.
fn create_file(path: &str) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .and_then(|f| f.set_len(0).map(|_| f))
        .map_err(|e| {
            format!(
                "Could not create '{path}': {}",
                crate::common::io_reason(&e)
            )
        })
}

/// The message when the file system refuses the size (EFBIG), as bdrv_img_create
/// replaces it.
fn too_large(e: &std::io::Error, fmt: &str, hint: &str) -> Option<String> {
    (e.raw_os_error() == Some(libc::EFBIG))
        .then(|| format!("The image size is too large for file format '{fmt}'{hint}"))
}

/// The file protocol's creation (raw_co_create): the file truncated, then sized and
/// preallocated; its first block written so that it is allocated.
fn create_raw(path: &str, size: u64, opts: &QemuOpts) -> Result<(), String> {
    let size = size.div_ceil(512) * 512;
    let prealloc = match opts.get("preallocation") {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => return Err(format!("invalid parameter value: {other}")),
    };
    if opts.get_number("extent_size_hint").unwrap_or(0) > u32::MAX as u64 {
        return Err("Extent size hint is too large".into());
    }
    let f = create_file(path)?;
    let fail = |what: &str, e: std::io::Error| {
        too_large(&e, "raw", "")
            .unwrap_or_else(|| format!("{what}: {}", crate::common::io_reason(&e)))
    };
    let first_block = |f: &File| {
        let n = if size < 4096 { 512 } else { 4096 };
        let _ = f.write_all_at(&vec![0u8; n.min(size) as usize], 0);
    };
    match prealloc {
        Preallocation::Off => {
            f.set_len(size)
                .map_err(|e| fail("Could not resize file", e))?;
            if size > 0 {
                first_block(&f);
            }
        }
        Preallocation::Falloc => {
            if size > 0 {
                let len = libc::off_t::try_from(size)
                    .map_err(|_| fail("", std::io::Error::from_raw_os_error(libc::EFBIG)))?;
                // SAFETY: posix_fallocate on a descriptor we own; no memory is passed.
                let r =
                    unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len) };
                if r != 0 {
                    return Err(fail(
                        "Could not preallocate new data",
                        std::io::Error::from_raw_os_error(r),
                    ));
                }
                first_block(&f);
            }
        }
        Preallocation::Full => {
            f.set_len(size)
                .map_err(|e| fail("Could not resize file", e))?;
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < size {
                let n = (size - done).min(zeros.len() as u64);
                f.write_all_at(&zeros[..n as usize], done)
                    .map_err(|e| fail("Could not write zeros for preallocation", e))?;
                done += n;
            }
            f.sync_all()
                .map_err(|e| fail("Could not flush file to disk", e))?;
        }
        Preallocation::Metadata => {
            return Err("Unsupported preallocation mode: metadata".into());
        }
    }
    Ok(())
}

/// qcow2_co_create_opts: the image file (and data file) created first, then the
/// options turned into the driver's, checked, and the image written. Any failure
/// after the files exist deletes them.
pub(crate) fn create_qcow2(path: &str, size: u64, opts: &QemuOpts) -> Result<(), String> {
    let encryption = opts.get_bool("encryption");
    if encryption && opts.get("encrypt.format").is_some() {
        return Err(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
        );
    }
    create_file(path)?;
    let data_file = opts.get("data_file").map(str::to_string);
    let mut created = vec![path.to_string()];
    let result = (|| {
        if let Some(df) = &data_file {
            let p = local_path(df, "data file").map_err(|e| reason(&e))?;
            create_file(&p)?;
            created.push(p);
        }
        let o = qcow2_options(size, opts, encryption)?;
        if let Err(e) = o.validate() {
            if let Some(b) = o.backing_file.as_deref().filter(|b| b.len() > 1023) {
                return Err(format!(
                    "Could not assign backing file '{b}' with format '{}': Invalid argument",
                    o.backing_format.as_deref().unwrap_or("(null)")
                ));
            }
            return Err(reason(&e));
        }
        oxcow::create_qcow2(path, &o).map_err(|e| match e {
            oxcow::Error::Open { path, source } => format!(
                "Could not create '{}': {}",
                path.display(),
                crate::common::io_reason(&source)
            ),
            oxcow::Error::Io(io) => too_large(&io, "qcow2", " (try using a larger cluster size)")
                .unwrap_or_else(|| crate::common::io_reason(&io)),
            other => reason(&other),
        })
    })();
    if result.is_err() {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// The qcow2 driver's options from the QemuOpts, refused as QAPI refuses values of
/// its enumerations (in the order of BlockdevCreateOptionsQcow2's members).
fn qcow2_options(size: u64, opts: &QemuOpts, encryption: bool) -> Result<CreateOptions, String> {
    let not_accepted = |p: &str, v: &str| format!("Parameter '{p}' does not accept value '{v}'");
    let mut o = CreateOptions {
        // qemu-img silently rounds the size up to whole sectors.
        size: size.div_ceil(512) * 512,
        data_file: opts.get("data_file").map(str::to_string),
        data_file_raw: opts.get_bool("data_file_raw"),
        extended_l2: opts.get_bool("extended_l2"),
        lazy_refcounts: opts.get_bool("lazy_refcounts"),
        backing_file: opts.get("backing_file").map(str::to_string),
        ..Default::default()
    };
    if let Some(v) = opts.get("compat") {
        o.version = match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(not_accepted("version", other)),
        };
    }
    if let Some(f) = opts.get("backing_fmt") {
        if !qemu_knows_format(f) {
            return Err(not_accepted("backing-fmt", f));
        }
        o.backing_format = Some(f.to_string());
    }
    let encrypted = encryption || opts.values.iter().any(|v| v.name.starts_with("encrypt."));
    if encrypted {
        return Err("Encrypted images are not supported by oxcow yet".into());
    }
    if let Some(cs) = opts.get_number("cluster_size") {
        o.cluster_size = cs;
    }
    if let Some(v) = opts.get("preallocation") {
        o.preallocation = match v {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            other => return Err(not_accepted("preallocation", other)),
        };
    }
    if let Some(b) = opts.get_number("refcount_bits") {
        // Any width the check refuses gives the same message.
        o.refcount_bits = u32::try_from(b).unwrap_or(3);
    }
    if let Some(v) = opts.get("compression_type") {
        o.compression_type = match v {
            "zlib" => CompressionType::Zlib,
            "zstd" => CompressionType::Zstd,
            other => return Err(not_accepted("compression-type", other)),
        };
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_like_qemu_opts() {
        let mut o = QemuOpts::new(format_descs(Fmt::Qcow2, true));
        o.parse("lazy_refcounts,noextended_l2,cluster_size=4k,backing_file=a,,b,id=x")
            .unwrap();
        assert_eq!(o.get("lazy_refcounts"), Some("on"));
        assert_eq!(o.get("extended_l2"), Some("off"));
        assert_eq!(o.get_number("cluster_size"), Some(4096));
        assert_eq!(o.get("backing_file"), Some("a,b"));
        o.set_number("size", 1 << 20);
        assert_eq!(
            o.print(),
            "cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 \
             backing_file=a,,b lazy_refcounts=on refcount_bits=16"
        );
        let mut o = QemuOpts::new(format_descs(Fmt::Qcow2, true));
        assert_eq!(o.parse("bogus=1").unwrap_err(), "Invalid parameter 'bogus'");
        assert_eq!(
            o.parse("refcount_bits=abc").unwrap_err(),
            "Parameter 'refcount_bits' expects a number"
        );
        assert!(has_help_option("size=1,help"));
        assert!(has_help_option("?"));
        assert!(!has_help_option("backing_file=help"));
        assert!(!valid_option_list("a,"));
        assert!(valid_option_list("a,,"));
    }
}
