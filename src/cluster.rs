//! The cluster parts of the CLI: `moeshard worker`, and opening the expert backend that
//! `--workers` / `--local-workers` ask for.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use moeshard_coordinator::{
    ClusterExperts, ClusterMembership, ClusterMonitor, ClusterOptions, DispatchStats, LocalWorkers,
    LocalWorkersConfig, WorkerInfo,
};
use moeshard_engine::paged::PagedExperts;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{DType, ExpertBackend, LocalExperts, Model, ModelConfig};
use moeshard_proto::auth::ClusterKey;
use moeshard_proto::{Transport, listening_line};
use moeshard_worker::WorkerCore;
use moeshard_worker::manifest::{self, MANIFEST_FILE};

use crate::cli::ClusterArgs;

#[derive(Args)]
pub(crate) struct WorkerArgs {
    /// This worker's copy of the Hugging Face checkpoint directory, or of the .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070 (port 0 picks a free port; the address line on
    /// stdout tells which).
    #[arg(long)]
    listen: SocketAddr,
    /// Wire transport.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "quic"])]
    transport: String,
    /// Bytes of expert weights to offer (default: enough for every routed expert).
    #[arg(long)]
    capacity: Option<u64>,
    #[command(flatten)]
    synthetic: crate::cli::SyntheticArgs,
    #[command(flatten)]
    quant: crate::cli::QuantArgs,
    #[command(flatten)]
    paged: crate::cli::PagedArgs,
    /// File holding the cluster secret: only peers that prove it are served (TLS 1.3 mutual
    /// authentication on both transports). Without it, any peer that reaches --listen can use the
    /// worker.
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// Manifest the assigned tensors are checked against before they are served (default:
    /// moeshard.manifest.json beside the checkpoint, when there is one).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Exit when stdin reaches end of file (for workers started by a coordinator, so they never
    /// outlive it).
    #[arg(long)]
    exit_with_parent: bool,
    /// `auto`: announce this worker on the local network (mDNS) for coordinators started with
    /// `--discover`; the announcement is withdrawn on SIGTERM or Ctrl-C.
    #[arg(long, value_parser = ["auto"])]
    join: Option<String>,
}

fn transport(s: &str) -> Result<Transport> {
    s.parse().map_err(|e: String| anyhow!(e))
}

