//! `kvserve convert`: a GGUF file → a Hugging Face model directory (`model.safetensors` in bf16,
//! `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`) that
//! Python transformers loads as is.
//!
//! Invariants: tensors use HF names and orientation with llama.cpp's Q/K permutation undone;
//! bf16 values are the round-to-nearest-even of the dequantized f32 (what torch's
//! `.to(torch.bfloat16)` gives); a tied `lm_head` is omitted. Everything is written into a
//! sibling `.NAME.partial` directory that is renamed into place only once complete, so an
//! interrupted conversion never leaves a directory that looks like a finished model.

use super::config::{Arch, ModelConfig, RopeScaling};
use super::gguf::GgufFile;
use super::gguf_tokenizer;
use super::TensorSource;
use crate::error::ModelError;
use half::bf16;
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Converts `gguf` into a Hugging Face directory at `out_dir` (which must not exist, or be
/// empty). `progress` receives one human-readable line per step.
pub fn convert_gguf(
    gguf: &Path,
    out_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ModelError> {
    let file = GgufFile::open(gguf)?;
    let cfg = file.model_config()?;
    // Build everything that can fail on metadata before touching the disk.
    let tokenizer_json = gguf_tokenizer::tokenizer_json_value(&file)?;
    let tokenizer_config = gguf_tokenizer::tokenizer_config_json(&file)?;
    let tensors = plan_tensors(&file, &cfg)?;
    progress(&format!(
        "{}: {} ({} layers, hidden {}, {} heads / {} kv heads, vocab {}), {} tensors",
        gguf.display(),
        cfg.arch.hf_name(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        tensors.len()
    ));

    if out_dir.exists() {
        let empty = fs::read_dir(out_dir)
            .map_err(|e| ModelError::io(out_dir, e))?
            .next()
            .is_none();
        if !empty {
            return Err(ModelError::io(
                out_dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output directory already exists and is not empty",
                ),
            ));
        }
    }
    let tmp = partial_dir(out_dir)?;
    if tmp.exists() {
        // Left by an interrupted conversion to the same place.
        fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;

    let result = write_all(
        &file,
        &cfg,
        &tensors,
        &tokenizer_json,
        &tokenizer_config,
        &tmp,
        progress,
    );
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out_dir.exists() {
        fs::remove_dir(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    }
    fs::rename(&tmp, out_dir).map_err(|e| ModelError::io(out_dir, e))
}

/// `.NAME.partial` next to `out_dir`.
fn partial_dir(out_dir: &Path) -> Result<PathBuf, ModelError> {
    let name = out_dir.file_name().ok_or_else(|| {
        ModelError::io(
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "output path has no directory name",
            ),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    Ok(out_dir.with_file_name(tmp_name))
}

/// One tensor to write: HF name and shape.
struct Planned {
    name: String,
    shape: Vec<usize>,
}

/// The HF tensors to write, checked against the config: every tensor the forward pass needs is
/// present with the right shape, every GGUF tensor has an HF name and a dequantizer.
fn plan_tensors(file: &GgufFile, cfg: &ModelConfig) -> Result<Vec<Planned>, ModelError> {
    let path = file.path();
    for t in file.tensors() {
        if super::gguf::gguf_to_hf_name(&t.name).is_none() {
            return Err(ModelError::unsupported(
                path,
                format!("tensor `{}` has no Hugging Face counterpart", t.name),
            ));
        }
        if !t.ggml_type.can_dequantize() {
            return Err(ModelError::unsupported(
                path,
                format!(
                    "tensor `{}` has ggml type {}, which cannot be dequantized yet",
                    t.name, t.ggml_type
                ),
            ));
        }
    }
    let expected = expected_shapes(cfg);
    let mut planned = Vec::new();
    for (name, info) in file.hf_tensors() {
        let shape = info.shape();
        match expected.get(&name) {
            Some(want) if *want != shape => {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name,
                    expected: want.clone(),
                    got: shape,
                })
            }
            Some(_) => {}
            None => {
                return Err(ModelError::unsupported(
                    path,
                    format!(
                        "tensor `{}` is not part of a {} model",
                        info.name,
                        cfg.arch.hf_name()
                    ),
                ))
            }
        }
        planned.push(Planned { name, shape });
    }
    for name in required_names(cfg) {
        if !planned.iter().any(|p| p.name == name) {
            return Err(ModelError::MissingTensor {
                path: path.to_path_buf(),
                name,
            });
        }
    }
    Ok(planned)
}

/// Every tensor name a model of this config may have, with its HF shape.
fn expected_shapes(cfg: &ModelConfig) -> HashMap<String, Vec<usize>> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    // Saturating: hostile metadata must not overflow (the shapes then simply do not match).
    let q = cfg.num_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.num_kv_heads.saturating_mul(cfg.head_dim);
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    m.insert("lm_head.weight".to_string(), vec![v, h]);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        for (suffix, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            m.insert(format!("{p}{suffix}"), shape);
        }
    }
    m
}

fn required_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for l in 0..cfg.num_layers {
        for s in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{l}.{s}"));
        }
        if cfg.attention_bias {
            for s in ["q_proj", "k_proj", "v_proj"] {
                names.push(format!("model.layers.{l}.self_attn.{s}.bias"));
            }
        }
    }
    names
}

