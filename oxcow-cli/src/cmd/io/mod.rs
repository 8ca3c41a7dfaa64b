//! `oxcow io`: qemu-io's command language over the oxcow library, so that scripts
//! written for qemu-io (10.0) run unchanged. Invoked as `qemu-io` (through a symlink)
//! it names itself so in every message and in its prompt.
//!
//! The command line takes qemu-io's options; commands come from `-c` (in order, up to
//! a `quit`) or, without `-c`, from standard input, one a line, after a "qemu-io> "
//! prompt (printed whether or not standard input is a terminal, as qemu-io does; its
//! scripts filter it). Each command prints exactly what qemu-io prints, on the same
//! stream; the exit status is 1 when any command failed.
//!
//! Asynchronous requests (`aio_read`, `aio_write`) run synchronously, but their
//! completion report is held back until qemu-io would have printed it: at the next
//! command that waits for I/O, at `aio_flush`, before the next line of standard input
//! is read, or when the program ends. (In qemu-io the moment depends on when the
//! request happens to finish; scripts use aio_flush.)
//!
//! Not emulated: the VM state area (`read -b`, `write -b` fail with ENOTSUP),
//! snapshot mode (-s) and copy-on-read (-C), which are refused, `--image-opts`,
//! blkdebug breakpoints (`break`, `remove_break` and `resume` fail as on any plain
//! image; `wait_break`, which would wait forever, fails at once) and zoned devices.

mod args;
mod misc;
mod out;
mod rw;
mod table;

use args::{EINVAL, EPERM};
use out::Out;
use oxcow::{BlockDevice, Format, Image};
use std::io::BufRead;
use table::CmdInfo;

/// How an image is opened: what qemu-io's -r, -t, -d, -n, -i and -k choose.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub read_only: bool,
    /// The write cache is off (qemu-io's default): every write is flushed before it
    /// completes, as QEMU does by adding FUA to each write.
    pub writethrough: bool,
    /// cache=unsafe: flushes are not needed (oxcow flushes anyway; no difference but
    /// durability against power loss).
    pub no_flush: bool,
    /// O_DIRECT (cache=none/directsync, -n): oxcow's file I/O does not bypass the page
    /// cache, which changes nothing a command can observe; it matters only for the
    /// aio=native check below.
    pub direct: bool,
    /// discard=unmap (qemu-io's default): discards and `write -z -u` free clusters;
    /// with discard=ignore they are accepted and do nothing.
    pub unmap: bool,
    /// aio=native (-k, -i native). The kind of asynchronous I/O makes no difference to
    /// oxcow, which does its I/O synchronously; QEMU's refusal of aio=native without
    /// cache.direct is kept.
    pub native_aio: bool,
    /// -U: oxcow takes no image locks, but QEMU allows sharing only read-only.
    pub force_share: bool,
}

impl Default for Mode {
    fn default() -> Self {
        Mode {
            read_only: false,
            writethrough: true,
            no_flush: false,
            direct: false,
            unmap: true,
            native_aio: false,
            force_share: false,
        }
    }
}

impl Mode {
    /// `bdrv_parse_cache_mode()`.
    pub fn set_cache(&mut self, mode: &str) -> bool {
        let (direct, writethrough, no_flush) = match mode {
            "off" | "none" => (true, false, false),
            "directsync" => (true, true, false),
            "writeback" => (false, false, false),
            "unsafe" => (false, false, true),
            "writethrough" => (false, true, false),
            _ => return false,
        };
        self.direct = direct;
        self.writethrough = writethrough;
        self.no_flush = no_flush;
        true
    }

    /// `bdrv_parse_discard_flags()`.
    pub fn set_discard(&mut self, mode: &str) -> bool {
        match mode {
            "off" | "ignore" => self.unmap = false,
            "on" | "unmap" => self.unmap = true,
            _ => return false,
        }
        true
    }

    /// -t, -d or -i with its argument; the error is QEMU's message.
    pub fn set(&mut self, opt: &str, arg: &str) -> Result<(), String> {
        let (ok, what) = match opt {
            "t" => (self.set_cache(arg), "cache"),
            "d" => (self.set_discard(arg), "discard"),
            _ => (self.set_aio(arg), "aio"),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("Invalid {what} option: {arg}"))
        }
    }

    /// `bdrv_parse_aio()`.
    pub fn set_aio(&mut self, mode: &str) -> bool {
        match mode {
            "native" => self.native_aio = true,
            "threads" | "io_uring" => self.native_aio = false,
            _ => return false,
        }
        true
    }
}

