//! `convert --bitmaps [--skip-broken-bitmaps]`: the persistent bitmaps of the one
//! source are created in the qcow2 target after the copy (same name, granularity and
//! enabled state) and filled from the source, as qemu-img does. Bitmaps left in use
//! (inconsistent) stop the conversion before the target is created, or are skipped
//! with a warning.

use crate::common::Ctx;
use oxcow::{BitmapOptions, Image};

/// Refuses inconsistent bitmaps unless they are to be skipped. False: refused (the
/// message is printed).
pub fn check(ctx: &Ctx, src: &Image, skip_broken: bool) -> bool {
    if skip_broken {
        return true;
    }
    match src.bitmaps().iter().find(|b| b.persistent && b.in_use) {
        Some(b) => {
            ctx.error(format!("Cannot copy inconsistent bitmap '{}'", b.name));
            eprintln!("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
            false
        }
        None => true,
    }
}

/// Creates and fills the bitmaps in the target; the exit code.
pub fn copy(ctx: &Ctx, src: &Image, dst: &Image, skip_broken: bool) -> u8 {
    // QEMU walks the source's bitmaps newest first; the target stores the ones it
    // creates newest first again: the directory order is kept.
    for b in src.bitmaps().iter().rev().filter(|b| b.persistent) {
        if b.in_use && skip_broken {
            ctx.error(format!(
                "warning: Skipping inconsistent bitmap '{}'",
                b.name
            ));
            continue;
        }
        let opts = BitmapOptions {
            granularity: Some(b.granularity),
            persistent: true,
            disabled: !b.enabled,
        };
        if let Err(e) = dst.add_bitmap(&b.name, &opts) {
            ctx.error(format!("Failed to create bitmap {}: {e}", b.name));
            return 1;
        }
        if let Err(e) = dst.merge_bitmap(&b.name, src, &b.name) {
            ctx.error(format!("Failed to populate bitmap {}: {e}", b.name));
            let _ = dst.remove_bitmap(&b.name);
            return 1;
        }
    }
    if let Err(e) = dst.store_bitmaps() {
        ctx.error(format!("Failed to store bitmaps: {e}"));
        return 1;
    }
    0
}
