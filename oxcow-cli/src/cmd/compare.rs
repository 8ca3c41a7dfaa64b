//! `compare [-f fmt] [-F fmt] [-T cache] [-p] [-q] [-s] [-U] filename1 filename2`:
//! qemu-img's img_compare. Both images are walked by block status; ranges both report
//! as zero are skipped, the rest is read (in parallel, results taken in order) and
//! compared 512-byte sector by sector. A shorter image compares as if padded with
//! zeros unless `-s` asks for equal sizes. Exit codes: 0 identical, 1 different (or a
//! usage error), 2 open errors, 3 block status errors, 4 read errors.

use crate::common::Ctx;
use crate::copyopts::{
    cache_mode_ok, image_opts_refusal, next_option, object_unsupported, usage_error,
};
use crate::pool::{is_zero, run_ordered, worker_count};
use crate::progress::Progress;
use crate::qopt::{long, Getopt, LongOpt};
use crate::source::{error_reason, Source, SECTOR};
use oxcow::BlockStatus;
use std::io::Write;

const CMD: &str = "compare";

/// Bytes compared per read request, as qemu-img's IO_BUF_SIZE.
const IO_BUF_SIZE: u64 = 2 << 20;

const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("a-format", true, "f"),
    long("b-format", true, "F"),
    long("left-format", true, "f"),
    long("right-format", true, "F"),
    long("image-opts", false, "image-opts"),
    long("strict", false, "s"),
    long("cache", true, "T"),
    long("force-share", false, "U"),
    long("progress", false, "p"),
    long("quiet", false, "q"),
    long("object", true, "object"),
];

const HELP: &str = "Usage:
Check if two images have the same contents.  Usage:

  PROG compare [--image-opts | [-f FMT] [-F FMT]] [-s]
        [-T CACHE] [-U] [--object OBJDEF] FILENAME1 FILENAME2

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show operation progress
  -f, --a-format FMT
     specify FILENAME1 image format explicitly
  -F, --b-format FMT
     specify FILENAME2 image format explicitly
  --image-opts
     indicates that FILENAMEs are complete image specifications
     instead of file names (incompatible with --a-format and --b-format)
  -s, --strict
     strict mode, also check if sizes are equal
  -T, --cache CACHE_MODE
     images caching mode (writeback)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME1, FILENAME2
     image files (or specifications) to compare

";

#[derive(Default)]
struct Opts {
    fmt1: Option<String>,
    fmt2: Option<String>,
    image_opts: bool,
    strict: bool,
    cache: Option<String>,
    progress: bool,
    quiet: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut o = Opts::default();
    let mut g = Getopt::new(args, "hf:F:sT:Upq", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        match id.as_str() {
            "f" => o.fmt1 = Some(arg),
            "F" => o.fmt2 = Some(arg),
            "image-opts" => o.image_opts = true,
            "s" => o.strict = true,
            "T" => o.cache = Some(arg),
            "U" => {}
            "p" => o.progress = true,
            "q" => o.quiet = true,
            "object" => return object_unsupported(ctx),
            _ => {}
        }
    }
    if o.quiet {
        o.progress = false;
    }
    let files = g.operands();
    if files.len() != 2 {
        return usage_error(ctx, CMD, "Expecting two image file names");
    }
    let mut progress = Progress::new(o.progress, 2.0);
    let code = compare(ctx, &o, &files[0], &files[1], &mut progress);
    progress.end();
    code
}

/// A result line on stdout unless `-q`.
fn say(quiet: bool, msg: &str) {
    if !quiet {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    }
}

fn open(ctx: &Ctx, o: &Opts, name: &str, fmt: Option<&str>) -> Option<Source> {
    if o.image_opts {
        ctx.error(image_opts_refusal(fmt.is_some(), name));
        return None;
    }
    match Source::open(name, fmt) {
        Ok(s) => Some(s),
        Err(msg) => {
            ctx.error(msg);
            None
        }
    }
}

/// The block status bits QEMU returns, for `-s` comparisons.
fn status_flags(st: &BlockStatus, offset: u64, total: u64) -> u32 {
    let mut f = 0;
    if st.data {
        f |= 0x01;
    }
    if st.zero {
        f |= 0x02;
    }
    if st.offset.is_some() && !st.compressed {
        f |= 0x04;
    }
    if st.present {
        f |= 0x10;
    }
    if offset + st.len == total {
        f |= 0x20;
    }
    if st.compressed {
        f |= 0x80;
    }
    f
}

