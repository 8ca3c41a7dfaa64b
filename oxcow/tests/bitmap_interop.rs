//! Persistent dirty bitmaps against QEMU (qemu-img bitmap, qemu-io, qemu-nbd as the
//! reader of dirty bits): bitmaps QEMU added record oxcow's writes exactly as they
//! record qemu-io's; bitmaps oxcow added are read and kept by QEMU; each bitmap
//! operation gives what `qemu-img bitmap` gives; a crash leaves them in use.

mod common;

use common::bitmaps::*;
use common::open_writable as open_rw;
use common::*;
use oxcow::{BitmapOptions, BlockDevice, Image, OpenOptions};
use std::path::Path;

fn ro_ranges(path: &Path, name: &str) -> Vec<(u64, u64)> {
    open(path).bitmap_dirty_ranges(name).unwrap()
}

/// The same guest operations through qemu-io and through oxcow leave the same dirty
/// bits in bitmaps `qemu-img bitmap` added (enabled and disabled, several
/// granularities and cluster sizes).
#[test]
fn oxcow_writes_are_recorded_like_qemus() {
    for (seed, cluster, gran, size) in [
        (1u64, 65536u64, "65536", 8u64 << 20),
        (2, 4096, "512", (4 << 20) + 3 * 512),
        (3, 2 << 20, "8192", 32 << 20),
        (4, 512, "1M", 3 << 20),
    ] {
        let d = tempdir();
        let dir = d.path();
        let ours = create_qcow2(
            dir,
            "ours.qcow2",
            &format!("cluster_size={cluster}"),
            &size.to_string(),
        );
        qemu_img(dir, &["bitmap", "--add", "-g", gran, "ours.qcow2", "b0"]);
        qemu_img(dir, &["bitmap", "--add", "--disable", "ours.qcow2", "off"]);
        qemu_img(dir, &["bitmap", "--add", "-g", "2G", "ours.qcow2", "huge"]);
        std::fs::copy(&ours, dir.join("qemu.qcow2")).unwrap();
        let theirs = dir.join("qemu.qcow2");
        let mut rng = Rng::new(seed);
        let mut used = std::collections::HashSet::new();
        let ops: Vec<GuestOp> = (0..60)
            .map(|_| GuestOp::random(&mut rng, size, cluster, &mut used))
            .collect();
        {
            let img = open_rw(&ours);
            for op in &ops {
                op.apply(&img, cluster);
            }
            // While open, the bitmaps are marked in use on disk.
            let listed = qemu_bitmap_list(&ours);
            assert!(
                listed.iter().all(|b| b.2.contains(&"in-use".to_string())),
                "{listed:?}"
            );
        }
        let cmds: Vec<String> = ops.iter().map(|o| o.qemu_io(cluster, size)).collect();
        qemu_io_with(dir, "qemu.qcow2", &["-d", "unmap"], &cmds);
        assert_eq!(qemu_bitmap_list(&ours), qemu_bitmap_list(&theirs));
        for name in ["b0", "off", "huge"] {
            let want = qemu_dirty_ranges(&theirs, name);
            let got = qemu_dirty_ranges(&ours, name);
            assert_eq!(got, want, "seed {seed} bitmap {name}");
            assert_eq!(
                ro_ranges(&ours, name),
                want,
                "oxcow's reader, bitmap {name}"
            );
            if name == "off" {
                assert!(want.is_empty());
            } else {
                assert!(!want.is_empty());
            }
        }
        assert_check_clean(&ours);
    }
}

