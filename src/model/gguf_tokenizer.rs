//! A Hugging Face `tokenizer.json` and `tokenizer_config.json` built from a GGUF file's
//! `tokenizer.ggml.*` metadata, so a GGUF model tokenizes exactly like its converted directory.
//!
//! Only byte-level BPE (`tokenizer.ggml.model` = `gpt2`) is supported. The pre-tokenizer follows
//! `tokenizer.ggml.pre` (llama.cpp's name for the split regexes the model was trained with):
//! getting it wrong changes token ids silently (SmolLM's `smollm` splits every digit on its own),
//! so an unknown name is an error rather than a guess.

use super::gguf::{GgufArray, GgufFile, GgufValue};
use crate::error::ModelError;
use serde_json::{json, Map, Value};
use std::path::Path;

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 split regex, as in Meta's `tokenizer.json` (llama.cpp's `llama3` pre-tokenizer).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (single digits), as in Qwen's `tokenizer.json`.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Read access to GGUF metadata (a trait so that unit tests can use a plain map).
trait Meta {
    fn get(&self, key: &str) -> Option<&GgufValue>;
    fn path(&self) -> &Path;
}

impl Meta for GgufFile {
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata(key)
    }
    fn path(&self) -> &Path {
        super::TensorSource::path(self)
    }
}

/// The `tokenizer.json` content for a GGUF file, serialized.
pub fn tokenizer_json(gguf: &GgufFile) -> Result<String, ModelError> {
    Ok(build_tokenizer_json(gguf)?.to_string())
}

/// The `tokenizer.json` content for a GGUF file.
pub fn tokenizer_json_value(gguf: &GgufFile) -> Result<Value, ModelError> {
    build_tokenizer_json(gguf)
}

/// The `tokenizer_config.json` content for a GGUF file. `tokenizer_class` is
/// `PreTrainedTokenizerFast` so that transformers loads `tokenizer.json` as written (with
/// `GPT2Tokenizer`, transformers 5 rebuilds a bare ByteLevel pre-tokenizer and loses e.g. the
/// digit splitting).
pub fn tokenizer_config_json(gguf: &GgufFile) -> Result<Value, ModelError> {
    build_tokenizer_config(gguf)
}

struct Vocab<'a> {
    tokens: &'a [String],
    types: Vec<i64>,
}

fn vocab<'a>(meta: &'a dyn Meta) -> Result<Vocab<'a>, ModelError> {
    let path = meta.path();
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| ModelError::format(path, "missing `tokenizer.ggml.model`"))?;
    if model != "gpt2" {
        return Err(ModelError::unsupported(
            path,
            format!(
                "tokenizer model `{model}` (only byte-level BPE, `gpt2`, is supported; \
                 use the model's original Hugging Face tokenizer.json)"
            ),
        ));
    }
    let tokens = meta
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .and_then(GgufArray::as_strings)
        .ok_or_else(|| ModelError::format(path, "missing `tokenizer.ggml.tokens` string array"))?;
    if tokens.is_empty() {
        return Err(ModelError::format(path, "`tokenizer.ggml.tokens` is empty"));
    }
    let types = match meta.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(GgufArray::to_i64_vec)
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    format!(
                        "`tokenizer.ggml.token_type` is not an integer array of {} entries",
                        tokens.len()
                    ),
                )
            })?,
    };
    Ok(Vocab { tokens, types })
}

fn token_id(meta: &dyn Meta, key: &str, n_tokens: usize) -> Result<Option<u32>, ModelError> {
    let full = format!("tokenizer.ggml.{key}");
    match meta.get(&full) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
            // Some converters write -1 for "none".
            _ if matches!(v, GgufValue::I32(-1) | GgufValue::I64(-1)) => Ok(None),
            _ => Err(ModelError::format(
                meta.path(),
                format!("`{full}` = {v:?} is not a token id below {n_tokens}"),
            )),
        },
    }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn split_then_byte_level(regex: &str, trim_offsets: bool) -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": regex},
                "behavior": "Isolated",
                "invert": false,
            },
            byte_level(false, trim_offsets, false),
        ],
    })
}

/// (normalizer, pre_tokenizer, ignore_merges) for a llama.cpp pre-tokenizer name.
fn pre_tokenizer(meta: &dyn Meta) -> Result<(Value, Value, bool), ModelError> {
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    Ok(match pre {
        // Files without the key predate it; llama.cpp then falls back to GPT-2-style splitting.
        "default" | "gpt2" => (Value::Null, byte_level(false, true, true), false),
        // llama.cpp splits `\p{N}` first, then applies the GPT-2 regex: exactly the HF
        // Digits(individual) + ByteLevel pair that StarCoder and SmolLM ship.
        "smollm" | "starcoder" => (
            Value::Null,
            json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(false, true, true),
                ],
            }),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            (Value::Null, split_then_byte_level(LLAMA3_REGEX, true), true)
        }
        // Qwen's tokenizer.json normalizes to NFC before splitting.
        "qwen2" => (
            json!({"type": "NFC"}),
            split_then_byte_level(QWEN2_REGEX, false),
            false,
        ),
        other => {
            return Err(ModelError::unsupported(
                meta.path(),
                format!(
                    "pre-tokenizer `{other}` (`tokenizer.ggml.pre`; supported: smollm, starcoder, \
                     gpt2, default, llama-bpe, llama3, smaug-bpe, qwen2)"
                ),
            ))
        }
    })
}

