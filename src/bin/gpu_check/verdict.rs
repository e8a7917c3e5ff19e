//! How a device's forward pass is judged against the CPU's under a KV policy: the distance of a
//! token it picked from what the CPU's logits allow (`greedy_gap`, `draw_gap`), the policy's
//! quality cost against exact KV on either side (`kl_logits`), and the rule that combines them
//! (`PolicyParity::verdict`). Pure functions of logits rows; tested in `model_tests.rs` (the
//! default model's checks, run with the CPU on both sides).

/// How far a token the device picked is from what the CPU's logits allow.
#[derive(Debug, Default, Clone, Copy)]
pub struct Picks {
    pub n: usize,
    /// Picks equal to the CPU's own from its logits.
    pub same: usize,
    /// The largest [`greedy_gap`] or [`draw_gap`]: within [`TOL`](super::TOL) passes.
    pub worst: f64,
}

impl Picks {
    pub fn add(&mut self, same: bool, gap: f64) {
        self.n += 1;
        self.same += usize::from(same);
        self.worst = self.worst.max(gap);
    }
}

/// One policy's forward parity.
#[derive(Debug, Default, Clone, Copy)]
pub struct PolicyParity {
    /// Worst max-norm relative error of the logits rows (prompt rows and decode rows).
    pub logits: f64,
    pub greedy: Picks,
    pub drawn: Picks,
    /// Sums over the compared logits rows of KL(exact ‖ policy) in nats, where "exact" is the
    /// CPU with exact KV on the same tokens: the policy's quality cost on the CPU and on the
    /// device.
    pub kl_cpu: f64,
    pub kl_dev: f64,
    pub kl_rows: usize,
}

/// Largest ratio of the device's mean KL cost to the CPU's for [`PolicyParity::verdict`]'s
/// second rule (plus [`KL_FLOOR`] nats, for policies that cost next to nothing).
pub const KL_RATIO: f64 = 1.5;
pub const KL_FLOOR: f64 = 1e-4;

/// How a policy's forward parity passed, or that it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every logits row, greedy pick and draw within [`TOL`](super::TOL) of the CPU's.
    Strict,
    /// Logits or draws further off, but every greedy pick within `TOL` and the device's mean
    /// KL cost against exact KV within [`KL_RATIO`] of the CPU's: the policy's quality on the
    /// device is the CPU's. A lossy format rounds to a few levels, so inputs one bf16 rounding
    /// apart (f32 products summed in another order) can give codes a level apart, which a
    /// 30-layer model with outlier channels carries into the logits; a format or block read
    /// wrong costs far more than the policy does.
    Quality,
    Fail,
}

impl PolicyParity {
    /// The largest of the three measures: the policy passes strictly when it is within
    /// [`TOL`](super::TOL).
    pub fn worst(&self) -> f64 {
        self.logits.max(self.greedy.worst).max(self.drawn.worst)
    }

    /// Mean KL cost of the policy on the CPU and on the device.
    pub fn kl(&self) -> (f64, f64) {
        let n = self.kl_rows.max(1) as f64;
        (self.kl_cpu / n, self.kl_dev / n)
    }

    pub fn verdict(&self) -> Verdict {
        let (cpu, dev) = self.kl();
        if self.worst() <= super::TOL {
            Verdict::Strict
        } else if self.greedy.worst <= super::TOL && dev <= KL_RATIO * cpu + KL_FLOOR {
            Verdict::Quality
        } else {
            Verdict::Fail
        }
    }
}

/// KL(p ‖ q) in nats of the softmax distributions of two logits rows (f64; -inf logits carry
/// no mass). Infinite when `q` has no mass where `p` has some.
pub fn kl_logits(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&x| x as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .filter(|(a, _)| a.is_finite())
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// How far below the row's max the logit of the picked token is, relative to the row's largest
/// magnitude (the measure of
/// [`max_rel_err`](kvserve::backend::cuda::parity::max_rel_err)): 0 for the CPU's own argmax; a
/// token the logits' error could have put on top stays within the tolerance.
pub fn greedy_gap(row: &[f32], token: u32) -> f64 {
    let finite = |x: &f32| x.is_finite();
    let max = row
        .iter()
        .filter(|x| finite(x))
        .fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let scale = row
        .iter()
        .filter(|x| finite(x))
        .fold(0f64, |a, &b| a.max((b as f64).abs()));
    match row.get(token as usize) {
        Some(&x) if x.is_finite() => (max - x as f64) / scale.max(f64::MIN_POSITIVE),
        _ => f64::INFINITY,
    }
}

/// How far the uniform `u01` lies outside the picked token's share of the CPU's distribution at
/// temperature `1 / inv_t`, as a fraction of the whole (in f64, tokens in index order, as the
/// draw walks them): 0 when the CPU would draw the same token; a neighbour the logits' error
/// moved the boundary past is a small fraction, a wrong token a large one.
pub fn draw_gap(row: &[f32], inv_t: f32, u01: f64, token: u32) -> f64 {
    let max = row
        .iter()
        .filter(|x| x.is_finite())
        .fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let weight = |x: f32| {
        if x.is_finite() {
            ((x as f64 - max) * inv_t as f64).exp()
        } else {
            0.0
        }
    };
    let t = token as usize;
    if t >= row.len() {
        return f64::INFINITY;
    }
    let total: f64 = row.iter().map(|&x| weight(x)).sum();
    let lo: f64 = row[..t].iter().map(|&x| weight(x)).sum();
    let hi = lo + weight(row[t]);
    let target = u01 * total;
    (lo - target).max(target - hi).max(0.0) / total
}
