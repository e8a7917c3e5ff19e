//! Text ↔ token ids: a thin wrapper over Hugging Face `tokenizers` (tokenizer.json), the few
//! fields of `tokenizer_config.json` the server needs (bos/eos, chat template, add_bos), and an
//! incremental decoder for streaming that never emits half a character.

use crate::error::ModelError;
use crate::types::TokenId;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// GPT-2's byte-level table: the printable character that stands for each byte value in a
/// byte-level BPE vocabulary.
pub fn byte_level_table() -> &'static [char; 256] {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let direct = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut out = ['\0'; 256];
        let mut n = 0;
        for (b, slot) in out.iter_mut().enumerate() {
            let b = b as u32;
            *slot = if direct(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                n += 1;
                char::from_u32(255 + n).expect("BMP")
            };
        }
        out
    })
}

/// A loaded tokenizer.json. Encoding splits out added tokens first, so special tokens written in
/// the text (`<|im_start|>`) become their ids, exactly as HF `tokenizers` does.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let json = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&json, path)
    }

    /// Parses tokenizer.json content; `origin` names the file in errors.
    pub fn from_json_str(json: &str, origin: &Path) -> Result<Self, ModelError> {
        // Checked as plain JSON first: `tokenizers` panics instead of failing on some malformed
        // files (a syntax error inside `decoder` hits an `expect`; so does a `Precompiled`
        // normalizer whose charsmap does not parse), and a panic must not be how a bad model
        // file is reported.
        let v: Value = serde_json::from_str(json)
            .map_err(|e| ModelError::format(origin, format!("cannot load tokenizer: {e}")))?;
        if v.get("normalizer")
            .is_some_and(|n| has_type(n, "Precompiled"))
        {
            return Err(ModelError::unsupported(
                origin,
                "the `Precompiled` (SentencePiece charsmap) normalizer",
            ));
        }
        if let Some(id) = v.get("post_processor").and_then(missing_special_token) {
            return Err(ModelError::format(
                origin,
                format!(
                    "cannot load tokenizer: the post-processor template uses special token \
                     `{id}`, which its `special_tokens` does not define"
                ),
            ));
        }
        let inner = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| ModelError::format(origin, format!("cannot load tokenizer: {e}")))?;
        Ok(Self {
            inner,
            origin: origin.to_path_buf(),
        })
    }

    /// The file this tokenizer came from (for messages).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer(format!("{}: {what}: {e}", self.origin.display()))
    }

    /// Token ids of `text`. `add_special_tokens` runs the post-processor (e.g. a BOS template);
    /// special tokens written in the text are recognized either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| self.err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; ids outside the vocabulary are skipped (as HF does).
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err("decode", e))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// The raw bytes a token stands for (OpenAI's logprob `bytes`; a token may hold part of a
    /// UTF-8 character). Byte-level BPE tokens map back through GPT-2's byte table; other
    /// tokens (and ids without a vocabulary entry) fall back to their decoded text.
    pub fn token_bytes(&self, id: TokenId) -> Vec<u8> {
        if let Some(piece) = self.id_to_token(id) {
            let table = byte_level_table();
            let bytes: Option<Vec<u8>> = piece
                .chars()
                .map(|c| table.iter().position(|&t| t == c).map(|b| b as u8))
                .collect();
            if let Some(b) = bytes {
                return b;
            }
        }
        self.decode(&[id], false).unwrap_or_default().into_bytes()
    }

    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` object, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Whether `v` or anything inside it is an object of `"type": ty`.
fn has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| has_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| has_type(x, ty)),
        _ => false,
    }
}

/// A special token that a `TemplateProcessing` post-processor (anywhere inside `v`) puts in its
/// `single`/`pair` templates without defining it in `special_tokens`: `tokenizers` accepts
/// such a file and then panics on the first encode.
fn missing_special_token(v: &Value) -> Option<String> {
    match v {
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("TemplateProcessing") {
                let defined = o.get("special_tokens").and_then(Value::as_object);
                let is_defined = |id: &str| defined.is_some_and(|d| d.contains_key(id));
                for field in ["single", "pair"] {
                    let ids: Vec<String> = match o.get(field) {
                        // `[{"SpecialToken": {"id": "<s>", ...}}, {"Sequence": ...}]`
                        Some(Value::Array(pieces)) => pieces
                            .iter()
                            .filter_map(|p| p.get("SpecialToken")?.get("id")?.as_str())
                            .map(str::to_string)
                            .collect(),
                        // `"<s> $A:0 </s>:1"`
                        Some(Value::String(t)) => t
                            .split_whitespace()
                            .filter(|p| !p.starts_with('$'))
                            .map(|p| p.rsplit_once(':').map_or(p, |(id, _)| id).to_string())
                            .collect(),
                        _ => Vec::new(),
                    };
                    if let Some(id) = ids.into_iter().find(|id| !is_defined(id)) {
                        return Some(id);
                    }
                }
            }
            o.values().find_map(missing_special_token)
        }
        Value::Array(a) => a.iter().find_map(missing_special_token),
        _ => None,
    }
}

/// The parts of `tokenizer_config.json` (and `chat_template.jinja`) the server uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The default chat template. For a list of named templates this is the one named
    /// "default"; a list without one gives `None` (HF refuses to pick one too).
    pub chat_template: Option<String>,
    /// Absent means false.
    pub add_bos_token: bool,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; a missing file gives the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ModelError::io(path, e)),
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))?;
        Self::from_json_value(&v, path)
    }

    /// Reads a model directory the way HF does: `tokenizer_config.json` (optional), then a
    /// `chat_template.jinja` next to it replaces its chat template (else a `chat_template.json`
    /// with a `chat_template` field does).
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let mut cfg = Self::from_file(&dir.join("tokenizer_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        if let Some(t) = read_optional(&jinja)? {
            cfg.chat_template = Some(t);
        } else if let Some(t) = read_optional(&json)? {
            let v: Value = serde_json::from_str(&t)
                .map_err(|e| ModelError::format(&json, format!("invalid JSON: {e}")))?;
            if let Some(t) = chat_template_field(v.get("chat_template"), &json)? {
                cfg.chat_template = Some(t);
            }
        }
        Ok(cfg)
    }

    /// Extracts the fields from parsed tokenizer_config.json; `origin` names the file in errors.
    pub fn from_json_value(v: &Value, origin: &Path) -> Result<Self, ModelError> {
        if !v.is_object() {
            return Err(ModelError::format(origin, "expected a JSON object"));
        }
        let add_bos_token = match v.get("add_bos_token") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ModelError::format(
                    origin,
                    format!("add_bos_token: expected a boolean, got {other}"),
                ))
            }
        };
        Ok(Self {
            bos_token: token_field(v, "bos_token", origin)?,
            eos_token: token_field(v, "eos_token", origin)?,
            chat_template: chat_template_field(v.get("chat_template"), origin)?,
            add_bos_token,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// `"<s>"`, `{"content": "<s>", ...}` (an AddedToken) or null.
fn token_field(v: &Value, name: &str, origin: &Path) -> Result<Option<String>, ModelError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(ModelError::format(
                origin,
                format!("{name}: object without a string `content`"),
            )),
        },
        Some(other) => Err(ModelError::format(
            origin,
            format!("{name}: expected a string or an object, got {other}"),
        )),
    }
}

/// A template string, or a list of `{"name", "template"}` from which "default" is taken.
fn chat_template_field(v: Option<&Value>, origin: &Path) -> Result<Option<String>, ModelError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(ModelError::format(
                            origin,
                            "chat_template: list items need string `name` and `template`",
                        ))
                    }
                }
            }
            Ok(None)
        }
        Some(other) => Err(ModelError::format(
            origin,
            format!(
                "chat_template: expected a string or a list, got {}",
                kind(other)
            ),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Tokens of left context kept from a prompt by [`IncrementalDecoder::with_context`].
const CONTEXT_TOKENS: usize = 5;

/// Pending tokens after which a trailing U+FFFD is taken as final (see [`IncrementalDecoder`]).
const MAX_PENDING: usize = 16;

/// Streaming detokenizer ("prefix offset / read offset", as in TGI and vLLM).
///
/// It keeps a small window of ids: `window[..read]` is already-emitted left context, the rest is
/// new. Each push decodes the window and emits what the decoded text gained, so tokenizer
/// decoders that depend on neighbours (byte-level, SentencePiece's leading space) behave as in a
/// full decode. The text is emitted only up to any trailing U+FFFD run: byte-level BPE tokens
/// may end inside a multi-byte character (emoji), which decodes as U+FFFD until its remaining
/// bytes arrive. When the window's text ends cleanly, the window slides (left context = the last
/// new tokens), so the cost per token is O(1).
///
/// Invariant: the concatenation of everything `push` and `finish` return equals
/// `decode(all ids)` (or `decode(context + ids)` minus `decode(context)`). The one exception is a
/// model that emits more than `MAX_PENDING` tokens while the text keeps ending in U+FFFD
/// (invalid byte garbage): then the replacement characters are emitted as they stand, to bound
/// the window.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    window: Vec<TokenId>,
    /// `window[..read]` is left context whose text is fully emitted.
    read: usize,
    /// Bytes of `decode(window)` already emitted.
    emitted: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    /// A decoder that leaves special tokens out of the text (the OpenAI-server default).
    pub fn new() -> Self {
        Self::with_skip_special_tokens(true)
    }

    pub fn with_skip_special_tokens(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            window: Vec::new(),
            read: 0,
            emitted: 0,
        }
    }

    /// Starts with the last few prompt ids as left context, so that the first generated token
    /// decodes as it would inside the full text (e.g. keeps its leading space).
    pub fn with_context(
        tokenizer: &Tokenizer,
        context: &[TokenId],
        skip_special_tokens: bool,
    ) -> Result<Self, ModelError> {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        let text = tokenizer.decode(tail, skip_special_tokens)?;
        // A prompt that ends inside a character: its text is emitted once it completes.
        Ok(Self {
            skip_special_tokens,
            window: tail.to_vec(),
            read: tail.len(),
            emitted: text.trim_end_matches('\u{FFFD}').len(),
        })
    }

    /// Adds one token; returns the text it completed (often empty while a character is split).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: TokenId) -> Result<String, ModelError> {
        self.window.push(id);
        let text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        let stable = text.trim_end_matches('\u{FFFD}').len();
        let complete = stable == text.len() || self.window.len() - self.read > MAX_PENDING;
        let end = if complete { text.len() } else { stable };
        let out = self.take(&text, end);
        if complete {
            // Slide: the tokens just emitted become the left context.
            self.window.drain(..self.read);
            self.read = self.window.len();
            self.emitted = tokenizer
                .decode(&self.window, self.skip_special_tokens)?
                .len();
        }
        Ok(out)
    }

    /// Flushes what is held back (a character that never completed) and resets the decoder.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, ModelError> {
        let text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        let out = self.take(&text, text.len());
        *self = Self::with_skip_special_tokens(self.skip_special_tokens);
        Ok(out)
    }

    /// `text[emitted..end]`, advancing `emitted`. If a decoder is not prefix-stable (the
    /// offset falls inside a character), the start rounds down to a character boundary.
    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.emitted {
            return String::new();
        }
        let mut start = self.emitted;
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        self.emitted = end;
        text[start..end].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// GPT-2's byte → printable-char map (index = byte).
    fn byte_chars() -> Vec<char> {
        let mut bs: Vec<u32> = (0x21..=0x7E)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        for b in 0..256 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + cs.len() as u32 - 188);
            }
        }
        let mut map = vec!['\0'; 256];
        for (b, c) in bs.into_iter().zip(cs) {
            map[b as usize] = char::from_u32(c).unwrap();
        }
        map
    }

    fn bl(bytes: &[u8]) -> String {
        let m = byte_chars();
        bytes.iter().map(|&b| m[b as usize]).collect()
    }

    /// A byte-level BPE with merges that split 😀 (F0 9F 98 80) as [F0 9F 98][80] and a token
    /// that spans two characters ([80 F0]), plus special and non-special added tokens.
    fn tiny() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, c) in byte_chars().into_iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let merges: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (vec![0x80], vec![0xF0]),
            (b" ".to_vec(), b"t".to_vec()),
            (b"h".to_vec(), b"e".to_vec()),
            (b" t".to_vec(), b"he".to_vec()),
            (b"l".to_vec(), b"l".to_vec()),
            (vec![0xF0], vec![0x9F]),
            (vec![0xF0, 0x9F], vec![0x98]),
            (vec![0xE4], vec![0xBD]),
        ];
        let mut merge_strs = Vec::new();
        for (a, b) in &merges {
            let joined = [a.clone(), b.clone()].concat();
            let id = vocab.len();
            vocab.insert(bl(&joined), json!(id));
            merge_strs.push(format!("{} {}", bl(a), bl(b)));
        }
        let n = vocab.len();
        let added = |id: usize, content: &str, special: bool| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        };
        let tok = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(n, "<|im_start|>", true), added(n + 1, "<|im_end|>", true),
                             added(n + 2, "<tool>", false)],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                              "trim_offsets": true, "use_regex": true},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [n],
                                                     "tokens": ["<|im_start|>"]}}
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merge_strs}
        });
        Tokenizer::from_json_str(&tok.to_string(), Path::new("test/tokenizer.json")).unwrap()
    }

    const SAMPLES: &[&str] = &[
        "hello the world",
        "😀",
        "😀😀 smile 😀!",
        "你好，世界",
        "مرحبا بالعالم ٣٤٥",
        "mixed 🎉🇫🇷 é à ü ñ a\u{301}",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 👩‍👩‍👧",
        "<|im_start|>user\n😀 the<|im_end|>\n<tool>你</tool>",
        "",
    ];

    #[test]
    fn encodes_bpe_and_special_tokens() {
        let t = tiny();
        let id = |s: &str| t.token_to_id(s).unwrap();
        assert_eq!(t.encode(" the", false).unwrap(), vec![id("Ġthe")]);
        assert_eq!(
            t.encode("the the", false).unwrap(),
            vec![id("t"), id("he"), id("Ġthe")]
        );
        let start = id("<|im_start|>");
        assert_eq!(
            t.encode("<|im_start|>he", false).unwrap(),
            vec![start, id("he")]
        );
        assert_eq!(t.encode("he", true).unwrap(), vec![start, id("he")]);
        assert_eq!(t.id_to_token(start).as_deref(), Some("<|im_start|>"));
        assert_eq!(t.vocab_size(), 256 + 8 + 3);
        assert_eq!(t.id_to_token(10_000), None);
        // 😀 is split inside the character: its first token alone is not valid UTF-8.
        let smile = t.encode("😀", false).unwrap();
        assert_eq!(smile, vec![id(&bl(&[0xF0, 0x9F, 0x98])), id(&bl(&[0x80]))]);
        assert_eq!(t.decode(&smile[..1], false).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn decode_round_trips_and_skips_specials() {
        let t = tiny();
        for s in SAMPLES {
            assert_eq!(&t.decode(&t.encode(s, false).unwrap(), false).unwrap(), s);
        }
        let ids = t.encode("<|im_start|>hi<tool><|im_end|>", false).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), "hi<tool>");
    }

    fn stream(t: &Tokenizer, d: &mut IncrementalDecoder, ids: &[TokenId]) -> Vec<String> {
        let mut pieces: Vec<String> = ids.iter().map(|&i| d.push(t, i).unwrap()).collect();
        pieces.push(d.finish(t).unwrap());
        pieces
    }

    #[test]
    fn incremental_pieces_concatenate_to_full_decode() {
        let t = tiny();
        for skip in [false, true] {
            for s in SAMPLES {
                let ids = t.encode(s, false).unwrap();
                let pieces = stream(
                    &t,
                    &mut IncrementalDecoder::with_skip_special_tokens(skip),
                    &ids,
                );
                assert_eq!(pieces.concat(), t.decode(&ids, skip).unwrap(), "{s:?}");
                assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
                assert_eq!(pieces.last().unwrap(), "", "nothing left for finish: {s:?}");
            }
        }
    }

    #[test]
    fn incremental_holds_split_characters_back() {
        let t = tiny();
        let ids = t.encode("a😀😀", false).unwrap();
        let mut d = IncrementalDecoder::with_skip_special_tokens(false);
        let pieces: Vec<String> = ids.iter().map(|&i| d.push(&t, i).unwrap()).collect();
        // [a][F0 9F 98][80 F0][9F][98][80]: each emoji appears once its last byte arrives.
        assert_eq!(pieces, vec!["a", "", "😀", "", "", "😀"]);
        // A character that never completes is flushed by finish as U+FFFD, like decode.
        let mut d = IncrementalDecoder::with_skip_special_tokens(false);
        assert_eq!(d.push(&t, ids[1]).unwrap(), "");
        assert_eq!(d.finish(&t).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn incremental_matches_decode_on_arbitrary_ids() {
        // Pseudo-random ids over the whole vocabulary: lone continuation bytes, lead bytes,
        // specials. Invalid bytes decode to U+FFFD; the invariant still holds.
        let t = tiny();
        let v = t.vocab_size() as u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..200 {
            let ids: Vec<TokenId> = (0..40)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ((x >> 33) % v) as TokenId
                })
                .collect();
            let skip = round % 2 == 0;
            let pieces = stream(
                &t,
                &mut IncrementalDecoder::with_skip_special_tokens(skip),
                &ids,
            );
            assert_eq!(pieces.concat(), t.decode(&ids, skip).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn incremental_with_prompt_context() {
        let t = tiny();
        let prompt = t.encode("hi 😀", false).unwrap();
        let gen = t.encode(" the 你好", false).unwrap();
        let mut d = IncrementalDecoder::with_context(&t, &prompt, false).unwrap();
        let got = stream(&t, &mut d, &gen).concat();
        assert_eq!(got, " the 你好");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = Tokenizer::from_file(&missing).unwrap_err();
        assert!(matches!(e, ModelError::Io { .. }) && e.to_string().contains("nope.json"));
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("invalid file"),
            "{e}"
        );
    }

    #[test]
    fn tokenizer_config_fields() {
        let origin = Path::new("tokenizer_config.json");
        let v = json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"},
                              {"name": "default", "template": "D"}]
        });
        let c = TokenizerConfig::from_json_value(&v, origin).unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert!(c.add_bos_token);

        let c = TokenizerConfig::from_json_value(&json!({"bos_token": null}), origin).unwrap();
        assert_eq!(c, TokenizerConfig::default());
        let e = TokenizerConfig::from_json_value(&json!({"eos_token": 2}), origin).unwrap_err();
        assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
        let no_default = json!({"chat_template": [{"name": "rag", "template": "R"}]});
        let c = TokenizerConfig::from_json_value(&no_default, origin).unwrap();
        assert_eq!(c.chat_template, None);
    }

    #[test]
    fn tokenizer_config_from_dir_prefers_chat_template_jinja() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            TokenizerConfig::from_dir(dir.path()).unwrap(),
            TokenizerConfig::default()
        );
        let cfg = json!({"eos_token": "<|im_end|>", "chat_template": "old"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let c = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("old"));
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "js"}"#,
        )
        .unwrap();
        let c = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("js"));
        std::fs::write(dir.path().join("chat_template.jinja"), "new{{ x }}\n").unwrap();
        let c = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("new{{ x }}\n"));
        assert_eq!(c.eos_token.as_deref(), Some("<|im_end|>"));

        std::fs::write(dir.path().join("tokenizer_config.json"), "{oops").unwrap();
        let e = TokenizerConfig::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }
}
