//! Subcommands.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use moeshard_engine::generate::{GenerateRequest, all_logits, generate};
use moeshard_engine::npy;
use moeshard_engine::sampling::SamplingParams;
use moeshard_engine::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};

#[derive(Parser)]
#[command(
    name = "moeshard",
    version,
    about = "Exact expert-parallel inference of MoE models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded default: the bundled small model, two local worker processes, one chat turn.
    Run(RunArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Write the logits at every position of a token sequence as a float32 .npy [n_tokens, vocab].
    Logits(LogitsArgs),
    /// Measure decode and prefill tokens/s and the MoE dispatch round trip.
    Bench(crate::bench::BenchArgs),
    /// Serve a checkpoint's routed experts to a coordinator (over gRPC or QUIC).
    Worker(crate::cluster::WorkerArgs),
    /// Plan a cluster from a config alone: placement, memory per node, predicted tokens/s.
    Plan(crate::plan::PlanArgs),
    /// Measure this node (memory bandwidth, kernel throughput, loopback round trip) for plans.
    Calibrate(crate::plan::CalibrateArgs),
    /// Check the planner against measurements here: calibrate, plan and bench several cluster
    /// shapes (local workers, network namespaces behind an emulated link), print the table.
    Validate(crate::validate::ValidateArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching.
    Serve(crate::serve::ServeArgs),
    /// Requantize a GGUF file's float weights (q8_0, q4_0, q4_k, q5_k, q6_k) into a new GGUF
    /// that llama.cpp loads too.
    Quantize(crate::quantize::QuantizeArgs),
    /// Measure a running server: aggregate tokens/s and time to first token at several
    /// concurrencies.
    BenchServe(crate::bench_serve::BenchServeArgs),
    /// Check this host before it joins a cluster: CPU, memory, disk, clock, peers, cluster key.
    Doctor(crate::doctor::DoctorArgs),
    /// Write a manifest of a checkpoint: BLAKE3 of every tensor and the model fingerprint.
    Manifest(crate::manifest::ManifestArgs),
    /// Check a checkpoint against its manifest and/or the SHA-256 sums of its files.
    Verify(crate::manifest::VerifyArgs),
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a .gguf
    /// file (llama.cpp format: weights, config and tokenizer in one file).
    #[arg(long)]
    pub model: PathBuf,
}

/// Where the routed experts run: in this process (default), on remote workers, or on local
/// worker processes started for this run.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct ClusterArgs {
    /// Remote workers, comma-separated host:port.
    #[arg(long, value_delimiter = ',', conflicts_with = "local_workers")]
    pub workers: Vec<String>,
    /// Start N worker processes on loopback for this run.
    #[arg(long, default_value_t = 0)]
    pub local_workers: usize,
    /// Wire transport to the workers.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "quic"])]
    pub transport: String,
    /// Capacities in bytes the local workers offer, one per worker (default: all equal).
    #[arg(long, value_delimiter = ',', requires = "local_workers")]
    pub local_capacities: Vec<u64>,
    /// Host a share of the experts in this process too, up to this many bytes.
    #[arg(long)]
    pub coordinator_capacity: Option<u64>,
    /// Manifest the tensors this process computes with (the dense part; every expert when they
    /// run in-process) are checked against at load (default: moeshard.manifest.json beside the
    /// checkpoint, when there is one).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Deadline of every request to a worker, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub rpc_timeout: f64,
    /// Deadline of connecting to a worker, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Copies of each routed expert kept on distinct workers, as their capacity allows (1: no
    /// replicas; a dead worker's experts are then re-homed on the survivors when it fails).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub replicas: u16,
    /// File holding the cluster secret the workers must prove (TLS 1.3 mutual authentication on
    /// both transports). Local workers get a fresh random key when this is not given.
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub paged: PagedArgs,
}

/// Paging the routed experts from the checkpoint file within a memory budget.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct PagedArgs {
    /// Keep at most this many bytes of routed-expert weights resident (suffixes K, M, G: powers
    /// of 1024) and read the others from the checkpoint file, with direct I/O, when a batch needs
    /// them. In this process's experts, or, with --local-workers, in each local worker.
    #[arg(long, value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    /// With --memory-budget: reader threads (reads in parallel).
    #[arg(long, default_value_t = 4, requires = "memory_budget")]
    pub page_readers: usize,
    /// With --memory-budget: experts of the next MoE layer read ahead after each batch (0: none).
    #[arg(long, default_value_t = 8, requires = "memory_budget")]
    pub page_prefetch: usize,
    /// With --memory-budget: read through the page cache instead of with direct I/O.
    #[arg(long, requires = "memory_budget")]
    pub no_direct_io: bool,
}

