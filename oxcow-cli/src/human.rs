//! Human-readable numbers as qemu-img prints them.

/// QEMU's size_to_str: binary units, switching up once the value reaches 1000 of a
/// unit (1000 KiB prints as "0.977 MiB"), printed with `%0.3g`.
pub fn size_to_str(size: u64) -> String {
    const PREFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(size / (1000.0 / 1024.0)): the binary exponent e with x = m * 2^e,
    // 0.5 <= m < 1 (0 for 0); then i = (e - 1) / 10 * 10, truncating as C does.
    let x = size as f64 / (1000.0 / 1024.0);
    let e: i64 = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let i = ((e - 1) / 10 * 10).clamp(0, 60);
    let v = size as f64 / (1u64 << i) as f64;
    format!("{} {}B", fmt_g(v, 3), PREFIXES[(i / 10) as usize])
}

/// printf's `%.{prec}g` for a finite non-negative value.
pub fn fmt_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let prec = prec.max(1);
    // The exponent of the value rounded to `prec` significant digits decides the style.
    let sci = format!("{:.*e}", prec - 1, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

/// %g drops trailing zeros of the fraction, and the point itself when nothing follows.
fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(196 * 1024), "196 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(4_718_592), "4.5 MiB");
        // Observed with qemu-img 10.
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(10752), "10.5 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(1_022_976), "999 KiB");
        assert_eq!(size_to_str(1_023_488), "1e+03 KiB");
        assert_eq!(size_to_str(1_024_000), "0.977 MiB");
        assert_eq!(size_to_str(1_314_816), "1.25 MiB");
        assert_eq!(size_to_str(1_376_256), "1.31 MiB");
        assert_eq!(size_to_str(5_000_000), "4.77 MiB");
        assert_eq!(size_to_str(1_048_064_000), "1e+03 MiB");
        assert_eq!(size_to_str(1_073_217_536), "1 GiB");
        assert_eq!(size_to_str(1_610_612_736), "1.5 GiB");
        assert_eq!(size_to_str(1023), "0.999 KiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
