//! The public face: open an image of any supported format, with its backing chain and
//! external data file, as one [`BlockDevice`].

use crate::device::{BlockDevice, LayerStatus};
use crate::engine::amend::AmendOptions;
use crate::engine::meta::ImageMeta;
use crate::engine::{EngineOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::header::MAGIC;
use crate::raw::RawImage;
use crate::storage::{FileStorage, NoFlush, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod bitmaps;

/// Image formats oxcow reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a format name as given to `-f` or stored in a backing format extension.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::Unsupported(format!("Unknown driver '{other}'"))),
        }
    }
}

/// The deepest backing chain oxcow opens.
pub const MAX_CHAIN_DEPTH: usize = 256;

#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The format; `None` probes (qcow2 magic, otherwise raw).
    pub format: Option<Format>,
    /// Do not open the backing file: unallocated ranges read as zeros.
    pub no_backing: bool,
    /// Bytes of L2 cache per qcow2 image; `None` for the default policy.
    pub l2_cache_bytes: Option<u64>,
    /// Deepest chain accepted.
    pub max_chain_depth: usize,
    /// Open the image (not its backing files) for writing.
    pub writable: bool,
    /// Never wait for the disk (QEMU's cache=unsafe, qemu-img convert's default for
    /// its target): fast, but a power cut may leave the image inconsistent.
    pub cache_unsafe: bool,
    /// Open to check (and with `writable`, repair) the image: see
    /// [`crate::engine::EngineOptions::check`].
    pub check: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            no_backing: false,
            l2_cache_bytes: None,
            max_chain_depth: MAX_CHAIN_DEPTH,
            writable: false,
            cache_unsafe: false,
            check: false,
        }
    }
}

/// An open image: a qcow2 or raw file, and below it its backing chain.
#[derive(Debug)]
pub struct Image {
    filename: String,
    format: Format,
    file: Arc<dyn Storage>,
    dev: Arc<dyn BlockDevice>,
    qcow2: Option<Arc<Qcow2>>,
    raw: Option<Arc<RawImage>>,
    backing: Option<Arc<Image>>,
    data_file: Option<String>,
}

