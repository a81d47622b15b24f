//! Where ONNX files meet: the external data a model file points into, and the base a task file
//! was exported against, are checked before a model is loaded.
//!
//! - Every model written with external data records, in its `metadata_props`, each external
//!   tensor's place and SHA-256 ([`META_EXTERNAL`]: `{"file", "tensors": [{name, offset,
//!   length, sha256}]}`). [`verify_model_file`] re-hashes those byte ranges of the `.data` file
//!   before ONNX Runtime reads it: a truncated, zeroed or swapped data file (or a model beside
//!   the data of another export) is refused naming the tensor. A data file is hashed once per
//!   process and file identity (device, inode, size, mtime, ctime) — about 0.2 s for ViT-B's
//!   363 MB on a CPU with SHA extensions.
//! - A task file (`export --base-onnx`) also records the digest of its base's record
//!   ([`META_BASE_DATA`]); loading it checks the base file beside it: a gps-seg base, of the
//!   checkpoint the task was made for (`gps_seg.base_content_hash`), with exactly the data the
//!   task was exported against, and that data intact.
//!
//! The metadata is read without decoding the graph ([`read_metadata`]: the top-level protobuf
//! fields are walked and the graph's bytes skipped), so the check costs the hashing alone.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `metadata_props` key: `base` or `task`.
pub const META_ROLE: &str = "gps_seg.delta_role";
/// `metadata_props` key: the base checkpoint's content hash.
pub const META_BASE_HASH: &str = "gps_seg.base_content_hash";
/// `metadata_props` key of a task file: the base file it points into.
pub const META_BASE_FILE: &str = "gps_seg.base_file";
/// `metadata_props` key written by every SAM / classifier export: the graph kind.
pub const META_GRAPH: &str = "gps_seg.graph";

/// `metadata_props` key: the external-data record (JSON [`ExternalRecord`]).
pub const META_EXTERNAL: &str = "gps_seg.external_data";
/// `metadata_props` key of a task file: [`record_digest`] of its base's [`META_EXTERNAL`].
pub const META_BASE_DATA: &str = "gps_seg.base_data_sha256";

/// One external tensor: where it lies in the data file and its bytes' SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalTensor {
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

/// What a model file records about its external data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRecord {
    /// The data file's name (beside the model).
    pub file: String,
    pub tensors: Vec<ExternalTensor>,
}

/// SHA-256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The digest a task file records of its base: SHA-256 of the base's [`META_EXTERNAL`] value.
pub fn record_digest(record_json: &str) -> String {
    sha256_hex(record_json.as_bytes())
}

/// Largest metadata entry read (the external record of a ViT-H base is ~60 KB).
const MAX_META_BYTES: u64 = 64 << 20;

fn read_varint(r: &mut impl Read, path: &Path) -> Result<Option<u64>> {
    let mut v = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) if i == 0 => return Ok(None),
            Ok(0) => return Err(not_onnx(path, "truncated varint")),
            Ok(_) => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        v |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some(v));
        }
    }
    Err(not_onnx(path, "varint longer than 10 bytes"))
}

fn not_onnx(path: &Path, why: &str) -> Error {
    Error::Onnx(format!("{}: not an ONNX model ({why})", path.display()))
}

