//! Writing compressed clusters: compressing a cluster (deflate or zstd, as QEMU
//! writes them) and packing compressed clusters one after another in host clusters,
//! each touched host cluster counting one reference per compressed cluster in it.

use super::Qcow2;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::format::header::CompressionType;
use crate::format::l1l2::L2Entry;

thread_local! {
    /// Each thread's zstd compressor, kept between clusters: setting one up costs
    /// more than compressing a cluster (the output does not depend on reuse).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// QEMU's deflate parameters (qcow2_zlib_compress): default level, raw deflate
/// with a 4 KiB window (QEMU inflates with a 4 KiB window, so a stream that reaches
/// further back would not read in QEMU), memory level 9.
const DEFLATE: zlib_rs::DeflateConfig = zlib_rs::DeflateConfig {
    level: 6,
    method: zlib_rs::Method::Deflated,
    window_bits: -12,
    mem_level: 9,
    strategy: zlib_rs::Strategy::Default,
};

/// Compresses one cluster. `None` when the result would not be smaller than the
/// cluster (such clusters are written uncompressed, as QEMU does).
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(1);
    let out = match kind {
        CompressionType::Zlib => {
            let mut out = vec![0u8; limit];
            let (c, rc) = zlib_rs::compress_slice(&mut out, data, DEFLATE);
            match rc {
                zlib_rs::ReturnCode::Ok => {
                    let n = c.len();
                    out.truncate(n);
                    Some(out)
                }
                // The output does not fit in less than a cluster.
                zlib_rs::ReturnCode::BufError => None,
                other => {
                    return Err(Error::Unsupported(format!("deflate failed: {other:?}")));
                }
            }
        }
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fail =
                |e: std::io::Error| Error::Unsupported(format!("zstd compression failed: {e}"));
            let c = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(
                    zstd::bulk::Compressor::new(zstd::DEFAULT_COMPRESSION_LEVEL).map_err(fail)?,
                ),
            };
            c.compress(data).map(Some).map_err(fail)
        })?,
    };
    Ok(out.filter(|o| o.len() <= limit))
}

impl Qcow2 {
    /// Writes one whole guest cluster compressed. The cluster must not hold data yet
    /// (as in QEMU, compression never overwrites an allocated cluster). Data that does
    /// not compress is written as a normal cluster.
    pub fn write_compressed(&self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let size = self.size();
        // A whole cluster, or the partial last cluster of a disk whose size is not a
        // multiple of the cluster size (padded with zeros).
        if data.len() as u64 != cs && offset + data.len() as u64 != size || data.len() as u64 > cs {
            return Err(Error::InvalidArgument(format!(
                "compressed writes take whole clusters ({} bytes at {offset:#x})",
                data.len()
            )));
        }
        let mut padded = Vec::new();
        let whole = if data.len() as u64 == cs {
            data
        } else {
            padded.resize(cs as usize, 0);
            padded[..data.len()].copy_from_slice(data);
            &padded[..]
        };
        let kind = self.meta.header.compression_type;
        match compress_cluster(kind, whole)? {
            Some(c) => self.write_compressed_prepared(&c, offset),
            None => self.write_at(data, offset),
        }
    }

    /// Stores `compressed` (the output of [`compress_cluster`] for this image's
    /// compression type) as the guest cluster at `offset`. Calls in guest order give
    /// the same file whatever thread compressed the data.
    pub fn write_compressed_prepared(&self, compressed: &[u8], offset: u64) -> Result<()> {
        let w = self.writer()?;
        let _guest = self.guest_io.read();
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || offset >= self.size() {
            return Err(Error::InvalidArgument(format!("compressed writes need a whole cluster; offset {offset:#x} is not a cluster start inside the disk")));
        }
        if self.data_file.is_some() {
            return Err(Error::Unsupported(
                "Compression is not supported with an external data file".into(),
            ));
        }
        let len = compressed.len() as u64;
        let max = (CompressedDescriptor::max_sectors(self.meta.header.cluster_bits) + 1) * 512;
        if len == 0 || len >= cs || len > max - 511 {
            return Err(Error::InvalidArgument(format!(
                "compressed cluster of {len} bytes does not fit a descriptor"
            )));
        }
        self.record_write(offset, cs.min(self.size() - offset))?;
        let gidx = offset / cs;
        let mut st = self.lock_cluster(w, gidx)?;
        let l2 = self.l2_for_write(&mut st, offset)?;
        let (word, bitmap) = self.l2_words(l2, offset)?;
        let old = self.decode(word, bitmap);
        match old {
            L2Entry::Unallocated | L2Entry::Zero { host: None } => {}
            L2Entry::Extended { host: 0, .. } => {}
            _ => {
                return Err(Error::Unsupported(
                    "Compression can't overwrite an allocated cluster".into(),
                ))
            }
        }
        let host = self.alloc_bytes(&mut st, len)?;
        st.inflight.insert(gidx);
        drop(st);
        let res = self.storage.write_at(compressed, host);
        let mut st = w.state.lock();
        let res = res.map_err(Error::from).and_then(|_| {
            let d = CompressedDescriptor::for_range(host, len);
            let l2 = self.l2_for_write(&mut st, offset)?;
            self.set_l2_words(l2, offset, d.encode(self.meta.header.cluster_bits), 0)
        });
        if res.is_err() {
            st.pending_frees.push((host, len, false));
        }
        self.finish_inflight(w, &mut st, gidx);
        res?;
        drop(st);
        self.writeback_if_needed(w)
    }

