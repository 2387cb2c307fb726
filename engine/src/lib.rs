//! moeshard's engine: tensors, dtypes, kernels, checkpoint formats and the forward pass that the
//! coordinator and the workers share.

pub mod error;
pub mod kernels;
pub mod tensor;

pub use error::{EngineError, Result};
pub use tensor::{DType, Mat, Tensor};