/// One step of the walk, in image order.
enum Job {
    /// Nothing to read: both sides are zero (or the range is unallocated in the
    /// larger image's tail).
    Skip(u64),
    /// Read both images and compare.
    Both { offset: u64, len: u64 },
    /// Only image `which` (0 or 1) is allocated: it must read as zeros.
    One { which: usize, offset: u64, len: u64 },
    /// A result line to print before going on ("Warning: Image size mismatch!").
    Say(&'static str),
    /// Stop with this exit code after printing this line (stdout) or error (stderr).
    Stop {
        code: u8,
        out: Option<String>,
        err: Option<String>,
    },
}

enum Outcome {
    Advance(u64),
    Print(&'static str),
    /// Exit with code, stdout line, stderr message.
    Finish(u8, Option<String>, Option<String>),
}

struct Walker<'a> {
    src: [&'a Source; 2],
    strict: bool,
    offset: u64,
    common: u64,
    over: Option<usize>,
    warned: bool,
    done: bool,
}

impl Walker<'_> {
    fn next_job(&mut self) -> Option<Job> {
        if self.done {
            return None;
        }
        if self.offset < self.common {
            return Some(self.common_job());
        }
        let Some(w) = self.over else {
            self.done = true;
            return None;
        };
        if !self.warned {
            self.warned = true;
            return Some(Job::Say("Warning: Image size mismatch!"));
        }
        let s = self.src[w];
        if self.offset >= s.len {
            self.done = true;
            return None;
        }
        let st = match s.status(self.offset, s.len - self.offset) {
            Ok(st) => st,
            Err(_) => return Some(self.fail_status(w)),
        };
        let offset = self.offset;
        self.offset += chunk_of(&st, IO_BUF_SIZE, true);
        if st.present && !st.zero {
            Some(Job::One {
                which: w,
                offset,
                len: self.offset - offset,
            })
        } else {
            Some(Job::Skip(self.offset - offset))
        }
    }

    fn fail_status(&mut self, which: usize) -> Job {
        self.done = true;
        Job::Stop {
            code: 3,
            out: None,
            err: Some(format!(
                "Sector allocation test failed for {}",
                self.src[which].name
            )),
        }
    }

    fn common_job(&mut self) -> Job {
        let offset = self.offset;
        let mut st = [None, None];
        for (i, s) in self.src.iter().enumerate() {
            match s.status(offset, s.len - offset) {
                Ok(x) => st[i] = Some(x),
                Err(_) => return self.fail_status(i),
            }
        }
        let (Some(a), Some(b)) = (st[0], st[1]) else {
            return self.fail_status(0);
        };
        let mut chunk = a.len.min(b.len).max(1);
        if self.strict
            && status_flags(&a, offset, self.src[0].len)
                != status_flags(&b, offset, self.src[1].len)
        {
            self.done = true;
            return Job::Stop {
                code: 1,
                out: Some(format!(
                    "Strict mode: Offset {offset} block status mismatch!"
                )),
                err: None,
            };
        }
        let job = if a.zero && b.zero {
            Job::Skip(chunk)
        } else if a.present == b.present {
            if a.present {
                chunk = chunk.min(IO_BUF_SIZE);
                Job::Both { offset, len: chunk }
            } else {
                Job::Skip(chunk)
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            Job::One {
                which: if a.present { 0 } else { 1 },
                offset,
                len: chunk,
            }
        };
        self.offset += chunk;
        job
    }
}

/// The length a status answer covers, capped to `cap` when the range is read.
fn chunk_of(st: &BlockStatus, cap: u64, read: bool) -> u64 {
    let n = st.len.max(1);
    if read && st.present && !st.zero {
        n.min(cap)
    } else {
        n
    }
}

/// The offset of the first 512-byte sector (counted from the start of `buf`) that is
/// not all zeros.
fn find_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR as usize)
        .position(|c| !is_zero(c))
        .map(|i| i * SECTOR as usize)
}

/// The first sector (from the start of the buffers) where they differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR as usize)
}

