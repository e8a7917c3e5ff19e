//! Next-token selection for one sequence: logit processors (bias, penalties), greedy or
//! temperature / top-k / top-p / min-p sampling with a per-sequence seeded RNG, and logprobs.
//!
//! **Logprob convention.** `Sampled::logprob` and `Sampled::top_logprobs` are the log-softmax of
//! the RAW model logits, before logit bias, penalties, temperature and truncation. This is vLLM's
//! default (`logprobs_mode = raw_logprobs`) and what the golden tests compare: the numbers
//! describe the model, not the sampling settings.
//!
//! **Processing order** (each step only when enabled): logit_bias (added) → repetition_penalty
//! (HF: every distinct token of prompt + output; positive logits divided, others multiplied) →
//! presence / frequency penalties (OpenAI: output tokens only,
//! `logit -= presence * (count > 0) + frequency * count`) → greedy argmax when
//! `temperature < 1e-5` (ties: lowest id) → else divide by temperature → top-k → top-p
//! (smallest set, in descending probability, whose mass reaches `top_p`; never empty) → min-p
//! (drop `p < min_p * p_max`) → draw from the renormalized rest.
//!
//! NaN logits count as `-inf`. If every token is masked (all `-inf`) or some logit is `+inf`,
//! the sampler takes the greedy choice.
//!
//! Cost: O(V) per call (plus O(history) with penalties), no sort of the vocabulary: the
//! softmax passes run in vectorizable lanes with a polynomial `exp`; without top-k / top-p /
//! min-p the row is only read (its max, then per-block sums of its weights; the draw recomputes
//! one block); top-k (and top_logprobs) keep a small sorted buffer in one scan that passes over
//! most values 8 at a time; top-p gathers above a falling cut and orders only one bucket of
//! weights (see `gather_nucleus`, `apply_top_p`). Vocab-sized buffers live in the `Sampler`
//! and are reused across calls. `bench_sampler` measures each configuration on real rows.

use crate::backend::cpu::argmax::{argmax, max_lanes};
use crate::backend::cpu::draw::draw_dense_row;
use crate::types::{SamplingParams, TokenId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::HashMap;

#[path = "sampler_passes.rs"]
mod passes;
use passes::{
    apply_top_p, desc, exp_nonpos, gather_at_least, gather_nucleus, key, sum_exp, top_k_into,
    weights_in_place,
};

/// Temperatures below this are greedy.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// One sampled token with its raw-model logprobs (see the module docs for the convention).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// Raw log-softmax of the chosen token; `None` unless the request asked for logprobs.
    pub logprob: Option<f32>,
    /// `params.top_logprobs` (token, raw logprob) pairs, descending logprob, ties by lower id.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The raw logprob of `token` under `logits` and the `top` most likely alternatives (the same
/// convention as [`Sampler::sample`]); used for prompt logprobs (`echo`), where the token is
/// given rather than drawn.
pub fn score(logits: &[f32], token: TokenId, top: usize) -> Sampled {
    score_into(logits, token, top, &mut Vec::new())
}

fn score_into(
    logits: &[f32],
    token: TokenId,
    top: usize,
    cand: &mut Vec<(TokenId, f32)>,
) -> Sampled {
    let m = max_lanes(logits);
    let lse = if m.is_finite() {
        m + sum_exp(logits, m).ln() as f32
    } else {
        m
    };
    let raw_logprob = |t: TokenId| key(logits[t as usize]) - lse;
    top_k_into(logits, top, cand);
    let top_logprobs = cand.iter().map(|&(t, _)| (t, raw_logprob(t))).collect();
    Sampled {
        token,
        logprob: Some(raw_logprob(token)),
        top_logprobs,
    }
}

/// Per-sequence sampler: owns the RNG stream and reusable scratch buffers.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    /// Processed logits (bias, penalties, bans), then sampling weights when top-p or min-p
    /// need them twice; vocab-sized, reused.
    work: Vec<f32>,
    /// Sparse candidates (token, weight), reused.
    cand: Vec<(TokenId, f32)>,
    /// Per-`BLOCK` sums of the dense weights, reused.
    blocks: Vec<f64>,
    /// Tokens that must not be drawn right now (stop ids before `min_tokens`). Logprobs stay raw.
    banned: Vec<TokenId>,
    /// Penalty counts of `history[..counted]` (see [`Counts`]), kept across calls.
    counts: Counts,
}

