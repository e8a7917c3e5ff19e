//! Hugging Face ↔ GGUF tensor names, and llama.cpp's Q/K row permutation and its inverse.

/// Per-layer suffixes: (HF suffix after `model.layers.N.`, GGUF suffix after `blk.N.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The GGUF name of a Hugging Face tensor name (`None` if it has no GGUF counterpart).
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let &(_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of a GGUF tensor name (`None` for tensors without one).
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let &(h, _) = LAYER_NAMES.iter().find(|(_, g)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// Undoes llama.cpp's `LlamaModel.permute` on the rows of a `[n_head * head_dim, cols]` matrix
/// (or a bias, `cols` = 1): inside each head, GGUF row `2i + j` goes back to HF row
/// `j * head_dim/2 + i`. Equivalent to numpy
/// `w.reshape(n_head, head_dim/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`. Rows are any
/// run of `cols` elements: for quantized data, a row's bytes (its blocks move whole).
pub fn unpermute_qk_rows<T: Copy + Default>(
    w: &[T],
    n_head: usize,
    cols: usize,
) -> Result<Vec<T>, String> {
    move_rows(w, n_head, cols, false)
}

/// The forward permutation (HF → GGUF), as llama.cpp's converter applies it (for tests).
pub fn permute_qk_rows(w: &[f32], n_head: usize, cols: usize) -> Result<Vec<f32>, String> {
    move_rows(w, n_head, cols, true)
}

/// Moves HF row `j * half + i` of each head to GGUF row `2i + j` (`to_gguf`) or back.
fn move_rows<T: Copy + Default>(
    w: &[T],
    n_head: usize,
    cols: usize,
    to_gguf: bool,
) -> Result<Vec<T>, String> {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    if n_head == 0
        || cols == 0
        || rows * cols != w.len()
        || !rows.is_multiple_of(n_head.saturating_mul(2))
    {
        return Err(format!(
            "cannot (un)permute {} values as {n_head} heads of rows with {cols} columns",
            w.len()
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_mapping_round_trips() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.3.self_attn.k_proj.bias",
        ] {
            let g = hf_to_gguf_name(hf).unwrap();
            assert_eq!(gguf_to_hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.1.mlp.nope"), None);
        assert_eq!(gguf_to_hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_hand_checked() {
        // One head, head_dim 4, one column. GGUF rows are [h0, h2, h1, h3] of HF rows
        // (HF row j*2 + i -> GGUF row 2i + j).
        let hf = [10.0, 11.0, 12.0, 13.0];
        let gguf = permute_qk_rows(&hf, 1, 1).unwrap();
        assert_eq!(gguf, [10.0, 12.0, 11.0, 13.0]);
        assert_eq!(unpermute_qk_rows(&gguf, 1, 1).unwrap(), hf);
        // Two heads of head_dim 4, two columns: each head is permuted on its own.
        let hf: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let gguf = permute_qk_rows(&hf, 2, 2).unwrap();
        let rows: Vec<f32> = gguf.chunks(2).map(|r| r[0] / 2.0).collect();
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        for (n_head, head_dim, cols) in [(9, 64, 5), (3, 64, 3), (4, 8, 1), (1, 4, 7)] {
            let w: Vec<f32> = (0..n_head * head_dim * cols).map(|x| x as f32).collect();
            let p = permute_qk_rows(&w, n_head, cols).unwrap();
            assert_ne!(p, w);
            assert_eq!(unpermute_qk_rows(&p, n_head, cols).unwrap(), w);
        }
        assert!(unpermute_qk_rows(&[0.0; 6], 2, 1).is_err());
        assert!(unpermute_qk_rows(&[0.0; 6], 0, 1).is_err());
    }
}
