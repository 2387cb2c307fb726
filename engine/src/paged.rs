//! Paged routed experts (`--memory-budget BYTES`): a fixed budget of resident expert weights, the
//! rest read from the checkpoint file when a batch needs them.
//!
//! Every hosted expert is described by the three byte ranges of its matrices in the file (a GGUF
//! expert is three contiguous slices of the stacked `ffn_*_exps` tensors). A batch's misses are
//! all handed at once to a small pool of reader threads, which read each range with direct I/O
//! (`O_DIRECT` on Linux, `F_NOCACHE` on macOS: real disk reads, not the page cache) into an owned
//! 4 KiB-aligned buffer; the experts already resident are computed while those reads run, and each
//! loaded expert is computed as soon as it arrives. After a batch the hottest experts of the next
//! MoE layer that are not resident are read ahead.
//!
//! What stays resident: experts are scored by their routing counts, decayed as batches go by
//! (half-life [`HALF_LIFE_BATCHES`]); the best-scored ones that fit in three quarters of the
//! budget are pinned, and eviction takes the unpinned lowest-scored (then least recently used)
//! expert first. The budget is a hard bound on the bytes of expert buffers this host holds,
//! counted as allocated (aligned read buffers included) and reserved before a read is issued.
//!
//! The kernels and the per-expert computation are those of [`LocalExperts`], on the same bytes,
//! and every output row lands at its row index, so the result is identical to the bit to the
//! unconstrained run whatever was resident.
//!
//! [`LocalExperts`]: crate::experts::LocalExperts

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::config::{Arch, ExpertAct, ModelConfig};
use crate::error::{EngineError, Result};
use crate::experts::{
    Deferred, ExpertBackend, ExpertRow, ExpertWeights, PendingExperts, scatter_rows,
};
use crate::safetensors::Checkpoint;
use crate::tensor::{DType, Tensor};

/// Alignment of direct reads: buffer address, file offset and length (the largest logical block
/// size in common use).
pub const IO_ALIGN: usize = 4096;
/// Batches after which a routing count weighs half as much.
pub const HALF_LIFE_BATCHES: f64 = 512.0;
/// Batches between recomputations of the pinned set.
const PIN_EVERY: u64 = 32;
/// Reads in flight at most (also the capacity of the job and result queues, so no reader ever
/// blocks on a full result queue).
const MAX_IN_FLIGHT: usize = 256;
/// How long a batch waits for one read before it gives up with an error.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// How to page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedOptions {
    /// Bytes of expert weights kept resident at most.
    pub budget: u64,
    /// Reader threads (parallel reads).
    pub readers: usize,
    /// Experts of the next MoE layer read ahead after each batch (0: none).
    pub prefetch: usize,
    /// Read with direct I/O when the file system allows it (otherwise through the page cache).
    pub direct: bool,
}

impl PagedOptions {
    /// The defaults for a budget: 4 readers, read-ahead of 8 experts, direct I/O.
    pub fn new(budget: u64) -> Self {
        PagedOptions {
            budget,
            readers: 4,
            prefetch: 8,
            direct: true,
        }
    }
}

/// Counters of a paged host, since it was made.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PagedStats {
    /// The budget.
    pub budget_bytes: u64,
    /// Bytes of expert buffers held now (resident plus reads in flight).
    pub resident_bytes: u64,
    /// The most ever held (never above the budget).
    pub peak_resident_bytes: u64,
    /// Experts resident now.
    pub resident_experts: u64,
    /// Experts pinned now (hot by routing counts).
    pub pinned_experts: u64,
    /// Experts hosted (resident or not).
    pub hosted_experts: u64,
    /// Bytes of all hosted experts in the file (what an unconstrained host maps).
    pub hosted_bytes: u64,
    /// Expert uses found resident when their batch came.
    pub hits: u64,
    /// Expert uses that had to wait for a read (including reads ahead still in flight).
    pub misses: u64,
    /// Bytes read from disk (aligned ranges).
    pub disk_bytes: u64,
    /// Reads of experts (each three ranges).
    pub disk_reads: u64,
    /// Of those, reads ahead for the next layer.
    pub prefetch_reads: u64,
    /// Microseconds batches spent waiting for reads.
    pub stall_us: u64,
    /// Microseconds spent in batches in all.
    pub batch_us: u64,
    /// Sum over batches of their tokens (a token counts once per MoE layer it visits here).
    pub token_layers: u64,
    /// Whether reads bypass the page cache (direct I/O) on every file.
    pub direct_io: bool,
}

