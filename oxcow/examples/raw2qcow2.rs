//! Copies a raw file into a new qcow2 image (skipping zero blocks):
//! `cargo run --release --example raw2qcow2 -- IN.raw OUT.qcow2 [c]` (c: compressed).
use oxcow::{create_qcow2, BlockDevice, CreateOptions, Image, OpenOptions};
use std::os::unix::fs::FileExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let input = std::fs::File::open(&a[1])?;
    let size = input.metadata()?.len();
    create_qcow2(
        &a[2],
        &CreateOptions {
            size,
            ..Default::default()
        },
    )?;
    let img = Image::open(
        &a[2],
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    let compressed = a.get(3).is_some();
    let chunk = if compressed { 65536 } else { 2 << 20 };
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        input.read_exact_at(&mut buf[..n], off)?;
        if compressed {
            if buf[..n].iter().any(|&b| b != 0) {
                img.qcow2().unwrap().write_compressed(&buf[..n], off)?;
            }
        } else {
            // Runs of non-zero 64 KiB clusters, each written with one call.
            let mut i = 0;
            while i < n {
                let nz = |j: usize| buf[j..(j + 65536).min(n)].iter().any(|&b| b != 0);
                if !nz(i) {
                    i += 65536;
                    continue;
                }
                let mut e = i + 65536;
                while e < n && nz(e) {
                    e += 65536;
                }
                let e = e.min(n);
                img.write_at(&buf[i..e], off + i as u64)?;
                i = e;
            }
        }
        off += n as u64;
    }
    img.flush()?;
    Ok(())
}