/// Bitmaps oxcow adds and writes are read by QEMU, which keeps recording into them;
/// oxcow then reads what QEMU stored and records more.
#[test]
fn oxcow_bitmaps_live_on_in_qemu() {
    let d = tempdir();
    let dir = d.path();
    let size = 16u64 << 20;
    let path = create_qcow2(dir, "a.qcow2", "", "16M");
    let mut model0 = oxcow::DirtyBits::new(size, 16);
    let mut model1 = oxcow::DirtyBits::new(size, 12);
    {
        let img = open_rw(&path);
        img.add_bitmap("b0", &BitmapOptions::default()).unwrap();
        img.add_bitmap(
            "fine",
            &BitmapOptions {
                granularity: Some(4096),
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap(
            "off",
            &BitmapOptions {
                disabled: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap(
            "mem",
            &BitmapOptions {
                persistent: false,
                ..Default::default()
            },
        )
        .unwrap();
        for (o, l) in [(0u64, 1u64), (70_000, 200_000), (size - 10, 10)] {
            img.write_at(&vec![1; l as usize], o).unwrap();
            model0.set_range(o, l);
            model1.set_range(o, l);
        }
        img.write_zeroes(5 << 20, 1 << 20, true).unwrap();
        model0.set_range(5 << 20, 1 << 20);
        model1.set_range(5 << 20, 1 << 20);
        assert_eq!(img.bitmap_dirty_ranges("b0").unwrap(), model0.ranges());
    }
    let listed = qemu_bitmap_list(&path);
    // QEMU's order: new bitmaps the newest first.
    assert_eq!(
        listed,
        vec![
            ("off".to_string(), 65536, vec![]),
            ("fine".to_string(), 4096, vec!["auto".to_string()]),
            ("b0".to_string(), 65536, vec!["auto".to_string()]),
        ]
    );
    assert_check_clean(&path);
    assert_eq!(qemu_dirty_ranges(&path, "b0"), model0.ranges());
    assert_eq!(qemu_dirty_ranges(&path, "fine"), model1.ranges());
    assert_eq!(qemu_dirty_ranges(&path, "off"), vec![]);
    // QEMU records into them.
    qemu_io(dir, "a.qcow2", &["write 9M 4k".to_string()]);
    model0.set_range(9 << 20, 4096);
    model1.set_range(9 << 20, 4096);
    assert_eq!(ro_ranges(&path, "b0"), model0.ranges());
    assert_eq!(ro_ranges(&path, "fine"), model1.ranges());
    assert_check_clean(&path);
    // And oxcow again, over what QEMU stored: clear one, merge, disable, remove.
    {
        let img = open_rw(&path);
        img.clear_bitmap("fine").unwrap();
        img.write_at(&[7; 512], 12 << 20).unwrap();
        model0.set_range(12 << 20, 512);
        img.merge_bitmap("off", &img, "b0").unwrap();
        img.disable_bitmap("b0").unwrap();
        img.write_at(&[7; 512], 14 << 20).unwrap();
        img.remove_bitmap("fine").unwrap();
        img.store_bitmaps().unwrap();
    }
    assert_eq!(
        qemu_bitmap_list(&path),
        vec![
            ("off".to_string(), 65536, vec![]),
            ("b0".to_string(), 65536, vec![])
        ]
    );
    assert_eq!(qemu_dirty_ranges(&path, "b0"), model0.ranges());
    assert_eq!(qemu_dirty_ranges(&path, "off"), model0.ranges());
    assert_check_clean(&path);
}

/// Each operation through oxcow's library leaves the same bitmap list and dirty bits
/// as the same `qemu-img bitmap` call on a copy.
#[test]
fn operations_match_qemu_img_bitmap() {
    let d = tempdir();
    let dir = d.path();
    let a = create_qcow2(dir, "q.qcow2", "", "8M");
    let b = dir.join("o.qcow2");
    std::fs::copy(&a, &b).unwrap();
    let src = create_qcow2(dir, "src.qcow2", "", "8M");
    qemu_img(dir, &["bitmap", "--add", "-g", "4k", "src.qcow2", "s"]);
    qemu_io(dir, "src.qcow2", &["write 3M 5k".to_string()]);
    let src_img = open(&src);
    type Op<'a> = (&'a [&'a str], Box<dyn Fn(&Image) + 'a>);
    let steps: Vec<Op> = vec![
        (
            &["--add", "q.qcow2", "b0"],
            Box::new(|i: &Image| i.add_bitmap("b0", &BitmapOptions::default()).unwrap()),
        ),
        (
            &["--add", "-g", "512", "q.qcow2", "b1"],
            Box::new(|i: &Image| {
                i.add_bitmap(
                    "b1",
                    &BitmapOptions {
                        granularity: Some(512),
                        ..Default::default()
                    },
                )
                .unwrap()
            }),
        ),
        (
            &["--add", "--disable", "q.qcow2", "b2"],
            Box::new(|i: &Image| {
                i.add_bitmap(
                    "b2",
                    &BitmapOptions {
                        disabled: true,
                        ..Default::default()
                    },
                )
                .unwrap()
            }),
        ),
        (
            &["--disable", "q.qcow2", "b0"],
            Box::new(|i: &Image| i.disable_bitmap("b0").unwrap()),
        ),
        (
            &["--enable", "q.qcow2", "b2"],
            Box::new(|i: &Image| i.enable_bitmap("b2").unwrap()),
        ),
        (
            &["--merge", "b1", "q.qcow2", "b0"],
            Box::new(|i: &Image| i.merge_bitmap("b0", i, "b1").unwrap()),
        ),
        (
            &["--merge", "s", "-b", "src.qcow2", "q.qcow2", "b2"],
            Box::new(|i: &Image| i.merge_bitmap("b2", &src_img, "s").unwrap()),
        ),
        (
            &["--clear", "q.qcow2", "b1"],
            Box::new(|i: &Image| i.clear_bitmap("b1").unwrap()),
        ),
        (
            &["--remove", "q.qcow2", "b0"],
            Box::new(|i: &Image| i.remove_bitmap("b0").unwrap()),
        ),
        (
            &["--remove", "q.qcow2", "b2"],
            Box::new(|i: &Image| i.remove_bitmap("b2").unwrap()),
        ),
    ];
    for (k, (args, f)) in steps.iter().enumerate() {
        let mut full = vec!["bitmap"];
        full.extend_from_slice(args);
        qemu_img(dir, &full);
        {
            let img = open_rw(&b);
            f(&img);
        }
        let w = format!("write -P 3 {}k 3k", 300 * k + 1);
        qemu_io(dir, "q.qcow2", std::slice::from_ref(&w));
        qemu_io(dir, "o.qcow2", &[w]);
        let listed = qemu_bitmap_list(&a);
        assert_eq!(qemu_bitmap_list(&b), listed, "after {args:?}");
        for (name, _, _) in &listed {
            assert_eq!(
                qemu_dirty_ranges(&b, name),
                qemu_dirty_ranges(&a, name),
                "after {args:?}: {name}"
            );
        }
        assert_check_clean(&b);
    }
}

/// A crash while bitmaps are loaded leaves them in use: QEMU reports them so and
/// refuses to use them; oxcow keeps them as they are and only removes them.
#[test]
fn in_use_after_crash_is_reported() {
    let d = tempdir();
    let dir = d.path();
    let path = create_qcow2(dir, "c.qcow2", "", "4M");
    qemu_img(dir, &["bitmap", "--add", "c.qcow2", "b0"]);
    qemu_img(dir, &["bitmap", "--add", "c.qcow2", "b1"]);
    let img = open_rw(&path);
    img.write_at(&[1; 4096], 0).unwrap();
    img.flush().unwrap();
    std::mem::forget(img); // the process "dies" with the image open
    let flags = vec!["in-use".to_string(), "auto".to_string()];
    assert_eq!(
        qemu_bitmap_list(&path),
        vec![
            ("b0".to_string(), 65536, flags.clone()),
            ("b1".to_string(), 65536, flags.clone())
        ]
    );
    let out = std::process::Command::new("qemu-img")
        .current_dir(dir)
        .args(["bitmap", "--clear", "c.qcow2", "b0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    {
        let img = open_rw(&path);
        let info = img.bitmaps();
        assert!(info.iter().all(|b| b.in_use), "{info:?}");
        let e = img.clear_bitmap("b0").unwrap_err().to_string();
        assert!(
            e.starts_with("Bitmap 'b0' is inconsistent and cannot be used"),
            "{e}"
        );
        assert!(img.bitmap_dirty_ranges("b1").is_err());
        img.write_at(&[2; 512], 8192).unwrap();
        img.remove_bitmap("b1").unwrap();
    }
    assert_eq!(
        qemu_bitmap_list(&path),
        vec![("b0".to_string(), 65536, flags)]
    );
    qemu_img(dir, &["bitmap", "--remove", "c.qcow2", "b0"]);
    assert_eq!(qemu_bitmap_list(&path), vec![]);
    assert!(open(&path).bitmap_dirty_ranges("b0").is_err());
}

/// Resizing keeps the bitmaps (new granules clean), as `qemu-img resize` does.
#[test]
fn resize_keeps_bitmaps_like_qemu() {
    let d = tempdir();
    let dir = d.path();
    let a = create_qcow2(dir, "q.qcow2", "", "4M");
    qemu_img(dir, &["bitmap", "--add", "-g", "4k", "q.qcow2", "b"]);
    qemu_io(
        dir,
        "q.qcow2",
        &["write 0 4k".to_string(), "write 3M 100k".to_string()],
    );
    let b = dir.join("o.qcow2");
    std::fs::copy(&a, &b).unwrap();
    for (size, shrink) in [("8M", false), ("3200k", true), ("5M", false)] {
        let mut args = vec!["resize", "-q"];
        if shrink {
            args.push("--shrink");
        }
        args.extend(["q.qcow2", size]);
        qemu_img(dir, &args);
        {
            let img = open_rw(&b);
            let n: u64 = match size {
                "8M" => 8 << 20,
                "3200k" => 3200 << 10,
                _ => 5 << 20,
            };
            img.resize(n, shrink, oxcow::Preallocation::Off).unwrap();
        }
        assert_eq!(
            qemu_dirty_ranges(&b, "b"),
            qemu_dirty_ranges(&a, "b"),
            "resize to {size}"
        );
        assert!(!qemu_dirty_ranges(&a, "b").is_empty());
        assert_check_clean(&b);
    }
}

/// A check (and repair) of an image open for writing counts the bitmap directory,
/// tables and data where they are now (the directory moves while the image is open),
/// not where they were at open: nothing leaks, nothing referenced is freed.
#[test]
fn check_while_open_sees_the_bitmaps_where_they_are() {
    let d = tempdir();
    let dir = d.path();
    let path = create_qcow2(dir, "k.qcow2", "", "4M");
    qemu_img(dir, &["bitmap", "--add", "k.qcow2", "b0"]);
    qemu_io(dir, "k.qcow2", &["write 0 64k".to_string()]);
    {
        let img = open_rw(&path);
        img.add_bitmap("n", &BitmapOptions::default()).unwrap();
        img.write_at(&[1; 4096], 1 << 20).unwrap();
        img.store_bitmaps().unwrap();
        img.write_at(&[1; 4096], 2 << 20).unwrap();
        let r = img.check(oxcow::Fix::All).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.leaks_fixed),
            (0, 0, 0),
            "{:?}",
            r.messages
        );
    }
    assert_check_clean(&path);
    assert_eq!(
        qemu_dirty_ranges(&path, "b0"),
        vec![(0, 65536), (1 << 20, 65536), (2 << 20, 65536)]
    );
}

/// Damaged bitmap metadata (directory entries, tables) never panics: a read-write
/// open, the bitmap list and reading dirty ranges either work or fail with an error.
#[test]
fn damaged_bitmap_metadata_is_an_error_not_a_panic() {
    let d = tempdir();
    let dir = d.path();
    let path = create_qcow2(dir, "x.qcow2", "cluster_size=4k", "4M");
    qemu_img(dir, &["bitmap", "--add", "-g", "4k", "x.qcow2", "b0"]);
    qemu_img(dir, &["bitmap", "--add", "x.qcow2", "b1"]);
    qemu_io(dir, "x.qcow2", &["write 0 1M".to_string()]);
    let good = std::fs::read(&path).unwrap();
    // The directory, and the tables it names.
    let ext = open(&path).qcow2().unwrap().meta().bitmaps_ext.unwrap();
    let mut spots = vec![(ext.directory_offset, ext.directory_size)];
    for e in &open(&path).qcow2().unwrap().meta().bitmaps {
        spots.push((e.table_offset, e.table_size as u64 * 8));
    }
    let mut rng = Rng::new(7);
    let mut refused = 0;
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..rng.between(1, 4) {
            let (at, len) = spots[rng.below(spots.len() as u64) as usize];
            let i = (at + rng.below(len)) as usize;
            bytes[i] = rng.next_u64() as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        match Image::open(
            &path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        ) {
            Ok(img) => {
                for b in img.bitmaps() {
                    let _ = img.bitmap_dirty_ranges(&b.name);
                }
                let _ = img.write_at(&[1; 512], 4096);
            }
            Err(_) => refused += 1,
        }
        if let Ok(img) = Image::open(&path, &OpenOptions::default()) {
            for b in img.bitmaps() {
                let _ = img.bitmap_dirty_ranges(&b.name);
            }
        }
    }
    assert!(refused > 0, "some damage must be refused");
}
