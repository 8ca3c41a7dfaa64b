//! Arguments of qemu-io commands: numbers (`cvtnum()`: qemu_strtosz with k/M/G...
//! suffixes, at most INT64_MAX), pattern bytes (`strtol` in any base), and getopt on a
//! command's words, with qemu-io's messages for each failure.

use crate::qopt::{Getopt, Opt};
use crate::sizearg::{strtosz, SizeError};

pub const EPERM: i32 = 1;
pub const EIO: i32 = 5;
pub const EINVAL: i32 = 22;
pub const ERANGE: i32 = 34;
pub const ENOTSUP: i32 = 95;

/// The largest request qemu's block layer takes (`BDRV_REQUEST_MAX_BYTES`).
pub const REQUEST_MAX_BYTES: u64 = (i32::MAX as u64) & !511;

/// `cvtnum()`: a size as qemu-io reads it; the error is a negative errno.
pub fn cvtnum(s: &str) -> Result<u64, i32> {
    match strtosz(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(SizeError::Range) => Err(-ERANGE),
        Err(SizeError::Invalid) => Err(-EINVAL),
    }
}

/// `print_cvtnum_err()`'s words for a failed [`cvtnum`].
pub fn cvtnum_error(rc: i32, arg: &str) -> String {
    match rc {
        x if x == -EINVAL => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        ),
        x if x == -ERANGE => format!("Parsing error: argument too large -- {arg}\n"),
        _ => format!("Parsing error: {arg}\n"),
    }
}

/// C's `strtol(s, &end, 0)`: the value (saturated as strtol saturates) and whether
/// the whole string was consumed.
pub fn strtol(s: &str) -> (i64, bool) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let mut neg = false;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        neg = b[i] == b'-';
        i += 1;
    }
    let mut base = 10;
    if i + 1 < b.len()
        && b[i] == b'0'
        && (b[i + 1] | 0x20) == b'x'
        && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        base = 16;
        i += 2;
    } else if i < b.len() && b[i] == b'0' {
        base = 8;
    }
    let start = i;
    let mut v: i128 = 0;
    while i < b.len() {
        let Some(d) = (b[i] as char).to_digit(base) else {
            break;
        };
        v = (v * base as i128 + d as i128).min(i64::MAX as i128 + 1);
        i += 1;
    }
    if i == start {
        // No digits: nothing is consumed at all.
        return (0, s.is_empty());
    }
    let v = if neg { -v } else { v };
    let v = v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    (v, i == b.len())
}

/// `parse_pattern()`: a byte value, or qemu-io's message.
pub fn parse_pattern(arg: &str) -> Result<u8, String> {
    let (v, whole) = strtol(arg);
    if !(0..=255).contains(&v) || !whole {
        return Err(format!("{arg} is not a valid pattern byte\n"));
    }
    Ok(v as u8)
}

/// getopt over a command's words (`argv[0]` is the command as typed): the options in
/// the order getopt returns them, up to and including the first invalid one (glibc's
/// message, prefixed with the command name, for standard error), then the operands.
/// Callers handle the options in order, so that an option whose argument is wrong
/// stops the command before a later invalid option is noticed, as in qemu-io.
pub struct CmdOpts {
    pub items: Vec<Result<Opt, String>>,
    pub operands: Vec<String>,
    /// `argv[1]` once getopt has permuted the options before the operands.
    pub argv1: Option<String>,
}

pub fn getopt(argv: &[String], spec: &'static str) -> CmdOpts {
    let words = argv.get(1..).unwrap_or(&[]);
    let mut g = Getopt::new(words, spec, &[]);
    let mut items = Vec::new();
    let mut any = false;
    while let Some(o) = g.next_opt() {
        match o {
            Ok(o) => {
                any = true;
                items.push(Ok(o));
            }
            Err(e) => {
                let cmd = argv.first().map(String::as_str).unwrap_or("");
                items.push(Err(format!("{cmd}: {e}\n")));
                break;
            }
        }
    }
    let operands = g.operands().to_vec();
    let argv1 = if any {
        words
            .iter()
            .find(|w| w.len() > 1 && w.starts_with('-'))
            .cloned()
    } else {
        operands.first().cloned()
    };
    CmdOpts {
        items,
        operands,
        argv1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_like_cvtnum() {
        assert_eq!(cvtnum("4k"), Ok(4096));
        assert_eq!(cvtnum("0x10"), Ok(16));
        assert_eq!(cvtnum("1.5k"), Ok(1536));
        assert_eq!(cvtnum("9E"), Err(-ERANGE));
        assert_eq!(cvtnum("-1"), Err(-ERANGE));
        assert_eq!(cvtnum("1x"), Err(-EINVAL));
        assert_eq!(cvtnum("9223372036854775807"), Ok(i64::MAX as u64));
        assert_eq!(cvtnum("9223372036854775808"), Err(-ERANGE));
    }

    #[test]
    fn patterns_like_strtol() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("255"), Ok(255));
        assert_eq!(parse_pattern("010"), Ok(8));
        assert_eq!(parse_pattern("-0"), Ok(0));
        assert_eq!(parse_pattern(" 7"), Ok(7));
        assert!(parse_pattern("0x1ff").is_err());
        assert!(parse_pattern("-1").is_err());
        assert!(parse_pattern("08").is_err());
        assert!(parse_pattern("0x").is_err());
        assert!(parse_pattern("a").is_err());
        assert!(parse_pattern("99999999999999999999999").is_err());
        assert_eq!(
            parse_pattern("x").unwrap_err(),
            "x is not a valid pattern byte\n"
        );
    }

    #[test]
    fn getopt_permutes_and_reports() {
        let argv: Vec<String> = ["read", "0", "4", "-vP", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = getopt(&argv, "bCl:pP:qrs:v");
        assert_eq!(o.operands, vec!["0", "4"]);
        assert_eq!(o.items.len(), 2);
        assert_eq!(o.argv1.as_deref(), Some("-vP"));
        let argv: Vec<String> = ["r", "-x", "0"].iter().map(|s| s.to_string()).collect();
        let o = getopt(&argv, "bCl:pP:qrs:v");
        assert_eq!(o.items, vec![Err("r: invalid option -- 'x'\n".to_string())]);
    }
}
