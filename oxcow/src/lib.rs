//! oxcow: the qcow2 disk image format in Rust.
//!
//! Layers, from the top: [`image`] (open any image as a [`BlockDevice`]), [`engine`]
//! (the qcow2 runtime), [`format`] (pure codecs of on-disk structures) and [`storage`]
//! (where bytes live). See docs/ARCHITECTURE.md.

pub mod create;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod image;
pub mod measure;
pub mod raw;
pub mod storage;

pub use create::create_qcow2;
pub use device::{block_status, BlockDevice, BlockStatus, LayerStatus, StatusKind};
pub use engine::amend::AmendOptions;
pub use engine::bitmaps::{BitmapInfo, BitmapOptions};
pub use engine::check::{CheckReport, Fix};
pub use engine::create::{CreateOptions, Preallocation};
pub use engine::dirtybits::DirtyBits;
pub use engine::Qcow2;
pub use error::{Error, Result};
pub use image::{Format, Image, OpenOptions};
pub use raw::RawImage;
