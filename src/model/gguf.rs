//! GGUF (v2/v3) model files: header, metadata, tensor table and memory-mapped tensor data;
//! `ModelConfig` from the `{arch}.*` metadata; and a [`TensorSource`] that hands tensors out
//! under their Hugging Face names, dequantized to f32, in HF orientation, with llama.cpp's Q/K
//! row permutation undone.
//!
//! Hostile input: every count, length and offset is checked against the bytes actually left in
//! the file before anything is allocated from it, so a corrupt file is a `Format` error naming
//! the file and the problem, never a panic or an allocation larger than a small multiple of the
//! file size. (A file truncated by someone else *while* it is mapped can still fault; no mmap
//! loader can defend against that.)

mod dequant;
mod names;
mod reader;
#[cfg(test)]
pub(crate) mod test_writer;

pub use dequant::{dequantize, GgmlType};
pub use names::{gguf_to_hf_name, hf_to_gguf_name, permute_qk_rows, unpermute_qk_rows};
pub use reader::{GgufArray, GgufValue};

use reader::{read_tensor_info, Reader};

use super::config::{Arch, ModelConfig, RopeScaling};
use super::tensor::{HostData, HostTensor, QuantData, QuantKind};
use super::FileBytes;
use super::TensorSource;
use crate::error::ModelError;
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// ggml order: `dims[0]` is the fastest-varying (input features of a linear weight).
    pub dims: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub file_offset: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Shape in Hugging Face / numpy order (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: FileBytes,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata and tensor table are parsed and every
    /// tensor's data range is checked to lie inside the file. Tensor data is not read.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        if len < 24 {
            return Err(ModelError::format(
                path,
                format!("truncated header: file is {len} bytes, a GGUF header needs 24"),
            ));
        }
        // SAFETY: read-only mapping of a model file the server never writes; a concurrent writer
        // truncating it is outside what any mmap loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, FileBytes::Mapped(mmap))
    }

    /// Parses a whole GGUF file held in memory, exactly as [`GgufFile::open`] parses a mapped
    /// one; `origin` names it in errors. (The fuzz targets and parser tests enter here.)
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<GgufFile, ModelError> {
        Self::parse(origin, FileBytes::Owned(bytes))
    }

    fn parse(path: &Path, mmap: FileBytes) -> Result<GgufFile, ModelError> {
        let len = mmap.len();
        if len < 24 {
            return Err(ModelError::format(
                path,
                format!("truncated header: file is {len} bytes, a GGUF header needs 24"),
            ));
        }
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = r.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(ModelError::format(
                path,
                format!("not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(ModelError::unsupported(
                    path,
                    "GGUF version 1 (only versions 2 and 3 are supported; re-convert the model)",
                ))
            }
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(ModelError::unsupported(
                    path,
                    "big-endian GGUF (only little-endian files are supported)",
                ))
            }
            v => {
                return Err(ModelError::unsupported(
                    path,
                    format!("GGUF version {v} (only versions 2 and 3 are supported)"),
                ))
            }
        }
        // Smallest tensor info: 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        let n_tensors = r.count(24, "tensor count")?;
        // Smallest metadata entry: 8 (key length) + 4 (type) + 1 (a u8 value).
        let n_kv = r.count(13, "metadata count")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(ModelError::format(
                    path,
                    format!("duplicate metadata key `{key}`"),
                ));
            }
            metadata.push((key, value));
        }

        let mut raw_tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            raw_tensors.push(read_tensor_info(&mut r)?);
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "general.alignment {:?} is not a power of two",
                            metadata[i].1
                        ),
                    ))
                }
            },
        };
        let data_start = (r.pos as u64).next_multiple_of(alignment);
        let file_len = mmap.len() as u64;

        let mut tensors = Vec::with_capacity(raw_tensors.len());
        let mut tensor_index = HashMap::with_capacity(raw_tensors.len());
        for (name, dims, ggml_type, n_bytes, offset) in raw_tensors {
            let end = data_start
                .checked_add(offset)
                .and_then(|s| s.checked_add(n_bytes).map(|e| (s, e)));
            let (start, end) = match end {
                Some((s, e)) if e <= file_len => (s, e),
                _ => {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "tensor `{name}`: data at offset {offset} (+{n_bytes} bytes) from the \
                             data section at {data_start} lies past the end of the file \
                             (size {file_len})"
                        ),
                    ))
                }
            };
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(ModelError::format(
                    path,
                    format!("duplicate tensor `{name}`"),
                ));
            }
            tensors.push(GgufTensorInfo {
                name,
                ggml_type,
                dims,
                file_offset: start as usize,
                n_bytes: (end - start) as usize,
            });
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata entries in file order.
    pub fn metadata_entries(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata(key)?.as_str()
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata(key)?.as_u64()
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.metadata(key)?.as_f64()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.metadata(key)?.as_bool()
    }

    pub fn get_array(&self, key: &str) -> Option<&GgufArray> {
        self.metadata(key)?.as_array()
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, gguf_name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(gguf_name).map(|&i| &self.tensors[i])
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn raw_data(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.mmap[info.file_offset..info.file_offset + info.n_bytes]
    }

    /// A tensor by its GGUF name, dequantized to f32, shape in HF order. No permutation.
    pub fn dequantize_tensor(&self, gguf_name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let info = self
            .tensor_info(gguf_name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: gguf_name.to_string(),
            })?;
        if !info.ggml_type.can_dequantize() {
            return Err(ModelError::unsupported(
                &self.path,
                format!(
                    "tensor `{}` has ggml type {} (id {}), which cannot be dequantized yet \
                     (supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
                     Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS)",
                    info.name,
                    info.ggml_type,
                    info.ggml_type.id()
                ),
            ));
        }
        let mut out = vec![0f32; info.numel()];
        dequantize(info.ggml_type, self.raw_data(info), &mut out)
            .map_err(|m| ModelError::format(&self.path, format!("tensor `{}`: {m}", info.name)))?;
        Ok((info.shape(), out))
    }

    /// The architecture named by `general.architecture`.
    pub fn architecture(&self) -> Result<&str, ModelError> {
        self.get_str("general.architecture")
            .ok_or_else(|| ModelError::format(&self.path, "missing `general.architecture`"))
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Result<Option<usize>, ModelError> {
        let full = format!("{arch}.{key}");
        match self.metadata(&full) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    ModelError::unsupported(
                        &self.path,
                        format!("`{full}` is {v:?}, expected one non-negative integer"),
                    )
                }),
        }
    }

    fn arch_required(&self, arch: &str, key: &str) -> Result<usize, ModelError> {
        self.arch_u64(arch, key)?
            .ok_or_else(|| ModelError::format(&self.path, format!("missing `{arch}.{key}`")))
    }

    /// The model configuration from `general.architecture` and the `{arch}.*` keys.
    pub fn model_config(&self) -> Result<ModelConfig, ModelError> {
        let arch_name = self.architecture()?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::unsupported(
                    &self.path,
                    format!("architecture `{other}` (supported: llama, mistral, qwen2)"),
                ))
            }
        };
        let a = arch_name;
        let hidden_size = self.arch_required(a, "embedding_length")?;
        let num_heads = self.arch_required(a, "attention.head_count")?;
        if num_heads == 0 {
            return Err(ModelError::format(
                &self.path,
                format!("`{a}.attention.head_count` is 0"),
            ));
        }
        let num_kv_heads = self
            .arch_u64(a, "attention.head_count_kv")?
            .unwrap_or(num_heads);
        let head_dim = match self.arch_u64(a, "attention.key_length")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(ModelError::format(
                    &self.path,
                    format!(
                        "`{a}.embedding_length` {hidden_size} is not a multiple of \
                         `{a}.attention.head_count` {num_heads}"
                    ),
                ))
            }
        };
        if let Some(v) = self.arch_u64(a, "attention.value_length")? {
            if v != head_dim {
                return Err(ModelError::unsupported(
                    &self.path,
                    format!("value head size {v} differs from key head size {head_dim}"),
                ));
            }
        }
        if let Some(rot) = self.arch_u64(a, "rope.dimension_count")? {
            if rot != head_dim {
                return Err(ModelError::unsupported(
                    &self.path,
                    format!("partial rotary embedding ({rot} of {head_dim} dims)"),
                ));
            }
        }
        let vocab_size = match self.tensor_info("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => match self.arch_u64(a, "vocab_size")? {
                Some(v) => v,
                None => self
                    .get_array("tokenizer.ggml.tokens")
                    .map(|t| t.len())
                    .ok_or_else(|| ModelError::format(&self.path, "cannot tell the vocab size"))?,
            },
        };
        let f32_key = |key: &str| self.get_f64(&format!("{a}.{key}")).map(|x| x as f32);
        let rope_scaling = match self.get_str(&format!("{a}.rope.scaling.type")) {
            None | Some("none") => None,
            Some("linear") => {
                let factor = f32_key("rope.scaling.factor").ok_or_else(|| {
                    ModelError::format(&self.path, format!("`{a}.rope.scaling.factor` missing"))
                })?;
                (factor != 1.0).then_some(RopeScaling::Linear { factor })
            }
            Some(other) => {
                return Err(ModelError::unsupported(
                    &self.path,
                    format!("rope scaling type `{other}` (supported: linear)"),
                ))
            }
        };
        if self.tensor_info("rope_freqs.weight").is_some() {
            // Llama 3.1-style frequency factors: llama.cpp stores them as a tensor, not as the
            // parameters transformers needs.
            return Err(ModelError::unsupported(
                &self.path,
                "per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1 rope scaling)",
            ));
        }
        let token_id = |key: &str| {
            self.get_u64(&format!("tokenizer.ggml.{key}"))
                .and_then(|x| u32::try_from(x).ok())
        };
        let mut eos_token_ids = Vec::new();
        // llama.cpp stops at every end-of-generation token; eot/eom mark ends of turns.
        for key in ["eos_token_id", "eot_token_id", "eom_token_id"] {
            if let Some(id) = token_id(key) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: self.arch_required(a, "feed_forward_length")?,
            num_layers: self.arch_required(a, "block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f32_key("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: f32_key("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            max_position_embeddings: self.arch_u64(a, "context_length")?.unwrap_or(2048),
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            attention_bias: self.tensor_info("blk.0.attn_q.bias").is_some(),
            bos_token_id: token_id("bos_token_id"),
            eos_token_ids,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Whether llama.cpp permuted this architecture's Q/K rows (its `LlamaModel` converter does
    /// so for llama and mistral; qwen2 uses NeoX RoPE and is stored unpermuted).
    fn qk_permuted(&self) -> bool {
        matches!(
            self.get_str("general.architecture"),
            Some("llama" | "mistral")
        )
    }

    /// HF names of every tensor that maps to one, in file order, with the GGUF info.
    pub fn hf_tensors(&self) -> Vec<(String, &GgufTensorInfo)> {
        self.tensors
            .iter()
            .filter_map(|t| gguf_to_hf_name(&t.name).map(|n| (n, t)))
            .collect()
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn has(&self, hf_name: &str) -> bool {
        hf_to_gguf_name(hf_name).is_some_and(|g| self.tensor_index.contains_key(&g))
    }

    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        let gguf_name = self.gguf_name(hf_name)?;
        let (shape, mut data) = self.dequantize_tensor(&gguf_name)?;
        if let Some(n_head) = self.qk_heads(hf_name)? {
            let cols: usize = shape.iter().skip(1).product();
            data = unpermute_qk_rows(&data, n_head, cols).map_err(|m| {
                ModelError::format(&self.path, format!("tensor `{gguf_name}`: {m}"))
            })?;
        }
        Ok(HostTensor {
            name: hf_name.to_string(),
            shape,
            data: HostData::F32(Cow::Owned(data)),
        })
    }
}

impl GgufFile {
    /// The GGUF name of an HF tensor that the file holds.
    fn gguf_name(&self, hf_name: &str) -> Result<String, ModelError> {
        hf_to_gguf_name(hf_name)
            .filter(|g| self.tensor_index.contains_key(g))
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: hf_name.to_string(),
            })
    }

    /// The head count to undo llama.cpp's row permutation with, for the Q and K projections of
    /// a file that has it; `None` for every other tensor.
    fn qk_heads(&self, hf_name: &str) -> Result<Option<usize>, ModelError> {
        let key = if hf_name.contains(".self_attn.q_proj.") {
            "attention.head_count"
        } else if hf_name.contains(".self_attn.k_proj.") {
            "attention.head_count_kv"
        } else {
            return Ok(None);
        };
        if !self.qk_permuted() {
            return Ok(None);
        }
        let arch = self.architecture()?;
        Ok(Some(match self.arch_u64(arch, key)? {
            Some(n) => n,
            // head_count_kv defaults to head_count.
            None => self.arch_required(arch, "attention.head_count")?,
        }))
    }

    /// An HF tensor in its stored block format, when it is a matrix of a [`QuantKind`] (rows
    /// of whole blocks, in HF row order); `None` for any other tensor.
    pub fn quantized_tensor(&self, hf_name: &str) -> Result<Option<HostTensor<'_>>, ModelError> {
        let gguf_name = self.gguf_name(hf_name)?;
        let info = &self.tensors[self.tensor_index[&gguf_name]];
        let shape = info.shape();
        let Some(kind) = QuantKind::from_ggml(info.ggml_type) else {
            return Ok(None);
        };
        if shape.len() != 2 || !shape[1].is_multiple_of(QuantKind::BLOCK) {
            return Ok(None);
        }
        let row_bytes = shape[1] / QuantKind::BLOCK * kind.block_bytes();
        let raw = self.raw_data(info);
        let blocks = match self.qk_heads(hf_name)? {
            Some(n_head) => Cow::Owned(unpermute_qk_rows(raw, n_head, row_bytes).map_err(|m| {
                ModelError::format(&self.path, format!("tensor `{gguf_name}`: {m}"))
            })?),
            None => Cow::Borrowed(raw),
        };
        Ok(Some(HostTensor {
            name: hf_name.to_string(),
            shape,
            data: HostData::Quant(QuantData { kind, blocks }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_writer::{hf_value, tiny_llama};

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    #[test]
    fn tiny_llama_config_and_tensors() {
        let tmp = write_tmp(&tiny_llama().build());
        let g = GgufFile::open(tmp.path()).unwrap();
        assert_eq!(g.version(), 3);
        let c = g.model_config().unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size),
            (260, 8, 16)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (2, 1, 4));
        assert_eq!(c.rms_norm_eps, 1e-5f32);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![0])
        );
        assert_eq!(c.max_position_embeddings, 64);
        assert!(!g.has("lm_head.weight"));
        assert!(g.has("model.layers.0.self_attn.q_proj.weight"));
        assert!(!g.has("model.layers.1.self_attn.q_proj.weight"));
        assert_eq!(g.hf_tensors().len(), 11);
        // Q and K come back in HF row order; V untouched; shapes HF [out, in].
        for (hf, gg, rows, cols) in [
            (
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
                8,
                8,
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                "blk.0.attn_k.weight",
                4,
                8,
            ),
            (
                "model.layers.0.self_attn.v_proj.weight",
                "blk.0.attn_v.weight",
                4,
                8,
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
                8,
                16,
            ),
            ("model.embed_tokens.weight", "token_embd.weight", 260, 8),
        ] {
            let t = g.tensor(hf).unwrap();
            assert_eq!(t.shape, vec![rows as usize, cols as usize], "{hf}");
            let want: Vec<f32> = (0..rows * cols)
                .map(|i| hf_value(gg, i / cols, i % cols))
                .collect();
            assert_eq!(t.data.to_f32(), want, "{hf}");
        }
        assert_eq!(g.tensor("model.norm.weight").unwrap().shape, vec![8]);
        let e = g.tensor("lm_head.weight").unwrap_err();
        assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    }

    #[test]
    fn typed_metadata_getters() {
        let tmp = write_tmp(&tiny_llama().build());
        let g = GgufFile::open(tmp.path()).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u64("llama.block_count"), Some(1));
        assert_eq!(g.get_f64("llama.rope.freq_base"), Some(10000.0));
        assert_eq!(g.get_bool("tokenizer.ggml.add_bos_token"), Some(false));
        assert_eq!(
            g.get_array("tokenizer.ggml.tokens").map(|a| a.len()),
            Some(260)
        );
        assert_eq!(g.get_u64("general.architecture"), None);
        assert_eq!(g.metadata("nope"), None);
        assert_eq!(g.metadata_entries().len(), 19);
    }

    /// The facts in research/model.md, checked against the real file (`scripts/fetch-model.sh` puts it in models/).
    #[test]
    fn real_smollm2() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.exists(),
            "{} missing: run scripts/fetch-model.sh",
            p.display()
        );
        let g = GgufFile::open(&p).unwrap();
        let c = g.model_config().unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_layers
            ),
            (49152, 576, 1536, 30)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (100000.0, None));
        assert_eq!(c.rms_norm_eps, 1e-5f32);
        assert_eq!(c.max_position_embeddings, 8192);
        assert!(c.tie_word_embeddings);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        let count = |ty| g.tensors().iter().filter(|t| t.ggml_type == ty).count();
        assert_eq!(
            (
                count(GgmlType::Q4_1),
                count(GgmlType::Q8_0),
                count(GgmlType::F32)
            ),
            (210, 1, 61)
        );
        assert_eq!(g.hf_tensors().len(), 272);
        let q = g.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, vec![576, 576]);
        let k = g.tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(k.shape, vec![192, 576]);
    }
}
