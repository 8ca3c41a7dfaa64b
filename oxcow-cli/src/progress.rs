//! qemu-img's `-p` progress output (util/qemu-progress.c): `    (NN.NN/100%)` followed
//! by a carriage return on stdout, reprinted when the value moved by more than
//! `min_skip` points, and a newline at the end. The state is a C `float`, so the
//! arithmetic is done in f32 to print the very same numbers.

use std::io::Write;

#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// `qemu_progress_init(enabled, min_skip)`.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// `qemu_progress_print(delta, max)`: with `max == 0`, `delta` is the new absolute
    /// value; otherwise the value grows by `delta / 100 * max`.
    pub fn print(&mut self, delta: f32, max: i32) {
        if !self.enabled {
            return;
        }
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = self.current;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({:.2}/100%)\r", self.current as f64);
            let _ = out.flush();
        }
    }

    /// `qemu_progress_end()`: the final newline.
    pub fn end(&mut self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_only_past_min_skip() {
        let mut p = Progress::new(false, 2.0);
        p.print(1.0, 100);
        assert_eq!(p.current, 0.0, "disabled progress keeps no state");
        // The state is an f32: 10 MiB of 64 MiB is 15.625, printed "15.62".
        let base = 67108864u64 as f32;
        let v = 0.0f32 + ((10485760f32 / base) * 100.0) / 100.0 * 100.0;
        assert_eq!(format!("{:.2}", v as f64), "15.62");
    }
}
