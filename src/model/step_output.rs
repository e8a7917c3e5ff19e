//! A batched forward step's results ([`crate::model::llama::Llama::forward_step`]), in one
//! buffer: the engine reads each sequence's rows in place instead of receiving a copy per
//! sequence.

#[cfg(doc)]
use super::llama::LogitsFor;

/// What a step computed for each of its sequences, in batch order: logits rows
/// ([`LogitsFor::Last`], [`LogitsFor::All`]) in one flat `[rows, vocab]` buffer, or a greedy
/// token ([`LogitsFor::Argmax`]).
#[derive(Debug, Clone)]
pub struct StepOutput {
    vocab: usize,
    logits: Vec<f32>,
    /// Per sequence: its first row in `logits`, its row count, its greedy token.
    seqs: Vec<(usize, usize, Option<u32>)>,
}

impl StepOutput {
    /// `logits` (`[rows, vocab]`) and, per sequence, (first row, row count, greedy token).
    pub(crate) fn from_parts(
        vocab: usize,
        logits: Vec<f32>,
        seqs: Vec<(usize, usize, Option<u32>)>,
    ) -> Self {
        Self {
            vocab,
            logits,
            seqs,
        }
    }
    /// An empty output for rows of `vocab` logits, filled with [`Self::push_logits`] and
    /// [`Self::push_token`] by tests that stand in for the forward pass.
    #[cfg(test)]
    pub(crate) fn new(vocab: usize) -> Self {
        Self::from_parts(vocab, Vec::new(), Vec::new())
    }
    /// Appends a sequence with these logits rows (a whole number of rows; empty for none).
    #[cfg(test)]
    pub(crate) fn push_logits(&mut self, rows: &[f32]) {
        assert_eq!(rows.len() % self.vocab, 0, "partial logits row");
        let first = self.logits.len() / self.vocab;
        self.logits.extend_from_slice(rows);
        self.seqs.push((first, rows.len() / self.vocab, None));
    }
    /// Appends a sequence whose greedy token was picked where its logits were.
    #[cfg(test)]
    pub(crate) fn push_token(&mut self, token: u32) {
        let first = self.logits.len() / self.vocab;
        self.seqs.push((first, 0, Some(token)));
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Sequences in the output.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    /// Sequence `i`'s logits rows, flattened (empty for [`LogitsFor::None`] and `Argmax`).
    pub fn logits(&self, i: usize) -> &[f32] {
        let (first, rows, _) = self.seqs[i];
        &self.logits[first * self.vocab..(first + rows) * self.vocab]
    }
    /// Sequence `i`'s greedy token ([`LogitsFor::Argmax`] only).
    pub fn token(&self, i: usize) -> Option<u32> {
        self.seqs[i].2
    }
}