/// A post-processor that adds BOS/EOS when the GGUF asks for it, else plain ByteLevel.
fn post_processor(meta: &dyn Meta, v: &Vocab<'_>) -> Result<Value, ModelError> {
    let flag = |key: &str| {
        meta.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_bool)
            .unwrap_or(false)
    };
    let n = v.tokens.len();
    let bos = flag("add_bos_token")
        .then(|| token_id(meta, "bos_token_id", n))
        .transpose()?
        .flatten();
    let eos = flag("add_eos_token")
        .then(|| token_id(meta, "eos_token_id", n))
        .transpose()?
        .flatten();
    let byte_level_pp = byte_level(true, false, true);
    if bos.is_none() && eos.is_none() {
        return Ok(byte_level_pp);
    }
    let special = |id: u32, type_id: u32| json!({"SpecialToken": {"id": v.tokens[id as usize], "type_id": type_id}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (i, (seq_name, type_id)) in [("A", 0), ("B", 1)].into_iter().enumerate() {
        let parts: &mut Vec<Value> = if i == 0 { &mut single } else { &mut pair };
        if let Some(b) = bos {
            parts.push(special(b, type_id));
        }
        parts.push(seq(seq_name, type_id));
        if let Some(e) = eos {
            parts.push(special(e, type_id));
        }
    }
    // pair = single (for A) followed by the B part.
    let mut full_pair = single.clone();
    full_pair.append(&mut pair);
    for id in bos.into_iter().chain(eos) {
        let tok = &v.tokens[id as usize];
        specials.insert(
            tok.clone(),
            json!({"id": tok, "ids": [id], "tokens": [tok]}),
        );
    }
    Ok(json!({
        "type": "Sequence",
        "processors": [
            byte_level_pp,
            {
                "type": "TemplateProcessing",
                "single": single,
                "pair": full_pair,
                "special_tokens": specials,
            },
        ],
    }))
}

fn build_tokenizer_json(meta: &dyn Meta) -> Result<Value, ModelError> {
    let path = meta.path();
    let v = vocab(meta)?;
    let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer(meta)?;
    let merges = meta
        .get("tokenizer.ggml.merges")
        .and_then(GgufValue::as_array)
        .and_then(GgufArray::as_strings)
        .ok_or_else(|| ModelError::format(path, "missing `tokenizer.ggml.merges` string array"))?;
    for (i, m) in merges.iter().enumerate() {
        // Byte-level symbols never contain a space, so "a b" must split into exactly two.
        let mut parts = m.split(' ');
        let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty());
        if !ok {
            return Err(ModelError::format(
                path,
                format!(
                    "`tokenizer.ggml.merges` entry {i} is not two symbols separated by one space"
                ),
            ));
        }
    }

    let mut vocab_map = Map::new();
    let mut added = Vec::new();
    for (id, (tok, &ty)) in v.tokens.iter().zip(&v.types).enumerate() {
        // A duplicated token string keeps its first id (the later one stays decodable only as
        // an added token, if it is one).
        if !vocab_map.contains_key(tok) {
            vocab_map.insert(tok.clone(), json!(id));
        }
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(meta, &v)?,
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab_map,
            "merges": merges,
        },
    }))
}

fn build_tokenizer_config(meta: &dyn Meta) -> Result<Value, ModelError> {
    let v = vocab(meta)?;
    let n = v.tokens.len();
    let name = |key: &str| -> Result<Value, ModelError> {
        Ok(token_id(meta, key, n)?
            .map(|id| Value::String(v.tokens[id as usize].clone()))
            .unwrap_or(Value::Null))
    };
    let flag = |key: &str| {
        meta.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_bool)
            .unwrap_or(false)
    };
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("bos_token".into(), name("bos_token_id")?);
    cfg.insert("eos_token".into(), name("eos_token_id")?);
    cfg.insert("unk_token".into(), name("unknown_token_id")?);
    cfg.insert("pad_token".into(), name("padding_token_id")?);
    cfg.insert("add_bos_token".into(), json!(flag("add_bos_token")));
    cfg.insert("add_eos_token".into(), json!(flag("add_eos_token")));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = meta
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
    {
        cfg.insert("chat_template".into(), json!(t));
    }
    let arch = meta.get("general.architecture").and_then(GgufValue::as_str);
    let ctx = arch.and_then(|a| meta.get(&format!("{a}.context_length"))?.as_u64());
    if let Some(ctx) = ctx {
        cfg.insert("model_max_length".into(), json!(ctx));
    }
    Ok(Value::Object(cfg))
}

