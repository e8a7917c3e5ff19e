//! The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM), written once against the
//! `Backend` trait. Q/K/V and gate/up projections are fused into one matrix each at load time
//! so a layer runs four matrix products, whatever the number of tokens in the step.
//!
//! A step is a batch of sequences ([`SeqStep`]): prompt chunks and decode tokens of any mix.
//! Their rows are stacked, so every weight is multiplied once for all tokens of the step;
//! only attention runs per sequence, over that sequence's block table in the paged KV store.

use super::config::ModelConfig;
use super::tensor::HostTensor;
use super::TensorSource;
use crate::backend::codec::{Codec, MhcValues};
use crate::backend::kv_policy::KvPolicy;
use crate::backend::latent::LatentKeys;
use crate::backend::{AttnSeq, AttnShape, Backend, KvGeometry, RopeParams, Seal};
use crate::error::{ModelError, RunError};
use std::sync::Arc;

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
    /// Calibrated key projections for `mhc:R`, one per rank (`kvserve calibrate`).
    latents: Vec<Arc<LatentKeys>>,
}

pub use super::step_output::StepOutput;

/// Called with each layer's index and its fused `[q | k | v]` rows (see
/// [`Llama::forward_observed`]).
pub type LayerObserver<'a> = dyn FnMut(usize, &[f32]) + 'a;

/// Which rows of a sequence's step need logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogitsFor {
    /// None (a prompt chunk that is not the last one).
    None,
    /// Only the last token (generation).
    Last,
    /// Every token of the step (prompt logprobs, evaluation).
    All,
    /// Only the last token's greedy choice, the index of its largest logit
    /// ([`Backend::argmax_rows`]): plain greedy decoding, which needs the token, not the row
    /// (on a GPU the row never leaves the device). Needs [`Llama::forward_step`].
    Argmax,
    /// Only the last token's draw at temperature `1 / inv_t` with the uniform `u01`
    /// ([`Backend::draw_rows`]): sampled decoding with the whole vocabulary in play, which
    /// likewise needs the token, not the row. Needs [`Llama::forward_step`].
    Draw { inv_t: f32, u01: f64 },
}

impl LogitsFor {
    /// Whether the step answers with a token instead of logits rows.
    pub fn gives_token(self) -> bool {
        matches!(self, LogitsFor::Argmax | LogitsFor::Draw { .. })
    }
}

/// One sequence's share of a batched forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// Tokens at positions `start_pos..start_pos + tokens.len()` (at least one).
    pub tokens: &'a [u32],
    /// Positions `0..start_pos` must already be in the store through `block_table`.
    pub start_pos: usize,
    /// Physical blocks of this sequence, in order; must cover `start_pos + tokens.len()`
    /// positions. Its keys and values for `tokens` are written there.
    pub block_table: &'a [u32],
    pub logits: LogitsFor,
    /// How the sequence's KV is kept and read (sealed format, window, quest).
    pub policy: KvPolicy,
}

