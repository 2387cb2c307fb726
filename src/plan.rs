//! `moeshard plan` and `moeshard calibrate`: capacity planning from a config alone, and the
//! measured figures of this node that plans should use.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use moeshard_coordinator::plan::{
    ClusterSpec, ModelShape, PlanRequest, Quant, Rates, plan, render,
};
use moeshard_engine::kernels;
use moeshard_engine::tensor::Mat;
use moeshard_engine::{ExpertBackend, ExpertRow, SeqStep, WantLogits};
use serde::{Deserialize, Serialize};

use crate::cli::{ClusterArgs, QuantArgs, SyntheticArgs};

/// Most bytes read from the front of a GGUF file for its metadata (vocabularies of 250k tokens and
/// a chat template fit well within this).
const GGUF_HEADER_READ: u64 = 64 << 20;

#[derive(Args)]
pub(crate) struct PlanArgs {
    /// A checkpoint directory, a config.json or a GGUF file (or just its first bytes): no weights
    /// are needed.
    #[arg(long)]
    pub model: PathBuf,
    /// The cluster: nodes (memory, bandwidth, cores) and the link (see examples/clusters/).
    #[arg(long)]
    pub cluster: PathBuf,
    /// Weight format of the routed experts: f32, bf16, f16, q8_0, q4_k, q4_0, mxfp4, fp8.
    #[arg(long, default_value = "bf16")]
    pub quant: String,
    /// Weight format of the dense part (defaults to the experts').
    #[arg(long)]
    pub dense_quant: Option<String>,
    /// Tokens of context per sequence.
    #[arg(long, default_value_t = 4096)]
    pub context: u64,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u64,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: u64,
    /// Plan the model cut to its first K layers (as `--synthetic --layers K` runs it).
    #[arg(long)]
    pub layers: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn cmd_plan(a: PlanArgs) -> Result<()> {
    let cfg_path = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    let model = if cfg_path.extension().is_some_and(|e| e == "gguf") {
        // The metadata sits at the front; a header cut from a large file is enough.
        let mut head = Vec::new();
        std::fs::File::open(&cfg_path)
            .and_then(|f| f.take(GGUF_HEADER_READ).read_to_end(&mut head))
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let (_, meta) = moeshard_engine::gguf::parse_metadata(&cfg_path, &head)?;
        ModelShape::from_gguf_metadata(&meta)
            .with_context(|| format!("sizing {}", cfg_path.display()))?
    } else {
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        ModelShape::from_config_json(&text)
            .with_context(|| format!("sizing {}", cfg_path.display()))?
    };
    let model = match a.layers {
        Some(k) => model.with_layers(k),
        None => model,
    };
    let ctext = std::fs::read_to_string(&a.cluster)
        .with_context(|| format!("reading {}", a.cluster.display()))?;
    let cluster =
        ClusterSpec::from_toml(&ctext).with_context(|| format!("in {}", a.cluster.display()))?;
    let q = |s: &str| {
        Quant::parse(s).with_context(|| {
            format!("unknown weight format {s:?} (f32, bf16, f16, q8_0, q4_k, q4_0, mxfp4, fp8)")
        })
    };
    let expert_quant = q(&a.quant)?;
    let dense_quant = match &a.dense_quant {
        Some(s) => q(s)?,
        None => expert_quant,
    };
    let p = plan(
        &model,
        &cluster,
        PlanRequest {
            expert_quant,
            dense_quant,
            context: a.context,
            concurrency: a.concurrency.max(1),
            prefill_tokens: a.prefill_tokens,
        },
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", render(&p));
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    /// Name of this node in the cluster file.
    #[arg(long, default_value = "this-node")]
    pub name: String,
    /// Bytes of the weight matrix streamed for the bandwidth figure.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: usize,
    /// Also measure the forward pass itself on synthetic weights of this config (a config.json
    /// or a directory holding one): decode and prefill rates per weight format at the model's
    /// real widths, which plans for this model then use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: keep only the first K layers (big models).
    #[arg(long, requires = "model")]
    pub layers: Option<usize>,
    /// With --model: weight formats to measure (bf16 as made; others quantize every linear
    /// weight on load, as `--quantize F --quantize-all`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bf16",
        requires = "model"
    )]
    pub quant: Vec<String>,
    /// With --model: decode steps measured per format.
    #[arg(long, default_value_t = 48, requires = "model")]
    pub decode_tokens: usize,
    /// With --model: measure every format this many times, the formats taking turns (each round
    /// in the opposite order of the last), and keep each rate's median: one pass per format
    /// would let a moment of a busy or throttled host decide every plan of that format.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "model")]
    pub rounds: u32,
    /// With --model: prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128, requires = "model")]
    pub prefill_tokens: usize,
    /// Transports whose dispatch overhead is measured against real local worker processes
    /// (none: leave the link at its defaults).
    #[arg(long, value_delimiter = ',', default_value = "grpc", value_parser = ["grpc", "quic", "none"])]
    pub rpc: Vec<String>,
    /// Print the figures as JSON instead of a cluster.toml node entry.
    #[arg(long)]
    pub json: bool,
    /// Write the node entry here (TOML) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Best of `n` runs of `f`, in seconds.
fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Dispatch overhead of one transport, measured against local worker processes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct RpcFigures {
    /// `grpc` or `quic`.
    pub transport: String,
    /// What dispatching a decode layer to one worker adds to computing it in-process, less its
    /// bytes at `per_kb_us`, us: the value at one worker of the line through the costs measured
    /// with 1, 2 and 3 local workers (the model's own decode, per MoE layer).
    pub overhead_us: f64,
    /// What each further worker contacted in the same layer adds: that line's slope, us.
    pub per_worker_us: f64,
    /// What each KB of request and reply adds (a 128-token request through top-k experts against
    /// a one-token one: prefill-sized), us.
    pub per_kb_us: f64,
}

/// Everything `moeshard calibrate` measures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Calibration {
    pub name: String,
    pub memory_gb: f64,
    pub mem_bw_gbs: f64,
    pub cores: u32,
    pub gflops_per_core: f64,
    pub loopback_rtt_us: f64,
    /// The config the rates were measured at, and its layer cut.
    pub model: Option<String>,
    pub layers: Option<usize>,
    pub rates: BTreeMap<String, Rates>,
    pub rpc: Vec<RpcFigures>,
}

