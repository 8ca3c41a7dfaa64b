//! The other commands: discard, flush, truncate, length, info, map, alloc, open,
//! close, reopen, quit, sleep, sigraise, abort, and the blkdebug and zoned-device
//! commands (which fail as they fail in qemu-io on a plain image).

use super::args::{cvtnum, cvtnum_error, getopt, strtol, EINVAL, EIO, ENOTSUP, REQUEST_MAX_BYTES};
use super::out::{cvtstr, report};
use super::rw::{errno_of, strerror};
use super::{is_raw, Mode, State};
use oxcow::{BlockDevice, Preallocation, StatusKind};
use serde_json::{Map, Value};
use std::time::Instant;

fn num(st: &mut State, arg: &str) -> Result<u64, i32> {
    cvtnum(arg).inspect_err(|&rc| st.print(&cvtnum_error(rc, arg)))
}

/// `discard [-Cq] off len`.
pub fn discard_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "Cq");
    let (mut cflag, mut qflag) = (false, false);
    for item in o.items {
        match item {
            Ok(opt) if opt.id == "C" => cflag = true,
            Ok(_) => qflag = true,
            Err(e) => {
                st.eprint(&e);
                return st.usage("discard");
            }
        }
    }
    let [off_arg, len_arg] = o.operands.as_slice() else {
        return st.usage("discard");
    };
    let offset = match num(st, off_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let bytes = match num(st, len_arg) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    if bytes > REQUEST_MAX_BYTES {
        st.print(&format!(
            "length cannot exceed {REQUEST_MAX_BYTES}, given {len_arg}\n"
        ));
        return -EINVAL;
    }
    let t1 = Instant::now();
    let size = st.disk_len();
    // The sector tail past the end of a raw file holds nothing to discard.
    let real = st.image().size();
    let res = if bytes > size || offset > size - bytes {
        Err(-EIO)
    } else if bytes == 0 || !st.mode.unmap || offset >= real {
        // discard=ignore: accepted, nothing done.
        Ok(())
    } else {
        // Not flushed, even with the write cache off: QEMU sends no FUA with a
        // discard, so a crash right after one may lose it.
        st.dirty = true;
        st.image()
            .discard(offset, bytes.min(real - offset))
            .map_err(|e| -errno_of(&e))
    };
    let t = t1.elapsed();
    if let Err(rc) = res {
        st.print(&format!("discard failed: {}\n", strerror(rc)));
        return rc;
    }
    if !qflag {
        st.print(&report("discard", t, offset, bytes, bytes, 1, cflag));
    }
    0
}

/// `flush`.
pub fn flush_f(st: &mut State, _argv: &[String]) -> i32 {
    if st.dirty {
        st.poll();
    }
    match st.image().flush() {
        Ok(()) => {
            st.dirty = false;
            0
        }
        Err(e) => -errno_of(&e),
    }
}

/// `truncate [-m prealloc_mode] off`: resizes the image (growing or shrinking).
pub fn truncate_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "m:");
    let mut prealloc = Preallocation::Off;
    let mut prealloc_name = "off".to_string();
    for item in o.items {
        match item {
            Ok(opt) => {
                let arg = opt.arg.unwrap_or_default();
                match Preallocation::from_name(&arg) {
                    Ok(p) => {
                        prealloc = p;
                        prealloc_name = arg;
                    }
                    Err(_) => {
                        st.error_report(&format!("Invalid preallocation mode '{arg}'"));
                        return -EINVAL;
                    }
                }
            }
            Err(e) => {
                st.eprint(&e);
                return st.usage("truncate");
            }
        }
    }
    // qemu-io names argv[1] in the message, whatever word it parsed.
    let shown = o.argv1.clone().unwrap_or_default();
    let offset = match o.operands.first().map(|s| cvtnum(s)) {
        Some(Ok(v)) => v,
        Some(Err(rc)) => {
            st.print(&cvtnum_error(rc, &shown));
            return rc;
        }
        None => {
            st.print(&cvtnum_error(-EINVAL, &shown));
            return -EINVAL;
        }
    };
    st.poll();
    let img = st.image();
    let old = img.size();
    let res = if is_raw(img) {
        if prealloc == Preallocation::Metadata {
            Err(format!("Unsupported preallocation mode: {prealloc_name}"))
        } else {
            img.resize(offset, true, prealloc)
                .map_err(|e| e.to_string())
        }
    } else if !offset.is_multiple_of(512) {
        Err("The new size must be a multiple of 512".to_string())
    } else if offset < old && prealloc != Preallocation::Off {
        Err("Preallocation can't be used for shrinking an image".to_string())
    } else {
        img.resize(offset, true, prealloc)
            .map_err(|e| e.to_string())
    };
    match res {
        Ok(()) => 0,
        Err(msg) => {
            // Without Rust's " (os error N)" after an I/O error's text.
            let msg = msg
                .split(" (os error")
                .next()
                .unwrap_or_default()
                .to_string();
            st.error_report(&msg);
            -EINVAL
        }
    }
}

