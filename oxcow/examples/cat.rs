//! Writes an image's guest contents to stdout: `cargo run --example cat -- IMAGE`.
use oxcow::{BlockDevice, Image, OpenOptions};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: cat IMAGE")?;
    let img = Image::open(&path, &OpenOptions::default())?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < img.size() {
        let n = (img.size() - off).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], off)?;
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}
