//! The forward pass on tiny random-weight models against a naive f64 reference; the paged,
//! batched forward (shuffled block tables vs one contiguous block, a sequence alone vs inside a
//! mixed batch, copied blocks); incremental decoding against one-shot prefill; and clear
//! errors for broken model directories and bad steps.

mod common;

use common::{write_tiny_model, TinySpec};
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::Backend;
use kvserve::engine::generate::{generate, GenerateOptions};
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::model::loader;
use kvserve::types::SamplingParams;
use rand::seq::SliceRandom;
use rand::SeedableRng;
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

fn step<'a>(
    tokens: &'a [u32],
    start_pos: usize,
    table: &'a [u32],
    logits: LogitsFor,
) -> SeqStep<'a> {
    SeqStep {
        policy: kvserve::kv::policy::KvPolicy::EXACT,
        tokens,
        start_pos,
        block_table: table,
        logits,
    }
}

/// Runs one sequence's step and returns its logits.
fn run_one(
    model: &Llama<CpuBackend>,
    store: &mut <CpuBackend as Backend>::KvStore,
    tokens: &[u32],
    start_pos: usize,
    table: &[u32],
    logits: LogitsFor,
) -> Vec<f32> {
    model
        .forward(&[step(tokens, start_pos, table, logits)], store)
        .unwrap()
        .remove(0)
}

/// `n` distinct block ids out of `0..pool`, shuffled (non-contiguous, non-monotonic).
fn shuffled(n: usize, pool: usize, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..pool as u32).collect();
    ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    ids.truncate(n);
    ids
}

fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 101) % 290) as u32)
        .collect()
}

fn check_against_reference(spec: TinySpec, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_tiny_model(dir.path(), spec, seed);
    let model = load(dir.path());
    let tokens: Vec<u32> = vec![5, 17, 256, 3, 99, 42, 7, 7, 123, 200, 1];
    let mut store = model.new_kv_store(8, 4);
    let table = shuffled(3, 8, seed);
    let got = run_one(&model, &mut store, &tokens, 0, &table, LogitsFor::All);
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
    // Prefill in two chunks, then one token at a time, through a shuffled table of blocks of
    // 4: every row bit-identical to a one-shot prefill in one contiguous block.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 4);
    let model = load(dir.path());
    let vocab = model.config().vocab_size;
    let tokens = tokens(20, 0);
    let mut flat = model.new_kv_store(1, 20);
    let full = run_one(&model, &mut flat, &tokens, 0, &[0], LogitsFor::All);
    let mut store = model.new_kv_store(9, 4);
    let table = shuffled(5, 9, 4);
    let none = run_one(&model, &mut store, &tokens[..7], 0, &table, LogitsFor::None);
    assert!(none.is_empty());
    let mid = run_one(
        &model,
        &mut store,
        &tokens[7..12],
        7,
        &table,
        LogitsFor::Last,
    );
    let row = |r: usize| &full[r * vocab..(r + 1) * vocab];
    assert_eq!(mid, row(11));
    for pos in 12..20 {
        let got = run_one(
            &model,
            &mut store,
            &tokens[pos..pos + 1],
            pos,
            &table,
            LogitsFor::Last,
        );
        assert_eq!(got, row(pos), "position {pos}");
    }
}

#[test]
fn paged_shuffled_blocks_equal_one_contiguous_block() {
    // Block size 16 with a shuffled table vs one block covering the whole sequence, for each
    // architecture variant: within 1e-5 (the kernels make it exact; see attention.rs).
    for (spec, seed) in [
        (TinySpec::default(), 11),
        (
            TinySpec {
                arch: "Qwen2ForCausalLM",
                bias: true,
                kv_heads: 3,
                tied: false,
                ..TinySpec::default()
            },
            12,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), spec, seed);
        let model = load(dir.path());
        let tokens = tokens(150, 3);
        let mut flat = model.new_kv_store(1, 150);
        let want = run_one(&model, &mut flat, &tokens, 0, &[0], LogitsFor::All);
        let mut paged = model.new_kv_store(16, 16);
        let table = shuffled(10, 16, seed);
        assert!(table.windows(2).any(|w| w[1] < w[0]));
        let got = run_one(&model, &mut paged, &tokens, 0, &table, LogitsFor::All);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-5, "max |diff| {max}");
        assert_eq!(got, want, "expected bit-identical logits");
    }
}

