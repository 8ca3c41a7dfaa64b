//! Internal snapshots, both ways between oxcow and QEMU: QEMU creates snapshots
//! (qemu-img snapshot -c after qemu-io writes) that oxcow lists, applies and deletes;
//! oxcow creates snapshots that qemu-img lists, applies and deletes; both tools write
//! between snapshots. After every step `qemu-img check` must find nothing (no errors,
//! no leaks), and the active disk (qemu-img convert -O raw, and oxcow's reads) and
//! every snapshot (qemu-img convert -l snapshot.id=ID) must equal a model. Covers v2
//! and v3, refcount_bits 1 and 64, 512 B and 2 MiB clusters, extended L2, compressed
//! clusters, a backing file and resizes between snapshots (apply restores the size).

mod common;

use common::{create_qcow2, qemu_img, qemu_io, qemu_raw, run, tempdir, Rng};
use oxcow::{BlockDevice, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

const IMG: &str = "img.qcow2";

/// What the disk and each snapshot hold.
struct Model {
    active: Vec<u8>,
    /// (id, name, contents)
    snaps: Vec<(String, String, Vec<u8>)>,
    /// The backing file's contents, if any.
    backing: Option<Vec<u8>>,
    v2: bool,
    cs: u64,
}

impl Model {
    /// A discard of whole clusters: zeros, except that v2 images over a backing file
    /// ignore discards (as QEMU does: they could only show the backing file).
    fn discarded(&mut self, start: usize, end: usize) {
        if self.v2 && self.backing.is_some() {
            return;
        }
        let end = end.min(self.active.len());
        self.active[start..end].fill(0);
    }

    fn snap(&self, id_or_name: &str) -> Vec<u8> {
        self.snaps
            .iter()
            .find(|s| s.0 == id_or_name)
            .or_else(|| self.snaps.iter().find(|s| s.1 == id_or_name))
            .unwrap_or_else(|| panic!("no snapshot {id_or_name} in the model"))
            .2
            .clone()
    }

    fn remove(&mut self, id: &str) {
        self.snaps.retain(|s| s.0 != id);
    }
}

fn open_rw(dir: &Path) -> Image {
    common::open_writable(&dir.join(IMG))
}

/// `qemu-img snapshot -l` as (id, name) pairs.
fn qemu_list(dir: &Path) -> Vec<(String, String)> {
    qemu_img(dir, &["snapshot", "-l", IMG])
        .lines()
        .skip(2)
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_string(), w.next().unwrap().to_string())
        })
        .collect()
}

/// Everything agrees with the model, for both tools.
fn verify(dir: &Path, m: &Model, step: &str) {
    let check = qemu_img(dir, &["check", IMG]);
    assert!(
        check.contains("No errors were found on the image."),
        "{step}: qemu-img check:\n{check}"
    );
    let active = qemu_raw(dir, IMG);
    common::assert_bytes(
        &format!("{step}: active disk (qemu)"),
        &active,
        &m.active,
        0,
    );
    let want: Vec<(String, String)> = m.snaps.iter().map(|s| (s.0.clone(), s.1.clone())).collect();
    assert_eq!(qemu_list(dir), want, "{step}: qemu-img snapshot -l");
    let img = Image::open(dir.join(IMG), &OpenOptions::default()).unwrap();
    let ours: Vec<(String, String)> = img
        .snapshots()
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    assert_eq!(ours, want, "{step}: oxcow's snapshot list");
    let mut got = vec![0u8; img.size() as usize];
    img.read_at(&mut got, 0).unwrap();
    common::assert_bytes(&format!("{step}: active disk (oxcow)"), &got, &m.active, 0);
    for (id, name, data) in &m.snaps {
        let out = dir.join("snap.raw");
        run(Command::new("qemu-img").current_dir(dir).args([
            "convert",
            "-l",
            &format!("snapshot.id={id}"),
            "-O",
            "raw",
            IMG,
            out.to_str().unwrap(),
        ]));
        // QEMU reads a snapshot at the current disk size: zeros past its own end.
        let got = std::fs::read(&out).unwrap();
        let mut want = data.clone();
        want.resize(m.active.len(), 0);
        common::assert_bytes(&format!("{step}: snapshot {id} ({name})"), &got, &want, 0);
    }
}

/// A few random qemu-io writes, zero writes and discards.
fn qemu_ops(dir: &Path, m: &mut Model, rng: &mut Rng, n: usize) {
    let size = m.active.len() as u64;
    let mut cmds = Vec::new();
    for _ in 0..n {
        let off = rng.below(size / 512) * 512;
        let len = (rng.between(1, m.cs * 2 / 512) * 512).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let v = rng.between(1, 255) as u8;
                cmds.push(format!("write -P {v} {off} {len}"));
                m.active[off as usize..(off + len) as usize].fill(v);
            }
            6 | 7 => {
                cmds.push(format!("write -z {off} {len}"));
                m.active[off as usize..(off + len) as usize].fill(0);
            }
            // QEMU ignores discards of v2 images with a backing file.
            _ if m.v2 && m.backing.is_some() => {}
            _ => {
                let c = off / m.cs * m.cs;
                let l = m.cs.min(size - c);
                cmds.push(format!("discard {c} {l}"));
                m.discarded(c as usize, (c + l) as usize);
            }
        }
    }
    qemu_io(dir, IMG, &cmds);
}