impl PagedStats {
    /// Fraction of expert uses found resident.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Where one matrix lies.
#[derive(Clone, Debug)]
struct TensorSource {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    file: usize,
    offset: u64,
    len: usize,
}

impl TensorSource {
    /// The covering aligned range `(start, bytes)` and the buffer bytes it takes.
    fn aligned(&self) -> (u64, usize, u64) {
        let a = IO_ALIGN as u64;
        let start = self.offset / a * a;
        let end = (self.offset + self.len as u64).div_ceil(a) * a;
        let n = (end - start) as usize;
        (start, n, buffer_words(n) as u64 * 8)
    }
}

fn buffer_words(n: usize) -> usize {
    (n + IO_ALIGN).div_ceil(8)
}

/// One expert's three matrices (gate, up, down).
#[derive(Debug)]
struct ExpertSource {
    tensors: [TensorSource; 3],
    act: ExpertAct,
    /// Buffer bytes it takes when resident.
    bytes: u64,
    /// Bytes of its matrices in the file.
    stored: u64,
}

struct SourceFile {
    path: PathBuf,
    file: File,
    direct: bool,
}

type Key = (usize, usize);

struct Job {
    key: Key,
    source: Arc<ExpertSource>,
}

struct Loaded {
    key: Key,
    weights: Result<ExpertWeights>,
    bytes_read: u64,
}

struct Resident {
    weights: Arc<ExpertWeights>,
    bytes: u64,
    last_used: u64,
}

/// The cache; one batch at a time holds it.
struct State {
    resident: HashMap<Key, Resident>,
    /// Reads in flight and the bytes reserved for them.
    loading: HashMap<Key, u64>,
    /// Bytes reserved: resident plus loading.
    used: u64,
    /// Decayed routing counts, scaled by `2^(tick / HALF_LIFE_BATCHES)`.
    scores: HashMap<Key, f64>,
    pinned: HashSet<Key>,
    tick: u64,
    results: Receiver<Loaded>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    disk_bytes: AtomicU64,
    disk_reads: AtomicU64,
    prefetch_reads: AtomicU64,
    stall_us: AtomicU64,
    batch_us: AtomicU64,
    token_layers: AtomicU64,
    resident_bytes: AtomicU64,
    peak_resident_bytes: AtomicU64,
    resident_experts: AtomicU64,
    pinned_experts: AtomicU64,
}

/// Routed experts read from their file on demand within a memory budget.
pub struct PagedExperts {
    hidden_size: usize,
    opts: PagedOptions,
    sources: BTreeMap<Key, Arc<ExpertSource>>,
    /// MoE layers hosted, in order (for reading ahead into the next one).
    layers: Vec<usize>,
    files: Arc<Vec<SourceFile>>,
    state: Mutex<State>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    hosted_bytes: u64,
    largest: u64,
    counters: Counters,
}

impl std::fmt::Debug for PagedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PagedExperts({} experts, budget {})",
            self.sources.len(),
            self.opts.budget
        )
    }
}

fn budget_err(msg: String) -> EngineError {
    EngineError::MemoryBudget { msg }
}

/// The smallest budget that can page `experts` of `ckpt`: the buffers of the largest one.
pub fn min_budget(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    experts: impl IntoIterator<Item = (usize, usize)>,
) -> Result<u64> {
    let mut largest = 0;
    for (l, e) in experts {
        largest = largest.max(source_of(cfg, ckpt, l, e, &mut Vec::new())?.bytes);
    }
    Ok(largest)
}

/// Buffer bytes of the experts when all are resident (what a budget of 100% means).
pub fn paged_bytes(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    experts: impl IntoIterator<Item = (usize, usize)>,
) -> Result<u64> {
    let mut total = 0;
    for (l, e) in experts {
        total += source_of(cfg, ckpt, l, e, &mut Vec::new())?.bytes;
    }
    Ok(total)
}