/// The `metadata_props` of the ONNX model at `path`, read without decoding its graph.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use prost::Message;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = std::io::BufReader::new(f);
    let mut out = BTreeMap::new();
    let mut pos = 0u64;
    while let Some(tag) = read_varint(&mut r, path)? {
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                read_varint(&mut r, path)?.ok_or_else(|| not_onnx(path, "truncated field"))?;
            }
            1 => {
                r.seek_relative(8).map_err(|e| Error::io(path, e))?;
            }
            5 => {
                r.seek_relative(4).map_err(|e| Error::io(path, e))?;
            }
            2 => {
                let n =
                    read_varint(&mut r, path)?.ok_or_else(|| not_onnx(path, "truncated length"))?;
                let here = r.stream_position().map_err(|e| Error::io(path, e))?;
                if n > len.saturating_sub(here) {
                    return Err(not_onnx(path, "a field runs past the end of the file"));
                }
                if field == 14 {
                    if n > MAX_META_BYTES {
                        return Err(not_onnx(path, "a metadata entry over 64 MiB"));
                    }
                    let mut buf = vec![0u8; n as usize];
                    r.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
                    let e = super::proto::StringStringEntryProto::decode(buf.as_slice())
                        .map_err(|e| not_onnx(path, &format!("metadata entry: {e}")))?;
                    out.insert(e.key, e.value);
                } else {
                    let n = i64::try_from(n).map_err(|_| not_onnx(path, "field too long"))?;
                    r.seek_relative(n).map_err(|e| Error::io(path, e))?;
                }
            }
            _ => return Err(not_onnx(path, &format!("wire type {wire}"))),
        }
        let now = r.stream_position().map_err(|e| Error::io(path, e))?;
        if now <= pos && now != 0 {
            return Err(not_onnx(path, "no progress"));
        }
        pos = now;
    }
    Ok(out)
}

/// The file identity a verified data file is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    record: String,
}

fn file_id(path: &Path, record: &str) -> Result<FileId> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(FileId {
            path: crate::util::fs::canonical_lenient(path),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            record: record_digest(record),
        })
    }
    #[cfg(not(unix))]
    Ok(FileId {
        path: crate::util::fs::canonical_lenient(path),
        dev: 0,
        ino: 0,
        len: m.len(),
        mtime: (0, 0),
        ctime: (0, 0),
        record: record_digest(record),
    })
}

static VERIFIED: Mutex<Option<HashMap<FileId, ()>>> = Mutex::new(None);

/// Parse a [`META_EXTERNAL`] value (`model` names the file it came from).
pub fn parse_record(model: &Path, json: &str) -> Result<ExternalRecord> {
    serde_json::from_str(json).map_err(|e| {
        Error::Onnx(format!(
            "{}: metadata `{META_EXTERNAL}` is not a valid record: {e}",
            model.display()
        ))
    })
}