impl Calibration {
    /// The `[[node]]` entry (and `[link]` of the first transport) of a cluster.toml.
    pub(crate) fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "# moeshard calibrate: measured on this node\n[[node]]\nname = {:?}\nmemory_gb = {:.1}\nmem_bw_gbs = {:.2}\ncores = {}\ngflops_per_core = {:.2}\n",
            self.name, self.memory_gb, self.mem_bw_gbs, self.cores, self.gflops_per_core
        );
        if let Some(m) = &self.model {
            let _ = writeln!(
                s,
                "# rates of the forward pass at the widths of {m}{}",
                self.layers
                    .map(|k| format!(" ({k} layers)"))
                    .unwrap_or_default()
            );
        }
        for (q, r) in &self.rates {
            s.push_str(&r.toml_table(q, Some(3)));
        }
        let _ = writeln!(
            s,
            "\n# loopback: {:.0} us round trip for 4 KB each way",
            self.loopback_rtt_us
        );
        for r in self.rpc.iter().skip(1) {
            let _ = writeln!(
                s,
                "# {}: overhead_us = {:.0}, per_worker_us = {:.0}, per_kb_us = {:.3}",
                r.transport, r.overhead_us, r.per_worker_us, r.per_kb_us
            );
        }
        let (o, w, kb) = self
            .rpc
            .first()
            .map_or((self.loopback_rtt_us, 0.0, 0.0), |r| {
                (r.overhead_us, r.per_worker_us, r.per_kb_us)
            });
        if let Some(r) = self.rpc.first() {
            let _ = writeln!(s, "# dispatch figures of {}", r.transport);
        }
        let _ = writeln!(
            s,
            "[link]\nbandwidth_gbps = 40\nrtt_us = 0\noverhead_us = {o:.0}\nper_worker_us = {w:.0}\nper_kb_us = {kb:.3}"
        );
        s
    }
}

pub(crate) fn cmd_calibrate(a: CalibrateArgs) -> Result<()> {
    let c = calibrate(&a)?;
    let text = if a.json {
        serde_json::to_string_pretty(&c)? + "\n"
    } else {
        c.to_toml()
    };
    match &a.out {
        Some(p) => std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    tracing::info!(bw_gbs = c.mem_bw_gbs, rates = ?c.rates, rpc = ?c.rpc, "calibrated");
    Ok(())
}

fn calibrate(a: &CalibrateArgs) -> Result<Calibration> {
    let threads = rayon::current_num_threads();
    if let Some(m) = &a.model {
        check_memory(m, a)?;
    }
    warn_if_busy();
    // Memory bandwidth as our decode kernel sees it: a bf16 matrix-vector product over a matrix
    // far larger than the caches.
    let cols = 4096;
    let rows = (a.bytes / 2 / cols).max(1);
    let w: Vec<half::bf16> = (0..rows * cols)
        .map(|i| half::bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3))
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut y = vec![0f32; rows];
    let t_mv = best_of(5, || {
        kernels::matmul(Mat::BF16(&w), rows, cols, &x, 1, &mut y)
    });
    drop(w);
    let bw = (rows * cols * 2) as f64 / t_mv / 1e9;
    // Compute: a batched product on an in-cache matrix.
    let (r2, c2, n2) = (512, 1024, 64);
    let w2: Vec<f32> = (0..r2 * c2).map(|i| (i % 7) as f32 * 0.1).collect();
    let x2: Vec<f32> = (0..n2 * c2).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y2 = vec![0f32; n2 * r2];
    let t_mm = best_of(5, || {
        kernels::matmul(Mat::F32(&w2), r2, c2, &x2, n2, &mut y2)
    });
    let gflops = 2.0 * (r2 * c2 * n2) as f64 / t_mm / 1e9;
    // Loopback round trip of a decode-sized message (one 4 KB hidden state each way).
    let rtt_us = loopback_rtt_us(4096, 200)?;
    let mut rates = BTreeMap::new();
    let mut rpc = Vec::new();
    if let Some(m) = &a.model {
        let mut runs: BTreeMap<String, Vec<Rates>> = BTreeMap::new();
        for round in 0..a.rounds {
            let order: Vec<&String> = if round % 2 == 0 {
                a.quant.iter().collect()
            } else {
                a.quant.iter().rev().collect()
            };
            for q in order {
                let r = measure_rates(m, a.layers, q, a.decode_tokens, a.prefill_tokens)
                    .with_context(|| {
                        format!("measuring the forward pass of {} as {q}", m.display())
                    })?;
                tracing::info!(quant = %q, round, ?r, "forward-pass rates");
                runs.entry(q.clone()).or_default().push(r);
            }
        }
        for (q, rs) in runs {
            rates.insert(q, median_rates(&rs));
        }
        let transports: Vec<&str> = a
            .rpc
            .iter()
            .map(String::as_str)
            .filter(|t| *t != "none")
            .collect();
        if !transports.is_empty() {
            // What a dispatch adds to the compute hardly depends on the weights' format (the
            // compute itself is subtracted): measured in the first format listed.
            let q = a.quant.first().map_or("bf16", String::as_str);
            rpc = measure_rpc(m, a.layers, q, &transports, rates.get(q))
                .with_context(|| format!("measuring {} dispatches", transports.join(", ")))?;
        }
    }
    Ok(Calibration {
        name: a.name.clone(),
        memory_gb: total_memory_gb().unwrap_or(0.0),
        mem_bw_gbs: bw,
        cores: threads as u32,
        gflops_per_core: gflops / threads as f64,
        loopback_rtt_us: rtt_us,
        model: a.model.as_ref().map(|m| m.display().to_string()),
        layers: a.layers,
        rates,
        rpc,
    })
}

