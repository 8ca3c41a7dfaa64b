//! `info`: what an image is, as `qemu-img info` prints it (human or JSON, one image or
//! its whole backing chain).
//!
//! Like qemu-img, `info` opens each image alone: without its backing file and without
//! its external data file (a missing one is no error), and describes the image node
//! and its `file` child node. The JSON objects are built member by member in QEMU's
//! schema order and printed with QEMU's QDict key order (see [`crate::qjson`]).

use crate::common::Ctx;
use crate::human::size_to_str;
use crate::qjson;
use crate::qopt::{long, Getopt, LongOpt};
use crate::snaptable::{icount, snapshot_header, snapshot_row};
use oxcow::engine::meta::ImageMeta;
use oxcow::format::header::CryptMethod;
use oxcow::format::snapshot::SnapshotEntry;
use oxcow::storage::{FileStorage, Storage};
use oxcow::Format;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::path::Path;

const SHORTS: &str = "hf:bU";
const LONGS: &[LongOpt] = &[
    long("help", false, "h"),
    long("format", true, "f"),
    long("image-opts", false, "image-opts"),
    long("backing-chain", false, "b"),
    long("force-share", false, "U"),
    long("output", true, "output"),
    long("object", true, "object"),
];

const HELP: &str = "Usage:
Display information about image.  Usage:

  PROG info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

";

/// The two output formats of info, map (and check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputFormat {
    Human,
    Json,
}

/// What a command's option loop decided when it could not go on.
pub(crate) enum Stop {
    /// Print a usage error and the "Try" line: exit 1.
    Usage(String),
    /// A getopt error: printed as "PROG CMD: message", then the "Try" line: exit 1.
    Getopt(String),
    /// A plain error message: exit 1.
    Error(String),
}

/// `tryhelp()`'s line.
pub(crate) fn tryhelp(ctx: &Ctx, cmd: &str) {
    eprintln!("Try '{} {} --help' for more info", ctx.prog, cmd);
}

/// Reports a [`Stop`] as qemu-img does and gives the exit code.
pub(crate) fn report_stop(ctx: &Ctx, cmd: &str, stop: Stop) -> u8 {
    match stop {
        Stop::Usage(msg) => {
            ctx.error(msg);
            tryhelp(ctx, cmd);
        }
        Stop::Getopt(msg) => {
            eprintln!("{} {}: {}", ctx.prog, cmd, msg);
            tryhelp(ctx, cmd);
        }
        Stop::Error(msg) => ctx.error(msg),
    }
    1
}

