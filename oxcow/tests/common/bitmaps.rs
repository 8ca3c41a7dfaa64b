//! Helpers of the bitmap tests: QEMU's view of a bitmap (qemu-nbd exports it as a
//! metadata context; `qemu-img map` with x-dirty-bitmap shows its dirty areas as
//! "data": false), the bitmap list of `qemu-img info`, and guest operations applied
//! alike through qemu-io and oxcow.

use super::qemu_check_json;
use super::{parse_map, qemu_img, run, Rng};
use oxcow::{BlockDevice, Image};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

/// The dirty ranges of bitmap `name` of the qcow2 image `path`, as QEMU reads them.
pub fn qemu_dirty_ranges(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = path.parent().unwrap();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sock = dir.join(format!("nbd-{n}.sock"));
    let pidf = dir.join(format!("nbd-{n}.pid"));
    let _ = std::fs::remove_file(&sock);
    run(Command::new("qemu-nbd")
        .args(["--fork", "-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pidf)
        .arg(path));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .unwrap();
    // The server ends when its one client leaves; make sure of it.
    if let Ok(pid) = std::fs::read_to_string(&pidf) {
        let pid = pid.trim().to_string();
        let _ = Command::new("kill").arg(&pid).output();
        // Wait for it to go, and with it its lock on the image.
        for _ in 0..500 {
            // Gone, or a zombie nobody reaps (a container's init may not).
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(st) if !st.contains(") Z ") => {}
                _ => break,
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    assert!(
        out.status.success(),
        "qemu-img map over nbd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for r in parse_map(&String::from_utf8_lossy(&out.stdout)) {
        if !r.data {
            match ranges.last_mut() {
                Some(l) if l.0 + l.1 == r.start => l.1 += r.len,
                _ => ranges.push((r.start, r.len)),
            }
        }
    }
    ranges
}

/// `qemu-img info`'s bitmap list: (name, granularity, flags).
pub fn qemu_bitmap_list(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = qemu_img(
        path.parent().unwrap(),
        &["info", "--output=json", "-U", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = &v["format-specific"]["data"]["bitmaps"];
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `qemu-img check` passes with no corruption and no leak.
pub fn assert_check_clean(path: &Path) {
    let out = qemu_check_json(path);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {s}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert!(
        v.get("corruptions").is_none() && v.get("leaks").is_none(),
        "{s}"
    );
}

/// A guest operation, for qemu-io and for oxcow alike.
#[derive(Debug, Clone, Copy)]
pub enum GuestOp {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Compressed(u64),
}

impl GuestOp {
    /// A random operation. Compressed writes go to the upper half of the disk, each
    /// to a cluster of its own (`used`), where nothing else writes: QEMU refuses to
    /// compress over data.
    pub fn random(rng: &mut Rng, size: u64, cluster: u64, used: &mut HashSet<u64>) -> GuestOp {
        let half = size / 2 / cluster * cluster;
        let off = rng.below(half);
        let len = (rng.between(1, 3 * cluster)).min(half - off).max(1);
        if rng.below(10) == 9 {
            let c = half + rng.below((size - half) / cluster) * cluster;
            if used.insert(c) {
                return GuestOp::Compressed(c);
            }
        }
        match rng.below(10) {
            0..=4 => GuestOp::Write(off, len),
            5 | 6 => GuestOp::Zero(off, len, rng.percent(50)),
            _ => GuestOp::Discard(off, len),
        }
    }

    /// The qemu-io command (run with `-d unmap` so that discards happen).
    pub fn qemu_io(&self, cluster: u64, size: u64) -> String {
        match *self {
            GuestOp::Write(o, l) => format!("write -P 0x5a {o} {l}"),
            GuestOp::Zero(o, l, u) => format!("write -z{} {o} {l}", if u { " -u" } else { "" }),
            GuestOp::Discard(o, l) => format!("discard {o} {l}"),
            GuestOp::Compressed(o) => format!("write -c -P 0x11 {o} {}", cluster.min(size - o)),
        }
    }

    pub fn apply(&self, img: &Image, cluster: u64) {
        match *self {
            GuestOp::Write(o, l) => img.write_at(&vec![0x5a; l as usize], o).unwrap(),
            GuestOp::Zero(o, l, u) => img.write_zeroes(o, l, u).unwrap(),
            GuestOp::Discard(o, l) => img.discard(o, l).unwrap(),
            GuestOp::Compressed(o) => {
                let n = cluster.min(img.size() - o);
                // Compression needs a cluster without data: like QEMU, it fails
                // otherwise (the dirty bit is set all the same).
                let _ = img
                    .qcow2()
                    .unwrap()
                    .write_compressed(&vec![0x11; n as usize], o);
            }
        }
    }
}
