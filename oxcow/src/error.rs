//! The one error type of the library: every failure says what was wrong and where.

use std::io;
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the storage under an image.
    #[error("{0}")]
    Io(#[from] io::Error),

    /// A file could not be opened.
    #[error("Could not open '{}': {}", path.display(), strerror(source))]
    Open { path: PathBuf, source: io::Error },

    /// A header field (or the header's shape) is invalid: the image is refused.
    #[error("Invalid qcow2 header: {field}: {reason}")]
    BadHeader { field: &'static str, reason: String },

    /// The image is not a qcow2 image at all.
    #[error("Image is not in qcow2 format")]
    NotQcow2,

    /// Metadata inside the image is inconsistent (an offset, a size, a flag).
    #[error("Image is corrupt: {what} (at offset {offset:#x})")]
    Corrupt { what: String, offset: u64 },

    /// The image uses incompatible features this implementation does not know.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnknownFeatures(String),

    /// A feature or option that is valid qcow2 but not supported (yet).
    #[error("{0}")]
    Unsupported(String),

    /// A backing chain problem: loop, depth, unsafe name, missing file.
    #[error("{0}")]
    Backing(String),

    /// A request outside the device.
    #[error("request at offset {offset} length {len} is outside the device of size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// Compressed data that did not inflate to exactly one cluster.
    #[error("Could not decompress the cluster at host offset {offset:#x}: {reason}")]
    Decompress { offset: u64, reason: String },

    /// Invalid argument given by the caller (not derived from the image).
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn corrupt(what: impl Into<String>, offset: u64) -> Self {
        Error::Corrupt {
            what: what.into(),
            offset,
        }
    }

    pub(crate) fn header(field: &'static str, reason: impl Into<String>) -> Self {
        Error::BadHeader {
            field,
            reason: reason.into(),
        }
    }
}

/// An I/O error as C's strerror words it, without Rust's " (os error N)".
pub fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
