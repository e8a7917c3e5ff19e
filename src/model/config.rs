//! `ModelConfig`: the architecture facts the forward pass needs, read from a Hugging Face
//! `config.json` (or built from GGUF metadata by the GGUF loader) and checked once.

use crate::error::ModelError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Decoder architectures that share the Llama shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "LlamaForCausalLM")]
    Llama,
    #[serde(rename = "MistralForCausalLM")]
    Mistral,
    #[serde(rename = "Qwen2ForCausalLM")]
    Qwen2,
}

impl Arch {
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Everything the forward pass needs about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config `eos_token_id` plus generation_config extras).
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_parameters` instead of `rope_theta`/`rope_scaling`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    rms_norm_eps: Option<f32>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    bos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text =
                std::fs::read_to_string(&gen_path).map_err(|e| ModelError::io(&gen_path, e))?;
            let gen: RawGenerationConfig = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&gen_path, e.to_string()))?;
            if let Some(ids) = gen.eos_token_id {
                for id in ids.into_vec() {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
            if cfg.bos_token_id.is_none() {
                cfg.bos_token_id = gen.bos_token_id;
            }
        }
        Ok(cfg)
    }

    /// Parses a `config.json` body; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ModelError::format(path, e.to_string()))?;
        let arch_name = raw
            .architectures
            .first()
            .cloned()
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| ModelError::format(path, "no `architectures` or `model_type`"))?;
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::unsupported(
                    path,
                    format!("architecture `{other}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"),
                ))
            }
        };
        let num_heads = raw.num_attention_heads;
        if num_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(ModelError::format(
                path,
                "zero heads, hidden size or layers",
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if raw.head_dim.is_none() && !raw.hidden_size.is_multiple_of(num_heads) {
            return Err(ModelError::format(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {num_heads} (and no \
                     head_dim is given)",
                    raw.hidden_size
                ),
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads);
        let (rope_theta, rope_scaling) = parse_rope(&raw, path)?;
        let cfg = ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the invariants the kernels rely on.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::format(path, m));
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("zero vocab or intermediate size".into());
        }
        // Guard against absurd configs before anything is allocated from them.
        if self.hidden_size > 1 << 16 || self.vocab_size > 1 << 22 || self.num_layers > 1024 {
            return bad("implausibly large dimensions".into());
        }
        if self.num_heads > 1 << 10
            || self.head_dim > 1 << 12
            || self.num_heads * self.head_dim > 1 << 16
            || self.intermediate_size > 1 << 20
        {
            return bad(format!(
                "implausibly large dimensions: {} heads of {} dims, intermediate size {}",
                self.num_heads, self.head_dim, self.intermediate_size
            ));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > 1 << 24 {
            return bad(format!(
                "max_position_embeddings {} must be between 1 and {}",
                self.max_position_embeddings,
                1 << 24
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be finite and non-negative",
                self.rms_norm_eps
            ));
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        match self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) if positive(factor) => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) if positive(factor)
                && positive(low_freq_factor)
                && positive(high_freq_factor)
                && high_freq_factor > low_freq_factor
                && original_max_position_embeddings > 0 => {}
            Some(ref s) => return bad(format!("invalid rope scaling parameters {s:?}")),
        }
        Ok(())
    }

    /// Inverse RoPE frequencies for pair `i` of `head_dim / 2`, with scaling applied exactly as
    /// transformers computes them (float32 arithmetic).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / self.head_dim as f32;
                1.0 / self.rope_theta.powf(exponent)
            })
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_ctx = *original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope(raw: &RawConfig, path: &Path) -> Result<(f32, Option<RopeScaling>), ModelError> {
    // transformers 5 folds theta and scaling into `rope_parameters`.
    let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
    let theta = raw
        .rope_theta
        .or_else(|| params.and_then(|p| p.get("rope_theta")?.as_f64().map(|x| x as f32)))
        .unwrap_or(10000.0);
    let scaling = raw
        .rope_scaling
        .as_ref()
        .filter(|v| v.is_object())
        .or(params);
    let Some(s) = scaling else {
        return Ok((theta, None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f32, ModelError> {
        s.get(key)
            .and_then(|v| v.as_f64())
            .map(|x| x as f32)
            .ok_or_else(|| ModelError::format(path, format!("rope_scaling lacks `{key}`")))
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("rope_scaling type `{other}` (supported: linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_json() -> &'static str {
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
        "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rope_theta":100000.0,"rope_scaling":null,"rms_norm_eps":1e-05,
        "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#
    }

    #[test]
    fn parses_smollm_config() {
        let c = ModelConfig::from_json_str(smollm_json(), Path::new("config.json")).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.rope_scaling, None);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert!((f[31] - 100000f32.powf(-62.0 / 64.0)).abs() < 1e-9);
    }

    #[test]
    fn parses_llama3_scaling_and_rope_parameters() {
        let j = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = ModelConfig::from_json_str(j, Path::new("c.json")).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        let f = c.rope_inv_freq();
        // Highest frequency is untouched, lowest is divided by the factor.
        assert_eq!(f[0], 1.0);
        let base_last = 500000f32.powf(-14.0 / 16.0);
        assert!((f[7] - base_last / 8.0).abs() < 1e-12);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let j = smollm_json().replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        let e = ModelConfig::from_json_str(&j, Path::new("x/config.json")).unwrap_err();
        assert!(e.to_string().contains("GPTNeoXForCausalLM"), "{e}");
        let j = smollm_json().replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        assert!(ModelConfig::from_json_str(&j, Path::new("c")).is_err());
    }
}
