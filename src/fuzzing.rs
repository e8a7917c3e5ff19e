//! Entry points for parser fuzzing: one function per parser that takes raw, untrusted bytes and
//! runs them through the same code the server runs on a model file or a request body. Each
//! returns a typed error or success; a panic, a hang or an allocation far larger than the input
//! is a bug in the library. The cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the CI replay
//! of their corpora (`tests/fuzz_parsers.rs`) both call these, so the two never diverge.

use crate::config::ServerSection;
use crate::engine::KvChoice;
use crate::error::ModelError;
use crate::http::validate::{self, Plan};
use crate::http::{ApiError, ModelInfo};
use crate::kv::policy::KvPolicy;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgufFile;
use crate::model::gguf_tokenizer;
use crate::model::safetensors_source::SafetensorsSource;
use crate::model::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerConfig};
use crate::model::TensorSource;
use crate::types::TenantId;
use std::path::Path;

/// Text every loaded tokenizer encodes: ASCII, digits, multi-byte characters and special-token
/// look-alikes.
const SAMPLE_TEXT: &str = "Hello, world! 12345 héllo 日本語 🦀 <|im_start|>user\n<s></s>\t  end";

/// The conversation every chat template renders.
fn sample_messages() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "Hi <|im_end|> {{ 7*7 }}"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ]
}

/// Keeps the first error of several independent stages (so that a failure in one stage still
/// lets the fuzzer reach the others).
#[derive(Default)]
struct FirstError(Option<ModelError>);

impl FirstError {
    fn note<T>(&mut self, r: Result<T, ModelError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.get_or_insert(e);
                None
            }
        }
    }

    fn finish(self) -> Result<(), ModelError> {
        self.0.map_or(Ok(()), Err)
    }
}

/// A whole `.gguf` file: header, metadata and tensor table; then, each independently, the model
/// configuration, the tokenizer and chat template built from its metadata (as the loader
/// does), and every tensor dequantized under its Hugging Face name and under its GGUF name.
pub fn gguf(data: &[u8]) -> Result<(), ModelError> {
    let origin = Path::new("<fuzz>.gguf");
    let g = GgufFile::from_bytes(data.to_vec(), origin)?;
    let mut errs = FirstError::default();
    if let Some(cfg) = errs.note(g.model_config()) {
        cfg.rope_inv_freq();
    }
    if let Some(json) = errs.note(gguf_tokenizer::tokenizer_json(&g)) {
        if let Some(tok) = errs.note(Tokenizer::from_json_str(&json, origin)) {
            errs.note(exercise_tokenizer(&tok));
        }
    }
    if let Some(v) = errs.note(gguf_tokenizer::tokenizer_config_json(&g)) {
        if let Some(tc) = errs.note(TokenizerConfig::from_json_value(&v, origin)) {
            errs.note(render_config_template(&tc));
        }
    }
    for (hf_name, _) in g.hf_tensors() {
        errs.note(g.tensor(&hf_name));
    }
    for info in g.tensors() {
        errs.note(g.dequantize_tensor(&info.name));
    }
    errs.finish()
}

/// A `config.json` body → [`ModelConfig`], then what is computed from it at load time before
/// any weight is read (the RoPE frequency table).
pub fn config_json(data: &[u8]) -> Result<ModelConfig, ModelError> {
    let text = std::str::from_utf8(data)
        .map_err(|e| ModelError::format("<fuzz>/config.json", e.to_string()))?;
    let cfg = ModelConfig::from_json_str(text, Path::new("<fuzz>/config.json"))?;
    cfg.rope_inv_freq();
    Ok(cfg)
}

/// One `.safetensors` file: header validation, then every tensor handed out and converted to
/// f32 as the model loader does.
pub fn safetensors(data: &[u8]) -> Result<(), ModelError> {
    let src = SafetensorsSource::from_bytes(data.to_vec(), Path::new("<fuzz>.safetensors"))?;
    let mut errs = FirstError::default();
    let names: Vec<String> = src.names().into_iter().map(str::to_string).collect();
    for name in names {
        if let Some(t) = errs.note(src.tensor(&name)) {
            t.data.to_f32();
        }
    }
    errs.finish()
}

