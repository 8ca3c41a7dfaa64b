//! Option helpers shared by convert, dd and compare: qemu-img's `cvtnum_full` (sizes
//! and plain integers with a range), cache mode names, getopt and usage errors.

use crate::common::Ctx;
use crate::qopt::Opt;
use crate::sizearg::{strtosz, SizeError};

/// Prints a getopt error as glibc and qemu-img do (`PROG CMD: message`, then the
/// hint) and returns exit code 1.
pub fn getopt_error(ctx: &Ctx, cmd: &str, msg: &str) -> u8 {
    eprintln!("{} {}: {}", ctx.prog, cmd, msg);
    eprintln!("Try '{} {} --help' for more info", ctx.prog, cmd);
    1
}

/// The start of each turn of a command's getopt loop: a getopt error is reported
/// (`Err(1)`), `-h` prints the command's help (`Err(0)`); any other option gives its
/// id and argument ("" when it has none).
pub fn next_option(
    ctx: &Ctx,
    cmd: &str,
    help: &str,
    item: Result<Opt, String>,
) -> Result<(String, String), u8> {
    let opt = item.map_err(|msg| getopt_error(ctx, cmd, &msg))?;
    if opt.id == "h" {
        print!("{}", help.replace("PROG", &ctx.prog));
        return Err(0);
    }
    Ok((opt.id, opt.arg.unwrap_or_default()))
}

/// What oxcow answers to `--object` (it has no QOM objects).
pub const OBJECT_UNSUPPORTED: &str = "--object is not supported by oxcow";

/// Reports `--object` as unsupported; exit code 1.
pub fn object_unsupported(ctx: &Ctx) -> u8 {
    ctx.error(OBJECT_UNSUPPORTED);
    1
}

/// The error for `--image-opts` (oxcow takes only file names): qemu-img's own when
/// `--format` is given too, otherwise why `filename` cannot be opened.
pub fn image_opts_refusal(with_format: bool, filename: &str) -> String {
    if with_format {
        return "--image-opts and --format are mutually exclusive".into();
    }
    format!("Could not open '{filename}': --image-opts is not supported by oxcow")
}

/// qemu-img's `error_exit`: the message, then the hint to read the command's help;
/// exit code 1.
pub fn usage_error(ctx: &Ctx, cmd: &str, msg: impl std::fmt::Display) -> u8 {
    ctx.error(msg);
    eprintln!("Try '{} {} --help' for more info", ctx.prog, cmd);
    1
}

/// `qemu_strtou64(s, NULL, 0)`: strtoull with base detection (0x hex, 0 octal),
/// leading white space allowed, nothing after the digits; a minus sign wraps as in
/// strtoull. `None` when it does not parse, `Some(Err(()))` on overflow.
pub fn strtou64(s: &str) -> Option<Result<u64, ()>> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex = (t.starts_with("0x") || t.starts_with("0X"))
        && t[2..].bytes().next().is_some_and(|b| b.is_ascii_hexdigit());
    let (radix, digits) = if hex {
        (16, &t[2..])
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if (digits.is_empty() && radix != 8) || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    if digits.is_empty() {
        return Some(Ok(0));
    }
    Some(match u64::from_str_radix(digits, radix) {
        Ok(v) => Ok(if neg { v.wrapping_neg() } else { v }),
        Err(_) => Err(()),
    })
}

/// qemu-img's `cvtnum_full(name, value, is_size, min, max)`: prints qemu-img's message
/// and returns `None` when `value` is not a number within `min..=max`.
pub fn cvtnum_full(
    ctx: &Ctx,
    name: &str,
    value: &str,
    is_size: bool,
    min: u64,
    max: u64,
) -> Option<u64> {
    let parsed: Option<Result<u64, ()>> = if is_size {
        match strtosz(value) {
            Ok(v) => Some(Ok(v)),
            Err(SizeError::Invalid) => None,
            Err(SizeError::Range) => Some(Err(())),
        }
    } else {
        strtou64(value)
    };
    match parsed {
        None => {
            ctx.error(format!("Invalid {name} specified: '{value}'."));
            None
        }
        Some(Ok(v)) if (min..=max).contains(&v) => Some(v),
        Some(_) => {
            ctx.error(format!(
                "Invalid {name} specified. Must be between {min} and {max}."
            ));
            None
        }
    }
}

