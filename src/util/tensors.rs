//! Reading and writing named tensor files: safetensors (read and written) and PyTorch
//! `.pth`/`.pt` zip pickles (read), as used by the official SAM checkpoints.
//! Writes are atomic. Nothing here panics on a bad file: errors name the file.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Named tensors, ordered by name (stable iteration for hashing, saving and reports).
pub type TensorMap = BTreeMap<String, Tensor>;

/// Load every tensor of a `.safetensors`, `.pth`/`.pt`/`.bin` file onto `device` as f32.
/// A PyTorch file whose top level is a dict with a `state_dict` or `model` entry is unwrapped.
pub fn load(path: &Path, device: &Device) -> Result<TensorMap> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let raw: Vec<(String, Tensor)> = match ext.as_str() {
        "safetensors" => read_safetensors(path, device)?,
        "pth" | "pt" | "bin" | "ckpt" => {
            let mut last = None;
            let mut found = None;
            for key in [None, Some("state_dict"), Some("model")] {
                match std::panic::catch_unwind(|| candle_core::pickle::read_all_with_key(path, key))
                {
                    Ok(Ok(v)) if !v.is_empty() => {
                        found = Some(v);
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => last = Some(e.to_string()),
                    Err(_) => last = Some("the pickle reader crashed on this file".to_string()),
                }
            }
            let v = found.ok_or_else(|| {
                bad(format!(
                    "not a readable PyTorch checkpoint ({})",
                    last.unwrap_or_else(|| "no tensors found".into())
                ))
            })?;
            let mut out = Vec::with_capacity(v.len());
            for (name, t) in v {
                let t = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                out.push((name, t));
            }
            out
        }
        other => {
            return Err(bad(format!(
                "unknown checkpoint extension `.{other}` (expected .safetensors or .pth)"
            )))
        }
    };
    Ok(raw.into_iter().collect())
}

fn tensor_from_bytes(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    data: &[u8],
    device: &Device,
) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let shape = shape.to_vec();
    let t = match dtype {
        S::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::F16 => {
            let v: Vec<f32> = data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::BF16 => {
            let v: Vec<f32> = data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::F64 => {
            let v: Vec<f32> = data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::U32 => {
            let v: Vec<u32> = data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        S::I64 => {
            let v: Vec<i64> = data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        other => {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!("unsupported dtype {other:?}"),
            })
        }
    };
    Ok(t)
}

/// The safetensors dtype and element size a tensor is written with (f32, u32 and i64 kept
/// as they are; every other dtype is written as f32).
fn stored_dtype(t: &Tensor) -> (safetensors::Dtype, usize) {
    match t.dtype() {
        DType::U32 => (safetensors::Dtype::U32, 4),
        DType::I64 => (safetensors::Dtype::I64, 8),
        _ => (safetensors::Dtype::F32, 4),
    }
}

/// Stream named tensors to `w` in the safetensors format (header, then each tensor's bytes
/// in name order), one tensor in memory at a time: no copy of the whole file is built.
pub fn write_safetensors(
    w: &mut impl Write,
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(m).map_err(|e| Error::msg(format!("safetensors header: {e}")))?,
        );
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dt, size) = stored_dtype(t);
        let bytes = t
            .elem_count()
            .checked_mul(size)
            .ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "too large to save".into(),
            })?;
        let end = offset.checked_add(bytes).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            msg: "the file would be too large".into(),
        })?;
        let info = safetensors::tensor::TensorInfo {
            dtype: dt,
            shape: t.dims().to_vec(),
            data_offsets: (offset, end),
        };
        header.insert(
            name.clone(),
            serde_json::to_value(info).map_err(|e| Error::Tensor {
                name: name.clone(),
                msg: format!("safetensors header: {e}"),
            })?,
        );
        offset = end;
    }
    let mut hb = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::msg(format!("safetensors header: {e}")))?;
    // The format pads the header with spaces to a multiple of 8 bytes.
    while hb.len() % 8 != 0 {
        hb.push(b' ');
    }
    let io = |e: std::io::Error| Error::msg(format!("writing safetensors: {e}"));
    w.write_all(&(hb.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hb).map_err(io)?;
    let mut chunk = Vec::with_capacity(1 << 16);
    for t in tensors.values() {
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        match stored_dtype(&t).0 {
            safetensors::Dtype::U32 => {
                for c in t.to_vec1::<u32>()?.chunks(1 << 14) {
                    chunk.clear();
                    c.iter()
                        .for_each(|x| chunk.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&chunk).map_err(io)?;
                }
            }
            safetensors::Dtype::I64 => {
                for c in t.to_vec1::<i64>()?.chunks(1 << 13) {
                    chunk.clear();
                    c.iter()
                        .for_each(|x| chunk.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&chunk).map_err(io)?;
                }
            }
            _ => {
                for c in t.to_dtype(DType::F32)?.to_vec1::<f32>()?.chunks(1 << 14) {
                    chunk.clear();
                    c.iter()
                        .for_each(|x| chunk.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&chunk).map_err(io)?;
                }
            }
        }
    }
    Ok(())
}