impl PagedArgs {
    /// The engine's options, when a budget is given.
    pub fn options(&self) -> Option<moeshard_engine::paged::PagedOptions> {
        self.memory_budget
            .map(|b| moeshard_engine::paged::PagedOptions {
                budget: b,
                readers: self.page_readers,
                prefetch: self.page_prefetch,
                direct: !self.no_direct_io,
            })
    }

    /// The same arguments for a worker's command line.
    pub fn worker_args(&self) -> Vec<String> {
        let Some(b) = self.memory_budget else {
            return Vec::new();
        };
        let mut v = vec![
            "--memory-budget".to_string(),
            b.to_string(),
            "--page-readers".to_string(),
            self.page_readers.to_string(),
            "--page-prefetch".to_string(),
            self.page_prefetch.to_string(),
        ];
        if self.no_direct_io {
            v.push("--no-direct-io".into());
        }
        v
    }
}

/// Bytes, with an optional K, M, G or T suffix (powers of 1024).
pub(crate) fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > u64::MAX as f64 {
        return Err(format!("{s:?} is not a number of bytes"));
    }
    Ok((n * mult as f64) as u64)
}

/// How the weights load: quantization of a float checkpoint, and where they are held.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct QuantArgs {
    /// Quantize the routed experts' float weights as they load: q8_0, q4_0, q4_k, q5_k or
    /// q6_k (rows that are not whole blocks fall back to q8_0, or stay as stored).
    #[arg(long, value_parser = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])]
    pub quantize: Option<String>,
    /// With --quantize: also the dense linear weights (attention, shared experts, embeddings,
    /// LM head); routers and norms stay as stored.
    #[arg(long, requires = "quantize")]
    pub quantize_all: bool,
    /// Compute straight from the file mapping instead of copying the weights this process uses
    /// into anonymous huge-page memory first (the default, while the system has the memory:
    /// decode streams weights faster from there; the copy takes a moment at load).
    #[arg(long)]
    pub mmap: bool,
}

impl QuantArgs {
    /// The engine's description of the request.
    pub fn spec(&self) -> Option<moeshard_engine::safetensors::Quantize> {
        let qtype = moeshard_engine::quant::QType::from_name(self.quantize.as_deref()?)?;
        Some(moeshard_engine::safetensors::Quantize {
            qtype,
            all: self.quantize_all,
        })
    }

    /// Where the weights are held.
    pub fn load_mode(&self) -> moeshard_engine::resident::LoadMode {
        if self.mmap {
            moeshard_engine::resident::LoadMode::Mmap
        } else {
            moeshard_engine::resident::LoadMode::Memory
        }
    }

    /// The arguments that make a worker load the same way.
    pub fn worker_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(q) = &self.quantize {
            v.extend(["--quantize".to_string(), q.clone()]);
            if self.quantize_all {
                v.push("--quantize-all".into());
            }
        }
        if self.mmap {
            v.push("--mmap".into());
        }
        v
    }
}

/// Deterministic random weights of a config's exact shapes instead of a checkpoint's.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct SyntheticArgs {
    /// Make the weights up (generated on use, never written): `--model` may then be a bare
    /// config.json or a directory holding one.
    #[arg(long)]
    pub synthetic: bool,
    /// With --synthetic: keep only the first K layers (planning runs of big models).
    #[arg(long, requires = "synthetic")]
    pub layers: Option<usize>,
    /// With --synthetic: the seed the weights are made from.
    #[arg(long, default_value_t = 0)]
    pub synthetic_seed: u64,
}

