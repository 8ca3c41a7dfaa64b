//! Creating image files: the qcow2 file itself and, when named, its external data file.

use crate::engine::create::{create_on, CreateOptions};
use crate::error::{Error, Result};
use crate::image::local_path;
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// Creates (or truncates) `path` as a new qcow2 image. An external data file named in
/// the options is created too, as a sparse file of the virtual size, relative to the
/// current directory as QEMU does.
pub fn create_qcow2(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    opts.validate()?;
    // The image file first, then its data file, as QEMU creates them.
    let io = FileStorage::create(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let data: Option<Arc<dyn Storage>> = match &opts.data_file {
        Some(df) => {
            let p = local_path(df, "data file")?;
            let s = FileStorage::create(Path::new(&p)).map_err(|source| Error::Open {
                path: p.clone().into(),
                source,
            })?;
            s.set_len(opts.size)?;
            Some(Arc::new(s))
        }
        None => None,
    };
    create_on(Arc::new(io), data, opts)
}
