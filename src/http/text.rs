//! One choice's text as it streams: incremental detokenization (never broken UTF-8) and stop
//! strings found across token boundaries. A stop string is never emitted, and only the text
//! that could still turn out to be the start of a stop string is held back. Generated tokens are
//! released together with the text they produced, so logprobs line up with the text.

use crate::engine::sampler::Sampled;
use crate::error::ModelError;
use crate::model::tokenizer::{IncrementalDecoder, Tokenizer};
use std::collections::VecDeque;

/// A generated token and the byte range of the choice's text it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TextToken {
    pub sampled: Sampled,
    pub start: usize,
    pub end: usize,
}

/// What a step lets out: new text and the tokens behind it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Release {
    pub text: String,
    pub tokens: Vec<TextToken>,
}

impl Release {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.tokens.is_empty()
    }
}

pub struct TextStream {
    decoder: IncrementalDecoder,
    stops: Vec<String>,
    /// Everything decoded so far (cut at the stop string once one is found).
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
    pending: VecDeque<TextToken>,
    stopped: bool,
}

impl TextStream {
    /// `stops` must be non-empty strings (validation guarantees it).
    pub fn new(decoder: IncrementalDecoder, stops: Vec<String>) -> Self {
        Self {
            decoder,
            stops,
            text: String::new(),
            sent: 0,
            pending: VecDeque::new(),
            stopped: false,
        }
    }

