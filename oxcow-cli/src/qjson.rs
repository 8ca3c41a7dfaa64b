//! QEMU's QObject printing, for output that must equal qemu-img's byte for byte.
//!
//! QEMU builds its structured output as QDicts: hash tables of 512 buckets, walked
//! bucket by bucket with the most recently inserted key first within a bucket. The key
//! order of every object therefore follows the hash of its keys, not the schema.
//! Callers build a [`serde_json::Value`] inserting members in QAPI schema order (the
//! order QEMU's output visitor inserts them); this module prints it as
//! `qobject_to_json_pretty()` does, and as block/qapi.c's human dump (`dump_qobject`)
//! does.

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Buckets of a QDict.
const QDICT_BUCKET_MAX: u32 = 512;

/// QDict's hash of a key (tdb_hash, from gdbm), all arithmetic modulo 2^32.
pub fn tdb_hash(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        let shift = (i as u32 * 5) % 24;
        value = value.wrapping_add((c as u32) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The bucket a key lands in.
pub fn bucket(key: &str) -> u32 {
    tdb_hash(key) % QDICT_BUCKET_MAX
}

/// The members of an object in QDict iteration order: by bucket, and within a bucket
/// the last inserted first.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&str, &Value)> {
    let mut entries: Vec<(u32, usize, &str, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (bucket(k), i, k.as_str(), v))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// `qobject_to_json_pretty()`: four spaces per level, QDict key order, QEMU's string
/// escapes. No trailing newline.
pub fn to_json_pretty(v: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v, 0);
    out
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn write_json(out: &mut String, v: &Value, depth: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => quoted_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_json(out, item, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                quoted_str(out, k);
                out.push_str(": ");
                write_json(out, item, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// QEMU's JSON string quoting: the usual escapes, every other control character and
/// every non-ASCII code point as `\uXXXX` (upper-case hex, surrogate pairs beyond the
/// BMP); `/` is not escaped.
pub fn quoted_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => {
                let cp = c as u32;
                if cp > 0xFFFF {
                    let v = cp - 0x10000;
                    let _ = write!(
                        out,
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    );
                } else if !(0x20..0x7F).contains(&cp) {
                    let _ = write!(out, "\\u{cp:04X}");
                } else {
                    out.push(c);
                }
            }
        }
    }
    out.push('"');
}

/// True when `dump_qobject` would print nothing for `v` (an empty dict or list).
pub fn is_empty_dump(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn is_composite(v: &Value) -> bool {
    matches!(v, Value::Object(_) | Value::Array(_))
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level * 4 {
        out.push(' ');
    }
}

/// block/qapi.c's `dump_qobject()`: the human form of a value, at `comp_indent`
/// levels for the members of a composite.
pub fn dump_qobject(out: &mut String, comp_indent: usize, v: &Value) {
    match v {
        Value::Null => {}
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => out.push_str(s),
        Value::Array(items) => dump_qlist(out, comp_indent, items),
        Value::Object(map) => dump_qdict(out, comp_indent, map),
    }
}

fn dump_qlist(out: &mut String, level: usize, items: &[Value]) {
    for (i, item) in items.iter().enumerate() {
        let composite = is_composite(item);
        indent(out, level);
        let _ = write!(out, "[{i}]:{}", if composite { '\n' } else { ' ' });
        dump_qobject(out, level + 1, item);
        if !composite {
            out.push('\n');
        }
    }
}

fn dump_qdict(out: &mut String, level: usize, map: &Map<String, Value>) {
    for (k, item) in qdict_order(map) {
        let composite = is_composite(item);
        indent(out, level);
        // Dashes in key names print as spaces.
        out.push_str(&k.replace('-', " "));
        out.push(':');
        out.push(if composite { '\n' } else { ' ' });
        dump_qobject(out, level + 1, item);
        if !composite {
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn buckets_like_qemu() {
        // Observed key orders of qemu-img info output.
        for (k, b) in [
            ("compressed", 90),
            ("children", 206),
            ("backing-filename-format", 206),
            ("snapshots", 263),
            ("virtual-size", 309),
            ("filename", 313),
            ("cluster-size", 316),
            ("format", 337),
            ("actual-size", 351),
            ("format-specific", 354),
            ("full-backing-filename", 360),
            ("encrypted", 413),
            ("backing-filename", 475),
            ("dirty-flag", 501),
            ("compat", 16),
            ("extended-l2", 503),
        ] {
            assert_eq!(bucket(k), b, "{k}");
        }
    }

    #[test]
    fn same_bucket_latest_first() {
        let v = json!({"backing-filename-format": "raw", "children": []});
        assert_eq!(
            to_json_pretty(&v),
            "{\n    \"children\": [\n    ],\n    \"backing-filename-format\": \"raw\"\n}"
        );
    }

    #[test]
    fn escapes() {
        let mut s = String::new();
        quoted_str(&mut s, "a/\"\\\u{1}ü😀\t");
        assert_eq!(s, "\"a/\\\"\\\\\\u0001\\u00FC\\uD83D\\uDE00\\t\"");
    }

    #[test]
    fn human_dump() {
        let v = json!({"compat": "1.1", "bitmaps": [{"name": "b", "granularity": 65536, "flags": []}], "refcount-bits": 16});
        let mut s = String::new();
        dump_qobject(&mut s, 1, &v);
        assert_eq!(
            s,
            "    compat: 1.1\n    bitmaps:\n        [0]:\n            flags:\n            name: b\n            granularity: 65536\n    refcount bits: 16\n"
        );
    }
}
