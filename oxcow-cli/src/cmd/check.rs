//! `check`: image integrity, as `qemu-img check` reports it (the problems found on
//! stderr, the summary on stdout, in human words or JSON) with its exit codes: 0
//! clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 a format without
//! checks. With `-r leaks|all` the image is opened for writing, repaired, and checked
//! again; the second check's result is what is printed, with the repaired counts.

use super::info::{
    check_format, open_error, parse_output_format, print_help, report_stop, OutputFormat, Stop,
};
use crate::common::Ctx;
use crate::copyopts::OBJECT_UNSUPPORTED;
use crate::qjson;
use crate::qopt::{long, Getopt, LongOpt};
use oxcow::{CheckReport, Fix, Image, OpenOptions};
use serde_json::{Map, Value};

const SHORTS: &str = "hf:r:T:qU";
const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("format", true, "f"),
    long("repair", true, "r"),
    long("output", true, "output"),
    long("object", true, "object"),
    long("image-opts", false, "image-opts"),
    long("force-share", false, "U"),
    long("quiet", false, "q"),
    long("cache", true, "T"),
];

const HELP: &str = "Usage:
Check basic image integrity.  Usage:

  PROG check [-f FMT | --image-opts] [-T CACHE_MODE] [-r] [-u]
        [--output human|json] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the image explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -T, --cache CACHE_MODE
     image cache mode (writeback)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format
  -r, --repair leaks|all
     repair particular aspect of the image
     (image will be open in read-write mode, incompatible with --force-share)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     the image file (or image specification) to operate on

";

/// The cache modes QEMU's bdrv_parse_cache_mode accepts.
const CACHE_MODES: &[&str] = &[
    "none",
    "off",
    "writeback",
    "writethrough",
    "directsync",
    "unsafe",
];

struct Args {
    output: OutputFormat,
    fmt: Option<String>,
    fix: Fix,
    quiet: bool,
    force_share: bool,
    filename: String,
}

fn parse_args(ctx: &Ctx, args: &[String]) -> Result<Option<Args>, Stop> {
    let mut g = Getopt::new(args, SHORTS, LONGS);
    let mut a = Args {
        output: OutputFormat::Human,
        fmt: None,
        fix: Fix::None,
        quiet: false,
        force_share: false,
        filename: String::new(),
    };
    let mut image_opts = false;
    let mut cache = None;
    while let Some(o) = g.next_opt() {
        let o = o.map_err(Stop::Getopt)?;
        let arg = o.arg.as_deref().unwrap_or("");
        match o.id.as_str() {
            "h" => {
                print_help(ctx, HELP);
                return Ok(None);
            }
            "f" => a.fmt = o.arg.clone(),
            "r" => {
                a.fix = match arg {
                    "leaks" => Fix::Leaks,
                    "all" => Fix::All,
                    other => {
                        return Err(Stop::Usage(format!(
                            "--repair (-r) expects 'leaks' or 'all' not '{other}'"
                        )))
                    }
                }
            }
            "output" => a.output = parse_output_format(arg)?,
            "T" => cache = Some(arg.to_string()),
            "q" => a.quiet = true,
            "U" => a.force_share = true,
            "image-opts" => image_opts = true,
            "object" => return Err(Stop::Error(OBJECT_UNSUPPORTED.into())),
            _ => {}
        }
    }
    let [filename] = g.operands() else {
        return Err(Stop::Usage("Expecting one image file name".into()));
    };
    a.filename = filename.clone();
    if let Some(c) = cache {
        if !CACHE_MODES.contains(&c.as_str()) {
            return Err(Stop::Error(format!("Invalid source cache option: {c}")));
        }
    }
    if image_opts {
        if a.fmt.is_some() {
            return Err(Stop::Error(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        return Err(Stop::Error(
            "--image-opts is not supported by oxcow (give a file name)".into(),
        ));
    }
    Ok(Some(a))
}

fn open(a: &Args) -> Result<Image, String> {
    let format = check_format(&a.filename, a.fmt.as_deref())?;
    if a.fix != Fix::None && a.force_share {
        return Err(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.filename
        ));
    }
    // The file itself first, for the protocol driver's messages.
    let (local, storage, _) = super::info::open_file(&a.filename)?;
    drop(storage);
    let opts = OpenOptions {
        format,
        writable: a.fix != Fix::None,
        check: true,
        ..OpenOptions::default()
    };
    Image::open(&local, &opts).map_err(|e| open_error(&a.filename, &e))
}

/// `collect_image_check()`'s ImageCheck as QEMU's JSON printer orders it.
fn to_json(r: &CheckReport, filename: &str) -> Value {
    let mut m = Map::new();
    let opt = |m: &mut Map<String, Value>, k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), Value::from(v));
        }
    };
    m.insert("filename".into(), Value::from(filename));
    m.insert("format".into(), Value::from("qcow2"));
    m.insert("check-errors".into(), Value::from(r.check_errors));
    opt(&mut m, "image-end-offset", r.image_end_offset);
    opt(&mut m, "corruptions", r.corruptions);
    opt(&mut m, "leaks", r.leaks);
    opt(&mut m, "corruptions-fixed", r.corruptions_fixed);
    opt(&mut m, "leaks-fixed", r.leaks_fixed);
    opt(&mut m, "total-clusters", r.total_clusters);
    opt(&mut m, "allocated-clusters", r.allocated_clusters);
    opt(&mut m, "fragmented-clusters", r.fragmented_clusters);
    opt(&mut m, "compressed-clusters", r.compressed_clusters);
    Value::Object(m)
}

