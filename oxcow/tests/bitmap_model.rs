//! Dirty bitmaps against a model: random guest writes, write-zeroes, discards and
//! compressed writes mixed with bitmap operations (add, remove, enable, disable,
//! clear, merge, store) and reopens, checked at every step against a model that keeps
//! one flag per granule. At the end QEMU reads the image: the same bitmaps
//! (`qemu-img info`), the same dirty ranges (qemu-nbd), a clean `qemu-img check`.

mod common;

use common::bitmaps::*;
use common::open_writable as open_rw;
use common::*;
use oxcow::{BitmapOptions, BlockDevice, Image};
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone)]
struct ModelBitmap {
    granularity: u64,
    enabled: bool,
    persistent: bool,
    dirty: Vec<bool>,
}

impl ModelBitmap {
    fn mark(&mut self, off: u64, len: u64, size: u64) {
        if !self.enabled || len == 0 {
            return;
        }
        let end = (off + len).min(size);
        for g in off / self.granularity..=(end - 1) / self.granularity {
            self.dirty[g as usize] = true;
        }
    }

    fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &d) in self.dirty.iter().enumerate() {
            if !d {
                continue;
            }
            let start = i as u64 * self.granularity;
            let len = self.granularity.min(size - start);
            match out.last_mut() {
                Some(l) if l.0 + l.1 == start => l.1 += len,
                _ => out.push((start, len)),
            }
        }
        out
    }
}

fn compare(img: &Image, model: &BTreeMap<String, ModelBitmap>, size: u64, step: &str) {
    let mut listed: Vec<(String, u64, bool, bool)> = img
        .bitmaps()
        .iter()
        .map(|b| (b.name.clone(), b.granularity, b.enabled, b.persistent))
        .collect();
    listed.sort();
    let want: Vec<(String, u64, bool, bool)> = model
        .iter()
        .map(|(n, b)| (n.clone(), b.granularity, b.enabled, b.persistent))
        .collect();
    assert_eq!(listed, want, "after {step}");
    for (name, b) in model {
        assert_eq!(
            img.bitmap_dirty_ranges(name).unwrap(),
            b.ranges(size),
            "after {step}: bitmap {name}"
        );
    }
}