/// `length`.
pub fn length_f(st: &mut State, _argv: &[String]) -> i32 {
    let size = st.disk_len();
    st.print(&format!("{}\n", cvtstr(size as f64)));
    0
}

/// `ImageInfoSpecificQCow2` (as `qemu-img info` shows it; encrypted images never
/// open in oxcow, so there is no encryption member). QEMU marks every bitmap in use
/// while it has the image open for writing.
fn qcow2_specific(meta: &oxcow::engine::meta::ImageMeta, writable: bool) -> Value {
    let h = &meta.header;
    let mut d = Map::new();
    if h.version == 2 {
        d.insert("compat".into(), "0.10".into());
    } else {
        d.insert("compat".into(), "1.1".into());
        if let Some(df) = &meta.data_file {
            d.insert("data-file".into(), df.clone().into());
        }
        if h.has_data_file() {
            d.insert("data-file-raw".into(), h.data_file_raw().into());
        }
        d.insert("extended-l2".into(), h.has_extended_l2().into());
        d.insert("lazy-refcounts".into(), h.lazy_refcounts().into());
        d.insert("corrupt".into(), h.is_corrupt().into());
    }
    d.insert("refcount-bits".into(), (h.refcount_bits() as i64).into());
    if h.version != 2 && !meta.bitmaps.is_empty() {
        let list = meta
            .bitmaps
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use() || writable {
                    flags.push(Value::from("in-use"));
                }
                if b.auto() {
                    flags.push(Value::from("auto"));
                }
                let mut m = Map::new();
                m.insert("name".into(), b.name.clone().into());
                m.insert("granularity".into(), (b.granularity() as i64).into());
                m.insert("flags".into(), Value::Array(flags));
                Value::Object(m)
            })
            .collect();
        d.insert("bitmaps".into(), Value::Array(list));
    }
    d.insert("compression-type".into(), h.compression_type.name().into());
    Value::Object(d)
}

/// `info`: the driver, its cluster size and VM state offset, and what is specific
/// to the format.
pub fn info_f(st: &mut State, _argv: &[String]) -> i32 {
    let img = st.image();
    let mut s = format!("format name: {}\n", img.format().name());
    match img.qcow2() {
        Some(q) => {
            let cs = q.cluster_size();
            // The VM state lives past the last L1 entry the disk size needs.
            let cov = q.header().l2_coverage();
            let vm = img.size().div_ceil(cov) * cov;
            s.push_str(&format!(
                "cluster size: {}\nvm state offset: {}\n",
                cvtstr(cs as f64),
                cvtstr(vm as f64)
            ));
            let data = qcow2_specific(q.meta(), q.is_writable());
            s.push_str("Format specific information:\n");
            crate::qjson::dump_qobject(&mut s, 1, &data);
        }
        None => s.push_str("cluster size: 0 bytes\nvm state offset: 0 bytes\n"),
    }
    st.print(&s);
    0
}

/// `bdrv_is_allocated()`: whether the image itself (not its backing file) holds the
/// bytes at `offset` (data or zeros), and for how many bytes (0 at the end).
fn is_allocated(st: &State, offset: u64, bytes: u64) -> Result<(bool, u64), i32> {
    let img = st.image();
    let size = st.disk_len();
    if offset >= size || bytes == 0 {
        return Ok((false, 0));
    }
    let bytes = bytes.min(size - offset);
    if is_raw(img) {
        // A raw image holds every byte of itself.
        return Ok((true, bytes));
    }
    let ls = img.layer_status(offset, bytes).map_err(|e| -errno_of(&e))?;
    Ok((ls.kind != StatusKind::Unallocated, ls.len.min(bytes)))
}

/// `map`: allocated and unallocated stretches of the image itself.
pub fn map_f(st: &mut State, _argv: &[String]) -> i32 {
    st.poll();
    let mut offset = 0u64;
    let mut bytes = st.disk_len();
    while bytes > 0 {
        // map_is_allocated(): runs of the same answer are merged.
        let (first, mut num) = match is_allocated(st, offset, bytes) {
            Ok(x) => x,
            Err(rc) => {
                st.error_report(&format!(
                    "Failed to get allocation status: {}",
                    strerror(rc)
                ));
                return rc;
            }
        };
        while num > 0 && num < bytes {
            match is_allocated(st, offset + num, bytes - num) {
                Ok((a, n)) if a == first && n > 0 => num += n,
                _ => break,
            }
        }
        if num == 0 {
            st.error_report("Unexpected end of image");
            return -EIO;
        }
        let what = if first {
            "    allocated"
        } else {
            "not allocated"
        };
        let line = format!(
            "{} (0x{num:x}) bytes {what} at offset {} (0x{offset:x})\n",
            cvtstr(num as f64),
            cvtstr(offset as f64)
        );
        st.print(&line);
        offset += num;
        bytes -= num;
    }
    0
}