/// The same through oxcow.
fn ox_ops(dir: &Path, m: &mut Model, rng: &mut Rng, n: usize) {
    let img = open_rw(dir);
    let size = m.active.len() as u64;
    for _ in 0..n {
        let off = rng.below(size / 512) * 512;
        let len = (rng.between(1, m.cs * 2 / 512) * 512).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let v = rng.between(1, 255) as u8;
                img.write_at(&vec![v; len as usize], off).unwrap();
                m.active[off as usize..(off + len) as usize].fill(v);
            }
            6 | 7 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                m.active[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let c = off / m.cs * m.cs;
                let l = m.cs.min(size - c);
                img.discard(c, l).unwrap();
                m.discarded(c as usize, (c + l) as usize);
            }
        }
    }
    img.flush().unwrap();
}

fn qemu_snapshot(dir: &Path, m: &mut Model, name: &str) {
    qemu_img(dir, &["snapshot", "-c", name, IMG]);
    let id = qemu_list(dir).last().unwrap().0.clone();
    m.snaps.push((id, name.to_string(), m.active.clone()));
}

fn ox_snapshot(dir: &Path, m: &mut Model, name: &str) {
    let e = open_rw(dir).create_snapshot(name).unwrap();
    m.snaps.push((e.id, name.to_string(), m.active.clone()));
}

struct Case {
    opts: &'static str,
    size: u64,
    cs: u64,
    backing: bool,
    resize: bool,
    seed: u64,
}

fn scenario(c: Case) {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(c.seed);
    let v2 = c.opts.contains("compat=0.10");
    let mut backing = None;
    let mut opts = c.opts.to_string();
    if c.backing {
        // A backing file shorter than the disk: the rest reads as zeros.
        let b = rng.bytes((c.size - c.size / 4) as usize);
        std::fs::write(d.join("base.raw"), &b).unwrap();
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str("backing_file=base.raw,backing_fmt=raw");
        backing = Some(b);
    }
    create_qcow2(d, IMG, &opts, &c.size.to_string());
    let mut active = vec![0u8; c.size as usize];
    if let Some(b) = &backing {
        active[..b.len()].copy_from_slice(b);
    }
    let mut m = Model {
        active,
        snaps: Vec::new(),
        backing,
        v2,
        cs: c.cs,
    };
    // Compressed clusters first, while nothing is allocated.
    let mut cmds = Vec::new();
    for k in [1u64, 3] {
        let off = k * c.cs;
        if off + c.cs <= c.size {
            let v = 0x30 + k as u8;
            cmds.push(format!("write -c -P {v} {off} {}", c.cs));
            m.active[off as usize..(off + c.cs) as usize].fill(v);
        }
    }
    qemu_io(d, IMG, &cmds);
    qemu_ops(d, &mut m, &mut rng, 12);
    verify(d, &m, "qemu writes");

    // QEMU's snapshot, oxcow writes over it, then oxcow's snapshot.
    qemu_snapshot(d, &mut m, "q1");
    verify(d, &m, "qemu snapshot q1");
    ox_ops(d, &mut m, &mut rng, 12);
    verify(d, &m, "oxcow writes after q1");
    ox_snapshot(d, &mut m, "ox1");
    verify(d, &m, "oxcow snapshot ox1");
    qemu_ops(d, &mut m, &mut rng, 12);
    verify(d, &m, "qemu writes after ox1");
    ox_snapshot(d, &mut m, "ox2");
    ox_ops(d, &mut m, &mut rng, 8);
    verify(d, &m, "oxcow snapshot ox2 and writes");

    let small = c.size;
    if c.resize {
        // Grow with QEMU, write the new area, snapshot the larger disk.
        let big = small + 3 * c.cs + 512;
        qemu_img(d, &["resize", IMG, &big.to_string()]);
        m.active.resize(big as usize, 0);
        qemu_ops(d, &mut m, &mut rng, 8);
        ox_snapshot(d, &mut m, "big");
        ox_ops(d, &mut m, &mut rng, 8);
        verify(d, &m, "resized, snapshot big");
    }

    // oxcow applies QEMU's snapshot (by name): the disk size comes back too.
    open_rw(d).apply_snapshot("q1").unwrap();
    m.active = m.snap("q1");
    verify(d, &m, "oxcow applied q1");
    ox_ops(d, &mut m, &mut rng, 8);
    verify(d, &m, "oxcow writes after applying q1");

    // QEMU applies oxcow's snapshot.
    qemu_img(d, &["snapshot", "-a", "ox1", IMG]);
    m.active = m.snap("ox1");
    verify(d, &m, "qemu applied ox1");
    qemu_ops(d, &mut m, &mut rng, 8);
    verify(d, &m, "qemu writes after applying ox1");

    if c.resize {
        open_rw(d).apply_snapshot("big").unwrap();
        m.active = m.snap("big");
        verify(d, &m, "oxcow applied big");
        ox_ops(d, &mut m, &mut rng, 6);
        qemu_snapshot(d, &mut m, "q2");
        qemu_img(d, &["snapshot", "-a", "ox2", IMG]);
        m.active = m.snap("ox2");
        verify(d, &m, "qemu applied ox2 (smaller)");
    }

    // Deletions by both tools, of snapshots made by both.
    let q1 = m.snaps[0].0.clone();
    open_rw(d).delete_snapshot(&q1).unwrap();
    m.remove(&q1);
    verify(d, &m, "oxcow deleted q1 by id");
    qemu_img(d, &["snapshot", "-d", "ox1", IMG]);
    let ox1 = m.snaps.iter().find(|s| s.1 == "ox1").unwrap().0.clone();
    m.remove(&ox1);
    verify(d, &m, "qemu deleted ox1");
    ox_ops(d, &mut m, &mut rng, 6);
    qemu_snapshot(d, &mut m, "q3");
    verify(d, &m, "qemu snapshot q3");
    // oxcow deletes everything left; the image holds only the active disk.
    let names: Vec<String> = m.snaps.iter().map(|s| s.1.clone()).collect();
    for name in names {
        let e = open_rw(d).delete_snapshot(&name).unwrap();
        m.remove(&e.id);
        verify(d, &m, &format!("oxcow deleted {name}"));
    }
    ox_ops(d, &mut m, &mut rng, 6);
    verify(d, &m, "oxcow writes without snapshots");
}

