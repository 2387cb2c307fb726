//! `moeshard serve`: loads the model (with a progress bar on a terminal, log lines otherwise),
//! opens the expert backend the cluster options ask for, and runs the OpenAI-compatible server of
//! `moeshard_coordinator::serve` on it.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use moeshard_coordinator::serve::{
    ClusterSnapshot, ClusterView, HostStatus, ServeConfig, SingleProcess, serve,
};
use moeshard_coordinator::{ClusterMonitor, DispatchStats, percentile};
use moeshard_engine::tokenizer::Tokenizer;

use crate::cli::{ClusterArgs, ModelArgs};

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address to listen on (port 0 picks a free port; a `listening on ADDR` line on stdout says
    /// which).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Accepted API key (repeatable); without any, requests need no key.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Requests waiting for a free sequence; beyond this the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Context length per sequence (prompt plus output), capped by the model's own.
    #[arg(long, default_value_t = 4096)]
    max_context: usize,
    /// Tokens per forward step: one per decoding sequence, prompt chunks in the rest.
    #[arg(long, default_value_t = moeshard_engine::generate::PREFILL_CHUNK)]
    max_batch_tokens: usize,
    /// Model name clients use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Do not read the weight files into the page cache before serving (single-process only).
    #[arg(long)]
    no_preload: bool,
    /// Directory holding tokenizer.json and tokenizer_config.json (default: the model directory,
    /// or the folder of a bare config.json given with --synthetic).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Find workers announced on the local network (`moeshard worker --join auto`, mDNS) and
    /// admit them while serving; workers that leave are removed and their experts re-placed.
    /// `--workers` may list more (static) ones.
    #[arg(long, conflicts_with = "local_workers")]
    discover: bool,
    /// With --discover: how long to look for workers before serving, in seconds.
    #[arg(long, default_value_t = 10.0, requires = "discover")]
    discover_wait: f64,
    /// With --discover: serve as soon as this many workers (static ones included) are known.
    #[arg(long, default_value_t = 1, requires = "discover")]
    min_workers: usize,
}

/// Progress of the start-up: a bar on a terminal, log lines otherwise.
struct Progress {
    bar: Option<(MultiProgress, ProgressBar)>,
    started: Instant,
}

impl Progress {
    fn new(steps: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let b = multi.add(ProgressBar::new(steps));
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            (multi, b)
        });
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    fn stage(&self, msg: &str) {
        match &self.bar {
            Some((_, b)) => b.set_message(msg.to_string()),
            None => tracing::info!(elapsed_s = self.started.elapsed().as_secs_f64(), "{msg}"),
        }
    }

    fn done_step(&self) {
        if let Some((_, b)) = &self.bar {
            b.inc(1);
        }
    }

    /// Reads `files` through once (so the first requests do not wait on the disk), with a bar in
    /// bytes on a terminal.
    fn preload(&self, files: &[PathBuf]) -> Result<()> {
        let total: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let bytes_bar = self.bar.as_ref().map(|(multi, _)| {
            let b = multi.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "  reading weights {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        if bytes_bar.is_none() {
            tracing::info!(files = files.len(), bytes = total, "reading the weights");
        }
        let mut buf = vec![0u8; 8 << 20];
        for f in files {
            let mut file =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            loop {
                let n = file
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", f.display()))?;
                if n == 0 {
                    break;
                }
                if let Some(b) = &bytes_bar {
                    b.inc(n as u64);
                }
            }
        }
        if let Some(b) = bytes_bar {
            b.finish_and_clear();
        }
        Ok(())
    }

    fn finish(&self) {
        if let Some((_, b)) = &self.bar {
            b.finish_and_clear();
        }
        tracing::info!(
            seconds = self.started.elapsed().as_secs_f64(),
            "model loaded"
        );
    }
}

fn weight_files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        // A single-file model (GGUF).
        return vec![dir.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "safetensors" || x == "gguf")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The cluster as `--workers` / `--local-workers` set it up.
struct Workers {
    monitor: ClusterMonitor,
    dispatch: Arc<DispatchStats>,
}

/// How long the cluster view waits for the workers' counters.
const STATS_DEADLINE: Duration = Duration::from_secs(2);

