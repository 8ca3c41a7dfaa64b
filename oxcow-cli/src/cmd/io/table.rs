//! qemu-io's command table: names, short names, argument counts, usage lines and help
//! texts as qemu-io 10.0 has them, and the `help` command over it.

use super::{misc, rw, State};

/// Runs without an open image and without the usual checks (help, quit).
pub const GLOBAL: u8 = 1;
/// Runs without an open image.
pub const NOFILE_OK: u8 = 2;

pub struct CmdInfo {
    pub name: &'static str,
    pub altname: Option<&'static str>,
    pub func: fn(&mut State, &[String]) -> i32,
    pub argmin: i32,
    pub argmax: i32,
    pub flags: u8,
    /// Needs the image open for writing ("Block node is read-only" otherwise).
    pub perm_write: bool,
    pub args: Option<&'static str>,
    pub oneline: &'static str,
    pub help: Option<&'static str>,
}

const fn cmd(
    name: &'static str,
    func: fn(&mut State, &[String]) -> i32,
    oneline: &'static str,
) -> CmdInfo {
    CmdInfo {
        name,
        altname: None,
        func,
        argmin: 0,
        argmax: 0,
        flags: 0,
        perm_write: false,
        args: None,
        oneline,
        help: None,
    }
}

impl CmdInfo {
    const fn alt(mut self, a: &'static str) -> Self {
        self.altname = Some(a);
        self
    }
    const fn argc(mut self, min: i32, max: i32) -> Self {
        self.argmin = min;
        self.argmax = max;
        self
    }
    const fn flags(mut self, f: u8) -> Self {
        self.flags = f;
        self
    }
    const fn write(mut self) -> Self {
        self.perm_write = true;
        self
    }
    const fn args(mut self, a: &'static str) -> Self {
        self.args = Some(a);
        self
    }
    const fn help(mut self, h: &'static str) -> Self {
        self.help = Some(h);
        self
    }
}

