//! Scaffolding of the crash tests (crash.rs, snapshot_crash.rs, bitmap_crash.rs):
//! opening an engine on in-memory storage, replaying a recorded log (with a torn
//! write), and asking qemu-img check about a crash state.

use super::qemu_check_json;
use oxcow::engine::meta::ImageMeta;
use oxcow::engine::{EngineOptions, Qcow2};
use oxcow::storage::{MemoryStorage, Op, RecordingStorage, Storage};
use oxcow::{BlockDevice, RawImage};
use std::path::Path;
use std::sync::Arc;

/// Opens the qcow2 image in `storage` with an L2 cache of `cache` bytes and, when
/// given, a raw backing file holding `backing`.
pub fn open_engine(
    storage: Arc<dyn Storage>,
    writable: bool,
    cache: Option<u64>,
    backing: Option<&[u8]>,
) -> oxcow::Result<Qcow2> {
    let meta = ImageMeta::load(storage.as_ref())?;
    let backing: Option<Arc<dyn BlockDevice>> = match backing {
        Some(b) => Some(Arc::new(RawImage::open(Arc::new(
            MemoryStorage::from_vec(b.to_vec()),
        ))?)),
        None => None,
    };
    Qcow2::open(
        meta,
        storage,
        None,
        backing,
        &EngineOptions {
            l2_cache_bytes: cache,
            writable,
            ..Default::default()
        },
    )
}

/// Replays the operations `ops` of `log` (by index) onto `bytes`; an operation paired
/// with `Some(n)` that is a write lands torn, only its first `n` bytes.
pub fn replay(
    bytes: &mut Vec<u8>,
    log: &[Op],
    ops: impl IntoIterator<Item = (usize, Option<usize>)>,
) {
    for (j, torn) in ops {
        match (&log[j], torn) {
            (Op::Write { offset, data }, Some(n)) => {
                let part = Op::Write {
                    offset: *offset,
                    data: data[..n].to_vec(),
                };
                RecordingStorage::replay(bytes, [&part]);
            }
            (op, _) => RecordingStorage::replay(bytes, [op]),
        }
    }
}

/// `qemu-img check --output=json PATH`: its exit code, and stdout then stderr.
pub fn qemu_check(path: &Path) -> (Option<i32>, String) {
    let out = qemu_check_json(path);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