/// State shared by the lazy tensor views while `safetensors` streams them to disk.
struct WriteCtx<'a> {
    file: &'a GgufFile,
    /// The first error from a view (a `View` cannot return one).
    error: RefCell<Option<ModelError>>,
    progress: RefCell<&'a mut dyn FnMut(&str)>,
    done: Cell<usize>,
    total: usize,
}

/// A tensor that is dequantized, un-permuted and rounded to bf16 only when `safetensors` asks
/// for its bytes, so at most one tensor is held in memory at a time.
struct LazyBf16<'c, 'a> {
    ctx: &'c WriteCtx<'a>,
    name: String,
    shape: Vec<usize>,
}

impl LazyBf16<'_, '_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> Result<Vec<u8>, ModelError> {
        let t = self.ctx.file.tensor(&self.name)?;
        if t.numel() != self.numel() || t.data.len() != self.numel() {
            return Err(ModelError::format(
                self.ctx.file.path(),
                format!("tensor `{}` changed size while converting", self.name),
            ));
        }
        let mut out = Vec::with_capacity(self.numel() * 2);
        for x in t.data.to_bf16() {
            out.extend_from_slice(&x.to_le_bytes());
        }
        Ok(out)
    }
}

impl View for LazyBf16<'_, '_> {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let ctx = self.ctx;
        let bytes = if ctx.error.borrow().is_some() {
            None
        } else {
            match self.bytes() {
                Ok(b) => Some(b),
                Err(e) => {
                    *ctx.error.borrow_mut() = Some(e);
                    None
                }
            }
        };
        let done = ctx.done.get() + 1;
        ctx.done.set(done);
        // About ten progress lines over the whole file.
        if done == ctx.total || done.is_multiple_of(ctx.total.div_ceil(10).max(1)) {
            (ctx.progress.borrow_mut())(&format!(
                "  tensors {done}/{} ({}%)",
                ctx.total,
                done * 100 / ctx.total.max(1)
            ));
        }
        // After an error the file is discarded; zeros keep the writer's byte count right.
        Cow::Owned(bytes.unwrap_or_else(|| vec![0u8; self.data_len()]))
    }

    fn data_len(&self) -> usize {
        self.numel() * std::mem::size_of::<bf16>()
    }
}