/// `moeshard worker`: serves a checkpoint's experts until killed (or until stdin closes).
pub(crate) fn cmd_worker(a: WorkerArgs) -> Result<()> {
    let transport = transport(&a.transport)?;
    let (cfg, ckpt) = open_checkpoint(&a.model, &a.synthetic, &a.quant)?;
    let core = WorkerCore::from_checkpoint(&a.model, cfg, ckpt, a.capacity)
        .with_context(|| format!("opening the checkpoint in {}", a.model.display()))?;
    let core = match &a.manifest {
        Some(m) => core.with_manifest(m)?,
        None => core,
    };
    let core = match a.paged.options() {
        Some(o) => core.with_memory_budget(o)?,
        None => core,
    };
    let key = a
        .cluster_key_file
        .as_deref()
        .map(ClusterKey::from_file)
        .transpose()?;
    if a.exit_with_parent {
        std::thread::spawn(|| {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        tracing::info!("stdin closed: the parent is gone, exiting");
                        std::process::exit(0);
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let join = a.join.is_some();
    let announcement = std::sync::Mutex::new(None);
    let mut announce_error = None;
    let serve = moeshard_worker::serve(Arc::new(core), a.listen, transport, key, |addr| {
        // The one line on stdout: a parent reads the port from it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", listening_line(addr, transport));
        let _ = out.flush();
        tracing::info!(%addr, %transport, "worker listening");
        if join {
            match crate::discovery::announce(addr, transport) {
                Ok(a) => *announcement.lock().unwrap_or_else(|p| p.into_inner()) = Some(a),
                Err(e) => announce_error = Some(e),
            }
        }
    });
    runtime.block_on(async {
        if !join {
            return serve.await.map_err(anyhow::Error::from);
        }
        // Announced workers end on a signal, so the announcement is withdrawn.
        tokio::select! {
            r = serve => r.map_err(anyhow::Error::from),
            _ = crate::discovery::shutdown_signal() => Ok(()),
        }
    })?;
    if let Some(e) = announce_error {
        return Err(e);
    }
    drop(announcement);
    Ok(())
}

/// This process's paged experts, shared with whoever reports their counters.
pub(crate) struct SharedPaged(pub Arc<PagedExperts>);

impl ExpertBackend for SharedPaged {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [moeshard_engine::ExpertRow],
    ) -> moeshard_engine::Result<Box<dyn moeshard_engine::PendingExperts + 'a>> {
        self.0.dispatch(layer, hidden, rows)
    }
}

/// The cluster behind a loaded backend, for reports and benchmarks.
pub(crate) struct ClusterInfo {
    /// Round trips of the expert dispatches (one per MoE layer step that went to workers).
    pub dispatch: Arc<DispatchStats>,
    /// The workers, in placement order.
    pub workers: Vec<WorkerInfo>,
    /// The wire.
    pub transport: Transport,
    /// The live view of the workers (for the cluster page).
    pub monitor: ClusterMonitor,
    /// Admits and removes workers while the backend runs (discovery).
    pub membership: ClusterMembership,
}

impl ClusterInfo {
    /// Logs the workers and the dispatch round trips so far (at info level).
    pub fn log_summary(&self) {
        let lat = self.dispatch.latencies();
        let us = |q| moeshard_coordinator::percentile(&lat, q).map(|d| d.as_secs_f64() * 1e6);
        for w in &self.workers {
            tracing::info!(worker = %w.addr, id = %w.worker_id, experts = w.experts, "worker");
        }
        tracing::info!(
            transport = %self.transport,
            workers = self.workers.len(),
            dispatches = lat.len(),
            p50_us = us(0.5),
            p99_us = us(0.99),
            "expert dispatch round trips"
        );
    }
}

/// A loaded model and the backend its routed experts run on.
///
/// Fields drop in order: the backend (and its connections) before the local worker processes.
pub(crate) struct Loaded {
    pub model: Model,
    pub experts: Box<dyn ExpertBackend>,
    /// Set when the experts run on workers.
    pub cluster: Option<ClusterInfo>,
    /// Set when this process pages its experts (`--memory-budget` without workers).
    pub paged: Option<Arc<PagedExperts>>,
    _local_workers: Option<LocalWorkers>,
}

/// Opens a model's config and checkpoint (real or synthetic), with the quantization asked.
pub(crate) fn open_checkpoint(
    dir: &Path,
    syn: &crate::cli::SyntheticArgs,
    quant: &crate::cli::QuantArgs,
) -> Result<(ModelConfig, Checkpoint)> {
    let (cfg, mut ckpt) = if syn.synthetic {
        let cfg = moeshard_engine::model::synthetic_config(dir, syn.layers)?;
        let file = if dir.is_dir() {
            dir.join("config.json")
        } else {
            dir.to_path_buf()
        };
        let ckpt = Checkpoint::synthetic(&file, &cfg, DType::BF16, syn.synthetic_seed);
        (cfg, ckpt)
    } else {
        Checkpoint::open_with_config(dir)?
    };
    ckpt.set_quantize(quant.spec());
    ckpt.set_load_mode(quant.load_mode());
    Ok((cfg, ckpt))
}

/// Checks the tensors this process computes with against the checkpoint's manifest (`explicit`,
/// else `DIR/moeshard.manifest.json` when present): the dense part, and the routed experts too
/// when `experts` (they run in-process). A mismatch is an error naming the tensor and its file;
/// no manifest means nothing to check.
fn verify_own_tensors(
    dir: &Path,
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    explicit: Option<&Path>,
    experts: bool,
) -> Result<()> {
    if ckpt.is_synthetic() {
        return Ok(());
    }
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None if dir.join(MANIFEST_FILE).is_file() => dir.join(MANIFEST_FILE),
        None => return Ok(()),
    };
    let m = manifest::load(&path)?;
    // A manifest describes the files as stored, before any quantization on load.
    let q = ckpt.quantize();
    ckpt.set_quantize(None);
    let stored = moeshard_engine::fingerprint::model_fingerprint(dir, ckpt);
    ckpt.set_quantize(q);
    let stored = stored?;
    if m.model_fingerprint != stored {
        bail!(
            "{} is for model {}, the checkpoint is model {stored}",
            path.display(),
            m.model_fingerprint
        );
    }
    let routed: std::collections::BTreeSet<String> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .flat_map(|(l, e)| {
            let n = cfg.expert_tensor_names(l, e);
            [n.gate_proj, n.up_proj, n.down_proj]
        })
        .collect();
    let names: Vec<String> = ckpt
        .names()
        .filter(|n| experts || !routed.contains(*n))
        .map(str::to_string)
        .collect();
    let started = std::time::Instant::now();
    let bad = manifest::verify(ckpt, &m, Some(&names), &|_| {})?;
    if let Some(first) = bad.first() {
        for b in &bad {
            tracing::warn!("{b}");
        }
        bail!(
            "tensor {} in {} does not match {}: {}{}",
            first.tensor,
            first.file.display(),
            path.display(),
            first.what,
            match bad.len() - 1 {
                0 => String::new(),
                n => format!(" (and {n} more tensors)"),
            }
        );
    }
    tracing::info!(
        tensors = names.len(),
        ms = started.elapsed().as_millis() as u64,
        manifest = %path.display(),
        "the tensors computed here match the manifest"
    );
    Ok(())
}

