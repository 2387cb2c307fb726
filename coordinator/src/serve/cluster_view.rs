//! What `GET /v1/cluster` shows, and the one trait the cluster side implements to fill it in.
//!
//! The serve module knows the model and the routing counts; the hosts (workers, their experts,
//! health and load) are known to whoever set up the expert backend. That side implements
//! [`ClusterView`]; [`SingleProcess`] is the view of a server whose experts all run in-process.

use serde::Serialize;

/// One host of routed experts as the cluster side reports it.
///
/// What the cluster side should fill in: `name` (worker address, or `coordinator` for the
/// coordinator's own share), `worker_id` (the name it gave in its hello), `healthy` (from the
/// health call: reachable and ready; `None` when not asked), `capacity_bytes`, `experts` (the
/// `(layer, expert)` pairs placed on it, when known; else only `expert_count`),
/// `dispatch_p50_us`/`dispatch_p99_us` (round trips of its expert requests) and `stats` (its
/// counters, e.g. the worker's `StatsResponse` as JSON). The server adds `routed_rows` itself
/// from its routing counts when `experts` is given.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostStatus {
    /// Address or `coordinator`.
    pub name: String,
    /// The worker's own name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Reachable and ready (`None`: not checked).
    pub healthy: Option<bool>,
    /// Bytes of expert weights it offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Number of experts placed on it.
    pub expert_count: usize,
    /// The `(layer, expert)` pairs placed on it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<(usize, usize)>>,
    /// Token rows the router sent to its experts since start (filled by the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_rows: Option<u64>,
    /// Median dispatch round trip, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_p50_us: Option<f64>,
    /// 99th percentile dispatch round trip, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_p99_us: Option<f64>,
    /// Further counters the host reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

/// The cluster as its owner sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterSnapshot {
    /// `single-process` or `cluster`.
    pub mode: String,
    /// `grpc` or `quic` when there are workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The hosts of routed experts.
    pub hosts: Vec<HostStatus>,
    /// Median round trip of one MoE layer's dispatch over all workers, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_p50_us: Option<f64>,
    /// 99th percentile of the same, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_p99_us: Option<f64>,
}

/// Implemented by whoever owns the expert backend. `snapshot` may block (it can ask the workers
/// over the network); the server calls it off the async runtime.
pub trait ClusterView: Send + Sync + 'static {
    /// The current state of the hosts.
    fn snapshot(&self) -> ClusterSnapshot;
}

/// Every routed expert in this process.
#[derive(Clone, Debug)]
pub struct SingleProcess {
    /// `(layer, expert)` pairs held.
    pub experts: Vec<(usize, usize)>,
}

impl ClusterView for SingleProcess {
    fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            mode: "single-process".into(),
            transport: None,
            hosts: vec![HostStatus {
                name: "coordinator".into(),
                healthy: Some(true),
                expert_count: self.experts.len(),
                experts: Some(self.experts.clone()),
                ..HostStatus::default()
            }],
            ..ClusterSnapshot::default()
        }
    }
}