fn compare(ctx: &Ctx, o: &Opts, name1: &str, name2: &str, progress: &mut Progress) -> u8 {
    if let Some(c) = &o.cache {
        if !cache_mode_ok(ctx, "source cache", c) {
            return 2;
        }
    }
    let Some(s1) = open(ctx, o, name1, o.fmt1.as_deref()) else {
        return 2;
    };
    let Some(s2) = open(ctx, o, name2, o.fmt2.as_deref()) else {
        return 2;
    };
    let (len1, len2) = (s1.len, s2.len);
    let common = len1.min(len2);
    let base = len1.max(len2);
    progress.print(0.0, 100);
    if o.strict && len1 != len2 {
        say(o.quiet, "Strict mode: Image size mismatch!");
        return 1;
    }
    let over = match len1.cmp(&len2) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(0),
        std::cmp::Ordering::Less => Some(1),
    };
    let srcs = [&s1, &s2];
    let mut walker = Walker {
        src: srcs,
        strict: o.strict,
        offset: 0,
        common,
        over,
        warned: false,
        done: false,
    };
    let threads = worker_count(4);
    let mut code = 0u8;
    let quiet = o.quiet;
    let base_f = base as f32;
    let result = run_ordered(
        threads,
        threads * 2,
        || Ok::<_, ()>(walker.next_job()),
        || (Vec::<u8>::new(), Vec::<u8>::new()),
        |bufs: &mut (Vec<u8>, Vec<u8>), job: Job| -> Outcome {
            match job {
                Job::Skip(n) => Outcome::Advance(n),
                Job::Say(m) => Outcome::Print(m),
                Job::Stop { code, out, err } => Outcome::Finish(code, out, err),
                Job::Both { offset, len } => {
                    let n = len as usize;
                    bufs.0.resize(n, 0);
                    bufs.1.resize(n, 0);
                    for (i, buf) in [&mut bufs.0, &mut bufs.1].into_iter().enumerate() {
                        if let Err(e) = srcs[i].read(&mut buf[..n], offset) {
                            return Outcome::Finish(
                                4,
                                None,
                                Some(format!(
                                    "Error while reading offset {offset} of {}: {}",
                                    srcs[i].name,
                                    error_reason(&e)
                                )),
                            );
                        }
                    }
                    match first_difference(&bufs.0[..n], &bufs.1[..n]) {
                        Some(at) => Outcome::Finish(
                            1,
                            Some(format!(
                                "Content mismatch at offset {}!",
                                offset + at as u64
                            )),
                            None,
                        ),
                        None => Outcome::Advance(len),
                    }
                }
                Job::One { which, offset, len } => {
                    let n = len as usize;
                    bufs.0.resize(n, 0);
                    if let Err(e) = srcs[which].read(&mut bufs.0[..n], offset) {
                        return Outcome::Finish(
                            4,
                            None,
                            Some(format!(
                                "Error while reading offset {offset} of {}: {}",
                                srcs[which].name,
                                error_reason(&e)
                            )),
                        );
                    }
                    match find_nonzero(&bufs.0[..n]) {
                        Some(at) => Outcome::Finish(
                            1,
                            Some(format!(
                                "Content mismatch at offset {}!",
                                offset + at as u64
                            )),
                            None,
                        ),
                        None => Outcome::Advance(len),
                    }
                }
            }
        },
        |r: Outcome| {
            match r {
                Outcome::Advance(n) => progress.print((n as f32 / base_f) * 100.0, 100),
                Outcome::Print(m) => say(quiet, m),
                Outcome::Finish(c, out, err) => {
                    if let Some(m) = out {
                        say(quiet, &m);
                    }
                    if let Some(m) = err {
                        ctx.error(m);
                    }
                    code = c;
                    return Ok(false);
                }
            }
            Ok(true)
        },
    );
    if result.is_err() {
        return 3;
    }
    if code != 0 {
        return code;
    }
    say(quiet, "Images are identical.");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_granular_offsets() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        b[1500] = 1;
        assert_eq!(first_difference(&a, &b), Some(1024));
        assert_eq!(find_nonzero(&b), Some(1024));
        assert_eq!(find_nonzero(&a), None);
        assert_eq!(first_difference(&a[..700], &b[..700]), None);
    }
}
