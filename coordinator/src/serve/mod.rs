//! `moeshard serve`: an OpenAI-compatible HTTP endpoint over a loaded model and its expert backend.
//!
//! - [`api`]: the OpenAI request and response types and their validation.
//! - [`scheduler`]: continuous batching on a plain thread that owns the model and the backend.
//! - [`text`]: incremental detokenization and stop strings.
//! - [`metrics`]: the `moeshard_*` Prometheus metrics and the routing-counting backend wrapper.
//! - [`cluster_view`]: what `GET /v1/cluster` shows, filled in by the owner of the backend.
//! - [`client`]: a minimal blocking HTTP/1.1 client for the tests and `bench-serve`.
//! - [`host`]: this host's memory, for the cluster page.
//! - `GET /` is the cluster page (`page.html`, embedded in the binary): it draws what
//!   `GET /v1/cluster` answers.
//!
//! Heavy compute never runs on the async runtime: handlers parse and validate, tokenize on the
//! blocking pool, then hand the request to the scheduler thread over a bounded queue (its capacity
//! is the waiting-queue limit: a full queue is a 429) and read the tokens back over a bounded
//! per-request channel. A handler that goes away (the client disconnected) drops its receiver, and
//! the scheduler frees that sequence and its KV cache at the next step.

pub mod api;
pub mod client;
pub mod cluster_view;
pub mod host;
mod http;
pub mod metrics;
pub mod scheduler;
pub mod text;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use moeshard_engine::tokenizer::Tokenizer;
use moeshard_engine::{ExpertBackend, Model};
use tracing::{info, warn};

pub use cluster_view::{ClusterSnapshot, ClusterView, HostStatus, SingleProcess};
pub use metrics::Metrics;

/// Errors of setting up or running the server (requests never produce one: they get HTTP errors).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A limit or option is out of range.
    #[error("invalid server option: {0}")]
    Config(String),
    /// The listening socket or the runtime failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The scheduler thread could not be started or ended abnormally.
    #[error("scheduler thread: {0}")]
    Scheduler(String),
}

/// Options of the server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model name clients ask for (`model` field).
    pub served_model_name: String,
    /// Accepted API keys (`Authorization: Bearer KEY`); empty means no authentication.
    pub api_keys: Vec<String>,
    /// Sequences computed at once.
    pub max_seqs: usize,
    /// Requests waiting for a sequence slot; beyond this, 429.
    pub max_queue: usize,
    /// Context per sequence (prompt plus output), capped by the model's own.
    pub max_context: usize,
    /// Tokens per forward step (decodes plus prompt chunks).
    pub max_batch_tokens: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            served_model_name: "moeshard".into(),
            api_keys: Vec::new(),
            max_seqs: 16,
            max_queue: 64,
            max_context: 4096,
            max_batch_tokens: moeshard_engine::generate::PREFILL_CHUNK,
        }
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Upper bounds of the limits, so a typo cannot ask for unbounded memory.
const MAX_SEQS_LIMIT: usize = 1024;
const MAX_QUEUE_LIMIT: usize = 1 << 16;
const MAX_BATCH_TOKENS_LIMIT: usize = 1 << 16;

impl ServeConfig {
    fn check(&self) -> Result<(), ServeError> {
        let range = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(ServeError::Config(format!(
                    "{name} must be between {lo} and {hi}, got {v}"
                )))
            } else {
                Ok(())
            }
        };
        range("max-seqs", self.max_seqs, 1, MAX_SEQS_LIMIT)?;
        range("max-queue", self.max_queue, 1, MAX_QUEUE_LIMIT)?;
        range("max-context", self.max_context, 2, usize::MAX)?;
        range(
            "max-batch-tokens",
            self.max_batch_tokens,
            1,
            MAX_BATCH_TOKENS_LIMIT,
        )?;
        if self.api_keys.iter().any(String::is_empty) {
            return Err(ServeError::Config("an API key may not be empty".into()));
        }
        Ok(())
    }
}

/// Serves `model` (with its routed experts on `backend`) on `listener` until ctrl-c or SIGTERM.
/// `ready` is called with the bound address once requests are being accepted.
pub fn serve(
    model: Model,
    backend: Box<dyn ExpertBackend>,
    tokenizer: Tokenizer,
    cluster: Arc<dyn ClusterView>,
    cfg: ServeConfig,
    listener: std::net::TcpListener,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    cfg.check()?;
    let mcfg = &model.cfg;
    let max_context = cfg.max_context.min(mcfg.max_position_embeddings);
    let moe_layers: Vec<usize> = mcfg.moe_layers().collect();
    let metrics = Arc::new(Metrics::new(
        mcfg.num_hidden_layers,
        &moe_layers,
        mcfg.num_experts,
    ));
    let tokenizer = Arc::new(tokenizer);
    let mut eos = mcfg.eos_token_ids.clone();
    if let Some(id) = tokenizer.eos_token().and_then(|t| tokenizer.token_id(t))
        && !eos.contains(&id)
    {
        eos.push(id);
    }
    let vocab = mcfg.vocab_size;
    let backend: Box<dyn ExpertBackend> =
        Box::new(metrics::RoutedBackend::new(backend, Arc::clone(&metrics)));
    let core = scheduler::Core::new(
        model,
        backend,
        Arc::clone(&tokenizer),
        eos,
        scheduler::SchedulerConfig {
            max_seqs: cfg.max_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            max_context,
        },
        Arc::clone(&metrics),
    );
    let (queue, queue_rx) = std::sync::mpsc::sync_channel(cfg.max_queue);
    let alive = Arc::new(AtomicBool::new(true));
    let scheduler = {
        let (metrics, alive) = (Arc::clone(&metrics), Arc::clone(&alive));
        std::thread::Builder::new()
            .name("moeshard-scheduler".into())
            .spawn(move || {
                struct Alive(Arc<AtomicBool>);
                impl Drop for Alive {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Relaxed);
                    }
                }
                let _alive = Alive(alive);
                scheduler::run(core, queue_rx, metrics);
            })
            .map_err(|e| ServeError::Scheduler(e.to_string()))?
    };
    let app = Arc::new(http::App {
        served_model_name: cfg.served_model_name.clone(),
        api_keys: cfg.api_keys.clone(),
        max_context,
        vocab,
        tokenizer,
        queue,
        metrics,
        cluster,
        scheduler_alive: alive,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        started: std::time::Instant::now(),
        next_id: std::sync::atomic::AtomicU64::new(1),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("moeshard-http")
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "starting the HTTP runtime",
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        what: "reading the listening address",
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Io {
            what: "configuring the listening socket",
            source,
        })?;
    let result = runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|source| ServeError::Io {
                what: "registering the listening socket",
                source,
            })?;
        let router = http::router(app);
        info!(%addr, "serving");
        ready(addr);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|source| ServeError::Io {
                what: "serving HTTP",
                source,
            })
    });
    // Dropping the runtime drops the router and with it the queue's sender: the scheduler ends
    // once its sequences have.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if scheduler.join().is_err() {
        warn!("the scheduler thread panicked");
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}
