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
pub mod manifest;
mod quic;

use std::net::SocketAddr;
use std::sync::Arc;

pub use core::{WorkerCore, resident_bytes};
use moeshard_proto::Transport;
use moeshard_proto::auth::ClusterKey;

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
    /// A manifest could not be read, made or used.
    #[error("manifest: {msg}")]
    Manifest {
        /// What is wrong, with the path.
        msg: String,
    },
    /// A tensor to be served does not match the manifest: the weights were altered or damaged.
    #[error(
        "refusing to serve tensor {tensor} ({}): {what}{}",
        file.display(),
        if *others > 0 { format!(" (and {others} more tensors)") } else { String::new() }
    )]
    TamperedTensor {
        /// The tensor's name.
        tensor: String,
        /// Its file.
        file: std::path::PathBuf,
        /// What differs.
        what: String,
        /// How many other tensors of the assignment differ too.
        others: usize,
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
            WorkerError::Manifest { .. } => Code::FailedPrecondition,
            WorkerError::TamperedTensor { .. } => Code::DataLoss,
            WorkerError::NotHosted { .. } => Code::FailedPrecondition,
            WorkerError::OverCapacity { .. } => Code::ResourceExhausted,
            // A malformed frame or message is the sender's fault.
            WorkerError::NoSuchExpert { .. }
            | WorkerError::BadBatch { .. }
            | WorkerError::BadRequest { .. }
            | WorkerError::Proto(_) => Code::InvalidArgument,
            WorkerError::Engine(_)
            | WorkerError::Bind { .. }
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
///
/// With a cluster key, both transports run TLS 1.3 and serve only peers that prove the key (see
/// `moeshard_proto::auth`); the others fail the handshake before any request. Without one, gRPC
/// is plaintext and QUIC is encrypted but unauthenticated: for loopback and trusted networks.
pub async fn serve(
    core: Arc<WorkerCore>,
    listen: SocketAddr,
    transport: Transport,
    key: Option<ClusterKey>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    match &key {
        Some(k) => tracing::info!(cluster = k.id(), "peers must prove the cluster key"),
        None if !listen.ip().is_loopback() => tracing::warn!(
            %listen,
            "no cluster key: any peer that reaches this address can use this worker"
        ),
        None => {}
    }
    match transport {
        Transport::Grpc => grpc::serve(core, listen, key, on_listening).await,
        Transport::Quic => quic::serve(core, listen, key, on_listening).await,
    }
}
