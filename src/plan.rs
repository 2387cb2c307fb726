//! `moeshard plan` and `moeshard calibrate`: capacity planning from a config alone, and the
//! measured figures of this node that plans should use.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// Median round trip of a one-row request to one worker, minus that row's compute, us.
    pub overhead_us: f64,
    /// What each further worker contacted in the same layer adds, us.
    pub per_worker_us: f64,
    /// What each KB of request and reply adds, us.
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
            let _ = write!(
                s,
                "[node.rates.{q}]\ndense_gbs = {:.3}\nhead_gbs = {:.3}\nexpert_gbs = {:.3}\nprefill_dense_gflops = {:.3}\nprefill_expert_gflops = {:.3}\n",
                r.dense_gbs,
                r.head_gbs,
                r.expert_gbs,
                r.prefill_dense_gflops,
                r.prefill_expert_gflops
            );
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
        for q in &a.quant {
            let r = measure_rates(m, a.layers, q, a.decode_tokens, a.prefill_tokens)
                .with_context(|| format!("measuring the forward pass of {} as {q}", m.display()))?;
            tracing::info!(quant = %q, ?r, "forward-pass rates");
            rates.insert(q.clone(), r);
        }
        for t in a.rpc.iter().filter(|t| *t != "none") {
            rpc.push(measure_rpc(m, t).with_context(|| format!("measuring {t} dispatches"))?);
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

/// The config text of a model path (a directory or the config.json itself).
fn config_text(model: &Path) -> Result<String> {
    let p = if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    };
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

fn median(mut v: Vec<f64>) -> f64 {
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
    let mut shape = ModelShape::from_config_json(&config_text(model_path)?)?;
    if let Some(k) = layers {
        shape = shape.with_layers(k as u64);
    }
    let args = ClusterArgs {
        synthetic: SyntheticArgs {
            synthetic: true,
            layers,
            synthetic_seed: 0,
        },
        quant: QuantArgs {
            quantize: (q != Quant::Bf16).then(|| quant.to_string()),
            quantize_all: q != Quant::Bf16,
        },
        rpc_timeout: 30.0,
        connect_timeout: 10.0,
        replicas: 1,
        ..ClusterArgs::default()
    };
    let loaded = crate::cluster::load(model_path, &args)?;
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

/// A config of `hidden` width with two tiny experts and one layer: requests of a real decode
/// step's size whose compute is negligible.
fn rpc_probe_config(hidden: u64) -> String {
    serde_json::json!({
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 32,
        "moe_intermediate_size": 32,
        "num_experts": 2,
        "num_experts_per_tok": 1,
        "vocab_size": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "norm_topk_prob": true
    })
    .to_string()
}

/// Median time of `n` one-layer dispatches of `rows` on `backend`, seconds.
fn dispatch_s(
    backend: &dyn ExpertBackend,
    hidden: usize,
    tokens: usize,
    rows: &[ExpertRow],
    n: usize,
) -> Result<f64> {
    let x: Vec<f32> = (0..hidden * tokens)
        .map(|i| (i % 17) as f32 * 0.01)
        .collect();
    for _ in 0..10 {
        backend.dispatch(0, &x, rows)?.wait()?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        backend.dispatch(0, &x, rows)?.wait()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// The dispatch overhead of `transport`: one-row requests to one and to two real local worker
/// processes, minus the same rows computed in this process.
fn measure_rpc(model_path: &Path, transport: &str) -> Result<RpcFigures> {
    let shape = ModelShape::from_config_json(&config_text(model_path)?)?;
    let dir = std::env::temp_dir().join(format!("moeshard-rpc-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = dir.join("config.json");
    let result = (|| {
        std::fs::write(&cfg, rpc_probe_config(shape.hidden))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let h = shape.hidden as usize;
        let row = |e| ExpertRow {
            token: 0,
            expert: e,
            weight: 1.0,
        };
        let one = [row(0)];
        let two = [row(0), row(1)];
        // A prefill-sized request: 32 tokens, each through expert 0 (4 + 4 bytes a value moved
        // per row, 12 of routing).
        let big_tokens = 32;
        let big: Vec<ExpertRow> = (0..big_tokens)
            .map(|t| ExpertRow {
                token: t,
                expert: 0,
                weight: 1.0,
            })
            .collect();
        let big_kb = (big_tokens as usize * (8 * h + 12)) as f64 / 1e3;
        let small_kb = (8 * h + 12) as f64 / 1e3;
        let args = |workers| ClusterArgs {
            local_workers: workers,
            transport: transport.to_string(),
            synthetic: SyntheticArgs {
                synthetic: true,
                layers: None,
                synthetic_seed: 0,
            },
            rpc_timeout: 30.0,
            connect_timeout: 10.0,
            replicas: 1,
            ..ClusterArgs::default()
        };
        let local = crate::cluster::load(&cfg, &args(0))?;
        let c1 = dispatch_s(local.experts.as_ref(), h, 1, &one, 200)?;
        let cb = dispatch_s(local.experts.as_ref(), h, big_tokens as usize, &big, 100)?;
        drop(local);
        let w1 = crate::cluster::load(&cfg, &args(1))?;
        let r1 = dispatch_s(w1.experts.as_ref(), h, 1, &one, 300)?;
        let rb = dispatch_s(w1.experts.as_ref(), h, big_tokens as usize, &big, 100)?;
        drop(w1);
        let w2 = crate::cluster::load(&cfg, &args(2))?;
        let r2 = dispatch_s(w2.experts.as_ref(), h, 1, &two, 300)?;
        drop(w2);
        // One row each: the round trip less the compute is the fixed cost of a dispatch; two
        // workers (one row each, computed side by side) show what a further worker adds; the
        // large request what its bytes add.
        let per_kb = ((rb - cb) - (r1 - c1)).max(0.0) / (big_kb - small_kb);
        let overhead = (r1 - c1 - small_kb * per_kb).max(0.0);
        let per_worker = (r2 - c1 - overhead - 2.0 * small_kb * per_kb).max(0.0);
        Ok(RpcFigures {
            transport: transport.to_string(),
            overhead_us: overhead * 1e6,
            per_worker_us: per_worker * 1e6,
            per_kb_us: per_kb * 1e6,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn total_memory_gb() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
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
