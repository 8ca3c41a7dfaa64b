//! `measure [--output=human|json] [-O FMT] [-o OPTIONS] (--size N | [-f FMT] [-l
//! SNAPSHOT] FILENAME)`: how large a new image would be, as qemu-img's img_measure and
//! the qcow2 and raw drivers' measure callbacks compute it (the sizes come from
//! `oxcow::measure`). The `-o` list is parsed as QemuOpts parses it against the target
//! format's creation options and the file protocol's; `--size` overrides a size in it.

use super::create::{append_descs, valid_option_list, QemuOpts, FILE_OPTS, QCOW2_OPTS, RAW_OPTS};
use super::info::{parse_output_format, print_help, report_stop, OutputFormat, Stop};
use crate::common::Ctx;
use crate::copyopts::{qemu_knows_format, OBJECT_UNSUPPORTED};
use crate::qjson;
use crate::qopt::{long, Getopt, LongOpt};
use crate::sizearg::cvtnum;
use crate::source::Source;
use oxcow::measure::{validate_cluster_size, validate_refcount_bits, Measurement, Qcow2Target};
use oxcow::{Format, Image, OpenOptions, Preallocation};

const CMD: &str = "measure";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("image-opts", false, "image-opts"),
    long("object", true, "object"),
    long("output", true, "output"),
    long("size", true, "size"),
    long("force-share", false, "U"),
];

const HELP: &str = "Usage:
Calculate file size requred for a new image.  Usage:

  PROG measure [-f FMT|--image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output OFMT] [--object OBJDEF] [-l SNAPSHOT_PARAM]
       (--size SIZE | FILENAME)

Arguments:
  -h, --help
     print this help and exit
  -O, --target-format FMT
     desired target/output image format (default raw)
  -s, --size SIZE
     measure file size for given image size
  FILENAME
     measure file size required to convert from FILENAME
  -f, --format
     specify format of FILENAME explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -l, --snapshot SNAPSHOT
     use this snapshot in FILENAME as source
  --output human|json
     output format
  -U, --force-share
     open images in shared mode for concurrent access

";

#[derive(Default)]
struct Args {
    output: Option<OutputFormat>,
    fmt: Option<String>,
    out_fmt: Option<String>,
    options: Option<String>,
    snapshot: Option<String>,
    image_opts: bool,
    size: Option<u64>,
    filename: Option<String>,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let a = match parse_args(ctx, args) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(stop) => return report_stop(ctx, CMD, stop),
    };
    match measure(&a) {
        Ok(m) => {
            print_measurement(&m, a.output.unwrap_or(OutputFormat::Human));
            0
        }
        Err(msgs) => {
            for m in msgs {
                ctx.error(m);
            }
            1
        }
    }
}

fn parse_args(ctx: &Ctx, args: &[String]) -> Result<Option<Args>, Stop> {
    let mut a = Args::default();
    let mut g = Getopt::new(args, "hf:o:O:l:U", LONGS);
    while let Some(o) = g.next_opt() {
        let o = o.map_err(Stop::Getopt)?;
        let arg = o.arg.clone().unwrap_or_default();
        match o.id.as_str() {
            "h" => {
                print_help(ctx, HELP);
                return Ok(None);
            }
            "f" => a.fmt = Some(arg),
            "O" => a.out_fmt = Some(arg),
            "o" => {
                if !valid_option_list(&arg) {
                    return Err(Stop::Error(format!("Invalid option list: {arg}")));
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{arg}"),
                    None => arg,
                });
            }
            "l" => {
                check_snapshot_param(ctx, &arg)?;
                a.snapshot = Some(arg);
            }
            "U" => {}
            "image-opts" => a.image_opts = true,
            "object" => return Err(Stop::Error(OBJECT_UNSUPPORTED.into())),
            "output" => a.output = Some(parse_output_format(&arg)?),
            "size" => a.size = Some(cvtnum("image size", &arg).map_err(Stop::Error)?),
            _ => {}
        }
    }
    let operands = g.operands();
    if operands.len() > 1 {
        return Err(Stop::Error(
            "At most one filename argument is allowed.".into(),
        ));
    }
    a.filename = operands.first().cloned();
    if a.filename.is_none() && (a.image_opts || a.fmt.is_some() || a.snapshot.is_some()) {
        return Err(Stop::Error(
            "--image-opts, -f, and -l require a filename argument.".into(),
        ));
    }
    if a.filename.is_some() && a.size.is_some() {
        return Err(Stop::Error(
            "--size N cannot be used together with a filename.".into(),
        ));
    }
    if a.filename.is_none() && a.size.is_none() {
        return Err(Stop::Error(
            "Either --size N or one filename must be specified.".into(),
        ));
    }
    if a.image_opts {
        return Err(Stop::Error("--image-opts is not supported by oxcow".into()));
    }
    Ok(Some(a))
}

