//! The data commands: read, readv, write (plain, -z zeroes, -c compressed, -s from a
//! file), writev, and their asynchronous forms aio_read, aio_write, aio_flush.

use super::args::{
    cvtnum, cvtnum_error, getopt, parse_pattern, EINVAL, EIO, ENOTSUP, REQUEST_MAX_BYTES,
};
use super::out::{dump_buffer, report};
use super::State;
use oxcow::{BlockDevice, StatusKind};
use std::time::Instant;

/// The errno QEMU's block layer would return for a library error.
/// (A write refused because it would overwrite metadata also prints QEMU's
/// corruption notice, as qcow2_signal_corruption() does.)
pub fn errno_of(e: &oxcow::Error) -> i32 {
    use oxcow::Error as E;
    match e {
        E::Corrupt { what, .. } if what.starts_with(oxcow::engine::OVERLAP_MESSAGE) => {
            eprintln!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be \
                 suppressed"
            );
            EIO
        }
        E::Io(io) | E::Open { source: io, .. } => io.raw_os_error().unwrap_or(EIO),
        E::InvalidArgument(_) => EINVAL,
        E::Unsupported(_) => ENOTSUP,
        _ => EIO,
    }
}

/// C's `strerror()` for a (positive or negative) errno.
pub fn strerror(errno: i32) -> String {
    crate::common::io_reason(&std::io::Error::from_raw_os_error(errno.abs()))
}

/// `blk_check_byte_request()`: a request past the end of the disk fails with EIO.
fn check_request(st: &State, offset: u64, bytes: u64) -> Result<(), i32> {
    // After a metadata overlap QEMU has taken the medium away.
    if st.image().qcow2().is_some_and(|q| q.writes_stopped()) {
        return Err(-libc::ENOMEDIUM);
    }
    let size = st.disk_len();
    if bytes > size || offset > size - bytes {
        return Err(-EIO);
    }
    Ok(())
}

/// Whether reading the range does I/O on a file: only then does QEMU wait, running
/// the completions of earlier asynchronous requests meanwhile.
fn reads_data(st: &State, mut off: u64, len: u64) -> bool {
    let img = st.image();
    let end = off.saturating_add(len).min(img.size());
    if off.saturating_add(len) > st.disk_len() {
        return false;
    }
    while off < end {
        match oxcow::block_status(img, off, end - off) {
            Ok(s) if s.data => return true,
            Ok(s) if s.len > 0 => off += s.len,
            _ => return true,
        }
    }
    false
}

fn do_read(st: &mut State, buf: &mut [u8], offset: u64) -> Result<(), i32> {
    check_request(st, offset, buf.len() as u64)?;
    // The sector tail past the end of a raw file reads as zeros.
    let real = st.image().size();
    let n = real.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    if n == 0 {
        return Ok(());
    }
    st.image()
        .read_at(&mut buf[..n], offset)
        .map_err(|e| -errno_of(&e))
}