/// `parse_output_format()`.
pub(crate) fn parse_output_format(arg: &str) -> Result<OutputFormat, Stop> {
    match arg {
        "human" => Ok(OutputFormat::Human),
        "json" => Ok(OutputFormat::Json),
        other => Err(Stop::Usage(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

/// Prints a command's help text (QEMU's, with the program name) on stdout.
pub(crate) fn print_help(ctx: &Ctx, text: &str) {
    print!("{}", text.replace("PROG", &ctx.prog));
}

/// An I/O error as strerror() words it, without Rust's " (os error N)".
pub(crate) fn strerror(e: &std::io::Error) -> String {
    crate::common::io_reason(e)
}

/// Removes every " (os error N)" Rust adds to an I/O error's text.
pub(crate) fn strip_os_error(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + " (os error ".len()..];
        match tail.find(')') {
            Some(j) if tail[..j].bytes().all(|b| b.is_ascii_digit()) => rest = &tail[j + 1..],
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The message qemu-img prints when an image cannot be opened, for a library error.
pub(crate) fn open_error(filename: &str, e: &oxcow::Error) -> String {
    match e {
        oxcow::Error::Open { path, source } => format!(
            "Could not open '{filename}': Could not open '{}': {}",
            path.display(),
            strerror(source)
        ),
        oxcow::Error::BadHeader { field, reason } => match header_reason(field, reason) {
            Some(r) => format!("Could not open '{filename}': {r}"),
            None => format!(
                "Could not open '{filename}': {}",
                strip_os_error(&e.to_string())
            ),
        },
        other => format!(
            "Could not open '{filename}': {}",
            strip_os_error(&other.to_string())
        ),
    }
}

/// QEMU's words for the header checks it shares with oxcow (qcow2_do_open).
fn header_reason(field: &str, reason: &str) -> Option<String> {
    let first_number = || {
        reason
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .map(str::to_string)
    };
    Some(match field {
        "cluster_bits" => format!("Unsupported cluster size: 2^{}", first_number()?),
        "header_length" if reason.contains("smaller than") => "qcow2 header too short".into(),
        "header_length" if reason.contains("past the first cluster") => {
            "qcow2 header exceeds cluster size".into()
        }
        "refcount_order" => "Reference count entry width too large; may not exceed 64 bits".into(),
        "l1_size" if reason.contains("too large") => "Active L1 table too large".into(),
        "l1_table_offset" => "Active L1 table offset invalid".into(),
        "refcount_table_offset" => "Reference count table offset invalid".into(),
        "snapshots_offset" => "Snapshot table offset invalid".into(),
        _ => return None,
    })
}

/// Checks a `-f` argument: only the formats oxcow reads are known.
pub(crate) fn check_format(filename: &str, fmt: Option<&str>) -> Result<Option<Format>, String> {
    match fmt {
        None => Ok(None),
        Some(f) => Format::from_name(f)
            .map(Some)
            .map_err(|_| format!("Could not open '{filename}': Unknown driver '{f}'")),
    }
}

/// Rejects what oxcow does not take where qemu-img would (option strings, objects).
fn unsupported(what: &str) -> Stop {
    Stop::Error(format!("{what} is not supported by oxcow"))
}

/// The protocol node's driver for a file: QEMU takes devices as `host_device`.
fn protocol_name(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_block_device() || t.is_char_device() {
        "host_device"
    } else {
        "file"
    }
}

/// Protocols QEMU knows but oxcow does not open (it reads local files only).
const OTHER_PROTOCOLS: &[&str] = &[
    "ftp",
    "ftps",
    "gluster",
    "gluster+rdma",
    "gluster+tcp",
    "gluster+unix",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "json",
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "rbd",
    "ssh",
    "vvfat",
    "blkdebug",
    "blkverify",
];

/// The local file a name on the command line (or a backing name) stands for, as QEMU's
/// protocol lookup reads it: `file:` is dropped (a remaining colon before any slash is
/// protected with `./`, as the file driver names such files); other protocols are not
/// local files.
pub(crate) fn local_file_name(name: &str) -> Result<String, String> {
    if !path_has_protocol(name) {
        return Ok(name.to_string());
    }
    let (proto, rest) = name.split_once(':').unwrap_or((name, ""));
    if proto == "file" {
        return Ok(if path_has_protocol(rest) {
            format!("./{rest}")
        } else {
            rest.to_string()
        });
    }
    if OTHER_PROTOCOLS.contains(&proto) {
        return Err(format!(
            "Could not open '{name}': the '{proto}' protocol is not supported by oxcow (local files only)"
        ));
    }
    Err(format!(
        "Could not open '{name}': Unknown protocol '{proto}'"
    ))
}

/// Opens the file under an image as the `file` protocol driver does, with its errors.
/// Returns the local name (the node's file name), the storage and its metadata.
pub(crate) fn open_file(arg: &str) -> Result<(String, FileStorage, std::fs::Metadata), String> {
    let filename = local_file_name(arg)?;
    let fail = |e: &std::io::Error| {
        format!(
            "Could not open '{arg}': Could not open '{filename}': {}",
            strerror(e)
        )
    };
    let md = std::fs::metadata(&filename).map_err(|e| fail(&e))?;
    if md.is_dir() {
        return Err(format!(
            "Could not open '{arg}': 'file' driver requires '{filename}' to be a regular file"
        ));
    }
    let storage = FileStorage::open(Path::new(&filename), false).map_err(|e| fail(&e))?;
    Ok((filename, storage, md))
}

/// A node of the block graph as `BlockGraphInfo` describes it.
#[derive(Debug, Clone)]
struct Node {
    filename: String,
    format: String,
    dirty_flag: Option<bool>,
    actual_size: Option<u64>,
    virtual_size: u64,
    cluster_size: Option<u64>,
    encrypted: Option<bool>,
    backing_filename: Option<String>,
    full_backing_filename: Option<String>,
    backing_filename_format: Option<String>,
    snapshots: Vec<SnapshotEntry>,
    format_specific: Option<Value>,
    children: Vec<(String, Node)>,
}

impl Node {
    /// `BlockGraphInfo` as QEMU's output visitor builds it: members in schema order.
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("filename".into(), self.filename.clone().into());
        m.insert("format".into(), self.format.clone().into());
        if let Some(d) = self.dirty_flag {
            m.insert("dirty-flag".into(), d.into());
        }
        if let Some(a) = self.actual_size {
            m.insert("actual-size".into(), (a as i64).into());
        }
        m.insert("virtual-size".into(), (self.virtual_size as i64).into());
        if let Some(c) = self.cluster_size {
            m.insert("cluster-size".into(), (c as i64).into());
        }
        if let Some(e) = self.encrypted {
            m.insert("encrypted".into(), e.into());
        }
        if let Some(b) = &self.backing_filename {
            m.insert("backing-filename".into(), b.clone().into());
        }
        if let Some(b) = &self.full_backing_filename {
            m.insert("full-backing-filename".into(), b.clone().into());
        }
        if let Some(b) = &self.backing_filename_format {
            m.insert("backing-filename-format".into(), b.clone().into());
        }
        if !self.snapshots.is_empty() {
            let list = self.snapshots.iter().map(snapshot_value).collect();
            m.insert("snapshots".into(), Value::Array(list));
        }
        if let Some(f) = &self.format_specific {
            m.insert("format-specific".into(), f.clone());
        }
        let children = self
            .children
            .iter()
            .map(|(name, node)| {
                let mut c = Map::new();
                c.insert("name".into(), name.clone().into());
                c.insert("info".into(), node.to_value());
                Value::Object(c)
            })
            .collect();
        m.insert("children".into(), Value::Array(children));
        Value::Object(m)
    }

    /// `bdrv_node_info_dump()` and the child sections of `dump_human_image_info()`.
    fn dump_human(&self, out: &mut String, indentation: usize, path: &str) {
        let ind = " ".repeat(indentation * 4);
        // Below the top, a node without children is a protocol node.
        let protocol = indentation > 0 && self.children.is_empty();
        let dsize = match self.actual_size {
            Some(a) => size_to_str(a),
            None => "unavailable".to_string(),
        };
        let (l1, l2, l3) = if protocol {
            ("filename", "protocol type", "file length")
        } else {
            ("image", "file format", "virtual size")
        };
        out.push_str(&format!(
            "{ind}{l1}: {}\n{ind}{l2}: {}\n{ind}{l3}: {} ({} bytes)\n{ind}disk size: {dsize}\n",
            self.filename,
            self.format,
            size_to_str(self.virtual_size),
            self.virtual_size as i64
        ));
        if self.encrypted == Some(true) {
            out.push_str(&format!("{ind}encrypted: yes\n"));
        }
        if let Some(c) = self.cluster_size {
            out.push_str(&format!("{ind}cluster_size: {}\n", c as i64));
        }
        if self.dirty_flag == Some(true) {
            out.push_str(&format!("{ind}cleanly shut down: no\n"));
        }
        if let Some(b) = &self.backing_filename {
            out.push_str(&format!("{ind}backing file: {b}"));
            match &self.full_backing_filename {
                None => out.push_str(" (cannot determine actual path)"),
                Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
                Some(_) => {}
            }
            out.push('\n');
            if let Some(f) = &self.backing_filename_format {
                out.push_str(&format!("{ind}backing file format: {f}\n"));
            }
        }
        if !self.snapshots.is_empty() {
            out.push_str(&format!("{ind}Snapshot list:\n{ind}"));
            out.push_str(&snapshot_header());
            out.push('\n');
            for s in &self.snapshots {
                out.push_str(&ind);
                out.push_str(&snapshot_row(s));
                out.push('\n');
            }
        }
        if let Some(data) = self.format_specific.as_ref().and_then(|f| f.get("data")) {
            if !qjson::is_empty_dump(data) {
                out.push_str(&format!("{ind}Format specific information:\n"));
                qjson::dump_qobject(out, indentation + 1, data);
            }
        }
        for (name, child) in &self.children {
            out.push_str(&format!("{ind}Child node '{path}{name}':\n"));
            child.dump_human(out, indentation + 1, &format!("{path}{name}/"));
        }
    }
}

/// `SnapshotInfo`.
fn snapshot_value(s: &SnapshotEntry) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), s.id.clone().into());
    m.insert("name".into(), s.name.clone().into());
    m.insert("vm-state-size".into(), (s.vm_state_size as i64).into());
    m.insert("date-sec".into(), (s.date_sec as i64).into());
    m.insert("date-nsec".into(), (s.date_nsec as i64).into());
    m.insert(
        "vm-clock-sec".into(),
        ((s.vm_clock_nsec / 1_000_000_000) as i64).into(),
    );
    m.insert(
        "vm-clock-nsec".into(),
        ((s.vm_clock_nsec % 1_000_000_000) as i64).into(),
    );
    if let Some(i) = icount(s) {
        m.insert("icount".into(), (i as i64).into());
    }
    Value::Object(m)
}

/// An XFS extent size hint, as file-posix reports it (absent when 0 or unknown).
fn extent_size_hint(storage: &FileStorage) -> Option<u64> {
    use std::os::unix::io::AsRawFd;
    #[repr(C)]
    struct FsXattr {
        xflags: u32,
        extsize: u32,
        nextents: u32,
        projid: u32,
        cowextsize: u32,
        pad: [u8; 8],
    }
    // _IOR('X', 31, struct fsxattr)
    const FS_IOC_FSGETXATTR: u64 = 0x801c_581f;
    let mut attr = FsXattr {
        xflags: 0,
        extsize: 0,
        nextents: 0,
        projid: 0,
        cowextsize: 0,
        pad: [0; 8],
    };
    // SAFETY: the ioctl fills a struct fsxattr, which FsXattr lays out exactly.
    let r = unsafe {
        libc::ioctl(
            storage.file().as_raw_fd(),
            FS_IOC_FSGETXATTR as _,
            &mut attr as *mut FsXattr,
        )
    };
    (r == 0 && attr.extsize != 0).then_some(attr.extsize as u64)
}

/// The `file` child: the protocol node under every image.
fn file_node(filename: &str, storage: &FileStorage, md: &std::fs::Metadata) -> Node {
    let len = storage.len().unwrap_or(0);
    let mut data = Map::new();
    if let Some(h) = extent_size_hint(storage) {
        data.insert("extent-size-hint".into(), (h as i64).into());
    }
    let mut spec = Map::new();
    spec.insert("type".into(), "file".into());
    spec.insert("data".into(), Value::Object(data));
    Node {
        filename: filename.to_string(),
        format: protocol_name(md).to_string(),
        dirty_flag: Some(false),
        actual_size: storage.allocated_bytes().ok().flatten(),
        virtual_size: len.div_ceil(512) * 512,
        cluster_size: None,
        encrypted: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: Some(Value::Object(spec)),
        children: Vec::new(),
    }
}

/// QEMU's `path_has_protocol()`: a colon before any slash.
fn path_has_protocol(name: &str) -> bool {
    match name.find([':', '/']) {
        Some(i) => name.as_bytes()[i] == b':',
        None => false,
    }
}

/// `bdrv_get_full_backing_filename()`: the backing name resolved against the image.
fn full_backing_filename(image: &str, backing: &str) -> Option<String> {
    if backing.is_empty() {
        return None;
    }
    if path_has_protocol(backing) || backing.starts_with('/') {
        return Some(backing.to_string());
    }
    if image.is_empty() || image.starts_with("json:") {
        return None;
    }
    Some(oxcow::image::combine_paths(image, backing))
}

/// `ImageInfoSpecificQCow2`, in schema order.
fn qcow2_specific(meta: &ImageMeta, encrypt: Option<Value>) -> Value {
    let h = &meta.header;
    let mut d = Map::new();
    if h.version == 2 {
        d.insert("compat".into(), "0.10".into());
    } else {
        d.insert("compat".into(), "1.1".into());
        if let Some(df) = &meta.data_file {
            d.insert("data-file".into(), df.clone().into());
        }
        if h.has_data_file() {
            d.insert("data-file-raw".into(), h.data_file_raw().into());
        }
        d.insert("extended-l2".into(), h.has_extended_l2().into());
        d.insert("lazy-refcounts".into(), h.lazy_refcounts().into());
        d.insert("corrupt".into(), h.is_corrupt().into());
    }
    d.insert("refcount-bits".into(), (h.refcount_bits() as i64).into());
    if let Some(e) = encrypt {
        d.insert("encrypt".into(), e);
    }
    if h.version != 2 && !meta.bitmaps.is_empty() {
        let list = meta
            .bitmaps
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use() {
                    flags.push(Value::from("in-use"));
                }
                if b.auto() {
                    flags.push(Value::from("auto"));
                }
                let mut m = Map::new();
                m.insert("name".into(), b.name.clone().into());
                m.insert("granularity".into(), (b.granularity() as i64).into());
                m.insert("flags".into(), Value::Array(flags));
                Value::Object(m)
            })
            .collect();
        d.insert("bitmaps".into(), Value::Array(list));
    }
    d.insert("compression-type".into(), h.compression_type.name().into());
    let mut spec = Map::new();
    spec.insert("type".into(), "qcow2".into());
    spec.insert("data".into(), Value::Object(d));
    Value::Object(spec)
}