impl ClusterView for Workers {
    fn snapshot(&self) -> ClusterSnapshot {
        let lat = self.dispatch.latencies();
        let us = |q| percentile(&lat, q).map(|d| d.as_secs_f64() * 1e6);
        let (workers, placement) = self.monitor.layout();
        let stats = self.monitor.worker_stats(STATS_DEADLINE);
        let mut hosts: Vec<HostStatus> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let st = stats.iter().find(|(a, _)| *a == w.addr).map(|(_, r)| r);
                HostStatus {
                    name: w.addr.clone(),
                    worker_id: Some(w.worker_id.clone()),
                    healthy: st.map(Result::is_ok),
                    capacity_bytes: Some(w.capacity),
                    expert_count: w.experts,
                    experts: placement.as_ref().map(|p| p.experts_of(i)),
                    dispatch_p50_us: w.dispatch_p50_us,
                    dispatch_p99_us: w.dispatch_p99_us,
                    stats: match st {
                        Some(Ok(s)) => Some(serde_json::json!({
                            "batches": s.batches,
                            "rows": s.rows,
                            "tokens": s.tokens,
                            "compute_us": s.compute_us,
                            "bytes_in": s.bytes_in,
                            "bytes_out": s.bytes_out,
                            "hosted_experts": s.hosted_experts,
                            "hosted_bytes": s.hosted_bytes,
                            "resident_checkpoint_bytes": s.resident_checkpoint_bytes,
                            "paged": (s.paged_budget_bytes > 0).then(|| serde_json::json!({
                                "memory_budget_bytes": s.paged_budget_bytes,
                                "resident_bytes": s.paged_resident_bytes,
                                "hits": s.paged_hits,
                                "misses": s.paged_misses,
                                "hit_rate": s.paged_hits as f64
                                    / (s.paged_hits + s.paged_misses).max(1) as f64,
                                "disk_bytes": s.paged_disk_bytes,
                                "stall_us": s.paged_stall_us,
                                "direct_io": s.paged_direct_io,
                            })),
                        })),
                        Some(Err(e)) => Some(serde_json::json!({ "error": e })),
                        None => None,
                    },
                    ..HostStatus::default()
                }
            })
            .collect();
        // The coordinator's own share, when it hosts one.
        if let Some(p) = &placement {
            let own = p.experts_of(workers.len());
            if !own.is_empty() {
                hosts.push(HostStatus {
                    name: "coordinator".into(),
                    healthy: Some(true),
                    expert_count: own.len(),
                    experts: Some(own),
                    ..HostStatus::default()
                });
            }
        }
        ClusterSnapshot {
            mode: "cluster".into(),
            transport: Some(self.monitor.transport().to_string()),
            hosts,
            dispatch_p50_us: us(0.5),
            dispatch_p99_us: us(0.99),
        }
    }
}

/// This process's experts, paged within a memory budget.
struct PagedSingle {
    experts: Vec<(usize, usize)>,
    paged: Arc<moeshard_engine::paged::PagedExperts>,
}

impl ClusterView for PagedSingle {
    fn snapshot(&self) -> ClusterSnapshot {
        let mut snap = SingleProcess {
            experts: self.experts.clone(),
        }
        .snapshot();
        let p = self.paged.stats();
        if let Some(h) = snap.hosts.first_mut() {
            h.stats = Some(serde_json::json!({
                "paged": {
                    "memory_budget_bytes": p.budget_bytes,
                    "resident_bytes": p.resident_bytes,
                    "peak_resident_bytes": p.peak_resident_bytes,
                    "hits": p.hits,
                    "misses": p.misses,
                    "hit_rate": p.hit_rate(),
                    "disk_bytes": p.disk_bytes,
                    "stall_us": p.stall_us,
                    "direct_io": p.direct_io,
                }
            }));
        }
        snap
    }
}

