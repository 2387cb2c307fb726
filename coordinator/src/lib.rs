//! moeshard's coordinator side of the cluster.
//!
//! - [`placement`]: which host holds which expert, a pure function of capacities.
//! - [`ClusterExperts`]: the engine's expert backend over workers (gRPC or QUIC), with a bounded
//!   record of dispatch round trips ([`DispatchStats`]).
//! - [`local`]: worker processes started on loopback for one run.

mod client;
mod cluster;
pub mod local;
pub mod placement;
pub mod plan;
pub mod serve;
pub mod stats;

pub use cluster::{
    ClusterExperts, ClusterMembership, ClusterMonitor, ClusterOptions, WorkerInfo, probe_worker,
    probe_worker_with_key,
};
pub use local::{LocalWorkers, LocalWorkersConfig};
pub use moeshard_proto::Transport;
pub use stats::{DispatchStats, percentile};

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A worker could not be reached (connection refused, no handshake, no answer).
    #[error("worker {worker} is unreachable: {msg}")]
    Unreachable {
        /// The worker's address.
        worker: String,
        /// What failed.
        msg: String,
    },
    /// A worker serves a different model.
    #[error(
        "worker {worker} serves a different model: its fingerprint is {theirs}, this coordinator's is {ours}"
    )]
    FingerprintMismatch {
        /// The worker's address.
        worker: String,
        /// The coordinator's fingerprint.
        ours: String,
        /// The worker's fingerprint.
        theirs: String,
    },
    /// A worker speaks another protocol version.
    #[error("worker {worker} speaks protocol version {theirs}; this coordinator speaks {ours}")]
    ProtocolMismatch {
        /// The worker's address.
        worker: String,
        /// The coordinator's version.
        ours: u32,
        /// The worker's version.
        theirs: u32,
    },
    /// A call to a worker failed during start-up.
    #[error("worker {worker}: {call} failed: {msg}")]
    Call {
        /// The worker's address.
        worker: String,
        /// Which call.
        call: &'static str,
        /// What failed.
        msg: String,
    },
    /// A worker did not report ready after its assignment.
    #[error("worker {worker} is not ready after its assignment")]
    NotReady {
        /// The worker's address.
        worker: String,
    },
    /// No host offers any capacity.
    #[error("none of the {hosts} hosts offers capacity for experts")]
    NoCapacity {
        /// Number of hosts.
        hosts: usize,
    },
    /// The hosts together offer less than the experts need.
    #[error("the experts need {need} bytes but the hosts offer {offered} together")]
    InsufficientCapacity {
        /// Bytes of all routed experts.
        need: u64,
        /// Bytes offered by all hosts.
        offered: u64,
    },
    /// Rounding put more on a host than it offers.
    #[error("placement puts {experts} experts ({need} bytes) on {host}, which offers {capacity}")]
    HostOverCapacity {
        /// The host's name.
        host: String,
        /// Experts placed on it.
        experts: usize,
        /// Their bytes.
        need: u64,
        /// Its capacity.
        capacity: u64,
    },
    /// A local worker process could not be started.
    #[error("local worker {index}: {msg}")]
    LocalWorker {
        /// Which of the local workers.
        index: usize,
        /// What failed.
        msg: String,
    },
    /// The set of workers cannot change as asked.
    #[error("cannot change the workers: {0}")]
    Membership(String),
    /// The expert backend has been dropped.
    #[error("the expert backend is gone")]
    Gone,
    /// The network runtime could not be started.
    #[error("cannot start the network runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Loading the model failed.
    #[error(transparent)]
    Engine(#[from] moeshard_engine::EngineError),
}

/// Result alias for the coordinator.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
