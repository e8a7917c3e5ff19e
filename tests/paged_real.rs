//! The paged, batched forward on the real default model (SmolLM2-135M-Instruct):
//! - blocks of 16 through a shuffled table give the same logits as one contiguous block;
//! - a sequence's logits are bit-identical alone and inside a batch that mixes prompt chunks
//!   and decode rows of other sequences;
//! - 16 sequences generated together by a small continuous-batching loop (prompt chunks under a
//!   token budget, decode rows, blocks handed out from a shuffled free list as sequences grow)
//!   produce the same greedy tokens, and the same logits bits at every step, as each alone.
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use kvserve::backend::cpu::CpuBackend;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::model::loader::ModelFiles;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::OnceLock;

const BS: usize = 16;

struct Loaded {
    files: ModelFiles,
    model: Llama<CpuBackend>,
}

fn real() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| {
        let (files, model) = common::load_real_model();
        Loaded { files, model }
    })
}

fn encode(text: &str) -> Vec<u32> {
    real().files.tokenizer.encode(text, true).unwrap()
}

const TEXTS: [&str; 16] = [
    "The KV cache is the heart of serving.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The capital of France is",
    "Explain in one sentence why the sky is blue.",
    "1, 2, 3, 5, 8, 13,",
    "Rust's ownership model guarantees memory safety without a garbage collector because",
    "Q: What is the boiling point of water at sea level?\nA:",
    "A haiku about autumn leaves:",
    "The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "The mitochondria is",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Paged attention splits the key-value cache into fixed-size blocks so that",
];

fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    ids
}

#[test]
fn paged_blocks_equal_one_contiguous_block_on_the_real_model() {
    let m = &real().model;
    let prompt: Vec<u32> = TEXTS.iter().flat_map(|t| encode(t)).take(150).collect();
    assert_eq!(prompt.len(), 150);
    let run = |bs: usize, table: &[u32], blocks: usize| {
        let mut store = m.new_kv_store(blocks, bs);
        // A prompt in two chunks, then three decode steps: all logits of every row.
        let mut out = Vec::new();
        for (start, end) in [(0, 100), (100, 147), (147, 148), (148, 149), (149, 150)] {
            let step = SeqStep {
                policy: kvserve::kv::policy::KvPolicy::EXACT,
                tokens: &prompt[start..end],
                start_pos: start,
                block_table: table,
                logits: LogitsFor::All,
            };
            out.extend(m.forward(&[step], &mut store).unwrap().remove(0));
        }
        out
    };
    let want = run(150, &[0], 1);
    let table = shuffled(20, 7)[..10].to_vec(); // 10 of 20 blocks, scrambled
    assert!(table.windows(2).any(|w| w[1] < w[0]));
    let got = run(BS, &table, 20);
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-5, "max |logit diff| {max}");
    assert_eq!(got, want, "expected bit-identical logits");
}

/// Greedy argmax, first index on ties.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// FNV-1a over the bits of a logits row.
fn fingerprint(logits: &[f32]) -> u64 {
    logits.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
    })
}

struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the store.
    computed: usize,
    table: Vec<u32>,
    /// Fingerprint of the logits behind each generated token.
    prints: Vec<u64>,
}

