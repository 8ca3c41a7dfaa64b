//! `dd [-f fmt] [-O output_fmt] [-U] [bs=block_size] [count=blocks] [skip=blocks]
//! if=input of=output`: qemu-img's img_dd. The output is (re)created with the copied
//! size and every byte is written, as qemu-img does (no sparse detection); the copy
//! runs in large pieces on worker threads, which gives the same bytes as qemu-img's
//! block-by-block loop.

use crate::common::{io_reason, Ctx};
use crate::copyopts::{
    cvtnum, cvtnum_full, image_opts_refusal, next_option, object_unsupported, qemu_knows_format,
    unsupported_output_format,
};
use crate::pool::{run_ordered, worker_count};
use crate::qopt::{long, Getopt, LongOpt};
use crate::source::{error_reason, Source, SECTOR};
use std::os::unix::fs::FileExt;

const CMD: &str = "dd";

/// Bytes per copy request (a whole number of blocks, at least one).
const CHUNK: u64 = 4 << 20;

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("output-format", true, "O"),
    long("force-share", false, "U"),
    long("object", true, "object"),
];

const HELP: &str = "Usage:
Copy input to output with optional format conversion.  Usage:

  PROG dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify format for INPUT explicitly
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default raw)
  -U, --force-share
     open images in shared mode for concurrent access
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  if=INPUT
     input file name (or image specification with --image-opts)
  of=OUTPUT
     output file name to create

";

struct Dd {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut fmt: Option<String> = None;
    let mut out_fmt = "raw".to_string();
    let mut image_opts = false;
    let mut g = Getopt::new(args, "hf:O:U", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => fmt = Some(arg),
            "image-opts" => image_opts = true,
            "O" => out_fmt = arg,
            "U" => {}
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    let mut dd = Dd {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for operand in g.operands() {
        let Some((key, value)) = operand.split_once('=') else {
            ctx.error(format!("unrecognized operand {operand}"));
            return 1;
        };
        let ok = match key {
            "bs" => cvtnum_full(ctx, "bs", value, true, 1, i32::MAX as u64)
                .map(|v| dd.bs = v)
                .is_some(),
            "count" => cvtnum(ctx, "count", value, false)
                .map(|v| dd.count = Some(v))
                .is_some(),
            "if" => {
                dd.input = Some(value.to_string());
                true
            }
            "of" => {
                dd.output = Some(value.to_string());
                true
            }
            "skip" => cvtnum(ctx, "skip", value, false)
                .map(|v| dd.skip = Some(v))
                .is_some(),
            _ => {
                ctx.error(format!("unrecognized operand {key}"));
                false
            }
        };
        if !ok {
            return 1;
        }
    }
    let (Some(input), Some(output)) = (dd.input.clone(), dd.output.clone()) else {
        ctx.error("Must specify both input and output files");
        return 1;
    };
    if image_opts {
        ctx.error(image_opts_refusal(fmt.is_some(), &input));
        return 1;
    }
    let src = match Source::open(&input, fmt.as_deref()) {
        Ok(s) => s,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    if out_fmt != "raw" {
        if qemu_knows_format(&out_fmt) {
            ctx.error(unsupported_output_format(&out_fmt));
        } else {
            ctx.error("Unknown file format");
        }
        return 1;
    }
    copy(ctx, &dd, &src, &input, &output)
}

fn copy(ctx: &Ctx, dd: &Dd, src: &Source, input: &str, output: &str) -> u8 {
    let bs = dd.bs;
    let mut size = src.len;
    if let Some(count) = dd.count {
        if count <= i64::MAX as u64 / bs && count * bs < size {
            size = count * bs;
        }
    }
    let skip_past_end = match dd.skip {
        Some(skip) => skip > i64::MAX as u64 / bs || size < bs * skip,
        None => false,
    };
    let start = if skip_past_end {
        size
    } else {
        dd.skip.unwrap_or(0) * bs
    };
    let out_size = size - start;
    let file = match create_output(output, out_size) {
        Ok(f) => f,
        Err(e) => {
            ctx.error(format!(
                "{output}: error while creating output image: Could not create '{output}': {}",
                io_reason(&e)
            ));
            return 1;
        }
    };
    if skip_past_end {
        ctx.error(format!("{input}: cannot skip to specified offset"));
    }
    let chunk = (CHUNK / bs).max(1) * bs;
    let mut pos = start;
    let threads = worker_count(4);
    let mut code = 0u8;
    let _ = run_ordered(
        threads,
        threads * 2,
        || {
            if pos >= size {
                return Ok::<_, ()>(None);
            }
            let n = chunk.min(size - pos);
            let job = (pos, n);
            pos += n;
            Ok(Some(job))
        },
        Vec::<u8>::new,
        |buf: &mut Vec<u8>, (at, n): (u64, u64)| -> Result<(), String> {
            buf.resize(n as usize, 0);
            src.read(buf, at).map_err(|e| {
                format!(
                    "error while reading from input image file: {}",
                    error_reason(&e)
                )
            })?;
            file.write_all_at(buf, at - start).map_err(|e| {
                format!(
                    "error while writing to output image file: {}",
                    io_reason(&e)
                )
            })
        },
        |r: Result<(), String>| match r {
            Ok(()) => Ok(true),
            Err(msg) => {
                ctx.error(msg);
                code = 1;
                Ok(false)
            }
        },
    );
    code
}

/// Creates the raw output as qemu's file driver does: truncated, sized in whole
/// sectors, first block allocated.
fn create_output(path: &str, size: u64) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let size = size.div_ceil(SECTOR) * SECTOR;
    f.set_len(0)?;
    f.set_len(size)?;
    let first = size.min(4096) as usize;
    if first > 0 {
        f.write_all_at(&vec![0u8; first], 0)?;
    }
    // Reopen for the copy, as qemu-img does: ext4 flushes a file truncated to zero
    // when it is closed, which would make the end of the copy wait for the disk.
    drop(f);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}
