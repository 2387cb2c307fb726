//! `moeshard bench`: decode and prefill throughput, and the round trip of one MoE layer's experts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use moeshard_engine::sampling::Rng;
use moeshard_engine::{ExpertBackend, ExpertRow, Model, PendingExperts, SeqStep, WantLogits};
use serde::Serialize;

use crate::cli::{ClusterArgs, ModelArgs};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Prompt length before decoding.
    #[arg(long, default_value_t = 32)]
    pub decode_prompt: usize,
    /// Tokens decoded one step at a time.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run at --memory-budget 100%, 50% and 25% of the routed experts' bytes (of each local
    /// worker's share with --local-workers) and report each (JSON: one object per line).
    #[arg(long, conflicts_with = "memory_budget")]
    pub memory_budget_sweep: bool,
}

/// Paged-expert counters over the decode measurement (`--memory-budget`).
#[derive(Serialize, Debug, Clone, Default)]
pub(crate) struct PagedReport {
    /// The budget (per host).
    pub memory_budget_bytes: u64,
    /// Bytes of all routed experts' buffers (what every host would hold unconstrained).
    pub expert_bytes: u64,
    /// Share of expert uses found resident.
    pub hit_rate: f64,
    /// Bytes read from disk per decoded token.
    pub disk_bytes_per_token: f64,
    /// Milliseconds per decoded token spent waiting for reads.
    pub stall_ms_per_token: f64,
    /// Expert buffer bytes held at the end (all hosts).
    pub resident_bytes: u64,
    /// Whether every read bypassed the page cache.
    pub direct_io: bool,
    /// Disk bytes per token x decode tokens/s (what the decode asked of the disk), MB/s.
    pub disk_mb_s: f64,
}

/// What `bench --json` prints.
#[derive(Serialize, Debug)]
pub(crate) struct BenchReport {
    pub model: String,
    pub workers: usize,
    pub transport: String,
    pub threads: usize,
    pub decode_tok_s: f64,
    pub prefill_tok_s: f64,
    pub dispatch_p50_us: f64,
    pub dispatch_p99_us: f64,
    pub dispatch_samples: usize,
    pub moe_layers: usize,
    pub decode_ms_per_token: f64,
    /// Seconds from opening the checkpoint to a model ready to run (workers started and
    /// assigned included).
    pub load_s: f64,
    /// Set with --memory-budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paged: Option<PagedReport>,
}

/// Summed paged counters of every host (this process or the workers), if any pages.
pub(crate) type PagedProbe<'a> = &'a dyn Fn() -> Option<moeshard_engine::paged::PagedStats>;

/// Times every dispatch-to-wait round trip of the wrapped backend.
pub(crate) struct Timed<'b> {
    inner: &'b dyn ExpertBackend,
    samples: Mutex<Vec<Duration>>,
}

impl<'b> Timed<'b> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: &'b dyn ExpertBackend) -> Self {
        Timed {
            inner,
            samples: Mutex::new(Vec::new()),
        }
    }

    /// Seconds of the round trips since the last call, summed.
    pub(crate) fn take_total_s(&self) -> f64 {
        self.samples
            .lock()
            .map(|mut s| s.drain(..).map(|d| d.as_secs_f64()).sum())
            .unwrap_or(0.0)
    }
}

struct TimedPending<'a> {
    inner: Box<dyn PendingExperts + 'a>,
    started: Instant,
    samples: &'a Mutex<Vec<Duration>>,
}

impl PendingExperts for TimedPending<'_> {
    fn wait(self: Box<Self>) -> moeshard_engine::Result<Vec<f32>> {
        let out = self.inner.wait();
        if let Ok(mut s) = self.samples.lock() {
            s.push(self.started.elapsed());
        }
        out
    }
}