#[test]
fn a_sequence_gives_the_same_logits_alone_and_in_a_mixed_batch() {
    // Five sequences with their prompts already partly in the store; one step mixes a long
    // prefill chunk (All), a first chunk (None), a decode row, a mid chunk (Last) and another
    // decode row. Each equals the same step run alone, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 21);
    let model = load(dir.path());
    let bs: usize = 16;
    // (tokens already in the store, tokens in this step, logits)
    let plan: [(usize, usize, LogitsFor); 5] = [
        (0, 45, LogitsFor::All),
        (0, 20, LogitsFor::None),
        (70, 1, LogitsFor::Last),
        (33, 9, LogitsFor::Last),
        (5, 1, LogitsFor::All),
    ];
    let pool = 40;
    let ids = shuffled(pool, pool, 21);
    let mut tables = Vec::new();
    let mut at = 0;
    for &(done, n, _) in &plan {
        let k = (done + n).div_ceil(bs);
        tables.push(ids[at..at + k].to_vec());
        at += k;
    }
    let toks: Vec<Vec<u32>> = plan
        .iter()
        .enumerate()
        .map(|(i, p)| tokens(p.0 + p.1, i))
        .collect();
    let prefill = |store: &mut _| {
        for (i, &(done, _, _)) in plan.iter().enumerate() {
            if done > 0 {
                run_one(
                    &model,
                    store,
                    &toks[i][..done],
                    0,
                    &tables[i],
                    LogitsFor::None,
                );
            }
        }
    };
    let mut store = model.new_kv_store(pool, bs);
    prefill(&mut store);
    let batch: Vec<SeqStep<'_>> = plan
        .iter()
        .enumerate()
        .map(|(i, &(done, n, l))| step(&toks[i][done..done + n], done, &tables[i], l))
        .collect();
    let together = model.forward(&batch, &mut store).unwrap();
    let mut alone_store = model.new_kv_store(pool, bs);
    prefill(&mut alone_store);
    for (i, s) in batch.iter().enumerate() {
        let alone = model.forward(&[*s], &mut alone_store).unwrap().remove(0);
        assert_eq!(together[i], alone, "sequence {i}");
    }
    assert_eq!(together[0].len(), 45 * model.config().vocab_size);
    assert!(together[1].is_empty());
}

#[test]
fn argmax_sequences_get_the_greedy_token_of_their_last_row() {
    // One step mixes logits rows (All, Last) with greedy sequences (Argmax): each greedy token
    // is the argmax of the logits the same sequence gets with Last, and the rows of the others
    // are unchanged by the greedy rows that follow them in the LM head.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 23);
    let model = load(dir.path());
    let bs = 16;
    let toks: Vec<Vec<u32>> = (0..4).map(|i| tokens(7 + 5 * i, i)).collect();
    let tables: Vec<Vec<u32>> = (0..4)
        .map(|i| vec![2 * i as u32, 2 * i as u32 + 1])
        .collect();
    let kinds = [
        LogitsFor::Argmax,
        LogitsFor::All,
        LogitsFor::Argmax,
        LogitsFor::Last,
    ];
    let batch = |kinds: &[LogitsFor]| -> Vec<SeqStep<'_>> {
        (0..4)
            .map(|i| step(&toks[i], 0, &tables[i], kinds[i]))
            .collect()
    };
    let mut store = model.new_kv_store(8, bs);
    let out = model.forward_step(&batch(&kinds), &mut store).unwrap();
    let rows = model
        .forward(
            &batch(&[
                LogitsFor::Last,
                LogitsFor::All,
                LogitsFor::Last,
                LogitsFor::Last,
            ]),
            &mut model.new_kv_store(8, bs),
        )
        .unwrap();
    let v = model.config().vocab_size;
    assert_eq!(out.len(), 4);
    for i in [0, 2] {
        assert!(out.logits(i).is_empty());
        let want = kvserve::backend::cpu::argmax::argmax(&rows[i]) as u32;
        assert_eq!(out.token(i), Some(want), "sequence {i}");
    }
    for i in [1, 3] {
        assert_eq!(out.token(i), None);
        assert_eq!(out.logits(i), &rows[i][..], "sequence {i}");
    }
    assert_eq!(out.logits(1).len(), toks[1].len() * v);
    // `forward` returns rows only: an Argmax sequence there is a caller's error, not a panic.
    let err = model.forward(&batch(&kinds), &mut model.new_kv_store(8, bs));
    assert!(err.is_err());
}