impl Image {
    /// Opens the image at `path`, read-only.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let mut seen = Vec::new();
        Self::open_layer(&path.to_string_lossy(), opts.format, opts, None, &mut seen)
    }

    /// Opens the qcow2 image at `path` read-only as it was at an internal snapshot
    /// (its backing chain as it is now), as QEMU's snapshot_load_tmp does: the
    /// snapshot is found by `id` and `name` (both must match when both are given);
    /// the disk keeps the image's current size. A missing snapshot is
    /// `Error::InvalidArgument("Can't find snapshot")`.
    pub fn open_snapshot(
        path: impl AsRef<Path>,
        opts: &OpenOptions,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<Image> {
        if opts.writable {
            return Err(Error::InvalidArgument(
                "a snapshot can only be opened read-only".into(),
            ));
        }
        let path = path.as_ref();
        let mut seen = Vec::new();
        Self::open_layer(
            &path.to_string_lossy(),
            opts.format,
            opts,
            Some((id, name)),
            &mut seen,
        )
    }

    fn open_layer(
        filename: &str,
        format: Option<Format>,
        opts: &OpenOptions,
        snapshot: Option<(Option<&str>, Option<&str>)>,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<Image> {
        if seen.len() >= opts.max_chain_depth {
            return Err(Error::Backing(format!(
                "Backing chain is deeper than {} images",
                opts.max_chain_depth
            )));
        }
        // Only the image itself is opened for writing, never its backing files.
        let writable = opts.writable && seen.is_empty();
        let check = opts.check && seen.is_empty();
        let path = Path::new(filename);
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, writable).map_err(
            |source| Error::Open {
                path: path.to_path_buf(),
                source,
            },
        )?);
        let storage: Arc<dyn Storage> = if writable && opts.cache_unsafe {
            Arc::new(NoFlush(storage))
        } else {
            storage
        };
        if let Some(id) = storage.identity() {
            if seen.contains(&id) {
                return Err(Error::Backing(format!(
                    "Backing chain loop: '{filename}' is already in the chain"
                )));
            }
            seen.push(id);
        } else {
            seen.push((u64::MAX, seen.len() as u64));
        }
        let format = match format {
            Some(f) => f,
            None => probe(storage.as_ref())?,
        };
        match format {
            Format::Raw => {
                if snapshot.is_some() {
                    return Err(Error::Unsupported("Block format 'raw' used by device '' does not support temporarily loading internal snapshots".into()));
                }
                let raw = Arc::new(RawImage::open(storage.clone())?);
                Ok(Image {
                    filename: filename.to_string(),
                    format,
                    file: storage,
                    dev: raw.clone(),
                    raw: Some(raw),
                    qcow2: None,
                    backing: None,
                    data_file: None,
                })
            }
            Format::Qcow2 => {
                let mut meta = ImageMeta::load_with(storage.as_ref(), check)?;
                meta.check_readable()?;
                if let Some((id, name)) = snapshot {
                    let sn = meta
                        .snapshots
                        .iter()
                        .find(|sn| {
                            (id.is_some() || name.is_some())
                                && id.is_none_or(|i| sn.id == i)
                                && name.is_none_or(|n| sn.name == n)
                        })
                        .ok_or_else(|| Error::InvalidArgument("Can't find snapshot".into()))?;
                    // The snapshot's L1 table was checked when the table was loaded.
                    meta.header.l1_table_offset = sn.l1_table_offset;
                    meta.header.l1_size = sn.l1_size;
                }
                let data_file = match &meta.data_file {
                    Some(name) if meta.header.has_data_file() => {
                        // QEMU opens a relative data file name from the current
                        // directory (not the image's), and so does oxcow.
                        let p = local_path(name, "data file")?;
                        let s = FileStorage::open(Path::new(&p), writable).map_err(|source| {
                            Error::Open {
                                path: PathBuf::from(&p),
                                source,
                            }
                        })?;
                        let s: Arc<dyn Storage> = Arc::new(s);
                        let s: Arc<dyn Storage> = if writable && opts.cache_unsafe {
                            Arc::new(NoFlush(s))
                        } else {
                            s
                        };
                        Some((p, s))
                    }
                    _ => None,
                };
                let backing = match (&meta.backing_file, opts.no_backing) {
                    (Some(name), false) => {
                        // The protocol is that of the stored name: a relative name is
                        // combined with the overlay's directory only afterwards (else
                        // "json:{...}" would pass as a file in that directory). As in
                        // QEMU, a name with a "file:" prefix is not combined.
                        let local = local_path(name, "backing file")?;
                        let full = if local.len() == name.len() {
                            combine_paths(filename, name)
                        } else {
                            local
                        };
                        let fmt = meta
                            .backing_format
                            .as_deref()
                            .map(Format::from_name)
                            .transpose()?;
                        let b = Self::open_layer(&full, fmt, opts, None, seen).map_err(
                            |e| match e {
                                Error::Open { path, source } => Error::Backing(format!(
                                    "Could not open backing file: Could not open '{}': {source}",
                                    path.display()
                                )),
                                other => other,
                            },
                        )?;
                        Some(Arc::new(b))
                    }
                    _ => None,
                };
                let engine = EngineOptions {
                    l2_cache_bytes: opts.l2_cache_bytes,
                    writable,
                    check,
                };
                let q = Arc::new(Qcow2::open(
                    meta,
                    storage.clone(),
                    data_file.as_ref().map(|d| d.1.clone()),
                    backing.clone().map(|b| b as Arc<dyn BlockDevice>),
                    &engine,
                )?);
                Ok(Image {
                    filename: filename.to_string(),
                    format,
                    file: storage,
                    dev: q.clone(),
                    raw: None,
                    qcow2: Some(q),
                    backing,
                    data_file: data_file.map(|d| d.0),
                })
            }
        }
    }

    /// Changes the options of the qcow2 image at `path` in place (`qemu-img amend`):
    /// compatibility level, refcount width, lazy refcounts, the external data file's
    /// name and raw flag, then the virtual size. Refusals carry qemu-img's messages.
    /// A dirty image (lazy refcounts, then a crash) is repaired first, as QEMU's
    /// read-write open does: the lines of that repair are returned (qemu-img prints
    /// them on stderr).
    pub fn amend(
        path: impl AsRef<Path>,
        opts: &AmendOptions,
        size: Option<u64>,
    ) -> Result<Vec<String>> {
        let path = path.as_ref();
        let repaired = Self::repair_if_dirty(path)?;
        let storage: Arc<dyn Storage> =
            Arc::new(FileStorage::open(path, true).map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?);
        if probe(storage.as_ref())? != Format::Qcow2 {
            return Err(Error::InvalidArgument(
                "Format driver 'raw' does not support option amendment".into(),
            ));
        }
        let meta = ImageMeta::load(storage.as_ref())?;
        let data: Option<Arc<dyn Storage>> = match &meta.data_file {
            Some(name) if meta.header.has_data_file() => {
                let p = local_path(name, "data file")?;
                let s = FileStorage::open(Path::new(&p), true).map_err(|source| Error::Open {
                    path: PathBuf::from(&p),
                    source,
                })?;
                Some(Arc::new(s))
            }
            _ => None,
        };
        crate::engine::amend::amend(&storage, data, opts)?;
        drop(storage);
        if let Some(size) = size {
            let img = Image::open(
                path,
                &OpenOptions {
                    format: Some(Format::Qcow2),
                    writable: true,
                    ..OpenOptions::default()
                },
            )?;
            if size != img.size() {
                img.resize(size, true, crate::Preallocation::Off)?;
            }
        }
        Ok(repaired)
    }

    /// Repairs a qcow2 image whose dirty bit is set (QEMU's check with every fix, at
    /// a read-write open); returns what the repair printed. Nothing for clean images.
    fn repair_if_dirty(path: &Path) -> Result<Vec<String>> {
        let storage = FileStorage::open(path, false).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if probe(&storage)? != Format::Qcow2 || !ImageMeta::load(&storage)?.header.is_dirty() {
            return Ok(Vec::new());
        }
        drop(storage);
        let img = Image::open(
            path,
            &OpenOptions {
                format: Some(Format::Qcow2),
                writable: true,
                check: true,
                ..OpenOptions::default()
            },
        )?;
        let Some(q) = img.qcow2() else {
            return Ok(Vec::new());
        };
        let report = q.check(crate::engine::check::Fix::All)?;
        if report.check_errors != 0 || report.corruptions != 0 || report.failure.is_some() {
            return Err(Error::corrupt(
                format!(
                    "Could not repair dirty image{}",
                    report.failure.map(|f| format!(": {f}")).unwrap_or_default()
                ),
                0,
            ));
        }
        Ok(report.messages)
    }

    /// The file name as given (for backing files: as resolved from the overlay).
    pub fn filename(&self) -> &str {
        &self.filename
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The qcow2 runtime, for qcow2 images.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        self.qcow2.as_deref()
    }

    /// The backing image, when it was opened.
    pub fn backing_image(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }

    /// Changes the virtual size. Shrinking needs `shrink`; `prealloc` says how the
    /// new space is allocated.
    pub fn resize(
        &self,
        new_size: u64,
        shrink: bool,
        prealloc: crate::Preallocation,
    ) -> Result<()> {
        let old = self.size();
        if new_size < old && !shrink {
            return Err(Error::InvalidArgument(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        match (&self.qcow2, &self.raw) {
            (Some(q), _) => {
                // A raw data file stays readable alone: new clusters are mapped at
                // once, as QEMU maps them.
                let prealloc =
                    if q.header().data_file_raw() && prealloc == crate::Preallocation::Off {
                        crate::Preallocation::Metadata
                    } else {
                        prealloc
                    };
                q.resize_preallocated(new_size, shrink, prealloc)
            }
            (None, Some(r)) => r.resize(new_size, prealloc),
            _ => Err(Error::Unsupported("this image cannot be resized".into())),
        }
    }

    /// Drops every guest cluster, so the backing file shows through again, as
    /// `qemu-img commit` leaves the image it committed (qcow2 only).
    pub fn make_empty(&self) -> Result<()> {
        match &self.qcow2 {
            Some(q) => q.make_empty(),
            None => Err(Error::Unsupported(
                "Operation not supported: raw images cannot be emptied".into(),
            )),
        }
    }

    /// Changes the backing file named in the image header (qcow2 only).
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        match &self.qcow2 {
            Some(q) => q.set_backing_file(name, format),
            None => Err(Error::Unsupported(
                "Operation not supported: raw images have no backing file".into(),
            )),
        }
    }

    /// The internal snapshots (none for raw images).
    pub fn snapshots(&self) -> Vec<crate::format::snapshot::SnapshotEntry> {
        self.qcow2
            .as_ref()
            .map(|q| q.snapshots())
            .unwrap_or_default()
    }

    /// Creates an internal snapshot of the active disk (qcow2 opened for writing).
    pub fn create_snapshot(&self, name: &str) -> Result<crate::format::snapshot::SnapshotEntry> {
        self.snapshot_image()?.create_snapshot(name)
    }

    /// Reverts the active disk to snapshot `id_or_name` (an ID first, then a name).
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_image()?.apply_snapshot(id_or_name)
    }

    /// Deletes snapshot `id_or_name` (an ID first, then a name); returns its entry.
    pub fn delete_snapshot(
        &self,
        id_or_name: &str,
    ) -> Result<crate::format::snapshot::SnapshotEntry> {
        self.snapshot_image()?.delete_snapshot(id_or_name)
    }

    /// Reads snapshot `id` / `name` instead of the active disk (both must match when
    /// both are given), as QEMU's bdrv_snapshot_load_tmp: read-only qcow2 images.
    pub fn load_snapshot_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        match &self.qcow2 {
            Some(q) => q.load_snapshot_tmp(id, name),
            None => Err(Error::Unsupported(format!(
                "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                self.format.name()
            ))),
        }
    }

    /// `load_snapshot_tmp` with `s` as an ID if a snapshot has that ID, else as a
    /// name (bdrv_snapshot_load_tmp_by_id_or_name).
    pub fn load_snapshot_tmp_by_id_or_name(&self, s: &str) -> Result<()> {
        if self.snapshots().iter().any(|x| x.id == s) {
            self.load_snapshot_tmp(Some(s), None)
        } else {
            self.load_snapshot_tmp(None, Some(s))
        }
    }

    fn snapshot_image(&self) -> Result<&Qcow2> {
        self.qcow2
            .as_deref()
            .ok_or_else(|| Error::Unsupported("Operation not supported".into()))
    }

    /// The storage holding the image file itself.
    /// Checks the image (not its backing files) as `qemu-img check` does, repairing
    /// what `fix` allows (the image must then be open for writing). Raw images
    /// have nothing to check: `Error::Unsupported`.
    pub fn check(
        &self,
        fix: crate::engine::check::Fix,
    ) -> Result<crate::engine::check::CheckReport> {
        match &self.qcow2 {
            Some(q) => q.check(fix),
            None => Err(Error::Unsupported(
                "This image format does not support checks".into(),
            )),
        }
    }

    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The resolved path of the external data file, if any.
    pub fn data_file_path(&self) -> Option<&str> {
        self.data_file.as_deref()
    }

    /// Bytes the image file occupies on disk (its allocated blocks).
    pub fn allocated_file_bytes(&self) -> Result<Option<u64>> {
        Ok(self.file.allocated_bytes()?)
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        self.dev.layer_status(offset, len)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref().map(|b| b as &dyn BlockDevice)
    }
    fn format_name(&self) -> &'static str {
        self.format.name()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.dev.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }
}

