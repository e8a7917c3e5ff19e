//! Pure per-row quality metrics (f64 log-softmax, NLL, KL, argmax) and their accumulator. Nothing
//! here knows about models or policies: a row is a logits slice, the reference is another.

/// `log_softmax(logits)` in f64 (max-subtracted, so no overflow for any finite input).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&v| f64::from(v) - log_z).collect()
}

/// Negative log-likelihood of `target` under the log-probabilities `lp`.
pub fn nll(lp: &[f64], target: u32) -> f64 {
    -lp[target as usize]
}

/// `KL(p ‖ q) = Σ p · (log p − log q)` over the whole vocabulary, from log-probabilities.
/// Exactly 0 when `lp == lq` (every term is `p · 0`); a term with `p = 0` counts 0.
pub fn kl(lp: &[f64], lq: &[f64]) -> f64 {
    debug_assert_eq!(lp.len(), lq.len());
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| {
            if a == b || a == f64::NEG_INFINITY {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum()
}

/// Index of the largest logit; the first one on ties (as the greedy sampler picks).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// One predicted position of one policy, compared with the reference's row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore {
    pub nll: f64,
    pub kl: f64,
    pub top1_agree: bool,
}

/// Scores a policy row against the reference row for the next token `target`. `ref_lp` is
/// `log_softmax(ref_row)`, computed once per position and shared by every policy.
pub fn score_row(ref_row: &[f32], ref_lp: &[f64], row: &[f32], target: u32) -> RowScore {
    let lp = log_softmax(row);
    RowScore {
        nll: nll(&lp, target),
        kl: kl(ref_lp, &lp),
        top1_agree: argmax(row) == argmax(ref_row),
    }
}

/// Running sums over predicted positions (one per policy and context length).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accumulator {
    pub nll_sum: f64,
    pub kl_sum: f64,
    pub top1: usize,
    pub count: usize,
}

impl Accumulator {
    pub fn add(&mut self, s: RowScore) {
        self.nll_sum += s.nll;
        self.kl_sum += s.kl;
        self.top1 += usize::from(s.top1_agree);
        self.count += 1;
    }

    /// `exp(mean NLL)`; NaN with no positions.
    pub fn ppl(&self) -> f64 {
        (self.nll_sum / self.count as f64).exp()
    }

    /// Mean KL(ref ‖ policy) per position.
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.count as f64
    }

    /// Fraction of positions whose argmax matches the reference's.
    pub fn top1_rate(&self) -> f64 {
        self.top1 as f64 / self.count as f64
    }
}

/// Relative perplexity change in percent: `100 · (ppl / ref_ppl − 1)`.
pub fn dppl_pct(ppl: f64, ref_ppl: f64) -> f64 {
    100.0 * (ppl / ref_ppl - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn log_softmax_normalizes_and_matches_closed_form() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!(close(lp[0], 1.0 - z) && close(lp[2], 3.0 - z));
        assert!(close(lp.iter().map(|v| v.exp()).sum::<f64>(), 1.0));
        // Large logits do not overflow.
        let lp = log_softmax(&[1000.0, 1000.0]);
        assert!(close(lp[0], -(2f64.ln())));
    }

    #[test]
    fn nll_of_uniform_is_log_vocab() {
        let lp = log_softmax(&[0.5; 8]);
        assert!(close(nll(&lp, 3), 8f64.ln()));
    }

    #[test]
    fn kl_is_zero_on_itself_positive_otherwise_and_matches_a_hand_value() {
        let p = log_softmax(&[0.1, -2.0, 3.5, 0.0]);
        assert_eq!(kl(&p, &p), 0.0);
        let q = log_softmax(&[0.1, -2.0, 3.4, 0.2]);
        assert!(kl(&p, &q) > 0.0);
        // Two outcomes: p = (0.5, 0.5), q = (e/(1+e), 1/(1+e)).
        let p = log_softmax(&[0.0, 0.0]);
        let q = log_softmax(&[1.0, 0.0]);
        let qa = 1f64.exp() / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5 / qa).ln() + 0.5 * (0.5 / (1.0 - qa)).ln();
        assert!(close(kl(&p, &q), want));
    }

    #[test]
    fn argmax_takes_the_first_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn accumulator_means() {
        let r = [0.0f32, 1.0, 0.0];
        let lp = log_softmax(&r);
        let mut a = Accumulator::default();
        a.add(score_row(&r, &lp, &r, 1));
        a.add(score_row(&r, &lp, &[0.0, 0.0, 5.0], 1));
        assert_eq!(a.count, 2);
        assert_eq!(a.top1, 1);
        assert!(close(a.top1_rate(), 0.5));
        assert!(a.mean_kl() > 0.0);
        let want_nll = (nll(&lp, 1) + nll(&log_softmax(&[0.0, 0.0, 5.0]), 1)) / 2.0;
        assert!(close(a.ppl(), want_nll.exp()));
        assert!(close(dppl_pct(11.0, 10.0), 10.0));
    }
}
