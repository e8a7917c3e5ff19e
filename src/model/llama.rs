//! The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM), written once against the
//! `Backend` trait. Q/K/V and gate/up projections are fused into one matrix each at load time
//! so a layer runs four matrix products, whatever the number of tokens in the step.

use super::config::ModelConfig;
use super::tensor::HostTensor;
use super::TensorSource;
use crate::backend::{AttnShape, Backend, RopeParams};
use crate::error::{ModelError, RunError};

struct Layer<B: Backend> {
    attn_norm: B::Buf,
    /// `[q; k; v]` stacked along rows: `[(heads + 2·kv_heads)·head_dim, hidden]`.
    qkv: B::Matrix,
    qkv_bias: Option<B::Buf>,
    o: B::Matrix,
    mlp_norm: B::Buf,
    /// `[gate; up]`: `[2·intermediate, hidden]`.
    gate_up: B::Matrix,
    down: B::Matrix,
}

/// A loaded model on a backend.
pub struct Llama<B: Backend> {
    cfg: ModelConfig,
    backend: B,
    embed: B::Matrix,
    /// `None` when the embeddings are tied: the LM head is then `embed`.
    lm_head: Option<B::Matrix>,
    final_norm: B::Buf,
    layers: Vec<Layer<B>>,
    rope: RopeParams,
    shape: AttnShape,
}

/// Which rows of a forward step need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token (generation).
    Last,
    /// Every token of the step (prompt logprobs, evaluation).
    All,
}