#[test]
fn v3_64k_clusters_with_resize() {
    scenario(Case {
        opts: "",
        size: 4 << 20,
        cs: 65536,
        backing: false,
        resize: true,
        seed: 1,
    });
}

#[test]
fn v2_with_backing_file() {
    scenario(Case {
        opts: "compat=0.10",
        size: 2 << 20,
        cs: 65536,
        backing: true,
        resize: false,
        seed: 2,
    });
}

#[test]
fn v3_backing_file_and_resize() {
    scenario(Case {
        opts: "cluster_size=4096",
        size: 1 << 20,
        cs: 4096,
        backing: true,
        resize: true,
        seed: 3,
    });
}

#[test]
fn cluster_512_bytes_refcount_bits_64() {
    scenario(Case {
        opts: "cluster_size=512,refcount_bits=64",
        size: 512 << 10,
        cs: 512,
        backing: false,
        resize: true,
        seed: 4,
    });
}

#[test]
fn cluster_2m() {
    scenario(Case {
        opts: "cluster_size=2M",
        size: 12 << 20,
        cs: 2 << 20,
        backing: false,
        resize: true,
        seed: 5,
    });
}

#[test]
fn extended_l2() {
    scenario(Case {
        opts: "extended_l2=on",
        size: 4 << 20,
        cs: 65536,
        backing: true,
        resize: true,
        seed: 6,
    });
}

/// With 1-bit refcounts no cluster can be shared: both tools refuse to snapshot an
/// image that holds data (leaking the new L1 table, as QEMU does), and both snapshot
/// an empty one.
#[test]
fn refcount_bits_1() {
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(d, IMG, "refcount_bits=1", "1M");
    let mut m = Model {
        active: vec![0u8; 1 << 20],
        snaps: Vec::new(),
        backing: None,
        v2: false,
        cs: 65536,
    };
    qemu_snapshot(d, &mut m, "empty-q");
    ox_snapshot(d, &mut m, "empty-ox");
    verify(d, &m, "snapshots of an empty disk");
    open_rw(d).apply_snapshot("empty-q").unwrap();
    open_rw(d).delete_snapshot("empty-q").unwrap();
    m.snaps.remove(0);
    verify(d, &m, "apply and delete of an empty snapshot");

    let mut rng = Rng::new(7);
    ox_ops(d, &mut m, &mut rng, 6);
    m.active[..4096].fill(9);
    open_rw(d).write_at(&[9u8; 4096], 0).unwrap();
    let before = qemu_raw(d, IMG);
    let e = open_rw(d).create_snapshot("full").unwrap_err();
    assert_eq!(e.to_string(), "Invalid argument");
    let out = Command::new("qemu-img")
        .current_dir(d)
        .args(["check", "--output=json", IMG])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        !s.contains("\"corruptions\"") && s.contains("\"leaks\": 1,"),
        "after the refused snapshot: {s}"
    );
    assert_eq!(qemu_raw(d, IMG), before);
    assert_eq!(open_rw(d).snapshots().len(), 1);
    // QEMU refuses the same way.
    let out = Command::new("qemu-img")
        .current_dir(d)
        .args(["snapshot", "-c", "full", IMG])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qemu-img: Could not create snapshot 'full': Invalid argument\n"
    );
}
