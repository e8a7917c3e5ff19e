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

/// How a GGUF file's quantized matrices reach the backend (`[model] weights`, `--weights`).
/// Hugging Face directories hold float tensors and load the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Matrices in `Q4_1` / `Q8_0` stay in their blocks where the backend multiplies with them
    /// (the CPU: exact dequantized values, a third of bf16's bytes per decode step); other
    /// tensors and other block types are dequantized and rounded to bf16.
    #[default]
    Native,
    /// Every tensor dequantized and rounded to bf16, exactly as `kvserve convert` writes it: a
    /// `.gguf` file and its converted directory give identical logits.
    Bf16,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Native => "native",
            WeightFormat::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(WeightFormat::Native),
            "bf16" => Ok(WeightFormat::Bf16),
            _ => Err(format!(
                "unknown weight format `{s}` (expected native or bf16)"
            )),
        }
    }
}

/// Opens `path`: a `.gguf` file or a directory with `config.json`, with the default
/// [`WeightFormat`].
pub fn open(path: &Path) -> Result<ModelFiles, ModelError> {
    open_with(path, WeightFormat::default())
}

/// [`open`] with the GGUF weight format explicit.
pub fn open_with(path: &Path, format: WeightFormat) -> Result<ModelFiles, ModelError> {
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
            Box::new(GgufWeights { gguf, format }),
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

/// Serves a GGUF model's tensors: under [`WeightFormat::Native`] the quantized matrices the
/// backends multiply with as they are, everything else dequantized and rounded to bf16, exactly
/// as `kvserve convert` writes it.
struct GgufWeights {
    gguf: GgufFile,
    format: WeightFormat,
}

impl TensorSource for GgufWeights {
    fn path(&self) -> &Path {
        self.gguf.path()
    }
    fn has(&self, hf_name: &str) -> bool {
        self.gguf.has(hf_name)
    }
    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        if self.format == WeightFormat::Native {
            if let Some(t) = self.gguf.quantized_tensor(hf_name)? {
                return Ok(t);
            }
        }
        let t = self.gguf.tensor(hf_name)?;
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
