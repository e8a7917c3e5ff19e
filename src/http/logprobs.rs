//! Logprobs in OpenAI's two formats: the legacy completions lists (`tokens`,
//! `token_logprobs`, `top_logprobs` maps, `text_offset`) and chat's per-token objects with raw
//! `bytes`. Token strings are the token's own text (lossy where a token holds part of a UTF-8
//! character; `bytes` carries the exact bytes).

use super::response::{ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob};
use super::text::TextToken;
use crate::engine::sampler::Sampled;
use crate::model::tokenizer::{IncrementalDecoder, Tokenizer};
use serde_json::{Map, Value};

fn token_string(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// A sampled token's logprob, which the sampler computed because the request asked for
/// logprobs (the only way here); missing would show as the clamp value.
fn reported(lp: Option<f32>) -> f32 {
    finite(lp.unwrap_or(f32::NEG_INFINITY))
}

/// JSON numbers cannot be -inf: clamp like vLLM does.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

impl CompletionLogprobs {
    fn push(&mut self, tok: &Tokenizer, s: Option<&Sampled>, id: u32, offset: usize) {
        self.tokens.push(token_string(tok, id).0);
        self.text_offset.push(offset);
        match s {
            None => {
                self.token_logprobs.push(None);
                self.top_logprobs.push(None);
            }
            Some(s) => {
                self.token_logprobs.push(Some(reported(s.logprob)));
                let mut m = Map::new();
                for &(t, lp) in &s.top_logprobs {
                    m.entry(token_string(tok, t).0)
                        .or_insert(Value::from(finite(lp)));
                }
                self.top_logprobs.push(Some(m));
            }
        }
    }

    /// Prompt tokens for `echo`: the first has no logprob; offsets follow the decoded prompt.
    pub fn push_prompt(&mut self, tok: &Tokenizer, ids: &[u32], lps: &[Sampled]) {
        let mut dec = IncrementalDecoder::with_skip_special_tokens(false);
        let mut offset = 0;
        for (i, &id) in ids.iter().enumerate() {
            let s = i.checked_sub(1).and_then(|j| lps.get(j));
            self.push(tok, s, id, offset);
            offset += dec.push(tok, id).map(|p| p.len()).unwrap_or(0);
        }
    }

    /// Generated tokens; `base` is the byte length of the text before them (the echoed prompt).
    pub fn push_generated(&mut self, tok: &Tokenizer, tokens: &[TextToken], base: usize) {
        for t in tokens {
            self.push(tok, Some(&t.sampled), t.sampled.token, base + t.start);
        }
    }
}

pub fn chat_logprobs(tok: &Tokenizer, tokens: &[TextToken]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let (token, bytes) = token_string(tok, t.sampled.token);
                TokenLogprob {
                    token,
                    logprob: reported(t.sampled.logprob),
                    bytes,
                    top_logprobs: t
                        .sampled
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| {
                            let (token, bytes) = token_string(tok, id);
                            TopLogprob {
                                token,
                                logprob: finite(lp),
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}
