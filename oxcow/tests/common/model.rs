//! Scaffolding of the model-based tests (write_model.rs, snapshot_model.rs): opening
//! an image for writing, comparing it with the flat model of its disk, and requiring
//! `qemu-img check` to find it clean.

use oxcow::{BlockDevice, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

/// Opens `path` read-write with an L2 cache of `cache` bytes (the default if `None`).
pub fn open_rw(path: &Path, cache: Option<u64>) -> Image {
    let o = OpenOptions {
        writable: true,
        l2_cache_bytes: cache,
        ..Default::default()
    };
    Image::open(path, &o).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The image reads exactly as `model` from guest offset 0.
pub fn assert_reads(img: &Image, model: &[u8], step: &str) {
    let mut buf = vec![0u8; model.len()];
    img.read_at(&mut buf, 0).unwrap();
    if let Some(at) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{step}: first difference at guest byte {at:#x}: image {:#04x}, model {:#04x}",
            buf[at], model[at]
        );
    }
}

/// `qemu-img check --output=json` succeeds with no leak, corruption or check error.
pub fn qemu_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !s.contains("\"leaks\"")
            && !s.contains("\"corruptions\"")
            && !s.contains("check-errors\": 1"),
        "qemu-img check {}:\n{s}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
