//! [`ClusterExperts`]: routed experts computed by workers (and optionally a local share), behind
//! the engine's [`ExpertBackend`] so the forward pass cannot tell it from [`LocalExperts`].
//!
//! For every MoE layer, `dispatch` groups the rows by owning host and starts one request per
//! worker that has rows, carrying only the hidden states of the tokens that worker needs. `wait`
//! computes the local share, then collects the replies and puts every output back at its row's
//! index, so the engine's fixed-order combine gives the same bits as a single process.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moeshard_engine::fingerprint::model_fingerprint;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{
    EngineError, ExpertBackend, ExpertRow, LocalExperts, ModelConfig, PendingExperts,
};
use moeshard_proto::tensor::f32_from_le_bytes;
use moeshard_proto::v1::{
    AssignRequest, Dtype, ExpertBatchRequest, ExpertBatchResponse, ExpertId, HelloRequest,
    StatsResponse,
};
use moeshard_proto::{PROTOCOL_VERSION, Transport};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::client::{CallError, Client};
use crate::placement::{HostCapacity, Placement, place};
use crate::stats::DispatchStats;
use crate::{CoordinatorError, Result};

/// How to reach the workers.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Worker addresses, `host:port`.
    pub workers: Vec<String>,
    /// The wire.
    pub transport: Transport,
    /// Deadline of every call to a worker.
    pub rpc_timeout: Duration,
    /// Deadline of connecting to a worker.
    pub connect_timeout: Duration,
    /// Bytes of experts the coordinator hosts itself, placed like a worker's (`None`: none).
    pub local_capacity: Option<u64>,
    /// Name the workers log for this coordinator.
    pub coordinator_id: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: Vec::new(),
            transport: Transport::Grpc,
            rpc_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            local_capacity: None,
            coordinator_id: format!("coordinator/pid{}", std::process::id()),
        }
    }
}

/// A worker of the cluster.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// The address it was reached at.
    pub addr: String,
    /// What it calls itself.
    pub worker_id: String,
    /// Capacity it offered, in bytes.
    pub capacity: u64,
    /// Experts placed on it.
    pub experts: usize,
}

struct Worker {
    info: WorkerInfo,
    client: Client,
}

/// Which host holds which expert right now: the workers, the coordinator's own share and the
/// placement over them. Replaced as a whole when it changes; a step in flight keeps the one it
/// started with.
struct Topology {
    workers: Vec<Arc<Worker>>,
    /// The coordinator's own share, host index `workers.len()` of the placement.
    local: Option<Arc<LocalExperts>>,
    placement: Placement,
}

/// What the backend and its monitors share.
struct Shared {
    handle: tokio::runtime::Handle,
    topology: RwLock<Arc<Topology>>,
    hidden_size: usize,
    transport: Transport,
    rpc_timeout: Duration,
    stats: Arc<DispatchStats>,
    /// What placing again needs.
    membership: Membership,
}

/// What re-placing the experts over a changed set of workers needs, kept from `connect`.
struct Membership {
    fingerprint: String,
    moe_layers: Vec<usize>,
    num_experts: usize,
    expert_bytes: u64,
    opts: ClusterOptions,
    /// One change of the topology at a time.
    changing: Mutex<()>,
}

impl Shared {
    fn topology(&self) -> Arc<Topology> {
        Arc::clone(&self.topology.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Topology {
    /// The workers with the number of experts the placement gives each.
    fn infos(&self) -> Vec<WorkerInfo> {
        let counts = self.placement.counts();
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerInfo {
                experts: counts.get(i).copied().unwrap_or(0),
                ..w.info.clone()
            })
            .collect()
    }
}

/// Changes the set of workers of a running [`ClusterExperts`]: admits one (connect, hello,
/// model check) or removes one, then places the experts over the new set, assigns them and
/// switches over. A step already under way finishes on the topology it started with: workers
/// keep what they were assigned before (assignments add up), so its requests stay valid.
/// Cheap to clone; errors once the backend is gone. Call from a plain thread.
#[derive(Clone)]
pub struct ClusterMembership {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for ClusterMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMembership").finish_non_exhaustive()
    }
}

impl ClusterMembership {
    fn shared(&self) -> Result<Arc<Shared>> {
        self.shared.upgrade().ok_or(CoordinatorError::Gone)
    }

