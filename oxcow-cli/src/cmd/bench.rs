//! `bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n]
//! [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size]
//! [-t cache] [-w] [-U] filename`: qemu-img's img_bench.
//!
//! `count` requests of `buffer_size` bytes are read (or with `-w` written, every byte
//! the pattern byte), `depth` at a time. Request k goes to `offset` for k = 0 and to
//! `(offset + k * step) % size` after it, as qemu-img computes them; a request that
//! does not fit in the image fails as it does there ("Failed request: Input/output
//! error"). qemu-img keeps `depth` asynchronous requests in flight from one thread;
//! oxcow runs `min(depth, MAX_WORKERS)` threads, each issuing the next request number
//! from a shared counter as soon as its previous one completes.
//!
//! The cache mode (`-t`, default writeback as in qemu-img) decides how the image is
//! opened: `unsafe` never waits for the disk; `writethrough` and `directsync` flush the
//! image after every write (QEMU emulates FUA the same way); `none`/`off` and
//! `directsync` bypass the page cache (O_DIRECT, see [`direct`]).
//!
//! `--flush-interval N` (writes only, N >= depth) mirrors qemu-img's bench_cb: when a
//! request completes while the number of requests not yet issued is a multiple of N,
//! the queue is drained (no request is issued until every one in flight completed),
//! the image is flushed, and issuing resumes; with `--no-drain` the flush is sent
//! without waiting, while requests keep flowing. The last drain happens once every
//! request completed: as in qemu-img, its flush is not part of the reported time (it
//! is waited for before the image is closed).

mod direct;

use crate::common::{open_error_message, open_image, Ctx};
use crate::copyopts::{cvtnum, cvtnum_full, image_opts_refusal, next_option, usage_error};
use crate::qopt::{long, Getopt, LongOpt};
use crate::source::error_reason;
use oxcow::{BlockDevice, OpenOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

const CMD: &str = "bench";

/// Most threads issuing requests at once (qemu-img's thread pool has 64 workers).
const MAX_WORKERS: u64 = 64;

/// qemu-img 10.0's long options, in its order (the order of glibc's ambiguity lists).
const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("cache", true, "t"),
    long("count", true, "c"),
    long("depth", true, "d"),
    long("offset", true, "o"),
    long("buffer-size", true, "s"),
    long("step-size", true, "S"),
    long("aio", true, "i"),
    long("native", false, "n"),
    long("write", false, "w"),
    long("pattern", true, "pattern"),
    long("flush-interval", true, "flush-interval"),
    long("no-drain", false, "no-drain"),
    long("force-share", false, "U"),
];

const HELP: &str = "Usage:
Run simple image benchmark.  Usage:

  PROG bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]

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
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -c, --count COUNT
     number of I/O requests to perform
  -s, --buffer-size BUFFER_SIZE
     size of each I/O request
  -d, --depth DEPTH
     number of requests to perform in parallel
  -o, --offset OFFSET
     start first request at this OFFSET
  -S, --step-size STEP_SIZE
     each next request offset increment
  -i, --aio AIO
     async-io backend (threads, native, io_uring)
  -n, --native
     use native AIO backend if possible
  -w, --write
     perform write test (default is read)
  --pattern PATTERN
     write this pattern byte instead of zero
  --flush-interval FLUSH_INTERVAL
     issue flush after this number of requests
  --no-drain
     do not wait when flushing pending requests
  -U, --force-share
     open images in shared mode for concurrent access

";

/// A cache mode as `bdrv_parse_cache_mode` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cache {
    /// O_DIRECT (cache.direct=on).
    direct: bool,
    /// Flushes do not reach the disk (cache.no-flush=on).
    no_flush: bool,
    /// Every write is followed by a flush (the write cache is off).
    writethrough: bool,
}

fn parse_cache(mode: &str) -> Option<Cache> {
    let c = |direct, no_flush, writethrough| Cache {
        direct,
        no_flush,
        writethrough,
    };
    Some(match mode {
        "off" | "none" => c(true, false, false),
        "directsync" => c(true, false, true),
        "writeback" => c(false, false, false),
        "unsafe" => c(false, true, false),
        "writethrough" => c(false, false, true),
        _ => return None,
    })
}

