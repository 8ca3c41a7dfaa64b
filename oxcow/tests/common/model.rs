//! Scaffolding of the model-based tests (write_model.rs, snapshot_model.rs): opening
//! an image for writing, comparing it with the flat model of its disk, and requiring
//! `qemu-img check` to find it clean.

use super::qemu_check_json;
use oxcow::{BlockDevice, Image, OpenOptions};
use std::path::Path;

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
    let out = qemu_check_json(path);
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

/// A random program to run on one image: its disk size and cluster size, whether
/// it is a v2 image, the seed of its steps, how many, the backing file's bytes if
/// any, and the L2 cache size.
pub struct Program<'a> {
    pub size: u64,
    pub cluster: u64,
    pub v2: bool,
    pub seed: u64,
    pub steps: usize,
    pub backing: Option<&'a [u8]>,
    pub cache: Option<u64>,
}

impl Program<'_> {
    /// The disk before the first step: the backing file's bytes (cut or padded with
    /// zeros to the disk size), or zeros.
    pub fn initial_model(&self) -> Vec<u8> {
        let size = self.size as usize;
        self.backing
            .map(|b| {
                let mut m = b.to_vec();
                m.resize(size, 0);
                m
            })
            .unwrap_or_else(|| vec![0u8; size])
    }
}

// The steps of a random program, each done to the image and to the model of its
// disk; each returns what it did, for messages.

/// Writes `len` bytes at `off`, sector `n` (of 512 bytes) filled with `fill + n`.
pub fn write_pattern(img: &Image, model: &mut [u8], off: u64, len: u64, fill: u8) -> String {
    let data: Vec<u8> = (0..len)
        .map(|i| fill.wrapping_add((i / 512) as u8))
        .collect();
    img.write_at(&data, off).unwrap();
    model[off as usize..(off + len) as usize].copy_from_slice(&data);
    format!("write {off:#x}+{len:#x}")
}

/// Zeroes `len` bytes at `off`, unmapping them when `unmap`.
pub fn write_zeroes(img: &Image, model: &mut [u8], off: u64, len: u64, unmap: bool) -> String {
    img.write_zeroes(off, len, unmap).unwrap();
    model[off as usize..(off + len) as usize].fill(0);
    format!("write-zeroes {off:#x}+{len:#x} unmap={unmap}")
}

/// Discards `len` bytes at `off`: the whole clusters in it (and the tail of the disk)
/// read as zeros afterwards, unless `ignored` (a v2 image over a backing file, which
/// QEMU does not discard, as the clusters would show the backing file).
pub fn discard(
    img: &Image,
    model: &mut [u8],
    off: u64,
    len: u64,
    cluster: u64,
    ignored: bool,
) -> String {
    img.discard(off, len).unwrap();
    let size = model.len() as u64;
    let start = off.div_ceil(cluster) * cluster;
    let end = if off + len == size {
        size
    } else {
        (off + len) / cluster * cluster
    };
    if !ignored && start < end {
        model[start as usize..end as usize].fill(0);
    }
    format!("discard {off:#x}+{len:#x}")
}

/// Writes the cluster at `c` compressed, 4 KiB block `n` filled with `fill + n`; only
/// an unallocated cluster takes it (the image refuses the others).
pub fn write_compressed(img: &Image, model: &mut [u8], c: u64, cluster: u64, fill: u8) -> String {
    let n = cluster.min(model.len() as u64 - c);
    let data: Vec<u8> = (0..n)
        .map(|i| fill.wrapping_add((i / 4096) as u8))
        .collect();
    match img.qcow2().expect("qcow2").write_compressed(&data, c) {
        Ok(()) => model[c as usize..(c + n) as usize].copy_from_slice(&data),
        Err(e) => assert!(e.to_string().contains("overwrite"), "{e}"),
    }
    format!("write -c {c:#x}")
}
