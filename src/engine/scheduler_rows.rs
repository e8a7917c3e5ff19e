//! The part of [`Scheduler::update`](super::Scheduler::update) that reads the logits rows:
//! scoring prompt tokens (`echo` / prompt logprobs) and drawing sampled tokens.
//!
//! This is most of the engine's own time per step with sampled requests (OpenAI's default):
//! one draw is O(vocabulary), ~28 µs at SmolLM2's 49,152 tokens at temperature 1 and 36–75 µs
//! with top-p on this project's CPUs (`bench_sampler`), i.e. milliseconds per step at 64–128
//! sequences, as long as a GPU's forward pass. Each row belongs to one sequence and is read
//! against that sequence's state only (its sampler with its own seeded RNG, its tokens), so
//! the rows run in parallel, and the results do not depend on the thread a row ran on. They
//! go through the CPU backend's fork/join (`backend::cpu::parallel`), where the engine thread
//! works too and the helpers that just ran a CPU forward pass are still awake, rather than a
//! rayon `par_iter`, which the engine thread (outside the pool) would only wait on.

use super::{Scheduled, Sequence, Step};
use crate::backend::cpu::parallel;
use crate::engine::sampler::{self, Sampled};
use crate::model::llama::StepOutput;
use crate::types::RequestId;
use std::collections::HashMap;
use std::sync::Mutex;

/// For each entry of `step` (by index): the token its sequence's sampler drew from its last
/// row, when it samples and the backend did not pick the token itself (greedy rows). Prompt
/// rows (`all_logits`) are scored into their sequences' `prompt_lps` on the way.
///
/// Assumes a sequence appears at most once per step (the scheduler schedules each once).
pub(super) fn read_rows(
    seqs: &mut HashMap<RequestId, Sequence>,
    step: &Step,
    out: &StepOutput,
) -> Vec<Option<Sampled>> {
    let needs_rows = |i: usize, e: &Scheduled| e.all_logits || (e.sample && out.token(i).is_none());
    let index: HashMap<RequestId, usize> = step
        .entries
        .iter()
        .enumerate()
        .filter(|&(i, e)| needs_rows(i, e))
        .map(|(i, e)| (e.id, i))
        .collect();
    let mut drawn = vec![None; step.entries.len()];
    if index.is_empty() {
        return drawn;
    }
    // One slot per sequence; each is locked by the one task that reads it (uncontended).
    let work: Vec<Mutex<(usize, &mut Sequence, Option<Sampled>)>> = seqs
        .iter_mut()
        .filter_map(|(id, seq)| index.get(id).map(|&i| Mutex::new((i, seq, None))))
        .collect();
    parallel::for_each(work.len(), |k| {
        let mut slot = work[k].lock().unwrap_or_else(|p| p.into_inner());
        let (i, seq, drawn) = &mut *slot;
        *drawn = read_one(seq, &step.entries[*i], out.logits(*i), out.vocab());
    });
    for slot in work {
        let (i, _, s) = slot.into_inner().unwrap_or_else(|p| p.into_inner());
        drawn[i] = s;
    }
    drawn
}

/// One entry's rows: prompt scoring, then the draw when the entry samples.
fn read_one(seq: &mut Sequence, e: &Scheduled, rows: &[f32], vocab: usize) -> Option<Sampled> {
    if e.all_logits {
        score_prompt(seq, e.start, rows, vocab);
    }
    if !e.sample {
        return None;
    }
    let row = &rows[rows.len() - vocab..];
    let banned = seq.banned().to_vec();
    seq.sampler.set_banned(&banned);
    Some(seq.sampler.sample(row, &seq.tokens, seq.prompt_len))
}

/// Scores the prompt tokens that the rows of a step starting at `start` predict (row `j` at
/// position `start + j` predicts `tokens[start + j + 1]`), skipping rows already scored before
/// a preemption.
fn score_prompt(seq: &mut Sequence, start: usize, rows: &[f32], vocab: usize) {
    let top = seq.prompt_logprobs.unwrap_or(0);
    for (j, logits) in rows.chunks_exact(vocab).enumerate() {
        let pos = start + j;
        if pos + 1 >= seq.prompt_len {
            break;
        }
        if pos == seq.prompt_lps.len() {
            let next = seq.tokens[pos + 1];
            seq.prompt_lps.push(sampler::score(logits, next, top));
        }
    }
}
