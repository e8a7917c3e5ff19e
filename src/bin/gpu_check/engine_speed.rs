//! Engine output tokens/s on the CUDA backend: batch 1, 32 and 128 on the 1B shape (and the
//! default model), greedy and sampled, with the few-row products on and off.

use super::{measure, token_times, Row};
use anyhow::Result;
use kvserve::backend::cuda::{CudaBackend, CudaMatrix};
use kvserve::config::EngineSection;
use kvserve::engine::{Engine, EngineRequest, StopParams};
use kvserve::model::llama::Llama;
use kvserve::types::{SamplingParams, TenantId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One engine run: batch, temperature, the products' path (`None`: the backend's default,
/// `Some(true)`: the few-row gemv kernel up to `GEMV_MAX_ROWS` rows, `Some(false)`: cuBLAS
/// only), temperature draws on the host.
pub type Case = (usize, f32, Option<bool>, bool);

/// The 1B shape's runs: batch 1, 32 and 128 greedy (the token picked on the device); batch 32
/// and 128 at temperature 1 (OpenAI's default: drawn on the device), batch 128 again drawn on
/// the host (the row comes over); and batch 1, 2 and 8 with the products' path that is not the
/// default (1 and 2 rows: cuBLAS; 8: the gemv kernel) against the default.
pub const ONE_B_CASES: [Case; 11] = [
    (1, 0.0, None, false),
    (32, 0.0, None, false),
    (128, 0.0, None, false),
    (32, 1.0, None, false),
    (128, 1.0, None, false),
    (128, 1.0, None, true),
    (1, 0.0, Some(false), false),
    (2, 0.0, None, false),
    (2, 0.0, Some(false), false),
    (8, 0.0, None, false),
    (8, 0.0, Some(true), false),
];

/// Engine output tokens/s of `model` for each of `cases`: prompts of 128 tokens, 128 output
/// tokens each (EOS ignored). `label` names the model in the rows ("" for the 1B shape).
pub fn engine(
    model: Arc<Llama<CudaBackend>>,
    label: &str,
    cases: &[Case],
    rows: &mut Vec<Row>,
) -> Result<()> {
    let _ = std::any::type_name::<CudaMatrix>();
    let (prompt, output) = (128usize, 128usize);
    let vocab = model.config().vocab_size;
    for &(n, temperature, gemv, host_draw) in cases {
        use kvserve::backend::cuda::kernels::{GEMV_DEFAULT_ROWS, GEMV_MAX_ROWS};
        model.backend().set_gemv_max_rows(match gemv {
            None => GEMV_DEFAULT_ROWS,
            Some(true) => GEMV_MAX_ROWS,
            Some(false) => 0,
        });
        let blocks = (n * (prompt + output)).div_ceil(16) + n + 16;
        let cfg = EngineSection {
            max_batched_tokens: 4096,
            max_running: n,
            ..EngineSection::default()
        };
        let engine = Engine::single_tenant(model.clone(), blocks, &cfg)?;
        let h = engine.handle();
        let t0 = Instant::now();
        let mut subs = Vec::new();
        for i in 0..n {
            let req = EngineRequest {
                kv: kvserve::engine::request::KvChoice::default(),
                tenant: TenantId(0),
                cache_salt: None,
                prompt: (0..prompt)
                    .map(|j| ((i * 7919 + j * 104_729 + 3) % vocab) as u32)
                    .collect(),
                sampling: SamplingParams {
                    temperature,
                    seed: Some(i as u64),
                    // A top-k of the whole vocabulary draws the same tokens, on the host (the
                    // row comes over): the A/B of the device draw.
                    top_k: if host_draw { vocab } else { 0 },
                    ..SamplingParams::default()
                },
                stop: StopParams {
                    max_tokens: output,
                    ignore_eos: true,
                    ..StopParams::default()
                },
                priority: 0,
                prompt_logprobs: None,
            };
            subs.push(h.submit(req)?);
        }
        let all = token_times::token_times(subs);
        let wall = t0.elapsed().as_secs_f64();
        let stats = h.stats();
        drop(engine);
        let generated: usize = all.iter().map(Vec::len).sum();
        let decode_rate = token_times::steady_decode_rate(&all, t0);
        rows.push(measure(
            &format!(
                "{label}engine batch {n}{}{}{}: output tok/s",
                if temperature > 0.0 {
                    format!(", temperature {temperature}")
                } else {
                    String::new()
                },
                match gemv {
                    None => "",
                    Some(true) => ", gemv products",
                    Some(false) => ", cuBLAS products",
                },
                if host_draw { ", drawn on the host" } else { "" }
            ),
            generated as f64 / wall,
            "tok/s",
            &format!(
                "prompt {prompt}, output {output}, {generated} tokens in {wall:.2} s; steady decode {decode_rate:.0} tok/s; {} steps, {:.2} ms/step, forward {:.0}% of step time",
                stats.scheduler.steps,
                stats.step_seconds * 1e3 / stats.scheduler.steps.max(1) as f64,
                100.0 * stats.forward_seconds / stats.step_seconds.max(1e-9),
            ),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    model
        .backend()
        .set_gemv_max_rows(kvserve::backend::cuda::kernels::GEMV_DEFAULT_ROWS);
    Ok(())
}
