//! The engine's one error type: every variant names what went wrong and where.

use std::path::PathBuf;

/// Errors from loading, parsing and running models.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A required file is missing from a model directory.
    #[error("{path}: missing ({what})")]
    MissingFile {
        /// The file that should exist.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },
    /// `config.json` is malformed or describes something unsupported.
    #[error("{path}: bad config: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The checkpoint's `model_type` is not one we run.
    #[error("unsupported model_type {model_type:?}; supported: {supported}")]
    UnsupportedModel {
        /// What the config says.
        model_type: String,
        /// The list of supported types.
        supported: String,
    },
    /// A safetensors or GGUF file is malformed.
    #[error("{path}: malformed {format} file: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// "safetensors" or "GGUF".
        format: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the config needs is not in the checkpoint.
    #[error("tensor {name:?} not found in the checkpoint at {dir}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The model directory.
        dir: PathBuf,
    },
    /// A tensor has the wrong shape or dtype for the config.
    #[error("tensor {name:?}: {msg}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong (expected vs found).
        msg: String,
    },
    /// Input to the model (tokens, lengths) is out of range.
    #[error("invalid input: {0}")]
    Input(String),
    /// A tokenizer or chat-template problem.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A failure in computing experts (local or remote).
    #[error("experts of layer {layer} on {host}: {msg}")]
    Experts {
        /// The layer whose experts failed.
        layer: usize,
        /// Which host (worker address or "local").
        host: String,
        /// What happened.
        msg: String,
    },
    /// Paged experts (`--memory-budget`) cannot run as asked.
    #[error("--memory-budget: {msg}")]
    MemoryBudget {
        /// Why (the budget and what it needed, or the tensor that cannot be paged).
        msg: String,
    },
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}