    /// Whether a stop string ended the text (the caller stops generating).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a generated token. A `hidden` token (a stop id such as EOS) adds no text and no
    /// logprob entry.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        s: Sampled,
        hidden: bool,
    ) -> Result<Release, ModelError> {
        if self.stopped || hidden {
            return Ok(Release::default());
        }
        let start = self.text.len();
        let piece = self.decoder.push(tok, s.token)?;
        self.text.push_str(&piece);
        self.pending.push_back(TextToken {
            sampled: s,
            start,
            end: self.text.len(),
        });
        if self.find_stop(start) {
            return Ok(self.release(self.text.len(), true));
        }
        let upto = self.text.len() - self.holdback();
        Ok(self.release(upto, false))
    }

    /// The sequence ended: flushes the decoder and whatever was held back.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Release, ModelError> {
        if !self.stopped {
            let start = self.text.len();
            let rest = self.decoder.finish(tok)?;
            self.text.push_str(&rest);
            if let Some(last) = self.pending.back_mut() {
                last.end = self.text.len();
            }
            self.find_stop(start);
        }
        Ok(self.release(self.text.len(), true))
    }

    /// Looks for the earliest stop string that ends after `new_from` (older text was searched
    /// before); on a match cuts the text there and marks the stream stopped.
    fn find_stop(&mut self, new_from: usize) -> bool {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return false;
        }
        let mut from = new_from.saturating_sub(longest - 1).max(self.sent);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hay = &self.text[from..];
        let hit = self
            .stops
            .iter()
            .filter_map(|s| hay.find(s.as_str()))
            .min()
            .map(|i| from + i);
        match hit {
            Some(pos) => {
                self.text.truncate(pos);
                self.stopped = true;
                true
            }
            None => false,
        }
    }

    /// Bytes at the end of the unreleased text that are a proper prefix of some stop string.
    fn holdback(&self) -> usize {
        let tail = &self.text[self.sent..];
        let mut best = 0;
        for s in &self.stops {
            for k in (best + 1..s.len().min(tail.len() + 1)).rev() {
                let cut = tail.len() - k;
                if tail.is_char_boundary(cut) && s.as_bytes().starts_with(&tail.as_bytes()[cut..]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// Releases `text[sent..upto]` and the tokens it completes (`last`: every token that
    /// produced any released text, plus tokens that produced none before the cut).
    fn release(&mut self, upto: usize, last: bool) -> Release {
        let upto = upto.min(self.text.len());
        let text = self.text[self.sent..upto].to_string();
        self.sent = upto;
        let mut tokens = Vec::new();
        while let Some(t) = self.pending.front() {
            let done = t.end <= upto || (last && t.start < upto);
            if !done {
                break;
            }
            let mut t = self.pending.pop_front().expect("front exists");
            t.end = t.end.min(upto);
            tokens.push(t);
        }
        if last {
            self.pending.clear();
        }
        Release { text, tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Tokenizer;
    use std::path::Path;

    /// A byte-level BPE tokenizer whose tokens are single bytes (ids = byte values) plus a
    /// few merges, so tests can split text at any byte, including inside a UTF-8 character.
    fn byte_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        let table = crate::model::tokenizer::byte_level_table();
        for (b, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), (b as u32).into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_json_str(&json.to_string(), Path::new("bytes.json")).unwrap()
    }

    fn sampled(id: u32) -> Sampled {
        Sampled {
            token: id,
            logprob: Some(-0.5),
            top_logprobs: vec![],
        }
    }

    /// Feeds `text` byte by byte; returns each release's text and the final text.
    fn run(text: &str, stops: &[&str]) -> (Vec<String>, String, bool, usize) {
        let tok = byte_tokenizer();
        let mut ts = TextStream::new(
            IncrementalDecoder::new(),
            stops.iter().map(|s| s.to_string()).collect(),
        );
        let mut pieces = Vec::new();
        let mut tokens = 0;
        for &b in text.as_bytes() {
            let r = ts.push(&tok, sampled(b as u32), false).unwrap();
            tokens += r.tokens.len();
            pieces.push(r.text);
            if ts.stopped() {
                break;
            }
        }
        let r = ts.finish(&tok).unwrap();
        tokens += r.tokens.len();
        pieces.push(r.text);
        let all = pieces.concat();
        (pieces, all, ts.stopped(), tokens)
    }

    #[test]
    fn without_stops_the_text_is_the_decoded_text_and_never_broken_utf8() {
        let (pieces, all, stopped, tokens) = run("héllo, 世界!", &[]);
        assert_eq!(all, "héllo, 世界!");
        assert!(!stopped);
        assert_eq!(tokens, "héllo, 世界!".len());
        // Multi-byte characters come out whole: a piece never ends inside one.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert!(pieces.contains(&"世".to_string()));
    }

    #[test]
    fn stop_strings_are_found_across_tokens_and_never_emitted() {
        let (_, all, stopped, _) = run("The answer is 42.\nUser: next", &["\nUser:"]);
        assert_eq!(all, "The answer is 42.");
        assert!(stopped);
        // The earliest of several stops wins; a stop inside a multi-byte text works.
        let (_, all, _, _) = run("abc世界def", &["def", "界"]);
        assert_eq!(all, "abc世");
    }

    #[test]
    fn only_a_possible_stop_prefix_is_held_back() {
        let tok = byte_tokenizer();
        let mut ts = TextStream::new(IncrementalDecoder::new(), vec!["STOP".into()]);
        let mut out = String::new();
        for &b in b"xxST" {
            out += &ts.push(&tok, sampled(b as u32), false).unwrap().text;
        }
        assert_eq!(out, "xx", "`ST` may become `STOP`: held");
        out += &ts.push(&tok, sampled(b'X' as u32), false).unwrap().text;
        assert_eq!(out, "xxSTX", "`STX` cannot: released at once");
        out += &ts.push(&tok, sampled(b'S' as u32), false).unwrap().text;
        out += &ts.finish(&tok).unwrap().text;
        assert_eq!(out, "xxSTXS", "held text is flushed at the end");
        assert!(!ts.stopped());
    }

    #[test]
    fn tokens_are_released_with_their_text_and_cut_at_the_stop() {
        let tok = byte_tokenizer();
        let mut ts = TextStream::new(IncrementalDecoder::new(), vec!["cd".into()]);
        let mut got = Vec::new();
        for &b in b"abcdef" {
            got.extend(ts.push(&tok, sampled(b as u32), false).unwrap().tokens);
            if ts.stopped() {
                break;
            }
        }
        got.extend(ts.finish(&tok).unwrap().tokens);
        let ids: Vec<u32> = got.iter().map(|t| t.sampled.token).collect();
        assert_eq!(
            ids,
            [b'a' as u32, b'b' as u32],
            "`c` only produced stop text"
        );
        assert_eq!((got[1].start, got[1].end), (1, 2));
        // Hidden tokens (EOS) add nothing.
        let mut ts = TextStream::new(IncrementalDecoder::new(), vec![]);
        assert!(ts.push(&tok, sampled(0), true).unwrap().is_empty());
    }
}
