//! [`ClusterExperts`]: routed experts computed by workers (and optionally a local share), behind
//! the engine's [`ExpertBackend`] so the forward pass cannot tell it from [`LocalExperts`].
//!
//! For every MoE layer, `dispatch` groups the rows by host and starts one request per worker that
//! has rows, carrying only the hidden states of the tokens that worker needs. `wait` computes the
//! local share, then collects the replies and puts every output back at its row's index, so the
//! engine's fixed-order combine gives the same bits as a single process.
//!
//! Failover: every expert has a list of holders (its owner in the placement, then `--replicas`
//! copies, then hosts it was re-homed on). A worker is marked down when a call to it fails or
//! misses its deadline, or when its heartbeat does; calls in flight to it are abandoned at once.
//! The rows it owed are sent again, in the same step, to the next live holder of each expert; an
//! expert with no live holder is first assigned to the surviving worker with the most room (each
//! worker maps it from its own copy of the checkpoint). A row's output does not depend on which
//! host computed it or on what else was in its batch, so the step gives the same bits as without
//! the fault. A worker that comes back at the same address is reconnected by its heartbeat,
//! given its experts again, and takes its load back. Only when no live worker has room for an
//! expert does the step fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moeshard_engine::experts::scatter_rows;
use moeshard_engine::fingerprint::model_fingerprint;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{
    EngineError, ExpertBackend, ExpertRow, LocalExperts, ModelConfig, PendingExperts,
};
use moeshard_proto::auth::ClusterKey;
use moeshard_proto::tensor::f32_from_le_bytes;
use moeshard_proto::v1::{
    AssignRequest, Dtype, ExpertBatchRequest, ExpertBatchResponse, ExpertId, HelloRequest,
    StatsResponse,
};
use moeshard_proto::{PROTOCOL_VERSION, Transport};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::client::{CallError, Client, auth_hint};
use crate::placement::{Holders, HostCapacity, Placement, place, replicate};
use crate::stats::{DispatchStats, percentile};
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
    /// Copies of each expert kept on distinct workers (1: no replicas), as room allows.
    pub replicas: usize,
    /// Time between two heartbeats of a worker (a health call, or a reconnection attempt while
    /// it is down).
    pub heartbeat_interval: Duration,
    /// Deadline of a heartbeat; a worker that misses it is marked down.
    pub heartbeat_timeout: Duration,
    /// The cluster key both ends must prove (TLS 1.3 mutual authentication on both transports);
    /// `None`: unauthenticated links, for loopback and trusted networks only.
    pub cluster_key: Option<ClusterKey>,
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
            replicas: 1,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(2),
            cluster_key: None,
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
    /// Experts it holds (its share, replicas and experts re-homed on it).
    pub experts: usize,
    /// False while it is marked down.
    pub up: bool,
    /// Median round trip of its expert requests (sent to reply), microseconds.
    pub dispatch_p50_us: Option<f64>,
    /// 99th percentile of the same, microseconds.
    pub dispatch_p99_us: Option<f64>,
}

struct Worker {
    addr: String,
    worker_id: Mutex<String>,
    capacity: AtomicU64,
    /// Replaced when the worker rejoins.
    client: RwLock<Arc<Client>>,
    /// True while the worker is down; calls in flight watch it to give up at once.
    down: watch::Sender<bool>,
    /// Every expert asked of it; a rejoin assigns them all again.
    assigned: Mutex<BTreeSet<(usize, usize)>>,
    /// Round trips of its expert requests that were answered.
    dispatch: DispatchStats,
}

impl Worker {
    fn is_up(&self) -> bool {
        !*self.down.borrow()
    }

