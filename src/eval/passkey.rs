//! Passkey retrieval prompts: neutral filler with one "pass key" sentence at a given depth, then
//! the question and the teacher-forced answer. The answer's token positions are found by
//! tokenizing the prompt with and without the answer, so nothing assumes how the tokenizer
//! splits digits (SmolLM2 splits `" 12345"` into `" "` and one token per digit).

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use std::ops::Range;

/// One neutral filler unit, repeated to reach the wanted length.
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
/// The question that ends every prompt; the answer `" NNNNN"` follows it.
pub const QUESTION: &str = "What is the pass key? The pass key is";
/// Where the needle goes, as a fraction of the filler.
pub const DEPTHS: [f64; 3] = [0.1, 0.5, 0.9];

/// The sentence that carries the key.
pub fn needle(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key.")
}

/// One passkey sequence, ready for the runner.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyPrompt {
    /// Prompt and answer, as one teacher-forced sequence.
    pub tokens: Vec<u32>,
    /// Positions of the answer's tokens in `tokens` (each is predicted by the position before).
    pub answer: Range<usize>,
    pub key: u32,
    pub depth: f64,
}

/// `count` five-digit keys from a seeded RNG (the same seed gives the same keys).
pub fn keys(seed: u64, count: usize) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| rng.random_range(10_000..100_000))
        .collect()
}

/// The prompt text with `n` filler units and the needle after `round(depth · n)` of them.
fn prompt_text(n: usize, depth: f64, key: u32) -> String {
    let before = (depth * n as f64).round() as usize;
    let mut parts: Vec<String> = Vec::with_capacity(n + 2);
    parts.extend(std::iter::repeat_n(FILLER.to_string(), before));
    parts.push(needle(key));
    parts.extend(std::iter::repeat_n(FILLER.to_string(), n - before));
    parts.push(QUESTION.to_string());
    parts.join(" ")
}

/// Builds the longest prompt (prompt + answer) of at most `len` tokens with the needle at
/// `depth`. `encode` is the model's tokenizer, used as `generate` uses it.
pub fn build(
    len: usize,
    depth: f64,
    key: u32,
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
) -> Result<PasskeyPrompt> {
    let full = |n: usize| -> Result<(Vec<u32>, usize)> {
        let prefix = prompt_text(n, depth, key);
        let p = encode(&prefix)?;
        let f = encode(&format!("{prefix} {key}"))?;
        if f.len() <= p.len() || f[..p.len()] != p[..] {
            bail!(
                "the tokenizer does not keep the passkey prompt's tokens when the answer follows"
            );
        }
        Ok((f, p.len()))
    };
    // Token cost of the fixed parts and of one filler unit, then the largest count that fits.
    let base = full(0)?.0.len();
    let per_unit = (full(10)?.0.len() - base) as f64 / 10.0;
    if base as f64 + per_unit > len as f64 {
        bail!("passkey length {len} is too short (the question alone takes {base} tokens)");
    }
    let mut n = ((len - base) as f64 / per_unit).floor() as usize;
    // The estimate may be one unit short (tokens merge at the joins): grow while it fits.
    while full(n + 1)?.0.len() <= len {
        n += 1;
    }
    let (tokens, answer_start) = loop {
        let (t, a) = full(n)?;
        if t.len() <= len || n == 1 {
            break (t, a);
        }
        n -= 1;
    };
    if tokens.len() > len {
        bail!("passkey length {len} is too short for one filler unit");
    }
    Ok(PasskeyPrompt {
        answer: answer_start..tokens.len(),
        tokens,
        key,
        depth,
    })
}

/// Whether a teacher-forced run retrieved the key: every answer token is the argmax at the
/// position before it. `argmax_at(pos)` is the policy's argmax at `pos`.
pub fn retrieved(p: &PasskeyPrompt, argmax_at: impl Fn(usize) -> u32) -> bool {
    p.answer.clone().all(|i| argmax_at(i - 1) == p.tokens[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words become one token each (a small hash), digit runs one token per digit (id = digit),
    /// like SmolLM2's digit splitting.
    fn encode(s: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for w in s.split_whitespace() {
            if w.chars().all(|c| c.is_ascii_digit()) {
                out.extend(w.chars().map(|c| c as u32 - '0' as u32));
            } else {
                out.push(100 + w.bytes().fold(7u32, |h, b| h.wrapping_mul(31) ^ b as u32) % 1000);
            }
        }
        Ok(out)
    }

    #[test]
    fn prompt_fits_the_length_and_puts_the_answer_last() {
        for &len in &[64usize, 256, 1000] {
            for &depth in &DEPTHS {
                let p = build(len, depth, 12345, &encode).unwrap();
                assert!(p.tokens.len() <= len, "{} > {len}", p.tokens.len());
                // Within one filler unit (one token per word here) of the target.
                let unit = FILLER.split_whitespace().count();
                assert!(p.tokens.len() + unit > len, "{} ≪ {len}", p.tokens.len());
                assert_eq!(p.answer.end, p.tokens.len());
                assert_eq!(&p.tokens[p.answer.clone()], &[1, 2, 3, 4, 5]);
            }
        }
    }

    #[test]
    fn needle_sits_at_its_depth() {
        let first_digit_pos = |depth| {
            let p = build(1000, depth, 98765, &encode).unwrap();
            p.tokens.iter().position(|&t| t == 9).unwrap() as f64 / p.tokens.len() as f64
        };
        for &d in &DEPTHS {
            let at = first_digit_pos(d);
            assert!((at - d).abs() < 0.06, "depth {d}: needle at {at}");
        }
    }

    #[test]
    fn retrieval_checks_every_answer_token() {
        let p = build(128, 0.5, 24680, &encode).unwrap();
        assert!(retrieved(&p, |pos| p.tokens[pos + 1]));
        let last = p.answer.end - 2;
        assert!(!retrieved(&p, |pos| if pos == last {
            99
        } else {
            p.tokens[pos + 1]
        }));
    }

    #[test]
    fn keys_are_seeded_five_digit_numbers() {
        let k = keys(7, 20);
        assert_eq!(k, keys(7, 20));
        assert_ne!(k, keys(8, 20));
        assert!(k.iter().all(|&k| (10_000..100_000).contains(&k)));
    }

    #[test]
    fn too_short_is_an_error() {
        assert!(build(10, 0.5, 12345, &encode).is_err());
    }

    #[test]
    fn a_tokenizer_that_merges_across_the_answer_is_refused() {
        let merging = |s: &str| -> Result<Vec<u32>> {
            let mut t = encode(s)?;
            if s.ends_with(|c: char| c.is_ascii_digit()) {
                t.insert(0, 1);
            }
            Ok(t)
        };
        assert!(build(256, 0.5, 12345, &merging).is_err());
    }
}