/// A miniature continuous-batching loop: each step takes every sequence's pending decode row
/// plus prompt chunks (oldest first) up to `budget` tokens, grows block tables from a shuffled
/// free list, and samples greedily. Returns each sequence's generated tokens and fingerprints.
fn generate_together(prompts: &[Vec<u32>], new_tokens: usize, budget: usize) -> Vec<Seq> {
    let m = &real().model;
    let need: usize = prompts
        .iter()
        .map(|p| (p.len() + new_tokens).div_ceil(BS))
        .sum();
    let mut free = shuffled(need + 8, 99);
    let mut store = m.new_kv_store(need + 8, BS);
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|p| Seq {
            tokens: p.clone(),
            prompt_len: p.len(),
            computed: 0,
            table: Vec::new(),
            prints: Vec::new(),
        })
        .collect();
    let done = |s: &Seq| s.tokens.len() == s.prompt_len + new_tokens;
    while !seqs.iter().all(done) {
        // (sequence, tokens this step), decode rows first, then prompt chunks.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut left = budget;
        for decode in [true, false] {
            for (i, s) in seqs.iter().enumerate() {
                let pending = s.tokens.len() - s.computed;
                if done(s) || pending == 0 || (pending == 1) != decode || left == 0 {
                    continue;
                }
                let n = pending.min(left);
                left -= n;
                plan.push((i, n));
            }
        }
        assert!(!plan.is_empty());
        for &(i, n) in &plan {
            let s = &mut seqs[i];
            while s.table.len() * BS < s.computed + n {
                s.table.push(free.pop().unwrap());
            }
        }
        let batch: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &seqs[i];
                let last = s.computed + n == s.tokens.len();
                SeqStep {
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start_pos: s.computed,
                    block_table: &s.table,
                    logits: if last {
                        LogitsFor::Last
                    } else {
                        LogitsFor::None
                    },
                }
            })
            .collect();
        let logits = m.forward(&batch, &mut store).unwrap();
        for (&(i, n), l) in plan.iter().zip(logits) {
            let s = &mut seqs[i];
            s.computed += n;
            if !l.is_empty() {
                s.prints.push(fingerprint(&l));
                s.tokens.push(argmax(&l));
            }
        }
    }
    seqs
}

#[test]
fn a_sequence_gives_identical_logits_alone_and_in_a_mixed_batch() {
    // One step that mixes a 90-token prompt chunk, decode rows at different depths and a
    // mid-prompt chunk: each sequence's logits equal its own step run alone, bit for bit.
    let m = &real().model;
    let texts: Vec<Vec<u32>> = TEXTS.iter().map(|t| encode(t)).collect();
    let long: Vec<u32> = texts.concat();
    // (tokens already computed, tokens in this step)
    let plan = [
        (0usize, 90usize),
        (40, 1),
        (17, 1),
        (60, 25),
        (3, 1),
        (0, 7),
    ];
    let prompts: Vec<Vec<u32>> = (0..plan.len())
        .map(|i| long[i * 11..i * 11 + 100].to_vec())
        .collect();
    let ids = shuffled(60, 5);
    let tables: Vec<Vec<u32>> = (0..plan.len())
        .map(|i| ids[i * 7..i * 7 + 7].to_vec())
        .collect();
    let mut stores = [m.new_kv_store(60, BS), m.new_kv_store(60, BS)];
    for store in &mut stores {
        for (i, &(done, _)) in plan.iter().enumerate() {
            if done > 0 {
                let s = SeqStep {
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                    tokens: &prompts[i][..done],
                    start_pos: 0,
                    block_table: &tables[i],
                    logits: LogitsFor::None,
                };
                m.forward(&[s], store).unwrap();
            }
        }
    }
    let steps: Vec<SeqStep<'_>> = plan
        .iter()
        .enumerate()
        .map(|(i, &(done, n))| SeqStep {
            policy: kvserve::kv::policy::KvPolicy::EXACT,
            tokens: &prompts[i][done..done + n],
            start_pos: done,
            block_table: &tables[i],
            logits: LogitsFor::All,
        })
        .collect();
    let [together_store, alone_store] = &mut stores;
    let together = m.forward(&steps, together_store).unwrap();
    for (i, s) in steps.iter().enumerate() {
        let alone = m.forward(&[*s], alone_store).unwrap().remove(0);
        assert_eq!(together[i], alone, "sequence {i}");
    }
}

#[test]
fn sixteen_sequences_generated_together_equal_each_alone() {
    let prompts: Vec<Vec<u32>> = TEXTS.iter().map(|t| encode(t)).collect();
    let new_tokens = 24;
    // Together: a 64-token budget forces chunked prompts mixed with other sequences' decode
    // rows; the first steps also mix long and short prompts.
    let together = generate_together(&prompts, new_tokens, 64);
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate_together(std::slice::from_ref(p), new_tokens, usize::MAX)
            .pop()
            .unwrap();
        assert_eq!(
            together[i].tokens, alone.tokens,
            "sequence {i}: greedy tokens differ"
        );
        assert_eq!(
            together[i].prints, alone.prints,
            "sequence {i}: logits bits differ"
        );
    }
}