/// `alloc offset [count]`: how many of the bytes the image itself holds.
pub fn alloc_f(st: &mut State, argv: &[String]) -> i32 {
    let start = match num(st, &argv[1]) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let mut count = match argv.get(2) {
        Some(a) => match num(st, a) {
            Ok(v) => v,
            Err(rc) => return rc,
        },
        None => 512,
    };
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        let (alloc, n) = match is_allocated(st, offset, remaining) {
            Ok(x) => x,
            Err(rc) => {
                st.print(&format!("is_allocated failed: {}\n", strerror(rc)));
                return rc;
            }
        };
        offset += n;
        remaining -= n;
        if alloc {
            sum += n;
        }
        if n == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    let line = format!(
        "{sum}/{count} bytes allocated at offset {}\n",
        cvtstr(start as f64)
    );
    st.print(&line);
    0
}

/// `-o key=value,...` of `open`: the driver (format) and the read-only switch are
/// understood; any other option is refused as the qcow2 and raw drivers refuse it.
fn parse_open_options(list: &str) -> (Option<String>, Option<bool>, Vec<String>) {
    let (mut driver, mut ro, mut unknown) = (None, None, Vec::new());
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, "on"));
        match k {
            "driver" => driver = Some(v.to_string()),
            "read-only" => ro = Some(v == "on"),
            _ => unknown.push(k.to_string()),
        }
    }
    (driver, ro, unknown)
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
pub fn open_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "snCro:ki:t:d:U");
    let mut mode = Mode::default();
    let mut options = String::new();
    for item in o.items {
        let opt = match item {
            Ok(opt) => opt,
            Err(e) => {
                st.eprint(&e);
                return st.usage("open");
            }
        };
        let arg = opt.arg.unwrap_or_default();
        match opt.id.as_str() {
            "r" => mode.read_only = true,
            "n" => {
                mode.direct = true;
                mode.writethrough = false;
            }
            "k" => mode.native_aio = true,
            "t" | "d" | "i" => {
                if let Err(msg) = mode.set(&opt.id, &arg) {
                    st.error_report(&msg);
                    return -EINVAL;
                }
            }
            "o" => {
                if !options.is_empty() {
                    options.push(',');
                }
                options.push_str(&arg);
            }
            "s" => {
                st.error_report("open -s (snapshot mode) is not supported by oxcow");
                return -ENOTSUP;
            }
            "C" => {
                st.error_report("open -C (copy-on-read) is not supported by oxcow");
                return -ENOTSUP;
            }
            "U" => mode.force_share = true,
            _ => {}
        }
    }
    let name = match o.operands.as_slice() {
        [] => None,
        [n] => Some(n.as_str()),
        _ => return st.usage("open"),
    };
    let (driver, ro, unknown) = parse_open_options(&options);
    if let Some(r) = ro {
        mode.read_only = r;
    }
    if !st.open(name, mode, driver.as_deref()) {
        return -EINVAL;
    }
    if let Some(k) = unknown.first() {
        let fmt = st.image().format().name();
        st.img = None;
        let n = name.unwrap_or("");
        st.error_report(&format!(
            "can't open device {n}: Block format '{fmt}' does not support the option '{k}'"
        ));
        return -EINVAL;
    }
    0
}