/// The session: the open image and everything the commands share.
pub struct State {
    pub prog: String,
    pub img: Option<Image>,
    pub mode: Mode,
    pub out: Out,
    /// Completion reports held back (see the module documentation).
    pending: Vec<String>,
    pub quit: bool,
    /// Something was written since the last flush (a flush then waits for I/O).
    pub dirty: bool,
    /// The image was probed as raw and opened for writing: QEMU then refuses writes
    /// that would make its first sector probe as another format.
    pub probed_raw: bool,
}

impl State {
    fn new(prog: &str) -> State {
        State {
            prog: prog.to_string(),
            img: None,
            mode: Mode::default(),
            out: Out::new(),
            pending: Vec::new(),
            quit: false,
            dirty: false,
            probed_raw: false,
        }
    }

    /// printf to standard output.
    pub fn print(&mut self, s: &str) {
        self.out.put(s);
    }

    /// fprintf to standard error (unbuffered, no prefix).
    pub fn eprint(&mut self, s: &str) {
        eprint!("{s}");
    }

    /// QEMU's `error_report()`: "PROG: MSG" on standard error.
    pub fn error_report(&mut self, msg: &str) {
        eprintln!("{}: {msg}", self.prog);
    }

    /// Holds back the completion report of an asynchronous request.
    pub fn defer(&mut self, text: String) {
        self.pending.push(text);
    }

    /// The main loop runs: every held-back completion is reported, in the order the
    /// requests were made (in QEMU, in the order they happen to finish).
    pub fn poll(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            self.out.put(&p);
        }
    }

    /// Opens `name` as qemu-io's `openfile()` does; false (after the message) when it
    /// cannot be opened.
    pub fn open(&mut self, name: Option<&str>, mode: Mode, format: Option<&str>) -> bool {
        if self.img.is_some() {
            self.error_report("file open already, try 'help close'");
            return false;
        }
        let Some(name) = name else {
            self.error_report("can't open: A block device must be specified for \"file\"");
            return false;
        };
        if mode.force_share && !mode.read_only {
            self.error_report(&format!(
                "can't open device {name}: force-share=on can only be used with read-only images"
            ));
            return false;
        }
        if mode.native_aio && !mode.direct {
            self.error_report(&format!(
                "can't open device {name}: aio=native was specified, but it requires cache.direct=on, which was not specified."
            ));
            return false;
        }
        // Opening a directory for writing fails before the file driver looks at it.
        if !mode.read_only && std::path::Path::new(name).is_dir() {
            self.error_report(&format!(
                "can't open device {name}: Could not open '{name}': Is a directory"
            ));
            return false;
        }
        let opts = oxcow::OpenOptions {
            writable: !mode.read_only,
            ..Default::default()
        };
        match crate::common::open_image(name, format, &opts) {
            Ok(img) => {
                self.probed_raw = format.is_none() && is_raw(&img) && !mode.read_only;
                if self.probed_raw {
                    self.eprint(&format!(
                        "WARNING: Image format was not specified for '{name}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.
"
                    ));
                }
                if let Some(q) = img.qcow2() {
                    let ctx = crate::common::Ctx {
                        prog: self.prog.clone(),
                    };
                    super::info::warn_stale_bitmaps(&ctx, q.meta());
                }
                self.img = Some(img);
                self.mode = mode;
                self.dirty = false;
                true
            }
            Err(msg) => {
                // qemu-img's "Could not open 'NAME': " is qemu-io's "can't open device NAME: ".
                let prefix = format!("Could not open '{name}': ");
                let reason = msg.strip_prefix(&prefix).unwrap_or(&msg);
                self.error_report(&format!("can't open device {name}: {reason}"));
                false
            }
        }
    }

    /// Runs one command line (qemu-io's `qemuio_command()`); negative on failure.
    fn command_line(&mut self, line: &str) -> i32 {
        // breakline(): words are separated by single spaces; empty words vanish.
        let argv: Vec<String> = line
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        let Some(name) = argv.first() else {
            return 0;
        };
        let Some(ct) = table::find(name) else {
            self.eprint(&format!("command \"{name}\" not found\n"));
            return -EINVAL;
        };
        self.command(ct, &argv)
    }

    /// qemu-io's `command()`: the checks every command shares, then the command.
    fn command(&mut self, ct: &CmdInfo, argv: &[String]) -> i32 {
        if ct.flags & table::GLOBAL == 0 && ct.flags & table::NOFILE_OK == 0 && self.img.is_none() {
            self.eprint("no file open, try 'help open'\n");
            return -EINVAL;
        }
        let argc = argv.len() as i32 - 1;
        if argc < ct.argmin || (ct.argmax != -1 && argc > ct.argmax) {
            let cmd = &argv[0];
            let msg = if ct.argmax == -1 {
                format!(
                    "bad argument count {argc} to {cmd}, expected at least {} arguments\n",
                    ct.argmin
                )
            } else if ct.argmin == ct.argmax {
                format!(
                    "bad argument count {argc} to {cmd}, expected {} arguments\n",
                    ct.argmin
                )
            } else {
                format!(
                    "bad argument count {argc} to {cmd}, expected between {} and {} arguments\n",
                    ct.argmin, ct.argmax
                )
            };
            self.eprint(&msg);
            return -EINVAL;
        }
        if ct.perm_write && self.img.is_some() && self.mode.read_only {
            self.error_report("Block node is read-only");
            return -EPERM;
        }
        (ct.func)(self, argv)
    }

    /// Prints a command's usage line (`qemuio_command_usage()`); returns -EINVAL.
    pub fn usage(&mut self, name: &str) -> i32 {
        if let Some(ct) = table::find(name) {
            let line = format!("{} {} -- {}\n", ct.name, ct.args.unwrap_or(""), ct.oneline);
            self.print(&line);
        }
        -EINVAL
    }

    /// The length of the disk as QEMU sees it: a raw file counts in whole 512-byte
    /// sectors (the bytes past its end read as zeros).
    pub fn disk_len(&self) -> u64 {
        let img = self.image();
        if is_raw(img) {
            img.size().next_multiple_of(512)
        } else {
            img.size()
        }
    }

    /// The image, for commands that run only with one open.
    pub fn image(&self) -> &Image {
        match &self.img {
            Some(i) => i,
            // command() refuses such commands before they run.
            None => unreachable!("command without an open image"),
        }
    }
}