impl<B: Backend> Llama<B> {
    /// Loads and checks every tensor's shape against `cfg`.
    pub fn load(cfg: ModelConfig, src: &dyn TensorSource, backend: B) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let shape = AttnShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        };
        let get = |name: &str, expected: &[usize]| -> Result<HostTensor<'_>, ModelError> {
            let t = src.tensor(name)?;
            if t.shape != expected || t.data.len() != t.numel() {
                return Err(ModelError::Shape {
                    path: src.path().to_path_buf(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    got: t.shape.clone(),
                });
            }
            Ok(t)
        };
        let matrix = |parts: &[&HostTensor<'_>]| -> Result<B::Matrix, ModelError> {
            backend
                .upload_matrix(parts)
                .map_err(|e| ModelError::unsupported(src.path(), e.to_string()))
        };
        let vector = |t: &HostTensor<'_>| backend.upload(&t.data.to_f32());

        let embed_t = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let embed = matrix(&[&embed_t])?;
        drop(embed_t);
        let lm_head = if cfg.tie_word_embeddings || !src.has("lm_head.weight") {
            None
        } else {
            Some(matrix(&[&get("lm_head.weight", &[cfg.vocab_size, h])?])?)
        };
        let final_norm = vector(&get("model.norm.weight", &[h])?);

        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let q = get(
                &format!("{p}.self_attn.q_proj.weight"),
                &[shape.q_width(), h],
            )?;
            let k = get(
                &format!("{p}.self_attn.k_proj.weight"),
                &[shape.kv_width(), h],
            )?;
            let v = get(
                &format!("{p}.self_attn.v_proj.weight"),
                &[shape.kv_width(), h],
            )?;
            let qkv = matrix(&[&q, &k, &v])?;
            let qkv_bias = if cfg.attention_bias {
                let mut b = get(&format!("{p}.self_attn.q_proj.bias"), &[shape.q_width()])?
                    .data
                    .to_f32();
                b.extend(
                    get(&format!("{p}.self_attn.k_proj.bias"), &[shape.kv_width()])?
                        .data
                        .to_f32(),
                );
                b.extend(
                    get(&format!("{p}.self_attn.v_proj.bias"), &[shape.kv_width()])?
                        .data
                        .to_f32(),
                );
                Some(backend.upload(&b))
            } else {
                None
            };
            let o = matrix(&[&get(
                &format!("{p}.self_attn.o_proj.weight"),
                &[h, shape.q_width()],
            )?])?;
            let inter = cfg.intermediate_size;
            let gate = get(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?;
            let up = get(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?;
            let gate_up = matrix(&[&gate, &up])?;
            let down = matrix(&[&get(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?])?;
            layers.push(Layer {
                attn_norm: vector(&get(&format!("{p}.input_layernorm.weight"), &[h])?),
                qkv,
                qkv_bias,
                o,
                mlp_norm: vector(&get(&format!("{p}.post_attention_layernorm.weight"), &[h])?),
                gate_up,
                down,
            });
        }
        let rope = RopeParams {
            inv_freq: cfg.rope_inv_freq(),
            attention_scaling: 1.0,
        };
        Ok(Self {
            cfg,
            backend,
            embed,
            lm_head,
            final_norm,
            layers,
            rope,
            shape,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A KV cache for one sequence of up to `capacity` tokens (clamped to the model's context).
    pub fn new_cache(&self, capacity: usize) -> B::Cache {
        let cap = capacity.min(self.cfg.max_position_embeddings);
        self.backend.new_cache(self.cfg.num_layers, cap, self.shape)
    }

    /// Runs `tokens` at positions `start_pos..start_pos + tokens.len()`, appending their keys
    /// and values to `cache` (which must already hold positions `0..start_pos`). Returns logits,
    /// `[rows, vocab]` flattened, for the rows `which` asks for.
    pub fn forward(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut B::Cache,
        which: LogitsFor,
    ) -> Result<Vec<f32>, RunError> {
        let t = tokens.len();
        if t == 0 {
            return Err(RunError::Invalid("empty forward step".into()));
        }
        let end = start_pos + t;
        let max = self.backend.cache_capacity(cache);
        if end > max {
            return Err(RunError::ContextLength { needed: end, max });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(RunError::Invalid(format!(
                "token id {bad} out of range (vocab {})",
                self.cfg.vocab_size
            )));
        }
        let be = &self.backend;
        let cfg = &self.cfg;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let positions: Vec<u32> = (start_pos..end).map(|p| p as u32).collect();

        let mut x = be.alloc(t * h);
        be.embed(&self.embed, tokens, &mut x);
        let mut normed = be.alloc(t * h);
        let mut qkv = be.alloc(t * self.shape.qkv_width());
        let mut attn = be.alloc(t * self.shape.q_width());
        let mut proj = be.alloc(t * h);
        let mut gate_up = be.alloc(t * 2 * inter);
        let mut act = be.alloc(t * inter);

        for (li, layer) in self.layers.iter().enumerate() {
            be.rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, t, &mut normed);
            be.matmul(&normed, t, &layer.qkv, &mut qkv);
            if let Some(b) = &layer.qkv_bias {
                be.add_bias(&mut qkv, b, t);
            }
            be.rope_and_store(&mut qkv, t, &positions, self.shape, &self.rope, cache, li);
            be.attention(&qkv, t, start_pos, self.shape, cache, li, &mut attn);
            be.matmul(&attn, t, &layer.o, &mut proj);
            be.add(&mut x, &proj, t * h);

            be.rms_norm(&x, &layer.mlp_norm, cfg.rms_norm_eps, t, &mut normed);
            be.matmul(&normed, t, &layer.gate_up, &mut gate_up);
            be.silu_mul(&gate_up, t, inter, &mut act);
            be.matmul(&act, t, &layer.down, &mut proj);
            be.add(&mut x, &proj, t * h);
        }

        let (first, rows) = match which {
            LogitsFor::Last => (t - 1, 1),
            LogitsFor::All => (0, t),
        };
        let last = be.copy_rows(&x, first, rows, h);
        let mut last_normed = be.alloc(rows * h);
        be.rms_norm(
            &last,
            &self.final_norm,
            cfg.rms_norm_eps,
            rows,
            &mut last_normed,
        );
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = be.alloc(rows * cfg.vocab_size);
        be.matmul(&last_normed, rows, head, &mut logits);
        let mut out = vec![0f32; rows * cfg.vocab_size];
        be.read(&logits, 0, &mut out);
        Ok(out)
    }
}