/// `ImageInfoSpecificQCow2Encryption`: the format, and for LUKS what its header says
/// (qcrypto_block_luks_get_info); no key is needed.
fn encryption_info(meta: &ImageMeta, storage: &FileStorage) -> Result<Option<Value>, String> {
    let mut m = Map::new();
    match meta.header.crypt_method {
        CryptMethod::None => return Ok(None),
        CryptMethod::Aes => {
            m.insert("format".into(), "aes".into());
        }
        CryptMethod::Luks => {
            m.insert("format".into(), "luks".into());
            let ext = meta
                .crypto_header
                .ok_or("Missing crypto header for crypt method 2")?;
            let mut h = vec![0u8; LUKS_HEADER_LEN];
            if ext.length < LUKS_HEADER_LEN as u64 {
                return Err("Volume header is too short".into());
            }
            storage
                .read_at(&mut h, ext.offset)
                .map_err(|e| strerror(&e))?;
            for (k, v) in luks_info(&h)? {
                m.insert(k, v);
            }
        }
    }
    Ok(Some(Value::Object(m)))
}

/// Bytes of a LUKS1 header with its eight key slots.
const LUKS_HEADER_LEN: usize = 592;

/// A NUL-padded string field of a LUKS header.
fn luks_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `QCryptoBlockInfoLUKS` from a LUKS1 header, in schema order.
fn luks_info(h: &[u8]) -> Result<Map<String, Value>, String> {
    if h.len() < LUKS_HEADER_LEN || &h[..6] != b"LUKS\xba\xbe" {
        return Err("Volume is not in LUKS format".into());
    }
    let version = u16::from_be_bytes([h[6], h[7]]);
    if version != 1 {
        return Err(format!("Unsupported LUKS version {version}"));
    }
    let cipher_name = luks_str(&h[8..40]);
    let cipher_mode = luks_str(&h[40..72]);
    let hash_spec = luks_str(&h[72..104]);
    let payload_sectors = be32(h, 104);
    let key_bytes = be32(h, 108);
    let mk_iters = be32(h, 164);
    let uuid = luks_str(&h[168..208]);

    // "xts-plain64", "cbc-essiv:sha256": the mode, the IV generator, its hash.
    let (mode, ivgen) = cipher_mode
        .split_once('-')
        .ok_or_else(|| format!("Unexpected cipher mode string format {cipher_mode}"))?;
    let (ivgen, ivhash) = match ivgen.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (ivgen, None),
    };
    if !["ecb", "cbc", "xts", "ctr"].contains(&mode) {
        return Err(format!("Unsupported cipher mode {mode}"));
    }
    if !["plain", "plain64", "essiv"].contains(&ivgen) {
        return Err(format!("Unsupported IV generator {ivgen}"));
    }
    let hash_ok = |h: &str| {
        [
            "md5",
            "sha1",
            "sha224",
            "sha256",
            "sha384",
            "sha512",
            "ripemd160",
            "sm3",
        ]
        .contains(&h)
    };
    if !hash_ok(&hash_spec) {
        return Err(format!("Unsupported hash algorithm {hash_spec}"));
    }
    let key = if mode == "xts" {
        key_bytes / 2
    } else {
        key_bytes
    };
    let alg = match (cipher_name.as_str(), key) {
        ("aes", 16) => "aes-128",
        ("aes", 24) => "aes-192",
        ("aes", 32) => "aes-256",
        ("cast5", 16) => "cast5-128",
        ("serpent", 16) => "serpent-128",
        ("serpent", 24) => "serpent-192",
        ("serpent", 32) => "serpent-256",
        ("twofish", 16) => "twofish-128",
        ("twofish", 24) => "twofish-192",
        ("twofish", 32) => "twofish-256",
        ("sm4", 16) => "sm4",
        _ => {
            return Err(format!(
                "Algorithm '{cipher_name}' with key size {key} bytes not supported"
            ))
        }
    };

    let mut m = Map::new();
    m.insert("cipher-alg".into(), alg.into());
    m.insert("cipher-mode".into(), mode.into());
    m.insert("ivgen-alg".into(), ivgen.into());
    if ivgen == "essiv" {
        match ivhash {
            Some(hh) if hash_ok(hh) => {
                m.insert("ivgen-hash-alg".into(), hh.into());
            }
            _ => return Err("Missing or unsupported IV generator hash".into()),
        }
    }
    m.insert("hash-alg".into(), hash_spec.into());
    m.insert("detached-header".into(), false.into());
    m.insert(
        "payload-offset".into(),
        (payload_sectors as i64 * 512).into(),
    );
    m.insert("master-key-iters".into(), (mk_iters as i64).into());
    m.insert("uuid".into(), uuid.into());
    let slots = (0..8)
        .map(|i| {
            let at = 208 + i * 48;
            let active = be32(h, at) == 0x00AC_71F3;
            let mut s = Map::new();
            s.insert("active".into(), active.into());
            if active {
                s.insert("iters".into(), (be32(h, at + 4) as i64).into());
                s.insert("stripes".into(), (be32(h, at + 44) as i64).into());
            }
            s.insert("key-offset".into(), (be32(h, at + 40) as i64 * 512).into());
            Value::Object(s)
        })
        .collect();
    m.insert("slots".into(), Value::Array(slots));
    Ok(m)
}

