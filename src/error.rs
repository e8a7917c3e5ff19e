//! One error enum per layer. Each names the file and the problem so that an operator can act
//! on it; none of them carries prompt text.

use std::path::PathBuf;

/// Errors from loading a model: files, formats, tokenizer, chat template.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its content is malformed (bad magic, offsets out of range, truncated).
    #[error("{}: invalid file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// Well-formed input that asks for something we do not implement (architecture, dtype, quant).
    #[error("{}: unsupported: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A `kvserve calibrate` projection that does not fit the loaded model.
    #[error("KV calibration: {0}")]
    Calibration(String),
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn unsupported(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Unsupported {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Errors from a compute backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend: {0}")]
    Unsupported(String),
    #[error("backend: shape error: {0}")]
    Shape(String),
}

/// Errors from running a model (engine-facing).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("context length exceeded: {needed} tokens > {max}")]
    ContextLength { needed: usize, max: usize },
    /// The pool has no room for the sequence right now (a scheduler would preempt or wait).
    #[error("KV cache is full: no room for {tokens} tokens now")]
    KvFull { tokens: usize },
    /// The sequence can never fit its tenant's share of the pool.
    #[error("{tokens} tokens exceed this tenant's KV cache quota")]
    KvNeverFits { tokens: usize },
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A backend op panicked (e.g. a CUDA call failed inside an infallible trait op); the
    /// engine caught it, so only the requests in that forward pass fail.
    #[error("the forward pass panicked: {0}")]
    Panicked(String),
}
