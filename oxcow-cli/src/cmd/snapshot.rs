//! `snapshot [-f FMT] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-q] [-U]
//! FILENAME`: qemu-img's img_snapshot over the library's internal snapshots.
//!
//! As qemu-img 10: listing is the default and opens the image read-only; `-a` finds
//! the snapshot by ID, then by name; `-d` by name only (bdrv_snapshot_find); `-c`
//! allows duplicate names and cuts names to 255 bytes. Images that cannot hold
//! snapshots (raw, external data files) list nothing and refuse changes with QEMU's
//! messages.

use crate::cmd::resize::{open_writable, warn_probed_raw};
use crate::common::{self, Ctx};
use crate::copyopts::{getopt_error, image_opts_refusal, object_unsupported, usage_error};
use crate::qopt::{long, Getopt, LongOpt};
use crate::snaptable::{snapshot_header, snapshot_row};
use oxcow::{Format, Image, OpenOptions};

const CMD: &str = "snapshot";

const SHORTS: &str = "la:c:d:f:hqU";

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("quiet", false, "q"),
    long("object", true, "object"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("force-share", false, "U"),
    long("list", false, "l"),
    // qemu-img 10 declares these three without an argument (so `--create NAME`
    // takes NAME for the file name); kept as it parses them.
    long("apply", false, "a"),
    long("create", false, "c"),
    long("delete", false, "d"),
];

const HELP: &str = "Usage:
List or manipulate snapshots within image.  Usage:

  PROG snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

";

/// The action and its snapshot name (`None` from the long options, see LONGS).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    List,
    Apply(Option<String>),
    Create(Option<String>),
    Delete(Option<String>),
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut action: Option<Action> = None;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut force_share = false;
    let mut g = Getopt::new(args, SHORTS, LONGS);
    while let Some(item) = g.next_opt() {
        let opt = match item {
            Ok(opt) => opt,
            Err(msg) => return getopt_error(ctx, CMD, &msg),
        };
        let name = opt.arg.clone();
        let arg = opt.arg.unwrap_or_default();
        let chosen = match opt.id.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "f" => {
                fmt = Some(arg);
                None
            }
            "q" => None,
            "U" => {
                force_share = true;
                None
            }
            "image-opts" => {
                image_opts = true;
                None
            }
            "object" => return object_unsupported(ctx),
            "l" => Some(Action::List),
            "a" => Some(Action::Apply(name)),
            "c" => Some(Action::Create(name)),
            "d" => Some(Action::Delete(name)),
            _ => None,
        };
        if let Some(a) = chosen {
            if action.is_some() {
                return usage_error(ctx, CMD, "Cannot mix '-l', '-a', '-c', '-d'");
            }
            action = Some(a);
        }
    }
    if g.operands().len() != 1 {
        return usage_error(ctx, CMD, "Expecting one image file name");
    }
    let filename = g.operands()[0].clone();
    let action = action.unwrap_or(Action::List);
    if action == Action::List {
        return list(ctx, &filename, fmt.as_deref(), image_opts);
    }
    if force_share {
        ctx.error(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
        return 1;
    }
    let Some(img) = open_writable(ctx, &filename, fmt.as_deref(), image_opts, false) else {
        return 1;
    };
    change(ctx, &img, &action, fmt.as_deref())
}

fn list(ctx: &Ctx, filename: &str, fmt: Option<&str>, image_opts: bool) -> u8 {
    if image_opts {
        ctx.error(image_opts_refusal(fmt.is_some(), filename));
        return 1;
    }
    let img = match common::open_image(filename, fmt, &OpenOptions::default()) {
        Ok(img) => img,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    // QEMU lists nothing where snapshots are not supported (raw, data files).
    if img.data_file_path().is_some() {
        return 0;
    }
    let snaps = img.snapshots();
    if snaps.is_empty() {
        return 0;
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&snapshot_header());
    out.push('\n');
    for s in &snaps {
        out.push_str(&snapshot_row(s));
        out.push('\n');
    }
    print!("{out}");
    0
}

fn change(ctx: &Ctx, img: &Image, action: &Action, fmt: Option<&str>) -> u8 {
    let qcow2 = img.format() == Format::Qcow2;
    let data_file = img.data_file_path().is_some();
    let result = match action {
        Action::List => return 0,
        // Without a name (the long options) QEMU applies "(null)", and crashes
        // creating or deleting.
        Action::Create(None) | Action::Delete(None) => {
            Err("a snapshot name is required".to_string())
        }
        Action::Create(Some(name)) => if !qcow2 || data_file {
            Err("Operation not supported".to_string())
        } else {
            img.create_snapshot(name)
                .map(|_| ())
                .map_err(|e| reason(&e))
        }
        .map_err(|r| format!("Could not create snapshot '{name}': {r}")),
        Action::Apply(id) => {
            let id = id.as_deref().unwrap_or("(null)");
            let r = if !qcow2 {
                // QEMU's fallback reopens the file through the raw driver: its
                // warning about the probed format comes once more.
                warn_probed_raw(fmt, img);
                Err("Block driver does not support snapshots".to_string())
            } else if data_file {
                Err("Failed to load snapshot: Operation not supported".to_string())
            } else if !img.bitmaps().is_empty() {
                Err("Device has active dirty bitmaps".to_string())
            } else if oxcow::engine::snapshot::find_snapshot(&img.snapshots(), id).is_none() {
                Err("Failed to load snapshot: No such file or directory".to_string())
            } else {
                img.apply_snapshot(id)
                    .map_err(|e| format!("Failed to load snapshot: {}", reason(&e)))
            };
            r.map_err(|r| format!("Could not apply snapshot '{id}': {r}"))
        }
        Action::Delete(Some(name)) => {
            // qemu-img finds the snapshot by name only, then deletes that one.
            let snaps = if qcow2 && !data_file {
                img.snapshots()
            } else {
                Vec::new()
            };
            match snaps.iter().find(|s| s.name == *name) {
                None => Err(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                )),
                Some(s) => img
                    .delete_snapshot(&s.id)
                    .map(|_| ())
                    .map_err(|e| format!("Could not delete snapshot '{name}': {}", reason(&e))),
            }
        }
    };
    match result {
        Ok(()) => 0,
        Err(msg) => {
            ctx.error(msg);
            1
        }
    }
}

/// The library's error as the strerror-like reason QEMU prints.
fn reason(e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Io(io) => common::io_reason(io),
        other => other.to_string(),
    }
}