/// QEMU's snapshot parameter: "snapshot.id=ID,snapshot.name=NAME" or a bare id or
/// name; other keys are refused with its two messages (the first printed here).
fn check_snapshot_param(ctx: &Ctx, arg: &str) -> Result<(), Stop> {
    if !arg.starts_with("snapshot.") {
        return Ok(());
    }
    for part in arg.split(',') {
        let name = part.split('=').next().unwrap_or("");
        if name != "snapshot.id" && name != "snapshot.name" {
            ctx.error(format!("Invalid parameter '{name}'"));
            return Err(Stop::Error(format!(
                "Failed in parsing snapshot param '{arg}'"
            )));
        }
    }
    Ok(())
}

/// Reopens the input as it was at snapshot `param` (qemu-img's
/// bdrv_snapshot_load_tmp_by_id_or_name for a bare id or name).
fn open_snapshot(name: &str, format: Format, param: &str) -> Result<Source, String> {
    let (mut id, mut sn_name) = (None, None);
    let bare = !param.starts_with("snapshot.");
    if bare {
        id = Some(param);
    } else {
        for part in param.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => sn_name = Some(v),
                _ => {}
            }
        }
    }
    let opts = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let mut r = Image::open_snapshot(name, &opts, id, sn_name);
    if bare && matches!(&r, Err(oxcow::Error::InvalidArgument(_))) {
        r = Image::open_snapshot(name, &opts, None, Some(param));
    }
    match r {
        Ok(img) => Ok(Source::from_image(name, img)),
        Err(e) => Err(format!("Failed to load snapshot: {e}")),
    }
}

/// The sizes, or the messages qemu-img prints (each on its own line).
fn measure(a: &Args) -> Result<Measurement, Vec<String>> {
    let one = |m: String| vec![m];
    let input = match &a.filename {
        Some(name) => {
            if let Some(msg) = crate::common::encrypted_without_key(name, a.fmt.as_deref()) {
                return Err(one(msg));
            }
            let src = Source::open(name, a.fmt.as_deref()).map_err(one)?;
            match &a.snapshot {
                Some(sn) => Some(open_snapshot(name, src.img.format(), sn).map_err(one)?),
                None => Some(src),
            }
        }
        None => None,
    };
    let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
    let own = match out_fmt {
        "qcow2" => QCOW2_OPTS,
        "raw" => RAW_OPTS,
        "luks" => return Err(one("Format 'luks' is not supported by oxcow yet".into())),
        other if qemu_knows_format(other) => {
            return Err(one(format!(
                "Block driver '{other}' does not support size measurement"
            )))
        }
        other => return Err(one(format!("Unknown file format '{other}'"))),
    };
    let mut opts = QemuOpts::new(append_descs(&[own, FILE_OPTS]));
    if let Some(list) = &a.options {
        opts.parse(list)
            .map_err(|e| vec![e, format!("Invalid options for file format '{out_fmt}'")])?;
    }
    if let Some(size) = a.size {
        opts.set_number("size", size);
    }
    if out_fmt == "raw" {
        let size = match &input {
            Some(src) => src.len,
            None => opts.get_number("size").unwrap_or(0),
        };
        return Ok(oxcow::measure::measure_raw(size));
    }
    let target = qcow2_target(&opts).map_err(one)?;
    match &input {
        Some(src) => target.measure_image(&src.img, src.len),
        None => target.measure_size(opts.get_number("size").unwrap_or(0)),
    }
    .map_err(|e| one(e.to_string()))
}

/// The qcow2 options in qcow2_measure's order, with its messages.
fn qcow2_target(opts: &QemuOpts) -> Result<Qcow2Target, String> {
    let mut t = Qcow2Target {
        extended_l2: opts.get_bool("extended_l2"),
        ..Default::default()
    };
    if let Some(cs) = opts.get_number("cluster_size") {
        t.cluster_size = cs;
    }
    validate_cluster_size(t.cluster_size, t.extended_l2).map_err(|e| e.to_string())?;
    if let Some(v) = opts.get("compat") {
        t.version = match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(format!("Invalid compatibility level: '{other}'")),
        };
    }
    let bits = opts.get_number("refcount_bits").unwrap_or(16);
    validate_refcount_bits(bits, t.version).map_err(|e| e.to_string())?;
    t.refcount_bits = bits as u32;
    if let Some(p) = opts.get("preallocation") {
        t.preallocation =
            Preallocation::from_name(p).map_err(|_| format!("invalid parameter value: {p}"))?;
    }
    t.backing_file = opts.get("backing_file").is_some();
    if opts.get("encrypt.format") == Some("luks") {
        if opts.get("encrypt.key-secret").is_none() {
            return Err("Parameter 'encrypt.key-secret' is required for cipher".into());
        }
        return Err("LUKS encryption is not supported by oxcow yet".into());
    }
    Ok(t)
}

fn print_measurement(m: &Measurement, output: OutputFormat) {
    match output {
        OutputFormat::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut map = serde_json::Map::new();
            map.insert("required".into(), m.required.into());
            map.insert("fully-allocated".into(), m.fully_allocated.into());
            if let Some(b) = m.bitmaps {
                map.insert("bitmaps".into(), b.into());
            }
            println!("{}", qjson::to_json_pretty(&serde_json::Value::Object(map)));
        }
    }
}