/// Serialise named tensors to safetensors bytes (f32, u32 and i64 kept as they are).
pub fn to_safetensors_bytes(
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_safetensors(&mut out, tensors, metadata)?;
    Ok(out)
}

/// Save named tensors as safetensors, atomically (temp file + rename), streamed tensor by
/// tensor ([`write_safetensors`]): saving a ViT-H merge no longer builds the ≈ 2.5 GB file
/// in memory first.
pub fn save_safetensors(
    path: &Path,
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut failure = None;
    let r = crate::util::fs::write_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        if let Err(e) = write_safetensors(&mut w, tensors, metadata) {
            let msg = e.to_string();
            failure = Some(e);
            return Err(std::io::Error::other(msg));
        }
        w.flush()
    });
    match (r, failure) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => r,
    }
}

/// Largest safetensors header read (the format's own bound, 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Read a safetensors file tensor by tensor: the header first (bounded), then each tensor's
/// bytes with one read into a reused buffer, decoded to its tensor. The whole file is never
/// in memory (nor mapped: a mapped file's touched pages count as resident too), so loading
/// peaks at the decoded tensors plus the largest one's bytes.
fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file: {msg}"),
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(|_| {
        bad(format!(
            "{len} bytes, shorter than the 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n8);
    let data_start = n
        .checked_add(8)
        .filter(|&e| n <= MAX_HEADER_BYTES && e <= len)
        .ok_or_else(|| {
            bad(format!(
                "header length {n} does not fit the file ({len} bytes) or exceeds {MAX_HEADER_BYTES}"
            ))
        })?;
    let mut header = vec![0u8; usize::try_from(n).map_err(|_| bad("header too large".into()))?];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("header: {e}")))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    drop(header);
    let data_len = len - data_start;
    let mut infos: Vec<(String, safetensors::tensor::TensorInfo)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    infos.sort_by_key(|(_, i)| i.data_offsets.0);
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let (start, end) = info.data_offsets;
        let want = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|numel| numel.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        let fits = end >= start && u64::try_from(end).is_ok_and(|e| e <= data_len);
        let bytes = match want {
            Some(w) if fits && end - start == w => w,
            _ => {
                return Err(bad(format!(
                    "tensor `{name}`: data offsets {start}..{end} do not match its shape {:?}                      and dtype {:?} within the {data_len} data bytes",
                    info.shape, info.dtype
                )))
            }
        };
        let at = data_start
            .checked_add(start as u64)
            .ok_or_else(|| bad(format!("tensor `{name}`: offset overflow")))?;
        f.seek(SeekFrom::Start(at))
            .map_err(|e| Error::io(path, e))?;
        buf.resize(bytes, 0);
        f.read_exact(&mut buf)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let t = tensor_from_bytes(&name, info.dtype, &info.shape, &buf, device).map_err(
            |e| match e {
                Error::Candle(c) => Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: format!("tensor `{name}`: {c}"),
                },
                other => Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: other.to_string(),
                },
            },
        )?;
        out.push((name, t));
    }
    Ok(out)
}

/// A content hash of named tensors (names, shapes and f32 values), hex sha256.
/// Identifies the base model a GPS artifact was made for.
pub fn content_hash(tensors: &TensorMap) -> Result<String> {
    let mut h = Sha256::new();
    for (name, t) in tensors {
        h.update(name.as_bytes());
        h.update([0u8]);
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let mut m = TensorMap::new();
        m.insert(
            "a.weight".into(),
            Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap(),
        );
        m.insert("idx".into(), Tensor::new(&[5u32, 6], &Device::Cpu).unwrap());
        save_safetensors(&p, &m, None).unwrap();
        let back = load(&p, &Device::Cpu).unwrap();
        assert_eq!(
            back["a.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert_eq!(back["idx"].to_vec1::<u32>().unwrap(), vec![5, 6]);
        assert_eq!(content_hash(&m).unwrap(), content_hash(&back).unwrap());

        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a tensor file").unwrap();
        let e = load(&junk, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        let junk = dir.path().join("junk.pth");
        std::fs::write(&junk, b"not a zip").unwrap();
        let e = load(&junk, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("junk.pth"), "{e}");
    }
}