/// Metadata held in a map, for tests.
#[cfg(test)]
struct MapMeta {
    map: std::collections::HashMap<String, GgufValue>,
    path: std::path::PathBuf,
}

#[cfg(test)]
impl Meta for MapMeta {
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.map.get(key)
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

/// Builds `tokenizer.json` from metadata given as a map (for tests that have no GGUF file).
#[cfg(test)]
fn tokenizer_json_from_map(
    map: std::collections::HashMap<String, GgufValue>,
) -> Result<Value, ModelError> {
    build_tokenizer_json(&MapMeta {
        map,
        path: "<metadata>".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::str::FromStr;

    /// GPT-2's byte → printable char table.
    fn bytes_to_unicode() -> Vec<char> {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut table = vec!['\0'; 256];
        for &b in &printable {
            table[b as usize] = char::from_u32(b).unwrap();
        }
        let mut n = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                table[b as usize] = char::from_u32(256 + n).unwrap();
                n += 1;
                printable.push(b);
            }
        }
        table
    }

    fn tiny_meta(pre: &str) -> HashMap<String, GgufValue> {
        let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
        let mut types = vec![3, 3];
        for c in bytes_to_unicode() {
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges = ["1 2", "u s", "us e", "use r", "Ġ Ġ"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        tokens.push("<tool>".into());
        types.push(4);
        let mut m = HashMap::new();
        let s = |x: &str| GgufValue::String(x.into());
        m.insert("tokenizer.ggml.model".into(), s("gpt2"));
        m.insert("tokenizer.ggml.pre".into(), s(pre));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        );
        m.insert(
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(
                merges.iter().map(|x| x.to_string()).collect(),
            )),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
        m
    }

    fn encode(meta: HashMap<String, GgufValue>, text: &str) -> Vec<String> {
        let j = tokenizer_json_from_map(meta).unwrap();
        let tok = tokenizers::Tokenizer::from_str(&j.to_string()).unwrap();
        let enc = tok.encode(text, true).unwrap();
        enc.get_tokens().to_vec()
    }

    #[test]
    fn smollm_splits_digits_and_matches_special_tokens() {
        let toks = encode(tiny_meta("smollm"), "<|im_start|>user 12");
        assert_eq!(toks, ["<|im_start|>", "user", "Ġ", "1", "2"]);
        // gpt2 keeps digit runs together, so the "1 2" merge applies.
        let toks = encode(tiny_meta("gpt2"), "user 12");
        assert_eq!(toks, ["user", "Ġ", "12"]);
        // User-defined tokens are matched in raw text too (not special).
        let toks = encode(tiny_meta("smollm"), "a<tool>");
        assert_eq!(toks, ["a", "<tool>"]);
    }

    #[test]
    fn llama3_and_qwen2_load() {
        let toks = encode(tiny_meta("llama-bpe"), "user  12");
        assert_eq!(toks, ["user", "Ġ", "Ġ", "12"]);
        let toks = encode(tiny_meta("qwen2"), "user 12");
        assert_eq!(toks, ["user", "Ġ", "1", "2"]);
    }

    #[test]
    fn add_bos_uses_template_processing() {
        let mut m = tiny_meta("smollm");
        m.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
        assert_eq!(encode(m, "user"), ["<|im_start|>", "user"]);
    }

    #[test]
    fn rejects_unknown_pre_and_sentencepiece() {
        let e = tokenizer_json_from_map(tiny_meta("chameleon")).unwrap_err();
        assert!(e.to_string().contains("pre-tokenizer `chameleon`"), "{e}");
        let mut m = tiny_meta("smollm");
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("llama".into()),
        );
        let e = tokenizer_json_from_map(m).unwrap_err();
        assert!(e.to_string().contains("tokenizer model `llama`"), "{e}");
        let mut m = tiny_meta("smollm");
        m.insert(
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(vec!["a b c".into()])),
        );
        assert!(tokenizer_json_from_map(m).is_err());
    }

    /// Ids checked against Python tokenizers 0.23.3 and transformers 5 `AutoTokenizer` on the
    /// converted directory (see research/model.md).
    #[test]
    fn real_smollm2_ids() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.exists(),
            "{} missing: run scripts/fetch-model.sh",
            p.display()
        );
        let f = GgufFile::open(&p).unwrap();
        let tok = tokenizers::Tokenizer::from_str(&tokenizer_json(&f).unwrap()).unwrap();
        let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
        assert_eq!(ids("\n\n  0."), [39892, 32, 30]);
        assert_eq!(
            ids("<|im_start|>user\nhi<|im_end|>\n"),
            [1, 4093, 198, 6004, 2, 198]
        );
        assert_eq!(tok.get_vocab_size(true), 49152);
        let cfg = tokenizer_config_json(&f).unwrap();
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        assert_eq!(cfg["unk_token"], "<|endoftext|>");
        assert_eq!(cfg["add_bos_token"], false);
        assert_eq!(cfg["model_max_length"], 8192);
        assert!(cfg["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>"));
    }
}
