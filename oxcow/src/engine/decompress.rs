//! Inflating compressed clusters: raw deflate (zlib) or zstd. The stream must produce
//! exactly one cluster; the bytes after its end (slack up to the sector boundary) are
//! ignored, as QEMU ignores them.

use crate::error::{Error, Result};
use crate::format::header::CompressionType;

pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
    host_offset: u64,
) -> Result<()> {
    let fail = |reason: String| Error::Decompress {
        offset: host_offset,
        reason,
    };
    match kind {
        CompressionType::Zlib => INFLATE.with(|cell| {
            // One inflate state per thread, reset for every cluster.
            let mut slot = cell.borrow_mut();
            let d = slot.get_or_insert_with(|| flate2::Decompress::new(false));
            d.reset(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| fail(format!("deflate: {e}")))?;
            let _ = status;
            if d.total_out() != out.len() as u64 {
                return Err(fail(format!(
                    "deflate stream gave {} of {} bytes",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }),
        CompressionType::Zstd => ZSTD.with(|cell| {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            // One decompression context per thread: creating one costs more than
            // inflating a small cluster.
            let mut slot = cell.borrow_mut();
            let d = match slot.as_mut() {
                Some(d) => {
                    d.reinit().map_err(|e| fail(format!("zstd: {e}")))?;
                    d
                }
                None => slot.insert(Decoder::new().map_err(|e| fail(format!("zstd: {e}")))?),
            };
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < outb.capacity() {
                let (in_before, out_before) = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| fail(format!("zstd: {e}")))?;
                if hint == 0 && outb.pos() < outb.capacity() {
                    // The frame ended before filling the cluster.
                    break;
                }
                if inb.pos() == in_before && outb.pos() == out_before {
                    break;
                }
            }
            if outb.pos() != outb.capacity() {
                return Err(fail(format!(
                    "zstd stream gave {} of {} bytes",
                    outb.pos(),
                    outb.capacity()
                )));
            }
            Ok(())
        }),
    }
}

thread_local! {
    static INFLATE: std::cell::RefCell<Option<flate2::Decompress>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD: std::cell::RefCell<Option<zstd::stream::raw::Decoder<'static>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn zlib_exact_cluster_with_slack() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut c = deflate(&data);
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &c, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_streams_are_errors() {
        let data = vec![5u8; 2048];
        let mut out = vec![0u8; 4096];
        let e = decompress(CompressionType::Zlib, &deflate(&data), &mut out, 0x1234).unwrap_err();
        assert!(e.to_string().contains("0x1234"), "{e}");
        let z = zstd::bulk::compress(&data, 3).unwrap();
        assert!(decompress(CompressionType::Zstd, &z, &mut out, 0).is_err());
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3], &mut out, 0).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 10], &mut out, 0).is_err());
    }

    #[test]
    fn zstd_with_slack() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        z.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &z, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }
}