/// `moeshard serve`.
pub(crate) fn cmd_serve(mut a: ServeArgs) -> Result<()> {
    // With --discover, the workers announced now join the static ones; later ones are admitted
    // by the discovery thread.
    let mut browser = None;
    let mut announced = Vec::new();
    if a.discover {
        if a.cluster.coordinator_capacity.is_some() {
            anyhow::bail!(
                "--discover re-places experts as workers come and go; it cannot be combined \
                 with --coordinator-capacity"
            );
        }
        let transport = a
            .cluster
            .transport
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        let wait = Duration::try_from_secs_f64(a.discover_wait)
            .map_err(|_| anyhow::anyhow!("--discover-wait must be a number of seconds"))?;
        let b = crate::discovery::Browser::start(transport)?;
        let want = a.min_workers.saturating_sub(a.cluster.workers.len());
        announced = if want > 0 {
            b.collect(wait, want)
        } else {
            Vec::new()
        };
        for w in &announced {
            tracing::info!(worker = %w.addr, name = %w.fullname, "worker found by mDNS");
            a.cluster.workers.push(w.addr.to_string());
        }
        if a.cluster.workers.len() < a.min_workers {
            anyhow::bail!(
                "--discover found {} workers within {:?}; --min-workers asks for {} (are the \
                 workers started with --join auto and --transport {}, on this network?)",
                a.cluster.workers.len(),
                wait,
                a.min_workers,
                a.cluster.transport
            );
        }
        browser = Some(b);
    }
    let a = a;
    let dir = &a.model.model;
    let single = a.cluster.workers.is_empty() && a.cluster.local_workers == 0;
    let synthetic = a.cluster.synthetic.synthetic;
    let preload = single && !synthetic && !a.no_preload;
    // With --synthetic, --model may name a bare config.json; a .gguf file holds its tokenizer.
    let model_dir = if dir.is_file() && !moeshard_engine::gguf_model::is_gguf(dir) {
        dir.parent().unwrap_or(Path::new("."))
    } else {
        dir.as_path()
    };
    let tokenizer_dir = a.tokenizer.as_deref().unwrap_or(model_dir);
    let progress = Progress::new(if preload { 3 } else { 2 });
    if preload {
        progress.stage("reading the weights");
        progress.preload(&weight_files(dir))?;
        progress.done_step();
    }
    progress.stage(if single {
        "loading the model"
    } else {
        "loading the dense model and setting up the workers"
    });
    // An announced worker that fails its hello (another model, another protocol) is skipped,
    // not fatal: announcements prove nothing. A static one that fails is an error.
    let mut cluster = a.cluster.clone();
    let loaded = loop {
        match crate::cli::load(dir, &cluster) {
            Ok(l) => break l,
            Err(e) => {
                let msg = format!("{e:#}");
                let bad = announced
                    .iter()
                    .position(|w| msg.contains(&w.addr.to_string()));
                let Some(i) = bad else { return Err(e) };
                let bad = announced.remove(i).addr.to_string();
                tracing::warn!(worker = %bad, "skipping an announced worker: {msg}");
                cluster.workers.retain(|w| *w != bad);
                if cluster.workers.is_empty() {
                    return Err(e.context("no announced worker could be admitted"));
                }
            }
        }
    };
    progress.done_step();
    progress.stage("loading the tokenizer");
    let tokenizer = Tokenizer::from_dir(tokenizer_dir).with_context(|| {
        format!(
            "loading the tokenizer in {} (--tokenizer DIR names another)",
            tokenizer_dir.display()
        )
    })?;
    progress.done_step();
    progress.finish();

    let cluster: Arc<dyn ClusterView> = match &loaded.cluster {
        Some(c) => Arc::new(Workers {
            monitor: c.monitor.clone(),
            dispatch: Arc::clone(&c.dispatch),
        }),
        None => {
            let cfg = &loaded.model.cfg;
            let experts = cfg
                .moe_layers()
                .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
                .collect();
            match &loaded.paged {
                Some(p) => Arc::new(PagedSingle {
                    experts,
                    paged: Arc::clone(p),
                }),
                None => Arc::new(SingleProcess { experts }),
            }
        }
    };
    let served_model_name = a.served_model_name.clone().unwrap_or_else(|| {
        let path = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let name = if path.is_file() {
            path.file_stem()
        } else {
            path.file_name()
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "moeshard".into())
    });
    let cfg = ServeConfig {
        served_model_name,
        api_keys: a.api_keys.clone(),
        max_seqs: a.max_seqs,
        max_queue: a.max_queue,
        max_context: a.max_context,
        max_batch_tokens: a.max_batch_tokens,
    };
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    // The model and the backend move to the scheduler thread; the rest of `loaded` (local worker
    // processes) lives until the server has stopped.
    let _discovery = match (browser, &loaded.cluster) {
        (Some(b), Some(c)) => Some(crate::discovery::Discovery::start(
            b,
            c.membership.clone(),
            announced,
        )?),
        _ => None,
    };
    let model = loaded.model;
    let experts = loaded.experts;
    serve(model, experts, tokenizer, cluster, cfg, listener, |addr| {
        // The one line on stdout: scripts and tests read the port from it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    })?;
    drop(loaded.cluster);
    Ok(())
}
