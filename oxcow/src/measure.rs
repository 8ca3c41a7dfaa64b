//! How large a new image would be (`qemu-img measure`): for a qcow2 target, the
//! metadata QEMU would allocate for a disk of a given size (qcow2_calc_prealloc_size)
//! plus the data clusters an input image actually holds (found by block status), and
//! the room its persistent bitmaps would take; for a raw target, the disk size.

use crate::device::{block_status, BlockDevice};
use crate::engine::create::Preallocation;
use crate::engine::refcounts::metadata_size;
use crate::error::{Error, Result};
use crate::format::MAX_L1_BYTES;
use crate::image::Image;

/// The sizes `qemu-img measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the data it will hold.
    pub required: u64,
    /// Bytes the new image needs when every cluster is allocated.
    pub fully_allocated: u64,
    /// Bytes the input's persistent bitmaps would take in the new image (only when
    /// both the input and the target can hold persistent bitmaps).
    pub bitmaps: Option<u64>,
}

/// The qcow2 options that change a new image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Target {
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub preallocation: Preallocation,
    /// The new image will have a backing file: every cluster of the input counts.
    pub backing_file: bool,
}

impl Default for Qcow2Target {
    fn default() -> Self {
        Qcow2Target {
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            version: 3,
            preallocation: Preallocation::Off,
            backing_file: false,
        }
    }
}

fn invalid(m: &str) -> Error {
    Error::InvalidArgument(m.to_string())
}

/// QEMU's cluster size rule (validate_cluster_size), with its messages.
pub fn validate_cluster_size(cluster_size: u64, extended_l2: bool) -> Result<()> {
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    Ok(())
}

/// QEMU's refcount width rule for a version (qcow2_opt_get_refcount_bits_del).
pub fn validate_refcount_bits(refcount_bits: u64, version: u32) -> Result<()> {
    if version < 3 && refcount_bits != 16 {
        return Err(invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
    }
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    Ok(())
}

impl Qcow2Target {
    /// The checks qcow2_measure makes on its options, in its order.
    pub fn validate(&self) -> Result<()> {
        validate_cluster_size(self.cluster_size, self.extended_l2)?;
        if self.version != 2 && self.version != 3 {
            return Err(invalid("Invalid compatibility level"));
        }
        validate_refcount_bits(self.refcount_bits as u64, self.version)
    }

    fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Refuses a disk whose L1 table would exceed QEMU's limit.
    fn check_size(&self, size: u64) -> Result<()> {
        let cs = self.cluster_size;
        let clusters = size.div_ceil(cs);
        let l2_tables = clusters.div_ceil(cs / self.l2_entry_size());
        if l2_tables.saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid(
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        Ok(())
    }

    /// Bytes of a qcow2 image of `size` with every cluster allocated: header, L2
    /// tables, L1 table and refcount structures (each in whole clusters, as QEMU
    /// counts them for preallocation), then the data.
    pub fn fully_allocated_size(&self, size: u64) -> u64 {
        let cs = self.cluster_size;
        let l2e = self.l2_entry_size();
        let aligned = size.div_ceil(cs) * cs;
        let mut meta = cs;
        let l2_entries = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
        meta += l2_entries * l2e;
        let l1_entries = (l2_entries * l2e / cs).div_ceil(cs / 8) * (cs / 8);
        meta += l1_entries * 8;
        let (blocks, table) = metadata_size(
            (meta + aligned) / cs,
            cs.trailing_zeros(),
            self.refcount_bits.trailing_zeros(),
            false,
        );
        meta + (blocks + table) * cs + aligned
    }

    /// The sizes of a new image of `size` bytes with nothing written.
    pub fn measure_size(&self, size: u64) -> Result<Measurement> {
        self.validate()?;
        self.check_size(size)?;
        Ok(self.measure(size, 0, None))
    }

    /// The sizes of a new image converted from `input` (whose length, as QEMU sees
    /// it, is `len`: a raw file's length rounded up to whole sectors).
    pub fn measure_image(&self, input: &Image, len: u64) -> Result<Measurement> {
        self.validate()?;
        // QEMU checks the size given in the options (none here), not the input's.
        self.check_size(0)?;
        let cs = self.cluster_size;
        let aligned = len.div_ceil(cs) * cs;
        let data = if self.backing_file {
            // How much of the new backing chain matches the input is unknown: count
            // every cluster.
            aligned
        } else {
            data_bytes(input, len, cs)?
        };
        let bitmaps = match input.qcow2() {
            Some(q) if self.version >= 3 && q.header().version >= 3 => {
                Some(bitmaps_size(input.size(), &q.meta().bitmaps, cs))
            }
            _ => None,
        };
        Ok(self.measure(len, data, bitmaps))
    }

    fn measure(&self, size: u64, data: u64, bitmaps: Option<u64>) -> Measurement {
        let aligned = size.div_ceil(self.cluster_size) * self.cluster_size;
        let data = match self.preallocation {
            Preallocation::Full | Preallocation::Falloc => aligned,
            Preallocation::Off | Preallocation::Metadata => data,
        };
        let fully_allocated = self.fully_allocated_size(size);
        Measurement {
            required: fully_allocated - aligned + data,
            fully_allocated,
            bitmaps,
        }
    }
}

/// The bytes of whole clusters of `cluster_size` that hold data in the first `len`
/// bytes of `dev`, as QEMU counts them: ranges that read as zeros (zero clusters,
/// holes, unallocated ranges with nothing below) are skipped; a cluster with any data
/// counts whole. Bytes past the device's end read as zeros.
pub fn data_bytes(dev: &dyn BlockDevice, len: u64, cluster_size: u64) -> Result<u64> {
    let end = len.min(dev.size());
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < end {
        let s = block_status(dev, offset, end - offset)?;
        let mut n = s.len.max(1);
        if !s.zero && s.data && s.present {
            // Up to the end of the cluster, and from the start of the first one.
            n = (offset + n).div_ceil(cluster_size) * cluster_size - offset;
            required += offset % cluster_size + n;
        }
        offset += n;
    }
    Ok(required)
}

/// Room for persistent bitmaps of a disk of `disk_size` bytes in an image of
/// `cluster_size`: every bitmap fully allocated, its table, and the directory.
pub fn bitmaps_size(
    disk_size: u64,
    bitmaps: &[crate::format::bitmap::BitmapEntry],
    cluster_size: u64,
) -> u64 {
    let cs = cluster_size;
    let mut total = 0u64;
    let mut directory = 0u64;
    for b in bitmaps {
        let bits = disk_size.div_ceil(b.granularity());
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        directory += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    total + directory.div_ceil(cs) * cs
}

/// The sizes of a raw image of `size` bytes (whole sectors).
pub fn measure_raw(size: u64) -> Measurement {
    let size = size.div_ceil(512) * 512;
    Measurement {
        required: size,
        fully_allocated: size,
        bitmaps: None,
    }
}
