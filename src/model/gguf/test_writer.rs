//! A tiny GGUF writer for tests (unit tests include it as a module; `tests/gguf_errors.rs`
//! includes the same file with `#[path]`). Only std, so it works in either crate.
#![allow(dead_code)]

pub const T_U8: u32 = 0;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;

pub fn put_u32(b: &mut Vec<u8>, x: u32) {
    b.extend_from_slice(&x.to_le_bytes());
}

pub fn put_u64(b: &mut Vec<u8>, x: u64) {
    b.extend_from_slice(&x.to_le_bytes());
}

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u64(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

/// A GGUF file under construction: metadata entries and tensors (ggml dims order).
#[derive(Default, Clone)]
pub struct GgufBuilder {
    pub version: u32,
    pub alignment: u64,
    /// key, value type, encoded value
    pub kvs: Vec<(String, u32, Vec<u8>)>,
    /// name, ggml dims, ggml type id, data
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            ..Default::default()
        }
    }

    pub fn kv_raw(&mut self, key: &str, ty: u32, value: Vec<u8>) -> &mut Self {
        self.kvs.push((key.to_string(), ty, value));
        self
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv_raw(key, T_U32, v.to_le_bytes().to_vec())
    }

    pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv_raw(key, T_F32, v.to_le_bytes().to_vec())
    }

    pub fn kv_bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv_raw(key, T_BOOL, vec![v as u8])
    }

    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut b = Vec::new();
        put_str(&mut b, v);
        self.kv_raw(key, T_STRING, b)
    }

    pub fn kv_str_array(&mut self, key: &str, v: &[String]) -> &mut Self {
        let mut b = Vec::new();
        put_u32(&mut b, T_STRING);
        put_u64(&mut b, v.len() as u64);
        for s in v {
            put_str(&mut b, s);
        }
        self.kv_raw(key, T_ARRAY, b)
    }

    pub fn kv_i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = Vec::new();
        put_u32(&mut b, T_I32);
        put_u64(&mut b, v.len() as u64);
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.kv_raw(key, T_ARRAY, b)
    }

    pub fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// An F32 tensor; `dims` in ggml order (`dims[0]` = columns).
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor_raw(name, dims, 0, bytes)
    }

    /// The file bytes, tensors packed in order at aligned offsets.
    pub fn build(&self) -> Vec<u8> {
        let align = self.alignment.max(1) as usize;
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        put_u32(&mut b, self.version);
        put_u64(&mut b, self.tensors.len() as u64);
        put_u64(&mut b, self.kvs.len() as u64);
        for (k, ty, v) in &self.kvs {
            put_str(&mut b, k);
            put_u32(&mut b, *ty);
            b.extend_from_slice(v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            put_u32(&mut b, dims.len() as u32);
            for &d in dims {
                put_u64(&mut b, d);
            }
            put_u32(&mut b, *ty);
            put_u64(&mut b, offset as u64);
            offset = (offset + data.len()).next_multiple_of(align);
        }
        b.resize(b.len().next_multiple_of(align), 0);
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(align), 0);
        }
        b
    }
}

/// GPT-2's byte → printable char table (the byte-level BPE alphabet).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut table = vec!['\0'; 256];
    for &b in &printable {
        table[b as usize] = char::from_u32(b).unwrap_or('?');
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            table[b as usize] = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            printable.push(b);
        }
    }
    table
}

/// A complete tiny Llama GGUF: 1 layer, hidden 8, 2 heads of 4, 1 KV head, ffn 16, a byte-level
/// BPE vocabulary (2 control tokens + 256 bytes + 2 merges = 260) with the `smollm`
/// pre-tokenizer, and F32 weights whose values are `hf_value(name, row, col)` in HF layout (Q/K
/// stored permuted like llama.cpp does). All values are exact in bf16.
pub fn tiny_llama() -> GgufBuilder {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    let mut types = vec![3, 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = vec!["h i".to_string(), "Ġ Ġ".to_string()];
    tokens.push("hi".into());
    tokens.push("ĠĠ".into());
    types.extend([1, 1]);
    let vocab = tokens.len() as u64;
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.context_length", 64)
        .kv_u32("llama.embedding_length", 8)
        .kv_u32("llama.feed_forward_length", 16)
        .kv_u32("llama.attention.head_count", 2)
        .kv_u32("llama.attention.head_count_kv", 1)
        .kv_u32("llama.rope.dimension_count", 4)
        .kv_f32("llama.rope.freq_base", 10000.0)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", "smollm")
        .kv_str_array("tokenizer.ggml.tokens", &tokens)
        .kv_i32_array("tokenizer.ggml.token_type", &types)
        .kv_str_array("tokenizer.ggml.merges", &merges)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 0)
        .kv_bool("tokenizer.ggml.add_bos_token", false)
        .kv_str("tokenizer.chat_template", "{{ messages }}");
    let linear = |g: &mut GgufBuilder, name: &str, rows: u64, cols: u64, n_head: Option<u64>| {
        let mut data: Vec<f32> = (0..rows * cols)
            .map(|i| hf_value(name, i / cols, i % cols))
            .collect();
        if let Some(n) = n_head {
            data = permute_rows(&data, n as usize, cols as usize);
        }
        g.tensor_f32(name, &[cols, rows], &data);
    };
    linear(&mut g, "token_embd.weight", vocab, 8, None);
    linear(&mut g, "output_norm.weight", 1, 8, None);
    linear(&mut g, "blk.0.attn_norm.weight", 1, 8, None);
    linear(&mut g, "blk.0.ffn_norm.weight", 1, 8, None);
    linear(&mut g, "blk.0.attn_q.weight", 8, 8, Some(2));
    linear(&mut g, "blk.0.attn_k.weight", 4, 8, Some(1));
    linear(&mut g, "blk.0.attn_v.weight", 4, 8, None);
    linear(&mut g, "blk.0.attn_output.weight", 8, 8, None);
    linear(&mut g, "blk.0.ffn_gate.weight", 16, 8, None);
    linear(&mut g, "blk.0.ffn_up.weight", 16, 8, None);
    linear(&mut g, "blk.0.ffn_down.weight", 8, 16, None);
    // Norms are 1-D.
    for t in g.tensors.iter_mut() {
        if t.0.contains("norm") {
            t.1 = vec![8];
        }
    }
    g
}

/// The HF-layout value of element (row, col) of a tiny_llama tensor: distinct per tensor and
/// row, exact in bf16.
pub fn hf_value(name: &str, row: u64, col: u64) -> f32 {
    let salt = name.bytes().fold(0u64, |a, b| (a * 31 + b as u64) % 97);
    (((salt + 7 * row + col) % 64) as f32 - 32.0) / 16.0
}

/// llama.cpp's Q/K row permutation (HF → GGUF).
pub fn permute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