/// Fails, naming the figures, when the synthetic model calibrate would build does not fit in the
/// memory available: one copy per format measured, and four at once for the dispatch costs
/// (this process's, and the 1, 2 and 3 local workers' experts with their coordinators' dense
/// parts), in the first format.
fn check_memory(model: &Path, a: &CalibrateArgs) -> Result<()> {
    let shape = model_shape(model, a.layers)?;
    let gb = |quant: &str| -> Result<f64> {
        let q = Quant::parse(quant).with_context(|| format!("unknown weight format {quant:?}"))?;
        Ok(shape.total_params() as f64 * q.bytes_per_weight() / 1e9)
    };
    let mut need = 0f64;
    for q in &a.quant {
        need = need.max(gb(q)?);
    }
    let rpc = a.rpc.iter().any(|t| t != "none");
    if rpc {
        need = need.max((1 + RPC_MAX_WORKERS) as f64 * gb(a.quant.first().map_or("bf16", |q| q))?);
    }
    let Some(avail) = available_memory_gb() else {
        return Ok(());
    };
    anyhow::ensure!(
        need < 0.85 * avail,
        "calibrating {} needs about {need:.1} GB of synthetic weights{} and {avail:.1} GB is \
         available: pass --layers K to keep only the first K layers{}",
        model.display(),
        if rpc {
            " (four copies at once for the dispatch costs: here and on 1, 2 and 3 local workers)"
        } else {
            ""
        },
        if rpc { ", or --rpc none" } else { "" }
    );
    Ok(())
}

/// The shape of the model at `model` (a directory or its config.json), cut to its first
/// `layers` layers as `--synthetic --layers K` runs it.
fn model_shape(model: &Path, layers: Option<usize>) -> Result<ModelShape> {
    let shape = ModelShape::from_config_json(&config_text(model)?)?;
    Ok(match layers {
        Some(k) => shape.with_layers(k as u64),
        None => shape,
    })
}

/// How calibrate loads a model: synthetic weights (the first `layers` layers), every linear
/// weight quantized to `quant` unless it is bf16 (as `--quantize F --quantize-all`), its experts
/// on `workers` local worker processes over `transport` (none: in this process).
fn synthetic_args(
    layers: Option<usize>,
    quant: Option<&str>,
    workers: usize,
    transport: &str,
) -> ClusterArgs {
    let quant = quant.filter(|q| Quant::parse(q) != Some(Quant::Bf16));
    ClusterArgs {
        local_workers: workers,
        transport: transport.to_string(),
        synthetic: SyntheticArgs {
            synthetic: true,
            layers,
            synthetic_seed: 0,
        },
        quant: QuantArgs {
            quantize: quant.map(str::to_string),
            quantize_all: quant.is_some(),
            mmap: false,
        },
        rpc_timeout: 30.0,
        connect_timeout: 10.0,
        replicas: 1,
        ..ClusterArgs::default()
    }
}

/// The config text of a model path (a directory or the config.json itself).
fn config_text(model: &Path) -> Result<String> {
    let p = if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    };
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