fn source_of(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    layer: usize,
    e: usize,
    paths: &mut Vec<PathBuf>,
) -> Result<ExpertSource> {
    if cfg.arch == Arch::GptOss {
        return Err(budget_err(
            "GPT-OSS checkpoints fuse all experts of a layer into one tensor (decoded on load): \
             they cannot be paged"
                .into(),
        ));
    }
    if ckpt.quantize().is_some() {
        return Err(budget_err(
            "experts quantized on load (--quantize) live in memory, not in the file, so they \
             cannot be paged from it: quantize the file instead (`moeshard quantize`) and page \
             that"
                .into(),
        ));
    }
    let names = cfg.expert_tensor_names(layer, e);
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let mut one = |name: &str, shape: [usize; 2]| -> Result<TensorSource> {
        let (path, info) = ckpt.plain_range(name).ok_or_else(|| {
            budget_err(format!(
                "tensor {name} of {} is not used as stored in its file (synthetic, FP8-decoded \
                 or rewritten on load): it cannot be paged",
                ckpt.dir().display()
            ))
        })?;
        if info.shape != shape {
            return Err(EngineError::BadTensor {
                name: name.to_string(),
                msg: format!("expected shape {shape:?}, found {:?}", info.shape),
            });
        }
        let file = match paths.iter().position(|p| p == path) {
            Some(k) => k,
            None => {
                paths.push(path.to_path_buf());
                paths.len() - 1
            }
        };
        Ok(TensorSource {
            name: name.to_string(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            file,
            offset: info.start as u64,
            len: info.len,
        })
    };
    let tensors = [
        one(&names.gate_proj, [i, h])?,
        one(&names.up_proj, [i, h])?,
        one(&names.down_proj, [h, i])?,
    ];
    let bytes = tensors.iter().map(|t| t.aligned().2).sum();
    let stored = tensors.iter().map(|t| t.len as u64).sum();
    Ok(ExpertSource {
        tensors,
        act: cfg.expert_act,
        bytes,
        stored,
    })
}

fn open_source(path: &Path, direct: bool) -> Result<SourceFile> {
    if direct && let Some(file) = open_direct(path) {
        // A file system may accept the flag and refuse the reads (tmpfs, some FUSE): try one.
        let mut probe = vec![0u64; buffer_words(IO_ALIGN)];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut probe);
        let skip = bytes.as_ptr().align_offset(IO_ALIGN);
        if read_at(&file, &mut bytes[skip..skip + IO_ALIGN], 0).is_ok() {
            return Ok(SourceFile {
                path: path.to_path_buf(),
                file,
                direct: true,
            });
        }
    }
    if direct {
        warn!(
            file = %path.display(),
            "direct I/O is not available on this file: paged reads go through the page cache"
        );
    }
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    Ok(SourceFile {
        path: path.to_path_buf(),
        file,
        direct: false,
    })
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(target_os = "macos")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let file = File::open(path).ok()?;
    // SAFETY: fcntl on a file descriptor this function owns; F_NOCACHE takes an int argument.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) };
    (r != -1).then_some(file)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// Reads one matrix into a fresh aligned buffer; returns it and the bytes read.
fn read_tensor(f: &SourceFile, t: &TensorSource) -> Result<(Tensor, u64)> {
    let (start, n, _) = t.aligned();
    let mut buf = vec![0u64; buffer_words(n)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
    let skip = bytes.as_ptr().align_offset(IO_ALIGN);
    let dst = &mut bytes[skip..skip + n];
    let head = (t.offset - start) as usize;
    let need = head + t.len;
    let mut got = 0;
    while got < need {
        match read_at(&f.file, &mut dst[got..], start + got as u64) {
            Ok(0) => {
                return Err(EngineError::BadTensor {
                    name: t.name.clone(),
                    msg: format!(
                        "{} ends before bytes {}..{} of the tensor: truncated since it was opened?",
                        f.path.display(),
                        t.offset,
                        t.offset + t.len as u64
                    ),
                });
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(EngineError::io(&f.path, e)),
        }
    }
    let tensor = Tensor::from_owned_words(
        &t.name,
        t.dtype,
        t.shape.clone(),
        Arc::new(buf),
        skip + head,
        t.len,
    )?;
    Ok((tensor, got as u64))
}

fn read_expert(files: &[SourceFile], s: &ExpertSource) -> (Result<ExpertWeights>, u64) {
    let mut read = 0;
    let mut out = Vec::with_capacity(3);
    for t in &s.tensors {
        match read_tensor(&files[t.file], t) {
            Ok((tensor, n)) => {
                read += n;
                out.push(tensor);
            }
            Err(e) => return (Err(e), read),
        }
    }
    let mut it = out.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(gate_proj), Some(up_proj), Some(down_proj)) => (
            Ok(ExpertWeights {
                gate_proj,
                up_proj,
                down_proj,
                biases: None,
                act: s.act,
            }),
            read,
        ),
        _ => (
            Err(budget_err(
                "an expert read gave fewer than 3 matrices".into(),
            )),
            read,
        ),
    }
}

impl PagedExperts {
    /// Pages the experts `which` of `ckpt` within `opts.budget` bytes. Nothing is read yet.
    /// Refuses a budget below the largest expert (nothing could be computed), checkpoints whose
    /// experts are not stored as used (see [`Checkpoint::plain_range`]) and `--quantize`.
    pub fn new(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        which: impl IntoIterator<Item = (usize, usize)>,
        opts: PagedOptions,
    ) -> Result<Self> {
        let mut paths = Vec::new();
        let mut sources = BTreeMap::new();
        for (l, e) in which {
            let s = source_of(cfg, ckpt, l, e, &mut paths)?;
            sources.insert((l, e), Arc::new(s));
        }
        let largest = sources.values().map(|s| s.bytes).max().unwrap_or(0);
        let hosted_bytes = sources.values().map(|s| s.stored).sum();
        if opts.budget < largest {
            return Err(budget_err(format!(
                "{} bytes cannot hold one expert: the largest takes {largest} bytes (with its \
                 {IO_ALIGN}-byte read alignment); give at least that",
                opts.budget
            )));
        }
        let files = paths
            .iter()
            .map(|p| open_source(p, opts.direct))
            .collect::<Result<Vec<_>>>()?;
        let files = Arc::new(files);
        let mut layers: Vec<usize> = sources.keys().map(|k| k.0).collect();
        layers.dedup();
        let (job_tx, job_rx) = sync_channel::<Job>(MAX_IN_FLIGHT);
        let (res_tx, res_rx) = sync_channel::<Loaded>(MAX_IN_FLIGHT);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let n = opts.readers.clamp(1, 64);
        let mut readers = Vec::with_capacity(n);
        for k in 0..n {
            let (rx, tx, files) = (Arc::clone(&job_rx), res_tx.clone(), Arc::clone(&files));
            let h = std::thread::Builder::new()
                .name(format!("moeshard-pager-{k}"))
                .spawn(move || reader_loop(&rx, &tx, &files))
                .map_err(|e| budget_err(format!("cannot start a reader thread: {e}")))?;
            readers.push(h);
        }
        let direct = files.iter().all(|f| f.direct);
        info!(
            experts = sources.len(),
            budget = opts.budget,
            hosted_bytes,
            largest,
            readers = n,
            direct,
            "paged experts"
        );
        Ok(PagedExperts {
            hidden_size: cfg.hidden_size,
            opts,
            sources,
            layers,
            files,
            state: Mutex::new(State {
                resident: HashMap::new(),
                loading: HashMap::new(),
                used: 0,
                scores: HashMap::new(),
                pinned: HashSet::new(),
                tick: 0,
                results: res_rx,
            }),
            jobs: Mutex::new(Some(job_tx)),
            readers,
            hosted_bytes,
            largest,
            counters: Counters::default(),
        })
    }

    /// The `(layer, expert)` pairs hosted.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.sources.keys().copied()
    }

    /// Whether an expert is hosted.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.sources.contains_key(&(layer, expert))
    }

    /// The options.
    pub fn options(&self) -> PagedOptions {
        self.opts
    }

    /// The largest expert's buffer bytes (the smallest possible budget).
    pub fn largest_expert_bytes(&self) -> u64 {
        self.largest
    }

    /// Counters so far.
    pub fn stats(&self) -> PagedStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PagedStats {
            budget_bytes: self.opts.budget,
            resident_bytes: g(&c.resident_bytes),
            peak_resident_bytes: g(&c.peak_resident_bytes),
            resident_experts: g(&c.resident_experts),
            pinned_experts: g(&c.pinned_experts),
            hosted_experts: self.sources.len() as u64,
            hosted_bytes: self.hosted_bytes,
            hits: g(&c.hits),
            misses: g(&c.misses),
            disk_bytes: g(&c.disk_bytes),
            disk_reads: g(&c.disk_reads),
            prefetch_reads: g(&c.prefetch_reads),
            stall_us: g(&c.stall_us),
            batch_us: g(&c.batch_us),
            token_layers: g(&c.token_layers),
            direct_io: self.files.iter().all(|f| f.direct),
        }
    }

    fn err(&self, layer: usize, msg: String) -> EngineError {
        EngineError::Experts {
            layer,
            host: "local (paged)".into(),
            msg,
        }
    }

    /// Computes `rows` over `hidden`; returns `rows.len() * hidden_size` values, the same bits
    /// as [`crate::LocalExperts::compute`] on the same experts.
    pub fn compute(&self, layer: usize, hidden: &[f32], rows: &[ExpertRow]) -> Result<Vec<f32>> {
        let started = Instant::now();
        let h = self.hidden_size;
        if !hidden.len().is_multiple_of(h) {
            return Err(self.err(
                layer,
                format!("{} hidden values are not a multiple of {h}", hidden.len()),
            ));
        }
        let n_tokens = hidden.len() / h;
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            if r.token as usize >= n_tokens {
                return Err(self.err(
                    layer,
                    format!("row {i} names token {} of {n_tokens}", r.token),
                ));
            }
            if !self.holds(layer, r.expert as usize) {
                return Err(self.err(layer, format!("expert {} is not held here", r.expert)));
            }
            groups.entry(r.expert as usize).or_default().push(i);
        }
        let mut out = vec![0f32; rows.len() * h];
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.drain(&mut st);
        st.tick += 1;
        self.count_routes(&mut st, layer, &groups);
        // Experts of this batch are not evicted until they are computed.
        let mut busy: HashSet<Key> = groups.keys().map(|&e| (layer, e)).collect();
        let mut hits = Vec::new();
        let mut queue = VecDeque::new();
        let mut waiting: HashSet<Key> = HashSet::new();
        for &e in groups.keys() {
            let key = (layer, e);
            let tick = st.tick;
            if let Some(r) = st.resident.get_mut(&key) {
                r.last_used = tick;
                hits.push((key, Arc::clone(&r.weights)));
            } else {
                waiting.insert(key);
                if !st.loading.contains_key(&key) {
                    queue.push_back(key);
                }
            }
        }
        self.counters
            .hits
            .fetch_add(hits.len() as u64, Ordering::Relaxed);
        self.counters
            .misses
            .fetch_add(waiting.len() as u64, Ordering::Relaxed);
        // Every miss is asked for before any compute starts.
        self.issue(&mut st, &mut queue, &busy, false)?;
        let job = |key: Key, w: &ExpertWeights| {
            let idx = &groups[&key.1];
            let n = idx.len();
            let mut x = Vec::with_capacity(n * h);
            let mut ws = Vec::with_capacity(n);
            for &i in idx {
                let t = rows[i].token as usize;
                x.extend_from_slice(&hidden[t * h..(t + 1) * h]);
                ws.push(rows[i].weight);
            }
            let mut y = vec![0f32; n * h];
            w.forward(&x, n, &ws, &mut y);
            (key, y)
        };
        let place = |out: &mut [f32], key: Key, y: &[f32]| scatter_rows(out, &groups[&key.1], y, h);
        let done: Vec<(Key, Vec<f32>)> = hits.par_iter().map(|(k, w)| job(*k, w)).collect();
        for (key, y) in done {
            place(&mut out, key, &y);
            busy.remove(&key);
        }
        let mut stall = Duration::ZERO;
        while !waiting.is_empty() {
            self.issue(&mut st, &mut queue, &busy, false)?;
            if st.loading.is_empty() {
                return Err(self.err(
                    layer,
                    format!(
                        "the budget of {} bytes cannot hold the next expert of this batch",
                        self.opts.budget
                    ),
                ));
            }
            let t0 = Instant::now();
            let first = match st.results.recv_timeout(READ_TIMEOUT) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.err(
                        layer,
                        format!("no expert read finished within {READ_TIMEOUT:?}"),
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.err(layer, "the reader threads are gone".into()));
                }
            };
            stall += t0.elapsed();
            let mut arrived = vec![self.accept(&mut st, first)?];
            // Whatever else has arrived meanwhile is computed together.
            while let Ok(l) = st.results.try_recv() {
                arrived.push(self.accept(&mut st, l)?);
            }
            let ready: Vec<(Key, Arc<ExpertWeights>)> = arrived
                .into_iter()
                .filter(|(k, _)| waiting.contains(k))
                .collect();
            let done: Vec<(Key, Vec<f32>)> = ready.par_iter().map(|(k, w)| job(*k, w)).collect();
            for (key, y) in done {
                place(&mut out, key, &y);
                busy.remove(&key);
                waiting.remove(&key);
            }
        }
        self.prefetch(&mut st, layer)?;
        self.publish(&st);
        drop(st);
        let c = &self.counters;
        c.stall_us
            .fetch_add(stall.as_micros() as u64, Ordering::Relaxed);
        c.batch_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.token_layers.fetch_add(n_tokens as u64, Ordering::Relaxed);
        debug!(
            layer,
            experts = groups.len(),
            stall_us = stall.as_micros() as u64,
            "paged batch"
        );
        Ok(out)
    }

    /// Decays and adds this batch's routing counts; recomputes the pinned set now and then.
    fn count_routes(&self, st: &mut State, layer: usize, groups: &BTreeMap<usize, Vec<usize>>) {
        // Scores grow by 2^(tick / half-life) instead of all decaying; rescaled before f64 cares.
        let span = 64.0 * HALF_LIFE_BATCHES;
        if st.tick as f64 >= span {
            let f = 2f64.powf(-64.0);
            for v in st.scores.values_mut() {
                *v *= f;
            }
            st.tick -= span as u64;
        }
        let inc = 2f64.powf(st.tick as f64 / HALF_LIFE_BATCHES);
        for (&e, idx) in groups {
            *st.scores.entry((layer, e)).or_insert(0.0) += inc * idx.len() as f64;
        }
        if st.tick.is_multiple_of(PIN_EVERY) || st.pinned.is_empty() {
            let mut ranked: Vec<(Key, f64)> = st.scores.iter().map(|(k, v)| (*k, *v)).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let limit = self.opts.budget / 4 * 3;
            let mut total = 0;
            st.pinned.clear();
            for (k, _) in ranked {
                let b = self.sources[&k].bytes;
                if total + b > limit {
                    break;
                }
                total += b;
                st.pinned.insert(k);
            }
        }
    }

    /// Makes room for `bytes` by evicting resident experts not in `busy`: unpinned before
    /// pinned, lowest score first, then least recently used. With `below` only experts scored
    /// below it go (reads ahead never push out anything hotter). False when it cannot.
    fn reserve(&self, st: &mut State, bytes: u64, busy: &HashSet<Key>, below: Option<f64>) -> bool {
        while self.opts.budget - st.used < bytes {
            let victim = st
                .resident
                .iter()
                .filter(|(k, _)| !busy.contains(k))
                .map(|(k, r)| {
                    let pinned = st.pinned.contains(k);
                    let score = st.scores.get(k).copied().unwrap_or(0.0);
                    (*k, pinned, score, r.last_used)
                })
                .filter(|&(_, pinned, score, _)| below.is_none_or(|b| !pinned && score < b))
                .min_by(|a, b| {
                    a.1.cmp(&b.1)
                        .then(a.2.total_cmp(&b.2))
                        .then(a.3.cmp(&b.3))
                        .then(a.0.cmp(&b.0))
                });
            let Some((k, ..)) = victim else {
                return false;
            };
            if let Some(r) = st.resident.remove(&k) {
                st.used -= r.bytes;
            }
        }
        st.used += bytes;
        let peak = &self.counters.peak_resident_bytes;
        peak.fetch_max(st.used, Ordering::Relaxed);
        true
    }

    /// Reserves room for and sends the reads of `queue`, in order, while they fit.
    fn issue(
        &self,
        st: &mut State,
        queue: &mut VecDeque<Key>,
        busy: &HashSet<Key>,
        prefetch: bool,
    ) -> Result<()> {
        while let Some(&key) = queue.front() {
            if st.loading.len() >= MAX_IN_FLIGHT {
                break;
            }
            let source = Arc::clone(&self.sources[&key]);
            if !self.reserve(st, source.bytes, busy, None) {
                break;
            }
            queue.pop_front();
            self.send(st, key, source, prefetch)?;
        }
        Ok(())
    }

    fn send(
        &self,
        st: &mut State,
        key: Key,
        source: Arc<ExpertSource>,
        prefetch: bool,
    ) -> Result<()> {
        let bytes = source.bytes;
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let sent = jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { key, source }).is_ok());
        if !sent {
            st.used -= bytes;
            return Err(self.err(key.0, "the reader threads are gone".into()));
        }
        st.loading.insert(key, bytes);
        self.counters.disk_reads.fetch_add(1, Ordering::Relaxed);
        if prefetch {
            self.counters.prefetch_reads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Takes a finished read into the cache (its bytes were reserved when it was sent).
    fn accept(&self, st: &mut State, l: Loaded) -> Result<(Key, Arc<ExpertWeights>)> {
        let bytes = st.loading.remove(&l.key).unwrap_or(0);
        self.counters
            .disk_bytes
            .fetch_add(l.bytes_read, Ordering::Relaxed);
        match l.weights {
            Ok(w) => {
                let w = Arc::new(w);
                st.resident.insert(
                    l.key,
                    Resident {
                        weights: Arc::clone(&w),
                        bytes,
                        last_used: st.tick,
                    },
                );
                Ok((l.key, w))
            }
            Err(e) => {
                st.used -= bytes;
                Err(self.err(l.key.0, format!("reading expert {}: {e}", l.key.1)))
            }
        }
    }

    /// Takes in reads that finished between batches (reads ahead).
    fn drain(&self, st: &mut State) {
        while let Ok(l) = st.results.try_recv() {
            if let Err(e) = self.accept(st, l) {
                // A failed read ahead is not this batch's failure: it is read again.
                warn!("{e}");
            }
        }
    }

    /// Reads ahead the best-scored experts of the MoE layer after `layer` that are neither
    /// resident nor loading, into free room or in place of colder unpinned experts.
    fn prefetch(&self, st: &mut State, layer: usize) -> Result<()> {
        if self.opts.prefetch == 0 || self.layers.is_empty() {
            return Ok(());
        }
        let next = self
            .layers
            .iter()
            .copied()
            .find(|&l| l > layer)
            .unwrap_or(self.layers[0]);
        let mut cands: Vec<(Key, f64)> = self
            .sources
            .range((next, 0)..(next + 1, 0))
            .map(|(k, _)| *k)
            .filter(|k| !st.resident.contains_key(k) && !st.loading.contains_key(k))
            .filter_map(|k| st.scores.get(&k).map(|&s| (k, s)))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let none = HashSet::new();
        for (key, score) in cands.into_iter().take(self.opts.prefetch) {
            if st.loading.len() >= MAX_IN_FLIGHT {
                break;
            }
            let source = Arc::clone(&self.sources[&key]);
            if !self.reserve(st, source.bytes, &none, Some(score)) {
                break;
            }
            self.send(st, key, source, true)?;
        }
        Ok(())
    }

    fn publish(&self, st: &State) {
        let c = &self.counters;
        c.resident_bytes.store(st.used, Ordering::Relaxed);
        c.resident_experts
            .store(st.resident.len() as u64, Ordering::Relaxed);
        c.pinned_experts.store(
            st.pinned
                .iter()
                .filter(|k| st.resident.contains_key(k))
                .count() as u64,
            Ordering::Relaxed,
        );
    }
}

