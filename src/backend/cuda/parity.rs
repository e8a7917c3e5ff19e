//! CPU-side helpers of the GPU parity checks (`src/bin/gpu_check.rs`): the error measure, and a
//! random-weight model of any shape served straight from memory (no files), so that the CPU
//! backend (the oracle) and the CUDA backend load the very same bf16 weights.

use crate::backend::latent::{LatentKeys, LatentLayer};
use crate::backend::RopeParams;
use crate::error::ModelError;
use crate::model::config::{Arch, ModelConfig};
use crate::model::tensor::{HostData, HostTensor};
use crate::model::TensorSource;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// Relative error of `got` against `want`: `max |got - want| / max |want|` (the max norm, so
/// tiny reference elements do not blow it up). Any NaN, or a length mismatch, gives +inf.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut scale) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        diff = diff.max((g as f64 - w as f64).abs());
        scale = scale.max((w as f64).abs());
    }
    if scale == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    diff / scale
}

/// Uniform random f32 in `[-scale, scale)`.
pub fn random_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A random key projection for `mhc:rank` (mean, down, up per layer; scaled like the weights
/// below) over `layers` layers of `kv_width` channels in heads of `head_dim`: for parity, not
/// quality. `rope` rotates the rebuilt keys (a model replaces it by its own when attached).
pub fn random_latent(
    rng: &mut ChaCha8Rng,
    layers: usize,
    kv_width: usize,
    head_dim: usize,
    rank: usize,
    rope: RopeParams,
) -> LatentKeys {
    let w = kv_width;
    LatentKeys {
        id: [rank as u8; 32],
        rank: rank as u16,
        kv_width: w,
        head_dim,
        layers: (0..layers)
            .map(|_| LatentLayer {
                rank,
                mean: random_vec(rng, w, 0.5),
                down: random_vec(rng, rank * w, (3.0 / w as f32).sqrt()),
                up_t: random_vec(rng, rank * w, (3.0 / rank as f32).sqrt()),
            })
            .collect(),
        rope,
        max_positions: 8192,
    }
}

/// A Llama config of the given shape (vocab, hidden, intermediate, layers, heads, kv heads,
/// head_dim), untied, no bias, rope theta 500000.
pub fn llama_config(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: 500_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Random bf16 weights for every tensor `cfg` needs, scaled so activations stay O(1) through
/// the layers (uniform with std ≈ 1/sqrt(fan_in); norms around 1).
pub struct RandomWeights {
    tensors: HashMap<String, (Vec<usize>, Vec<bf16>)>,
}

impl RandomWeights {
    pub fn new(cfg: &ModelConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut tensors = HashMap::new();
        let mut put =
            |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut ChaCha8Rng| {
                let n: usize = shape.iter().product();
                let data = (0..n)
                    .map(|_| bf16::from_f32(offset + rng.random_range(-scale..scale)))
                    .collect();
                tensors.insert(name, (shape, data));
            };
        let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        put(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            1.0,
            0.0,
            &mut rng,
        );
        put(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            lin(h),
            0.0,
            &mut rng,
        );
        put("model.norm.weight".into(), vec![h], 0.1, 1.0, &mut rng);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            put(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                lin(h),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                lin(h),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                lin(h),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                lin(q),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                lin(h),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.mlp.up_proj.weight"),
                vec![i, h],
                lin(h),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                lin(i),
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                0.1,
                1.0,
                &mut rng,
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.1,
                1.0,
                &mut rng,
            );
        }
        Self { tensors }
    }
}

impl TensorSource for RandomWeights {
    fn path(&self) -> &Path {
        Path::new("<random weights>")
    }
    fn has(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }
    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        let (shape, data) = self
            .tensors
            .get(hf_name)
            .ok_or_else(|| ModelError::unsupported(self.path(), format!("no tensor {hf_name}")))?;
        Ok(HostTensor {
            name: hf_name.to_string(),
            shape: shape.clone(),
            data: HostData::Bf16(Cow::Borrowed(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::llama::{Llama, LogitsFor, SeqStep};

    #[test]
    fn max_rel_err_is_normwise_and_catches_nan() {
        assert_eq!(max_rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        // max |diff| = 0.02 against max |want| = 2.
        assert!((max_rel_err(&[1.02, 2.0, 0.0], &[1.0, 2.0, 0.001]) - 0.01).abs() < 1e-6);
        assert_eq!(max_rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(max_rel_err(&[1.0], &[f32::NAN]), f64::INFINITY);
        assert_eq!(max_rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_rel_err(&[0.0], &[0.0]), 0.0);
        assert_eq!(max_rel_err(&[1e-9], &[0.0]), f64::INFINITY);
    }

    #[test]
    fn random_weights_load_and_run_on_the_cpu_oracle() {
        let cfg = llama_config(64, 32, 48, 2, 4, 2, 8);
        let w = RandomWeights::new(&cfg, 7);
        assert_eq!(
            w.tensor("model.layers.1.mlp.down_proj.weight")
                .unwrap()
                .shape,
            vec![32, 48]
        );
        assert!(w.tensor("nope").is_err());
        // Same seed, same weights; another seed, others.
        let a = RandomWeights::new(&cfg, 7).tensors["lm_head.weight"]
            .1
            .clone();
        assert_eq!(a, w.tensors["lm_head.weight"].1);
        assert_ne!(a, RandomWeights::new(&cfg, 8).tensors["lm_head.weight"].1);
        let model = Llama::load(cfg, &w, CpuBackend::new()).unwrap();
        let mut store = model.new_kv_store(4, 16);
        let step = SeqStep {
            policy: crate::backend::kv_policy::KvPolicy::EXACT,
            tokens: &[3, 9, 27],
            start_pos: 0,
            block_table: &[0],
            logits: LogitsFor::All,
        };
        let logits = model.forward(&[step], &mut store).unwrap();
        assert_eq!(logits[0].len(), 3 * 64);
        // Scaled weights keep the logits finite and O(1..100), neither vanishing nor exploding.
        let max = logits[0].iter().fold(0f32, |m, &v| m.max(v.abs()));
        assert!(
            max.is_finite() && max > 0.1 && max < 1e3,
            "max |logit| = {max}"
        );
    }
}