/// A `tokenizer.json` body → [`Tokenizer`], then encode, decode, streaming decode and token
/// bytes; when the body is a JSON object it is also read as a `tokenizer_config.json` (special
/// tokens, chat template) and its template, if any, compiled and rendered.
pub fn tokenizer(data: &[u8]) -> Result<(), ModelError> {
    let origin = Path::new("<fuzz>/tokenizer.json");
    let text = std::str::from_utf8(data).map_err(|e| ModelError::format(origin, e.to_string()))?;
    let mut errs = FirstError::default();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let origin = Path::new("<fuzz>/tokenizer_config.json");
        if let Some(tc) = errs.note(TokenizerConfig::from_json_value(&v, origin)) {
            errs.note(render_config_template(&tc));
        }
    }
    if let Some(tok) = errs.note(Tokenizer::from_json_str(text, origin)) {
        errs.note(exercise_tokenizer(&tok));
    }
    errs.finish()
}

fn exercise_tokenizer(tok: &Tokenizer) -> Result<(), ModelError> {
    let ids = tok.encode(SAMPLE_TEXT, true)?;
    tok.decode(&ids, false)?;
    tok.decode(&ids, true)?;
    let mut dec = IncrementalDecoder::new();
    for &id in &ids {
        dec.push(tok, id)?;
    }
    dec.finish(tok)?;
    let vocab = tok.vocab_size() as u32;
    // Ids around the ends of the vocabulary, and past it.
    for id in [
        0,
        1,
        vocab.saturating_sub(1),
        vocab,
        vocab.saturating_add(7),
        u32::MAX,
    ] {
        tok.token_bytes(id);
        tok.id_to_token(id);
    }
    Ok(())
}

fn render_config_template(tc: &TokenizerConfig) -> Result<(), ModelError> {
    if let Some(src) = &tc.chat_template {
        ChatTemplate::new(src, tc.bos_token.as_deref(), tc.eos_token.as_deref())?
            .render(&sample_messages(), true)?;
    }
    Ok(())
}

/// A chat template from a model file, compiled and rendered (with and without the generation
/// prompt) under the server's default fuel and output limits.
pub fn chat_template(src: &str) -> Result<String, ModelError> {
    let t = ChatTemplate::new(src, Some("<|im_start|>"), Some("<|im_end|>"))?;
    let messages = sample_messages();
    t.render(&messages[..2], false)?;
    t.render(&messages, true)
}

/// What a request body is validated against: the served model's text side and the server's
/// limits (the parts of the HTTP state that validation reads).
pub struct RequestFixture {
    pub model: ModelInfo,
    pub limits: ServerSection,
}

impl RequestFixture {
    /// The text side of a Hugging Face model directory (tokenizer, chat template, config) with
    /// the default server limits, named as the server would name it.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let config = ModelConfig::from_hf_dir(dir)?;
        let tc = TokenizerConfig::from_dir(dir)?;
        let template = match &tc.chat_template {
            Some(src) => Some(ChatTemplate::new(
                src,
                tc.bos_token.as_deref(),
                tc.eos_token.as_deref(),
            )?),
            None => None,
        };
        let name = dir
            .file_name()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        Ok(Self {
            model: ModelInfo {
                name,
                tokenizer: Tokenizer::from_file(&dir.join("tokenizer.json"))?,
                template,
                vocab_size: config.vocab_size,
                max_context: config.max_position_embeddings,
                eos_token_ids: config.eos_token_ids,
                created: 0,
            },
            limits: ServerSection::default(),
        })
    }

    /// A `/v1/chat/completions` body → validated plan (and its engine requests).
    pub fn chat(&self, body: &[u8]) -> Result<Plan, ApiError> {
        let plan = validate::chat_body(body, &self.model, &self.limits, &kv_choice)?;
        check_plan(&plan);
        Ok(plan)
    }

    /// A `/v1/completions` body → validated plan (and its engine requests).
    pub fn completion(&self, body: &[u8]) -> Result<Plan, ApiError> {
        let plan = validate::completion_body(body, &self.model, &self.limits, &kv_choice)?;
        check_plan(&plan);
        Ok(plan)
    }
}

/// Any policy the parser accepts (the served set depends on the backend, not on the body).
fn kv_choice(requested: Option<&str>) -> Result<KvChoice, ApiError> {
    match requested {
        None => Ok(KvChoice::only(
            KvPolicy::parse("bf16").expect("bf16 parses"),
        )),
        Some(name) => KvPolicy::parse(name)
            .map(KvChoice::only)
            .map_err(|m| ApiError::invalid("kv_policy", m)),
    }
}

fn check_plan(plan: &Plan) {
    plan.token_cost();
    plan.engine_requests(TenantId(0));
}
