//! Quality evaluation of KV policies against the `bf16` reference (`kvserve eval`): perplexity,
//! KL(ref ‖ policy), top-1 agreement and KV bytes per token on windows of a text, plus passkey
//! retrieval — every policy run through the paged serving path in lockstep with the reference,
//! so each position's logits rows are compared directly (research note §4, §5.10).
//!
//! Layout: `runner` (the lockstep forward through a KvPool), `metrics` (pure row math),
//! `passkey` (prompt construction), `report` (JSON / markdown / PNG). This module cuts the
//! windows, feeds the runner and accumulates.

pub mod metrics;
pub mod passkey;
pub mod report;
pub mod runner;

use crate::backend::Backend;
use crate::kv::policy::{KvPolicySpec, PolicyPart};
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use metrics::{Accumulator, RowScore};
use rayon::prelude::*;
use report::{CtxStats, EvalReport, PolicyReport, TextInfo};
use runner::{run_lockstep, PolicyRunStats, RunOptions};
use sha2::{Digest, Sha256};
use std::path::Path;

/// What to evaluate and how. Provenance strings (`text_path`, `model_id`, `command`) only go
/// into the report.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The evaluation text.
    pub text: String,
    pub text_path: String,
    /// See [`model_identity`].
    pub model_id: String,
    /// The command line, for the record.
    pub command: String,
    /// Policies to compare; `bf16` (the reference) is put first, added if missing.
    pub policies: Vec<KvPolicySpec>,
    /// Window lengths in tokens.
    pub ctx: Vec<usize>,
    pub run: RunOptions,
    /// At most this many windows per context length (all that fit when `None`).
    pub max_windows: Option<usize>,
    /// Passkey prompt lengths in tokens (each at the depths of [`passkey::DEPTHS`]).
    pub passkey: Vec<usize>,
    /// Seeds the passkey numbers.
    pub seed: u64,
}

impl EvalConfig {
    /// The CLI's defaults: ctx 512/1024/2048, chunk 64, decode tail 64, no passkey.
    pub fn new(text: String, policies: Vec<KvPolicySpec>) -> Self {
        Self {
            text,
            text_path: String::new(),
            model_id: String::new(),
            command: String::new(),
            policies,
            ctx: vec![512, 1024, 2048],
            run: RunOptions {
                chunk: 64,
                decode_tail: 64,
            },
            max_windows: None,
            passkey: Vec::new(),
            seed: 0x5eed,
        }
    }
}

/// A cheap identity for a model path: its name plus the names and sizes of its weight files
/// (hashing hundreds of MB on every run would cost more than the eval of a short text).
pub fn model_identity(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let mut files: Vec<(String, u64)> = if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .filter_map(|e| {
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().ok()?.len(),
                ))
            })
            .collect()
    } else {
        std::fs::metadata(path)
            .map(|m| vec![(name.clone(), m.len())])
            .unwrap_or_default()
    };
    files.sort();
    let files: Vec<String> = files
        .iter()
        .map(|(f, n)| format!("{f} {n} bytes"))
        .collect();
    format!("{name} [{}]", files.join(", "))
}

