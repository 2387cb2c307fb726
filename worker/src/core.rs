//! The worker's state and request handling, independent of the transport.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use moeshard_engine::config::MlpKind;
use moeshard_engine::fingerprint::model_fingerprint;
use moeshard_engine::paged::{PagedExperts, PagedOptions, PagedStats};
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{ExpertRow, LocalExperts, ModelConfig};
use moeshard_proto::tensor::{f32_from_le_bytes, f32_to_le_bytes};
use moeshard_proto::v1::{
    AssignRequest, AssignResponse, Dtype, ExpertBatchRequest, ExpertBatchResponse, HealthResponse,
    HelloRequest, HelloResponse, StatsResponse,
};
use moeshard_proto::{MAX_BATCH_ROWS, MAX_BATCH_TOKENS, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use crate::manifest::{self, MANIFEST_FILE, Manifest};
use crate::{Result, WorkerError};

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    rows: AtomicU64,
    tokens: AtomicU64,
    compute_us: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// The experts a worker hosts: mapped, or paged within a memory budget.
#[derive(Clone)]
enum Host {
    Mapped(Arc<LocalExperts>),
    Paged(Arc<PagedExperts>),
}

impl Host {
    fn held(&self) -> Vec<(usize, usize)> {
        match self {
            Host::Mapped(m) => m.held().collect(),
            Host::Paged(p) => p.held().collect(),
        }
    }

    fn holds(&self, layer: usize, expert: usize) -> bool {
        match self {
            Host::Mapped(m) => m.get(layer, expert).is_some(),
            Host::Paged(p) => p.holds(layer, expert),
        }
    }
}

/// What a worker hosts right now.
struct Hosted {
    experts: Host,
    bytes: u64,
}

/// A worker's model, assignment and counters.
pub struct WorkerCore {
    cfg: ModelConfig,
    ckpt: Checkpoint,
    fingerprint: String,
    capacity: u64,
    worker_id: String,
    checkpoint_files: Vec<PathBuf>,
    hosted: RwLock<Hosted>,
    /// Serialises assignments so two coordinators' unions cannot race.
    assigning: Mutex<()>,
    /// Hashes the assigned tensors are checked against before they are served.
    manifest: Option<Manifest>,
    /// Fingerprint of the checkpoint as stored (without quantization on load), as manifests
    /// record it.
    stored_fingerprint: String,
    /// Tensors already checked against the manifest.
    verified: Mutex<BTreeSet<String>>,
    counters: Counters,
    /// Page the hosted experts from the file within this budget (`--memory-budget`).
    paged: Option<PagedOptions>,
}

impl WorkerCore {
    /// Opens the checkpoint in `dir` (config and tensor index; nothing is read from the weights)
    /// and offers `capacity` bytes, by default enough for every routed expert.
    pub fn open(dir: &Path, capacity: Option<u64>) -> Result<Self> {
        let (cfg, ckpt) = Checkpoint::open_with_config(dir)?;
        Self::from_checkpoint(dir, cfg, ckpt, capacity)
    }

    /// Serves synthetic weights (see `moeshard_engine::synthetic`) of the config at `config`
    /// (a `config.json` or a directory holding one), cut to `layers` layers if asked, made from
    /// `seed`: the coordinator makes the same ones independently.
    pub fn open_synthetic(
        config: &Path,
        layers: Option<usize>,
        seed: u64,
        capacity: Option<u64>,
    ) -> Result<Self> {
        let cfg = moeshard_engine::model::synthetic_config(config, layers)?;
        let file = if config.is_dir() {
            config.join("config.json")
        } else {
            config.to_path_buf()
        };
        let ckpt = Checkpoint::synthetic(&file, &cfg, moeshard_engine::tensor::DType::BF16, seed);
        Self::from_checkpoint(config, cfg, ckpt, capacity)
    }

    /// Serves an open checkpoint (`dir` names it in messages and the fingerprint).
    pub fn from_checkpoint(
        dir: &Path,
        cfg: ModelConfig,
        mut ckpt: Checkpoint,
        capacity: Option<u64>,
    ) -> Result<Self> {
        let fingerprint = model_fingerprint(dir, &ckpt)?;
        // A manifest describes the files as stored: compare it with the fingerprint of the
        // checkpoint without the quantization applied on load.
        let stored_fingerprint = match ckpt.quantize() {
            None => fingerprint.clone(),
            Some(q) => {
                ckpt.set_quantize(None);
                let fp = model_fingerprint(dir, &ckpt);
                ckpt.set_quantize(Some(q));
                fp?
            }
        };
        let mut files = BTreeSet::new();
        for name in ckpt.names() {
            if let Some((path, _)) = ckpt.info(name)
                && !ckpt.is_synthetic()
            {
                files.insert(path.to_path_buf());
            }
        }
        let all: Vec<(usize, usize)> = all_experts(&cfg).collect();
        let capacity = match capacity {
            Some(c) => c,
            None => bytes_of(&cfg, &ckpt, &all)?,
        };
        let manifest = if ckpt.is_synthetic() {
            None
        } else {
            let path = dir.join(MANIFEST_FILE);
            if path.is_file() {
                Some(manifest::load(&path)?)
            } else {
                info!(
                    model = %dir.display(),
                    "no {MANIFEST_FILE} beside the checkpoint: the weights served are not \
                     verified (make one with `moeshard manifest` from a good copy)"
                );
                None
            }
        };
        if let Some(m) = &manifest {
            check_manifest_model(m, &stored_fingerprint, &dir.join(MANIFEST_FILE))?;
        }
        let core = WorkerCore {
            manifest,
            stored_fingerprint,
            verified: Mutex::new(BTreeSet::new()),
            hosted: RwLock::new(Hosted {
                experts: Host::Mapped(Arc::new(LocalExperts::new(
                    cfg.hidden_size,
                    Default::default(),
                ))),
                bytes: 0,
            }),
            paged: None,
            cfg,
            ckpt,
            fingerprint,
            capacity,
            worker_id: worker_id(),
            checkpoint_files: files.into_iter().collect(),
            assigning: Mutex::new(()),
            counters: Counters::default(),
        };
        info!(
            model = %dir.display(),
            fingerprint = %core.fingerprint,
            capacity = core.capacity,
            "worker opened its checkpoint"
        );
        Ok(core)
    }

    /// Checks the tensors it serves against the manifest at `path` (instead of the one beside
    /// the checkpoint, if any).
    pub fn with_manifest(mut self, path: &Path) -> Result<Self> {
        let m = manifest::load(path)?;
        check_manifest_model(&m, &self.stored_fingerprint, path)?;
        self.manifest = Some(m);
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(self)
    }

    /// Keeps at most `opts.budget` bytes of expert weights resident and reads the rest from the
    /// checkpoint file as batches need them. Refused (with the reason) when the checkpoint's
    /// experts cannot be paged (quantized on load, synthetic, decoded or fused on load) or the
    /// budget cannot hold its largest expert.
    pub fn with_memory_budget(mut self, opts: PagedOptions) -> Result<Self> {
        let all: Vec<(usize, usize)> = all_experts(&self.cfg).collect();
        let least = moeshard_engine::paged::min_budget(&self.cfg, &self.ckpt, all)?;
        if opts.budget < least {
            return Err(WorkerError::Engine(
                moeshard_engine::EngineError::MemoryBudget {
                    msg: format!(
                        "{} bytes cannot hold one expert: the largest takes {least} bytes \
                         (with its {}-byte read alignment); give at least that",
                        opts.budget,
                        moeshard_engine::paged::IO_ALIGN
                    ),
                },
            ));
        }
        info!(
            budget = opts.budget,
            "experts are paged from the checkpoint file"
        );
        self.paged = Some(opts);
        Ok(self)
    }

    /// Counters of the paged experts, when the worker pages them.
    pub fn paged_stats(&self) -> Option<PagedStats> {
        match self.hosted_experts().experts {
            Host::Paged(p) => Some(p.stats()),
            Host::Mapped(_) => None,
        }
    }

    /// Whether served tensors are checked against a manifest.
    pub fn verifies_weights(&self) -> bool {
        self.manifest.is_some()
    }

    /// Checks the tensors of `experts` not checked yet against the manifest, in parallel.
    fn verify_experts(&self, experts: &[(usize, usize)]) -> Result<()> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        let names: Vec<String> = {
            let done = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            experts
                .iter()
                .flat_map(|&(l, e)| {
                    let n = self.cfg.expert_tensor_names(l, e);
                    [n.gate_proj, n.up_proj, n.down_proj]
                })
                .filter(|n| !done.contains(n))
                .collect()
        };
        if names.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let bad = manifest::verify(&self.ckpt, m, Some(&names), &|_| {})?;
        if let Some(first) = bad.first() {
            for b in &bad {
                warn!("{b}");
            }
            return Err(WorkerError::TamperedTensor {
                tensor: first.tensor.clone(),
                file: first.file.clone(),
                what: first.what.clone(),
                others: bad.len() - 1,
            });
        }
        info!(
            tensors = names.len(),
            ms = started.elapsed().as_millis() as u64,
            "assigned tensors match the manifest"
        );
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(names);
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Hex model fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Bytes of expert weights offered.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn is_expert(&self, layer: usize, expert: usize) -> bool {
        expert < self.cfg.num_experts && self.cfg.layer_kinds.get(layer) == Some(&MlpKind::Moe)
    }

    /// Answers a coordinator's hello.
    pub fn hello(&self, req: &HelloRequest) -> HelloResponse {
        info!(
            coordinator = %req.coordinator_id,
            protocol = req.protocol_version,
            "hello"
        );
        HelloResponse {
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.worker_id.clone(),
            capacity_bytes: self.capacity,
            model_fingerprint: self.fingerprint.clone(),
            hidden_size: self.cfg.hidden_size as u32,
            num_experts: self.cfg.num_experts as u32,
            memory_budget_bytes: self.paged.map(|p| p.budget).unwrap_or(0),
        }
    }

    /// [`Self::assign`] off the async runtime: mapping (or, for synthetic weights, making) the
    /// experts can take seconds, and the runtime must keep answering keep-alives meanwhile.
    pub async fn assign_blocking(self: &Arc<Self>, req: AssignRequest) -> Result<AssignResponse> {
        let core = Arc::clone(self);
        match tokio::task::spawn_blocking(move || core.assign(&req)).await {
            Ok(r) => r,
            Err(e) => Err(WorkerError::BadRequest {
                msg: format!("the assignment task failed: {e}"),
            }),
        }
    }

    /// Adds `req`'s experts to those hosted (assignments from several coordinators add up).
    pub fn assign(&self, req: &AssignRequest) -> Result<AssignResponse> {
        if req.model_fingerprint != self.fingerprint {
            return Err(WorkerError::FingerprintMismatch {
                ours: self.fingerprint.clone(),
                theirs: req.model_fingerprint.clone(),
            });
        }
        let _guard = self.assigning.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.hosted_experts();
        let mut want: BTreeSet<(usize, usize)> = current.experts.held().into_iter().collect();
        for id in &req.experts {
            let (l, e) = (id.layer as usize, id.expert as usize);
            if !self.is_expert(l, e) {
                return Err(WorkerError::NoSuchExpert {
                    layer: l,
                    expert: e,
                });
            }
            want.insert((l, e));
        }
        let want: Vec<(usize, usize)> = want.into_iter().collect();
        let need = bytes_of(&self.cfg, &self.ckpt, &want)?;
        if need > self.capacity {
            return Err(WorkerError::OverCapacity {
                experts: want.len(),
                need,
                capacity: self.capacity,
            });
        }
        // Every tensor is checked against the manifest before it can be served.
        self.verify_experts(&want)?;
        // Loads the assigned tensors only: copied into resident memory, or with `--mmap` mapped
        // views (no weight byte read here); paged, only where they lie in the file is noted.
        let experts = match self.paged {
            // Experts already held keep their (copied) weights; only new ones are loaded.
            None => Host::Mapped(Arc::new(LocalExperts::load_keeping(
                &self.cfg,
                &self.ckpt,
                want.iter().copied(),
                match &current.experts {
                    Host::Mapped(prev) => Some(prev),
                    Host::Paged(_) => None,
                },
            )?)),
            // The previous host's cache goes when its last batch is done.
            Some(opts) => Host::Paged(Arc::new(PagedExperts::new(
                &self.cfg,
                &self.ckpt,
                want.iter().copied(),
                opts,
            )?)),
        };
        let n = want.len();
        {
            let mut h = self.hosted.write().unwrap_or_else(|p| p.into_inner());
            *h = Hosted {
                experts,
                bytes: need,
            };
        }
        info!(
            assigned = req.experts.len(),
            hosted = n,
            hosted_bytes = need,
            "assignment loaded"
        );
        Ok(AssignResponse {
            hosted_experts: n as u32,
            hosted_bytes: need,
        })
    }

    fn hosted_experts(&self) -> Hosted {
        let h = self.hosted.read().unwrap_or_else(|p| p.into_inner());
        Hosted {
            experts: h.experts.clone(),
            bytes: h.bytes,
        }
    }

    /// Whether the worker hosts anything yet.
    pub fn health(&self) -> HealthResponse {
        let n = self.hosted_experts().experts.held().len();
        HealthResponse {
            ready: n > 0,
            hosted_experts: n as u32,
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> StatsResponse {
        let c = &self.counters;
        let h = self.hosted_experts();
        let p = match &h.experts {
            Host::Paged(p) => p.stats(),
            Host::Mapped(_) => PagedStats::default(),
        };
        StatsResponse {
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            compute_us: c.compute_us.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            hosted_experts: h.experts.held().len() as u32,
            hosted_bytes: h.bytes,
            resident_checkpoint_bytes: self.resident_checkpoint_bytes().unwrap_or(0),
            paged_budget_bytes: p.budget_bytes,
            paged_resident_bytes: p.resident_bytes,
            paged_hits: p.hits,
            paged_misses: p.misses,
            paged_disk_bytes: p.disk_bytes,
            paged_stall_us: p.stall_us,
            paged_direct_io: p.direct_io,
        }
    }

    /// Bytes of this worker's checkpoint weights in its own memory: the copies in anonymous
    /// memory (see `moeshard_engine::resident`) plus the mapped file pages present in this
    /// process, where the OS tells (Linux).
    pub fn resident_checkpoint_bytes(&self) -> Option<u64> {
        resident_bytes(&self.checkpoint_files).map(|mapped| mapped + self.ckpt.resident_bytes())
    }

    /// Bytes of weights copied into anonymous memory (0 with `--mmap`).
    pub fn copied_weight_bytes(&self) -> u64 {
        self.ckpt.resident_bytes()
    }

    /// Checks a batch and turns it into hidden states and rows.
    fn decode_batch(
        &self,
        req: &ExpertBatchRequest,
        hosted: &Host,
    ) -> Result<(Vec<f32>, Vec<ExpertRow>)> {
        let layer = req.layer as usize;
        let bad = |msg: String| WorkerError::BadBatch { layer, msg };
        if req.dtype != Dtype::F32 as i32 {
            return Err(bad(format!(
                "activation dtype {} is not supported yet (only f32)",
                Dtype::try_from(req.dtype)
                    .map(|d| d.as_str_name().to_string())
                    .unwrap_or_else(|_| req.dtype.to_string())
            )));
        }
        let h = self.cfg.hidden_size;
        if req.hidden_size as usize != h {
            return Err(bad(format!(
                "hidden size {} differs from the model's {h}",
                req.hidden_size
            )));
        }
        let n_tokens = req.n_tokens as usize;
        if n_tokens > MAX_BATCH_TOKENS {
            return Err(bad(format!(
                "{n_tokens} tokens exceed the limit of {MAX_BATCH_TOKENS} per batch"
            )));
        }
        if req.tokens.len() > MAX_BATCH_ROWS {
            return Err(bad(format!(
                "{} rows exceed the limit of {MAX_BATCH_ROWS} per batch",
                req.tokens.len()
            )));
        }
        let values = n_tokens
            .checked_mul(h)
            .filter(|v| v.saturating_mul(4) <= MAX_FRAME_BYTES)
            .ok_or_else(|| bad(format!("{n_tokens} tokens exceed the message limit")))?;
        let hidden = f32_from_le_bytes(&req.activations, Some(values))
            .map_err(|e| bad(format!("activations: {e}")))?;
        let n = req.tokens.len();
        if req.experts.len() != n || req.weights.len() != n {
            return Err(bad(format!(
                "{} tokens, {} experts and {} weights do not make rows",
                n,
                req.experts.len(),
                req.weights.len()
            )));
        }
        let mut rows = Vec::with_capacity(n);
        for ((&token, &expert), &weight) in req.tokens.iter().zip(&req.experts).zip(&req.weights) {
            if token as usize >= n_tokens {
                return Err(bad(format!("a row names token {token} of {n_tokens}")));
            }
            if !hosted.holds(layer, expert as usize) {
                return Err(WorkerError::NotHosted {
                    layer,
                    expert: expert as usize,
                });
            }
            rows.push(ExpertRow {
                token,
                expert,
                weight,
            });
        }
        Ok((hidden, rows))
    }

    /// Computes an expert batch on the rayon pool and answers when it is done.
    pub async fn compute(&self, req: ExpertBatchRequest) -> Result<ExpertBatchResponse> {
        let layer = req.layer as usize;
        let hosted = self.hosted_experts().experts;
        let (hidden, rows) = self.decode_batch(&req, &hosted)?;
        let (n_rows, n_tokens, bytes_in) = (rows.len(), req.n_tokens, req.activations.len());
        drop(req);
        let (out, took) = match hosted {
            Host::Mapped(hosted) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                rayon::spawn(move || {
                    let started = Instant::now();
                    let out = hosted.compute(layer, &hidden, &rows);
                    // The receiver is gone only when the request was abandoned; nothing to do
                    // then.
                    let _ = tx.send((out, started.elapsed()));
                });
                rx.await.map_err(|_| WorkerError::JobLost { layer })?
            }
            // A paged batch waits for reads: on a blocking thread, not a rayon worker (its
            // experts are still computed on the rayon pool).
            Host::Paged(hosted) => tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let out = hosted.compute(layer, &hidden, &rows);
                (out, started.elapsed())
            })
            .await
            .map_err(|_| WorkerError::JobLost { layer })?,
        };
        let out = out?;
        let outputs = Bytes::from(f32_to_le_bytes(&out));
        let compute_us = took.as_micros() as u64;
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.rows.fetch_add(n_rows as u64, Ordering::Relaxed);
        c.tokens.fetch_add(u64::from(n_tokens), Ordering::Relaxed);
        c.compute_us.fetch_add(compute_us, Ordering::Relaxed);
        c.bytes_in.fetch_add(bytes_in as u64, Ordering::Relaxed);
        c.bytes_out
            .fetch_add(outputs.len() as u64, Ordering::Relaxed);
        debug!(layer, rows = n_rows, tokens = n_tokens, compute_us, "batch");
        Ok(ExpertBatchResponse {
            dtype: Dtype::F32 as i32,
            outputs,
            compute_us,
        })
    }
}

