//! A global allocator that counts, per thread, the bytes live since `peak_alloc`
//! started, and their peak: proof that hostile images cause no allocation
//! proportional to what they claim. Included by the tests that install it as their
//! global allocator (`#[path = "common/counting_alloc.rs"] mod counting_alloc;`), not
//! by `common`, so that other tests keep the plain system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

// ---------------------------------------------------------------------------------

struct Counting;

thread_local! {
    /// (counting, live bytes, peak live bytes)
    static ALLOC: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

fn account(delta: isize) {
    let _ = ALLOC.try_with(|a| {
        let (on, live, peak) = a.get();
        if on {
            let live = live + delta;
            a.set((on, live, peak.max(live)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        account(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            account(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result and the peak of bytes it had allocated at once
/// (on this thread).
pub fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOC.with(|a| a.set((true, 0, 0)));
    let r = f();
    let (_, _, peak) = ALLOC.with(|a| a.replace((false, 0, 0)));
    (r, peak.max(0) as usize)
}
