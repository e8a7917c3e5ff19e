//! Where a small-batch decode step's time goes on the 1B shape: the host issuing the forward
//! pass against the device finishing it. A step of 1–8 rows took 1.7–2.1 ms on the H200
//! (2026-11-30) where its weights take ~0.5 ms to read, and ~120 launches could cost that much on
//! either side: the host's launch calls (then CUDA graphs help) or the device's gaps between
//! short kernels (then fewer, fused launches help). These rows say which.
//!
//! Per batch: a 128-token prompt per sequence, then 32 decode steps as the engine runs them (the
//! greedy token read back, which waits for the device), then 32 that want no logits, timed at
//! `forward_step`'s return (every launch issued, none waited for) and after a synchronisation.
//! The no-logits steps skip the last norm and the LM head (one more product of 131 MB).

use super::speed::median;
use super::{measure, Row};
use anyhow::Result;
use kvserve::backend::cuda::CudaBackend;
use kvserve::kv::policy::KvPolicy;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use std::time::Instant;

/// Batch sizes measured (the few-row products' range and one above it).
const BATCHES: [usize; 3] = [1, 2, 8];
const PROMPT: usize = 128;
const STEPS: usize = 32;
const BLOCK: usize = 16;

/// One step of every sequence: `len` tokens from position `start`.
fn step<'a>(
    toks: &'a [Vec<u32>],
    tables: &'a [Vec<u32>],
    start: usize,
    len: usize,
    logits: LogitsFor,
) -> Vec<SeqStep<'a>> {
    toks.iter()
        .zip(tables)
        .map(|(t, table)| SeqStep {
            tokens: &t[start..start + len],
            start_pos: start,
            block_table: table,
            logits,
            policy: KvPolicy::EXACT,
        })
        .collect()
}

/// The rows: per batch, the host's issue time, the device's finish and the engine-style step.
pub fn run(model: &Llama<CudaBackend>, rows: &mut Vec<Row>) -> Result<()> {
    let gpu = model.backend();
    let vocab = model.config().vocab_size;
    let positions = PROMPT + 2 * STEPS;
    let per = positions.div_ceil(BLOCK);
    for n in BATCHES {
        let mut store = model.new_kv_store(n * per, BLOCK);
        let tables: Vec<Vec<u32>> = (0..n)
            .map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect())
            .collect();
        let toks: Vec<Vec<u32>> = (0..n)
            .map(|s| {
                (0..positions)
                    .map(|j| ((s * 7919 + j * 104_729 + 3) % vocab) as u32)
                    .collect()
            })
            .collect();
        model.forward_step(
            &step(&toks, &tables, 0, PROMPT, LogitsFor::None),
            &mut store,
        )?;
        gpu.synchronize();
        let mut engine = Vec::new();
        for i in 0..STEPS {
            let batch = step(&toks, &tables, PROMPT + i, 1, LogitsFor::Argmax);
            let t0 = Instant::now();
            model.forward_step(&batch, &mut store)?;
            engine.push(t0.elapsed().as_secs_f64());
        }
        let (mut issued, mut done) = (Vec::new(), Vec::new());
        for i in 0..STEPS {
            let batch = step(&toks, &tables, PROMPT + STEPS + i, 1, LogitsFor::None);
            let t0 = Instant::now();
            model.forward_step(&batch, &mut store)?;
            issued.push(t0.elapsed().as_secs_f64());
            gpu.synchronize();
            done.push(t0.elapsed().as_secs_f64());
        }
        let ms = |v: Vec<f64>| median(v) * 1e3;
        let (issued, done, engine) = (ms(issued), ms(done), ms(engine));
        rows.push(measure(
            &format!("decode step 1B, batch {n}: host issue"),
            issued * 1e3,
            "µs",
            &format!(
                "every launch of the layers issued after {issued:.3} ms, the device done at \
                 {done:.3} ms (issue {:.0}% of it); the engine's step with the token read \
                 back {engine:.3} ms; medians of {STEPS} steps",
                100.0 * issued / done.max(1e-9)
            ),
        ));
    }
    Ok(())
}