/// The penalties' token counts, updated with each call's new tokens rather than recounted: a
/// sequence's history only grows, by one token per draw, so a draw at context n costs O(1)
/// here instead of n hash-map updates (~20 ns each).
#[derive(Default)]
struct Counts {
    /// Output tokens: their count; prompt tokens (under a repetition penalty only): 0.
    by_token: HashMap<TokenId, u32>,
    counted: usize,
    /// What the counted history ended with and where its prompt ended: a history that is not
    /// the counted one extended (another caller's, or a shorter one) is counted afresh.
    last: Option<TokenId>,
    prompt_len: usize,
}

impl Counts {
    fn update(&mut self, history: &[TokenId], prompt_len: usize, prompt_too: bool) {
        let extends = self.counted <= history.len()
            && self.prompt_len == prompt_len
            && self.counted.checked_sub(1).map(|i| history[i]) == self.last;
        if !extends {
            *self = Self {
                prompt_len,
                ..Self::default()
            };
        }
        for (i, &t) in history.iter().enumerate().skip(self.counted) {
            if i >= prompt_len {
                *self.by_token.entry(t).or_insert(0) += 1;
            } else if prompt_too {
                self.by_token.entry(t).or_insert(0);
            }
        }
        self.counted = history.len();
        self.last = history.last().copied();
    }
}

impl Sampler {
    /// A sampler for one sequence. The RNG is ChaCha20 seeded from `params.seed`, or from the OS
    /// when `None`; with a fixed seed the token sequence is reproducible.
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
            work: Vec::new(),
            cand: Vec::new(),
            blocks: Vec::new(),
            banned: Vec::new(),
            counts: Counts::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Forbids drawing `tokens` until changed (the engine bans stop ids before `min_tokens`).
    /// Reported logprobs are unaffected: they remain the raw model's.
    pub fn set_banned(&mut self, tokens: &[TokenId]) {
        self.banned.clear();
        self.banned.extend_from_slice(tokens);
    }

    /// Whether [`Self::sample`] is the plain argmax of the raw logits: greedy, with no logit
    /// bias, penalties or logprobs to compute, and (the caller's check: bans are set per call)
    /// no banned tokens. The engine then has the backend pick the token where the logits are
    /// ([`crate::backend::Backend::argmax_rows`], the same rule), and the row never reaches
    /// the sampler.
    pub fn plain_greedy(&self) -> bool {
        self.greedy() && self.raw_token_only()
    }

    /// `Some(1 / temperature)` when [`Self::sample`] is the dense temperature draw of the raw
    /// logits ([`draw_dense_row`]): sampling with the whole vocabulary in play (no top-k,
    /// top-p or min-p: OpenAI's default request), no logit bias, penalties or logprobs, and
    /// (the caller's check) no banned tokens. The engine then has the backend draw the token
    /// where the logits are ([`crate::backend::Backend::draw_rows`], the same rule), with the
    /// uniform from [`Self::peek_uniform`], and the row never reaches the sampler.
    pub fn dense_draw(&self) -> Option<f32> {
        (!self.greedy()
            // Any top-k counts (the vocabulary size is not known here; a top-k at or above it
            // draws the same on the host).
            && !self.whole_vocab_narrowed(usize::MAX)
            && self.raw_token_only())
        .then_some(1.0 / self.params.temperature)
    }

    /// Whether the token is the argmax (temperature below [`GREEDY_TEMPERATURE`], or NaN).
    fn greedy(&self) -> bool {
        let t = self.params.temperature;
        t.is_nan() || t < GREEDY_TEMPERATURE
    }

    /// Whether the request needs only a token of the raw logits: no logit bias or penalties
    /// to apply, no logprobs to report.
    fn raw_token_only(&self) -> bool {
        let p = &self.params;
        !self.rewrites() && !p.logprobs && p.top_logprobs == 0
    }

    /// The uniform the next draw will use, without using it up: a draw made elsewhere
    /// ([`Self::dense_draw`]) takes it, and [`Self::commit_uniform`] then advances the RNG, so a
    /// seeded stream is the same whoever draws.
    pub fn peek_uniform(&self) -> f64 {
        self.rng.clone().random::<f64>()
    }