impl SyntheticArgs {
    /// The arguments that give a worker the same synthetic weights.
    pub fn worker_args(&self) -> Vec<String> {
        if !self.synthetic {
            return Vec::new();
        }
        let mut v = vec![
            "--synthetic".to_string(),
            "--synthetic-seed".to_string(),
            self.synthetic_seed.to_string(),
        ];
        if let Some(k) = self.layers {
            v.push("--layers".into());
            v.push(k.to_string());
        }
        v
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Context limit in tokens (prompt plus output).
    #[arg(long, default_value_t = 4096)]
    max_context: usize,
}

/// The bundled model `run` uses (a small random-weight Qwen3-MoE made by the fixture script).
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen3_moe_tiny");

#[derive(Args)]
struct RunArgs {
    /// The user message.
    #[arg(long, default_value = "What is a mixture of experts?")]
    prompt: String,
    /// Local worker processes hosting the experts.
    #[arg(long, default_value_t = 2)]
    local_workers: usize,
    /// Wire transport to the workers.
    #[arg(long, default_value = "quic", value_parser = ["grpc", "quic"])]
    transport: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
}

impl RunArgs {
    fn into_generate(self) -> GenerateArgs {
        GenerateArgs {
            model: ModelArgs {
                model: PathBuf::from(DEFAULT_MODEL),
            },
            cluster: ClusterArgs {
                local_workers: self.local_workers,
                transport: self.transport,
                rpc_timeout: 30.0,
                connect_timeout: 10.0,
                replicas: 1,
                ..ClusterArgs::default()
            },
            prompt: self.prompt,
            chat: true,
            max_tokens: self.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_context: 4096,
        }
    }
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Output .npy path.
    #[arg(long)]
    out: PathBuf,
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            eprintln!(
                "moeshard run: model {DEFAULT_MODEL} (random weights: the text is noise), {} local workers over {}",
                a.local_workers, a.transport
            );
            cmd_generate(a.into_generate())
        }
        Command::Generate(a) => cmd_generate(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Worker(a) => crate::cluster::cmd_worker(a),
        Command::Plan(a) => crate::plan::cmd_plan(a),
        Command::Calibrate(a) => crate::plan::cmd_calibrate(a),
        Command::Validate(a) => crate::validate::cmd_validate(a),
        Command::Serve(a) => crate::serve::cmd_serve(a),
        Command::BenchServe(a) => crate::bench_serve::cmd_bench_serve(a),
        Command::Quantize(a) => crate::quantize::cmd_quantize(a),
        Command::Doctor(a) => crate::doctor::cmd_doctor(a),
        Command::Manifest(a) => crate::manifest::cmd_manifest(a),
        Command::Verify(a) => crate::manifest::cmd_verify(a),
        Command::Bench(a) => crate::bench::cmd_bench(a),
    }
}

/// Loads the dense model and opens the expert backend the cluster options ask for (see
/// [`crate::cluster::Loaded`]: keep it alive while the backend is used).
pub(crate) fn load(dir: &std::path::Path, cluster: &ClusterArgs) -> Result<crate::cluster::Loaded> {
    crate::cluster::load(dir, cluster)
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let loaded = load(&a.model.model, &a.cluster)?;
    let (model, experts) = (&loaded.model, &loaded.experts);
    let logits = all_logits(model, experts.as_ref(), &a.tokens)?;
    npy::write_f32(&a.out, &[a.tokens.len(), model.cfg.vocab_size], &logits)?;
    if let Some(c) = &loaded.cluster {
        c.log_summary();
    }
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let dir = &a.model.model;
    let loaded = load(dir, &a.cluster)?;
    let (model, experts) = (&loaded.model, &loaded.experts);
    let tok = Tokenizer::from_dir(dir)?;
    let prompt = if a.chat {
        let text = tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut stop_tokens = model.cfg.eos_token_ids.clone();
    if let Some(id) = tok.eos_token().and_then(|t| tok.token_id(t)) {
        stop_tokens.push(id);
    }
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
        },
        stop_tokens,
        max_context: a.max_context,
    };
    let mut dec = StreamDecoder::new();
    let mut stdout = std::io::stdout().lock();
    let started = std::time::Instant::now();
    let out = generate(model, experts.as_ref(), &req, |id| {
        let piece = dec.push(&tok, id)?;
        // A closed stdout (a pipe to `head`) ends the generation instead of failing it.
        Ok(stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
            .is_ok())
    })?;
    let _ = writeln!(stdout);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        tokens = out.tokens.len(),
        finish = ?out.finish,
        tok_per_s = out.tokens.len() as f64 / secs,
        "generation finished"
    );
    if let Some(c) = &loaded.cluster {
        c.log_summary();
    }
    Ok(())
}