fn reader_loop(jobs: &Mutex<Receiver<Job>>, results: &SyncSender<Loaded>, files: &[SourceFile]) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else {
            return; // the host is gone
        };
        let (weights, bytes_read) = read_expert(files, &job.source);
        if results
            .send(Loaded {
                key: job.key,
                weights,
                bytes_read,
            })
            .is_err()
        {
            return;
        }
    }
}

impl Drop for PagedExperts {
    fn drop(&mut self) {
        // Closing the job queue ends the readers once their current read is done.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Results still queued would block a reader on a full result queue: drop the receiver
        // side's backlog by draining it while joining.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for h in self.readers.drain(..) {
            while !h.is_finished() {
                while st.results.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.join();
        }
    }
}

impl ExpertBackend for PagedExperts {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        Ok(Box::new(Deferred {
            host: self,
            compute: PagedExperts::compute,
            layer,
            hidden,
            rows,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error
mod tests {
    use super::*;
    use crate::LocalExperts;
    use crate::sampling::Rng;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    fn all(cfg: &ModelConfig) -> Vec<Key> {
        cfg.moe_layers()
            .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
            .collect()
    }

    /// Random batches of random routing: `(layer, hidden, rows)`.
    fn batches(cfg: &ModelConfig, n: usize, seed: u64) -> Vec<(usize, Vec<f32>, Vec<ExpertRow>)> {
        let mut rng = Rng::new(seed);
        let layers: Vec<usize> = cfg.moe_layers().collect();
        let mut out = Vec::new();
        for b in 0..n {
            let layer = layers[b % layers.len()];
            let tokens = 1 + (rng.next_u64() % 4) as usize;
            let hidden: Vec<f32> = (0..tokens * cfg.hidden_size)
                .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let mut rows = Vec::new();
            for t in 0..tokens {
                let mut chosen = Vec::new();
                while chosen.len() < cfg.num_experts_per_tok.min(cfg.num_experts) {
                    // Skewed: low experts are hot, so pinning has something to find.
                    let a = rng.next_u64() % cfg.num_experts as u64;
                    let e = (a * (rng.next_u64() % cfg.num_experts as u64) / cfg.num_experts as u64)
                        as u32;
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                for e in chosen {
                    rows.push(ExpertRow {
                        token: t as u32,
                        expert: e,
                        weight: 0.25 + (rng.next_u64() % 100) as f32 / 200.0,
                    });
                }
            }
            out.push((layer, hidden, rows));
        }
        out
    }

    fn check_bit_identical(name: &str, fraction: u64) -> PagedStats {
        let (cfg, ckpt) = Checkpoint::open_with_config(&fixture(name)).unwrap();
        let local = LocalExperts::load_all(&cfg, &ckpt).unwrap();
        let total = paged_bytes(&cfg, &ckpt, all(&cfg)).unwrap();
        let budget = (total / fraction).max(min_budget(&cfg, &ckpt, all(&cfg)).unwrap());
        let paged = PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(budget)).unwrap();
        for (layer, hidden, rows) in batches(&cfg, 60, 7) {
            let want = local.compute(layer, &hidden, &rows).unwrap();
            let got = paged.compute(layer, &hidden, &rows).unwrap();
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same && want.len() == got.len(),
                "{name} layer {layer} differs"
            );
        }
        let s = paged.stats();
        assert!(s.peak_resident_bytes <= budget, "{s:?} over {budget}");
        assert!(s.resident_bytes <= budget);
        assert!(s.hosted_bytes <= total && s.hosted_bytes > 0);
        s
    }

    /// At a quarter of the expert bytes the outputs are the unconstrained ones to the bit, the
    /// budget holds, and experts really come from disk.
    #[test]
    fn quarter_budget_is_bit_identical() {
        for name in ["qwen3_moe_tiny", "mixtral_tiny", "qwen2_moe_tiny"] {
            let s = check_bit_identical(name, 4);
            assert!(s.misses > 0, "{name}: {s:?}");
            assert!(s.disk_bytes > 0 && s.disk_reads > 0, "{name}: {s:?}");
        }
    }

    /// An expert every token uses is pinned: once read it is always found resident, while the
    /// others come and go through the rest of the budget.
    #[test]
    fn hot_experts_stay_resident() {
        let (cfg, ckpt) = Checkpoint::open_with_config(&fixture("qwen3_moe_tiny")).unwrap();
        let local = LocalExperts::load_all(&cfg, &ckpt).unwrap();
        let total = paged_bytes(&cfg, &ckpt, all(&cfg)).unwrap();
        let opts = PagedOptions {
            prefetch: 0,
            ..PagedOptions::new(total / 2)
        };
        let paged = PagedExperts::new(&cfg, &ckpt, all(&cfg), opts).unwrap();
        let layers: Vec<usize> = cfg.moe_layers().collect();
        let mut rng = Rng::new(3);
        let n = 80;
        for b in 0..n {
            let layer = layers[b % layers.len()];
            let hidden: Vec<f32> = (0..cfg.hidden_size)
                .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let other = 1 + (rng.next_u64() % (cfg.num_experts as u64 - 1)) as u32;
            let rows = [
                ExpertRow {
                    token: 0,
                    expert: 0,
                    weight: 0.6,
                },
                ExpertRow {
                    token: 0,
                    expert: other,
                    weight: 0.4,
                },
            ];
            let want = local.compute(layer, &hidden, &rows).unwrap();
            let got = paged.compute(layer, &hidden, &rows).unwrap();
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
        let s = paged.stats();
        // Expert 0 of each layer misses once; the others miss often (4 candidates, few slots).
        assert!(s.hits >= n as u64 - 2, "{s:?}");
        assert!(s.misses >= 2 && s.pinned_experts >= 2, "{s:?}");
        assert!(s.peak_resident_bytes <= total / 2, "{s:?}");
    }

    /// GGUF experts (slices of the stacked tensors, Q8_0 blocks) page the same way.
    #[test]
    fn gguf_quarter_budget_is_bit_identical() {
        for f in [
            "gguf/qwen3_moe_gguf-q8_0.gguf",
            "gguf/qwen3_moe_gguf-f16.gguf",
        ] {
            let s = check_bit_identical(f, 4);
            assert!(s.misses > 0 && s.disk_bytes > 0, "{f}: {s:?}");
        }
    }

    /// With room for everything, every expert is read once and then always hit.
    #[test]
    fn full_budget_reads_each_expert_once() {
        let s = check_bit_identical("qwen3_moe_tiny", 1);
        assert!(s.disk_reads <= s.hosted_experts, "{s:?}");
    }

    #[test]
    fn refuses_what_cannot_be_paged() {
        let (cfg, mut ckpt) = Checkpoint::open_with_config(&fixture("qwen3_moe_tiny")).unwrap();
        let least = min_budget(&cfg, &ckpt, all(&cfg)).unwrap();
        let e = PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(least - 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot hold one expert"), "{e}");
        assert!(PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(least)).is_ok());
        ckpt.set_quantize(Some(crate::safetensors::Quantize {
            qtype: crate::quant::QType::Q8_0,
            all: false,
        }));
        let e = PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--quantize"), "{e}");
        let (cfg, ckpt) = Checkpoint::open_with_config(&fixture("gpt_oss_tiny")).unwrap();
        let e = PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPT-OSS"), "{e}");
    }

    /// A file cut short after opening gives an error naming the tensor, not a panic or a hang.
    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("qwen3_moe_tiny").join(f), dir.path().join(f)).unwrap();
        }
        let (cfg, ckpt) = Checkpoint::open_with_config(dir.path()).unwrap();
        let paged = PagedExperts::new(&cfg, &ckpt, all(&cfg), PagedOptions::new(1 << 30)).unwrap();
        let layer = cfg.moe_layers().last().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("model.safetensors"))
            .unwrap();
        f.set_len(4096).unwrap();
        let hidden = vec![0.5f32; cfg.hidden_size];
        let rows = [ExpertRow {
            token: 0,
            expert: 1,
            weight: 1.0,
        }];
        let e = paged
            .compute(layer, &hidden, &rows)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expert 1"), "{e}");
    }
}