/// QEMU's warning when opening an image whose bitmaps extension was left behind by a
/// program that does not know bitmaps (the autoclear bit is clear): they are ignored.
pub(crate) fn warn_stale_bitmaps(ctx: &Ctx, meta: &ImageMeta) {
    let bit = oxcow::format::header::autoclear::BITMAPS;
    if meta.bitmaps_ext.is_some() && meta.header.autoclear_features & bit == 0 {
        eprint!(
            "{}: warning: a program lacking bitmap support modified this file, so all \
             bitmaps are now considered inconsistent\nSome clusters may be leaked, run \
             'qemu-img check -r' on the image file to fix.",
            ctx.prog
        );
    }
}

/// Opens one image (no backing file, no data file) and describes it.
fn query_node(ctx: &Ctx, arg: &str, fmt: Option<&str>) -> Result<Node, String> {
    let format = check_format(arg, fmt)?;
    let (local, storage, md) = open_file(arg)?;
    let format = match format {
        Some(f) => f,
        None => oxcow::image::probe(&storage).map_err(|e| open_error(arg, &e))?,
    };
    let filename = local.as_str();
    let file = file_node(filename, &storage, &md);
    let node = match format {
        Format::Raw => Node {
            filename: filename.to_string(),
            format: "raw".to_string(),
            dirty_flag: Some(false),
            actual_size: file.actual_size,
            virtual_size: file.virtual_size,
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            format_specific: None,
            children: vec![("file".to_string(), file)],
        },
        Format::Qcow2 => {
            let meta = ImageMeta::load(&storage).map_err(|e| open_error(arg, &e))?;
            warn_stale_bitmaps(ctx, &meta);
            let h = &meta.header;
            let encrypt = encryption_info(&meta, &storage)
                .map_err(|r| format!("Could not open '{arg}': {r}"))?;
            let backing = meta.backing_file.clone().filter(|b| !b.is_empty());
            let full = backing
                .as_deref()
                .and_then(|b| full_backing_filename(filename, b));
            let backing_format = match &backing {
                Some(_) => meta.backing_format.clone().filter(|f| !f.is_empty()),
                None => None,
            };
            Node {
                filename: filename.to_string(),
                format: "qcow2".to_string(),
                dirty_flag: Some(h.is_dirty()),
                actual_size: file.actual_size,
                // QEMU counts whole sectors of the header's size.
                virtual_size: h.size / 512 * 512,
                cluster_size: Some(h.cluster_size()),
                encrypted: (h.crypt_method != CryptMethod::None).then_some(true),
                backing_filename: backing,
                full_backing_filename: full,
                backing_filename_format: backing_format,
                snapshots: meta.snapshots.clone(),
                format_specific: Some(qcow2_specific(&meta, encrypt)),
                children: vec![("file".to_string(), file)],
            }
        }
    };
    Ok(node)
}

