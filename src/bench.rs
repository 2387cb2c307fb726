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
}

/// Times every dispatch-to-wait round trip of the wrapped backend.
struct Timed<'b> {
    inner: &'b dyn ExpertBackend,
    samples: Mutex<Vec<Duration>>,
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
        dispatch_samples: samples.len(),
        moe_layers: model.cfg.moe_layers().count(),
        decode_ms_per_token: best_decode * 1e3 / a.decode_tokens as f64,
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
        println!(
            "decode           {:.1} tokens/s ({:.2} ms/token)",
            r.decode_tok_s, r.decode_ms_per_token
        );
        println!("prefill          {:.1} tokens/s", r.prefill_tok_s);
        println!(
            "MoE round trip   p50 {:.0} us, p99 {:.0} us ({} samples over {} MoE layers)",
            r.dispatch_p50_us, r.dispatch_p99_us, r.dispatch_samples, r.moe_layers
        );
    }
    Ok(())
}