impl ExpertBackend for Timed<'_> {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> moeshard_engine::Result<Box<dyn PendingExperts + 'a>> {
        let started = Instant::now();
        let inner = self.inner.dispatch(layer, hidden, rows)?;
        Ok(Box::new(TimedPending {
            inner,
            started,
            samples: &self.samples,
        }))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Runs the measurements on a loaded model and backend.
pub(crate) fn measure(
    model: &Model,
    backend: &dyn ExpertBackend,
    a: &BenchArgs,
    paged: PagedProbe,
) -> Result<BenchReport> {
    let vocab = model.cfg.vocab_size;
    let mut rng = Rng::new(1234);
    let timed = Timed {
        inner: backend,
        samples: Mutex::new(Vec::new()),
    };
    // Warm up: touch the weights once.
    {
        let mut cache = model.new_cache(8);
        let toks = random_tokens(&mut rng, 4, vocab);
        let mut steps = [SeqStep {
            tokens: &toks,
            cache: &mut cache,
            want: WantLogits::Last,
        }];
        model.forward(&mut steps, backend)?;
    }
    let mut best_decode = f64::INFINITY;
    let mut best_prefill = f64::INFINITY;
    let mut samples = Vec::new();
    let mut paged_report = None;
    for _ in 0..a.repeat.max(1) {
        // Decode: a short prompt, then one token per step (the tokens themselves do not matter).
        let prompt = random_tokens(&mut rng, a.decode_prompt.max(1), vocab);
        let mut cache = model.new_cache(prompt.len() + a.decode_tokens + 1);
        let mut steps = [SeqStep {
            tokens: &prompt,
            cache: &mut cache,
            want: WantLogits::Last,
        }];
        model.forward(&mut steps, backend)?;
        if let Ok(mut s) = timed.samples.lock() {
            s.clear();
        }
        let next = random_tokens(&mut rng, a.decode_tokens, vocab);
        let before = paged();
        let t0 = Instant::now();
        for t in &next {
            let tok = [*t];
            let mut steps = [SeqStep {
                tokens: &tok,
                cache: &mut cache,
                want: WantLogits::Last,
            }];
            model.forward(&mut steps, &timed)?;
        }
        let dt = t0.elapsed().as_secs_f64();
        if dt < best_decode {
            best_decode = dt;
            if let (Some(b), Some(e)) = (before, paged()) {
                let n = a.decode_tokens.max(1) as f64;
                let (hits, misses) = (e.hits - b.hits, e.misses - b.misses);
                let per_token = (e.disk_bytes - b.disk_bytes) as f64 / n;
                paged_report = Some(PagedReport {
                    memory_budget_bytes: e.budget_bytes,
                    expert_bytes: e.hosted_bytes,
                    hit_rate: if hits + misses == 0 {
                        0.0
                    } else {
                        hits as f64 / (hits + misses) as f64
                    },
                    disk_bytes_per_token: per_token,
                    stall_ms_per_token: (e.stall_us - b.stall_us) as f64 / 1e3 / n,
                    resident_bytes: e.resident_bytes,
                    direct_io: e.direct_io,
                    disk_mb_s: per_token * n / dt / 1e6,
                });
            }
            samples = timed.samples.lock().map(|s| s.clone()).unwrap_or_default();
        }
        // Prefill.
        if a.prefill_tokens > 0 {
            let prompt = random_tokens(&mut rng, a.prefill_tokens, vocab);
            let t0 = Instant::now();
            let mut cache = model.new_cache(prompt.len());
            moeshard_engine::generate::prefill(model, backend, &prompt, &mut cache)?;
            best_prefill = best_prefill.min(t0.elapsed().as_secs_f64());
        }
    }
    samples.sort();
    Ok(BenchReport {
        model: a.model.model.display().to_string(),
        workers: if a.cluster.local_workers > 0 {
            a.cluster.local_workers
        } else {
            a.cluster.workers.len()
        },
        transport: if a.cluster.local_workers > 0 || !a.cluster.workers.is_empty() {
            a.cluster.transport.clone()
        } else {
            "none".into()
        },
        threads: rayon::current_num_threads(),
        decode_tok_s: a.decode_tokens as f64 / best_decode,
        prefill_tok_s: if a.prefill_tokens > 0 {
            a.prefill_tokens as f64 / best_prefill
        } else {
            0.0
        },
        dispatch_p50_us: percentile(&samples, 0.5),
        dispatch_p99_us: percentile(&samples, 0.99),
        load_s: 0.0,
        dispatch_samples: samples.len(),
        moe_layers: model.cfg.moe_layers().count(),
        decode_ms_per_token: best_decode * 1e3 / a.decode_tokens as f64,
        paged: paged_report,
    })
}

/// Prints a report as a table or JSON.
pub(crate) fn print(r: &BenchReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("model            {}", r.model);
        println!("workers          {} ({})", r.workers, r.transport);
        println!("threads          {}", r.threads);
        println!("load             {:.2} s", r.load_s);
        println!(
            "decode           {:.1} tokens/s ({:.2} ms/token)",
            r.decode_tok_s, r.decode_ms_per_token
        );
        println!("prefill          {:.1} tokens/s", r.prefill_tok_s);
        println!(
            "MoE round trip   p50 {:.0} us, p99 {:.0} us ({} samples over {} MoE layers)",
            r.dispatch_p50_us, r.dispatch_p99_us, r.dispatch_samples, r.moe_layers
        );
        if let Some(p) = &r.paged {
            println!(
                "memory budget    {} of {} expert bytes ({:.0}%), direct I/O {}",
                p.memory_budget_bytes,
                p.expert_bytes,
                100.0 * p.memory_budget_bytes as f64 / p.expert_bytes.max(1) as f64,
                if p.direct_io { "yes" } else { "no" }
            );
            println!(
                "paged decode     hit rate {:.1}%, {:.2} MB read per token ({:.0} MB/s), \
                 {:.2} ms/token waiting for reads",
                100.0 * p.hit_rate,
                p.disk_bytes_per_token / 1e6,
                p.disk_mb_s,
                p.stall_ms_per_token
            );
        }
    }
    Ok(())
}

