//! Engine throughput and latency without HTTP: N concurrent requests (distinct prompts of
//! `--prompt` tokens, `--output` tokens each, EOS ignored) submitted at once, for each N in
//! `--concurrency`. Prints per level: output tokens/s over the whole run (prompts included),
//! output tokens/s once every stream is decoding (from the last first token to the end), steps
//! and mean step time, time to first token and inter-token latency (p50 / p99).
//!
//! Usage: `cargo run --release --bin bench_engine -- [--concurrency 1,4,16,64] [--prompt 256]
//! [--output 128] [--max-batched-tokens 256] [--model DIR] [--logprobs] [--temperature 1]
//! [--top-p 0.9] [--top-k 50]`

#[path = "bench_common/token_times.rs"]
mod token_times;

use anyhow::{Context, Result};
use clap::Parser;
use kvserve::backend::cpu::CpuBackend;
use kvserve::config::EngineSection;
use kvserve::engine::{Engine, EngineRequest, StopParams};
use kvserve::model::llama::Llama;
use kvserve::model::loader;
use kvserve::types::{SamplingParams, TenantId};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct")]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 256)]
    prompt: usize,
    #[arg(long, default_value_t = 128)]
    output: usize,
    #[arg(long, default_value_t = EngineSection::default().max_batched_tokens)]
    max_batched_tokens: usize,
    /// The first N prompt tokens are the same for every request (a shared system prompt):
    /// shows the prefix computed once and hit by the others.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Ask for each generated token's logprob (a client's `logprobs: true`): one more softmax
    /// pass over the vocabulary per token.
    #[arg(long)]
    logprobs: bool,
    /// Sampling temperature (0 = greedy, the default here; OpenAI's HTTP default is 1).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files =
        loader::open(args.model.as_ref()).with_context(|| format!("opening {}", args.model))?;
    let model = Arc::new(Llama::from_files(&files, CpuBackend::new())?);
    let text = std::fs::read_to_string("README.md")?;
    let corpus = files.tokenizer.encode(&text, false)?;
    println!(
        "prompt {} tokens ({} shared), output {} tokens, max_batched_tokens {}, {} threads",
        args.prompt,
        args.shared_prefix.min(args.prompt),
        args.output,
        args.max_batched_tokens,
        rayon::current_num_threads()
    );
    println!(
        "concurrency  out_tok/s  decode_tok/s  wall_s  steps  ms/step  ttft_p50_s  ttft_p99_s  itl_p50_ms  itl_p99_ms"
    );
    for &n in &args.concurrency {
        let tokens_needed = n * (args.prompt + args.output);
        let blocks = tokens_needed.div_ceil(16) + n + 16;
        let cfg = EngineSection {
            max_batched_tokens: args.max_batched_tokens,
            max_running: n.max(1),
            ..EngineSection::default()
        };
        let engine = Engine::single_tenant(model.clone(), blocks, &cfg)?;
        let h = engine.handle();
        let t0 = Instant::now();
        let mut subs = Vec::new();
        for i in 0..n {
            // Distinct prompts (different corpus offsets), after a shared prefix if asked.
            let shared = args.shared_prefix.min(args.prompt);
            let prompt = corpus
                .iter()
                .copied()
                .cycle()
                .take(shared)
                .chain(
                    corpus
                        .iter()
                        .copied()
                        .cycle()
                        .skip(7 + i * 131)
                        .take(args.prompt - shared),
                )
                .collect();
            let req = EngineRequest {
                kv: kvserve::engine::request::KvChoice::default(),
                tenant: TenantId(0),
                cache_salt: None,
                prompt,
                sampling: SamplingParams {
                    logprobs: args.logprobs,
                    temperature: args.temperature,
                    top_p: args.top_p,
                    top_k: args.top_k,
                    seed: Some(i as u64),
                    ..SamplingParams::default()
                },
                stop: StopParams {
                    max_tokens: args.output,
                    ignore_eos: true,
                    ..StopParams::default()
                },
                priority: 0,
                prompt_logprobs: None,
            };
            subs.push(h.submit(req)?);
        }
        let all = token_times::token_times(subs);
        let wall = t0.elapsed();
        let stats = h.stats();
        drop(engine);
        let generated: usize = all.iter().map(Vec::len).sum();
        let mut ttft: Vec<f64> = all.iter().map(|t| (t[0] - t0).as_secs_f64()).collect();
        let mut itl: Vec<f64> = all
            .iter()
            .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3))
            .collect();
        let steps = stats.scheduler.steps.max(1);
        let decode_rate = token_times::steady_decode_rate(&all, t0);
        println!(
            "{:>11}  {:>9.1}  {:>12.1}  {:>6.2}  {:>5}  {:>7.1}  {:>10.2}  {:>10.2}  {:>10.1}  {:>10.1}",
            n,
            generated as f64 / wall.as_secs_f64(),
            decode_rate,
            wall.as_secs_f64(),
            steps,
            wall.as_secs_f64() * 1e3 / steps as f64,
            percentile(&mut ttft, 0.5),
            percentile(&mut ttft, 0.99),
            percentile(&mut itl, 0.5),
            percentile(&mut itl, 0.99),
        );
        println!(
            "             forward {:.1}% of step time ({:.2} ms/step outside it: scheduling, sampling, events), steps {:.1}% of wall time, {} tokens computed, {} prefix-hit tokens",
            100.0 * stats.forward_seconds / stats.step_seconds.max(1e-9),
            (stats.step_seconds - stats.forward_seconds) * 1e3 / steps as f64,
            100.0 * stats.step_seconds / wall.as_secs_f64(),
            stats.tokens_computed,
            stats.kv.as_ref().map_or(0, |kv| kv.tenants.iter().map(|t| t.1.prefix_hit_tokens).sum::<u64>()),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
