//! Models: configuration, weight loaders (safetensors directories and GGUF files), the tokenizer
//! and chat template, and the Llama forward written once against the `Backend` trait.

pub mod chat_template;
pub mod config;
pub mod convert;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod llama;
pub mod loader;
pub mod safetensors_source;
pub mod step_output;
pub mod tensor;
pub mod tokenizer;

use crate::error::ModelError;
use std::path::Path;
use tensor::HostTensor;

/// Where weights come from, addressed by Hugging Face tensor names
/// (`model.layers.0.self_attn.q_proj.weight`), always in Hugging Face orientation and layout
/// (a GGUF source undoes llama.cpp's Q/K row permutation before handing a tensor out).
pub trait TensorSource: Send + Sync {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    fn has(&self, hf_name: &str) -> bool;
    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError>;
}

/// A model file's bytes: memory-mapped from disk, or owned (parsed from memory by the fuzz
/// targets and parser tests, through the same code as a mapped file).
pub(crate) enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
