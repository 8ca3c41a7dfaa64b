//! Human-readable numbers as qemu-img prints them.

/// QEMU's size_to_str: binary units with up to three significant digits.
pub fn size_to_str(size: u64) -> String {
    const SUFFIXES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut div = 1u128;
    while i + 1 < SUFFIXES.len() && (size as u128) >= div * 1024 {
        div *= 1024;
        i += 1;
    }
    // QEMU divides in floating point and prints with %0.3g.
    let v = size as f64 / div as f64;
    format!("{} {}", fmt_g3(v), SUFFIXES[i])
}

/// printf("%0.3g") for values below 1024.
fn fmt_g3(v: f64) -> String {
    let s = if v >= 100.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    };
    // %g strips trailing zeros and a trailing point.
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    // Rounding can carry into a fourth digit (999.5 -> "1000"); %g would then switch
    // to exponent form, which QEMU never reaches because the unit changes first.
    s
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
    }
}