/// Whether a first sector would make QEMU probe the image as something other than
/// raw (the formats whose magic QEMU recognises in it).
fn probes_as_image(sector: &[u8]) -> bool {
    let be32 = |at: usize| {
        sector
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magics: [&[u8]; 6] = [
        b"QED\0",
        b"LUKS\xba\xbe",
        b"KDMV",
        b"COWD",
        b"conectix",
        b"vhdxfile",
    ];
    (sector.starts_with(b"QFI\xfb") && be32(4) >= 1) || magics.iter().any(|m| sector.starts_with(m))
}

/// QEMU's protection of an image probed as raw: a write that would make its first
/// sector look like another format's header is refused.
fn check_probed_write(st: &State, buf: &[u8], offset: u64) -> Result<(), i32> {
    if !st.probed_raw || offset >= 512 || buf.is_empty() {
        return Ok(());
    }
    let img = st.image();
    let mut sector = vec![0u8; 512];
    let n = img.size().min(512) as usize;
    img.read_at(&mut sector[..n], 0)
        .map_err(|e| -errno_of(&e))?;
    let o = offset as usize;
    let k = buf.len().min(512 - o);
    sector[o..o + k].copy_from_slice(&buf[..k]);
    if probes_as_image(&sector) {
        return Err(-libc::EPERM);
    }
    Ok(())
}

/// A finished write: flushed at once with FUA or when the write cache is off
/// (qemu-io's default), as QEMU's block layer does.
fn written(st: &mut State, fua: bool) -> Result<(), i32> {
    st.dirty = true;
    if fua || st.mode.writethrough {
        st.image().flush().map_err(|e| -errno_of(&e))?;
        st.dirty = false;
    }
    Ok(())
}

/// A write into the sector tail past the end of a raw file extends the file, as
/// QEMU's pwrite does.
fn grow_raw_file(st: &State, end: u64) -> Result<(), i32> {
    let img = st.image();
    if super::is_raw(img) && end > img.size() {
        img.resize(end, false, oxcow::Preallocation::Off)
            .map_err(|e| -errno_of(&e))?;
    }
    Ok(())
}

fn do_write(st: &mut State, buf: &[u8], offset: u64, fua: bool) -> Result<(), i32> {
    check_request(st, offset, buf.len() as u64)?;
    check_probed_write(st, buf, offset)?;
    grow_raw_file(st, offset + buf.len() as u64)?;
    if !buf.is_empty() {
        st.image()
            .write_at(buf, offset)
            .map_err(|e| -errno_of(&e))?;
    }
    written(st, fua)
}

/// Whether `off..off+len` is known to read as zeros (block status over the chain).
fn known_zero(st: &State, mut off: u64, len: u64) -> Result<bool, i32> {
    let img = st.image();
    let end = off + len;
    while off < end {
        let s = oxcow::block_status(img, off, end - off).map_err(|e| -errno_of(&e))?;
        if !s.zero || s.len == 0 {
            return Ok(false);
        }
        off += s.len;
    }
    Ok(true)
}

/// The next step of a zero write, as QEMU's block layer and qcow2 driver take it.
enum ZeroStep {
    /// Zero `start..end` with zero flags.
    Zero(u64, u64),
    /// A partial piece needing the slow fallback of writing zero bytes (refused
    /// with -n).
    Fallback(u64, u64),
    /// With -n, zero `start..mid`, then fail; otherwise zero `start..end`.
    ZeroThenFail(u64, u64, u64),
}

/// How QEMU carries out a zero write on a qcow2 v3 image
/// (`bdrv_co_do_pwrite_zeroes()`, `qcow2_co_pwrite_zeroes()`,
/// `qcow2_subcluster_zeroize()`): the request is cut at (sub)cluster boundaries into
/// a head, a middle and a tail, done in that order. A partial piece whose
/// (sub)cluster holds no data and otherwise already reads as zeros is widened to the
/// whole (sub)cluster, which then gets the zero flag (and so counts as allocated);
/// any other partial piece takes the slow fallback of writing zero bytes. With
/// extended L2 entries, part of a compressed cluster cannot take zero flags either.
/// Returns the step starting at `offset` of the request ending at `end`.
fn next_zero_step(st: &State, offset: u64, end: u64) -> Result<ZeroStep, i32> {
    let img = st.image();
    let Some(q) = img.qcow2() else {
        return Ok(ZeroStep::Zero(offset, end));
    };
    let cs = q.cluster_size();
    let ext = q.header().has_extended_l2();
    let g = if ext { cs / 32 } else { cs };
    let size = img.size();
    let partial_head = !offset.is_multiple_of(g);
    let e = if partial_head {
        end.min(offset.next_multiple_of(g))
    } else if end == size || end - offset < g {
        end
    } else {
        end - end % g
    };
    if partial_head || (!e.is_multiple_of(g) && e != size) {
        let gs = offset - offset % g;
        let ge = if e == size { e } else { e.next_multiple_of(g) };
        let ls = img.layer_status(gs, ge - gs).map_err(|e| -errno_of(&e))?;
        let fits = ls.kind != StatusKind::Data
            && known_zero(st, gs, offset - gs)?
            && known_zero(st, e, ge - e)?;
        return Ok(if fits {
            ZeroStep::Zero(gs, ge)
        } else {
            ZeroStep::Fallback(offset, e)
        });
    }
    if ext {
        let compressed = |at: u64| -> Result<bool, i32> {
            let c = at - at % cs;
            let ls = img
                .layer_status(c, cs.min(size - c))
                .map_err(|e| -errno_of(&e))?;
            Ok(ls.compressed)
        };
        // A partial cluster at either end of the aligned part.
        if !offset.is_multiple_of(cs) && compressed(offset)? {
            return Ok(ZeroStep::Fallback(offset, e));
        }
        let tail = e - e % cs;
        if e != size && !e.is_multiple_of(cs) && compressed(tail)? {
            return Ok(if tail <= offset {
                ZeroStep::Fallback(offset, e)
            } else {
                ZeroStep::ZeroThenFail(offset, tail, e)
            });
        }
    }
    Ok(ZeroStep::Zero(offset, e))
}

fn do_zeroes(
    st: &mut State,
    offset: u64,
    bytes: u64,
    unmap: bool,
    no_fallback: bool,
    fua: bool,
) -> Result<(), i32> {
    check_request(st, offset, bytes)?;
    // Zeroing the sector tail past the end of a raw file extends the file, but
    // unmapping it does not (it reads as zeros already).
    let unmap = unmap && st.mode.unmap;
    let bytes = if unmap {
        bytes.min(st.image().size().saturating_sub(offset))
    } else {
        grow_raw_file(st, offset + bytes)?;
        bytes
    };
    if bytes > 0 {
        let zero = |st: &State, s: u64, e: u64| {
            st.image()
                .write_zeroes(s, e - s, unmap)
                .map_err(|e| -errno_of(&e))
        };
        let v2 = st.image().qcow2().is_some_and(|q| q.header().version < 3);
        if v2 {
            // Version 2 has no zero flag: QEMU has only the slow fallback.
            if no_fallback {
                return Err(-ENOTSUP);
            }
            zero(st, offset, offset + bytes)?;
        } else {
            // Each step is decided once the previous one is done, as in QEMU.
            let end = offset + bytes;
            let mut pos = offset;
            while pos < end {
                pos = match next_zero_step(st, pos, end)? {
                    ZeroStep::Zero(s, e) => {
                        zero(st, s, e)?;
                        e
                    }
                    ZeroStep::Fallback(s, e) => {
                        if no_fallback {
                            return Err(-ENOTSUP);
                        }
                        zero(st, s, e)?;
                        e
                    }
                    ZeroStep::ZeroThenFail(s, mid, e) => {
                        if no_fallback {
                            zero(st, s, mid)?;
                            return Err(-ENOTSUP);
                        }
                        zero(st, s, e)?;
                        e
                    }
                };
            }
        }
    }
    written(st, fua)
}

/// `blk_pwrite_compressed()` on qcow2: whole clusters from a cluster boundary (or up
/// to the end of the disk), never over an allocated cluster.
fn do_write_compressed(st: &mut State, buf: &[u8], offset: u64) -> Result<(), i32> {
    check_request(st, offset, buf.len() as u64)?;
    let img = st.image();
    let Some(q) = img.qcow2() else {
        return Err(-ENOTSUP);
    };
    if q.header().has_data_file() {
        return Err(-ENOTSUP);
    }
    if buf.is_empty() {
        return Ok(());
    }
    let cs = q.cluster_size();
    let size = img.size();
    if !offset.is_multiple_of(cs)
        || (!(buf.len() as u64).is_multiple_of(cs) && offset + buf.len() as u64 != size)
    {
        return Err(-EINVAL);
    }
    for (i, chunk) in buf.chunks(cs as usize).enumerate() {
        let off = offset + i as u64 * cs;
        let ls = img
            .layer_status(off, chunk.len() as u64)
            .map_err(|e| -errno_of(&e))?;
        // Compression cannot overwrite anything: a cluster with a host offset fails.
        if ls.kind == StatusKind::Data || ls.offset.is_some() {
            return Err(-EIO);
        }
        q.write_compressed(chunk, off).map_err(|e| -errno_of(&e))?;
    }
    written(st, false)
}

/// A buffer of `len` bytes, or ENOMEM.
fn alloc_buf(len: u64, fill: u8) -> Result<Vec<u8>, i32> {
    let mut v = Vec::new();
    v.try_reserve_exact(len as usize)
        .map_err(|_| -libc::ENOMEM)?;
    v.resize(len as usize, fill);
    Ok(v)
}

/// Reports a bad option and the usage line; the command's return value.
fn bad_opt(st: &mut State, msg: &str, cmd: &str) -> i32 {
    st.eprint(msg);
    st.usage(cmd)
}

fn num(st: &mut State, arg: &str) -> Result<u64, i32> {
    cvtnum(arg).inspect_err(|&rc| st.print(&cvtnum_error(rc, arg)))
}

fn pattern(st: &mut State, arg: &str) -> Result<u8, i32> {
    parse_pattern(arg).map_err(|m| {
        st.print(&m);
        -EINVAL
    })
}

/// `read [-abCqrv] [-P pattern [-s off] [-l len]] off len`.
pub fn read_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "bCl:pP:qrs:v");
    let (mut bflag, mut cflag, mut qflag, mut vflag, mut rflag) =
        (false, false, false, false, false);
    let (mut pflag, mut sflag, mut lflag) = (false, false, false);
    let mut pat = 0u8;
    let (mut pattern_offset, mut pattern_count) = (0i64, 0i64);
    for item in o.items {
        let opt = match item {
            Ok(opt) => opt,
            Err(e) => return bad_opt(st, &e, "read"),
        };
        let arg = opt.arg.as_deref().unwrap_or("");
        match opt.id.as_str() {
            "b" => bflag = true,
            "C" => cflag = true,
            "l" => {
                lflag = true;
                match num(st, arg) {
                    Ok(v) => pattern_count = v as i64,
                    Err(rc) => return rc,
                }
            }
            "P" => {
                pflag = true;
                match pattern(st, arg) {
                    Ok(p) => pat = p,
                    Err(rc) => return rc,
                }
            }
            "q" => qflag = true,
            "r" => rflag = true,
            "s" => {
                sflag = true;
                match num(st, arg) {
                    Ok(v) => pattern_offset = v as i64,
                    Err(rc) => return rc,
                }
            }
            "v" => vflag = true,
            _ => {} // -p: ignored, as in qemu-io
        }
    }
    let [off_arg, count_arg] = o.operands.as_slice() else {
        return st.usage("read");
    };
    let offset = match num(st, off_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let count = match num(st, count_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    if count > REQUEST_MAX_BYTES {
        st.print(&format!(
            "length cannot exceed {REQUEST_MAX_BYTES}, given {count_arg}\n"
        ));
        return -EINVAL;
    }
    if !pflag && (lflag || sflag) {
        return st.usage("read");
    }
    if !lflag {
        pattern_count = count as i64 - pattern_offset;
    }
    if pattern_count < 0 || pattern_count.saturating_add(pattern_offset) > count as i64 {
        st.print("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    if bflag {
        if !offset.is_multiple_of(512) {
            st.print(&format!(
                "{offset} is not a sector-aligned value for 'offset'\n"
            ));
            return -EINVAL;
        }
        if !count.is_multiple_of(512) {
            st.print(&format!(
                "{count} is not a sector-aligned value for 'count'\n"
            ));
            return -EINVAL;
        }
        if rflag {
            st.print("I/O buffer registration is not supported when reading from vmstate\n");
            return -EINVAL;
        }
    }
    if reads_data(st, offset, count) {
        st.poll();
    }
    let t1 = Instant::now();
    let mut buf = Vec::new();
    let res = alloc_buf(count, 0xab).and_then(|b| {
        buf = b;
        if bflag {
            // The VM state area of qcow2 images is not implemented in oxcow.
            Err(-ENOTSUP)
        } else {
            do_read(st, &mut buf, offset)
        }
    });
    let t = t1.elapsed();
    if let Err(rc) = res {
        st.print(&format!("read failed: {}\n", strerror(rc)));
        return rc;
    }
    let mut ret = 0;
    if pflag {
        let (ps, pc) = (pattern_offset as usize, pattern_count as usize);
        if buf[ps..ps + pc].iter().any(|&b| b != pat) {
            st.print(&format!(
                "Pattern verification failed at offset {}, {} bytes\n",
                offset + pattern_offset as u64,
                pattern_count
            ));
            ret = -EINVAL;
        }
    }
    if qflag {
        return ret;
    }
    if vflag {
        let d = dump_buffer(&buf, offset);
        st.print(&d);
    }
    st.print(&report("read", t, offset, count, count, 1, cflag));
    ret
}

/// `create_iovec()`: the lengths of a vectored request; their sum.
fn iovec_len(st: &mut State, lens: &[String]) -> Result<u64, i32> {
    let mut count: u64 = 0;
    for arg in lens {
        let len = num(st, arg)?;
        if len > REQUEST_MAX_BYTES {
            st.print(&format!(
                "Argument '{arg}' exceeds maximum size {REQUEST_MAX_BYTES}\n"
            ));
            return Err(-EINVAL);
        }
        if count > REQUEST_MAX_BYTES - len {
            st.print(&format!(
                "The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}\n"
            ));
            return Err(-EINVAL);
        }
        count += len;
    }
    Ok(count)
}

/// Options shared by readv, writev, aio_read and aio_write.
#[derive(Default)]
struct VecOpts {
    cflag: bool,
    qflag: bool,
    vflag: bool,
    pflag: bool,
    pattern: Option<u8>,
    fua: bool,
    zflag: bool,
    unmap: bool,
    registered: bool,
}

/// Parses a vectored command's options; `Err` is the command's return value. `-i`
/// ends the command at once (qemu-io only counts an invalid request in its stats).
fn vec_opts(
    st: &mut State,
    argv: &[String],
    spec: &'static str,
    name: &str,
) -> Result<(VecOpts, Vec<String>), i32> {
    let o = getopt(argv, spec);
    let mut v = VecOpts::default();
    for item in o.items {
        let opt = match item {
            Ok(opt) => opt,
            Err(e) => return Err(bad_opt(st, &e, name)),
        };
        let arg = opt.arg.as_deref().unwrap_or("");
        match opt.id.as_str() {
            "C" => v.cflag = true,
            "q" => v.qflag = true,
            "v" => v.vflag = true,
            "r" => v.registered = true,
            "f" => v.fua = true,
            "u" => v.unmap = true,
            "z" => v.zflag = true,
            "P" => {
                // aio_write and writev take -P without remembering that they did.
                if name == "readv" || name == "aio_read" {
                    v.pflag = true;
                }
                v.pattern = Some(pattern(st, arg)?);
            }
            "i" => {
                let what = if name == "aio_read" { "read" } else { "write" };
                st.print(&format!("injecting invalid {what} request\n"));
                return Err(0);
            }
            _ => {}
        }
    }
    if o.operands.len() < 2 {
        return Err(st.usage(name));
    }
    Ok((v, o.operands))
}

/// What a vectored read prints: the pattern failure, the dump, the report.
fn readv_result(
    v: &VecOpts,
    buf: &[u8],
    offset: u64,
    t: std::time::Duration,
    failed_pattern: &mut bool,
) -> String {
    let mut s = String::new();
    if v.pflag && buf.iter().any(|&b| Some(b) != v.pattern) {
        s.push_str(&format!(
            "Pattern verification failed at offset {offset}, {} bytes\n",
            buf.len()
        ));
        *failed_pattern = true;
    }
    if v.qflag {
        return s;
    }
    if v.vflag {
        s.push_str(&dump_buffer(buf, offset));
    }
    let n = buf.len() as u64;
    s.push_str(&report("read", t, offset, n, n, 1, v.cflag));
    s
}

/// `readv [-Cqrv] [-P pattern] off len [len..]`.
pub fn readv_f(st: &mut State, argv: &[String]) -> i32 {
    let (v, ops) = match vec_opts(st, argv, "CP:qrv", "readv") {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let offset = match num(st, &ops[0]) {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let count = match iovec_len(st, &ops[1..]) {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    if reads_data(st, offset, count) {
        st.poll();
    }
    let t1 = Instant::now();
    let mut buf = Vec::new();
    let res = alloc_buf(count, 0xab).and_then(|b| {
        buf = b;
        do_read(st, &mut buf, offset)
    });
    let t = t1.elapsed();
    if let Err(rc) = res {
        st.print(&format!("readv failed: {}\n", strerror(rc)));
        return rc;
    }
    let mut failed = false;
    let s = readv_result(&v, &buf, offset, t, &mut failed);
    st.print(&s);
    if failed {
        -EINVAL
    } else {
        0
    }
}

/// `aio_read [-Ciqrv] [-P pattern] off len [len..]`: done at once, reported when
/// qemu-io would report its completion.
pub fn aio_read_f(st: &mut State, argv: &[String]) -> i32 {
    let (v, ops) = match vec_opts(st, argv, "CiP:qrv", "aio_read") {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let offset = match num(st, &ops[0]) {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let count = match iovec_len(st, &ops[1..]) {
        Ok(x) => x,
        Err(_) => return -EINVAL,
    };
    let t1 = Instant::now();
    let mut buf = Vec::new();
    let res = alloc_buf(count, 0xab).and_then(|b| {
        buf = b;
        do_read(st, &mut buf, offset)
    });
    let t = t1.elapsed();
    let text = match res {
        Err(rc) => format!("readv failed: {}\n", strerror(rc)),
        Ok(()) => readv_result(&v, &buf, offset, t, &mut false),
    };
    st.defer(text);
    0
}

/// `write [-bcCfnqruz] [-P pattern | -s source_file] off len`.
pub fn write_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "bcCfnpP:qrs:uz");
    let (mut bflag, mut cflag, mut big_c, mut qflag) = (false, false, false, false);
    let (mut fua, mut no_fallback, mut registered, mut may_unmap) = (false, false, false, false);
    let (mut pflag, mut zflag, mut sflag) = (false, false, false);
    let mut pat = 0xcdu8;
    let mut file_name = String::new();
    for item in o.items {
        let opt = match item {
            Ok(opt) => opt,
            Err(e) => return bad_opt(st, &e, "write"),
        };
        let arg = opt.arg.as_deref().unwrap_or("");
        match opt.id.as_str() {
            "b" => bflag = true,
            "c" => cflag = true,
            "C" => big_c = true,
            "f" => fua = true,
            "n" => no_fallback = true,
            "P" => {
                pflag = true;
                match pattern(st, arg) {
                    Ok(p) => pat = p,
                    Err(rc) => return rc,
                }
            }
            "q" => qflag = true,
            "r" => registered = true,
            "s" => {
                sflag = true;
                file_name = arg.to_string();
            }
            "u" => may_unmap = true,
            "z" => zflag = true,
            _ => {} // -p: ignored, as in qemu-io
        }
    }
    let [off_arg, count_arg] = o.operands.as_slice() else {
        return st.usage("write");
    };
    let fail = |st: &mut State, msg: &str| {
        st.print(msg);
        -EINVAL
    };
    if bflag && zflag {
        return fail(st, "-b and -z cannot be specified at the same time\n");
    }
    if fua && (bflag || cflag) {
        return fail(st, "-f and -b or -c cannot be specified at the same time\n");
    }
    if no_fallback && !zflag {
        return fail(st, "-n requires -z to be specified\n");
    }
    if may_unmap && !zflag {
        return fail(st, "-u requires -z to be specified\n");
    }
    if u8::from(zflag) + u8::from(pflag) + u8::from(sflag) > 1 {
        return fail(
            st,
            "Only one of -z, -P, and -s can be specified at the same time\n",
        );
    }
    let offset = match num(st, off_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let count = match num(st, count_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    if count > REQUEST_MAX_BYTES && !no_fallback {
        return fail(
            st,
            &format!("length cannot exceed {REQUEST_MAX_BYTES} without -n, given {count_arg}\n"),
        );
    }
    if bflag || cflag {
        if !offset.is_multiple_of(512) {
            return fail(
                st,
                &format!("{offset} is not a sector-aligned value for 'offset'\n"),
            );
        }
        if !count.is_multiple_of(512) {
            return fail(
                st,
                &format!("{count} is not a sector-aligned value for 'count'\n"),
            );
        }
    }
    let mut buf = Vec::new();
    if zflag {
        if registered {
            return fail(st, "cannot combine zero write with registered I/O buffer\n");
        }
    } else if sflag {
        match buf_from_file(&file_name, count) {
            Ok(b) => buf = b,
            Err(msg) => {
                st.eprint(&msg);
                return -EINVAL;
            }
        }
    } else {
        match alloc_buf(count, pat) {
            Ok(b) => buf = b,
            Err(rc) => {
                st.print(&format!("write failed: {}\n", strerror(rc)));
                return rc;
            }
        }
    }
    st.poll();
    let t1 = Instant::now();
    let res = if bflag {
        // The VM state area of qcow2 images is not implemented in oxcow.
        Err(-ENOTSUP)
    } else if zflag {
        do_zeroes(st, offset, count, may_unmap, no_fallback, fua)
    } else if cflag {
        do_write_compressed(st, &buf, offset)
    } else {
        do_write(st, &buf, offset, fua)
    };
    let t = t1.elapsed();
    if let Err(rc) = res {
        st.print(&format!("write failed: {}\n", strerror(rc)));
        return rc;
    }
    if !qflag {
        st.print(&report("wrote", t, offset, count, count, 1, big_c));
    }
    0
}

/// `qemu_io_alloc_from_file()`: `len` bytes of the file, repeated as needed.
fn buf_from_file(name: &str, len: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let perror = |e: std::io::Error| format!("{name}: {}\n", crate::common::io_reason(&e));
    let mut f = std::fs::File::open(name).map_err(perror)?;
    let mut buf = alloc_buf(len, 0).map_err(|rc| format!("{name}: {}\n", strerror(rc)))?;
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(perror(e)),
        }
    }
    if got == 0 {
        return Err(format!("{name}: file is empty\n"));
    }
    let mut p = got;
    while p < buf.len() {
        let n = got.min(buf.len() - p);
        buf.copy_within(0..n, p);
        p += n;
    }
    Ok(buf)
}

/// `writev [-Cfqr] [-P pattern] off len [len..]`.
pub fn writev_f(st: &mut State, argv: &[String]) -> i32 {
    let (v, ops) = match vec_opts(st, argv, "CfP:qr", "writev") {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let offset = match num(st, &ops[0]) {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let count = match iovec_len(st, &ops[1..]) {
        Ok(x) => x,
        Err(_) => return -EINVAL,
    };
    st.poll();
    let t1 = Instant::now();
    let res =
        alloc_buf(count, v.pattern.unwrap_or(0xcd)).and_then(|b| do_write(st, &b, offset, v.fua));
    let t = t1.elapsed();
    if let Err(rc) = res {
        st.print(&format!("writev failed: {}\n", strerror(rc)));
        return rc;
    }
    if !v.qflag {
        st.print(&report("wrote", t, offset, count, count, 1, v.cflag));
    }
    0
}

/// `aio_write [-Cfiqruz] [-P pattern] off len [len..]`: done at once, reported when
/// qemu-io would report its completion.
pub fn aio_write_f(st: &mut State, argv: &[String]) -> i32 {
    let (v, ops) = match vec_opts(st, argv, "CfiP:qruz", "aio_write") {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let fail = |st: &mut State, msg: &str| {
        st.print(msg);
        -EINVAL
    };
    if v.zflag && ops.len() != 2 {
        return fail(st, "-z supports only a single length parameter\n");
    }
    if v.unmap && !v.zflag {
        return fail(st, "-u requires -z to be specified\n");
    }
    if v.zflag && v.registered {
        return fail(st, "cannot combine zero write with registered I/O buffer\n");
    }
    let offset = match num(st, &ops[0]) {
        Ok(x) => x,
        Err(rc) => return rc,
    };
    let t1 = Instant::now();
    let (count, res) = if v.zflag {
        let count = match num(st, &ops[1]) {
            Ok(x) => x,
            Err(rc) => return rc,
        };
        (count, do_zeroes(st, offset, count, v.unmap, false, v.fua))
    } else {
        let count = match iovec_len(st, &ops[1..]) {
            Ok(x) => x,
            Err(_) => return -EINVAL,
        };
        let res = alloc_buf(count, v.pattern.unwrap_or(0xcd))
            .and_then(|b| do_write(st, &b, offset, v.fua));
        (count, res)
    };
    let t = t1.elapsed();
    let text = match res {
        Err(rc) => format!("aio_write failed: {}\n", strerror(rc)),
        Ok(()) if v.qflag => String::new(),
        Ok(()) => report("wrote", t, offset, count, count, 1, v.cflag),
    };
    st.defer(text);
    0
}

/// `aio_flush`: waits for every outstanding request.
pub fn aio_flush_f(st: &mut State, _argv: &[String]) -> i32 {
    st.poll();
    0
}
