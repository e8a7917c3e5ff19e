//! Test helpers: a tiny random-weight Llama written to a temp dir (safetensors, config.json,
//! a byte-level tokenizer.json) and a naive f64 reference forward pass to check the real one.
#![allow(dead_code)]

use half::bf16;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

pub struct TinySpec {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tied: bool,
    pub bias: bool,
    pub arch: &'static str,
    pub rope_theta: f64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            vocab: 300,
            hidden: 48,
            inter: 80,
            layers: 2,
            heads: 6,
            kv_heads: 2,
            head_dim: 8,
            tied: true,
            bias: false,
            arch: "LlamaForCausalLM",
            rope_theta: 10000.0,
        }
    }
}

/// Weights as the model will see them (bf16-rounded), in f64 for the reference.
pub struct TinyWeights {
    pub spec: TinySpec,
    pub t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

fn randn(rng: &mut impl Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * scale) as f32)
        .collect()
}

/// GPT-2's byte → printable-unicode map used by byte-level BPE.
pub fn byte_level_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A byte-level BPE tokenizer.json: ids 0..256 are the bytes, 256 is `<|eos|>` (special),
/// 257.. are a few merges.
pub fn tiny_tokenizer_json() -> String {
    let alpha = byte_level_alphabet();
    let mut vocab = serde_json::Map::new();
    for (i, c) in alpha.iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    vocab.insert("<|eos|>".into(), 256.into());
    let merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), (257 + i).into());
    }
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": "<|eos|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    })
    .to_string()
}