    fn client(&self) -> Arc<Client> {
        Arc::clone(&self.client.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn assigned(&self) -> BTreeSet<(usize, usize)> {
        self.assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks the worker down; true when it was up.
    fn mark_down(&self, why: &str) -> bool {
        let was_up = !self.down.send_replace(true);
        if was_up {
            warn!(worker = %self.addr, "worker marked down, its experts fail over: {why}");
        }
        was_up
    }

    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            addr: self.addr.clone(),
            worker_id: self
                .worker_id
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            capacity: self.capacity.load(Ordering::Relaxed),
            experts: self
                .assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            up: self.is_up(),
            dispatch_p50_us: None,
            dispatch_p99_us: None,
        }
        .with_latencies(&self.dispatch.latencies())
    }
}

impl WorkerInfo {
    fn with_latencies(self, lat: &[Duration]) -> Self {
        let us = |q| percentile(lat, q).map(|d| d.as_secs_f64() * 1e6);
        WorkerInfo {
            dispatch_p50_us: us(0.5),
            dispatch_p99_us: us(0.99),
            ..self
        }
    }
}

/// Which hosts hold which experts right now: the workers, the coordinator's own share, the
/// placement over them and every expert's holders. Replaced as a whole when the set of workers
/// changes (discovery); a step in flight keeps the one it started with. Failover changes only the
/// holders (and the workers' up/down state), in place.
struct Topology {
    workers: Vec<Arc<Worker>>,
    /// The coordinator's own share, host index `workers.len()` of the placement.
    local: Option<Arc<LocalExperts>>,
    placement: Placement,
    /// Every expert's hosts, in order of preference.
    holders: RwLock<Holders>,
}

impl Topology {
    /// The workers, each with the number of experts it holds in this topology (its share,
    /// replicas and experts re-homed on it).
    fn infos(&self) -> Vec<WorkerInfo> {
        let mut counts = vec![0; self.workers.len()];
        let holders = self.holders.read().unwrap_or_else(|p| p.into_inner());
        for hs in holders.values().flatten() {
            for &h in hs {
                if let Some(c) = counts.get_mut(h) {
                    *c += 1;
                }
            }
        }
        self.workers
            .iter()
            .zip(counts)
            .map(|(w, experts)| WorkerInfo {
                experts,
                ..w.info()
            })
            .collect()
    }
}

/// What the backend, its heartbeats and its monitors share.
struct Shared {
    handle: tokio::runtime::Handle,
    topology: RwLock<Arc<Topology>>,
    hidden_size: usize,
    stats: Arc<DispatchStats>,
    fingerprint: String,
    opts: ClusterOptions,
    moe_layers: Vec<usize>,
    num_experts: usize,
    /// Bytes of one expert's weights.
    expert_bytes: u64,
    /// One change of the set of workers at a time.
    changing: Mutex<()>,
    /// Serialises re-homing so two steps cannot place the same orphan twice.
    rehoming: Mutex<()>,
    failovers: AtomicU64,
}

impl Shared {
    fn topology(&self) -> Arc<Topology> {
        Arc::clone(&self.topology.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether `w` is still a member (heartbeats of removed workers stop).
    fn is_member(&self, w: &Arc<Worker>) -> bool {
        self.topology().workers.iter().any(|x| Arc::ptr_eq(x, w))
    }
}

/// Routed experts on workers, reached over gRPC or QUIC.
pub struct ClusterExperts {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClusterExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterExperts")
            .field("workers", &self.workers())
            .field("transport", &self.shared.opts.transport)
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

/// What a hello established.
struct Hello {
    client: Client,
    worker_id: String,
    capacity: u64,
    /// Bytes it keeps resident when it pages its experts from disk (0: it does not).
    memory_budget: u64,
}

/// Connects to a worker and says hello: the client and the worker's answer. A failure to connect,
/// or a transport failure during the hello (how QUIC reports a refused key: the handshake
/// completes on our side first), is `Unreachable` with the cluster-key hint; a refusal the worker
/// states is a failed `hello` call.
async fn connect_and_hello(
    addr: &str,
    transport: Transport,
    (connect_timeout, rpc_timeout): (Duration, Duration),
    coordinator_id: &str,
    key: Option<&ClusterKey>,
) -> Result<(Client, moeshard_proto::v1::HelloResponse)> {
    let unreachable = |e: CallError| CoordinatorError::Unreachable {
        worker: addr.to_string(),
        msg: auth_hint(e.to_string(), key.is_some()),
    };
    let client = with_deadline(
        connect_timeout,
        Client::connect(addr, transport, connect_timeout, key),
    )
    .await
    .map_err(unreachable)?;
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: coordinator_id.to_string(),
    };
    let hello = with_deadline(rpc_timeout, client.hello(req))
        .await
        .map_err(|e| match e {
            CallError::Status { .. } | CallError::Protocol(_) => CoordinatorError::Call {
                worker: addr.to_string(),
                call: "hello",
                msg: e.to_string(),
            },
            e => unreachable(e),
        })?;
    Ok((client, hello))
}

/// Connects to one worker and exchanges hellos; checks protocol and model.
async fn hello(addr: &str, fingerprint: &str, opts: &ClusterOptions) -> Result<Hello> {
    let (client, hello) = connect_and_hello(
        addr,
        opts.transport,
        (opts.connect_timeout, opts.rpc_timeout),
        &opts.coordinator_id,
        opts.cluster_key.as_ref(),
    )
    .await?;
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
    Ok(Hello {
        client,
        worker_id: hello.worker_id,
        capacity: hello.capacity_bytes,
        memory_budget: hello.memory_budget_bytes,
    })
}

/// Assigns a worker experts (they add to what it hosts) and waits until it reports ready.
async fn assign(
    addr: &str,
    client: &Client,
    fingerprint: &str,
    experts: &BTreeSet<(usize, usize)>,
    deadline: Duration,
) -> Result<()> {
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
            worker: addr.to_string(),
            call,
            msg: e.to_string(),
        }
    };
    with_deadline(deadline, client.assign(req))
        .await
        .map_err(call_err("assign"))?;
    let health = with_deadline(deadline, client.health())
        .await
        .map_err(call_err("health"))?;
    if !health.ready {
        return Err(CoordinatorError::NotReady {
            worker: addr.to_string(),
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

/// One heartbeat loop per worker: a health call while it is up (a miss marks it down), a
/// reconnection attempt while it is down (hello, then all its experts again). Ends when the
/// backend is dropped or the worker is removed.
async fn heartbeat(shared: Weak<Shared>, worker: Arc<Worker>) {
    let (interval, timeout) = match shared.upgrade() {
        Some(s) => (s.opts.heartbeat_interval, s.opts.heartbeat_timeout),
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.is_member(&worker) {
            return;
        }
        if worker.is_up() {
            let client = worker.client();
            match with_deadline(timeout, client.health()).await {
                Ok(h) => {
                    let want = worker.assigned().len();
                    if (h.hosted_experts as usize) < want {
                        worker.mark_down(&format!(
                            "it hosts {} experts of the {want} assigned (restarted?)",
                            h.hosted_experts
                        ));
                    }
                }
                Err(e) => {
                    worker.mark_down(&format!("heartbeat: {e}"));
                }
            }
        } else {
            match rejoin(&shared, &worker).await {
                Ok(()) => {
                    info!(worker = %worker.addr, "worker rejoined and takes its load again");
                }
                Err(e) => debug!(worker = %worker.addr, "still down: {e}"),
            }
        }
    }
}

/// Reconnects a down worker, checks it serves the same model and gives it its experts again.
async fn rejoin(shared: &Shared, worker: &Worker) -> Result<()> {
    let h = hello(&worker.addr, &shared.fingerprint, &shared.opts).await?;
    let experts = worker.assigned();
    if !experts.is_empty() {
        assign(
            &worker.addr,
            &h.client,
            &shared.fingerprint,
            &experts,
            shared.opts.rpc_timeout,
        )
        .await?;
    }
    *worker.worker_id.lock().unwrap_or_else(|p| p.into_inner()) = h.worker_id;
    worker.capacity.store(h.capacity, Ordering::Relaxed);
    *worker.client.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(h.client);
    worker.down.send_replace(false);
    Ok(())
}

impl ClusterExperts {
    /// Connects to every worker, checks protocol and model, places the experts (and their
    /// replicas), assigns them and waits until every worker is ready; then starts the heartbeats.
    /// Call from a plain thread, not from async code.
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
        let hellos: Vec<Hello> = runtime.block_on(async {
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

        let mut hosts: Vec<HostCapacity> = opts
            .workers
            .iter()
            .zip(&hellos)
            .map(|(addr, h)| HostCapacity {
                name: addr.clone(),
                capacity: h.capacity,
            })
            .collect();
        let capacities: Vec<u64> = hellos.iter().map(|h| h.capacity).collect();
        if let Some(capacity) = opts.local_capacity {
            hosts.push(HostCapacity {
                name: "coordinator".into(),
                capacity,
            });
        }
        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
        let expert_bytes = expert_bytes(cfg, ckpt)?;
        // Workers that page from disk get shares that balance their expected reads.
        let mut budgets: Vec<Option<u64>> = hellos
            .iter()
            .map(|h| (h.memory_budget > 0).then_some(h.memory_budget))
            .collect();
        budgets.resize(hosts.len(), None);
        let need = (moe_layers.len() as u64)
            .saturating_mul(cfg.num_experts as u64)
            .saturating_mul(expert_bytes);
        let hosts = crate::placement::paged_capacities(&hosts, &budgets, need);
        let placement = place(&hosts, &moe_layers, cfg.num_experts, expert_bytes)?;
        let holders = replicate(&placement, &capacities, expert_bytes, opts.replicas, &[]);
        let workers: Vec<Arc<Worker>> = opts
            .workers
            .iter()
            .zip(hellos)
            .map(|(addr, h)| new_worker(addr, h))
            .collect();
        runtime.block_on(assign_holders(
            &workers,
            &holders,
            &fingerprint,
            opts.rpc_timeout,
        ))?;

        let local = match opts.local_capacity {
            Some(_) => Some(Arc::new(LocalExperts::load(
                cfg,
                ckpt,
                placement.experts_of(workers.len()),
            )?)),
            None => None,
        };
        for w in &workers {
            let i = w.info();
            info!(
                worker = %i.addr,
                id = %i.worker_id,
                experts = i.experts,
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
        let shared = Arc::new(Shared {
            handle,
            topology: RwLock::new(Arc::new(Topology {
                workers,
                local,
                placement,
                holders: RwLock::new(holders),
            })),
            hidden_size: cfg.hidden_size,
            stats: Arc::new(DispatchStats::default()),
            fingerprint,
            opts: opts.clone(),
            moe_layers,
            num_experts: cfg.num_experts,
            expert_bytes,
            changing: Mutex::new(()),
            rehoming: Mutex::new(()),
            failovers: AtomicU64::new(0),
        });
        for w in &shared.topology().workers {
            runtime.spawn(heartbeat(Arc::downgrade(&shared), Arc::clone(w)));
        }
        Ok(ClusterExperts {
            runtime: Some(runtime),
            shared,
        })
    }

    /// The workers, in placement order.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared.topology().infos()
    }

    /// Which host owns which expert (host `workers().len()` is the coordinator's own share);
    /// replicas and failover add holders (see [`Self::holders`]).
    pub fn placement(&self) -> Placement {
        self.shared.topology().placement.clone()
    }

    /// The hosts of every expert now, in order of preference.
    pub fn holders(&self) -> Holders {
        self.shared
            .topology()
            .holders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rows sent again to another host because their worker failed, since start.
    pub fn failovers(&self) -> u64 {
        self.shared.failovers.load(Ordering::Relaxed)
    }

    /// A handle that admits and removes workers while this backend runs.
    pub fn membership(&self) -> ClusterMembership {
        ClusterMembership {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// A view for status pages that does not keep the backend alive.
    pub fn monitor(&self) -> ClusterMonitor {
        ClusterMonitor {
            shared: Arc::downgrade(&self.shared),
            transport: self.shared.opts.transport,
            stats: Arc::clone(&self.shared.stats),
        }
    }

    /// The wire in use.
    pub fn transport(&self) -> Transport {
        self.shared.opts.transport
    }

    /// The shared record of dispatch round trips.
    pub fn stats(&self) -> Arc<DispatchStats> {
        Arc::clone(&self.shared.stats)
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
        self.monitor().worker_stats(self.shared.opts.rpc_timeout)
    }
}

fn new_worker(addr: &str, h: Hello) -> Arc<Worker> {
    Arc::new(Worker {
        addr: addr.to_string(),
        worker_id: Mutex::new(h.worker_id),
        capacity: AtomicU64::new(h.capacity),
        client: RwLock::new(Arc::new(h.client)),
        down: watch::Sender::new(false),
        assigned: Mutex::new(BTreeSet::new()),
        dispatch: DispatchStats::default(),
    })
}

/// Assigns every worker the experts `holders` gives it (they add to what it hosts), all at once,
/// and records them as assigned.
async fn assign_holders(
    workers: &[Arc<Worker>],
    holders: &Holders,
    fingerprint: &str,
    deadline: Duration,
) -> Result<()> {
    let n = workers.len();
    let mut sets = vec![BTreeSet::new(); n];
    for (&l, experts) in holders {
        for (e, hs) in experts.iter().enumerate() {
            for &h in hs.iter().filter(|&&h| h < n) {
                sets[h].insert((l, e));
            }
        }
    }
    let tasks: Vec<_> = workers
        .iter()
        .zip(sets)
        .filter(|(_, set)| !set.is_empty())
        .map(|(w, set)| {
            let (w, fp) = (Arc::clone(w), fingerprint.to_string());
            tokio::spawn(async move {
                assign(&w.addr, &w.client(), &fp, &set, deadline).await?;
                w.assigned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(set);
                Ok::<_, CoordinatorError>(())
            })
        })
        .collect();
    for (t, w) in tasks.into_iter().zip(workers) {
        t.await.map_err(|e| CoordinatorError::Call {
            worker: w.addr.clone(),
            call: "assign",
            msg: e.to_string(),
        })??;
    }
    Ok(())
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
                .map(|w| w.addr.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Admits the worker at `addr` (it must prove the cluster key if there is one, and answer
    /// hello with our protocol and model) and re-places the experts to include it. `Ok(false)`:
    /// it is already a member.
    pub fn admit(&self, addr: &str) -> Result<bool> {
        let s = self.shared()?;
        let _one = s.changing.lock().unwrap_or_else(|p| p.into_inner());
        let t = s.topology();
        if t.workers.iter().any(|w| w.addr == addr) {
            return Ok(false);
        }
        let h = s.handle.block_on(hello(addr, &s.fingerprint, &s.opts))?;
        let w = new_worker(addr, h);
        let mut workers = t.workers.clone();
        workers.push(Arc::clone(&w));
        replace(&s, &t, workers)?;
        s.handle.spawn(heartbeat(Arc::downgrade(&s), w));
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
        let _one = s.changing.lock().unwrap_or_else(|p| p.into_inner());
        let t = s.topology();
        if !t.workers.iter().any(|w| w.addr == addr) {
            return Ok(false);
        }
        let workers: Vec<Arc<Worker>> = t
            .workers
            .iter()
            .filter(|w| w.addr != addr)
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
                        match with_deadline(deadline, w.client().health()).await {
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
                    w.addr.clone(),
                    t.await.unwrap_or_else(|e| Err(e.to_string())),
                ));
            }
            out
        })
    }
}

/// Places the experts over `workers` (and the coordinator's own share, whose experts cannot
/// move), assigns each worker its experts (and replicas) and switches the topology over.
fn replace(s: &Shared, old: &Topology, workers: Vec<Arc<Worker>>) -> Result<()> {
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
            name: w.addr.clone(),
            capacity: w.capacity.load(Ordering::Relaxed),
        })
        .collect();
    let capacities: Vec<u64> = hosts.iter().map(|h| h.capacity).collect();
    let placement = place(&hosts, &s.moe_layers, s.num_experts, s.expert_bytes)?;
    let holders = replicate(
        &placement,
        &capacities,
        s.expert_bytes,
        s.opts.replicas,
        &[],
    );
    s.handle.block_on(assign_holders(
        &workers,
        &holders,
        &s.fingerprint,
        s.opts.rpc_timeout,
    ))?;
    let fresh = Arc::new(Topology {
        workers,
        local: None,
        placement,
        holders: RwLock::new(holders),
    });
    *s.topology.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    Ok(())
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
                        if !w.is_up() {
                            return Err("the worker is down".to_string());
                        }
                        with_deadline(deadline, w.client().stats())
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for (w, t) in workers.iter().zip(tasks) {
                let r = t.await.unwrap_or_else(|e| Err(e.to_string()));
                out.push((w.addr.clone(), r));
            }
            out
        })
    }
}

/// Connects to a worker and exchanges hellos, assigning nothing: how `moeshard doctor` checks that
/// a worker is reachable (through the same connection set-up as the coordinator's). The caller
/// compares the protocol version and the model fingerprint.
pub async fn probe_worker(
    addr: &str,
    transport: Transport,
    timeout: Duration,
    coordinator_id: &str,
) -> Result<moeshard_proto::v1::HelloResponse> {
    probe_worker_with_key(addr, transport, timeout, coordinator_id, None).await
}

/// [`probe_worker`] proving a cluster key.
pub async fn probe_worker_with_key(
    addr: &str,
    transport: Transport,
    timeout: Duration,
    coordinator_id: &str,
    key: Option<&ClusterKey>,
) -> Result<moeshard_proto::v1::HelloResponse> {
    let (_, hello) =
        connect_and_hello(addr, transport, (timeout, timeout), coordinator_id, key).await?;
    Ok(hello)
}

impl Shared {
    /// Groups `idx` (indices into `rows`) by the first live holder of each row's expert,
    /// re-homing experts that have none. Entry `workers.len()` is the local share.
    fn route(
        &self,
        t: &Topology,
        layer: usize,
        rows: &[ExpertRow],
        idx: &[usize],
    ) -> moeshard_engine::Result<Vec<Vec<usize>>> {
        let workers = &t.workers;
        let n = workers.len();
        for _attempt in 0..=n + 1 {
            let mut by_host: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
            let mut orphans = BTreeSet::new();
            {
                let holders = t.holders.read().unwrap_or_else(|p| p.into_inner());
                let Some(experts) = holders.get(&layer) else {
                    return Err(experts_err(
                        layer,
                        "cluster",
                        "the layer has no routed experts in the placement",
                    ));
                };
                for &i in idx {
                    let e = rows[i].expert as usize;
                    let Some(hs) = experts.get(e) else {
                        return Err(experts_err(
                            layer,
                            "cluster",
                            format!("row {i} names expert {e} of {}", experts.len()),
                        ));
                    };
                    match hs.iter().find(|&&h| h >= n || workers[h].is_up()) {
                        Some(&h) => by_host[h.min(n)].push(i),
                        None => {
                            orphans.insert(e);
                        }
                    }
                }
            }
            if orphans.is_empty() {
                return Ok(by_host);
            }
            self.rehome(t, layer, &orphans)?;
        }
        Err(experts_err(
            layer,
            "cluster",
            "workers kept failing while their experts were re-homed",
        ))
    }

    /// Assigns each of `orphans` (experts of `layer` with no live holder) to the live worker with
    /// the most room left, and records it as a holder.
    fn rehome(
        &self,
        t: &Topology,
        layer: usize,
        orphans: &BTreeSet<usize>,
    ) -> moeshard_engine::Result<()> {
        let _guard = self.rehoming.lock().unwrap_or_else(|p| p.into_inner());
        let shared = self;
        let workers = &t.workers;
        let n = workers.len();
        let bytes = shared.expert_bytes;
        loop {
            // Another step may have re-homed some meanwhile.
            let still: Vec<usize> = {
                let holders = t.holders.read().unwrap_or_else(|p| p.into_inner());
                let hs = holders.get(&layer);
                orphans
                    .iter()
                    .copied()
                    .filter(|&e| {
                        hs.and_then(|v| v.get(e))
                            .is_none_or(|hs| !hs.iter().any(|&h| h >= n || workers[h].is_up()))
                    })
                    .collect()
            };
            if still.is_empty() {
                return Ok(());
            }
            let mut room: Vec<Option<u64>> = workers
                .iter()
                .map(|w| {
                    w.is_up().then(|| {
                        w.capacity
                            .load(Ordering::Relaxed)
                            .saturating_sub(bytes.saturating_mul(w.assigned().len() as u64))
                    })
                })
                .collect();
            let mut plan: BTreeMap<usize, BTreeSet<(usize, usize)>> = BTreeMap::new();
            for &e in &still {
                let target = (0..n)
                    .filter(|&w| {
                        room[w].is_some_and(|r| r >= bytes)
                            && !workers[w].assigned().contains(&(layer, e))
                    })
                    .max_by(|&a, &b| room[a].cmp(&room[b]).then(b.cmp(&a)));
                let Some(t) = target else {
                    let down: Vec<&str> = workers
                        .iter()
                        .filter(|w| !w.is_up())
                        .map(|w| w.addr.as_str())
                        .collect();
                    return Err(experts_err(
                        layer,
                        &down.join(","),
                        format!(
                            "expert {e} has no live holder (down: {}) and no live worker has \
                             room for it ({bytes} bytes)",
                            down.join(", ")
                        ),
                    ));
                };
                if let Some(r) = room[t].as_mut() {
                    *r -= bytes;
                }
                plan.entry(t).or_default().insert((layer, e));
            }
            let results: Vec<(usize, Result<()>)> = self.handle.block_on(async {
                let tasks: Vec<_> = plan
                    .iter()
                    .map(|(&t, set)| {
                        let w = Arc::clone(&workers[t]);
                        let (fp, set, deadline) = (
                            shared.fingerprint.clone(),
                            set.clone(),
                            shared.opts.rpc_timeout,
                        );
                        (
                            t,
                            tokio::spawn(async move {
                                assign(&w.addr, &w.client(), &fp, &set, deadline).await
                            }),
                        )
                    })
                    .collect();
                let mut out = Vec::new();
                for (t, task) in tasks {
                    out.push((
                        t,
                        task.await.unwrap_or_else(|e| {
                            Err(CoordinatorError::Call {
                                worker: workers[t].addr.clone(),
                                call: "assign",
                                msg: e.to_string(),
                            })
                        }),
                    ));
                }
                out
            });
            for (target, r) in results {
                let w = &workers[target];
                match r {
                    Ok(()) => {
                        let set = &plan[&target];
                        w.assigned
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend(set.iter().copied());
                        let mut holders = t.holders.write().unwrap_or_else(|p| p.into_inner());
                        if let Some(v) = holders.get_mut(&layer) {
                            for &(_, e) in set {
                                if let Some(hs) = v.get_mut(e)
                                    && !hs.contains(&target)
                                {
                                    hs.push(target);
                                }
                            }
                        }
                        info!(
                            worker = %w.addr,
                            layer,
                            experts = ?set.iter().map(|&(_, e)| e).collect::<Vec<_>>(),
                            "experts re-homed"
                        );
                    }
                    Err(e) => {
                        w.mark_down(&format!("assigning re-homed experts: {e}"));
                    }
                }
            }
        }
    }

    /// Starts one request per worker of `groups` (entry `workers.len()`, the local share, is
    /// left out).
    fn start_calls(
        &self,
        t: &Topology,
        layer: usize,
        hidden: &[f32],
        rows: &[ExpertRow],
        groups: &mut [Vec<usize>],
    ) -> Vec<Call> {
        let h = self.hidden_size;
        let n_workers = t.workers.len();
        let mut calls = Vec::new();
        for (w, idx) in groups.iter_mut().enumerate().take(n_workers) {
            if idx.is_empty() {
                continue;
            }
            let req = batch_request(layer, hidden, h, rows, idx);
            let (tx, rx) = oneshot::channel();
            let worker = Arc::clone(&t.workers[w]);
            let deadline = self.opts.rpc_timeout;
            self.handle.spawn(async move {
                let mut down = worker.down.subscribe();
                let client = worker.client();
                let r = tokio::select! {
                    r = with_deadline(deadline, client.compute(req)) => r,
                    _ = down.wait_for(|d| *d) => Err(CallError::Connection(
                        "the worker was marked down (missed heartbeat)".into(),
                    )),
                };
                // The receiver is gone only when the step was abandoned.
                let _ = tx.send((r, Instant::now()));
            });
            calls.push(Call {
                worker: w,
                rows: std::mem::take(idx),
                reply: rx,
            });
        }
        calls
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
        if let Some((i, r)) = rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.token as usize >= n_tokens)
        {
            return Err(experts_err(
                layer,
                "cluster",
                format!("row {i} names token {} of {n_tokens}", r.token),
            ));
        }
        let all: Vec<usize> = (0..rows.len()).collect();
        let mut groups = shared.route(&topology, layer, rows, &all)?;
        let started = Instant::now();
        let calls = shared.start_calls(&topology, layer, hidden, rows, &mut groups);
        let local_rows = groups.pop().unwrap_or_default();
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

/// Why a worker's reply could not be used: `failover` when another host may answer instead.
struct Failed {
    failover: bool,
    msg: String,
}

impl PendingExperts for ClusterPending<'_> {
    fn wait(mut self: Box<Self>) -> moeshard_engine::Result<Vec<f32>> {
        let c = self.shared;
        let t = Arc::clone(&self.topology);
        let h = c.hidden_size;
        let layer = self.layer;
        let workers = &t.workers;
        let mut out = vec![0f32; self.rows.len() * h];
        let mut local_rows = std::mem::take(&mut self.local_rows);
        let mut calls = std::mem::take(&mut self.calls);
        let mut last = None;
        let max_rounds = 2 * workers.len() + 2;
        for round in 0.. {
            if !local_rows.is_empty() {
                let local = t.local.as_ref().ok_or_else(|| {
                    experts_err(
                        layer,
                        "coordinator",
                        "rows placed locally but no local experts",
                    )
                })?;
                let sub: Vec<ExpertRow> = local_rows.iter().map(|&i| self.rows[i]).collect();
                let y = local.compute(layer, self.hidden, &sub)?;
                scatter_rows(&mut out, &local_rows, &y, h);
                local_rows.clear();
            }
            let mut retry = Vec::new();
            let mut last_failure = None;
            for call in calls.drain(..) {
                let worker = &workers[call.worker];
                let addr = &worker.addr;
                let got = call
                    .reply
                    .blocking_recv()
                    .map_err(|_| Failed {
                        failover: false,
                        msg: "the request was abandoned (the coordinator is shutting down)".into(),
                    })
                    .and_then(|(reply, done)| {
                        check_reply(reply, call.rows.len() * h).map(|y| (y, done))
                    });
                match got {
                    Ok((y, done)) => {
                        worker
                            .dispatch
                            .record(done.saturating_duration_since(self.started));
                        scatter_rows(&mut out, &call.rows, &y, h);
                        last = last.max(Some(done));
                    }
                    Err(f) if f.failover => {
                        warn!(worker = %addr, layer, rows = call.rows.len(),
                              "expert request failed, sending its rows elsewhere: {}", f.msg);
                        worker.mark_down(&f.msg);
                        c.failovers
                            .fetch_add(call.rows.len() as u64, Ordering::Relaxed);
                        retry.extend_from_slice(&call.rows);
                        last_failure = Some((addr.clone(), f.msg));
                    }
                    Err(f) => {
                        warn!(worker = %addr, layer, "expert request failed: {}", f.msg);
                        return Err(experts_err(layer, addr, f.msg));
                    }
                }
            }
            if retry.is_empty() {
                break;
            }
            if round + 1 >= max_rounds {
                let (addr, msg) = last_failure.unwrap_or_default();
                return Err(experts_err(
                    layer,
                    &addr,
                    format!("gave up after {max_rounds} rounds of failover: {msg}"),
                ));
            }
            retry.sort_unstable();
            let mut groups = c.route(&t, layer, self.rows, &retry).map_err(|e| match e {
                EngineError::Experts { layer, host, msg } => {
                    let (addr, why) = last_failure.clone().unwrap_or_default();
                    EngineError::Experts {
                        layer,
                        host: if host.is_empty() { addr } else { host },
                        msg: format!("{msg}; the last failure: {why}"),
                    }
                }
                other => other,
            })?;
            calls = c.start_calls(&t, layer, self.hidden, self.rows, &mut groups);
            local_rows = groups.pop().unwrap_or_default();
        }
        if let Some(done) = last {
            c.stats.record(done.saturating_duration_since(self.started));
        }
        Ok(out)
    }
}

/// A worker's reply checked: f32 outputs of exactly `values` values.
fn check_reply(
    reply: Result<ExpertBatchResponse, CallError>,
    values: usize,
) -> Result<Vec<f32>, Failed> {
    let reply = reply.map_err(|e| Failed {
        // A request the worker calls malformed would be malformed anywhere.
        failover: !matches!(
            e,
            CallError::Status {
                code: tonic::Code::InvalidArgument,
                ..
            }
        ),
        msg: e.to_string(),
    })?;
    if reply.dtype != Dtype::F32 as i32 {
        return Err(Failed {
            failover: true,
            msg: format!("reply dtype {} is not f32", reply.dtype),
        });
    }
    f32_from_le_bytes(&reply.outputs, Some(values)).map_err(|e| Failed {
        failover: true,
        msg: format!("reply: {e}"),
    })
}