/// `collect_image_info_list()`: the image, and with `chain` every image below it.
fn collect(ctx: &Ctx, filename: &str, fmt: Option<&str>, chain: bool) -> Result<Vec<Node>, String> {
    let mut list = Vec::new();
    let mut seen = HashSet::new();
    let mut filename = filename.to_string();
    let mut fmt = fmt.map(str::to_string);
    loop {
        if !seen.insert(filename.clone()) {
            return Err(format!(
                "Backing file '{filename}' creates an infinite loop."
            ));
        }
        let node = query_node(ctx, &filename, fmt.as_deref())?;
        let next = if chain {
            match (&node.full_backing_filename, &node.backing_filename) {
                (Some(full), _) => Some((full.clone(), node.backing_filename_format.clone())),
                (None, Some(b)) => {
                    return Err(format!(
                        "Could not determine absolute backing filename, but backing filename '{b}' present"
                    ))
                }
                (None, None) => None,
            }
        } else {
            None
        };
        list.push(node);
        match next {
            Some((f, bf)) => {
                filename = f;
                fmt = bf;
            }
            None => return Ok(list),
        }
    }
}

struct Args {
    output: OutputFormat,
    chain: bool,
    fmt: Option<String>,
    filename: String,
}

fn parse_args(ctx: &Ctx, args: &[String]) -> Result<Option<Args>, Stop> {
    let mut g = Getopt::new(args, SHORTS, LONGS);
    let mut output = OutputFormat::Human;
    let mut chain = false;
    let mut fmt = None;
    let mut image_opts = false;
    while let Some(o) = g.next_opt() {
        let o = o.map_err(Stop::Getopt)?;
        match o.id.as_str() {
            "h" => {
                print_help(ctx, HELP);
                return Ok(None);
            }
            "f" => fmt = o.arg,
            "image-opts" => image_opts = true,
            "b" => chain = true,
            "U" => {}
            "output" => output = parse_output_format(o.arg.as_deref().unwrap_or(""))?,
            "object" => return Err(unsupported("--object")),
            _ => {}
        }
    }
    let [filename] = g.operands() else {
        return Err(Stop::Usage("Expecting one image file name".into()));
    };
    if image_opts {
        if fmt.is_some() {
            return Err(Stop::Error(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        return Err(unsupported("--image-opts"));
    }
    Ok(Some(Args {
        output,
        chain,
        fmt,
        filename: filename.clone(),
    }))
}

pub fn run(ctx: &Ctx, args: &[String]) -> u8 {
    let a = match parse_args(ctx, args) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(stop) => return report_stop(ctx, "info", stop),
    };
    let list = match collect(ctx, &a.filename, a.fmt.as_deref(), a.chain) {
        Ok(l) => l,
        Err(msg) => {
            ctx.error(msg);
            return 1;
        }
    };
    let text = match a.output {
        OutputFormat::Human => {
            let mut out = String::new();
            for (i, node) in list.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                node.dump_human(&mut out, 0, "/");
            }
            out
        }
        OutputFormat::Json => {
            let v = if a.chain {
                Value::Array(list.iter().map(Node::to_value).collect())
            } else {
                list.first().map_or(Value::Null, Node::to_value)
            };
            let mut s = qjson::to_json_pretty(&v);
            s.push('\n');
            s
        }
    };
    write_stdout(&text)
}

/// Writes all of `text` to stdout; a closed pipe is not worth a panic.
pub(crate) fn write_stdout(text: &str) -> u8 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_suffix_removed() {
        assert_eq!(
            strip_os_error("Could not open 'a': No such file or directory (os error 2)"),
            "Could not open 'a': No such file or directory"
        );
        assert_eq!(strip_os_error("x (os error y)"), "x (os error y)");
    }

    #[test]
    fn backing_names_resolve_like_qemu() {
        assert_eq!(
            full_backing_filename("chain/top.qcow2", "mid.qcow2").as_deref(),
            Some("chain/mid.qcow2")
        );
        assert_eq!(
            full_backing_filename("top.qcow2", "mid.qcow2").as_deref(),
            Some("mid.qcow2")
        );
        assert_eq!(
            full_backing_filename("/a/top", "/b/base").as_deref(),
            Some("/b/base")
        );
        assert_eq!(
            full_backing_filename("a/top", "nbd:x").as_deref(),
            Some("nbd:x")
        );
        assert_eq!(full_backing_filename("json:{}", "base"), None);
    }
}
