//! Images created by oxcow are byte-identical to those qemu-img creates with the same
//! options, and pass `qemu-img check`.

mod common;

use common::qemu_check_json;
use oxcow::format::header::CompressionType;
use oxcow::{create_qcow2, CreateOptions, Preallocation};
use std::path::Path;
use std::process::Command;

fn qemu_create(path: &Path, size: u64, opts: &str) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    let st = c
        .arg(path)
        .arg(size.to_string())
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create {opts} failed");
}

fn check_clean(path: &Path) {
    let out = qemu_check_json(path);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {s} {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !s.contains("\"leaks\"") && !s.contains("\"corruptions\""),
        "{s}"
    );
}

/// Files must be equal; on a difference, name the first differing byte (never print
/// the files).
fn assert_same_bytes(theirs: &Path, ours: &Path, what: &str) {
    let a = std::fs::read(theirs).unwrap();
    let b = std::fs::read(ours).unwrap();
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {at:#x} (qemu {:#04x}, oxcow {:#04x})",
            a[at], b[at]
        );
    }
    assert!(
        a.len() == b.len(),
        "{what}: file length {} (qemu) vs {} (oxcow)",
        a.len(),
        b.len()
    );
}

struct Case {
    size: u64,
    qemu: String,
    ours: CreateOptions,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for &cs in &[512u64, 4096, 65536, 2 << 20] {
        // qemu-img itself takes many seconds for 100 GiB with 512-byte clusters.
        let sizes: &[u64] = if cs == 512 {
            &[0, 1 << 20, 1 << 30]
        } else {
            &[0, 1 << 20, 1 << 30, 100 << 30]
        };
        for &size in sizes {
            for &rb in &[1u32, 16, 64] {
                v.push(Case {
                    size,
                    qemu: format!("cluster_size={cs},refcount_bits={rb}"),
                    ours: CreateOptions {
                        size,
                        cluster_size: cs,
                        refcount_bits: rb,
                        ..Default::default()
                    },
                });
            }
        }
    }
    // 512-byte clusters with 1 TiB: the L1 table needs new refcount blocks and a
    // larger refcount table.
    v.push(Case {
        size: 8 << 30,
        qemu: "cluster_size=512".into(),
        ours: CreateOptions {
            size: 8 << 30,
            cluster_size: 512,
            ..Default::default()
        },
    });
    v.push(Case {
        size: 8 << 30,
        qemu: "cluster_size=512,refcount_bits=64".into(),
        ours: CreateOptions {
            size: 8 << 30,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    });
    let base = |size| CreateOptions {
        size,
        ..Default::default()
    };
    v.push(Case {
        size: 1 << 30,
        qemu: "compat=0.10".into(),
        ours: CreateOptions {
            version: 2,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "compat=0.10,cluster_size=4096".into(),
        ours: CreateOptions {
            version: 2,
            cluster_size: 4096,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "lazy_refcounts=on".into(),
        ours: CreateOptions {
            lazy_refcounts: true,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "extended_l2=on".into(),
        ours: CreateOptions {
            extended_l2: true,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "extended_l2=on,cluster_size=16k".into(),
        ours: CreateOptions {
            extended_l2: true,
            cluster_size: 16384,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "compression_type=zstd".into(),
        ours: CreateOptions {
            compression_type: CompressionType::Zstd,
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "backing_file=base.qcow2,backing_fmt=qcow2".into(),
        ours: CreateOptions {
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..base(1 << 30)
        },
    });
    v.push(Case {
        size: 1 << 30,
        qemu: "backing_file=base.raw,backing_fmt=raw,cluster_size=512".into(),
        ours: CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            cluster_size: 512,
            ..base(1 << 30)
        },
    });
    for mode in ["metadata", "falloc", "full"] {
        let p = Preallocation::from_name(mode).unwrap();
        for (extra, cs, size, ext) in [
            ("", 65536u64, 64u64 << 20, false),
            (",cluster_size=4096", 4096, 32 << 20, false),
            (",cluster_size=512", 512, 4 << 20, false),
            (",extended_l2=on", 65536, 64 << 20, true),
            ("", 65536, 1 << 30, false),
        ] {
            if mode == "full" && size > 64 << 20 {
                continue;
            }
            v.push(Case {
                size,
                qemu: format!("preallocation={mode}{extra}"),
                ours: CreateOptions {
                    size,
                    cluster_size: cs,
                    extended_l2: ext,
                    preallocation: p,
                    ..Default::default()
                },
            });
        }
    }
    v
}

#[test]
fn create_matches_qemu_img_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    qemu_create(&dir.path().join("base.qcow2"), 1 << 30, "");
    for (i, c) in cases().iter().enumerate() {
        let theirs = dir.path().join(format!("q{i}.qcow2"));
        let ours = dir.path().join(format!("o{i}.qcow2"));
        // Backing names are stored as given; create from inside the directory so both
        // tools can open them.
        std::env::set_current_dir(dir.path()).unwrap();
        qemu_create(&theirs, c.size, &c.qemu);
        create_qcow2(&ours, &c.ours).unwrap_or_else(|e| panic!("{}: {e}", c.qemu));
        assert_same_bytes(&theirs, &ours, &format!("{} size {}", c.qemu, c.size));
        check_clean(&ours);
    }
}

#[test]
fn data_file_is_created_sparse_with_the_virtual_size() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (raw, prealloc)) in [
        (false, "off"),
        (true, "off"),
        (true, "metadata"),
        (false, "metadata"),
        (false, "falloc"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("x{i}.qcow2"));
        let df = dir.path().join(format!("x{i}.data"));
        let opts = CreateOptions {
            size: 64 << 20,
            data_file: Some(df.to_string_lossy().into()),
            data_file_raw: raw,
            preallocation: Preallocation::from_name(prealloc).unwrap(),
            ..Default::default()
        };
        create_qcow2(&img, &opts).unwrap();
        assert_eq!(std::fs::metadata(&df).unwrap().len(), 64 << 20);
        check_clean(&img);
        let theirs = dir.path().join(format!("q{i}.qcow2"));
        qemu_create(
            &theirs,
            64 << 20,
            &format!(
                "data_file={},data_file_raw={},preallocation={prealloc}",
                df.display(),
                if raw { "on" } else { "off" }
            ),
        );
        assert_same_bytes(
            &theirs,
            &img,
            &format!("data file raw={raw} preallocation={prealloc}"),
        );
    }
}

#[test]
fn invalid_options_are_refused_with_qemu_messages() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.qcow2");
    let bad = [
        (
            CreateOptions {
                size: 1 << 20,
                cluster_size: 1000,
                ..Default::default()
            },
            "power of two between 512 and 2048k",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                refcount_bits: 3,
                ..Default::default()
            },
            "Refcount width",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                version: 2,
                lazy_refcounts: true,
                ..Default::default()
            },
            "Lazy refcounts",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                extended_l2: true,
                cluster_size: 4096,
                ..Default::default()
            },
            "at least 16384 bytes",
        ),
        (
            CreateOptions {
                size: 1000,
                ..Default::default()
            },
            "multiple of 512",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                data_file_raw: true,
                ..Default::default()
            },
            "data-file-raw requires data-file",
        ),
    ];
    for (o, msg) in bad {
        let e = create_qcow2(&p, &o).unwrap_err().to_string();
        assert!(e.contains(msg), "{e} should contain {msg}");
    }
}
