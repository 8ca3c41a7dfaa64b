//! What qemu-io prints, as it prints it: stdout buffered the way glibc's stdio buffers
//! it (so that `abort` loses what a crashing qemu-io loses), sizes in its `cvtstr()`
//! words, the two-line I/O report with its timing line, and the `read -v` hex dump.

use std::io::Write;
use std::time::Duration;

/// Standard output as glibc's stdio keeps it: line buffered on a terminal, fully
/// buffered otherwise (in blocks of the file's `st_blksize`). Only whole blocks leave
/// the buffer before an explicit flush, so a process that aborts loses the same
/// unflushed tail as qemu-io does.
pub struct Out {
    buf: Vec<u8>,
    block: usize,
    line: bool,
}

impl Out {
    pub fn new() -> Out {
        // SAFETY: isatty and fstat only read the descriptor's state; `st` is a plain
        // C struct for which all-zero bytes are a valid value.
        let (line, block) = unsafe {
            let line = libc::isatty(1) == 1;
            let mut st: libc::stat = std::mem::zeroed();
            let block = if libc::fstat(1, &mut st) == 0 && st.st_blksize > 0 {
                st.st_blksize as usize
            } else {
                8192
            };
            (line, block)
        };
        Out {
            buf: Vec::new(),
            block,
            line,
        }
    }

    /// Appends text to standard output.
    pub fn put(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
        if self.line {
            if s.contains('\n') {
                self.flush();
            }
        } else if self.buf.len() > self.block {
            let n = self.buf.len() / self.block * self.block;
            write_stdout(&self.buf[..n]);
            self.buf.drain(..n);
        }
    }

    /// `fflush(stdout)`.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            write_stdout(&self.buf);
            self.buf.clear();
        }
    }
}

fn write_stdout(b: &[u8]) {
    let mut o = std::io::stdout().lock();
    // Like stdio, a failed write (a closed pipe) is not reported.
    let _ = o.write_all(b);
    let _ = o.flush();
}

const KIB: f64 = 1024.0;

/// qemu-io's `cvtstr()`: a size with a binary unit and three decimals, a trailing
/// ".000" dropped ("64 KiB", "1.500 MiB", "292.867791 bytes").
pub fn cvtstr(value: f64) -> String {
    let units = [
        (6, " EiB"),
        (5, " PiB"),
        (4, " TiB"),
        (3, " GiB"),
        (2, " MiB"),
        (1, " KiB"),
    ];
    let (mut s, suffix) = units
        .iter()
        .find(|(p, _)| value >= KIB.powi(*p))
        .map(|(p, suf)| (c_fixed(value / KIB.powi(*p), 3), *suf))
        .unwrap_or_else(|| (c_fixed(value, 6), " bytes"));
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    s.push_str(suffix);
    s
}

/// printf's `%.Nf`, including its spelling of infinities and NaN.
pub fn c_fixed(v: f64, prec: usize) -> String {
    if v.is_nan() {
        if v.is_sign_negative() { "-nan" } else { "nan" }.to_string()
    } else if v.is_infinite() {
        if v < 0.0 { "-inf" } else { "inf" }.to_string()
    } else {
        format!("{v:.prec$}")
    }
}

/// qemu-io's `timestr()`: "SS.ss sec" under a second, "H:MM:SS.ss" above (and
/// always with -C).
fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = t.subsec_nanos() as f64 / 1e9;
    if verbose || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs % 3600) / 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

fn tdiv(value: f64, t: Duration) -> f64 {
    value / t.as_secs_f64()
}

/// qemu-io's `print_report()`: "OP TOTAL/COUNT bytes at offset OFF" and the timing
/// line, or with -C one machine-readable line.
pub fn report(
    op: &str,
    t: Duration,
    offset: u64,
    count: u64,
    total: u64,
    cnt: u32,
    cflag: bool,
) -> String {
    let ts = timestr(t, cflag);
    if !cflag {
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {cnt} ops; {ts} ({}/sec and {} ops/sec)\n",
            cvtstr(total as f64),
            cvtstr(tdiv(total as f64, t)),
            c_fixed(tdiv(cnt as f64, t), 4)
        )
    } else {
        format!(
            "{total},{cnt},{ts},{},{}\n",
            c_fixed(tdiv(total as f64, t), 3),
            c_fixed(tdiv(cnt as f64, t), 3)
        )
    }
}

/// qemu-io's `dump_buffer()`: 16 bytes a line, offset in hex, then the bytes in hex,
/// then as text (letters and digits; a dot for anything else).
pub fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut s = String::with_capacity(buf.len() * 4 + buf.len() / 16 * 14);
    for (i, line) in buf.chunks(16).enumerate() {
        s.push_str(&format!("{:08x}:  ", offset + i as u64 * 16));
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_qemu_io_words() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(197120.0), "192.500 KiB");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(32.0), "32 bytes");
        assert_eq!(cvtstr(292.867791), "292.867791 bytes");
        assert_eq!(cvtstr(0.000123), "0 bytes");
        assert_eq!(cvtstr(f64::INFINITY), "inf EiB");
        assert_eq!(cvtstr((1u64 << 50) as f64), "1 PiB");
        assert_eq!(cvtstr(536870912.0), "512 MiB");
    }

    #[test]
    fn timing_like_qemu_io() {
        assert_eq!(timestr(Duration::from_millis(30), false), "00.03 sec");
        assert_eq!(timestr(Duration::from_millis(61_500), false), "0:01:01.50");
        assert_eq!(timestr(Duration::from_millis(5), true), "0:00:00.01");
        let r = report("wrote", Duration::from_secs(1), 0, 65536, 65536, 1, false);
        assert_eq!(
            r,
            "wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 0:00:01.00 (64 KiB/sec and 1.0000 ops/sec)\n"
        );
        let r = report("read", Duration::from_secs(2), 512, 512, 512, 1, true);
        assert_eq!(r, "512,1,0:00:02.00,256.000,0.500\n");
    }

    #[test]
    fn hexdump_like_qemu_io() {
        let mut b = vec![0xabu8; 20];
        b[1] = b'A';
        b[2] = b'7';
        assert_eq!(
            dump_buffer(&b, 0x10),
            "00000010:  ab 41 37 ab ab ab ab ab ab ab ab ab ab ab ab ab  .A7.............\n\
             00000020:  ab ab ab ab  ....\n"
        );
        assert_eq!(dump_buffer(&[], 0), "");
    }
}
