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
use moeshard_coordinator::{DispatchStats, WorkerInfo, percentile};
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
    workers: Vec<WorkerInfo>,
    placement: moeshard_coordinator::placement::Placement,
    transport: String,
    dispatch: Arc<DispatchStats>,
}

impl ClusterView for Workers {
    fn snapshot(&self) -> ClusterSnapshot {
        let lat = self.dispatch.latencies();
        let us = |q| percentile(&lat, q).map(|d| d.as_secs_f64() * 1e6);
        ClusterSnapshot {
            mode: "cluster".into(),
            transport: Some(self.transport.clone()),
            hosts: self
                .workers
                .iter()
                .enumerate()
                .map(|(i, w)| HostStatus {
                    name: w.addr.clone(),
                    worker_id: Some(w.worker_id.clone()),
                    capacity_bytes: Some(w.capacity),
                    expert_count: w.experts,
                    experts: Some(self.placement.experts_of(i)),
                    ..HostStatus::default()
                })
                .collect(),
            dispatch_p50_us: us(0.5),
            dispatch_p99_us: us(0.99),
        }
    }
}

/// `moeshard serve`.
pub(crate) fn cmd_serve(a: ServeArgs) -> Result<()> {
    let dir = &a.model.model;
    let single = a.cluster.workers.is_empty() && a.cluster.local_workers == 0;
    let synthetic = a.cluster.synthetic.synthetic;
    let preload = single && !synthetic && !a.no_preload;
    // With --synthetic, --model may name a bare config.json.
    let model_dir = if dir.is_file() {
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
    let loaded = crate::cli::load(dir, &a.cluster)?;
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
            workers: c.workers.clone(),
            placement: c.placement.clone(),
            transport: c.transport.to_string(),
            dispatch: Arc::clone(&c.dispatch),
        }),
        None => {
            let cfg = &loaded.model.cfg;
            let experts = cfg
                .moe_layers()
                .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
                .collect();
            Arc::new(SingleProcess { experts })
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