    /// Allocates `len` bytes for compressed data: right after the previous compressed
    /// cluster when it fits (possibly running into the next host cluster when that is
    /// the next one allocated), in a new cluster otherwise.
    fn alloc_bytes(&self, st: &mut super::writestate::WriteState, len: u64) -> Result<u64> {
        self.before_refcount_change(st)?;
        let cs = self.cluster_size();
        let io = self.storage.as_ref();
        let mut offset = st.free_byte_offset;
        if offset != 0
            && st.refcounts.get(io, offset / cs)?
                == crate::format::refcount::max_value(st.header.refcount_order)
        {
            offset = 0;
        }
        let mut free_in_cluster = cs - offset % cs;
        loop {
            if offset == 0 || free_in_cluster < len {
                let new = st.refcounts.find_free_cluster(io)?;
                if offset == 0 || offset.div_ceil(cs) * cs != new {
                    offset = new;
                    free_in_cluster = cs;
                } else {
                    free_in_cluster += cs;
                }
            }
            match st.refcounts.update(io, offset, len, 1, false) {
                Ok(()) => break,
                Err(super::refcounts::Stop::Again) => {
                    offset = 0;
                    continue;
                }
                Err(super::refcounts::Stop::Failed(e)) => return Err(e),
            }
        }
        self.check_overlap(
            st,
            offset & !(cs - 1),
            (offset % cs + len).div_ceil(cs) * cs,
        )?;
        self.file_len
            .fetch_max(offset + len, std::sync::atomic::Ordering::AcqRel);
        st.free_byte_offset = if (offset + len).is_multiple_of(cs) {
            0
        } else {
            offset + len
        };
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reused compressor gives the bytes a fresh one gives.
    #[test]
    fn reuse_gives_the_same_bytes() {
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"the quick brown fox "[(i % 20) as usize] ^ (i / 4096) as u8)
            .collect();
        let mut x = 1u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut first = Vec::new();
        for data in [&text, &noise, &text] {
            let z = compress_cluster(CompressionType::Zlib, data).unwrap();
            if let Some(z) = &z {
                // Raw deflate that inflates back with a 4 KiB window.
                let mut d = flate2::Decompress::new_with_window_bits(false, 12);
                let mut back = Vec::with_capacity(data.len());
                d.decompress_vec(z, &mut back, flate2::FlushDecompress::Finish)
                    .unwrap();
                assert_eq!(&back, data);
            }
            first.push(z);
            let s = compress_cluster(CompressionType::Zstd, data).unwrap();
            let fresh = zstd::bulk::compress(data, zstd::DEFAULT_COMPRESSION_LEVEL).unwrap();
            assert_eq!(s, (fresh.len() < data.len()).then_some(fresh));
        }
        assert_eq!(first[0], first[2]);
        assert!(compress_cluster(CompressionType::Zlib, &noise)
            .unwrap()
            .is_none());
        assert!(compress_cluster(CompressionType::Zstd, &text)
            .unwrap()
            .is_some());
    }

    /// Every cluster size, with data that does not compress or barely does: the
    /// result fits the cluster or is `None`, never a panic.
    #[test]
    fn incompressible_clusters_of_every_size() {
        let mut x = 7u64;
        for bits in 9..=21u32 {
            let n = 1usize << bits;
            for compressible in [0usize, 1, 8] {
                let data: Vec<u8> = (0..n)
                    .map(|i| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if compressible > 0 && i % 16 < compressible {
                            0
                        } else {
                            x as u8
                        }
                    })
                    .collect();
                for kind in [CompressionType::Zlib, CompressionType::Zstd] {
                    if let Some(c) = compress_cluster(kind, &data).unwrap() {
                        assert!(c.len() < n, "{bits} bits: {} bytes", c.len());
                    }
                }
            }
        }
    }
}