    /// Uses up the uniform [`Self::peek_uniform`] returned (its draw was made elsewhere).
    pub fn commit_uniform(&mut self) {
        let _ = self.rng.random::<f64>();
    }

    /// Whether top-k, top-p or min-p leave only part of a vocabulary of `v` tokens in play.
    fn whole_vocab_narrowed(&self, v: usize) -> bool {
        let p = &self.params;
        (p.top_k > 0 && p.top_k < v) || p.top_p < 1.0 || p.min_p > 0.0
    }

    /// (repetition penalty, presence / frequency penalties): which penalties are enabled.
    fn penalties(&self) -> (bool, bool) {
        let p = &self.params;
        let rep = p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0;
        let additive = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        (rep, additive)
    }

    /// Whether the request's logit processors (bias, penalties) change the logits.
    fn rewrites(&self) -> bool {
        let (rep, additive) = self.penalties();
        !self.params.logit_bias.is_empty() || rep || additive
    }

    /// Picks the next token. `history` is prompt + generated tokens so far; the generated part
    /// is `history[prompt_len..]`. `logits` has one entry per vocabulary token.
    pub fn sample(&mut self, logits: &[f32], history: &[TokenId], prompt_len: usize) -> Sampled {
        assert!(!logits.is_empty(), "sampler: empty logits");
        let processed = self.process(logits, history, prompt_len);
        let token = if self.greedy() {
            argmax(if processed { &self.work } else { logits }) as TokenId
        } else {
            self.sample_stochastic(processed, logits)
        };

        if !self.params.logprobs && self.params.top_logprobs == 0 {
            return Sampled {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            };
        }
        score_into(logits, token, self.params.top_logprobs, &mut self.cand)
    }

