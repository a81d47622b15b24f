//! Reading and writing named tensor files: safetensors (read and written) and PyTorch
//! `.pth`/`.pt` zip pickles (read), as used by the official SAM checkpoints.
//! Writes are atomic. Nothing here panics on a bad file: errors name the file.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
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
        "safetensors" => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
            let mut out = Vec::new();
            for (name, view) in st.tensors() {
                let t = tensor_from_view(&name, &view, device).map_err(|e| match e {
                    Error::Candle(c) => bad(format!("tensor `{name}`: {c}")),
                    other => bad(other.to_string()),
                })?;
                out.push((name, t));
            }
            out
        }
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

fn tensor_from_view(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let shape = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
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

/// Serialise named tensors to safetensors bytes (f32, u32 and i64 kept as they are).
pub fn to_safetensors_bytes(
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?;
        let shape = t.dims().to_vec();
        let (dt, bytes) = match t.dtype() {
            DType::U32 => {
                let v = t.flatten_all()?.to_vec1::<u32>()?;
                (
                    safetensors::Dtype::U32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            }
            DType::I64 => {
                let v = t.flatten_all()?.to_vec1::<i64>()?;
                (
                    safetensors::Dtype::I64,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            }
            _ => {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                (
                    safetensors::Dtype::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            }
        };
        owned.push((name.clone(), dt, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, s, b)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Tensor {
                    name: n.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::msg(format!("safetensors serialisation failed: {e}")))
}

/// Save named tensors as safetensors, atomically (temp file + rename).
pub fn save_safetensors(
    path: &Path,
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = to_safetensors_bytes(tensors, metadata)?;
    crate::util::fs::write_atomic(path, &bytes)
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
