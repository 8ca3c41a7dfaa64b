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
        opts.format = Some(Format::from_name(f).map_err(|e| e.to_string())?);
    }
    Image::open(filename, &opts).map_err(|e| open_error_message(filename, &e))
}

/// qemu-img names the file that failed, then the reason.
pub fn open_error_message(filename: &str, e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Open { source, .. } => {
            format!("Could not open '{filename}': {}", io_reason(source))
        }
        other => format!("Could not open '{filename}': {other}"),
    }
}

/// The strerror text QEMU prints for an I/O error (without Rust's " (os error N)").
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