/// `oxcow io ARGS...`.
pub fn run(ctx: &crate::common::Ctx, args: &[String]) -> u8 {
    run_as(&format!("{} io", ctx.prog), args)
}

fn usage_text(name: &str) -> String {
    format!(
        "Usage: {name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{name} -c help' for information on available commands.

oxcow implements qemu-io's commands over its own qcow2 and raw drivers.
"
    )
}

const LONGS: &[crate::qopt::LongOpt] = {
    use crate::qopt::long;
    &[
        long("help", false, "h"),
        long("version", false, "V"),
        long("cmd", true, "c"),
        long("format", true, "f"),
        long("read-only", false, "r"),
        long("snapshot", false, "s"),
        long("nocache", false, "n"),
        long("copy-on-read", false, "C"),
        long("misalign", false, "m"),
        long("native-aio", false, "k"),
        long("aio", true, "i"),
        long("discard", true, "d"),
        long("cache", true, "t"),
        long("trace", true, "T"),
        long("object", true, "object"),
        long("image-opts", false, "image-opts"),
        long("force-share", false, "U"),
    ]
};

/// qemu-io's `main()` under the program name `prog`.
pub fn run_as(prog: &str, args: &[String]) -> u8 {
    let mut st = State::new(prog);
    let mut mode = Mode::default();
    let mut format: Option<String> = None;
    let mut cmds: Vec<String> = Vec::new();
    let mut g = crate::qopt::Getopt::new(args, "hVc:d:f:rsnCmki:t:T:U", LONGS);
    while let Some(o) = g.next_opt() {
        let o = match o {
            Ok(o) => o,
            Err(e) => {
                st.error_report(&e);
                st.print(&usage_text(prog));
                st.out.flush();
                return 1;
            }
        };
        let arg = o.arg.unwrap_or_default();
        match o.id.as_str() {
            "c" => cmds.push(arg),
            "f" => format = Some(arg),
            "r" => mode.read_only = true,
            "n" => {
                mode.direct = true;
                mode.writethrough = false;
            }
            "t" | "d" | "i" => {
                if let Err(msg) = mode.set(&o.id, &arg) {
                    st.error_report(&msg);
                    return 1;
                }
            }
            "k" => mode.native_aio = true,
            "U" => mode.force_share = true,
            // Buffer alignment, tracing and secrets do not exist in oxcow: the
            // options are accepted and change nothing.
            "m" | "T" | "object" => {}
            "s" => {
                st.error_report("-s (snapshot mode) is not supported by oxcow");
                return 1;
            }
            "C" => {
                st.error_report("-C (copy-on-read) is not supported by oxcow");
                return 1;
            }
            "image-opts" => {
                st.error_report("--image-opts is not supported by oxcow");
                return 1;
            }
            "V" => {
                st.print(&format!(
                    "{prog} version {} (oxcow)\nCopyright (c) the oxcow developers\n",
                    env!("CARGO_PKG_VERSION")
                ));
                st.out.flush();
                return 0;
            }
            "h" => {
                st.print(&usage_text(prog));
                st.out.flush();
                return 0;
            }
            _ => {}
        }
    }
    let files = g.operands().to_vec();
    if files.len() > 1 {
        st.print(&usage_text(prog));
        st.out.flush();
        return 1;
    }
    if let Some(f) = files.first() {
        if !st.open(Some(f), mode, format.as_deref()) {
            st.out.flush();
            return 1;
        }
    }
    let ret = if cmds.is_empty() {
        stdin_loop(&mut st)
    } else {
        let mut last_error = 0;
        for c in &cmds {
            if st.quit {
                break;
            }
            let r = st.command_line(c);
            if r < 0 {
                last_error = r;
            }
        }
        last_error
    };
    // bdrv_drain_all(), then closing the image flushes it.
    st.poll();
    st.img = None;
    st.out.flush();
    u8::from(ret < 0)
}