fn check_manifest_model(m: &Manifest, fingerprint: &str, path: &Path) -> Result<()> {
    if m.model_fingerprint != fingerprint {
        return Err(WorkerError::Manifest {
            msg: format!(
                "{} is for model {}, the checkpoint is model {fingerprint}",
                path.display(),
                m.model_fingerprint
            ),
        });
    }
    Ok(())
}

fn all_experts(cfg: &ModelConfig) -> impl Iterator<Item = (usize, usize)> + '_ {
    let n = cfg.num_experts;
    cfg.moe_layers()
        .flat_map(move |l| (0..n).map(move |e| (l, e)))
}

/// Bytes of the weights of `experts`, from the tensor index.
fn bytes_of(cfg: &ModelConfig, ckpt: &Checkpoint, experts: &[(usize, usize)]) -> Result<u64> {
    Ok(moeshard_engine::experts::stored_bytes(
        cfg,
        ckpt,
        experts.iter().copied(),
    )?)
}

fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}/pid{}", std::process::id())
}

/// Bytes of the mappings of `files` that are resident in this process (the `Rss` of those
/// mappings in `/proc/self/smaps`): pages of the files this process has touched, not the page
/// cache at large. `None` where the OS does not tell.
pub fn resident_bytes(files: &[PathBuf]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let wanted: Vec<PathBuf> = files
        .iter()
        .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let mut in_file = false;
    let mut total_kb = 0u64;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let path = fields.nth(4).map(|_| {
                // The path may contain spaces: take everything after the inode field.
                line.split_whitespace()
                    .skip(5)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            in_file = path.is_some_and(|p| wanted.iter().any(|w| w.as_os_str() == p.as_str()));
        } else if in_file && first == "Rss:" {
            total_kb += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total_kb * 1024)
}
