//! Opens a model from a path — a Hugging Face directory or a `.gguf` file — and hands back its
//! configuration, weights, tokenizer and chat template, whatever the format.

use super::chat_template::ChatTemplate;
use super::config::ModelConfig;
use super::gguf::GgufFile;
use super::gguf_tokenizer;
use super::safetensors_source::SafetensorsSource;
use super::tensor::{HostData, HostTensor};
use super::tokenizer::{Tokenizer, TokenizerConfig};
use super::TensorSource;
use crate::error::ModelError;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Everything needed to run and talk to a model.
pub struct ModelFiles {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: Box<dyn TensorSource>,
    pub tokenizer: Tokenizer,
    pub tokenizer_config: TokenizerConfig,
    /// `None` when the model ships no chat template.
    pub chat_template: Option<ChatTemplate>,
}

/// Opens `path`: a `.gguf` file or a directory with `config.json`.
pub fn open(path: &Path) -> Result<ModelFiles, ModelError> {
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model path not found"),
        ));
    }
    let (config, weights, tokenizer, tokenizer_config): (_, Box<dyn TensorSource>, _, _) = if path
        .is_dir()
    {
        let config = ModelConfig::from_hf_dir(path)?;
        let weights = SafetensorsSource::open(path)?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let tokenizer_config = TokenizerConfig::from_dir(path)?;
        (config, Box::new(weights), tokenizer, tokenizer_config)
    } else {
        let gguf = GgufFile::open(path)?;
        let config = gguf.model_config()?;
        let tok_json = gguf_tokenizer::tokenizer_json(&gguf)?;
        let tokenizer = Tokenizer::from_json_str(&tok_json, path)?;
        let tokenizer_config =
            TokenizerConfig::from_json_value(&gguf_tokenizer::tokenizer_config_json(&gguf)?, path)?;
        (
            config,
            Box::new(Bf16Rounded(gguf)),
            tokenizer,
            tokenizer_config,
        )
    };
    let chat_template = match &tokenizer_config.chat_template {
        Some(src) => Some(ChatTemplate::new(
            src,
            tokenizer_config.bos_token.as_deref(),
            tokenizer_config.eos_token.as_deref(),
        )?),
        None => None,
    };
    Ok(ModelFiles {
        path: path.to_path_buf(),
        config,
        weights,
        tokenizer,
        tokenizer_config,
        chat_template,
    })
}

/// Serves a GGUF model's dequantized tensors rounded to bf16, exactly as `kvserve convert`
/// writes them, so that a `.gguf` file and its converted directory give identical logits.
struct Bf16Rounded(GgufFile);

impl TensorSource for Bf16Rounded {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn has(&self, hf_name: &str) -> bool {
        self.0.has(hf_name)
    }
    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        let t = self.0.tensor(hf_name)?;
        let data = match t.data {
            HostData::Bf16(d) => HostData::Bf16(Cow::Owned(d.into_owned())),
            other => HostData::Bf16(Cow::Owned(other.to_bf16())),
        };
        Ok(HostTensor {
            name: t.name,
            shape: t.shape,
            data,
        })
    }
}
