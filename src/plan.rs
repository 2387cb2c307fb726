//! `moeshard plan` and `moeshard calibrate`: capacity planning from a config alone, and the
//! measured figures of this node that plans should use.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use moeshard_coordinator::plan::{ClusterSpec, ModelShape, PlanRequest, Quant, plan, render};
use moeshard_engine::kernels;
use moeshard_engine::tensor::Mat;

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

pub(crate) fn cmd_calibrate(a: CalibrateArgs) -> Result<()> {
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
    let toml = format!(
        "# moeshard calibrate: measured on this node\n[[node]]\nname = {:?}\nmemory_gb = {:.1}\nmem_bw_gbs = {:.1}\ncores = {}\ngflops_per_core = {:.1}\n\n# loopback: {:.0} us round trip for 4 KB each way\n[link]\nbandwidth_gbps = 40\nrtt_us = {:.0}\n",
        a.name,
        total_memory_gb().unwrap_or(0.0),
        bw,
        threads,
        gflops / threads as f64,
        rtt_us,
        rtt_us
    );
    match &a.out {
        Some(p) => std::fs::write(p, &toml).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{toml}"),
    }
    tracing::info!(bw_gbs = bw, gflops, rtt_us, "calibrated");
    Ok(())
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