/// Check the external data of `model` (its file beside it) against `record` (once per process
/// and file identity).
pub fn verify_data(model: &Path, record_json: &str) -> Result<()> {
    let rec = parse_record(model, record_json)?;
    if rec.file.contains('/') || rec.file.contains('\\') || rec.file.is_empty() {
        return Err(Error::Onnx(format!(
            "{}: external data file name `{}` is not a plain file name",
            model.display(),
            rec.file
        )));
    }
    let data = crate::util::fs::parent_of(model).join(&rec.file);
    if !data.is_file() {
        return Err(Error::io(
            &data,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "the external data of {} is missing (it holds {} tensors)",
                    model.display(),
                    rec.tensors.len()
                ),
            ),
        ));
    }
    let id = file_id(&data, record_json)?;
    if let Ok(v) = VERIFIED.lock() {
        if v.as_ref().is_some_and(|m| m.contains_key(&id)) {
            return Ok(());
        }
    }
    let mut f = std::fs::File::open(&data).map_err(|e| Error::io(&data, e))?;
    let len = id.len;
    let mut buf = vec![0u8; 1 << 20];
    for t in &rec.tensors {
        let end = t.offset.checked_add(t.length).ok_or_else(|| {
            Error::Onnx(format!(
                "{}: tensor `{}` has offset + length over 2^64",
                model.display(),
                t.name
            ))
        })?;
        if end > len {
            return Err(Error::Onnx(format!(
                "{}: tensor `{}` needs bytes {}..{end} but the file has {len} bytes \
                 (truncated, or not the data this model was written with)",
                data.display(),
                t.name,
                t.offset
            )));
        }
        f.seek(SeekFrom::Start(t.offset))
            .map_err(|e| Error::io(&data, e))?;
        let mut h = Sha256::new();
        let mut left = t.length;
        while left > 0 {
            let n = (left.min(buf.len() as u64)) as usize;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            f.read_exact(chunk).map_err(|e| Error::io(&data, e))?;
            h.update(&*chunk);
            left -= n as u64;
        }
        let got = format!("{:x}", h.finalize());
        if got != t.sha256 {
            return Err(Error::Onnx(format!(
                "{}: tensor `{}` (bytes {}..{end}) does not match the SHA-256 {} recorded in {} \
                 (the data file was changed or replaced after export; re-export the model)",
                data.display(),
                t.name,
                t.offset,
                model.display(),
                short(&t.sha256)
            )));
        }
    }
    if let Ok(mut v) = VERIFIED.lock() {
        v.get_or_insert_with(HashMap::new).insert(id, ());
    }
    Ok(())
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// The files loading `model` reads besides itself: its external data (recorded, or
/// `<model>.data` when present), and for a task file its base and the base's data. Best effort
/// (an unreadable file adds nothing): for the output rule, which treats them as inputs.
pub fn companion_files(model: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let dir = crate::util::fs::parent_of(model);
    let data_of = |m: &Path| {
        let mut d = m.as_os_str().to_owned();
        d.push(".data");
        PathBuf::from(d)
    };
    let own = data_of(model);
    if own.exists() {
        out.push(own);
    }
    if let Ok(meta) = read_metadata(model) {
        if let Some(f) = meta
            .get(META_EXTERNAL)
            .and_then(|r| parse_record(model, r).ok())
        {
            out.push(dir.join(f.file));
        }
        if let Some(b) = meta.get(META_BASE_FILE).filter(|b| !b.is_empty()) {
            let base = dir.join(b);
            out.push(data_of(&base));
            out.push(base);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What [`verify_model_file`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Tensors of the model's own external data that were checked.
    pub external_tensors: usize,
    /// For a task file: its base file (checked).
    pub base: Option<PathBuf>,
}

/// Check a model file before it is loaded: its own external data (when recorded), and for a
/// task file its base (role, content hash, data digest, data). Errors name both files.
pub fn verify_model_file(model: &Path) -> Result<Verified> {
    let meta = read_metadata(model)?;
    let mut v = Verified::default();
    if let Some(rec) = meta.get(META_EXTERNAL) {
        verify_data(model, rec)?;
        v.external_tensors = parse_record(model, rec)?.tensors.len();
    }
    if meta.get(META_ROLE).map(String::as_str) == Some("task") {
        v.base = Some(verify_task_base(model, &meta)?);
    }
    Ok(v)
}

/// The base file a task file names (beside it, existing); nothing checked beyond that.
pub fn verify_task_base_path(task: &Path, meta: &BTreeMap<String, String>) -> Result<PathBuf> {
    let bad = |m: String| Error::Onnx(format!("{}: {m}", task.display()));
    let base_file = meta
        .get(META_BASE_FILE)
        .filter(|b| !b.is_empty() && !b.contains('/') && !b.contains('\\'))
        .ok_or_else(|| {
            bad(format!(
                "a task file without a plain `{META_BASE_FILE}` entry"
            ))
        })?;
    let base = crate::util::fs::parent_of(task).join(base_file);
    if !base.is_file() {
        return Err(Error::io(
            &base,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the base of task file {} is missing", task.display()),
            ),
        ));
    }
    Ok(base)
}

/// The base of the task file `task` (metadata `meta`): found beside it and checked as
/// [`verify_model_file`] says. Returns the base's path.
pub fn verify_task_base(task: &Path, meta: &BTreeMap<String, String>) -> Result<PathBuf> {
    let base = verify_task_base_path(task, meta)?;
    let bmeta = read_metadata(&base)?;
    check_pair(task, meta, &base, &bmeta)?;
    let rec = bmeta.get(META_EXTERNAL).map(String::as_str).unwrap_or("");
    verify_data(&base, rec)?;
    Ok(base)
}

/// A task's metadata against its base's: role, content hash, data digest (no file access).
pub fn check_pair(
    task: &Path,
    meta: &BTreeMap<String, String>,
    base: &Path,
    bmeta: &BTreeMap<String, String>,
) -> Result<()> {
    let bad = |m: String| Error::Onnx(format!("{}: {m}", task.display()));
    if bmeta.get(META_ROLE).map(String::as_str) != Some("base") {
        return Err(bad(format!(
            "its base {} is not a gps-seg base file (no `{META_ROLE}` = base)",
            base.display()
        )));
    }
    let want = meta.get(META_BASE_HASH).cloned().unwrap_or_default();
    let have = bmeta.get(META_BASE_HASH).cloned().unwrap_or_default();
    if want != have {
        return Err(bad(format!(
            "exported for the base checkpoint with content hash {}, but the base beside it, {}, \
             holds content hash {} (another checkpoint's base): refusing to run it on that base",
            short(&want),
            base.display(),
            short(&have)
        )));
    }
    let digest = meta.get(META_BASE_DATA).ok_or_else(|| {
        bad(format!(
            "no `{META_BASE_DATA}`: written by an older gps-seg without integrity records; \
             re-export it with `export --base-onnx`"
        ))
    })?;
    let rec = bmeta.get(META_EXTERNAL).ok_or_else(|| {
        bad(format!(
            "its base {} records no external data (`{META_EXTERNAL}`)",
            base.display()
        ))
    })?;
    if &record_digest(rec) != digest {
        return Err(bad(format!(
            "its base {} is not the base file it was exported against (the base was \
             re-exported since; its data digest {} differs from the recorded {}): re-export the \
             task on this base",
            base.display(),
            short(&record_digest(rec)),
            short(digest)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{write_model_with, ExternalData, GraphBuilder, IR_VERSION, OPSET};
    use crate::onnx::proto::data_type;

    fn model_with_data(dir: &Path) -> PathBuf {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", data_type::FLOAT, &[4.into()]).unwrap();
        let big: Vec<f32> = (0..4000).map(|i| i as f32).collect();
        b.param_f32("big", &[4000], &big).unwrap();
        let w = b.param_f32("w", &[4], &[1.0; 4]).unwrap();
        let y = b.add(&x, &w).unwrap();
        b.output(&y, "y", data_type::FLOAT, &[4.into()]).unwrap();
        let m = b.finish(OPSET, IR_VERSION).unwrap();
        let p = dir.join("m.onnx");
        write_model_with(
            &p,
            m,
            ExternalData::Always {
                threshold_bytes: 1024,
            },
        )
        .unwrap();
        p
    }

    #[test]
    fn metadata_is_read_without_the_graph_and_data_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = model_with_data(dir.path());
        let meta = read_metadata(&p).unwrap();
        let rec = parse_record(&p, &meta[META_EXTERNAL]).unwrap();
        assert_eq!(rec.file, "m.onnx.data");
        assert_eq!(rec.tensors.len(), 1);
        assert_eq!(rec.tensors[0].name, "big");
        assert_eq!(verify_model_file(&p).unwrap().external_tensors, 1);
        // One byte changed → refused naming the tensor (a new inode: not the cached identity).
        let d = dir.path().join("m.onnx.data");
        let mut bytes = std::fs::read(&d).unwrap();
        bytes[100] ^= 1;
        std::fs::remove_file(&d).unwrap();
        std::fs::write(&d, &bytes).unwrap();
        let e = verify_model_file(&p).unwrap_err().to_string();
        assert!(e.contains("`big`") && e.contains("SHA-256"), "{e}");
        // Truncated, then missing.
        std::fs::remove_file(&d).unwrap();
        std::fs::write(&d, &bytes[..1000]).unwrap();
        let e = verify_model_file(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_file(&d).unwrap();
        let e = verify_model_file(&p).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        // Garbage is not a model, and never a panic.
        let g = dir.path().join("g.onnx");
        std::fs::write(&g, [0xffu8; 40]).unwrap();
        assert!(read_metadata(&g).is_err());
    }
}