#[test]
fn copied_blocks_carry_every_layer() {
    // Copy a 20-token sequence's blocks (all layers, K and V) to fresh blocks, then decode the
    // next token over the copies: the logits equal decoding over the originals. A copy missing
    // any layer or V would change them.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 31);
    let model = load(dir.path());
    let tokens = tokens(21, 7);
    let mut store = model.new_kv_store(12, 8);
    let table = [5, 2, 9];
    run_one(
        &model,
        &mut store,
        &tokens[..20],
        0,
        &table,
        LogitsFor::None,
    );
    let copy = [1, 7, 3];
    let copies: Vec<(u32, u32)> = table.iter().copied().zip(copy).collect();
    model.backend().copy_blocks(&mut store, &copies);
    let a = run_one(
        &model,
        &mut store,
        &tokens[20..],
        20,
        &table,
        LogitsFor::Last,
    );
    let b = run_one(
        &model,
        &mut store,
        &tokens[20..],
        20,
        &copy,
        LogitsFor::Last,
    );
    assert_eq!(a, b);
    // And a fresh store with only the copies' blocks written matches too.
    let mut fresh = model.new_kv_store(12, 8);
    run_one(&model, &mut fresh, &tokens[..20], 0, &copy, LogitsFor::None);
    let c = run_one(
        &model,
        &mut fresh,
        &tokens[20..],
        20,
        &copy,
        LogitsFor::Last,
    );
    assert_eq!(a, c);
}

#[test]
fn forward_rejects_bad_steps_with_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 5);
    let model = load(dir.path());
    let mut store = model.new_kv_store(4, 4);
    let mut err = |tokens: &[u32], start: usize, table: &[u32]| {
        model
            .forward(&[step(tokens, start, table, LogitsFor::Last)], &mut store)
            .unwrap_err()
            .to_string()
    };
    let e = err(&[1, 2, 3, 4, 5], 0, &[0]);
    assert!(e.contains("block table"), "{e}");
    let e = err(&[1, 2], 0, &[4]);
    assert!(e.contains("block id 4"), "{e}");
    let e = err(&[1, 100_000], 0, &[0]);
    assert!(e.contains("out of range"), "{e}");
    let e = err(&[], 0, &[0]);
    assert!(e.contains("empty"), "{e}");
    // The tiny model's context is 256 positions.
    let e = err(&[1], 256, &[0; 65]);
    assert!(e.contains("context length"), "{e}");
    // A bad step anywhere in the batch fails the whole batch before anything is written.
    let good = step(&[1, 2], 0, &[0], LogitsFor::Last);
    let bad = step(&[1], 0, &[9], LogitsFor::Last);
    assert!(model.forward(&[good, bad], &mut store).is_err());
    // An empty batch is a no-op.
    assert!(model.forward(&[], &mut store).unwrap().is_empty());
    assert_eq!(
        model.kv_blocks_for_bytes(10 * model.kv_bytes_per_block(4) + 1, 4),
        10
    );
}

#[test]
fn generate_respects_max_tokens_and_stop_ids_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 6);
    let model = load(dir.path());
    let mut opts = GenerateOptions {
        kv_policy: kvserve::kv::policy::KvPolicy::EXACT,
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
