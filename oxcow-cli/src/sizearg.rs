//! Numbers on the command line as qemu-img reads them: `qemu_strtosz()` (sizes with an
//! optional binary suffix B, K, M, G, T, P, E and decimal fractions: `1.5k`, `0x200`)
//! and `cvtnum()`'s error messages.

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number (EINVAL).
    Invalid,
    /// Out of range (ERANGE): negative, or more than 64 bits.
    Range,
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// C's strtoull on `s` in `base` (10 or 16): leading white space, a sign, an optional
/// 0x prefix in base 16, digits. Returns (value, bytes consumed, overflowed); consumed
/// is 0 when no digit was found.
fn strtoull(s: &[u8], base: u32) -> (u64, usize, bool) {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    if base == 16
        && i + 1 < s.len()
        && s[i] == b'0'
        && (s[i + 1] | 0x20) == b'x'
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut v: u64 = 0;
    let mut overflow = false;
    while i < s.len() {
        let Some(d) = (s[i] as char).to_digit(base) else {
            break;
        };
        match v
            .checked_mul(base as u64)
            .and_then(|x| x.checked_add(d as u64))
        {
            Some(x) => v = x,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return (0, 0, false);
    }
    if overflow {
        return (u64::MAX, i, true);
    }
    (if neg { v.wrapping_neg() } else { v }, i, false)
}

/// C's strtod on a fraction such as ".5" (exponents were cut off by the caller):
/// returns the value and the bytes consumed (0 when nothing parsed).
fn strtod_fraction(s: &[u8]) -> (f64, usize) {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let num_start = i;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        i += 1;
    }
    let mut digits = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
        digits += 1;
    }
    if i < s.len() && s[i] == b'.' {
        i += 1;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return (0.0, 0);
    }
    let text = std::str::from_utf8(&s[num_start..i]).unwrap_or("0");
    let text = text.strip_suffix('.').unwrap_or(text);
    (text.parse::<f64>().unwrap_or(0.0), i)
}

/// `qemu_strtosz()` on a whole argument: the default unit is bytes.
pub fn strtosz(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let (mut val, consumed, overflow) = strtoull(b, 10);
    if overflow {
        return Err(SizeError::Range);
    }
    // parse_uint refuses a minus sign (after any white space) as out of range.
    let trimmed = s.trim_start_matches(|c: char| c.is_ascii() && is_space(c as u8));
    let negative = consumed > 0 && trimmed.starts_with('-');
    let mut end = consumed;
    let mut valf: u64 = 0;
    if negative {
        return if end < b.len() {
            Err(SizeError::Invalid)
        } else {
            Err(SizeError::Range)
        };
    }
    let mut ok = consumed > 0;
    if ok && val == 0 && matches!(b.get(end), Some(b'x' | b'X')) {
        let (v, c, over) = strtoull(b, 16);
        if over {
            return Err(SizeError::Range);
        }
        if c == 0 {
            return Err(SizeError::Invalid);
        }
        val = v;
        end = c;
        if b.get(end) == Some(&b'.') || suffix_mul(b.get(end).copied()).is_some() {
            return Err(SizeError::Invalid);
        }
    } else if b.get(end) == Some(&b'.') || (consumed == 0 && s.contains('.')) {
        let fraction;
        if ok && b.get(end) == Some(&b'.') && !b.get(end + 1).is_some_and(|c| c.is_ascii_digit()) {
            end += 1;
            fraction = 0.0;
        } else {
            let rest = &b[end..];
            let cut = rest
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .unwrap_or(rest.len());
            let (f, c) = strtod_fraction(&rest[..cut]);
            ok = c > 0;
            end += c;
            if f.is_sign_negative() && c > 0 {
                return Err(SizeError::Range);
            }
            fraction = f;
        }
        if ok {
            if fraction == 1.0 {
                val = val.checked_add(1).ok_or(SizeError::Range)?;
            } else {
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        }
    }
    if !ok {
        return Err(SizeError::Invalid);
    }
    let mul = match suffix_mul(b.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end < b.len() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 {
        if valf != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(val);
    }
    let whole = val as u128 * mul as u128;
    let frac = valf as u128 * mul as u128;
    // The fraction's integer part, rounded on its highest dropped bit.
    let total = whole + (frac >> 64) + ((frac >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// `cvtnum()`: a size between 0 and i64::MAX, or qemu-img's message naming `what`.
pub fn cvtnum(what: &str, s: &str) -> Result<u64, String> {
    match strtosz(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {what} specified: '{s}'.")),
        _ => Err(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(strtosz("0"), Ok(0));
        assert_eq!(strtosz("512"), Ok(512));
        assert_eq!(strtosz("1k"), Ok(1024));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("1.5K"), Ok(1536));
        assert_eq!(strtosz("2M"), Ok(2 << 20));
        assert_eq!(strtosz("0x200"), Ok(512));
        assert_eq!(strtosz("1536b"), Ok(1536));
        assert_eq!(strtosz("1."), Ok(1));
        assert_eq!(strtosz(".5k"), Ok(512));
        assert_eq!(strtosz("1.5"), Err(SizeError::Invalid));
        assert_eq!(strtosz("1kB"), Err(SizeError::Invalid));
        assert_eq!(strtosz("1e3"), Err(SizeError::Invalid));
        assert_eq!(strtosz("abc"), Err(SizeError::Invalid));
        assert_eq!(strtosz(""), Err(SizeError::Invalid));
        assert_eq!(strtosz("0x20M"), Err(SizeError::Invalid));
        assert_eq!(strtosz("-5"), Err(SizeError::Range));
        assert_eq!(strtosz("-5k"), Err(SizeError::Invalid));
        assert_eq!(strtosz("16E"), Err(SizeError::Range));
        assert_eq!(strtosz("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(strtosz("12.345M"), Ok((12.345f64 * 1048576.0 + 0.5) as u64));
    }

    #[test]
    fn messages() {
        assert_eq!(
            cvtnum("start offset", "abc"),
            Err("Invalid start offset specified: 'abc'.".to_string())
        );
        assert_eq!(
            cvtnum("max length", "-1"),
            Err(
                "Invalid max length specified. Must be between 0 and 9223372036854775807."
                    .to_string()
            )
        );
        assert_eq!(
            cvtnum("max length", "8E"),
            Err(
                "Invalid max length specified. Must be between 0 and 9223372036854775807."
                    .to_string()
            )
        );
    }
}
