//! `convert -l`: which internal snapshot of the source to read, as qemu-img parses
//! it: `snapshot.id=ID,snapshot.name=NAME` (QemuOpts: both must match when both are
//! given), or a bare ID-or-name.

use crate::common::Ctx;
use oxcow::Image;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSel {
    /// A bare argument: an ID first, then a name.
    IdOrName(String),
    /// `snapshot.id=` and/or `snapshot.name=`.
    Opts {
        id: Option<String>,
        name: Option<String>,
    },
}

impl SnapshotSel {
    /// Parses `-l ARG`; on failure prints qemu-img's messages and returns `None`.
    pub fn parse(ctx: &Ctx, arg: &str) -> Option<SnapshotSel> {
        if !arg.starts_with("snapshot.") {
            return Some(SnapshotSel::IdOrName(arg.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for part in arg.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, v.to_string()),
                None => {
                    ctx.error(format!(
                        "warning: short-form boolean option '{part}' deprecated\nPlease use {part}=on instead"
                    ));
                    (part, "on".to_string())
                }
            };
            match key {
                "snapshot.id" => id = Some(value),
                "snapshot.name" => name = Some(value),
                other => {
                    ctx.error(format!("Invalid parameter '{other}'"));
                    ctx.error(format!("Failed in parsing snapshot param '{arg}'"));
                    return None;
                }
            }
        }
        Some(SnapshotSel::Opts { id, name })
    }

    /// Makes `img` read the snapshot instead of its active disk (QEMU's
    /// bdrv_snapshot_load_tmp); the error is the reason qemu-img prints after
    /// "Failed to load snapshot: ".
    pub fn load(&self, img: &Image) -> oxcow::Result<()> {
        match self {
            SnapshotSel::IdOrName(s) => img.load_snapshot_tmp_by_id_or_name(s),
            SnapshotSel::Opts { id, name } => img.load_snapshot_tmp(id.as_deref(), name.as_deref()),
        }
    }
}
