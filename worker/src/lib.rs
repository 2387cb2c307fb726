//! moeshard's expert worker.
//!
//! A worker has its own copy of the checkpoint. It answers a coordinator's hello with its model
//! fingerprint and the capacity it offers, maps only the tensors of the experts it is assigned
//! (mapping is lazy: other experts' bytes are never read), and computes expert batches on a rayon
//! pool, off the async runtime, answering over gRPC or QUIC.
//!
//! [`WorkerCore`] is the transport-free part; [`serve`] puts it behind a socket.

mod core;
mod grpc;
mod quic;

use std::net::SocketAddr;
use std::sync::Arc;

pub use core::{WorkerCore, resident_bytes};
use moeshard_proto::Transport;

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Loading or computing with the model failed.
    #[error(transparent)]
    Engine(#[from] moeshard_engine::EngineError),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The wire layer failed (framing, TLS set-up).
    #[error(transparent)]
    Proto(#[from] moeshard_proto::ProtoError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// An assignment was made for another model.
    #[error("model fingerprint mismatch: this worker serves {ours}, the coordinator has {theirs}")]
    FingerprintMismatch {
        /// This worker's fingerprint.
        ours: String,
        /// The fingerprint the coordinator sent.
        theirs: String,
    },
    /// An assignment names an expert the model does not have.
    #[error("layer {layer} has no routed expert {expert}")]
    NoSuchExpert {
        /// The layer named.
        layer: usize,
        /// The expert named.
        expert: usize,
    },
    /// A batch names an expert this worker does not host.
    #[error("expert {expert} of layer {layer} is not hosted by this worker")]
    NotHosted {
        /// The layer named.
        layer: usize,
        /// The expert named.
        expert: usize,
    },
    /// An assignment does not fit in the offered capacity.
    #[error("hosting {experts} experts needs {need} bytes but this worker offers {capacity}")]
    OverCapacity {
        /// Experts the assignment would make this worker host.
        experts: usize,
        /// Their bytes.
        need: u64,
        /// The capacity offered.
        capacity: u64,
    },
    /// A malformed expert batch.
    #[error("bad batch for layer {layer}: {msg}")]
    BadBatch {
        /// The layer of the batch.
        layer: usize,
        /// What is wrong.
        msg: String,
    },
    /// A request the worker does not understand.
    #[error("bad request: {msg}")]
    BadRequest {
        /// What is wrong.
        msg: String,
    },
    /// The compute pool dropped a job without answering.
    #[error("the compute job for layer {layer} was lost")]
    JobLost {
        /// The layer of the batch.
        layer: usize,
    },
}

impl WorkerError {
    /// The gRPC status code of this error (QUIC replies carry the same code).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkerError::FingerprintMismatch { .. } => Code::FailedPrecondition,
            WorkerError::NotHosted { .. } => Code::FailedPrecondition,
            WorkerError::OverCapacity { .. } => Code::ResourceExhausted,
            WorkerError::NoSuchExpert { .. }
            | WorkerError::BadBatch { .. }
            | WorkerError::BadRequest { .. } => Code::InvalidArgument,
            WorkerError::Engine(_)
            | WorkerError::Bind { .. }
            | WorkerError::Proto(_)
            | WorkerError::Grpc(_)
            | WorkerError::JobLost { .. } => Code::Internal,
        }
    }
}

/// Result alias for the worker.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// Serves `core` on `listen` over `transport` until the process ends; `on_listening` is called
/// with the bound address (the real port when `listen` asks for port 0) once connections are
/// accepted.
pub async fn serve(
    core: Arc<WorkerCore>,
    listen: SocketAddr,
    transport: Transport,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    match transport {
        Transport::Grpc => grpc::serve(core, listen, on_listening).await,
        Transport::Quic => quic::serve(core, listen, on_listening).await,
    }
}