impl<B: Backend> Llama<B> {
    /// [`Self::load`] from an opened model directory or GGUF file (its config and weights).
    pub fn from_files(files: &super::loader::ModelFiles, backend: B) -> Result<Self, ModelError> {
        Self::load(files.config.clone(), files.weights.as_ref(), backend)
    }

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
            latents: Vec::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Each weight matrix's format and bytes, embedding table first (the LM head too when
    /// tied), then the layers' `qkv`, `o`, `gate_up`, `down`.
    pub fn matrix_formats(&self) -> Vec<(&'static str, usize)> {
        let mut out = vec![self.backend.matrix_format(&self.embed)];
        out.extend(self.lm_head.iter().map(|m| self.backend.matrix_format(m)));
        for l in &self.layers {
            for m in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                out.push(self.backend.matrix_format(m));
            }
        }
        out
    }

    /// Weight bytes by format, e.g. `q4_1 81.5 MiB, q8_0 30.0 MiB` (for the load log).
    pub fn weights_summary(&self) -> String {
        let mut by: Vec<(&str, usize, usize)> = Vec::new();
        for (f, b) in self.matrix_formats() {
            match by.iter_mut().find(|(g, ..)| *g == f) {
                Some(e) => (e.1, e.2) = (e.1 + 1, e.2 + b),
                None => by.push((f, 1, b)),
            }
        }
        by.iter()
            .map(|(f, n, b)| format!("{n} {f} ({:.1} MiB)", *b as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The rotary embedding the model applies.
    pub fn rope(&self) -> &RopeParams {
        &self.rope
    }

    /// The attention shape (heads, KV heads, head_dim).
    pub fn attn_shape(&self) -> AttnShape {
        self.shape
    }

    /// Bytes one KV block of `block_size` tokens takes over all layers.
    pub fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        self.backend
            .kv_bytes_per_block(self.cfg.num_layers, block_size, self.shape)
    }

    /// How many blocks of `block_size` tokens fit in `bytes` of KV memory.
    pub fn kv_blocks_for_bytes(&self, bytes: usize, block_size: usize) -> usize {
        bytes / self.kv_bytes_per_block(block_size).max(1)
    }

    /// A zeroed KV store of `num_blocks` blocks of `block_size` tokens for this model (with
    /// the model's `mhc` projections).
    pub fn new_kv_store(&self, num_blocks: usize, block_size: usize) -> B::KvStore {
        let mut store =
            self.backend
                .new_kv_store(self.cfg.num_layers, num_blocks, block_size, self.shape);
        self.backend.attach_latent_keys(&mut store, &self.latents);
        store
    }

    /// Serves `mhc:R` for `keys.rank` from now on (stores created later seal with it). The
    /// projection must have this model's shape; the model's RoPE is what reconstructions are
    /// rotated with. One projection per rank: a second one of the same rank is an error.
    pub fn attach_latent_keys(&mut self, mut keys: LatentKeys) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Calibration(m));
        if keys.layers.len() != self.cfg.num_layers
            || keys.kv_width != self.shape.kv_width()
            || keys.head_dim != self.shape.head_dim
        {
            return bad(format!(
                "made for {} layers × {} KV channels (head_dim {}), this model has {} × {} ({})",
                keys.layers.len(),
                keys.kv_width,
                keys.head_dim,
                self.cfg.num_layers,
                self.shape.kv_width(),
                self.shape.head_dim
            ));
        }
        keys.validate().or_else(bad)?;
        if self.latents.iter().any(|k| k.rank == keys.rank) {
            return bad(format!("two projections of rank {}", keys.rank));
        }
        keys.rope = self.rope.clone();
        keys.max_positions = self.cfg.max_position_embeddings;
        self.latents.push(Arc::new(keys));
        Ok(())
    }

    /// The attached `mhc` projections.
    pub fn latent_keys(&self) -> &[Arc<LatentKeys>] {
        &self.latents
    }

    /// Every sealed format this model can store: the plain codecs, and `mhc:R` with each value
    /// format for each attached projection.
    pub fn codecs(&self) -> Vec<Codec> {
        let mut out = Codec::PLAIN.to_vec();
        for k in &self.latents {
            out.extend(MhcValues::ALL.map(|values| Codec::Mhc {
                rank: k.rank,
                values,
            }));
        }
        out
    }

    /// Whether this model on its backend serves `policy` (`mhc:R` needs a projection of rank R).
    pub fn serves_policy(&self, policy: &KvPolicy) -> bool {
        let calibrated = match policy.codec.and_then(Codec::latent_rank) {
            None => true,
            Some(r) => self.latents.iter().any(|k| k.rank == r),
        };
        calibrated && self.backend.supports_policy(policy)
    }

    /// Checks one step against the model and the store; returns its slots (where each token's
    /// K/V goes). Everything a kernel could trip on is an error here, never a panic later.
    fn check_step(&self, step: &SeqStep<'_>, store: &B::KvStore) -> Result<Vec<u32>, RunError> {
        let (t, bs) = (step.tokens.len(), store.block_size());
        if t == 0 {
            return Err(RunError::Invalid("empty forward step".into()));
        }
        let end = step.start_pos + t;
        let max = self.cfg.max_position_embeddings;
        if end > max {
            return Err(RunError::ContextLength { needed: end, max });
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = step.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(RunError::Invalid(format!(
                "token id {bad} out of range (vocab {vocab})"
            )));
        }
        let needed = end.div_ceil(bs);
        let table = step.block_table;
        if table.len() < needed {
            return Err(RunError::Invalid(format!(
                "block table of {} blocks cannot hold {end} tokens (block size {bs})",
                table.len()
            )));
        }
        if !self.serves_policy(&step.policy) {
            return Err(RunError::Invalid(format!(
                "KV policy `{}` is not served by this model on the {} backend",
                step.policy,
                self.backend.name()
            )));
        }
        // Under a window, blocks that even the step's first position cannot see may have been
        // dropped; every other entry must be a real block.
        let first_own = step.start_pos / bs;
        let dropped_ok = |bi: usize| {
            step.policy
                .window_blocks(bs)
                .is_some_and(|w| bi != 0 && bi + w <= first_own)
        };
        let blocks = store.num_blocks();
        if let Some((_, &bad)) = table[..needed]
            .iter()
            .enumerate()
            .find(|&(bi, &b)| b as usize >= blocks && !dropped_ok(bi))
        {
            return Err(RunError::Invalid(format!(
                "block id {bad} out of range (pool of {blocks})"
            )));
        }
        (step.start_pos..end)
            .map(|p| u32::try_from(table[p / bs] as usize * bs + p % bs))
            .collect::<Result<_, _>>()
            .map_err(|_| RunError::Invalid("KV slot past u32".into()))
    }

    /// Runs one batched step: each sequence's tokens at its positions, writing their keys and
    /// values through its block table. Returns, per sequence, its logits (`[rows, vocab]`
    /// flattened; empty for [`LogitsFor::None`]). A row's logits do not depend on the other
    /// sequences of the batch (see the backend's attention and matmul notes).
    pub fn forward(
        &self,
        batch: &[SeqStep<'_>],
        store: &mut B::KvStore,
    ) -> Result<Vec<Vec<f32>>, RunError> {
        self.forward_observed(batch, store, None)
    }

    /// [`Self::forward`] for the engine: the logits in one buffer, and [`LogitsFor::Argmax`]
    /// sequences answered with their greedy token.
    pub fn forward_step(
        &self,
        batch: &[SeqStep<'_>],
        store: &mut B::KvStore,
    ) -> Result<StepOutput, RunError> {
        self.run(batch, store, None)
    }

    /// [`Self::forward`], handing `observe` each layer's fused `[q | k | v]` rows (host copy,
    /// `[rows][qkv_width]`, q and k already rotated) — what `kvserve calibrate` measures.
    pub fn forward_observed(
        &self,
        batch: &[SeqStep<'_>],
        store: &mut B::KvStore,
        observe: Option<&mut LayerObserver<'_>>,
    ) -> Result<Vec<Vec<f32>>, RunError> {
        if batch.iter().any(|s| s.logits.gives_token()) {
            return Err(RunError::Invalid(
                "LogitsFor::Argmax and Draw return tokens: use forward_step".into(),
            ));
        }
        let out = self.run(batch, store, observe)?;
        Ok((0..out.len()).map(|i| out.logits(i).to_vec()).collect())
    }

    fn run(
        &self,
        batch: &[SeqStep<'_>],
        store: &mut B::KvStore,
        mut observe: Option<&mut LayerObserver<'_>>,
    ) -> Result<StepOutput, RunError> {
        if store.num_layers() != self.cfg.num_layers {
            return Err(RunError::Invalid(format!(
                "KV store has {} layers, model {}",
                store.num_layers(),
                self.cfg.num_layers
            )));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for step in batch {
            slots.extend(self.check_step(step, store)?);
            tokens.extend_from_slice(step.tokens);
            positions
                .extend((step.start_pos..step.start_pos + step.tokens.len()).map(|p| p as u32));
        }
        let seqs: Vec<AttnSeq<'_>> = batch
            .iter()
            .map(|s| AttnSeq {
                rows: s.tokens.len(),
                start_pos: s.start_pos,
                block_table: s.block_table,
                policy: s.policy,
            })
            .collect();
        // Blocks that become full in this step are sealed into their policy's format, layer by
        // layer before attention, so the step's later positions already read them sealed —
        // exactly what a later decode or a prefix-cache hit reads.
        let bs = store.block_size();
        let seals: Vec<Seal> = batch
            .iter()
            .filter_map(|s| Some((s, s.policy.codec?)))
            .flat_map(|(s, codec)| {
                let bounds = s.policy.stores_bounds();
                (s.start_pos / bs..(s.start_pos + s.tokens.len()) / bs).map(move |bi| Seal {
                    block: s.block_table[bi],
                    pos: (bi * bs) as u32,
                    codec,
                    bounds,
                })
            })
            .collect();
        let t = tokens.len();
        if t == 0 {
            return Ok(StepOutput::from_parts(
                self.cfg.vocab_size,
                Vec::new(),
                Vec::new(),
            ));
        }
        let be = &self.backend;
        let cfg = &self.cfg;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);

        let mut x = be.alloc(t * h);
        be.embed(&self.embed, &tokens, &mut x);
        let mut normed = be.alloc(t * h);
        let mut qkv = be.alloc(t * self.shape.qkv_width());
        let mut attn = be.alloc(t * self.shape.q_width());
        let mut proj = be.alloc(t * h);
        let mut gate_up = be.alloc(t * 2 * inter);
        let mut act = be.alloc(t * inter);

        let eps = cfg.rms_norm_eps;
        if let Some(first) = self.layers.first() {
            be.rms_norm(&x, &first.attn_norm, eps, t, &mut normed);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            // `normed` holds this layer's attention input (normed by the previous step).
            let (shape, rope) = (self.shape, &self.rope);
            if let Some(b) = &layer.qkv_bias {
                be.matmul(&normed, t, &layer.qkv, &mut qkv);
                be.add_bias(&mut qkv, b, t);
                be.rope_and_store(&mut qkv, t, &positions, &slots, shape, rope, store, li);
            } else {
                let (pos, sl) = (&positions, &slots);
                be.matmul_rope_and_store(
                    &normed, t, &layer.qkv, &mut qkv, pos, sl, shape, rope, store, li,
                );
            }
            if let Some(observe) = observe.as_mut() {
                let mut host = vec![0f32; t * shape.qkv_width()];
                be.read(&qkv, 0, &mut host);
                observe(li, &host);
            }
            if !seals.is_empty() {
                be.seal(store, li, &seals);
            }
            be.attention(&qkv, &seqs, shape, store, li, &mut attn);
            be.matmul(&attn, t, &layer.o, &mut proj);
            be.add_rms_norm(&mut x, &proj, &layer.mlp_norm, eps, t, &mut normed);

            be.matmul_silu_mul(&normed, t, &layer.gate_up, inter, &mut gate_up, &mut act);
            be.matmul(&act, t, &layer.down, &mut proj);
            match self.layers.get(li + 1) {
                Some(next) => be.add_rms_norm(&mut x, &proj, &next.attn_norm, eps, t, &mut normed),
                None => be.add(&mut x, &proj, t * h),
            }
        }

        if !seals.is_empty() {
            let sealed: Vec<u32> = seals.iter().map(|s| s.block).collect();
            be.release_exact(store, &sealed);
        }

        // Only the rows asked for go through the final norm and the LM head (one matmul):
        // the rows whose logits go to the host first, then the greedy ones and the drawn ones,
        // whose tokens the backend picks.
        let (mut rows, mut greedy, mut drawn) = (Vec::new(), Vec::new(), Vec::new());
        let mut draws = Vec::new();
        let mut first = 0;
        for s in batch {
            let n = s.tokens.len();
            match s.logits {
                LogitsFor::None => {}
                LogitsFor::Last => rows.push(first + n - 1),
                LogitsFor::All => rows.extend(first..first + n),
                LogitsFor::Argmax => greedy.push(first + n - 1),
                LogitsFor::Draw { inv_t, u01 } => {
                    drawn.push(first + n - 1);
                    draws.push((inv_t, u01));
                }
            }
            first += n;
        }
        let vocab = cfg.vocab_size;
        let mut logits_host = Vec::new();
        let (mut greedy_tokens, mut drawn_tokens) = (Vec::new(), Vec::new());
        let n_rows = rows.len();
        let n_greedy = n_rows + greedy.len();
        let n_all = n_greedy + drawn.len();
        if n_all > 0 {
            rows.extend_from_slice(&greedy);
            rows.extend_from_slice(&drawn);
            let picked = be.gather_rows(&x, &rows, h);
            let mut picked_normed = be.alloc(n_all * h);
            be.rms_norm(&picked, &self.final_norm, eps, n_all, &mut picked_normed);
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            let mut logits = be.alloc(n_all * vocab);
            be.matmul(&picked_normed, n_all, head, &mut logits);
            if n_greedy > n_rows {
                greedy_tokens = be.argmax_rows(&logits, n_rows..n_greedy, vocab);
            }
            if n_all > n_greedy {
                drawn_tokens = be.draw_rows(&logits, n_greedy..n_all, vocab, &draws);
            }
            logits_host = be.take_host(logits, n_rows * vocab);
        }
        // The host rows are in batch order: each sequence's are the next ones.
        let mut row = 0;
        let (mut greedy_tokens, mut drawn_tokens) =
            (greedy_tokens.into_iter(), drawn_tokens.into_iter());
        let seqs = batch
            .iter()
            .map(|s| {
                let (n, token) = match s.logits {
                    LogitsFor::None => (0, None),
                    LogitsFor::Last => (1, None),
                    LogitsFor::All => (s.tokens.len(), None),
                    LogitsFor::Argmax => (0, greedy_tokens.next()),
                    LogitsFor::Draw { .. } => (0, drawn_tokens.next()),
                };
                row += n;
                (row - n, n, token)
            })
            .collect();
        Ok(StepOutput::from_parts(vocab, logits_host, seqs))
    }
}