/// Loads the model as `cluster` says (timed) and measures it.
fn load_and_measure(a: &BenchArgs, cluster: &ClusterArgs) -> Result<BenchReport> {
    let t = Instant::now();
    let loaded = crate::cli::load(&a.model.model, cluster)?;
    let load_s = t.elapsed().as_secs_f64();
    let probe = || probe(&loaded);
    let mut report = measure(&loaded.model, loaded.experts.as_ref(), a, &probe)?;
    report.load_s = load_s;
    Ok(report)
}

/// `moeshard bench`: one run, or with --memory-budget-sweep one per budget.
pub(crate) fn cmd_bench(a: BenchArgs) -> Result<()> {
    if !a.memory_budget_sweep {
        return print(&load_and_measure(&a, &a.cluster)?, a.json);
    }
    let (cfg, ckpt) =
        crate::cluster::open_checkpoint(&a.model.model, &a.cluster.synthetic, &a.cluster.quant)?;
    let all: Vec<_> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .collect();
    let total = moeshard_engine::paged::paged_bytes(&cfg, &ckpt, all)?;
    drop(ckpt);
    let share = total / a.cluster.local_workers.max(1) as u64;
    for pct in [100u64, 50, 25] {
        let mut cluster = a.cluster.clone();
        // A share rounded down could miss one expert's alignment slack: 100% is the whole share.
        cluster.paged.memory_budget = Some(if pct == 100 {
            share + (64 << 20)
        } else {
            share / 100 * pct
        });
        let report = load_and_measure(&a, &cluster)?;
        if !a.json {
            println!("--- memory budget {pct}% of the expert bytes");
        }
        print(&report, a.json)?;
    }
    Ok(())
}

/// The paged counters of this process, or summed over its workers.
fn probe(loaded: &crate::cluster::Loaded) -> Option<moeshard_engine::paged::PagedStats> {
    if let Some(p) = &loaded.paged {
        return Some(p.stats());
    }
    let c = loaded.cluster.as_ref()?;
    let mut sum = moeshard_engine::paged::PagedStats {
        direct_io: true,
        ..Default::default()
    };
    let mut any = false;
    for (_, s) in c.monitor.worker_stats(Duration::from_secs(5)) {
        let Ok(s) = s else { continue };
        if s.paged_budget_bytes == 0 {
            continue;
        }
        any = true;
        sum.budget_bytes = sum.budget_bytes.max(s.paged_budget_bytes);
        sum.resident_bytes += s.paged_resident_bytes;
        sum.hits += s.paged_hits;
        sum.misses += s.paged_misses;
        sum.disk_bytes += s.paged_disk_bytes;
        sum.stall_us += s.paged_stall_us;
        sum.hosted_bytes += s.hosted_bytes;
        sum.direct_io &= s.paged_direct_io;
    }
    any.then_some(sum)
}