/// Loads the dense model and opens the expert backend the cluster options ask for.
pub(crate) fn load(dir: &Path, args: &ClusterArgs) -> Result<Loaded> {
    let syn = &args.synthetic;
    let in_process = args.workers.is_empty() && args.local_workers == 0;
    let (model, ckpt) = open_checkpoint(dir, syn, &args.quant)
        .and_then(|(cfg, mut ckpt)| {
            verify_own_tensors(dir, &cfg, &mut ckpt, args.manifest.as_deref(), in_process)?;
            Ok((Model::from_checkpoint(cfg, &ckpt)?, ckpt))
        })
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    if in_process {
        if let Some(opts) = args.paged.options() {
            let all: Vec<_> = model
                .cfg
                .moe_layers()
                .flat_map(|l| (0..model.cfg.num_experts).map(move |e| (l, e)))
                .collect();
            let paged = Arc::new(
                PagedExperts::new(&model.cfg, &ckpt, all, opts)
                    .with_context(|| format!("paging the experts in {}", dir.display()))?,
            );
            return Ok(Loaded {
                model,
                experts: Box::new(SharedPaged(Arc::clone(&paged))),
                cluster: None,
                paged: Some(paged),
                _local_workers: None,
            });
        }
        let experts = LocalExperts::load_all(&model.cfg, &ckpt)
            .with_context(|| format!("loading the experts in {}", dir.display()))?;
        return Ok(Loaded {
            model,
            experts: Box::new(experts),
            cluster: None,
            paged: None,
            _local_workers: None,
        });
    }
    if args.paged.memory_budget.is_some() && args.local_workers == 0 {
        bail!(
            "--memory-budget pages the experts of this process or of its --local-workers; remote \
             workers take their own (moeshard worker --memory-budget)"
        );
    }
    if args.paged.memory_budget.is_some() && args.coordinator_capacity.is_some() {
        bail!(
            "--memory-budget with --local-workers applies to each local worker; the \
             coordinator's own share (--coordinator-capacity) is not paged: drop one of them"
        );
    }
    let transport = transport(&args.transport)?;
    let secs = |v: f64, flag: &str| {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow!("{flag} must be a positive number of seconds"))
    };
    let rpc_timeout = secs(args.rpc_timeout, "--rpc-timeout")?;
    let connect_timeout = secs(args.connect_timeout, "--connect-timeout")?;
    let mut cluster_key = args
        .cluster_key_file
        .as_deref()
        .map(ClusterKey::from_file)
        .transpose()?;
    let local_workers = if args.local_workers > 0 {
        let exe = std::env::current_exe().context("finding the moeshard binary")?;
        let mut cfg =
            LocalWorkersConfig::new(exe, dir.to_path_buf(), transport, args.local_workers);
        cfg.extra_args = syn.worker_args();
        cfg.extra_args.extend(args.quant.worker_args());
        if let Some(m) = &args.manifest {
            cfg.extra_args
                .extend(["--manifest".to_string(), m.display().to_string()]);
        }
        cfg.extra_args.extend(args.paged.worker_args());
        match &args.cluster_key_file {
            Some(p) => cfg.cluster_key_file = Some(p.clone()),
            None => cluster_key = Some(cfg.with_generated_key()?),
        }
        if !args.local_capacities.is_empty() {
            if args.local_capacities.len() != args.local_workers {
                bail!(
                    "--local-capacities lists {} capacities for {} local workers",
                    args.local_capacities.len(),
                    args.local_workers
                );
            }
            cfg.capacities = args.local_capacities.iter().map(|&c| Some(c)).collect();
        }
        Some(LocalWorkers::start(&cfg).context("starting local workers")?)
    } else {
        None
    };
    let workers = match &local_workers {
        Some(l) => l.addrs(),
        None => args.workers.clone(),
    };
    let opts = ClusterOptions {
        workers,
        transport,
        rpc_timeout,
        connect_timeout,
        local_capacity: args.coordinator_capacity,
        replicas: usize::from(args.replicas.max(1)),
        cluster_key,
        heartbeat_timeout: rpc_timeout.min(ClusterOptions::default().heartbeat_timeout),
        ..ClusterOptions::default()
    };
    let experts = ClusterExperts::connect(dir, &model.cfg, &ckpt, &opts)
        .context("setting up the expert workers")?;
    let cluster = ClusterInfo {
        dispatch: experts.stats(),
        workers: experts.workers(),
        transport,
        monitor: experts.monitor(),
        membership: experts.membership(),
    };
    Ok(Loaded {
        model,
        experts: Box::new(experts),
        cluster: Some(cluster),
        paged: None,
        _local_workers: local_workers,
    })
}
