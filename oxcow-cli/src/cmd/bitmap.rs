//! `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
//! [-f FMT] [-b SRC_FILENAME [-F SRC_FMT]] [-g SIZE] FILENAME BITMAP`: qemu-img's
//! img_bitmap over the library's persistent dirty bitmaps.
//!
//! As qemu-img 10: the actions run in the order given; the first that fails stops
//! the rest ("Operation OP on bitmap NAME failed: REASON", exit 1) and what was done
//! before it is kept; `-g 0` means the default granularity. QEMU names the image by
//! its node name ("#block123") in some messages; oxcow by its file name.

use crate::cmd::resize::open_writable;
use crate::common::{self, Ctx};
use crate::copyopts::{next_option, object_unsupported};
use crate::qopt::{long, Getopt, LongOpt};
use crate::sizearg::cvtnum;
use oxcow::{BitmapOptions, Image, OpenOptions};

const CMD: &str = "bitmap";

const SHORTS: &str = "hf:b:F:g:";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("object", true, "object"),
    long("image-opts", false, "image-opts"),
    long("add", false, "add"),
    long("remove", false, "remove"),
    long("clear", false, "clear"),
    long("enable", false, "enable"),
    long("disable", false, "disable"),
    long("merge", true, "merge"),
    long("granularity", true, "g"),
    long("source-file", true, "b"),
    long("source-format", true, "F"),
];

const HELP: &str = "Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  PROG bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut actions = Vec::new();
    let mut fmt: Option<String> = None;
    let mut src_file: Option<String> = None;
    let mut src_fmt: Option<String> = None;
    let mut granularity = 0u64;
    let mut image_opts = false;
    let mut g = Getopt::new(args, SHORTS, LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => fmt = Some(arg),
            "b" => src_file = Some(arg),
            "F" => src_fmt = Some(arg),
            "g" => match cvtnum("granularity", &arg) {
                Ok(v) => granularity = v,
                Err(msg) => {
                    ctx.error(msg);
                    return 1;
                }
            },
            "image-opts" => image_opts = true,
            "object" => return object_unsupported(ctx),
            "add" => actions.push(Action::Add),
            "remove" => actions.push(Action::Remove),
            "clear" => actions.push(Action::Clear),
            "enable" => actions.push(Action::Enable),
            "disable" => actions.push(Action::Disable),
            "merge" => actions.push(Action::Merge(arg)),
            _ => {}
        }
    }
    if actions.is_empty() {
        ctx.error("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        return 1;
    }
    let merge = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if granularity != 0 && !actions.contains(&Action::Add) {
        ctx.error("granularity only supported with --add");
        return 1;
    }
    if src_fmt.is_some() && src_file.is_none() {
        ctx.error("-F only supported with -b");
        return 1;
    }
    if src_file.is_some() && !merge {
        ctx.error("Merge bitmap source file only supported with --merge");
        return 1;
    }
    let ops = g.operands();
    if ops.len() != 2 {
        ctx.error("Expecting filename and bitmap name");
        return 1;
    }
    let (filename, bitmap) = (ops[0].clone(), ops[1].clone());
    let Some(img) = open_writable(ctx, &filename, fmt.as_deref(), image_opts, false) else {
        return 1;
    };
    let src = match &src_file {
        Some(name) => match common::open_image(name, src_fmt.as_deref(), &OpenOptions::default()) {
            Ok(s) => Some(s),
            Err(msg) => {
                ctx.error(msg);
                return 1;
            }
        },
        None => None,
    };
    let mut code = 0;
    for act in &actions {
        if let Err(e) = apply(&img, src.as_ref(), act, &bitmap, granularity) {
            ctx.error(format!(
                "Operation {} on bitmap {bitmap} failed: {e}",
                act.op()
            ));
            code = 1;
            break;
        }
    }
    drop(src);
    if let Err(e) = img.store_bitmaps() {
        ctx.error(format!("Failed to store bitmaps: {e}"));
        code = 1;
    }
    code
}

fn apply(
    img: &Image,
    src: Option<&Image>,
    act: &Action,
    bitmap: &str,
    granularity: u64,
) -> oxcow::Result<()> {
    match act {
        Action::Add => {
            // QEMU passes the granularity on as a 32-bit number.
            let g = granularity as u32 as u64;
            let opts = BitmapOptions {
                granularity: (granularity != 0).then_some(g),
                ..Default::default()
            };
            img.add_bitmap(bitmap, &opts)
        }
        Action::Remove => img.remove_bitmap(bitmap),
        Action::Clear => img.clear_bitmap(bitmap),
        Action::Enable => img.enable_bitmap(bitmap),
        Action::Disable => img.disable_bitmap(bitmap),
        Action::Merge(source) => img.merge_bitmap(bitmap, src.unwrap_or(img), source),
    }
}
