//! The greedy choice over a row of logits: the index of the largest value, NaN counted as
//! `-inf`, ties to the lowest index, 0 when nothing is above `-inf`. One definition for the
//! engine's sampler and for [`crate::backend::Backend::argmax_rows`] (which picks greedy tokens
//! where the logits are, so a GPU does not ship whole rows to the host), and the rule the CUDA
//! kernel (`kernels/sampling.cu`) follows: the result is the same whichever computes it.

use super::simd::avx2_twin;

/// Lanes of the max reduction (8 f32 = one AVX2 register).
const L: usize = 8;

avx2_twin!(
    /// Largest value of `xs`, NaN ignored (`-inf` for none).
    pub fn max_lanes(xs: &[f32]) -> f32 => max_lanes_portable
);

/// [`max_lanes`] as the generic build compiles it (tests compare the twins' bits).
#[inline(always)]
pub(crate) fn max_lanes_portable(xs: &[f32]) -> f32 {
    // Four independent accumulators: a NaN-ignoring max is a compare-and-blend chain several
    // cycles long, and one accumulator would wait on it at every step.
    const W: usize = 4 * L;
    let chunks = xs.chunks_exact(W);
    let tail = chunks.remainder();
    let mut mx = [f32::NEG_INFINITY; W];
    for c in chunks {
        for j in 0..W {
            mx[j] = mx[j].max(c[j]); // f32::max ignores NaN
        }
    }
    tail.iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Index of the largest value; ties resolve to the lowest index; 0 when all are `-inf` / NaN.
pub fn argmax(xs: &[f32]) -> usize {
    let m = max_lanes(xs);
    if m == f32::NEG_INFINITY {
        return 0;
    }
    xs.iter().position(|&x| x == m).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_counts_nan_as_minus_infinity() {
        let (n, inf) = (f32::NAN, f32::INFINITY);
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1); // ties: lowest index
        assert_eq!(argmax(&[n, -5.0, n, -4.0, -4.0]), 3);
        assert_eq!(argmax(&[n, n, n]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, n]), 0);
        assert_eq!(argmax(&[1.0, inf, 2.0, inf]), 1);
        // -0 == 0: the first of them.
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        // Past the vector lanes: the maximum in the tail of a length that is not a multiple
        // of 8, and a tie between the lanes and the tail.
        let mut xs: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        xs[1001] = 7.5;
        assert_eq!(argmax(&xs), 1001);
        xs[8] = 7.5;
        assert_eq!(argmax(&xs), 8);
    }
}