    /// Applies bias and penalties into `self.work`. Returns false (and leaves `work` untouched)
    /// when none is enabled, so the greedy path can read the logits directly.
    fn process(&mut self, logits: &[f32], history: &[TokenId], prompt_len: usize) -> bool {
        if !self.rewrites() && self.banned.is_empty() {
            return false;
        }
        let (rep, additive) = self.penalties();
        let p = &self.params;
        self.work.clear();
        self.work.extend(logits.iter().copied().map(key));
        let w = &mut self.work;
        for &(t, b) in &p.logit_bias {
            if let Some(x) = w.get_mut(t as usize) {
                *x += b;
            }
        }
        if rep || additive {
            // Counts of output tokens; prompt-only tokens get 0 (they still receive the
            // repetition penalty but not the OpenAI penalties).
            self.counts.update(history, prompt_len, rep);
            for (&t, &c) in &self.counts.by_token {
                let Some(x) = w.get_mut(t as usize) else {
                    continue;
                };
                if rep {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
                if additive && c > 0 {
                    *x -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &t in &self.banned {
            if let Some(x) = w.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        true
    }

    /// Temperature, top-k, top-p, min-p and the draw, over the processed logits in `self.work`
    /// (`processed`) or the raw row. Weights are `exp((l - max) / T)`, so the most likely token
    /// weighs exactly 1; NaN weighs 0.
    ///
    /// With the whole vocabulary in play (no top-k, top-p or min-p: OpenAI's default) the row
    /// is only read, twice (its max, then the per-block sums of its weights), and the draw
    /// recomputes the weights of the one block it lands in. Top-p and min-p read each weight
    /// twice (the total, then the candidates), so those write the weights into `work` once.
    fn sample_stochastic(&mut self, processed: bool, logits: &[f32]) -> TokenId {
        let (top_k, top_p, min_p) = (self.params.top_k, self.params.top_p, self.params.min_p);
        let inv_t = 1.0 / self.params.temperature;
        let xs = if processed { &self.work[..] } else { logits };
        let v = xs.len();
        if !self.whole_vocab_narrowed(v) {
            // The uniform first, whatever the row holds: a draw on the device takes it before
            // the step (`dense_draw`), and both must use up the same numbers.
            let u01 = self.rng.random::<f64>();
            return draw_dense_row(xs, inv_t, u01, &mut self.blocks);
        }
        let m = max_lanes(xs);
        if !m.is_finite() {
            return argmax(xs) as TokenId;
        }
        let weight = |x: f32| exp_nonpos((x - m) * inv_t);
        // `sparse`: the candidates are in `cand`; else the weights are in `work`.
        let mut sparse = top_k > 0 && top_k < v;
        let mut total = if sparse {
            top_k_into(xs, top_k, &mut self.cand);
            self.cand.retain_mut(|c| {
                c.1 = weight(c.1);
                c.1 > 0.0
            });
            self.cand.iter().map(|c| f64::from(c.1)).sum()
        } else {
            if !processed {
                self.work.clear();
                self.work.extend_from_slice(logits);
            }
            weights_in_place(&mut self.work, m, inv_t, &mut self.blocks)
        };
        if top_p < 1.0 {
            total = if sparse {
                apply_top_p(&mut self.cand, top_p, total)
            } else {
                gather_nucleus(&self.work, top_p, total, &mut self.cand)
            };
            sparse = true;
        }
        if min_p > 0.0 {
            let cut = min_p.min(1.0); // p / p_max = weight; the top token (weight 1) stays
            if sparse {
                self.cand.retain(|c| c.1 >= cut);
            } else {
                gather_at_least(&self.work, cut, &mut self.cand);
            }
            total = self.cand.iter().map(|c| f64::from(c.1)).sum();
        }
        let mut u = self.rng.random::<f64>() * total;
        for &(t, w) in &self.cand {
            u -= f64::from(w);
            if u < 0.0 {
                return t;
            }
        }
        // Round-off put the draw past the end (probability ~1e-16): take the likeliest token.
        self.cand.iter().copied().min_by(desc).map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::passes::tests::{logits, ref_nucleus};
    use super::passes::*;
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    /// Reference argmax: first index of the maximum.
    fn ref_argmax(l: &[f32]) -> TokenId {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        l.iter().position(|&x| x == m).unwrap() as TokenId
    }

    /// Reference log-sum-exp in f64 with the standard library's `exp`.
    fn ref_lse(l: &[f32]) -> f32 {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = l.iter().map(|&x| (f64::from(x) - f64::from(m)).exp()).sum();
        (f64::from(m) + s.ln()) as f32
    }

    fn draw_counts(p: &SamplingParams, l: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut counts = vec![0; l.len()];
        for _ in 0..n {
            counts[s.sample(l, &[], 0).token as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let l = logits(49152, 1);
        let mut s = Sampler::new(&params(|_| {}));
        assert_eq!(s.sample(&l, &[], 0).token, ref_argmax(&l));
        let tie = [1.0, 3.0, 0.5, 3.0];
        assert_eq!(s.sample(&tie, &[], 0).token, 1);
        let with_nan = [f32::NAN, 0.5, 2.0];
        assert_eq!(s.sample(&with_nan, &[], 0).token, 2);
    }

    #[test]
    fn seed_makes_sequences_reproducible() {
        let run = |seed| {
            let mut s = Sampler::new(&params(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed);
            }));
            (0..200u32)
                .map(|i| s.sample(&logits(1000, i % 7), &[], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let l = logits(49152, 3);
        let best = ref_argmax(&l);
        for t in [0.5, 1.0, 5.0] {
            let mut k1 = Sampler::new(&params(|p| (p.temperature, p.top_k) = (t, 1)));
            let mut p0 = Sampler::new(&params(|p| (p.temperature, p.top_p) = (t, 1e-6)));
            for _ in 0..50 {
                assert_eq!(k1.sample(&l, &[], 0).token, best);
                assert_eq!(p0.sample(&l, &[], 0).token, best);
            }
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let k2 = draw_counts(&params(|p| (p.temperature, p.top_k) = (1.0, 2)), &l, 4000);
        assert_eq!((k2[2], k2[3]), (0, 0));
        // Cumulative 0.4 < 0.65 <= 0.7: the nucleus is {0, 1}, renormalized to 4/7, 3/7.
        let c = draw_counts(
            &params(|p| (p.temperature, p.top_p) = (1.0, 0.65)),
            &l,
            20_000,
        );
        assert_eq!((c[2], c[3]), (0, 0));
        let f0 = c[0] as f64 / 20_000.0;
        assert!((f0 - 4.0 / 7.0).abs() < 0.02, "{f0}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        // Cut at 0.5 * 0.5 = 0.25: token 2 (0.2) goes, token 1 (0.3) stays.
        let c = draw_counts(&params(|p| (p.temperature, p.min_p) = (1.0, 0.5)), &l, 5000);
        assert_eq!(c[2], 0);
        assert!(c[1] > 1000, "{c:?}");
        // Cut at 0.35: only the top token.
        let c = draw_counts(&params(|p| (p.temperature, p.min_p) = (1.0, 0.7)), &l, 2000);
        assert_eq!(c[0], 2000);
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output() {
        let mut s = Sampler::new(&params(|p| p.repetition_penalty = 1.3));
        // 2.0 / 1.3 = 1.54 < 1.9: the seen token loses, whether seen in the prompt or output.
        let l = [2.0, 1.9, -1.0];
        assert_eq!(s.sample(&l, &[], 0).token, 0);
        assert_eq!(s.sample(&l, &[0], 1).token, 1);
        assert_eq!(s.sample(&l, &[2, 0], 1).token, 1);
        // Negative logits are multiplied: -1.0 * 1.3 = -1.3 < -1.2.
        let neg = [-1.0, -1.2];
        assert_eq!(s.sample(&neg, &[0], 1).token, 1);
    }

    #[test]
    fn presence_and_frequency_penalties_cover_output_only() {
        let l = [2.0, 1.9];
        let mut s = Sampler::new(&params(|p| p.presence_penalty = 0.5));
        assert_eq!(
            s.sample(&l, &[0], 1).token,
            0,
            "prompt tokens are not penalized"
        );
        assert_eq!(s.sample(&l, &[1, 0], 1).token, 1);

        let l = [2.0, 1.5];
        let mut s = Sampler::new(&params(|p| p.frequency_penalty = 0.2));
        assert_eq!(s.sample(&l, &[9, 0], 1).token, 0); // 2.0 - 0.2 = 1.8
        assert_eq!(s.sample(&l, &[9, 0, 0, 0], 1).token, 1); // 2.0 - 0.6 = 1.4
    }

    #[test]
    fn logit_bias_forces_a_token_and_logprobs_stay_raw() {
        let l = logits(1000, 5);
        let p = params(|p| {
            p.temperature = 1.0;
            p.logprobs = true;
            p.logit_bias = vec![(3, 100.0), (5000, 1.0)]; // out-of-range ids are ignored
        });
        let mut s = Sampler::new(&p);
        let lse = ref_lse(&l);
        for _ in 0..100 {
            let out = s.sample(&l, &[], 0);
            assert_eq!(out.token, 3);
            assert!((out.logprob.unwrap() - (l[3] - lse)).abs() < 1e-5);
        }
        let mut ban = Sampler::new(&params(|p| p.logit_bias = vec![(ref_argmax(&l), -1e9)]));
        assert_ne!(ban.sample(&l, &[], 0).token, ref_argmax(&l));
    }

    #[test]
    fn logprobs_are_computed_only_when_asked_for() {
        let l = logits(1000, 6);
        let lse = ref_lse(&l);
        for temperature in [0.0, 0.8] {
            let quiet = Sampler::new(&params(|p| {
                p.temperature = temperature;
                p.seed = Some(3);
            }))
            .sample(&l, &[], 0);
            assert_eq!((quiet.logprob, quiet.top_logprobs.len()), (None, 0));
            let asked = Sampler::new(&params(|p| {
                p.temperature = temperature;
                p.seed = Some(3);
                p.logprobs = true;
            }))
            .sample(&l, &[], 0);
            // The same draw either way; the logprob is the raw model's.
            assert_eq!(asked.token, quiet.token);
            let want = l[asked.token as usize] - lse;
            assert!((asked.logprob.unwrap() - want).abs() < 1e-5);
        }
    }

    #[test]
    fn temperature_one_matches_the_model_distribution() {
        let probs = [0.5f64, 0.3, 0.2];
        let l: Vec<f32> = probs.iter().map(|p| p.ln() as f32 + 3.0).collect();
        let n = 20_000;
        let c = draw_counts(&params(|p| p.temperature = 1.0), &l, n);
        for (i, p) in probs.iter().enumerate() {
            let f = c[i] as f64 / n as f64;
            // 4.5 standard deviations at most; the seed is fixed so this cannot flake.
            assert!((f - p).abs() < 0.016, "token {i}: {f} vs {p}");
        }
    }

    #[test]
    fn logprobs_are_normalized_and_ordered() {
        let mut l = logits(500, 9);
        l[10] = l[11]; // a tie
        l[7] = f32::NEG_INFINITY;
        let p = params(|p| {
            p.temperature = 0.7;
            p.top_logprobs = 500;
        });
        let out = Sampler::new(&p).sample(&l, &[], 0);
        assert_eq!(out.top_logprobs.len(), 500);
        let mass: f64 = out.top_logprobs.iter().map(|x| f64::from(x.1).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-4, "{mass}");
        for w in out.top_logprobs.windows(2) {
            assert!(
                w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0),
                "{w:?}"
            );
        }
        let own = out.top_logprobs.iter().find(|x| x.0 == out.token).unwrap();
        assert_eq!(Some(own.1), out.logprob);

        let p5 = params(|p| p.top_logprobs = 5);
        let top5 = Sampler::new(&p5).sample(&l, &[], 0).top_logprobs;
        assert_eq!(top5[..], out.top_logprobs[..5]);
        assert_eq!(top5[0].0, ref_argmax(&l));
    }

    #[test]
    fn plain_greedy_is_the_raw_argmax_and_only_without_processors_or_logprobs() {
        let l = logits(1000, 9);
        let mut plain = Sampler::new(&params(|_| {}));
        assert!(plain.plain_greedy());
        let out = plain.sample(&l, &[1, 2, 3], 1);
        assert_eq!(out.token as usize, argmax(&l));
        assert_eq!((out.logprob, out.top_logprobs.len()), (None, 0));
        for p in [
            params(|p| p.temperature = 0.7),
            params(|p| p.logprobs = true),
            params(|p| p.top_logprobs = 2),
            params(|p| p.repetition_penalty = 1.1),
            params(|p| p.presence_penalty = 0.5),
            params(|p| p.frequency_penalty = 0.5),
            params(|p| p.logit_bias = vec![(3, 1.0)]),
        ] {
            assert!(!Sampler::new(&p).plain_greedy(), "{p:?}");
        }
    }

    /// The draw made where the logits are (the engine peeks the uniform, the backend draws with
    /// `draw_dense_row`, the engine then uses the uniform up) gives the tokens the sampler draws
    /// itself, step for step, also after a row with no finite max (which still uses a uniform);
    /// only temperature-only requests qualify.
    #[test]
    fn dense_draw_elsewhere_uses_the_samplers_own_uniforms() {
        let p = params(|p| {
            p.temperature = 0.8;
            p.seed = Some(7);
        });
        let (mut host, mut split) = (Sampler::new(&p), Sampler::new(&p));
        let inv_t = split.dense_draw().expect("temperature only");
        assert_eq!(inv_t, 1.0 / 0.8);
        let masked = [f32::NEG_INFINITY; 600];
        let mut rows: Vec<Vec<f32>> = (0..40).map(|i| logits(600, i)).collect();
        rows[4] = masked.to_vec();
        rows[10][17] = f32::INFINITY;
        let mut blocks = Vec::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, row) in rows.iter().enumerate() {
            a.push(host.sample(row, &[], 0).token);
            if i % 3 == 0 {
                // Every third step on the host, as a step with prompt logprobs would.
                b.push(split.sample(row, &[], 0).token);
                continue;
            }
            let u = split.peek_uniform();
            assert_eq!(u, split.peek_uniform(), "a peek uses nothing up");
            b.push(draw_dense_row(row, inv_t, u, &mut blocks));
            split.commit_uniform();
        }
        assert_eq!(a, b);
        assert_eq!((a[4], a[10]), (0, 17));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 20);
        for q in [
            params(|p| p.temperature = 0.0),
            params(|p| p.top_p = 0.9),
            params(|p| p.top_k = 5),
            params(|p| p.min_p = 0.1),
            params(|p| p.logprobs = true),
            params(|p| p.top_logprobs = 1),
            params(|p| p.repetition_penalty = 1.1),
            params(|p| p.frequency_penalty = 0.5),
            params(|p| p.logit_bias = vec![(3, 1.0)]),
        ] {
            let q = SamplingParams {
                temperature: if q.temperature == 0.0 { 0.0 } else { 0.8 },
                ..q
            };
            assert_eq!(Sampler::new(&q).dense_draw(), None, "{q:?}");
        }
    }

    #[test]
    fn fully_masked_logits_fall_back_to_lowest_id() {
        let l = [f32::NEG_INFINITY; 4];
        let out = Sampler::new(&params(|p| p.temperature = 1.0)).sample(&l, &[], 0);
        assert_eq!(out.token, 0);
    }

    #[test]
    fn large_vocab_paths_sample_the_right_tokens() {
        // Four live tokens spread over several 256-token blocks; everything else masked.
        let mut l = vec![f32::NEG_INFINITY; 1000];
        let live = [(5usize, 0.4f64), (300, 0.3), (700, 0.2), (999, 0.1)];
        for &(i, p) in &live {
            l[i] = p.ln() as f32;
        }
        let n = 20_000;
        for p in [
            params(|p| p.temperature = 1.0),
            params(|p| (p.temperature, p.top_k) = (1.0, 100)),
            params(|p| (p.temperature, p.top_k) = (1.0, 10)),
        ] {
            let c = draw_counts(&p, &l, n);
            assert_eq!(c.iter().sum::<usize>(), n);
            for &(i, want) in &live {
                let f = c[i] as f64 / n as f64;
                assert!((f - want).abs() < 0.016, "token {i}: {f} vs {want} ({p:?})");
            }
        }
    }
    #[test]
    fn top_p_draws_cover_the_whole_nucleus_in_proportion() {
        // A flat row: the nucleus at 0.9 holds thousands of tokens, far below the first cut.
        let l = logits(49_157, 3);
        let mut w = l.clone();
        let total = weights_in_place(&mut w, max_lanes(&l), 1.0, &mut Vec::new());
        let nucleus = ref_nucleus(&w, 0.9, total);
        assert!(nucleus.len() > 5000, "{}", nucleus.len());
        let mut ranked: Vec<(TokenId, f32)> = nucleus.iter().map(|&i| (i, w[i as usize])).collect();
        ranked.sort_by(desc);
        let light = &ranked[ranked.len() / 2..];
        let share = light.iter().map(|c| f64::from(c.1)).sum::<f64>()
            / ranked.iter().map(|c| f64::from(c.1)).sum::<f64>();
        let light: std::collections::HashSet<TokenId> = light.iter().map(|c| c.0).collect();
        let n = 20_000;
        let c = draw_counts(&params(|p| (p.temperature, p.top_p) = (1.0, 0.9)), &l, n);
        let inside: usize = nucleus.iter().map(|&i| c[i as usize]).sum();
        assert_eq!(inside, n, "every draw is in the nucleus");
        let got = light.iter().map(|&i| c[i as usize]).sum::<usize>() as f64 / n as f64;
        assert!((got - share).abs() < 0.02, "lighter half: {got} vs {share}");
    }

    #[test]
    fn penalty_counts_kept_across_calls_equal_a_fresh_count() {
        let p = params(|p| {
            p.repetition_penalty = 1.3;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let l = logits(500, 4);
        let mut kept = Sampler::new(&p);
        let mut history: Vec<TokenId> = (0..40).map(|i| (i * 7 % 50) as TokenId).collect();
        let processed = |s: &mut Sampler, h: &[TokenId], prompt_len: usize| {
            assert!(s.process(&l, h, prompt_len));
            s.work.clone()
        };
        for step in 0..60u32 {
            let fresh = processed(&mut Sampler::new(&p), &history, 40);
            assert_eq!(processed(&mut kept, &history, 40), fresh, "step {step}");
            if step % 7 != 3 {
                // (every 7th call sees the same history again: nothing new to count)
                history.push((step * 13 % 70) as TokenId);
            }
        }
        // Not the counted history extended: a longer other one, a shorter one, another prompt.
        let other: Vec<TokenId> = (0..120).map(|i| (i * 3 % 40) as TokenId).collect();
        for (h, prompt_len) in [(&other[..], 40), (&other[..50], 40), (&other[..], 60)] {
            let fresh = processed(&mut Sampler::new(&p), h, prompt_len);
            assert_eq!(processed(&mut kept, h, prompt_len), fresh);
        }
    }
}