/// `dump_human_image_check()`.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc,
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// Runs one check and prints what it found on stderr.
fn run_check(ctx: &Ctx, img: &Image, fix: Fix) -> Result<CheckReport, String> {
    let r = img.check(fix).map_err(|e| match e {
        oxcow::Error::Io(io) => crate::common::io_reason(&io),
        other => other.to_string(),
    })?;
    for (reported, m) in r.lines() {
        if reported {
            ctx.error(m);
        } else {
            eprintln!("{m}");
        }
    }
    match &r.failure {
        Some(f) => Err(f.clone()),
        None => Ok(r),
    }
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let a = match parse_args(ctx, args) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(stop) => return report_stop(ctx, "check", stop),
    };
    let img = match open(&a) {
        Ok(i) => i,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    let Some(q) = img.qcow2() else {
        ctx.error("This image format does not support checks");
        return 63;
    };
    super::info::warn_stale_bitmaps(ctx, q.meta());
    let out = Stdout::new(a.quiet);
    let say = |s: &str| out.say(s);
    let mut report = match run_check(ctx, &img, a.fix) {
        Ok(r) => r,
        Err(f) => {
            ctx.error(format!("Check failed: {f}"));
            return 1;
        }
    };
    if report.corruptions_fixed != 0 || report.leaks_fixed != 0 {
        if a.output == OutputFormat::Human {
            say(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            ));
        }
        let (lf, cf) = (report.leaks_fixed, report.corruptions_fixed);
        report = match run_check(ctx, &img, Fix::None) {
            Ok(r) => r,
            Err(f) => {
                ctx.error(format!("Check failed: {f}"));
                return 1;
            }
        };
        report.leaks_fixed = lf;
        report.corruptions_fixed = cf;
    }
    match a.output {
        OutputFormat::Human => say(&human(&report)),
        OutputFormat::Json => say(&format!(
            "{}\n",
            qjson::to_json_pretty(&to_json(&report, &a.filename))
        )),
    }
    if report.check_errors != 0 {
        ctx.error("Check failed");
        return 1;
    }
    if report.corruptions != 0 {
        2
    } else if report.leaks != 0 {
        3
    } else {
        0
    }
}

/// Standard output as qemu-img's C stdio has it: line-buffered on a terminal, else
/// held until the end (so that the messages of the double check, on stderr, come
/// before the repair summary when both go to one file, as with qemu-img).
struct Stdout {
    quiet: bool,
    tty: bool,
    held: std::cell::RefCell<String>,
}

impl Stdout {
    fn new(quiet: bool) -> Stdout {
        use std::io::IsTerminal;
        Stdout {
            quiet,
            tty: std::io::stdout().is_terminal(),
            held: Default::default(),
        }
    }

    fn say(&self, s: &str) {
        if self.quiet {
        } else if self.tty {
            print!("{s}");
        } else {
            self.held.borrow_mut().push_str(s);
        }
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        print!("{}", self.held.borrow());
    }
}
