//! What every command shares: the program name in messages, opening images the way
//! qemu-img reports failures, and exit codes.

use oxcow::{Format, Image, OpenOptions};

/// The invocation: which name the program answers to.
pub struct Ctx {
    /// "qemu-img" under that name, "oxcow" otherwise; prefixes every message.
    pub prog: String,
}

impl Ctx {
    /// Prints `prog: msg` on stderr, as qemu-img's error_report does.
    pub fn error(&self, msg: impl std::fmt::Display) {
        eprintln!("{}: {}", self.prog, msg);
    }

    /// A usage error: the message, then the hint qemu-img prints; exit code 1.
    pub fn usage_error(&self, msg: impl std::fmt::Display) -> u8 {
        self.error(msg);
        eprintln!("Try '{} --help' for more information", self.prog);
        1
    }
}

/// Opens `filename` read-only with an optional `-f` format, turning library errors into
/// the message qemu-img prints: "Could not open 'NAME': REASON".
pub fn open_image(
    filename: &str,
    format: Option<&str>,
    opts: &OpenOptions,
) -> Result<Image, String> {
    let mut opts = opts.clone();
    if let Some(f) = format {
        opts.format =
            Some(Format::from_name(f).map_err(|e| format!("Could not open '{filename}': {e}"))?);
    }
    // QEMU's file driver refuses these before trying to open anything.
    if filename.is_empty() {
        return Err("Could not open '': The 'file' block driver requires a file name".into());
    }
    if std::path::Path::new(filename).is_dir() {
        return Err(format!(
            "Could not open '{filename}': 'file' driver requires '{filename}' to be a regular file"
        ));
    }
    Image::open(filename, &opts).map_err(|e| open_error_message(filename, &e))
}

/// qemu-img names the file that failed, then the reason; when the file itself could
/// not be opened, the file driver's own "Could not open" comes in between.
pub fn open_error_message(filename: &str, e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Open { path, source } => format!(
            "Could not open '{filename}': Could not open '{}': {}",
            path.display(),
            io_reason(source)
        ),
        other => format!(
            "Could not open '{filename}': {}",
            strip_os_error(&other.to_string())
        ),
    }
}

/// Removes Rust's " (os error N)" from a message, leaving QEMU's strerror text.
fn strip_os_error(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " (os error ".len()..];
        match after.find(')') {
            Some(j) if after[..j].bytes().all(|b| b.is_ascii_digit()) => rest = &after[j + 1..],
            _ => {
                out.push_str(" (os error ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The strerror text QEMU prints for an I/O error (without Rust's " (os error N)").
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The message qemu-img prints for an encrypted qcow2 image opened without its key
/// (oxcow takes no `--object`), when `filename` is one; `None` otherwise.
pub fn encrypted_without_key(filename: &str, format: Option<&str>) -> Option<String> {
    if format.is_some_and(|f| f != "qcow2") {
        return None;
    }
    let storage = oxcow::storage::FileStorage::open(std::path::Path::new(filename), false).ok()?;
    if oxcow::image::probe(&storage).ok()? != Format::Qcow2 {
        return None;
    }
    let meta = oxcow::engine::meta::ImageMeta::load(&storage).ok()?;
    (meta.header.crypt_method != oxcow::format::header::CryptMethod::None).then(|| {
        format!(
            "Could not open '{filename}': Parameter 'encrypt.key-secret' is required for cipher"
        )
    })
}