/// What to run, as parsed from the command line.
#[derive(Debug, Clone)]
struct Params {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut cache = parse_cache("writeback").unwrap_or(Cache {
        direct: false,
        no_flush: false,
        writethrough: false,
    });
    let mut native = false;
    let mut force_share = false;
    let mut p = Params {
        count: 75000,
        depth: 64,
        offset: 0,
        bufsize: 4096,
        step: 0,
        write: false,
        pattern: 0,
        flush_interval: 0,
        drain: true,
    };
    let int_max = i32::MAX as u64;
    let mut g = Getopt::new(args, "hc:d:f:ni:o:qs:S:t:wU", LONGS);
    while let Some(item) = g.next_opt() {
        let (id, arg) = match next_option(ctx, CMD, HELP, item) {
            Ok(o) => o,
            Err(code) => return code,
        };
        // Each value is checked as it is met, so the first bad one is reported.
        let parsed = match id.as_str() {
            "f" => {
                fmt = Some(arg);
                Some(())
            }
            "image-opts" => {
                image_opts = true;
                Some(())
            }
            "t" => match parse_cache(&arg) {
                Some(c) => {
                    cache = c;
                    Some(())
                }
                None => {
                    ctx.error("Invalid cache mode");
                    None
                }
            },
            "c" => cvtnum_full(ctx, "request count", &arg, false, 1, int_max).map(|v| p.count = v),
            "d" => cvtnum_full(ctx, "queue depth", &arg, false, 1, int_max).map(|v| p.depth = v),
            "n" => {
                native = true;
                Some(())
            }
            "i" => match arg.as_str() {
                "threads" | "io_uring" => Some(()),
                "native" => {
                    native = true;
                    Some(())
                }
                _ => {
                    ctx.error(format!("Invalid aio option: {arg}"));
                    None
                }
            },
            "o" => cvtnum(ctx, "offset", &arg, true).map(|v| p.offset = v),
            "s" => cvtnum_full(ctx, "buffer size", &arg, true, 1, int_max).map(|v| p.bufsize = v),
            "S" => cvtnum_full(ctx, "step size", &arg, true, 0, int_max).map(|v| p.step = v),
            "w" => {
                p.write = true;
                Some(())
            }
            "pattern" => {
                cvtnum_full(ctx, "pattern byte", &arg, false, 0, 0xff).map(|v| p.pattern = v as u8)
            }
            "flush-interval" => cvtnum_full(ctx, "flush interval", &arg, false, 0, int_max)
                .map(|v| p.flush_interval = v),
            "no-drain" => {
                p.drain = false;
                Some(())
            }
            "U" => {
                force_share = true;
                Some(())
            }
            // -q only silences an encryption key prompt in qemu-img: bench's own lines
            // are printed anyway.
            _ => Some(()),
        };
        if parsed.is_none() {
            return 1;
        }
    }
    let filename = match g.operands() {
        [one] => one.clone(),
        _ => return usage_error(ctx, CMD, "Expecting one image file name"),
    };
    if !p.write && p.flush_interval > 0 {
        ctx.error("--flush-interval is only available in write tests");
        return 1;
    }
    if p.flush_interval > 0 && p.flush_interval < p.depth {
        ctx.error("Flush interval can't be smaller than depth");
        return 1;
    }
    if p.step == 0 {
        p.step = p.bufsize;
    }
    let dev = match open(
        &filename,
        fmt.as_deref(),
        image_opts,
        cache,
        native,
        force_share,
        p.write,
    ) {
        Ok(d) => d,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    let code = match bench(dev.as_ref(), &p, cache) {
        Ok(()) => 0,
        Err(msg) => {
            ctx.error(msg);
            1
        }
    };
    // Closing writes the cached metadata; like qemu-img, a failure there is not
    // reported.
    drop(dev);
    code
}

/// Opens the image as qemu-img's img_open would for bench, with its messages.
fn open(
    filename: &str,
    fmt: Option<&str>,
    image_opts: bool,
    cache: Cache,
    native: bool,
    force_share: bool,
    write: bool,
) -> Result<Box<dyn BlockDevice>, String> {
    if image_opts {
        return Err(image_opts_refusal(fmt.is_some(), filename));
    }
    if force_share && write {
        return Err(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
    }
    if native && !cache.direct {
        // QEMU's file driver opens the file first, then refuses the combination.
        if let Err(source) = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(filename)
        {
            let e = oxcow::Error::Open {
                path: filename.into(),
                source,
            };
            return Err(open_error_message(filename, &e));
        }
        return Err(format!(
            "Could not open '{filename}': aio=native was specified, but it requires cache.direct=on, which was not specified."
        ));
    }
    if cache.direct {
        return direct::open(filename, fmt, write, cache.no_flush);
    }
    let opts = OpenOptions {
        writable: write,
        cache_unsafe: cache.no_flush,
        ..Default::default()
    };
    Ok(Box::new(open_image(filename, fmt, &opts)?))
}

/// The guest offset of request `k`, as qemu-img's bench_cb advances it.
fn request_offset(p: &Params, size: u64, k: u64) -> u64 {
    if k == 0 {
        return p.offset;
    }
    if size == 0 {
        return 0;
    }
    ((p.offset as u128 + k as u128 * p.step as u128) % size as u128) as u64
}

/// A zeroed buffer of `len` bytes whose start is aligned for O_DIRECT, allocated
/// without aborting when memory is short.
fn aligned_buffer(len: usize) -> Result<(Vec<u8>, usize), String> {
    let total = len + direct::ALIGN;
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(total)
        .map_err(|_| format!("Failed to allocate {len} bytes for the request buffers"))?;
    v.resize(total, 0);
    let addr = v.as_ptr() as usize;
    let start = (direct::ALIGN - addr % direct::ALIGN) % direct::ALIGN;
    Ok((v, start))
}

/// A worker's buffer: its own for reads; for writes, the pattern all workers share.
enum IoBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// The request scheduler shared by the worker threads.
struct State {
    /// Requests handed to a worker.
    issued: u64,
    completed: u64,
    in_flight: u64,
    /// Draining for a flush: no request may be issued.
    draining: bool,
    /// Requests issued in a batch (the first one, and after each drained flush),
    /// waiting for their worker: one slot per worker.
    batch: Vec<Option<u64>>,
    /// When the last request completed.
    finished: Option<Instant>,
    /// The first error, as qemu-img prints it.
    failed: Option<String>,
}

struct Shared<'a> {
    dev: &'a dyn BlockDevice,
    p: &'a Params,
    size: u64,
    writethrough: bool,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared<'_> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, st: &mut State, msg: String) {
        if st.failed.is_none() {
            st.failed = Some(msg);
        }
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// One request: a read into, or a write of, the buffer at the offset of request
    /// `k`.
    fn request(&self, k: u64, buf: &mut IoBuf<'_>) -> Result<(), String> {
        let off = request_offset(self.p, self.size, k);
        // blk_check_byte_request: the whole request must lie inside the image.
        if off > self.size || self.size - off < self.p.bufsize {
            return Err("Failed request: Input/output error".into());
        }
        let r = match buf {
            IoBuf::Write(data) => self.dev.write_at(data, off).and_then(|()| {
                if self.writethrough {
                    self.dev.flush()
                } else {
                    Ok(())
                }
            }),
            IoBuf::Read(data) => self.dev.read_at(data, off),
        };
        r.map_err(|e| format!("Failed request: {}", error_reason(&e)))
    }

    /// Worker `id`'s next request: the one a batch gave it, or a new one once no
    /// drain holds issuing back; `None` when every request was issued or one failed.
    fn next_request(&self, id: usize, mut st: MutexGuard<'_, State>) -> Option<u64> {
        loop {
            if st.failed.is_some() {
                return None;
            }
            if let Some(k) = st.batch.get_mut(id).and_then(Option::take) {
                return Some(k);
            }
            if !st.draining {
                if st.issued >= self.p.count {
                    return None;
                }
                st.issued += 1;
                st.in_flight += 1;
                return Some(st.issued - 1);
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Issues the next requests at once, one per worker (all are idle: at the start,
    /// and after a drained flush), as qemu-img fills its queue.
    fn issue_batch(&self, st: &mut State) {
        for slot in st.batch.iter_mut() {
            if st.issued < self.p.count {
                *slot = Some(st.issued);
                st.issued += 1;
                st.in_flight += 1;
            }
        }
    }

    /// Worker `id`: takes its request of the first batch, then on each completion
    /// follows bench_cb: the flush rule, then the next request, taken under the same
    /// lock as the completion so that, as in qemu-img, every request issued outside a
    /// batch follows a completion that saw the count before it.
    fn worker(&self, id: usize, mut buf: IoBuf<'_>, flusher: &mpsc::Sender<()>) {
        let p = self.p;
        let mut next = self.next_request(id, self.lock());
        while let Some(k) = next {
            let result = self.request(k, &mut buf);
            let mut st = self.lock();
            st.in_flight -= 1;
            if let Err(msg) = result {
                self.fail(&mut st, msg);
                return;
            }
            // Requests not issued yet, counted before this completion as qemu-img does.
            let remaining = p.count - st.issued;
            st.completed += 1;
            if st.completed == p.count {
                st.finished = Some(Instant::now());
                self.changed.notify_all();
            }
            if p.flush_interval > 0 && remaining.is_multiple_of(p.flush_interval) {
                if !p.drain {
                    // Sent without waiting; requests keep flowing.
                    let _ = flusher.send(());
                } else {
                    // Drain: nothing is issued until the last request in flight has
                    // completed and flushed; then a batch refills the queue.
                    st.draining = true;
                    if st.in_flight == 0 {
                        drop(st);
                        let r = self.dev.flush();
                        st = self.lock();
                        if let Err(e) = r {
                            self.fail(&mut st, format!("Failed request: {}", error_reason(&e)));
                            return;
                        }
                        st.draining = false;
                        self.issue_batch(&mut st);
                        self.changed.notify_all();
                    }
                }
            }
            next = self.next_request(id, st);
        }
    }

    /// Flushes sent without draining the queue, one after another; flushes asked for
    /// while one runs are covered by the next.
    fn flusher(&self, rx: mpsc::Receiver<()>) {
        while rx.recv().is_ok() {
            while rx.try_recv().is_ok() {}
            if self.stop.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = self.dev.flush() {
                let mut st = self.lock();
                self.fail(
                    &mut st,
                    format!("Failed flush request: {}", error_reason(&e)),
                );
            }
        }
    }
}

fn bench(dev: &dyn BlockDevice, p: &Params, cache: Cache) -> Result<(), String> {
    let size = dev.size();
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        p.count,
        if p.write { "write" } else { "read" },
        p.bufsize,
        p.depth,
        p.offset,
        p.step
    );
    if p.flush_interval > 0 {
        println!("Sending flush every {} requests", p.flush_interval);
    }
    let workers = p.depth.min(p.count).min(MAX_WORKERS) as usize;
    let bufsize = usize::try_from(p.bufsize).map_err(|_| "Invalid buffer size".to_string())?;
    // Writes share one buffer of the pattern; reads need one buffer per worker.
    let buffers = if p.write { 1 } else { workers };
    let mut bufs = Vec::with_capacity(buffers);
    for _ in 0..buffers {
        let (mut v, start) = aligned_buffer(bufsize)?;
        v[start..start + bufsize].fill(p.pattern);
        bufs.push((v, start));
    }
    let shared = Shared {
        dev,
        p,
        size,
        writethrough: cache.writethrough,
        state: Mutex::new(State {
            issued: 0,
            completed: 0,
            in_flight: 0,
            draining: false,
            batch: vec![None; workers],
            finished: None,
            failed: None,
        }),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    let (flush_tx, flush_rx) = mpsc::channel::<()>();
    let start = Instant::now();
    // The first batch: one request per worker, issued before any completes.
    shared.issue_batch(&mut shared.lock());
    std::thread::scope(|sc| {
        let shared = &shared;
        sc.spawn(move || shared.flusher(flush_rx));
        if p.write {
            let pattern: &[u8] = match bufs.first() {
                Some((v, s)) => &v[*s..*s + bufsize],
                None => &[],
            };
            for id in 0..workers {
                let tx = flush_tx.clone();
                sc.spawn(move || shared.worker(id, IoBuf::Write(pattern), &tx));
            }
        } else {
            for (id, (v, s)) in bufs.iter_mut().enumerate() {
                let tx = flush_tx.clone();
                let buf = &mut v[*s..*s + bufsize];
                sc.spawn(move || shared.worker(id, IoBuf::Read(buf), &tx));
            }
        }
        drop(flush_tx);
        // The run ends when the last request completes; a final drained flush may
        // still be under way, and is waited for (by the end of this scope) after the
        // time is printed, as in qemu-img.
        let mut st = shared.lock();
        while st.finished.is_none() && st.failed.is_none() {
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let (Some(t), None) = (st.finished, &st.failed) {
            let secs = t.duration_since(start).as_secs_f64();
            println!("Run completed in {secs:.3} seconds.");
        }
    });
    let st = shared.lock();
    match &st.failed {
        Some(msg) => Err(msg.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxcow::{LayerStatus, StatusKind};
    use std::sync::atomic::AtomicU64;

    /// A device that records where requests went and checks that a drained flush
    /// never overlaps a request.
    #[derive(Debug, Default)]
    struct Mock {
        size: u64,
        busy: AtomicU64,
        flushes: AtomicU64,
        overlapped: AtomicBool,
        offsets: Mutex<Vec<u64>>,
    }

    impl BlockDevice for Mock {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, _buf: &mut [u8], offset: u64) -> oxcow::Result<()> {
            self.offsets.lock().unwrap().push(offset);
            Ok(())
        }
        fn layer_status(&self, _offset: u64, len: u64) -> oxcow::Result<LayerStatus> {
            Ok(LayerStatus {
                kind: StatusKind::Data,
                len,
                offset: None,
                compressed: false,
                file_zero: false,
            })
        }
        fn backing(&self) -> Option<&dyn BlockDevice> {
            None
        }
        fn format_name(&self) -> &'static str {
            "mock"
        }
        fn write_at(&self, _buf: &[u8], offset: u64) -> oxcow::Result<()> {
            self.busy.fetch_add(1, Ordering::SeqCst);
            self.offsets.lock().unwrap().push(offset);
            std::thread::yield_now();
            self.busy.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> oxcow::Result<()> {
            if self.busy.load(Ordering::SeqCst) != 0 {
                self.overlapped.store(true, Ordering::SeqCst);
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn params(count: u64, depth: u64, write: bool, fi: u64, drain: bool) -> Params {
        Params {
            count,
            depth,
            offset: 512,
            bufsize: 512,
            step: 4096 * 3 + 512,
            write,
            pattern: 0,
            flush_interval: fi,
            drain,
        }
    }

    fn run(p: &Params) -> Mock {
        let m = Mock {
            size: 1 << 20,
            ..Default::default()
        };
        let cache = parse_cache("writeback").unwrap();
        bench(&m, p, cache).unwrap();
        m
    }

    #[test]
    fn every_request_goes_where_qemu_img_sends_it() {
        for (count, depth, write) in [(1000, 64, true), (7, 64, false), (500, 1, true)] {
            let p = params(count, depth, write, 0, true);
            let m = run(&p);
            let mut got = m.offsets.into_inner().unwrap();
            got.sort_unstable();
            let mut want: Vec<u64> = (0..count).map(|k| request_offset(&p, 1 << 20, k)).collect();
            want.sort_unstable();
            assert_eq!(got, want);
            assert_eq!(request_offset(&p, 1 << 20, 0), 512);
        }
    }

    #[test]
    fn drained_flushes_come_where_qemu_img_puts_them() {
        // qemu-img flushes each time a completion sees a multiple of the interval
        // requests left to issue (counting from count - depth, after the first batch).
        for (count, depth, fi) in [
            (1000, 4, 100),
            (1000, 8, 8),
            (64, 64, 64),
            (10, 64, 64),
            (999, 3, 7),
        ] {
            let p = params(count, depth, true, fi, true);
            let m = run(&p);
            let w = depth.min(count);
            assert_eq!(
                m.flushes.load(Ordering::SeqCst),
                (count - w) / fi + 1,
                "{count} {depth} {fi}"
            );
            assert!(!m.overlapped.load(Ordering::SeqCst));
            assert_eq!(m.offsets.lock().unwrap().len() as u64, count);
        }
    }

    #[test]
    fn undrained_flushes_keep_requests_flowing() {
        let p = params(1000, 4, true, 10, false);
        let m = run(&p);
        let f = m.flushes.load(Ordering::SeqCst);
        assert!((1..=(1000 - 4) / 10 + 4).contains(&f), "{f}");
        assert_eq!(m.offsets.lock().unwrap().len(), 1000);
    }

    #[test]
    fn a_request_past_the_end_fails_as_in_qemu_img() {
        let m = Mock {
            size: 4096,
            ..Default::default()
        };
        let mut p = params(3, 1, true, 0, true);
        p.offset = 4000;
        let cache = parse_cache("writeback").unwrap();
        assert_eq!(
            bench(&m, &p, cache),
            Err("Failed request: Input/output error".to_string())
        );
    }
}
