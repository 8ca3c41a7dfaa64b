//! Pure codecs of qcow2's on-disk structures. No I/O here: every structure parses from
//! bytes, validating what it can alone, and encodes back to the same bytes.

pub mod be;
pub mod bitmap;
pub mod cluster0;
pub mod compressed;
pub mod extension;
pub mod header;
pub mod l1l2;
pub mod refcount;
pub mod snapshot;

/// Smallest and largest cluster_bits the format allows (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table accepted (QEMU's cap), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table accepted (QEMU's cap), in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The most snapshots an image may hold, and the largest snapshot table.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Bits 9..55 of L1, L2 and refcount table entries hold a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
