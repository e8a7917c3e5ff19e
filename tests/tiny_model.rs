//! The forward pass on tiny random-weight models against a naive f64 reference, incremental
//! decoding against one-shot prefill, and clear errors for broken model directories.

mod common;

use common::{write_tiny_model, TinySpec};
use kvserve::backend::cpu::CpuBackend;
use kvserve::engine::generate::{generate, GenerateOptions};
use kvserve::model::llama::{Llama, LogitsFor};
use kvserve::model::loader;
use kvserve::types::SamplingParams;
use std::path::Path;

fn load(dir: &Path) -> Llama<CpuBackend> {
    let files = loader::open(dir).unwrap();
    Llama::load(
        files.config.clone(),
        files.weights.as_ref(),
        CpuBackend::new(),
    )
    .unwrap()
}

fn check_against_reference(spec: TinySpec, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_tiny_model(dir.path(), spec, seed);
    let model = load(dir.path());
    let tokens: Vec<u32> = vec![5, 17, 256, 3, 99, 42, 7, 7, 123, 200, 1];
    let mut cache = model.new_cache(64);
    let got = model
        .forward(&tokens, 0, &mut cache, LogitsFor::All)
        .unwrap();
    let want = weights.reference_logits(&tokens);
    let vocab = weights.spec.vocab;
    let mut max_diff = 0f64;
    for (row, w) in want.iter().enumerate() {
        for (j, &wv) in w.iter().enumerate() {
            max_diff = max_diff.max((got[row * vocab + j] as f64 - wv).abs());
        }
    }
    assert!(
        max_diff < 2e-3,
        "max |logit diff| vs reference = {max_diff}"
    );
}

#[test]
fn forward_matches_reference_llama_gqa_tied() {
    check_against_reference(TinySpec::default(), 1);
}

#[test]
fn forward_matches_reference_untied_mha() {
    check_against_reference(
        TinySpec {
            tied: false,
            kv_heads: 6,
            ..TinySpec::default()
        },
        2,
    );
}

#[test]
fn forward_matches_reference_qwen2_bias() {
    check_against_reference(
        TinySpec {
            arch: "Qwen2ForCausalLM",
            bias: true,
            kv_heads: 3,
            rope_theta: 1e6,
            ..TinySpec::default()
        },
        3,
    );
}

#[test]
fn incremental_decode_equals_one_shot_prefill() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 4);
    let model = load(dir.path());
    let vocab = model.config().vocab_size;
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 290) as u32).collect();
    let mut full_cache = model.new_cache(32);
    let full = model
        .forward(&tokens, 0, &mut full_cache, LogitsFor::All)
        .unwrap();
    // Prefill in two chunks, then one token at a time.
    let mut cache = model.new_cache(32);
    model
        .forward(&tokens[..7], 0, &mut cache, LogitsFor::Last)
        .unwrap();
    let mid = model
        .forward(&tokens[7..12], 7, &mut cache, LogitsFor::Last)
        .unwrap();
    let row = |r: usize| &full[r * vocab..(r + 1) * vocab];
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    assert!(close(&mid, row(11)));
    for pos in 12..20 {
        let step = model
            .forward(&tokens[pos..pos + 1], pos, &mut cache, LogitsFor::Last)
            .unwrap();
        assert!(close(&step, row(pos)), "position {pos}");
    }
}

#[test]
fn forward_rejects_overflow_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 5);
    let model = load(dir.path());
    let mut cache = model.new_cache(4);
    let e = model
        .forward(&[1, 2, 3, 4, 5], 0, &mut cache, LogitsFor::Last)
        .unwrap_err();
    assert!(e.to_string().contains("context length"), "{e}");
    let e = model
        .forward(&[1, 100_000], 0, &mut cache, LogitsFor::Last)
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

#[test]
fn generate_respects_max_tokens_and_stop_ids_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 6);
    let model = load(dir.path());
    let mut opts = GenerateOptions {
        max_tokens: 12,
        stop_ids: vec![],
        ignore_eos: false,
        sampling: SamplingParams::default(),
    };
    let a = generate(&model, &[1, 2, 3], &opts, |_| {}).unwrap();
    assert_eq!(a.tokens.len(), 12);
    let b = generate(&model, &[1, 2, 3], &opts, |_| {}).unwrap();
    let ids = |o: &kvserve::engine::generate::GenerateOutput| {
        o.tokens.iter().map(|s| s.token).collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    // Stopping at the 4th greedy token.
    opts.stop_ids = vec![a.tokens[3].token];
    let first_stop = ids(&a)
        .iter()
        .position(|&t| t == a.tokens[3].token)
        .unwrap();
    let c = generate(&model, &[1, 2, 3], &opts, |_| {}).unwrap();
    assert_eq!(c.tokens.len(), first_stop + 1);
    assert_eq!(c.finish_reason, kvserve::types::FinishReason::Stop);
    opts.ignore_eos = true;
    assert_eq!(
        generate(&model, &[1, 2, 3], &opts, |_| {})
            .unwrap()
            .tokens
            .len(),
        12
    );
    // Seeded sampling is reproducible.
    opts.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    };
    let s1 = generate(&model, &[1, 2, 3], &opts, |_| {}).unwrap();
    let s2 = generate(&model, &[1, 2, 3], &opts, |_| {}).unwrap();
    assert_eq!(ids(&s1), ids(&s2));
}

fn open_err(dir: &Path) -> String {
    match loader::open(dir) {
        Ok(files) => match Llama::load(
            files.config.clone(),
            files.weights.as_ref(),
            CpuBackend::new(),
        ) {
            Ok(_) => panic!("{} loaded but should not", dir.display()),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_directories_give_clear_errors() {
    let missing = open_err(Path::new("/nonexistent/model"));
    assert!(
        missing.contains("/nonexistent/model") && missing.contains("not found"),
        "{missing}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 7);
    let st = dir.path().join("model.safetensors");
    let good = std::fs::read(&st).unwrap();

    // Truncated data section.
    std::fs::write(&st, &good[..good.len() - 100]).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("invalid file"),
        "{e}"
    );

    // Header length pointing past the end of the file.
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&st, &bad).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );

    // Garbage JSON header.
    let mut bad = good.clone();
    bad[8] = b'#';
    std::fs::write(&st, &bad).unwrap();
    assert!(open_err(dir.path()).contains("model.safetensors"));
    std::fs::write(&st, &good).unwrap();

    // Unsupported architecture.
    let cfg_path = dir.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("LlamaForCausalLM", "FalconForCausalLM"),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("unsupported") && e.contains("FalconForCausalLM"),
        "{e}"
    );

    // Shape mismatch between config and weights.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\":80", "\"intermediate_size\":81"),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("gate_proj") && e.contains("shape"), "{e}");

    // Missing config.json.
    std::fs::remove_file(&cfg_path).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn unsupported_dtype_and_missing_tensor_are_named() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 8);
    // Replace the weights with a file holding one I32 tensor under the embedding's name.
    let data = vec![0u8; 300 * 48 * 4];
    let view = TensorView::new(Dtype::I32, vec![300, 48], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("model.embed_tokens.weight".to_string(), view)],
        None,
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("I32") && e.contains("embed_tokens"), "{e}");
    let view = TensorView::new(Dtype::F32, vec![300, 48], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("model.embed_tokens.weight".to_string(), view)],
        None,
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("missing tensor") && e.contains("model.norm.weight"),
        "{e}"
    );
}