/// Probes a file's format: qcow2 by its magic, raw otherwise.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0)?;
    if u32::from_be_bytes(magic) == MAGIC && storage.len()? >= 4 {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Resolves a name stored in an image against the image's own location, as QEMU
/// does: relative names are relative to the directory of the image that names them.
pub fn combine_paths(base_image: &str, name: &str) -> String {
    if name.starts_with('/') || name.is_empty() {
        return name.to_string();
    }
    match base_image.rfind('/') {
        Some(i) => format!("{}{}", &base_image[..=i], name),
        None => name.to_string(),
    }
}

/// Accepts only local file names: a `json:` or `protocol:` name stored in an image is
/// refused (a plain `file:` prefix is removed).
pub fn local_path(name: &str, what: &str) -> Result<String> {
    let stop = name.find(['/', ':']);
    if let Some(i) = stop {
        if name.as_bytes()[i] == b':' {
            let proto = &name[..i];
            if proto == "file" {
                return Ok(name[i + 1..].to_string());
            }
            return Err(Error::Backing(format!("The {what} name '{name}' uses the protocol '{proto}'; only local files are supported")));
        }
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_like_qemu() {
        assert_eq!(
            combine_paths("/a/b/over.qcow2", "base.qcow2"),
            "/a/b/base.qcow2"
        );
        assert_eq!(combine_paths("over.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(combine_paths("d/over.qcow2", "/abs/base"), "/abs/base");
        assert_eq!(combine_paths("d/over.qcow2", "../base"), "d/../base");
    }

    #[test]
    fn protocols_refused() {
        assert!(local_path("json:{\"x\":1}", "backing file").is_err());
        assert!(local_path("nbd://host/x", "backing file").is_err());
        assert_eq!(local_path("file:/x/y", "backing file").unwrap(), "/x/y");
        assert_eq!(local_path("dir/a:b", "backing file").unwrap(), "dir/a:b");
    }
}