fn write_all(
    file: &GgufFile,
    cfg: &ModelConfig,
    tensors: &[Planned],
    tokenizer_json: &Value,
    tokenizer_config: &Value,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ModelError> {
    let st_path = dir.join("model.safetensors");
    progress(&format!(
        "writing model.safetensors ({} tensors, bf16)",
        tensors.len()
    ));
    let ctx = WriteCtx {
        file,
        error: RefCell::new(None),
        progress: RefCell::new(progress),
        done: Cell::new(0),
        total: tensors.len(),
    };
    let views = tensors.iter().map(|p| {
        (
            p.name.clone(),
            LazyBf16 {
                ctx: &ctx,
                name: p.name.clone(),
                shape: p.shape.clone(),
            },
        )
    });
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(views, Some(info), &st_path);
    let WriteCtx {
        error, progress, ..
    } = ctx;
    if let Some(e) = error.into_inner() {
        return Err(e);
    }
    written.map_err(|e| {
        ModelError::io(
            &st_path,
            std::io::Error::other(format!("writing safetensors: {e}")),
        )
    })?;
    make_readable(&st_path)?;
    sync_file(&st_path)?;
    let progress = progress.into_inner();

    let (config, generation) = config_json(file, cfg);
    for (name, value) in [
        ("config.json", &config),
        ("generation_config.json", &generation),
        ("tokenizer.json", tokenizer_json),
        ("tokenizer_config.json", tokenizer_config),
    ] {
        progress(&format!("writing {name}"));
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| ModelError::io(dir.join(name), std::io::Error::other(e.to_string())))?;
        write_synced(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let mut f = fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
    f.write_all(bytes).map_err(|e| ModelError::io(path, e))?;
    f.sync_all().map_err(|e| ModelError::io(path, e))
}

/// The safetensors writer creates its file 0600 (a temp file); make it 0644 like the rest.
fn make_readable(path: &Path) -> Result<(), ModelError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))
            .map_err(|e| ModelError::io(path, e))?;
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), ModelError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// An f32 as the JSON number with its shortest round-trip decimal (1e-5, not
/// 9.99999974738e-06): what Python writes for the original float.
fn f32_json(x: f32) -> Value {
    format!("{x:?}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// `config.json` and `generation_config.json` bodies.
fn config_json(file: &GgufFile, cfg: &ModelConfig) -> (Value, Value) {
    let rope_scaling = match &cfg.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            json!({"rope_type": "linear", "type": "linear", "factor": f32_json(*factor)})
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3",
            "factor": f32_json(*factor),
            "low_freq_factor": f32_json(*low_freq_factor),
            "high_freq_factor": f32_json(*high_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    let eos = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let pad = file
        .get_u64("tokenizer.ggml.padding_token_id")
        .filter(|&p| (p as usize) < cfg.vocab_size);
    let mut c = json!({
        "architectures": [cfg.arch.hf_name()],
        "model_type": cfg.arch.model_type(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.rms_norm_eps),
        "rope_theta": f32_json(cfg.rope_theta),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": cfg.bos_token_id,
        // config.json names the primary eos; generation_config lists every stop id.
        "eos_token_id": cfg.eos_token_ids.first(),
        "torch_dtype": "bfloat16",
    });
    if let Some(obj) = c.as_object_mut() {
        if let Some(p) = pad {
            obj.insert("pad_token_id".into(), json!(p));
        }
        match cfg.arch {
            Arch::Llama => {
                obj.insert("pretraining_tp".into(), json!(1));
            }
            // llama.cpp runs these GGUFs with full attention: no sliding window.
            Arch::Mistral => {
                obj.insert("sliding_window".into(), Value::Null);
            }
            Arch::Qwen2 => {
                obj.remove("attention_bias");
                obj.remove("mlp_bias");
                obj.insert("use_sliding_window".into(), json!(false));
            }
        }
    }
    let mut g = json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
    });
    if let (Some(obj), Some(p)) = (g.as_object_mut(), pad) {
        obj.insert("pad_token_id".into(), json!(p));
    }
    (c, g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::test_writer::{hf_value, tiny_llama};
    use crate::model::safetensors_source::SafetensorsSource;

    #[test]
    fn converts_tiny_llama_to_a_loadable_hf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        std::fs::write(&gguf, tiny_llama().build()).unwrap();
        let out = dir.path().join("tiny");
        let mut lines = Vec::new();
        convert_gguf(&gguf, &out, &mut |m| lines.push(m.to_string())).unwrap();
        assert!(
            lines.iter().any(|l| l.contains("tensors 11/11")),
            "{lines:?}"
        );
        assert!(!dir.path().join(".tiny.partial").exists());

        let cfg = ModelConfig::from_hf_dir(&out).unwrap();
        let from_gguf = GgufFile::open(&gguf).unwrap().model_config().unwrap();
        assert_eq!(cfg, from_gguf);
        let text = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(text.contains("\"rms_norm_eps\": 0.00001"), "{text}");

        let st = SafetensorsSource::open(&out).unwrap();
        assert!(!st.has("lm_head.weight"));
        let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, vec![8, 8]);
        assert_eq!(q.data.dtype_name(), "BF16");
        let want: Vec<f32> = (0..64)
            .map(|i| hf_value("blk.0.attn_q.weight", i / 8, i % 8))
            .collect();
        assert_eq!(q.data.to_f32(), want);
        let k = st.tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
        let want: Vec<f32> = (0..32)
            .map(|i| hf_value("blk.0.attn_k.weight", i / 8, i % 8))
            .collect();
        assert_eq!(k.data.to_f32(), want);

        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let ids = tok
            .encode("<|im_start|>hi  7", true)
            .unwrap()
            .get_ids()
            .to_vec();
        // <|im_start|>, "hi", "ĠĠ", "7" (byte 0x37 at 2 + 0x37 - 0x21 in the byte alphabet)
        assert_eq!(ids[..3], [1, 258, 259]);
        let tc: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(tc["bos_token"], "<|im_start|>");

        // A second conversion refuses to overwrite the finished directory.
        let e = convert_gguf(&gguf, &out, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    #[test]
    fn failed_conversion_leaves_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("bad.gguf");
        let mut g = tiny_llama();
        // Drop ffn_down: the model is incomplete.
        g.tensors.retain(|t| t.0 != "blk.0.ffn_down.weight");
        std::fs::write(&gguf, g.build()).unwrap();
        let out = dir.path().join("bad");
        let e = convert_gguf(&gguf, &out, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("mlp.down_proj"), "{e}");
        assert!(!out.exists());
        assert!(!dir.path().join(".bad.partial").exists());
    }

    #[test]
    fn f32_json_is_shortest_round_trip() {
        // The f64 that Python's float("1e-05") gives, not the f32's exact 9.99999974738e-06.
        assert_eq!(f32_json(1e-5).as_f64(), Some(1e-5));
        assert_eq!(f32_json(1e-5).to_string(), "0.00001");
        assert_eq!(f32_json(100000.0).to_string(), "100000.0");
        assert_eq!(f32_json(1e-6).as_f64(), Some(1e-6));
        assert_eq!(f32_json(0.1).to_string(), "0.1");
        assert_eq!(f32_json(f32::NAN), Value::Null);
    }

    #[test]
    fn partial_dir_is_a_hidden_sibling() {
        let p = partial_dir(Path::new("models/SmolLM2")).unwrap();
        assert_eq!(p, Path::new("models/.SmolLM2.partial"));
        assert!(partial_dir(Path::new("/")).is_err());
    }
}