/// Writes a complete tiny model directory and returns its (bf16-rounded) weights.
pub fn write_tiny_model(dir: &Path, spec: TinySpec, seed: u64) -> TinyWeights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (h, hd) = (spec.hidden, spec.head_dim);
    let mut shapes: Vec<(String, Vec<usize>, f64)> = vec![
        ("model.embed_tokens.weight".into(), vec![spec.vocab, h], 1.0),
        ("model.norm.weight".into(), vec![h], 0.0),
    ];
    if !spec.tied {
        shapes.push(("lm_head.weight".into(), vec![spec.vocab, h], 0.3));
    }
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let ws = 1.0 / (h as f64).sqrt();
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h], 0.0));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h], 0.0));
        shapes.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![spec.heads * hd, h],
            ws * 2.0,
        ));
        shapes.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![spec.kv_heads * hd, h],
            ws * 2.0,
        ));
        shapes.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![spec.kv_heads * hd, h],
            ws,
        ));
        shapes.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, spec.heads * hd],
            ws,
        ));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![spec.inter, h], ws));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![spec.inter, h], ws));
        shapes.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![h, spec.inter],
            1.0 / (spec.inter as f64).sqrt(),
        ));
        if spec.bias {
            shapes.push((
                format!("{p}.self_attn.q_proj.bias"),
                vec![spec.heads * hd],
                0.2,
            ));
            shapes.push((
                format!("{p}.self_attn.k_proj.bias"),
                vec![spec.kv_heads * hd],
                0.2,
            ));
            shapes.push((
                format!("{p}.self_attn.v_proj.bias"),
                vec![spec.kv_heads * hd],
                0.2,
            ));
        }
    }
    let mut t = HashMap::new();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, scale) in shapes {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = if scale == 0.0 {
            // Norm weights around 1.
            randn(&mut rng, n, 0.2).iter().map(|x| 1.0 + x).collect()
        } else {
            randn(&mut rng, n, scale)
        };
        let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
        t.insert(
            name.clone(),
            (shape.clone(), b.iter().map(|x| x.to_f64()).collect()),
        );
        bytes.push((name, shape, bytemuck::cast_slice(&b).to_vec()));
    }
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": [spec.arch],
        "vocab_size": spec.vocab, "hidden_size": h, "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": hd, "rope_theta": spec.rope_theta,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": spec.tied,
        "attention_bias": spec.bias, "bos_token_id": 256, "eos_token_id": 256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let tc = serde_json::json!({
        "eos_token": "<|eos|>", "bos_token": "<|eos|>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    TinyWeights { spec, t }
}

impl TinyWeights {
    fn w(&self, name: &str) -> &[f64] {
        &self.t[name].1
    }

    /// `y[r] = Σ_k x[k] · W[r, k]`.
    fn linear(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let (shape, w) = &self.t[name];
        let (rows, cols) = (shape[0], shape[1]);
        (0..rows)
            .map(|r| (0..cols).map(|k| w[r * cols + k] * x[k]).sum())
            .collect()
    }

    fn rms(&self, x: &[f64], name: &str) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        x.iter()
            .zip(self.w(name))
            .map(|(v, g)| v * inv * g)
            .collect()
    }

    fn rope(&self, v: &mut [f64], pos: usize) {
        let d = self.spec.head_dim;
        for i in 0..d / 2 {
            let inv = 1.0 / self.spec.rope_theta.powf((2 * i) as f64 / d as f64);
            let (s, c) = (pos as f64 * inv).sin_cos();
            let (a, b) = (v[i], v[i + d / 2]);
            v[i] = a * c - b * s;
            v[i + d / 2] = b * c + a * s;
        }
    }

    /// Naive full-sequence forward; returns logits for every position.
    pub fn reference_logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let s = &self.spec;
        let (h, hd) = (s.hidden, s.head_dim);
        let emb = self.w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            let mut qs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let n = self.rms(x, &format!("{p}.input_layernorm.weight"));
                let mut q = self.linear(&format!("{p}.self_attn.q_proj.weight"), &n);
                let mut k = self.linear(&format!("{p}.self_attn.k_proj.weight"), &n);
                let mut v = self.linear(&format!("{p}.self_attn.v_proj.weight"), &n);
                if s.bias {
                    for (a, b) in q
                        .iter_mut()
                        .zip(self.w(&format!("{p}.self_attn.q_proj.bias")))
                    {
                        *a += b;
                    }
                    for (a, b) in k
                        .iter_mut()
                        .zip(self.w(&format!("{p}.self_attn.k_proj.bias")))
                    {
                        *a += b;
                    }
                    for (a, b) in v
                        .iter_mut()
                        .zip(self.w(&format!("{p}.self_attn.v_proj.bias")))
                    {
                        *a += b;
                    }
                }
                for hq in q.chunks_mut(hd) {
                    self.rope(hq, pos);
                }
                for hk in k.chunks_mut(hd) {
                    self.rope(hk, pos);
                }
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let group = s.heads / s.kv_heads;
            for (pos, x) in xs.iter_mut().enumerate() {
                let mut attn = vec![0.0; s.heads * hd];
                for head in 0..s.heads {
                    let kvh = head / group;
                    let q = &qs[pos][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        let v = &vs[j][kvh * hd..(kvh + 1) * hd];
                        for d in 0..hd {
                            attn[head * hd + d] += ej / z * v[d];
                        }
                    }
                }
                let o = self.linear(&format!("{p}.self_attn.o_proj.weight"), &attn);
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                let n = self.rms(x, &format!("{p}.post_attention_layernorm.weight"));
                let g = self.linear(&format!("{p}.mlp.gate_proj.weight"), &n);
                let u = self.linear(&format!("{p}.mlp.up_proj.weight"), &n);
                let act: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = self.linear(&format!("{p}.mlp.down_proj.weight"), &act);
                for (a, b) in x.iter_mut().zip(&d) {
                    *a += b;
                }
            }
        }
        let head = if s.tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        xs.iter()
            .map(|x| self.linear(head, &self.rms(x, "model.norm.weight")))
            .collect()
    }
}

/// The real default model (SmolLM2-135M-Instruct) on the CPU backend. Fails, never skips, when
/// it is missing: these tests are the correctness evidence. Run scripts/fetch-model.sh first.
pub fn load_real_model() -> (
    kvserve::model::loader::ModelFiles,
    kvserve::model::llama::Llama<kvserve::backend::cpu::CpuBackend>,
) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh first (these tests need the real model)",
        p.display()
    );
    let files = kvserve::model::loader::open(&p).unwrap();
    let model = kvserve::model::llama::Llama::load(
        files.config.clone(),
        files.weights.as_ref(),
        kvserve::backend::cpu::CpuBackend::new(),
    )
    .unwrap();
    (files, model)
}
pub mod server;