/// Commands from standard input, after a prompt, until end of file or `quit`.
fn stdin_loop(st: &mut State) -> i32 {
    // SAFETY: isatty only queries the descriptor.
    let tty = unsafe { libc::isatty(0) == 1 };
    let prompt = format!("{}> ", st.prog);
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut last_error = 0;
    while !st.quit {
        st.print(&prompt);
        st.out.flush();
        // The main loop waits for input: outstanding requests complete meanwhile.
        st.poll();
        let Some(line) = fetch_line(&mut input) else {
            if tty {
                st.print("\n");
            }
            break;
        };
        let r = st.command_line(&line);
        if r < 0 {
            last_error = r;
        }
    }
    last_error
}

/// qemu-io's `fetchline_fgets()`: at most 1023 bytes, the newline removed.
fn fetch_line(input: &mut impl BufRead) -> Option<String> {
    const MAX: usize = 1023;
    let mut line = Vec::new();
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX - line.len();
        let take = buf.len().min(room);
        match buf[..take].iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                input.consume(i + 1);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            None => {
                line.extend_from_slice(&buf[..take]);
                input.consume(take);
                if line.len() == MAX {
                    break;
                }
            }
        }
    }
    if line.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(&line).into_owned())
    }
}

/// Whether the open image is a raw image.
pub fn is_raw(img: &Image) -> bool {
    img.format() == Format::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_like_fgets() {
        let mut r = std::io::Cursor::new(b"read 0 1\nlength".to_vec());
        assert_eq!(fetch_line(&mut r).as_deref(), Some("read 0 1"));
        assert_eq!(fetch_line(&mut r).as_deref(), Some("length"));
        assert_eq!(fetch_line(&mut r), None);
        let long = "x".repeat(1500) + "\n";
        let mut r = std::io::Cursor::new(long.into_bytes());
        assert_eq!(fetch_line(&mut r).map(|l| l.len()), Some(1023));
        assert_eq!(fetch_line(&mut r).map(|l| l.len()), Some(477));
        assert_eq!(fetch_line(&mut r), None);
    }
}