fn run_model(seed: u64, cluster: u64, size: u64, steps: usize) {
    let d = tempdir();
    let dir = d.path();
    let path = create_qcow2(
        dir,
        "m.qcow2",
        &format!("cluster_size={cluster}"),
        &size.to_string(),
    );
    let mut rng = Rng::new(seed);
    let mut model: BTreeMap<String, ModelBitmap> = BTreeMap::new();
    let mut img = open_rw(&path);
    let mut used = HashSet::new();
    let names = ["a", "b", "c", "d", "e"];
    for step in 0..steps {
        let what;
        match rng.below(20) {
            0..=7 => {
                let op = GuestOp::random(&mut rng, size, cluster, &mut used);
                op.apply(&img, cluster);
                let (o, l) = match op {
                    GuestOp::Write(o, l) | GuestOp::Zero(o, l, _) | GuestOp::Discard(o, l) => {
                        (o, l)
                    }
                    GuestOp::Compressed(o) => (o, cluster.min(size - o)),
                };
                model.values_mut().for_each(|b| b.mark(o, l, size));
                what = format!("{op:?}");
            }
            8..=10 => {
                let name = rng.pick(&names).to_string();
                let granularity = 1u64 << rng.between(9, 21);
                let opts = BitmapOptions {
                    granularity: Some(granularity),
                    persistent: rng.percent(85),
                    disabled: rng.percent(25),
                };
                let r = img.add_bitmap(&name, &opts);
                assert_eq!(r.is_ok(), !model.contains_key(&name), "add {name}: {r:?}");
                if r.is_ok() {
                    let n = size.div_ceil(granularity) as usize;
                    model.insert(
                        name.clone(),
                        ModelBitmap {
                            granularity,
                            enabled: !opts.disabled,
                            persistent: opts.persistent,
                            dirty: vec![false; n],
                        },
                    );
                }
                what = format!("add {name} {opts:?}");
            }
            11 => {
                let name = rng.pick(&names).to_string();
                assert_eq!(
                    img.remove_bitmap(&name).is_ok(),
                    model.remove(&name).is_some()
                );
                what = format!("remove {name}");
            }
            12 | 13 => {
                let name = rng.pick(&names).to_string();
                let on = rng.percent(50);
                let r = if on {
                    img.enable_bitmap(&name)
                } else {
                    img.disable_bitmap(&name)
                };
                assert_eq!(r.is_ok(), model.contains_key(&name));
                if let Some(b) = model.get_mut(&name) {
                    b.enabled = on;
                }
                what = format!("enable={on} {name}");
            }
            14 => {
                let name = rng.pick(&names).to_string();
                assert_eq!(img.clear_bitmap(&name).is_ok(), model.contains_key(&name));
                if let Some(b) = model.get_mut(&name) {
                    b.dirty.iter_mut().for_each(|x| *x = false);
                }
                what = format!("clear {name}");
            }
            15 | 16 => {
                let (to, from) = (rng.pick(&names).to_string(), rng.pick(&names).to_string());
                let r = img.merge_bitmap(&to, &img, &from);
                match (model.get(&from).cloned(), model.get_mut(&to)) {
                    (Some(src), Some(dst)) => {
                        r.unwrap();
                        for (o, l) in src.ranges(size) {
                            let end = o + l;
                            for g in o / dst.granularity..=(end - 1) / dst.granularity {
                                dst.dirty[g as usize] = true;
                            }
                        }
                    }
                    _ => assert!(r.is_err()),
                }
                what = format!("merge {from} into {to}");
            }
            17 => {
                img.store_bitmaps().unwrap();
                what = "store".into();
            }
            _ => {
                drop(img);
                model.retain(|_, b| b.persistent);
                img = open_rw(&path);
                what = "reopen".into();
            }
        }
        compare(
            &img,
            &model,
            size,
            &format!("step {step}: {what} (seed {seed})"),
        );
    }
    drop(img);
    model.retain(|_, b| b.persistent);
    // QEMU's view: the list in QEMU's order is not modelled; names, granularity and
    // flags are.
    let mut listed = qemu_bitmap_list(&path);
    listed.sort();
    let want: Vec<(String, u64, Vec<String>)> = model
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                b.granularity,
                if b.enabled {
                    vec!["auto".to_string()]
                } else {
                    vec![]
                },
            )
        })
        .collect();
    assert_eq!(listed, want, "seed {seed}");
    for (name, b) in &model {
        assert_eq!(
            qemu_dirty_ranges(&path, name),
            b.ranges(size),
            "seed {seed}: QEMU's view of {name}"
        );
    }
    assert_check_clean(&path);
}

#[test]
fn random_steps_64k_clusters() {
    for seed in 1..=3 {
        run_model(seed, 65536, (16 << 20) + 4096, 150);
    }
}

#[test]
fn random_steps_small_clusters() {
    run_model(11, 512, (2 << 20) + 512, 150);
    run_model(12, 4096, 8 << 20, 150);
}

#[test]
fn random_steps_large_clusters() {
    run_model(21, 2 << 20, 64 << 20, 120);
}

/// The model itself must see the writes: a bitmap enabled from the start with no
/// write recorded would make every comparison trivial.
#[test]
fn writes_reach_the_bitmap() {
    let d = tempdir();
    let path = create_qcow2(d.path(), "w.qcow2", "", "1M");
    let img = open_rw(&path);
    img.add_bitmap("x", &BitmapOptions::default()).unwrap();
    img.write_at(&[1], 65536 * 3).unwrap();
    assert_eq!(
        img.bitmap_dirty_ranges("x").unwrap(),
        vec![(65536 * 3, 65536)]
    );
}