/// Each rate's median over several measurements.
fn median_rates(rs: &[Rates]) -> Rates {
    let m = |f: fn(&Rates) -> f64| median(rs.iter().map(f).collect());
    Rates {
        dense_gbs: m(|r| r.dense_gbs),
        head_gbs: m(|r| r.head_gbs),
        expert_gbs: m(|r| r.expert_gbs),
        prefill_dense_gflops: m(|r| r.prefill_dense_gflops),
        prefill_expert_gflops: m(|r| r.prefill_expert_gflops),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the forward pass on synthetic weights in this process and turns the times of its parts
/// into rates: decode steps alternate between computing the logits and not (the difference is
/// the LM head), a timing wrapper around the experts separates their time from the dense part.
fn measure_rates(
    model_path: &Path,
    layers: Option<usize>,
    quant: &str,
    decode_tokens: usize,
    prefill_tokens: usize,
) -> Result<Rates> {
    let q = Quant::parse(quant).with_context(|| format!("unknown weight format {quant:?}"))?;
    let shape = model_shape(model_path, layers)?;
    let loaded = crate::cluster::load(model_path, &synthetic_args(layers, Some(quant), 0, "grpc"))?;
    let (model, backend) = (&loaded.model, loaded.experts.as_ref());
    let timed = crate::bench::Timed::new(backend);
    let vocab = model.cfg.vocab_size as u64;
    let mut rng = moeshard_engine::sampling::Rng::new(99);
    let mut tok = || (rng.next_u64() % vocab) as u32;
    let steps = decode_tokens.max(8);
    let prompt: Vec<u32> = (0..16).map(|_| tok()).collect();
    let mut cache = model.new_cache(prompt.len() + 2 * steps + 2);
    model.forward(
        &mut [SeqStep {
            tokens: &prompt,
            cache: &mut cache,
            want: WantLogits::Last,
        }],
        &timed,
    )?;
    timed.take_total_s();
    // (dense time, expert time) of steps with and without the LM head, interleaved so both see
    // the same machine.
    let (mut with_head, mut without, mut experts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 * steps {
        let t = [tok()];
        let want = if i % 2 == 0 {
            WantLogits::Last
        } else {
            WantLogits::None
        };
        let t0 = Instant::now();
        model.forward(
            &mut [SeqStep {
                tokens: &t,
                cache: &mut cache,
                want,
            }],
            &timed,
        )?;
        let total = t0.elapsed().as_secs_f64();
        let e = timed.take_total_s();
        experts.push(e);
        if i % 2 == 0 {
            with_head.push(total - e);
        } else {
            without.push(total - e);
        }
    }
    let layers_s = median(without);
    let head_s = (median(with_head) - layers_s).max(1e-6);
    let expert_s = median(experts).max(1e-9);
    let bpw = q.bytes_per_weight();
    let n_moe = shape.moe_layers.len() as f64;
    let ebytes = (shape.expert_params as f64 * bpw).ceil();
    // Prefill of one prompt, split the same way.
    let p = prefill_tokens.max(1);
    let prompt: Vec<u32> = (0..p).map(|_| tok()).collect();
    let mut cache = model.new_cache(p);
    let t0 = Instant::now();
    moeshard_engine::generate::prefill(model, &timed, &prompt, &mut cache)?;
    let total = t0.elapsed().as_secs_f64();
    let e = timed.take_total_s().max(1e-9);
    let pf = p as f64;
    let dense_flops = 2.0 * pf * shape.dense_active_params as f64
        + shape.attn_flops_per_ctx as f64 * pf * pf / 2.0;
    let expert_flops = 2.0 * pf * shape.top_k as f64 * shape.expert_params as f64 * n_moe;
    Ok(Rates {
        dense_gbs: shape.layer_dense_params() as f64 * bpw / layers_s.max(1e-9) / 1e9,
        head_gbs: shape.head_params as f64 * bpw / head_s / 1e9,
        expert_gbs: n_moe * shape.top_k as f64 * ebytes / expert_s / 1e9,
        prefill_dense_gflops: dense_flops / (total - e).max(1e-9) / 1e9,
        prefill_expert_gflops: expert_flops / e / 1e9,
    })
}

/// A config of `hidden` width with `experts` experts of `inter` width in one layer, `top_k` of
/// them a token, and a tiny dense part: requests shaped like one decode layer of the model
/// being calibrated.
fn rpc_probe_config(hidden: u64, inter: u64, experts: u64, top_k: u64) -> String {
    serde_json::json!({
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 32,
        "moe_intermediate_size": inter,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "vocab_size": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "norm_topk_prob": true
    })
    .to_string()
}

/// The bytes probe's experts: `top_k` times `sets`. Each probe step sends every token to `top_k`
/// distinct experts drawn uniformly (a fixed function of the step, so every host gets the same
/// rows).
#[derive(Clone, Copy, Debug)]
struct ProbeShape {
    hidden: usize,
    inter: usize,
    top_k: usize,
    sets: usize,
}

impl ProbeShape {
    fn experts(&self) -> usize {
        self.top_k * self.sets
    }

    /// The experts of probe step `step`.
    fn experts_of(&self, step: usize) -> Vec<u32> {
        let n = self.experts() as u64;
        // Seeds of neighbouring steps far apart on the generator's sequence, so steps do not share draws.
        let mut rng = moeshard_engine::sampling::Rng::new(
            (step as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03),
        );
        let mut picked = Vec::with_capacity(self.top_k);
        while picked.len() < self.top_k.min(n as usize) {
            let e = (rng.next_u64() % n) as u32;
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        picked
    }

    /// Rows of `tokens` tokens at probe step `step`, each through the step's experts.
    fn rows(&self, step: usize, tokens: usize) -> Vec<ExpertRow> {
        let experts = self.experts_of(step);
        let weight = 1.0 / experts.len() as f32;
        (0..tokens as u32)
            .flat_map(|token| {
                experts.iter().map(move |&expert| ExpertRow {
                    token,
                    expert,
                    weight,
                })
            })
            .collect()
    }

    /// KB a request of `tokens` tokens to `workers` workers moves ([`request_kb`]).
    fn kb(&self, tokens: usize, workers: usize) -> f64 {
        request_kb(self.hidden, self.top_k, tokens, workers)
    }
}

/// KB a dispatch of `tokens` tokens, each to `top_k` experts of width `hidden`, spread over
/// `workers` workers moves, as the planner counts them: each token's hidden state to each
/// worker, each row's output back, 12 bytes of routing a row.
fn request_kb(hidden: usize, top_k: usize, tokens: usize, workers: usize) -> f64 {
    let h = hidden as f64;
    ((tokens * workers) as f64 * 4.0 * h + (tokens * top_k) as f64 * (12.0 + 4.0 * h)) / 1e3
}

/// A decode layer's dense part as a fixed amount of busy work on every pool thread. The bytes
/// probe runs it after each dispatch and times it with the dispatch: by the next request the
/// hosts' threads have gone to sleep, as in decode (back-to-back requests found the workers
/// still spinning).
#[derive(Clone, Copy, Debug)]
struct DenseWork {
    /// Iterations of the busy loop on each thread.
    iters: u64,
}

impl DenseWork {
    fn spin(iters: u64) {
        rayon::broadcast(|_| {
            let mut x = 1u64;
            for i in 0..iters {
                x = std::hint::black_box(x.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(i));
            }
        });
    }

    /// As many iterations as take `gap` (never zero: [`dense_gap`] is at least 0.1 ms) on this
    /// pool with nothing else running (the fastest of five trials).
    fn lasting(gap: Duration) -> Self {
        const TRIAL: u64 = 100_000;
        let t = (0..5)
            .map(|_| {
                let t0 = Instant::now();
                Self::spin(TRIAL);
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        DenseWork {
            iters: (gap.as_secs_f64() / t.max(1e-9) * TRIAL as f64).ceil() as u64,
        }
    }

    fn run(self) {
        Self::spin(self.iters);
    }
}

/// The time of one decode layer's dense part at the rate measured for format `q` (between
/// 0.1 and 5 ms; 1 ms without a rate).
fn dense_gap(shape: &ModelShape, q: Quant, rates: Option<&Rates>) -> Duration {
    let secs = rates.map_or(1e-3, |r| {
        shape.layer_dense_params() as f64 * q.bytes_per_weight()
            / shape.layers.max(1) as f64
            / (r.dense_gbs.max(1e-3) * 1e9)
    });
    Duration::from_secs_f64(secs.clamp(1e-4, 5e-3))
}

/// Seconds of one dispatch-and-wait of the probe's step `step` on `backend` and the dense
/// `work` that follows it ([`DenseWork`]).
fn time_dispatch(
    backend: &dyn ExpertBackend,
    p: &ProbeShape,
    step: usize,
    tokens: usize,
    work: DenseWork,
) -> Result<f64> {
    let x: Vec<f32> = (0..p.hidden * tokens)
        .map(|i| ((i + step) % 17) as f32 * 0.01 - 0.08)
        .collect();
    let rows = p.rows(step, tokens);
    let t0 = Instant::now();
    backend.dispatch(0, &x, &rows)?.wait()?;
    work.run();
    Ok(t0.elapsed().as_secs_f64())
}

/// Probe steps timed per backend for the per-KB figure.
const RPC_BYTES_STEPS: usize = 60;
/// Tokens of the request that shows what bytes cost: a prefill chunk's worth, each through the
/// model's top-k experts, so the figure is that of prefill's megabyte-sized requests (replies of
/// 4 MB at hidden 1024, top-8). Per KB they cost about twice what 260 KB requests did.
const RPC_BIG_TOKENS: usize = 128;
/// Decode tokens timed on each host for the per-layer dispatch figures (after a few untimed).
const RPC_DECODE_TOKENS: usize = 96;
const RPC_WARM_TOKENS: usize = 8;
/// The dispatch figures are fit over sets of 1 to this many local workers.
const RPC_MAX_WORKERS: usize = 3;

/// The dispatch costs of each of `transports`, as decode pays them. The model itself (its
/// first `layers` layers, synthetic weights in format `quant`) decodes the same tokens in this
/// process and with its experts on 1, 2 and 3 real local worker processes, one token on each in
/// turn (every other round in the opposite order, so all see the same machine). What a token
/// takes with n workers over what it takes here, per MoE layer, is the dispatch cost of n
/// workers, everything included: the requests, the thread wake-ups on both sides, and what the
/// workers' idle threads take from this process's cores after answering (a probe of its own
/// missed a third of that with three co-located workers). `overhead_us` and `per_worker_us` are
/// the straight line through the three costs (less their bytes at `per_kb_us`). What bytes
/// cost comes from requests of one token and of 128 tokens, each token through the model's
/// top-k of tiny experts (compute negligible, and subtracted: the same requests are timed
/// in-process), each followed by a decode layer's dense part of work ([`DenseWork`], its time
/// at `rates`) so the workers sleep between requests as in decode.
fn measure_rpc(
    model_path: &Path,
    layers: Option<usize>,
    quant: &str,
    transports: &[&str],
    rates: Option<&Rates>,
) -> Result<Vec<RpcFigures>> {
    let shape = model_shape(model_path, layers)?;
    let q = Quant::parse(quant).with_context(|| format!("unknown weight format {quant:?}"))?;
    let n_moe = shape.moe_layers.len();
    anyhow::ensure!(
        n_moe > 0,
        "{} has no MoE layer: there is no dispatch to measure (pass --rpc none)",
        model_path.display()
    );
    let gap = dense_gap(&shape, q, rates);
    let work = DenseWork::lasting(gap);
    let tiny = ProbeShape {
        hidden: shape.hidden.max(1) as usize,
        inter: 32,
        top_k: shape.top_k.clamp(1, shape.experts.max(1)) as usize,
        sets: 2,
    };
    let layer_kb =
        |workers: usize| request_kb(shape.hidden as usize, shape.top_k as usize, 1, workers);
    tracing::info!(
        layers = shape.layers,
        n_moe,
        quant,
        gap_us = gap.as_micros(),
        "measuring dispatch costs"
    );
    let dir = std::env::temp_dir().join(format!("moeshard-rpc-probe-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bytes_cfg = dir.join("config.json");
        let text = rpc_probe_config(
            tiny.hidden as u64,
            tiny.inter as u64,
            tiny.experts() as u64,
            tiny.top_k as u64,
        );
        std::fs::write(&bytes_cfg, text)
            .with_context(|| format!("writing {}", bytes_cfg.display()))?;
        let load = |cfg: &Path, layers, quant, workers, transport| {
            crate::cluster::load(cfg, &synthetic_args(layers, quant, workers, transport))
        };
        // The tiny experts stay bf16: their widths need not fit any block size.
        let local = load(model_path, layers, Some(quant), 0, "grpc")?;
        let local_tiny = load(&bytes_cfg, None, None, 0, "grpc")?;
        let mut out = Vec::new();
        for &t in transports {
            let sets = (1..=RPC_MAX_WORKERS)
                .map(|n| load(model_path, layers, Some(quant), n, t))
                .collect::<Result<Vec<_>>>()?;
            let w1_tiny = load(&bytes_cfg, None, None, 1, t)?;
            let hosts: Vec<&crate::cluster::Loaded> =
                std::iter::once(&local).chain(sets.iter()).collect();
            let tiny_hosts = [local_tiny.experts.as_ref(), w1_tiny.experts.as_ref()];
            let (costs, bytes) = rayon::scope(|_| -> Result<(Vec<f64>, f64)> {
                let per_token = decode_turns(&hosts, RPC_DECODE_TOKENS)?;
                // Median per MoE layer of what n workers add to a token, n = 1..
                let costs: Vec<f64> = (1..hosts.len())
                    .map(|n| {
                        median(
                            per_token
                                .iter()
                                .map(|t| (t[n] - t[0]) / n_moe as f64)
                                .collect(),
                        )
                    })
                    .collect();
                for step in 0..4 {
                    for h in tiny_hosts {
                        time_dispatch(h, &tiny, step, RPC_BIG_TOKENS, work)?;
                    }
                }
                let mut bytes = Vec::new();
                for step in 0..RPC_BYTES_STEPS {
                    let mut t = [0f64; 4];
                    for (i, tokens) in [1, RPC_BIG_TOKENS].into_iter().enumerate() {
                        for (j, h) in tiny_hosts.into_iter().enumerate() {
                            t[2 * i + j] = time_dispatch(h, &tiny, step, tokens, work)?;
                        }
                    }
                    bytes.push((t[3] - t[2]) - (t[1] - t[0]));
                }
                Ok((costs, median(bytes)))
            })?;
            drop((sets, w1_tiny));
            let per_kb = bytes.max(0.0) / (tiny.kb(RPC_BIG_TOKENS, 1) - tiny.kb(1, 1));
            let net: Vec<f64> = costs
                .iter()
                .enumerate()
                .map(|(i, c)| c - layer_kb(i + 1) * per_kb)
                .collect();
            let (overhead, per_worker) = fit_line(&net);
            tracing::info!(
                transport = t,
                per_layer_us = ?costs.iter().map(|c| (c * 1e6).round()).collect::<Vec<_>>(),
                big_over_small_us = bytes * 1e6,
                overhead_us = overhead * 1e6,
                per_worker_us = per_worker * 1e6,
                "dispatch costs"
            );
            out.push(RpcFigures {
                transport: t.to_string(),
                overhead_us: overhead.max(0.0) * 1e6,
                per_worker_us: per_worker.max(0.0) * 1e6,
                per_kb_us: per_kb * 1e6,
            });
        }
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Seconds of each decode token on each host: every host decodes the same prompt and tokens
/// (so the same rows reach the experts), one token on each in turn, every other round in the
/// opposite order. A few tokens first are not timed.
fn decode_turns(hosts: &[&crate::cluster::Loaded], tokens: usize) -> Result<Vec<Vec<f64>>> {
    let vocab = hosts
        .first()
        .context("no host to time")?
        .model
        .cfg
        .vocab_size as u64;
    let mut rng = moeshard_engine::sampling::Rng::new(7);
    let prompt: Vec<u32> = (0..16).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let steps: Vec<u32> = (0..RPC_WARM_TOKENS + tokens)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let mut caches = Vec::with_capacity(hosts.len());
    for h in hosts {
        let mut cache = h.model.new_cache(prompt.len() + steps.len() + 1);
        h.model.forward(
            &mut [SeqStep {
                tokens: &prompt,
                cache: &mut cache,
                want: WantLogits::None,
            }],
            h.experts.as_ref(),
        )?;
        caches.push(cache);
    }
    let mut out = Vec::with_capacity(tokens);
    for (i, tok) in steps.iter().enumerate() {
        let mut t = vec![0f64; hosts.len()];
        let order: Vec<usize> = if i % 2 == 0 {
            (0..hosts.len()).collect()
        } else {
            (0..hosts.len()).rev().collect()
        };
        for h in order {
            let t0 = Instant::now();
            hosts[h].model.forward(
                &mut [SeqStep {
                    tokens: std::slice::from_ref(tok),
                    cache: &mut caches[h],
                    want: WantLogits::None,
                }],
                hosts[h].experts.as_ref(),
            )?;
            t[h] = t0.elapsed().as_secs_f64();
        }
        if i >= RPC_WARM_TOKENS {
            out.push(t);
        }
    }
    Ok(out)
}

/// (value at x = 1, slope) of the least-squares line through `y[i]` at x = i + 1.
fn fit_line(y: &[f64]) -> (f64, f64) {
    let n = y.len() as f64;
    if y.len() < 2 {
        return (y.first().copied().unwrap_or(0.0), 0.0);
    }
    let mx = (n + 1.0) / 2.0;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, v) in y.iter().enumerate() {
        let dx = (i + 1) as f64 - mx;
        sxy += dx * (v - my);
        sxx += dx * dx;
    }
    let slope = sxy / sxx;
    (my - slope * (mx - 1.0), slope)
}

/// Warns when other programs keep this machine's cores busy: the figures (above all the
/// dispatch costs, made of thread wake-ups) are then those of a busy machine.
fn warn_if_busy() {
    // (busy, total) jiffies of all cores, from the first line of /proc/stat.
    let sample = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((total.saturating_sub(idle), total))
    };
    let Some((b0, t0)) = sample() else { return };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let Some((b1, t1)) = sample() else { return };
    let busy = b1.saturating_sub(b0) as f64 / t1.saturating_sub(t0).max(1) as f64;
    if busy > 0.25 {
        tracing::warn!(
            busy_percent = (busy * 100.0).round(),
            "other programs keep this machine's cores busy: the figures measured now (above all \
             the dispatch costs) can be off by tens of percent; calibrate on an idle machine"
        );
    }
}

/// Memory the kernel reckons can be had without swapping (`MemAvailable`), GB.
fn available_memory_gb() -> Option<f64> {
    meminfo_gb("MemAvailable:")
}

fn total_memory_gb() -> Option<f64> {
    meminfo_gb("MemTotal:")
}

fn meminfo_gb(key: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e9)
}

/// Median round trip of `size`-byte messages over a loopback TCP connection, microseconds.
fn loopback_rtt_us(size: usize, rounds: usize) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        for _ in 0..rounds {
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = vec![1u8; size];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(hidden: u64, inter: u64, experts: u64, top_k: u64) -> ModelShape {
        let text = rpc_probe_config(hidden, inter, experts, top_k);
        ModelShape::from_config_json(&text).expect("a probe config parses")
    }

    #[test]
    fn the_probes_dense_gap_is_a_layers_dense_part_at_the_measured_rate() {
        let m =
            ModelShape::from_config_json(include_str!("../examples/configs/qwen3-moe-bench.json"))
                .unwrap();
        let rates = |dense_gbs: f64| Rates {
            dense_gbs,
            head_gbs: 1.0,
            expert_gbs: 1.0,
            prefill_dense_gflops: 1.0,
            prefill_expert_gflops: 1.0,
        };
        let bytes = m.layer_dense_params() as f64 * 2.0 / m.layers as f64;
        let g = dense_gap(&m, Quant::Bf16, Some(&rates(20.0)));
        assert!((g.as_secs_f64() - bytes / 20e9).abs() < 1e-9, "{g:?}");
        // q8_0 reads fewer bytes per weight: a shorter gap at the same rate.
        assert!(dense_gap(&m, Quant::Q8_0, Some(&rates(20.0))) < g);
        // Absurd rates are held to 0.1-5 ms; no rate gives 1 ms.
        assert_eq!(
            dense_gap(&m, Quant::Bf16, Some(&rates(1e9))),
            Duration::from_micros(100)
        );
        assert_eq!(
            dense_gap(&m, Quant::Bf16, Some(&rates(1e-9))),
            Duration::from_millis(5)
        );
        assert_eq!(dense_gap(&m, Quant::Bf16, None), Duration::from_millis(1));
    }

    #[test]
    fn calibrated_rates_are_each_rates_median() {
        let r = |a: f64, b: f64| Rates {
            dense_gbs: a,
            head_gbs: b,
            expert_gbs: a + b,
            prefill_dense_gflops: 10.0 * a,
            prefill_expert_gflops: 10.0 * b,
        };
        // One slow outlier per field, in different runs: each field keeps its own middle value.
        let m = median_rates(&[r(20.0, 5.0), r(9.0, 30.0), r(21.0, 31.0)]);
        assert_eq!((m.dense_gbs, m.head_gbs), (20.0, 30.0));
        assert_eq!(m.expert_gbs, 39.0);
        assert_eq!(
            (m.prefill_dense_gflops, m.prefill_expert_gflops),
            (200.0, 300.0)
        );
    }

    #[test]
    fn dispatch_figures_are_the_line_through_the_worker_counts() {
        // On a line: its value at one worker and its slope, exactly.
        let (o, w) = fit_line(&[500.0, 700.0, 900.0]);
        assert!(
            (o - 500.0).abs() < 1e-9 && (w - 200.0).abs() < 1e-9,
            "{o} {w}"
        );
        // A bent curve (a second worker costs more than a third, as co-located ones do): the
        // line passes between, and predicts one, two and three workers within the bend.
        let y = [600.0, 900.0, 1000.0];
        let (o, w) = fit_line(&y);
        assert!((w - 200.0).abs() < 1e-9, "slope {w}");
        assert!(
            (o - (2500.0 / 3.0 - 200.0)).abs() < 1e-9,
            "value at one {o}"
        );
        for (i, v) in y.iter().enumerate() {
            assert!((o + i as f64 * w - v).abs() < 70.0, "{i}: {v}");
        }
        // Two points, one point, none.
        assert_eq!(fit_line(&[300.0, 350.0]), (300.0, 50.0));
        assert_eq!(fit_line(&[300.0]), (300.0, 0.0));
        assert_eq!(fit_line(&[]), (0.0, 0.0));
    }

    #[test]
    fn probe_steps_draw_distinct_experts_over_the_whole_layer() {
        let p = ProbeShape {
            hidden: 16,
            inter: 256,
            top_k: 8,
            sets: 4,
        };
        let mut seen = vec![0usize; p.experts()];
        let (mut both_halves, mut splits) = (0, std::collections::BTreeSet::new());
        for step in 0..200 {
            let rows = p.rows(step, 1);
            assert_eq!(rows.len(), p.top_k);
            let mut experts: Vec<u32> = rows.iter().map(|r| r.expert).collect();
            experts.sort_unstable();
            experts.dedup();
            assert_eq!(experts.len(), p.top_k, "distinct experts a token");
            assert!(experts.iter().all(|&e| (e as usize) < p.experts()));
            assert!(rows.iter().all(|r| r.token == 0 && r.weight == 0.125));
            // Every host gets the same rows at the same step.
            assert_eq!(p.rows(step, 1), rows);
            // Two workers holding contiguous halves: how many rows the first gets.
            let half = p.experts() as u32 / 2;
            let first = experts.iter().filter(|&&e| e < half).count();
            splits.insert(first);
            both_halves += usize::from(first > 0 && first < p.top_k);
            for e in experts {
                seen[e as usize] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n > 0),
            "every expert is used: {seen:?}"
        );
        assert!(
            both_halves > 190,
            "a split gets rows on both sides: {both_halves} of 200"
        );
        assert!(
            splits.len() >= 4,
            "uneven splits too, as routing makes them: {splits:?}"
        );
        assert_ne!(p.rows(0, 1), p.rows(1, 1));
        // Several tokens: each through the same experts.
        let rows = p.rows(1, 3);
        assert_eq!(rows.len(), 24);
        assert_eq!(rows[8].token, 1);
        assert_eq!(rows[8].expert, rows[0].expert);
        // One expert a token among two (the bytes probe).
        let tiny = ProbeShape {
            inter: 32,
            top_k: 1,
            sets: 2,
            ..p
        };
        assert!((0..50).all(|s| tiny.rows(s, 32).iter().all(|r| r.expert < 2)));
    }

    #[test]
    fn probe_bytes_count_like_the_planner() {
        let p = ProbeShape {
            hidden: 1024,
            inter: 512,
            top_k: 8,
            sets: 8,
        };
        // One token to one worker: its hidden state out, eight rows back with their routing.
        assert_eq!(p.kb(1, 1), (4096.0 + 8.0 * (12.0 + 4096.0)) / 1e3);
        // A second worker gets the token's hidden state too.
        assert!((p.kb(1, 2) - p.kb(1, 1) - 4.096).abs() < 1e-9);
        assert!((p.kb(32, 1) - 32.0 * p.kb(1, 1)).abs() < 1e-9);
        // The bytes probe's own config: two experts of width 32 at the model's hidden width,
        // one a token.
        let s = shape(1024, 32, 2, 1);
        assert_eq!((s.hidden, s.experts, s.top_k), (1024, 2, 1));
        assert_eq!(s.expert_params, 3 * 1024 * 32);
    }
}
