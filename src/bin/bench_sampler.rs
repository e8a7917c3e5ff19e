//! Sampler cost per token on real logits rows: the default model's last-token logits for 32
//! prompts cut from the README (vocabulary 49,152), each sampler configuration timed over
//! every row on one thread. Prints µs per row for greedy, temperature alone (OpenAI's HTTP
//! default), with top-p, top-k, min-p, penalties and logprobs.
//!
//! The history the penalties see is the same at every call (a sequence adds one token per
//! call; here none).
//!
//! Usage: `cargo run --release --bin bench_sampler [-- --model DIR --rows 32 --history 200
//! --only top_p]`

use anyhow::{Context, Result};
use clap::Parser;
use kvserve::backend::cpu::CpuBackend;
use kvserve::engine::sampler::Sampler;
use kvserve::kv::policy::KvPolicy;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::model::loader;
use kvserve::types::SamplingParams;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct")]
    model: String,
    /// Logits rows (one prompt each).
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Tokens of history the penalties see (the first 100 are the prompt).
    #[arg(long, default_value_t = 200)]
    history: usize,
    /// Run only the configurations whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files =
        loader::open(args.model.as_ref()).with_context(|| format!("opening {}", args.model))?;
    let model = Llama::from_files(&files, CpuBackend::new())?;
    let text = std::fs::read_to_string("README.md")?;
    let corpus = files.tokenizer.encode(&text, false)?;
    let (bs, len) = (16, 48);
    let prompts: Vec<Vec<u32>> = (0..args.rows)
        .map(|i| {
            corpus
                .iter()
                .copied()
                .cycle()
                .skip(i * 97)
                .take(len)
                .collect()
        })
        .collect();
    let tables: Vec<Vec<u32>> = (0..args.rows)
        .map(|i| {
            (0..len.div_ceil(bs))
                .map(|b| (i * len.div_ceil(bs) + b) as u32)
                .collect()
        })
        .collect();
    let mut store = model.new_kv_store(args.rows * len.div_ceil(bs), bs);
    let batch: Vec<SeqStep> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqStep {
            tokens: p,
            start_pos: 0,
            block_table: t,
            logits: LogitsFor::Last,
            policy: KvPolicy::EXACT,
        })
        .collect();
    let rows = model.forward(&batch, &mut store)?;
    let history: Vec<u32> = corpus.iter().copied().cycle().take(args.history).collect();
    println!(
        "{} rows of {} logits (real model), one thread",
        rows.len(),
        rows[0].len()
    );
    println!("{:<34} {:>10}", "sampler", "us/row");
    let configs: Vec<(&str, SamplingParams)> = vec![
        ("greedy", SamplingParams::default()),
        ("temperature 1", sp(|p| p.temperature = 1.0)),
        (
            "temperature 0.7, top_p 0.9",
            sp(|p| (p.temperature, p.top_p) = (0.7, 0.9)),
        ),
        (
            "temperature 1, top_p 0.95",
            sp(|p| (p.temperature, p.top_p) = (1.0, 0.95)),
        ),
        (
            "temperature 0.8, top_k 50",
            sp(|p| (p.temperature, p.top_k) = (0.8, 50)),
        ),
        (
            "temperature 1, min_p 0.05",
            sp(|p| (p.temperature, p.min_p) = (1.0, 0.05)),
        ),
        (
            "temperature 1, repetition 1.1",
            sp(|p| (p.temperature, p.repetition_penalty) = (1.0, 1.1)),
        ),
        (
            "temperature 1, logprobs 5",
            sp(|p| (p.temperature, p.logprobs, p.top_logprobs) = (1.0, true, 5)),
        ),
    ];
    for (name, params) in configs {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            continue;
        }
        let mut sampler = Sampler::new(&params);
        let mut per_row = f64::INFINITY;
        // Best of a few rounds over all rows (the machine is noisy).
        for _ in 0..5 {
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed() < Duration::from_millis(100) {
                for r in &rows {
                    black_box(sampler.sample(black_box(r), &history, 100));
                    n += 1;
                }
            }
            per_row = per_row.min(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        println!("{name:<34} {per_row:>10.1}");
    }
    Ok(())
}

fn sp(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(1),
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}