/// `close`.
pub fn close_f(st: &mut State, _argv: &[String]) -> i32 {
    st.poll();
    st.img = None;
    0
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`: read-only or read-write, and the
/// cache mode, change; other driver options cannot.
pub fn reopen_f(st: &mut State, argv: &[String]) -> i32 {
    let o = getopt(argv, "c:o:rw");
    let mut mode = st.mode;
    let mut rw: Option<bool> = None;
    let mut ro_opt: Option<bool> = None;
    for item in o.items {
        let opt = match item {
            Ok(opt) => opt,
            Err(e) => {
                st.eprint(&e);
                return st.usage("reopen");
            }
        };
        let arg = opt.arg.unwrap_or_default();
        match opt.id.as_str() {
            "c" => {
                if let Err(msg) = mode.set("t", &arg) {
                    st.error_report(&msg);
                    return -EINVAL;
                }
            }
            "o" => {
                let (driver, ro, unknown) = parse_open_options(&arg);
                if let Some(k) = unknown.first().cloned().or(driver.map(|_| "driver".into())) {
                    st.error_report(&format!("Cannot change the option '{k}'"));
                    return -EINVAL;
                }
                ro_opt = ro.or(ro_opt);
            }
            r => {
                if rw.is_some() {
                    st.error_report("Only one -r/-w option may be given");
                    return -EINVAL;
                }
                rw = Some(r == "r");
            }
        }
    }
    if !o.operands.is_empty() {
        return st.usage("reopen");
    }
    if ro_opt.is_some() && rw.is_some() {
        st.error_report("Cannot set both -r/-w and 'read-only'");
        return -EINVAL;
    }
    let want_ro = rw.or(ro_opt).unwrap_or(st.mode.read_only);
    if want_ro != st.mode.read_only {
        st.poll();
        let name = st.image().filename().to_string();
        let format = st.image().format().name();
        let old = st.mode;
        st.img = None;
        mode.read_only = want_ro;
        if !st.open(Some(&name), mode, Some(format)) {
            st.open(Some(&name), old, Some(format));
            return -EINVAL;
        }
    }
    st.mode = mode;
    0
}

/// `quit`.
pub fn quit_f(st: &mut State, _argv: &[String]) -> i32 {
    st.quit = true;
    0
}

/// `sleep ms`.
pub fn sleep_f(st: &mut State, argv: &[String]) -> i32 {
    let (ms, whole) = strtol(&argv[1]);
    if ms < 0 || !whole {
        st.print(&format!("{} is not a valid number\n", argv[1]));
        return -EINVAL;
    }
    st.poll();
    std::thread::sleep(std::time::Duration::from_millis(ms as u64));
    0
}

/// `sigraise signal`: standard output is flushed first, as in qemu-io.
pub fn sigraise_f(st: &mut State, argv: &[String]) -> i32 {
    let sig = match num(st, &argv[1]) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    // glibc's NSIG on Linux.
    if sig > 65 {
        st.print(&format!(
            "signal argument '{}' is too large to be a valid signal\n",
            argv[1]
        ));
        return -EINVAL;
    }
    st.out.flush();
    // SAFETY: raise() only sends a signal to this process; its failure (an invalid
    // number) is ignored as qemu-io ignores it.
    unsafe {
        libc::raise(sig as libc::c_int);
    }
    0
}

/// `abort`: a crash, as abort(3) makes one: nothing is flushed, not even standard
/// output, and the image is not closed (its caches are lost, no dirty bit cleared).
pub fn abort_f(_st: &mut State, _argv: &[String]) -> i32 {
    std::process::abort()
}

/// blkdebug's commands: a qcow2 or raw image has no breakpoints.
pub fn break_f(st: &mut State, _argv: &[String]) -> i32 {
    st.print(&format!(
        "Could not set breakpoint: {}\n",
        strerror(ENOTSUP)
    ));
    -ENOTSUP
}

pub fn remove_break_f(st: &mut State, argv: &[String]) -> i32 {
    st.print(&format!(
        "Could not remove breakpoint {}: {}\n",
        argv[1],
        strerror(ENOTSUP)
    ));
    -ENOTSUP
}

pub fn resume_f(st: &mut State, _argv: &[String]) -> i32 {
    st.print(&format!(
        "Could not resume request: {}\n",
        strerror(ENOTSUP)
    ));
    -ENOTSUP
}

/// qemu-io waits forever here (no request of a plain image is ever suspended);
/// oxcow says so and goes on.
pub fn wait_break_f(st: &mut State, argv: &[String]) -> i32 {
    st.error_report(&format!(
        "wait_break {}: no request can be suspended without blkdebug; not waiting",
        argv[1]
    ));
    -ENOTSUP
}

/// The zoned-device commands: offset and length are parsed, then the request fails
/// as it does on any device that is not zoned.
fn zone_cmd(st: &mut State, argv: &[String], what: &str, count_is_zones: bool) -> i32 {
    let offset_ok = num(st, &argv[1]);
    if let Err(rc) = offset_ok {
        return rc;
    }
    match num(st, &argv[2]) {
        Err(rc) => return rc,
        Ok(v) if count_is_zones && v > u32::MAX as u64 => {
            st.print("Number of zones must be less than 2^32\n");
            return -libc::ERANGE;
        }
        Ok(_) => {}
    }
    st.print(&format!("zone {what} failed: {}\n", strerror(ENOTSUP)));
    -ENOTSUP
}

pub fn zone_report_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "report", true)
}

pub fn zone_open_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "open", false)
}

pub fn zone_close_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "close", false)
}

pub fn zone_finish_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "finish", false)
}

pub fn zone_reset_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "reset", false)
}

pub fn zone_append_f(st: &mut State, argv: &[String]) -> i32 {
    zone_cmd(st, argv, "append", false)
}
