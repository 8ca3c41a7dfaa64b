//! A small ordered work pool for the copying commands: the main thread produces work
//! items in guest order, worker threads process them (read, decompress, compare,
//! write) with buffers of their own, and the main thread consumes the results in the
//! same order, so progress output and "first difference" answers stay deterministic.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// How many threads to use for `requested` parallel requests (qemu-img's `-m`):
/// never more than requested, nor more than twice the CPUs.
pub fn worker_count(requested: usize) -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    requested.clamp(1, (cpus * 2).max(1))
}

/// Runs `work` on every item `produce` yields, on `threads` threads with at most
/// `depth` items in flight, and hands the results to `consume` in production order.
/// `consume` returns `Ok(false)` to stop early; results after that are dropped.
/// Each worker gets its own state from `init` (its buffers).
pub fn run_ordered<T, R, S, E>(
    threads: usize,
    depth: usize,
    mut produce: impl FnMut() -> Result<Option<T>, E>,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, T) -> R + Sync,
    mut consume: impl FnMut(R) -> Result<bool, E>,
) -> Result<(), E>
where
    T: Send,
    R: Send,
{
    if threads <= 1 {
        let mut st = init();
        while let Some(t) = produce()? {
            if !consume(work(&mut st, t))? {
                break;
            }
        }
        return Ok(());
    }
    let depth = depth.max(threads);
    std::thread::scope(|sc| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, T)>(depth);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<(u64, R)>();
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            let init = &init;
            let work = &work;
            sc.spawn(move || {
                let mut st = init();
                loop {
                    let job = {
                        let rx = job_rx.lock().unwrap_or_else(|e| e.into_inner());
                        rx.recv()
                    };
                    let Ok((seq, t)) = job else { break };
                    if res_tx.send((seq, work(&mut st, t))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);

        let mut sent = 0u64;
        let mut received = 0u64;
        let mut next = 0u64;
        let mut pending: BTreeMap<u64, R> = BTreeMap::new();
        let mut producing = true;
        let mut stopped = false;
        let mut err: Option<E> = None;
        loop {
            while producing && sent - received < depth as u64 {
                match produce() {
                    Ok(Some(t)) => {
                        if job_tx.send((sent, t)).is_err() {
                            producing = false;
                            break;
                        }
                        sent += 1;
                    }
                    Ok(None) => producing = false,
                    Err(e) => {
                        err = Some(e);
                        producing = false;
                    }
                }
            }
            if sent == received {
                break;
            }
            let Ok((seq, r)) = res_rx.recv() else { break };
            received += 1;
            pending.insert(seq, r);
            while let Some(r) = pending.remove(&next) {
                next += 1;
                if stopped {
                    continue;
                }
                match consume(r) {
                    Ok(true) => {}
                    Ok(false) => {
                        stopped = true;
                        producing = false;
                    }
                    Err(e) => {
                        if err.is_none() {
                            err = Some(e);
                        }
                        stopped = true;
                        producing = false;
                    }
                }
            }
        }
        drop(job_tx);
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// A zeroed copy buffer aligned to 2 MiB and, where the system allows it
/// (`madvise`), backed by transparent huge pages: filling it faults in one page per
/// 2 MiB instead of 512, and copying through it misses the TLB less.
pub struct Buffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its memory, as a Vec<u8> does.
unsafe impl Send for Buffer {}
// SAFETY: shared access only reads, as for a Vec<u8>.
unsafe impl Sync for Buffer {}

const HUGE_PAGE: usize = 2 << 20;

impl Buffer {
    /// A buffer of `len` zero bytes (`len` > 0).
    pub fn new(len: usize) -> Buffer {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (len > 0 is checked by max(1)).
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        // SAFETY: advice about memory just allocated for us (2 MiB aligned, so page
        // aligned); it changes no content. Then every byte is initialized.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE);
            std::ptr::write_bytes(ptr.as_ptr(), 0, layout.size());
        }
        Buffer {
            ptr,
            len: layout.size(),
        }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        match std::alloc::Layout::from_size_align(len.max(1), HUGE_PAGE) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<u8>()),
        }
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes owned by the buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialized bytes owned by the buffer, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.len)
    }
}

/// Whether `buf` holds only zero bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    if let Some(&b) = buf.first() {
        if b != 0 {
            return false;
        }
    }
    let mut chunks = buf.chunks_exact(128);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order() {
        let mut n = 0u64;
        let mut seen = Vec::new();
        run_ordered::<u64, u64, (), ()>(
            4,
            8,
            || {
                n += 1;
                Ok((n <= 100).then_some(n))
            },
            || (),
            |_, x| {
                if x % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                x * 2
            },
            |r| {
                seen.push(r);
                Ok(r < 120)
            },
        )
        .unwrap();
        assert_eq!(seen, (1..=60).map(|x| x * 2).collect::<Vec<_>>());
    }

    #[test]
    fn buffers_are_zeroed_and_aligned() {
        let mut b = Buffer::new(3 << 20);
        assert_eq!(b.len(), 3 << 20);
        assert!(is_zero(&b));
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        b[5] = 7;
        assert_eq!(b[5], 7);
        let small = Buffer::new(1);
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
