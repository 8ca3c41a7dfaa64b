//! Writes SIZE MiB of non-zero data in 2 MiB requests to a new qcow2 image:
//! `cargo run --release --example seqwrite -- OUT.qcow2 SIZE_MIB`.
use oxcow::{create_qcow2, BlockDevice, CreateOptions, Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let size = a[2].parse::<u64>()? << 20;
    create_qcow2(
        &a[1],
        &CreateOptions {
            size,
            ..Default::default()
        },
    )?;
    let img = Image::open(
        &a[1],
        &OpenOptions {
            writable: true,
            cache_unsafe: std::env::var_os("UNSAFE").is_some(),
            ..Default::default()
        },
    )?;
    let buf: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut off = 0;
    let t = std::time::Instant::now();
    while off < size {
        img.write_at(&buf, off)?;
        off += buf.len() as u64;
    }
    img.flush()?;
    drop(img);
    eprintln!("{:.3} s", t.elapsed().as_secs_f64());
    Ok(())
}