/// The policy list with the `bf16` reference first (added if absent) and no repeats.
pub fn with_reference(policies: &[KvPolicySpec]) -> Vec<KvPolicySpec> {
    let reference = KvPolicySpec {
        parts: vec![PolicyPart::Bf16],
    };
    let mut out = vec![reference];
    for p in policies {
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

/// Per-policy running totals of one evaluation.
struct Totals {
    /// Σ peak KV bytes and Σ tokens over every run.
    kv_bytes: Vec<usize>,
    kv_tokens: Vec<usize>,
}

impl Totals {
    fn add(&mut self, stats: &[PolicyRunStats]) {
        for (i, s) in stats.iter().enumerate() {
            self.kv_bytes[i] += s.peak_kv_bytes;
            self.kv_tokens[i] += s.tokens;
        }
    }
}

/// Runs the whole evaluation: every context length's windows, then the passkey prompts.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    let policies = with_reference(&cfg.policies);
    let n_pol = policies.len();
    let max_ctx = model.config().max_position_embeddings;
    let tokens = tokenizer.encode(&cfg.text, true)?;
    let mut ctxs = cfg.ctx.clone();
    ctxs.sort_unstable();
    ctxs.dedup();
    let mut passkey_lens = cfg.passkey.clone();
    passkey_lens.sort_unstable();
    passkey_lens.dedup();
    for &c in ctxs.iter().chain(&passkey_lens) {
        if c < 2 || c > max_ctx {
            bail!("length {c} is outside 2..={max_ctx} (the model's context)");
        }
    }
    let mut totals = Totals {
        kv_bytes: vec![0; n_pol],
        kv_tokens: vec![0; n_pol],
    };

    let mut by_ctx: Vec<Vec<(usize, Accumulator)>> = vec![Vec::new(); n_pol];
    for &c in &ctxs {
        let windows: Vec<&[u32]> = tokens
            .chunks_exact(c)
            .take(cfg.max_windows.unwrap_or(usize::MAX))
            .collect();
        if windows.is_empty() {
            bail!(
                "the text has {} tokens, fewer than one window of {c}",
                tokens.len()
            );
        }
        let mut accs = vec![Accumulator::default(); n_pol];
        for (w, window) in windows.iter().enumerate() {
            tracing::info!(ctx = c, window = w, of = windows.len(), "eval window");
            let vocab = model.config().vocab_size;
            let stats = run_lockstep(model, window, &policies, &cfg.run, |first, rows| {
                for scores in score_step(window, first, rows, vocab) {
                    for (acc, s) in accs.iter_mut().zip(scores) {
                        acc.add(s);
                    }
                }
            })?;
            totals.add(&stats);
        }
        for (i, acc) in accs.into_iter().enumerate() {
            by_ctx[i].push((c, acc));
        }
    }

    // Passkey: one key per (length, depth), the same for every policy.
    let keys = passkey::keys(cfg.seed, passkey_lens.len() * passkey::DEPTHS.len());
    let encode = |s: &str| -> Result<Vec<u32>> { Ok(tokenizer.encode(s, true)?) };
    let mut hits: Vec<Vec<(usize, Vec<bool>)>> = vec![Vec::new(); n_pol];
    for (li, &len) in passkey_lens.iter().enumerate() {
        let mut per_policy = vec![Vec::new(); n_pol];
        for (di, &depth) in passkey::DEPTHS.iter().enumerate() {
            let key = keys[li * passkey::DEPTHS.len() + di];
            let p = passkey::build(len, depth, key, &encode)?;
            tracing::info!(len, depth, tokens = p.tokens.len(), "passkey");
            // argmax per policy at the positions that predict the answer.
            let first = p.answer.start - 1;
            let mut argmax = vec![vec![u32::MAX; p.answer.len()]; n_pol];
            let vocab = model.config().vocab_size;
            let stats = run_lockstep(model, &p.tokens, &policies, &cfg.run, |start, rows| {
                for (i, row) in rows.iter().enumerate() {
                    for (r, logits) in row.chunks_exact(vocab).enumerate() {
                        let pos = start + r;
                        if (first..p.answer.end - 1).contains(&pos) {
                            argmax[i][pos - first] = metrics::argmax(logits);
                        }
                    }
                }
            })?;
            totals.add(&stats);
            for (i, am) in argmax.iter().enumerate() {
                per_policy[i].push(passkey::retrieved(&p, |pos| am[pos - first]));
            }
        }
        for (i, h) in per_policy.into_iter().enumerate() {
            hits[i].push((len, h));
        }
    }

    let bytes_per_token: Vec<f64> = (0..n_pol)
        .map(|i| totals.kv_bytes[i] as f64 / totals.kv_tokens[i].max(1) as f64)
        .collect();
    let classes = crate::engine::paged::KvClasses::for_model(model, runner::BLOCK_SIZE);
    let sealed: Vec<f64> = policies
        .iter()
        .map(|p| p.resolve().map_or(0.0, |r| classes.bytes_per_token(&r)))
        .collect();
    let reports = policies
        .iter()
        .enumerate()
        .map(|(i, p)| PolicyReport {
            sealed_bytes_per_token: sealed[i],
            sealed_reduction: 1.0 - sealed[i] / sealed[0].max(f64::MIN_POSITIVE),
            // The canonical name (`mhc:64` → `mhc:64+int8`), as the server's catalog lists it.
            name: p
                .resolve()
                .map_or_else(|_| p.to_string(), |r| r.to_string()),
            bytes_per_token: bytes_per_token[i],
            memory_reduction: 1.0 - bytes_per_token[i] / bytes_per_token[0],
            by_ctx: by_ctx[i]
                .iter()
                .zip(&by_ctx[0])
                .map(|(&(c, acc), (_, reference))| {
                    (
                        c,
                        CtxStats {
                            ppl: acc.ppl(),
                            dppl_pct: metrics::dppl_pct(acc.ppl(), reference.ppl()),
                            kl: acc.mean_kl(),
                            top1: acc.top1_rate(),
                            tokens: acc.count,
                        },
                    )
                })
                .collect(),
            passkey: hits[i].clone(),
            passkey_hits: hits[i].clone(),
        })
        .collect();
    Ok(EvalReport {
        model: cfg.model_id.clone(),
        text: TextInfo {
            path: cfg.text_path.clone(),
            sha256: format!("{:x}", Sha256::digest(cfg.text.as_bytes())),
            tokens: tokens.len(),
        },
        date: report::utc_now_iso(),
        command: cfg.command.clone(),
        passkey_depths: if passkey_lens.is_empty() {
            Vec::new()
        } else {
            passkey::DEPTHS.to_vec()
        },
        policies: reports,
    })
}

/// Scores one runner step of a window: for each position that has a next token, every
/// policy's row against the reference's (policy 0). Rows are scored in parallel and returned in
/// position order, so the sums do not depend on the thread count.
fn score_step(window: &[u32], first: usize, rows: &[&[f32]], vocab: usize) -> Vec<Vec<RowScore>> {
    let n = rows[0].len() / vocab;
    (0..n)
        .into_par_iter()
        .filter(|r| first + r + 1 < window.len())
        .map(|r| {
            let target = window[first + r + 1];
            let row = |i: usize| &rows[i][r * vocab..(r + 1) * vocab];
            let ref_row = row(0);
            let ref_lp = metrics::log_softmax(ref_row);
            (0..rows.len())
                .map(|i| metrics::score_row(ref_row, &ref_lp, row(i), target))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_comes_first_once() {
        let p = |s: &str| KvPolicySpec::parse(s).unwrap();
        let names = |v: Vec<KvPolicySpec>| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(names(with_reference(&[p("int8")])), ["bf16", "int8"]);
        assert_eq!(
            names(with_reference(&[p("int8"), p("bf16"), p("int8")])),
            ["bf16", "int8"]
        );
        assert_eq!(names(with_reference(&[])), ["bf16"]);
    }

    #[test]
    fn a_step_scores_every_position_with_a_next_token() {
        // Vocab 3, two policies, a step covering positions 2..4 of a 4-token window: only
        // position 2 has a next token (window[3] = 1).
        let window = [0u32, 1, 2, 1];
        let reference = [0.0f32, 2.0, 0.0, 5.0, 0.0, 0.0];
        let other = [0.0f32, 0.0, 2.0, 5.0, 0.0, 0.0];
        let scores = score_step(&window, 2, &[&reference, &other], 3);
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0][0].kl, 0.0);
        assert!(scores[0][0].top1_agree);
        assert!(!scores[0][1].top1_agree);
        assert!(scores[0][1].kl > 0.0);
        assert_eq!(scores[0][0].nll, -metrics::log_softmax(&reference[..3])[1]);
    }
}