    /// Addresses of the workers now, in placement order.
    pub fn addrs(&self) -> Vec<String> {
        match self.shared.upgrade() {
            Some(s) => s
                .topology()
                .workers
                .iter()
                .map(|w| w.info.addr.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Admits the worker at `addr` (it must answer hello with our protocol and model) and
    /// re-places the experts to include it. `Ok(false)`: it is already a member.
    pub fn admit(&self, addr: &str) -> Result<bool> {
        let s = self.shared()?;
        let m = &s.membership;
        let _one = m.changing.lock().unwrap_or_else(|p| p.into_inner());
        let t = s.topology();
        if t.workers.iter().any(|w| w.info.addr == addr) {
            return Ok(false);
        }
        let w = s.handle.block_on(hello(addr, &m.fingerprint, &m.opts))?;
        let mut workers = t.workers.clone();
        workers.push(Arc::new(w));
        replace(&s, &t, workers)?;
        info!(
            worker = addr,
            workers = t.workers.len() + 1,
            "worker admitted"
        );
        Ok(true)
    }

    /// Removes the worker at `addr` and re-places its experts on the others. `Ok(false)`: it
    /// was not a member. Fails (changing nothing) when it is the last host of experts.
    pub fn remove(&self, addr: &str) -> Result<bool> {
        let s = self.shared()?;
        let _one = s
            .membership
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let t = s.topology();
        if !t.workers.iter().any(|w| w.info.addr == addr) {
            return Ok(false);
        }
        let workers: Vec<Arc<Worker>> = t
            .workers
            .iter()
            .filter(|w| w.info.addr != addr)
            .cloned()
            .collect();
        if workers.is_empty() && t.local.is_none() {
            return Err(CoordinatorError::NoCapacity { hosts: 0 });
        }
        replace(&s, &t, workers)?;
        info!(
            worker = addr,
            workers = t.workers.len() - 1,
            "worker removed"
        );
        Ok(true)
    }

    /// Asks every worker whether it is ready, all at once; `(addr, Err(why))` for those that
    /// are not or did not answer within `deadline`.
    pub fn health(&self, deadline: Duration) -> Vec<(String, Result<(), String>)> {
        let Ok(s) = self.shared() else {
            return Vec::new();
        };
        let workers = s.topology().workers.clone();
        s.handle.block_on(async move {
            let tasks: Vec<_> = workers
                .iter()
                .map(|w| {
                    let w = Arc::clone(w);
                    tokio::spawn(async move {
                        match with_deadline(deadline, w.client.health()).await {
                            Ok(h) if h.ready => Ok(()),
                            Ok(_) => Err("not ready".to_string()),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for (w, t) in workers.iter().zip(tasks) {
                out.push((
                    w.info.addr.clone(),
                    t.await.unwrap_or_else(|e| Err(e.to_string())),
                ));
            }
            out
        })
    }
}

/// Places the experts over `workers` (and the coordinator's own share, whose experts cannot
/// move), assigns each worker its experts and switches the topology over.
fn replace(s: &Shared, old: &Topology, workers: Vec<Arc<Worker>>) -> Result<()> {
    let m = &s.membership;
    if old.local.is_some() {
        return Err(CoordinatorError::Membership(
            "the coordinator hosts a share of the experts itself (--coordinator-capacity), \
             so the placement cannot change while it runs"
                .into(),
        ));
    }
    let hosts: Vec<HostCapacity> = workers
        .iter()
        .map(|w| HostCapacity {
            name: w.info.addr.clone(),
            capacity: w.info.capacity,
        })
        .collect();
    let placement = place(&hosts, &m.moe_layers, m.num_experts, m.expert_bytes)?;
    s.handle.block_on(async {
        let tasks: Vec<_> = workers
            .iter()
            .enumerate()
            .filter(|(i, _)| !placement.experts_of(*i).is_empty())
            .map(|(i, w)| {
                let (w, fp, experts) = (
                    Arc::clone(w),
                    m.fingerprint.clone(),
                    placement.experts_of(i),
                );
                let deadline = m.opts.rpc_timeout;
                let addr = w.info.addr.clone();
                (
                    addr,
                    tokio::spawn(async move { assign(&w, &fp, &experts, deadline).await }),
                )
            })
            .collect();
        for (addr, t) in tasks {
            t.await.map_err(|e| CoordinatorError::Call {
                worker: addr,
                call: "assign",
                msg: e.to_string(),
            })??;
        }
        Ok::<_, CoordinatorError>(())
    })?;
    let fresh = Arc::new(Topology {
        workers,
        local: None,
        placement,
    });
    *s.topology.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    Ok(())
}

/// Routed experts on workers, reached over gRPC or QUIC.
pub struct ClusterExperts {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
}

/// A read-only view of a [`ClusterExperts`] for status pages: which workers, which experts,
/// their counters. Cheap to clone; answers (with errors) after the backend is gone.
#[derive(Clone)]
pub struct ClusterMonitor {
    shared: Weak<Shared>,
    transport: Transport,
    stats: Arc<DispatchStats>,
}

impl std::fmt::Debug for ClusterMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMonitor")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl ClusterMonitor {
    /// The wire in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The shared record of dispatch round trips.
    pub fn stats(&self) -> Arc<DispatchStats> {
        Arc::clone(&self.stats)
    }

    /// The workers and the placement now (empty once the backend is gone).
    pub fn layout(&self) -> (Vec<WorkerInfo>, Option<Placement>) {
        match self.shared.upgrade() {
            Some(s) => {
                let t = s.topology();
                (t.infos(), Some(t.placement.clone()))
            }
            None => (Vec::new(), None),
        }
    }

    /// Each worker's counters (or why they could not be had), asked of all at once with a
    /// deadline of `deadline`. Call from a plain thread (or a blocking task), not from async code.
    pub fn worker_stats(&self, deadline: Duration) -> Vec<(String, Result<StatsResponse, String>)> {
        let Some(s) = self.shared.upgrade() else {
            return Vec::new();
        };
        let workers = s.topology().workers.clone();
        s.handle.block_on(async move {
            let tasks: Vec<_> = workers
                .iter()
                .map(|w| {
                    let w = Arc::clone(w);
                    tokio::spawn(async move {
                        with_deadline(deadline, w.client.stats())
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for (w, t) in workers.iter().zip(tasks) {
                let r = t.await.unwrap_or_else(|e| Err(e.to_string()));
                out.push((w.info.addr.clone(), r));
            }
            out
        })
    }
}

impl std::fmt::Debug for ClusterExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.shared.topology();
        f.debug_struct("ClusterExperts")
            .field(
                "workers",
                &t.workers.iter().map(|w| &w.info).collect::<Vec<_>>(),
            )
            .field("transport", &self.shared.transport)
            .finish_non_exhaustive()
    }
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or(Err(CallError::Timeout(deadline)))
}

fn expert_bytes(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<u64> {
    let first = cfg.moe_layers().next().map(|l| (l, 0));
    Ok(moeshard_engine::experts::stored_bytes(cfg, ckpt, first)?)
}

/// Connects to one worker and exchanges hellos; checks protocol and model.
async fn hello(addr: &str, fingerprint: &str, opts: &ClusterOptions) -> Result<Worker> {
    let unreachable = |e: CallError| CoordinatorError::Unreachable {
        worker: addr.to_string(),
        msg: e.to_string(),
    };
    let client = with_deadline(
        opts.connect_timeout,
        Client::connect(addr, opts.transport, opts.connect_timeout),
    )
    .await
    .map_err(unreachable)?;
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: opts.coordinator_id.clone(),
    };
    let hello = with_deadline(opts.rpc_timeout, client.hello(req))
        .await
        .map_err(|e| match e {
            CallError::Status { .. } | CallError::Protocol(_) => CoordinatorError::Call {
                worker: addr.to_string(),
                call: "hello",
                msg: e.to_string(),
            },
            e => unreachable(e),
        })?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(CoordinatorError::ProtocolMismatch {
            worker: addr.to_string(),
            ours: PROTOCOL_VERSION,
            theirs: hello.protocol_version,
        });
    }
    if hello.model_fingerprint != fingerprint {
        return Err(CoordinatorError::FingerprintMismatch {
            worker: addr.to_string(),
            ours: fingerprint.to_string(),
            theirs: hello.model_fingerprint,
        });
    }
    info!(
        worker = addr,
        id = %hello.worker_id,
        capacity = hello.capacity_bytes,
        "worker said hello"
    );
    Ok(Worker {
        info: WorkerInfo {
            addr: addr.to_string(),
            worker_id: hello.worker_id,
            capacity: hello.capacity_bytes,
            experts: 0,
        },
        client,
    })
}

/// Connects to a worker and exchanges hellos, assigning nothing: how `moeshard doctor` checks that
/// a worker is reachable (through the same connection set-up as the coordinator's, so the same
/// authentication). The caller compares the protocol version and the model fingerprint.
pub async fn probe_worker(
    addr: &str,
    transport: Transport,
    timeout: Duration,
    coordinator_id: &str,
) -> Result<moeshard_proto::v1::HelloResponse> {
    let unreachable = |e: CallError| CoordinatorError::Unreachable {
        worker: addr.to_string(),
        msg: e.to_string(),
    };
    let client = with_deadline(timeout, Client::connect(addr, transport, timeout))
        .await
        .map_err(unreachable)?;
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: coordinator_id.to_string(),
    };
    with_deadline(timeout, client.hello(req))
        .await
        .map_err(|e| CoordinatorError::Call {
            worker: addr.to_string(),
            call: "hello",
            msg: e.to_string(),
        })
}

/// Assigns a worker its experts and waits until it reports ready.
async fn assign(
    worker: &Worker,
    fingerprint: &str,
    experts: &[(usize, usize)],
    deadline: Duration,
) -> Result<()> {
    let addr = &worker.info.addr;
    let req = AssignRequest {
        model_fingerprint: fingerprint.to_string(),
        experts: experts
            .iter()
            .map(|&(l, e)| ExpertId {
                layer: l as u32,
                expert: e as u32,
            })
            .collect(),
    };
    let call_err = |call: &'static str| {
        move |e: CallError| CoordinatorError::Call {
            worker: addr.clone(),
            call,
            msg: e.to_string(),
        }
    };
    with_deadline(deadline, worker.client.assign(req))
        .await
        .map_err(call_err("assign"))?;
    let health = with_deadline(deadline, worker.client.health())
        .await
        .map_err(call_err("health"))?;
    if !health.ready {
        return Err(CoordinatorError::NotReady {
            worker: addr.clone(),
        });
    }
    Ok(())
}

/// What one worker's request carries back: its outputs, or why not, and when it ended.
type Reply = (Result<ExpertBatchResponse, CallError>, Instant);

/// The request of one worker: only the tokens its rows name, re-indexed in order of first use.
fn batch_request(
    layer: usize,
    hidden: &[f32],
    h: usize,
    rows: &[ExpertRow],
    idx: &[usize],
) -> ExpertBatchRequest {
    let n_tokens = hidden.len() / h;
    let mut slot = vec![u32::MAX; n_tokens];
    let mut activations = Vec::new();
    let mut next = 0u32;
    let mut tokens = Vec::with_capacity(idx.len());
    let mut experts = Vec::with_capacity(idx.len());
    let mut weights = Vec::with_capacity(idx.len());
    for &i in idx {
        let r = rows[i];
        let t = r.token as usize;
        if slot[t] == u32::MAX {
            slot[t] = next;
            next += 1;
            activations.reserve(h * 4);
            for v in &hidden[t * h..(t + 1) * h] {
                activations.extend_from_slice(&v.to_le_bytes());
            }
        }
        tokens.push(slot[t]);
        experts.push(r.expert);
        weights.push(r.weight);
    }
    ExpertBatchRequest {
        layer: layer as u32,
        hidden_size: h as u32,
        dtype: Dtype::F32 as i32,
        n_tokens: next,
        activations: Bytes::from(activations),
        tokens,
        experts,
        weights,
    }
}

impl ClusterExperts {
    /// Connects to every worker, checks protocol and model, places the experts, assigns them and
    /// waits until every worker is ready. Call from a plain thread, not from async code.
    pub fn connect(
        dir: &Path,
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        opts: &ClusterOptions,
    ) -> Result<Self> {
        if opts.workers.is_empty() && opts.local_capacity.is_none() {
            return Err(CoordinatorError::NoCapacity { hosts: 0 });
        }
        let fingerprint = model_fingerprint(dir, ckpt)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("moeshard-net")
            .enable_all()
            .build()
            .map_err(CoordinatorError::Runtime)?;
        let handle = runtime.handle().clone();

        // Connect and say hello to every worker at once; report the first failure in order.
        let mut workers: Vec<Worker> = runtime.block_on(async {
            let tasks: Vec<_> = opts
                .workers
                .iter()
                .map(|addr| {
                    let (addr, fp, opts) = (addr.clone(), fingerprint.clone(), opts.clone());
                    tokio::spawn(async move { hello(&addr, &fp, &opts).await })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for (t, addr) in tasks.into_iter().zip(&opts.workers) {
                out.push(t.await.map_err(|e| CoordinatorError::Unreachable {
                    worker: addr.clone(),
                    msg: e.to_string(),
                })??);
            }
            Ok::<_, CoordinatorError>(out)
        })?;

        let mut hosts: Vec<HostCapacity> = workers
            .iter()
            .map(|w| HostCapacity {
                name: w.info.addr.clone(),
                capacity: w.info.capacity,
            })
            .collect();
        if let Some(capacity) = opts.local_capacity {
            hosts.push(HostCapacity {
                name: "coordinator".into(),
                capacity,
            });
        }
        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
        let expert_bytes = expert_bytes(cfg, ckpt)?;
        let placement = place(&hosts, &moe_layers, cfg.num_experts, expert_bytes)?;
        for (i, w) in workers.iter_mut().enumerate() {
            w.info.experts = placement.experts_of(i).len();
        }

        let workers: Vec<Arc<Worker>> = workers.into_iter().map(Arc::new).collect();
        runtime.block_on(async {
            let tasks: Vec<_> = workers
                .iter()
                .enumerate()
                .filter(|(i, _)| !placement.experts_of(*i).is_empty())
                .map(|(i, w)| {
                    let (w, fp, experts) =
                        (Arc::clone(w), fingerprint.clone(), placement.experts_of(i));
                    let deadline = opts.rpc_timeout;
                    let addr = w.info.addr.clone();
                    (
                        addr,
                        tokio::spawn(async move { assign(&w, &fp, &experts, deadline).await }),
                    )
                })
                .collect();
            for (addr, t) in tasks {
                t.await.map_err(|e| CoordinatorError::Call {
                    worker: addr,
                    call: "assign",
                    msg: e.to_string(),
                })??;
            }
            Ok::<_, CoordinatorError>(())
        })?;

        let local = match opts.local_capacity {
            Some(_) => Some(LocalExperts::load(
                cfg,
                ckpt,
                placement.experts_of(workers.len()),
            )?),
            None => None,
        };
        for w in &workers {
            info!(
                worker = %w.info.addr,
                id = %w.info.worker_id,
                experts = w.info.experts,
                transport = %opts.transport,
                "worker ready"
            );
        }
        if let Some(l) = &local {
            info!(
                experts = l.held().count(),
                "coordinator hosts a share itself"
            );
        }
        Ok(ClusterExperts {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                handle,
                topology: RwLock::new(Arc::new(Topology {
                    workers,
                    local: local.map(Arc::new),
                    placement,
                })),
                hidden_size: cfg.hidden_size,
                transport: opts.transport,
                rpc_timeout: opts.rpc_timeout,
                stats: Arc::new(DispatchStats::default()),
                membership: Membership {
                    fingerprint,
                    moe_layers,
                    num_experts: cfg.num_experts,
                    expert_bytes,
                    opts: opts.clone(),
                    changing: Mutex::new(()),
                },
            }),
        })
    }

    /// The workers, in placement order.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared.topology().infos()
    }

    /// A handle that admits and removes workers while this backend runs.
    pub fn membership(&self) -> ClusterMembership {
        ClusterMembership {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Which host owns which expert (host `workers().len()` is the coordinator's own share).
    pub fn placement(&self) -> Placement {
        self.shared.topology().placement.clone()
    }

    /// The wire in use.
    pub fn transport(&self) -> Transport {
        self.shared.transport
    }

    /// The shared record of dispatch round trips.
    pub fn stats(&self) -> Arc<DispatchStats> {
        Arc::clone(&self.shared.stats)
    }

    /// A view for status pages that does not keep the backend alive.
    pub fn monitor(&self) -> ClusterMonitor {
        ClusterMonitor {
            shared: Arc::downgrade(&self.shared),
            transport: self.shared.transport,
            stats: Arc::clone(&self.shared.stats),
        }
    }

    /// Round trips of the dispatches recorded so far (one per MoE layer step with remote rows).
    pub fn dispatch_latencies(&self) -> Vec<Duration> {
        self.shared.stats.latencies()
    }

    /// Forgets the recorded round trips.
    pub fn reset_dispatch_latencies(&self) {
        self.shared.stats.reset();
    }

    /// Each worker's counters (or why they could not be had). Call from a plain thread.
    pub fn worker_stats(&self) -> Vec<(String, Result<StatsResponse, String>)> {
        self.monitor().worker_stats(self.shared.rpc_timeout)
    }
}

impl Drop for ClusterExperts {
    fn drop(&mut self) {
        // Safe to drop from async code too: nothing waits for the runtime's tasks.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn experts_err(layer: usize, host: &str, msg: impl Into<String>) -> EngineError {
    EngineError::Experts {
        layer,
        host: host.to_string(),
        msg: msg.into(),
    }
}

/// One worker's request in flight.
struct Call {
    worker: usize,
    rows: Vec<usize>,
    reply: oneshot::Receiver<Reply>,
}

struct ClusterPending<'a> {
    shared: &'a Shared,
    topology: Arc<Topology>,
    layer: usize,
    hidden: &'a [f32],
    rows: &'a [ExpertRow],
    calls: Vec<Call>,
    local_rows: Vec<usize>,
    started: Instant,
}

impl ExpertBackend for ClusterExperts {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> moeshard_engine::Result<Box<dyn PendingExperts + 'a>> {
        let shared = &*self.shared;
        let topology = shared.topology();
        let h = shared.hidden_size;
        if !hidden.len().is_multiple_of(h) {
            return Err(experts_err(
                layer,
                "cluster",
                format!("{} hidden values are not a multiple of {h}", hidden.len()),
            ));
        }
        let n_tokens = hidden.len() / h;
        let owners = topology.placement.layer(layer).ok_or_else(|| {
            experts_err(
                layer,
                "cluster",
                "the layer has no routed experts in the placement",
            )
        })?;
        let mut by_host: Vec<Vec<usize>> = vec![Vec::new(); topology.placement.hosts()];
        for (i, r) in rows.iter().enumerate() {
            let Some(&host) = owners.get(r.expert as usize) else {
                return Err(experts_err(
                    layer,
                    "cluster",
                    format!("row {i} names expert {} of {}", r.expert, owners.len()),
                ));
            };
            if r.token as usize >= n_tokens {
                return Err(experts_err(
                    layer,
                    "cluster",
                    format!("row {i} names token {} of {n_tokens}", r.token),
                ));
            }
            by_host[host].push(i);
        }
        let started = Instant::now();
        let mut calls = Vec::new();
        let n_workers = topology.workers.len();
        for (w, idx) in by_host.iter_mut().enumerate().take(n_workers) {
            if idx.is_empty() {
                continue;
            }
            let req = batch_request(layer, hidden, h, rows, idx);
            let (tx, rx) = oneshot::channel();
            let worker = Arc::clone(&topology.workers[w]);
            let deadline = shared.rpc_timeout;
            shared.handle.spawn(async move {
                let r = with_deadline(deadline, worker.client.compute(req)).await;
                // The receiver is gone only when the step was abandoned.
                let _ = tx.send((r, Instant::now()));
            });
            calls.push(Call {
                worker: w,
                rows: std::mem::take(idx),
                reply: rx,
            });
        }
        let local_rows = by_host
            .get_mut(n_workers)
            .map(std::mem::take)
            .unwrap_or_default();
        Ok(Box::new(ClusterPending {
            shared,
            topology,
            layer,
            hidden,
            rows,
            calls,
            local_rows,
            started,
        }))
    }
}

impl PendingExperts for ClusterPending<'_> {
    fn wait(self: Box<Self>) -> moeshard_engine::Result<Vec<f32>> {
        let c = self.shared;
        let t = &*self.topology;
        let h = c.hidden_size;
        let layer = self.layer;
        let mut out = vec![0f32; self.rows.len() * h];
        if !self.local_rows.is_empty() {
            let local = t.local.as_ref().ok_or_else(|| {
                experts_err(
                    layer,
                    "coordinator",
                    "rows placed locally but no local experts",
                )
            })?;
            let sub: Vec<ExpertRow> = self.local_rows.iter().map(|&i| self.rows[i]).collect();
            let y = local.compute(layer, self.hidden, &sub)?;
            for (k, &i) in self.local_rows.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&y[k * h..(k + 1) * h]);
            }
        }
        let mut last = None;
        for call in self.calls {
            let addr = &t.workers[call.worker].info.addr;
            let (reply, done) = call.reply.blocking_recv().map_err(|_| {
                experts_err(
                    layer,
                    addr,
                    "the request was abandoned (the coordinator is shutting down)",
                )
            })?;
            let reply = reply.map_err(|e| {
                warn!(worker = %addr, layer, "expert request failed: {e}");
                experts_err(layer, addr, e.to_string())
            })?;
            if reply.dtype != Dtype::F32 as i32 {
                return Err(experts_err(
                    layer,
                    addr,
                    format!("reply dtype {} is not f32", reply.dtype),
                ));
            }
            let y = f32_from_le_bytes(&reply.outputs, Some(call.rows.len() * h))
                .map_err(|e| experts_err(layer, addr, format!("reply: {e}")))?;
            for (k, &i) in call.rows.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&y[k * h..(k + 1) * h]);
            }
            last = last.max(Some(done));
        }
        if let Some(done) = last {
            c.stats.record(done.saturating_duration_since(self.started));
        }
        Ok(out)
    }
}
