//! Weights from a Hugging Face directory: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, each memory-mapped. Headers are validated by the
//! `safetensors` crate (offsets contiguous and inside the file) before any tensor is touched,
//! so a truncated or corrupt file is an error naming the file, never a panic or a huge read.

use super::tensor::{HostData, HostTensor};
use super::{FileBytes, TensorSource};
use crate::error::ModelError;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: FileBytes,
    /// Byte offset of the data section (8-byte length prefix + JSON header).
    data_start: usize,
}

/// All tensors of a safetensors model directory.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → (shard index, header info).
    index: HashMap<String, (usize, TensorInfo)>,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors.index.json` if present, else every `*.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let files = shard_files(dir)?;
        let mut source = Self {
            dir: dir.to_path_buf(),
            shards: Vec::with_capacity(files.len()),
            index: HashMap::new(),
        };
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the mapping is read-only and the loader never writes model files; a
            // concurrent writer truncating the file is outside what any mmap loader can defend.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            source.add_shard(path, FileBytes::Mapped(mmap))?;
        }
        Ok(source)
    }

    /// One `.safetensors` file held in memory, validated exactly like a mapped shard; `origin`
    /// names it in errors. (The fuzz targets and parser tests enter here.)
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self, ModelError> {
        let mut source = Self {
            dir: origin.to_path_buf(),
            shards: Vec::with_capacity(1),
            index: HashMap::new(),
        };
        source.add_shard(origin.to_path_buf(), FileBytes::Owned(bytes))?;
        Ok(source)
    }

    fn add_shard(&mut self, path: PathBuf, mmap: FileBytes) -> Result<(), ModelError> {
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| ModelError::format(&path, format!("safetensors header: {e}")))?;
        let shard_idx = self.shards.len();
        for (name, info) in metadata.tensors() {
            if self
                .index
                .insert(name.clone(), (shard_idx, info.clone()))
                .is_some()
            {
                return Err(ModelError::format(
                    &path,
                    format!("tensor `{name}` appears in more than one shard"),
                ));
            }
        }
        self.shards.push(Shard {
            path,
            mmap,
            data_start: 8 + header_len,
        });
        Ok(())
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&index_path, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::format(&index_path, "no `weight_map` object"))?;
        let mut files: Vec<String> = Vec::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| {
                ModelError::format(&index_path, "weight_map value is not a string")
            })?;
            // Shard names must stay inside the model directory.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(ModelError::format(
                    &index_path,
                    format!("bad shard name `{f}`"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::io(
            dir.join("model.safetensors"),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors file in the model directory",
            ),
        ));
    }
    Ok(files)
}

/// Reinterprets little-endian bytes as `T`, borrowing when aligned and copying otherwise.
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn has(&self, hf_name: &str) -> bool {
        self.index.contains_key(hf_name)
    }

    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        let (shard_idx, info) =
            self.index
                .get(hf_name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.dir.clone(),
                    name: hf_name.to_string(),
                })?;
        let shard = &self.shards[*shard_idx];
        let (s, e) = info.data_offsets;
        // read_metadata checked that offsets are contiguous and end exactly at the file end.
        let bytes = &shard.mmap[shard.data_start + s..shard.data_start + e];
        let data = match info.dtype {
            Dtype::F32 => HostData::F32(cast::<f32>(bytes)),
            Dtype::BF16 => HostData::Bf16(cast::<bf16>(bytes)),
            Dtype::F16 => HostData::F16(cast::<f16>(bytes)),
            other => {
                return Err(ModelError::unsupported(
                    &shard.path,
                    format!("tensor `{hf_name}` has dtype {other:?} (supported: F32, BF16, F16)"),
                ))
            }
        };
        Ok(HostTensor {
            name: hf_name.to_string(),
            shape: info.shape.clone(),
            data,
        })
    }
}