/// Every command, sorted by name as qemu-io sorts its table.
pub static COMMANDS: &[CmdInfo] = &[
    cmd(
        "abort",
        misc::abort_f,
        "simulate a program crash using abort(3)",
    )
    .flags(NOFILE_OK),
    cmd(
        "aio_flush",
        rw::aio_flush_f,
        "completes all outstanding aio requests",
    ),
    cmd(
        "aio_read",
        rw::aio_read_f,
        "asynchronously reads a number of bytes",
    )
    .argc(2, -1)
    .args("[-Ciqrv] [-P pattern] off len [len..]")
    .help(AIO_READ_HELP),
    cmd(
        "aio_write",
        rw::aio_write_f,
        "asynchronously writes a number of bytes",
    )
    .argc(2, -1)
    .write()
    .args("[-Cfiqruz] [-P pattern] off len [len..]")
    .help(AIO_WRITE_HELP),
    cmd(
        "alloc",
        misc::alloc_f,
        "checks if offset is allocated in the file",
    )
    .alt("a")
    .argc(1, 2)
    .args("offset [count]"),
    cmd(
        "break",
        misc::break_f,
        "sets a breakpoint on event and tags the stopped request as tag",
    )
    .argc(2, 2)
    .args("event tag"),
    cmd("close", misc::close_f, "close the current open file").alt("c"),
    cmd(
        "discard",
        misc::discard_f,
        "discards a number of bytes at a specified offset",
    )
    .alt("d")
    .argc(2, -1)
    .write()
    .args("[-Cq] off len")
    .help(DISCARD_HELP),
    cmd(
        "flush",
        misc::flush_f,
        "flush all in-core file state to disk",
    )
    .alt("f"),
    cmd("help", help_f, "help for one or all commands")
        .alt("?")
        .argc(0, 1)
        .flags(GLOBAL)
        .args("[command]"),
    cmd(
        "info",
        misc::info_f,
        "prints information about the current file",
    )
    .alt("i"),
    cmd(
        "length",
        misc::length_f,
        "gets the length of the current file",
    )
    .alt("l"),
    cmd("map", misc::map_f, "prints the allocated areas of a file").args(""),
    cmd("open", misc::open_f, "open the file specified by path")
        .alt("o")
        .argc(1, -1)
        .flags(NOFILE_OK)
        .args("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]")
        .help(OPEN_HELP),
    cmd("quit", misc::quit_f, "exit the program")
        .alt("q")
        .argc(-1, -1)
        .flags(GLOBAL),
    cmd(
        "read",
        rw::read_f,
        "reads a number of bytes at a specified offset",
    )
    .alt("r")
    .argc(2, -1)
    .args("[-abCqrv] [-P pattern [-s off] [-l len]] off len")
    .help(READ_HELP),
    cmd(
        "readv",
        rw::readv_f,
        "reads a number of bytes at a specified offset",
    )
    .argc(2, -1)
    .args("[-Cqrv] [-P pattern] off len [len..]")
    .help(READV_HELP),
    cmd(
        "remove_break",
        misc::remove_break_f,
        "remove a breakpoint by tag",
    )
    .argc(1, 1)
    .args("tag"),
    cmd(
        "reopen",
        misc::reopen_f,
        "reopens an image with new options",
    )
    .argc(0, -1)
    .args("[(-r|-w)] [-c cache] [-o options]")
    .help(REOPEN_HELP),
    cmd(
        "resume",
        misc::resume_f,
        "resumes the request tagged as tag",
    )
    .argc(1, 1)
    .args("tag"),
    cmd("sigraise", misc::sigraise_f, "raises a signal")
        .argc(1, 1)
        .flags(NOFILE_OK)
        .args("signal")
        .help(SIGRAISE_HELP),
    cmd(
        "sleep",
        misc::sleep_f,
        "waits for the given value in milliseconds",
    )
    .argc(1, 1)
    .flags(NOFILE_OK),
    cmd(
        "truncate",
        misc::truncate_f,
        "truncates the current file at the given offset",
    )
    .alt("t")
    .argc(1, 3)
    .write()
    .args("[-m prealloc_mode] off"),
    cmd(
        "wait_break",
        misc::wait_break_f,
        "waits for the suspension of a request",
    )
    .argc(1, 1)
    .args("tag"),
    cmd(
        "write",
        rw::write_f,
        "writes a number of bytes at a specified offset",
    )
    .alt("w")
    .argc(2, -1)
    .write()
    .args("[-bcCfnqruz] [-P pattern | -s source_file] off len")
    .help(WRITE_HELP),
    cmd(
        "writev",
        rw::writev_f,
        "writes a number of bytes at a specified offset",
    )
    .argc(2, -1)
    .write()
    .args("[-Cfqr] [-P pattern] off len [len..]")
    .help(WRITEV_HELP),
    cmd(
        "zone_append",
        misc::zone_append_f,
        "append write a number of bytes at a specified offset",
    )
    .alt("zap")
    .argc(3, 4)
    .args("offset len [len..]"),
    cmd(
        "zone_close",
        misc::zone_close_f,
        "close a range of zones in zone block device",
    )
    .alt("zc")
    .argc(2, 2)
    .args("offset len"),
    cmd(
        "zone_finish",
        misc::zone_finish_f,
        "finish a range of zones in zone block device",
    )
    .alt("zf")
    .argc(2, 2)
    .args("offset len"),
    cmd(
        "zone_open",
        misc::zone_open_f,
        "explicit open a range of zones in zone block device",
    )
    .alt("zo")
    .argc(2, 2)
    .args("offset len"),
    cmd(
        "zone_report",
        misc::zone_report_f,
        "report zone information",
    )
    .alt("zrp")
    .argc(2, 2)
    .args("offset number"),
    cmd(
        "zone_reset",
        misc::zone_reset_f,
        "reset a zone write pointer in zone block device",
    )
    .alt("zrs")
    .argc(2, 2)
    .args("offset len"),
];

/// The command called `name` (or by that short name).
pub fn find(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

fn oneline(cmd: &str, ct: &CmdInfo) -> String {
    let mut s = format!("{cmd} ");
    if let Some(a) = ct.args {
        s.push_str(a);
        s.push(' ');
    }
    s.push_str("-- ");
    s.push_str(ct.oneline);
    s.push('\n');
    s
}

/// `help [command]`.
fn help_f(st: &mut State, argv: &[String]) -> i32 {
    let Some(name) = argv.get(1) else {
        let mut s: String = COMMANDS.iter().map(|c| oneline(c.name, c)).collect();
        s.push_str("\nUse 'help commandname' for extended help.\n");
        st.print(&s);
        return 0;
    };
    let Some(ct) = find(name) else {
        st.print(&format!("command {name} not found\n"));
        return -super::args::EINVAL;
    };
    let mut s = oneline(name, ct);
    if let Some(h) = ct.help {
        s.push_str(h);
    }
    st.print(&s);
    0
}

const READ_HELP: &str = "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

";

const READV_HELP: &str = "
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const WRITE_HELP: &str = "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

";

const WRITEV_HELP: &str = "
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

";

const AIO_READ_HELP: &str = "
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const AIO_WRITE_HELP: &str = "
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

";

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";

const REOPEN_HELP: &str = "
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

";

const SIGRAISE_HELP: &str = "
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where \"signal\" is the mandatory integer argument
 given to sigraise.

";

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_names_unique() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        assert_eq!(find("r").map(|c| c.name), Some("read"));
        assert_eq!(find("?").map(|c| c.name), Some("help"));
        assert!(find("exit").is_none());
    }
}
