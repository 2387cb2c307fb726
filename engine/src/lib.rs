//! moeshard's engine: tensors, dtypes, kernels, checkpoint formats and the forward pass that the
//! coordinator and the workers share.

pub(crate) mod attention;
pub mod config;
pub mod deltanet;
pub mod error;
pub mod experts;
pub mod fingerprint;
pub mod fp8;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_model;
pub mod kernels;
pub mod layers;
pub mod mla;
pub mod model;
pub mod mxfp4;
pub mod npy;
pub mod paged;
pub mod quant;
pub mod resident;
pub mod routing;
pub mod safetensors;
pub mod sampling;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{EngineError, Result};
pub use experts::{ExpertBackend, ExpertRow, LocalExperts, PendingExperts};
pub use model::{KvCache, Model, SeqStep, WantLogits};
pub use tensor::{DType, Mat, Tensor};