/// qemu-img's `cvtnum`: a value between 0 and INT64_MAX.
pub fn cvtnum(ctx: &Ctx, name: &str, value: &str, is_size: bool) -> Option<u64> {
    cvtnum_full(ctx, name, value, is_size, 0, i64::MAX as u64)
}

/// Whether `mode` is a cache mode `bdrv_parse_cache_mode` accepts.
pub fn valid_cache_mode(mode: &str) -> bool {
    matches!(
        mode,
        "off" | "none" | "directsync" | "writeback" | "unsafe" | "writethrough"
    )
}

/// Checks the cache mode of a `-t` (`kind` "cache") or `-T` (`kind` "source cache")
/// option as qemu-img does: an unknown mode is reported as `Invalid KIND option: MODE`
/// and gives `false`.
pub fn cache_mode_ok(ctx: &Ctx, kind: &str, mode: &str) -> bool {
    if valid_cache_mode(mode) {
        return true;
    }
    ctx.error(format!("Invalid {kind} option: {mode}"));
    false
}

/// Image formats qemu-img 10 knows: an output format oxcow does not write yet gets a
/// "not supported yet" message instead of qemu-img's "Unknown file format".
pub fn qemu_knows_format(fmt: &str) -> bool {
    matches!(
        fmt,
        "blkdebug"
            | "blklogwrites"
            | "blkverify"
            | "bochs"
            | "cloop"
            | "compress"
            | "copy-before-write"
            | "copy-on-read"
            | "dmg"
            | "file"
            | "ftp"
            | "ftps"
            | "gluster"
            | "host_cdrom"
            | "host_device"
            | "http"
            | "https"
            | "iscsi"
            | "iser"
            | "luks"
            | "nbd"
            | "nfs"
            | "null-aio"
            | "null-co"
            | "nvme"
            | "parallels"
            | "preallocate"
            | "qcow"
            | "qcow2"
            | "qed"
            | "quorum"
            | "raw"
            | "rbd"
            | "replication"
            | "snapshot-access"
            | "ssh"
            | "throttle"
            | "vdi"
            | "vhdx"
            | "vmdk"
            | "vpc"
            | "vvfat"
    )
}

/// The message for an output format qemu-img has but oxcow does not write yet.
pub fn unsupported_output_format(fmt: &str) -> String {
    format!("Output format '{fmt}' is not supported yet (only 'raw' can be written)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_loop_start() {
        let ctx = Ctx {
            prog: "qemu-img".into(),
        };
        let opt = |id: &str, arg: Option<&str>| Opt {
            id: id.into(),
            arg: arg.map(str::to_string),
        };
        let next = |item| next_option(&ctx, "amend", "help", item);
        assert_eq!(
            next(Ok(opt("f", Some("raw")))),
            Ok(("f".into(), "raw".into()))
        );
        assert_eq!(next(Ok(opt("q", None))), Ok(("q".into(), String::new())));
        assert_eq!(next(Ok(opt("h", None))), Err(0));
        assert_eq!(next(Err("invalid option -- 'z'".into())), Err(1));
        assert!(cache_mode_ok(&ctx, "cache", "writeback"));
        assert!(!cache_mode_ok(&ctx, "cache", "bogus"));
        assert_eq!(object_unsupported(&ctx), 1);
    }

    #[test]
    fn image_opts_refusals() {
        assert_eq!(
            image_opts_refusal(true, "a.qcow2"),
            "--image-opts and --format are mutually exclusive"
        );
        assert_eq!(
            image_opts_refusal(false, "a.qcow2"),
            "Could not open 'a.qcow2': --image-opts is not supported by oxcow"
        );
    }

    #[test]
    fn integers_like_strtoull() {
        assert_eq!(strtou64("0x10"), Some(Ok(16)));
        assert_eq!(strtou64("010"), Some(Ok(8)));
        assert_eq!(strtou64(" 7"), Some(Ok(7)));
        assert_eq!(strtou64("0"), Some(Ok(0)));
        assert_eq!(strtou64("-1"), Some(Ok(u64::MAX)));
        assert_eq!(strtou64("99999999999999999999"), Some(Err(())));
        for bad in ["1k", "08", "", "0x", "abc", "1 "] {
            assert_eq!(strtou64(bad), None, "{bad}");
        }
    }
}
