//! `moeshard validate`: checks the planner against measurements on this machine.
//!
//! For each model it calibrates this node (`moeshard calibrate --model ... --json`), then for each
//! cluster shape (single process; local worker processes over gRPC and QUIC; workers in network
//! namespaces behind an emulated link) it writes a cluster.toml from those figures, plans it, runs
//! the matching `moeshard bench` and compares decode (and prefill) tokens/s. The table is printed
//! and the command fails when a decode prediction is off by more than `--limit`.
//!
//! The emulated link: each worker lives in its own network namespace joined to this one by a veth
//! pair shaped with `tc tbf` (bandwidth) on both ends; a delay proxy in this process, between the
//! coordinator and each worker, holds every chunk for half the round trip in each direction
//! (this kernel has no netem). Namespaces, proxies and processes are removed on every exit path.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use moeshard_coordinator::plan::{ClusterSpec, ModelShape, Plan, PlanRequest, Quant, plan};
use serde::Serialize;

use crate::plan::{Calibration, RpcFigures, median};

#[derive(Args)]
pub(crate) struct ValidateArgs {
    /// Directory for the calibrations, cluster files and results (default: a new directory
    /// under the system's temporary directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Largest accepted |predicted - measured| / measured decode tokens/s.
    #[arg(long, default_value_t = 0.20)]
    pub limit: f64,
    /// Shapes with workers in network namespaces behind an emulated link: `auto` runs them when
    /// this process is root and `ip` and `tc` work.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub netns: String,
    /// Only the benchmark model's shapes (no wide model, no Qwen3-235B layers).
    #[arg(long)]
    pub quick: bool,
    /// Only shapes whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Measurements per shape, taken in rounds over all shapes; the measured figures are the
    /// medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Use the calibrations an earlier run left in --out instead of measuring again.
    #[arg(long, requires = "out")]
    pub reuse_calibration: bool,
    /// Directory holding the configs (default: examples/configs of this source tree).
    #[arg(long)]
    pub configs: Option<PathBuf>,
}

/// A model the shapes run, with the formats measured for it.
#[derive(Clone, Debug)]
struct ModelSpec {
    file: &'static str,
    /// `--layers` of the calibration.
    layers: Option<usize>,
    quants: &'static [&'static str],
}

/// Where the routed experts run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Placement {
    /// In the coordinator's process.
    Single,
    /// On N worker processes on loopback.
    Local(usize),
    /// On N workers, each in its own network namespace behind the emulated link.
    Netns(usize),
}

/// The emulated link of netns shapes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Link {
    pub rate_mbit: u32,
    /// Round trip the delay proxy adds.
    pub rtt_us: u32,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Shape {
    pub name: String,
    model: usize,
    pub layers: Option<usize>,
    pub quant: &'static str,
    pub placement: Placement,
    pub transport: &'static str,
    pub link: Option<Link>,
}

const BENCH: usize = 0;
const WIDE: usize = 1;
const Q235: usize = 2;

fn models() -> Vec<ModelSpec> {
    vec![
        ModelSpec {
            file: "qwen3-moe-bench.json",
            layers: None,
            quants: &["bf16", "q8_0"],
        },
        ModelSpec {
            file: "wide-8x4096.json",
            layers: None,
            quants: &["bf16", "q4_k"],
        },
        ModelSpec {
            file: "qwen3-235b-a22b.json",
            layers: Some(1),
            quants: &["q8_0"],
        },
    ]
}

/// Every shape of the validation.
pub(crate) fn shapes(quick: bool, netns: bool) -> Vec<Shape> {
    let mut v = Vec::new();
    let mut add = |model: usize,
                   layers: Option<usize>,
                   quant: &'static str,
                   placement: Placement,
                   transport: &'static str,
                   link: Option<Link>| {
        let mname = ["bench", "wide", "235b"][model];
        let layer_s = layers.map(|k| format!("-l{k}")).unwrap_or_default();
        let where_ = match placement {
            Placement::Single => "single".to_string(),
            Placement::Local(n) => format!("local{n}-{transport}"),
            Placement::Netns(n) => format!("netns{n}-{transport}"),
        };
        let link_s = match link {
            Some(Link { rate_mbit, rtt_us }) => format!("-{rate_mbit}mbit-{rtt_us}us"),
            None => String::new(),
        };
        v.push(Shape {
            name: format!("{mname}{layer_s}-{quant}-{where_}{link_s}"),
            model,
            layers,
            quant,
            placement,
            transport,
            link,
        });
    };
    use Placement::*;
    add(BENCH, None, "bf16", Single, "none", None);
    add(BENCH, None, "q8_0", Single, "none", None);
    for n in 1..=3 {
        add(BENCH, None, "bf16", Local(n), "grpc", None);
        add(BENCH, None, "bf16", Local(n), "quic", None);
    }
    add(BENCH, None, "q8_0", Local(2), "quic", None);
    if netns {
        let l = |rate_mbit, rtt_us| Some(Link { rate_mbit, rtt_us });
        add(BENCH, None, "bf16", Netns(2), "grpc", l(1000, 200));
        add(BENCH, None, "bf16", Netns(2), "grpc", l(100, 1000));
        add(BENCH, None, "bf16", Netns(2), "grpc", l(20, 4000));
        add(BENCH, None, "q8_0", Netns(1), "grpc", l(100, 2000));
    }
    if !quick {
        add(WIDE, None, "bf16", Single, "none", None);
        add(WIDE, None, "q4_k", Single, "none", None);
        add(WIDE, None, "q4_k", Local(2), "grpc", None);
        // Calibrated on one layer, checked on one and two: the planner's layer scaling.
        add(Q235, Some(1), "q8_0", Single, "none", None);
        add(Q235, Some(2), "q8_0", Single, "none", None);
    }
    v
}

/// Decode steps start after a prompt of this many tokens.
const DECODE_PROMPT: usize = 32;

/// Prompt tokens of the prefill measurement (fewer behind slow links).
fn prefill_tokens(s: &Shape) -> usize {
    match s.link {
        Some(l) if l.rate_mbit < 200 => 32,
        _ => 128,
    }
}

/// The cluster.toml of a shape, from this node's calibration. All nodes are this machine
/// (`host = "this"`): worker processes share its cores and memory bandwidth with each other.
pub(crate) fn cluster_toml(s: &Shape, cal: &Calibration) -> Result<String> {
    use std::fmt::Write as _;
    let rpc = |t: &str| -> Result<RpcFigures> {
        cal.rpc
            .iter()
            .find(|r| r.transport == t)
            .cloned()
            .with_context(|| format!("the calibration has no {t} dispatch figures"))
    };
    let node = |name: &str, coordinator: bool, experts: bool| {
        let mut n = format!(
            "[[node]]\nname = {name:?}\nhost = \"this\"\nmemory_gb = {:.1}\nmem_bw_gbs = {:.3}\ncores = {}\ngflops_per_core = {:.3}\nreserve_gb = 0.5\ncoordinator = {coordinator}\n",
            cal.memory_gb.max(1.0),
            cal.mem_bw_gbs,
            cal.cores,
            cal.gflops_per_core
        );
        if !experts {
            n.push_str("expert_capacity_gb = 0\n");
        }
        for (q, r) in &cal.rates {
            n.push_str(&r.toml_table(q, None));
        }
        n.push('\n');
        n
    };
    let mut t = format!(
        "# moeshard validate: shape {} (from this node's calibration)\n",
        s.name
    );
    let workers = match s.placement {
        Placement::Single => 0,
        Placement::Local(n) | Placement::Netns(n) => n,
    };
    t.push_str(&node("coordinator", true, workers == 0));
    for w in 0..workers {
        t.push_str(&node(&format!("worker{w}"), false, true));
    }
    let (bw, rtt, over, per, kb) = match (s.placement, s.link) {
        (Placement::Single, _) => (40.0, 0.0, 0.0, 0.0, 0.0),
        (_, link) => {
            let r = rpc(s.transport)?;
            let (bw, rtt) = match link {
                Some(l) => (f64::from(l.rate_mbit) / 1000.0, f64::from(l.rtt_us)),
                None => (40.0, 0.0),
            };
            (bw, rtt, r.overhead_us, r.per_worker_us, r.per_kb_us)
        }
    };
    let _ = write!(
        t,
        "[link]\nbandwidth_gbps = {bw}\nrtt_us = {rtt}\noverhead_us = {over:.1}\nper_worker_us = {per:.1}\nper_kb_us = {kb:.4}\n"
    );
    Ok(t)
}

/// The plan request matching a shape's bench run.
pub(crate) fn request(s: &Shape, decode_tokens: usize) -> Result<PlanRequest> {
    let q = Quant::parse(s.quant).with_context(|| format!("unknown format {}", s.quant))?;
    Ok(PlanRequest {
        expert_quant: q,
        dense_quant: q,
        // The planner reads the cache at half the context: the middle of the decode run.
        context: (2 * DECODE_PROMPT + decode_tokens) as u64,
        concurrency: 1,
        prefill_tokens: prefill_tokens(s) as u64,
    })
}

/// One compared shape.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub shape: String,
    pub predicted_decode: f64,
    pub measured_decode: f64,
    pub predicted_prefill: f64,
    pub measured_prefill: f64,
    /// Each round's measured (decode, prefill) tokens/s; the measured figures are their medians.
    pub runs: Vec<(f64, f64)>,
    /// Why the shape could not be measured.
    pub failed: Option<String>,
}

/// A shape's prediction and the measurements taken so far.
struct Pending {
    /// (decode, prefill) tokens/s.
    predicted: (f64, f64),
    runs: Vec<(f64, f64)>,
    failed: Option<String>,
}

impl Pending {
    fn into_row(self, shape: &str) -> Row {
        let med = |f: fn(&(f64, f64)) -> f64| median(self.runs.iter().map(f).collect());
        let (measured_decode, measured_prefill) = (med(|r| r.0), med(|r| r.1));
        Row {
            shape: shape.to_string(),
            predicted_decode: self.predicted.0,
            measured_decode,
            predicted_prefill: self.predicted.1,
            measured_prefill,
            runs: self.runs,
            failed: self.failed,
        }
    }
}

impl Row {
    fn err(p: f64, m: f64) -> f64 {
        if m > 0.0 { (p - m) / m } else { f64::INFINITY }
    }
    pub fn decode_error(&self) -> f64 {
        Self::err(self.predicted_decode, self.measured_decode)
    }
    pub fn prefill_error(&self) -> f64 {
        Self::err(self.predicted_prefill, self.measured_prefill)
    }
    pub fn passes(&self, limit: f64) -> bool {
        self.failed.is_none() && self.decode_error().abs() <= limit
    }
}

/// The table of results.
pub(crate) fn table(rows: &[Row], limit: f64) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<40} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}  {}\n",
        "shape", "pred dec", "meas dec", "err", "pred pre", "meas pre", "err", "verdict"
    );
    for r in rows {
        if let Some(f) = &r.failed {
            let _ = writeln!(s, "{:<40} FAILED: {f}", r.shape);
            continue;
        }
        let _ = writeln!(
            s,
            "{:<40} {:>9.1} {:>9.1} {:>+6.1}%   {:>9.1} {:>9.1} {:>+6.1}%  {}",
            r.shape,
            r.predicted_decode,
            r.measured_decode,
            100.0 * r.decode_error(),
            r.predicted_prefill,
            r.measured_prefill,
            100.0 * r.prefill_error(),
            if r.passes(limit) { "ok" } else { "OFF" }
        );
    }
    let bad = rows.iter().filter(|r| !r.passes(limit)).count();
    let _ = writeln!(
        s,
        "\n{} of {} shapes within {:.0}% on decode tokens/s (tokens/s; err = (predicted - measured) / measured)",
        rows.len() - bad,
        rows.len(),
        100.0 * limit
    );
    s
}

/// Fails when any shape failed or missed the limit.
pub(crate) fn verdict(rows: &[Row], limit: f64) -> Result<()> {
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passes(limit))
        .map(|r| r.shape.as_str())
        .collect();
    if rows.is_empty() {
        bail!("no shapes were run");
    }
    if !bad.is_empty() {
        bail!(
            "{} shape(s) off by more than {:.0}% or not measured: {}",
            bad.len(),
            100.0 * limit,
            bad.join(", ")
        );
    }
    Ok(())
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the moeshard binary")
}

/// Runs `moeshard ARGS`, returns its stdout; stderr goes to `log`.
fn run_self(args: &[String], log: &Path, timeout: Duration) -> Result<String> {
    let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .context("starting moeshard")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "moeshard {} took longer than {} s (log: {})",
                args.first().map_or("", String::as_str),
                timeout.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        let tail: String = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        bail!("moeshard {} failed ({status}): {tail}", args.join(" "));
    }
    Ok(text)
}

/// Shape arguments shared by calibrate, bench and workers: the synthetic model and its format.
fn model_args(cfg: &Path, layers: Option<usize>, quant: &str) -> Vec<String> {
    let mut v = vec![
        "--model".into(),
        cfg.display().to_string(),
        "--synthetic".into(),
    ];
    if let Some(k) = layers {
        v.extend(["--layers".into(), k.to_string()]);
    }
    if quant != "bf16" {
        v.extend(["--quantize".into(), quant.into(), "--quantize-all".into()]);
    }
    v
}

/// Whether netns shapes can run here.
fn netns_available() -> bool {
    let ok = |c: &mut Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok(Command::new("ip").args(["netns", "list"])) && ok(Command::new("tc").arg("-V"))
}

pub(crate) fn cmd_validate(a: ValidateArgs) -> Result<()> {
    let started = Instant::now();
    let netns = match a.netns.as_str() {
        "on" => true,
        "off" => false,
        _ => {
            let ok = netns_available();
            if !ok {
                tracing::warn!(
                    "network-namespace shapes skipped: they need root, ip and tc (--netns on to insist)"
                );
            }
            ok
        }
    };
    let out = match &a.out {
        Some(o) => o.clone(),
        None => std::env::temp_dir().join(format!("moeshard-validate-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let configs = a
        .configs
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs")));
    let specs = models();
    let shapes: Vec<Shape> = shapes(a.quick, netns)
        .into_iter()
        .filter(|s| a.only.as_ref().is_none_or(|o| s.name.contains(o.as_str())))
        .collect();
    eprintln!(
        "moeshard validate: {} shapes, results in {}",
        shapes.len(),
        out.display()
    );
    let mut cals: Vec<Option<Calibration>> = vec![None; specs.len()];
    // Predictions first: every model calibrated and every shape planned before any is measured.
    let mut pending: Vec<Pending> = Vec::with_capacity(shapes.len());
    for s in &shapes {
        let spec = &specs[s.model];
        let cfg = configs.join(spec.file);
        let predicted = (|| -> Result<(f64, f64)> {
            let saved = out.join(format!("calibrate-{}.json", spec.file));
            if cals[s.model].is_none() && a.reuse_calibration && saved.exists() {
                let text = std::fs::read_to_string(&saved)?;
                cals[s.model] = Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("reading {}", saved.display()))?,
                );
            }
            if cals[s.model].is_none() {
                eprintln!("calibrating at the widths of {}", spec.file);
                let mut args = vec!["calibrate".to_string(), "--name".into(), "this".into()];
                args.extend(["--model".into(), cfg.display().to_string()]);
                if let Some(k) = spec.layers {
                    args.extend(["--layers".into(), k.to_string()]);
                }
                args.extend(["--quant".into(), spec.quants.join(",")]);
                // The dispatch costs of the transports this model's shapes use (measuring one
                // holds the model four times over).
                let mut used: Vec<&str> = shapes
                    .iter()
                    .filter(|x| x.model == s.model && !matches!(x.placement, Placement::Single))
                    .map(|x| x.transport)
                    .collect();
                used.sort_unstable();
                used.dedup();
                let rpc = if used.is_empty() {
                    "none".to_string()
                } else {
                    used.join(",")
                };
                args.extend(["--rpc".into(), rpc, "--json".into()]);
                args.extend(["--bytes".into(), (256u64 << 20).to_string()]);
                let log = out.join(format!("calibrate-{}.log", spec.file));
                let text = run_self(&args, &log, Duration::from_secs(600))?;
                std::fs::write(&saved, &text)?;
                cals[s.model] =
                    Some(serde_json::from_str(&text).context("reading calibrate's JSON")?);
            }
            let cal = cals[s.model].as_ref().context("no calibration")?;
            let toml = cluster_toml(s, cal)?;
            let cpath = out.join(format!("{}.toml", s.name));
            std::fs::write(&cpath, &toml)?;
            let cluster =
                ClusterSpec::from_toml(&toml).with_context(|| format!("in {}", cpath.display()))?;
            let text = std::fs::read_to_string(&cfg)
                .with_context(|| format!("reading {}", cfg.display()))?;
            let mut shape = ModelShape::from_config_json(&text)?;
            if let Some(k) = s.layers {
                shape = shape.with_layers(k as u64);
            }
            let p: Plan = plan(&shape, &cluster, request(s, a.decode_tokens)?);
            if !p.fits {
                bail!("the plan says the model does not fit: {:?}", p.advice);
            }
            Ok((p.decode_tok_s, p.prefill_tok_s))
        })();
        pending.push(match predicted {
            Ok(p) => Pending {
                predicted: p,
                runs: Vec::new(),
                failed: None,
            },
            Err(e) => Pending {
                predicted: (0.0, 0.0),
                runs: Vec::new(),
                failed: Some(format!("{e:#}")),
            },
        });
    }
    // Then the measurements, in rounds over all shapes (every other round in reverse order), so
    // a slow or fast spell of the machine touches many shapes once rather than one shape's every
    // run; each figure is the median of its rounds, as the calibration's rates are.
    for round in 0..a.rounds {
        let mut order: Vec<usize> = (0..shapes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (s, p) = (&shapes[i], &mut pending[i]);
            if p.failed.is_some() {
                continue;
            }
            let cfg = configs.join(specs[s.model].file);
            match bench(s, &cfg, &out, a.decode_tokens, round) {
                Ok(m) => {
                    eprintln!(
                        "{:<40} round {} of {}: predicted {:>7.1} measured {:>7.1} decode tokens/s",
                        s.name,
                        round + 1,
                        a.rounds,
                        p.predicted.0,
                        m.0
                    );
                    p.runs.push(m);
                }
                Err(e) => p.failed = Some(format!("round {}: {e:#}", round + 1)),
            }
        }
    }
    let rows: Vec<Row> = shapes
        .iter()
        .zip(pending)
        .map(|(s, p)| p.into_row(&s.name))
        .collect();
    for row in &rows {
        if let Some(f) = &row.failed {
            eprintln!("{:<40} FAILED: {f}", row.shape);
        }
    }
    let t = table(&rows, a.limit);
    print!("{t}");
    println!("({:.0} s)", started.elapsed().as_secs_f64());
    std::fs::write(out.join("table.txt"), &t)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    verdict(&rows, a.limit)
}

/// Runs the shape's bench; (decode, prefill) tokens/s.
fn bench(
    s: &Shape,
    cfg: &Path,
    out: &Path,
    decode_tokens: usize,
    round: u32,
) -> Result<(f64, f64)> {
    let mut args = vec!["bench".to_string()];
    args.extend(model_args(cfg, s.layers, s.quant));
    args.extend([
        "--decode-prompt".into(),
        DECODE_PROMPT.to_string(),
        "--decode-tokens".into(),
        decode_tokens.to_string(),
        "--prefill-tokens".into(),
        prefill_tokens(s).to_string(),
        "--json".into(),
        "--rpc-timeout".into(),
        "120".into(),
    ]);
    let log = out.join(format!("{}-round{}.log", s.name, round + 1));
    // Held until the bench is done: namespaces, workers and proxies.
    let mut _net = None;
    match s.placement {
        Placement::Single => {}
        Placement::Local(n) => args.extend([
            "--local-workers".into(),
            n.to_string(),
            "--transport".into(),
            s.transport.into(),
        ]),
        Placement::Netns(n) => {
            let link = s.link.context("a netns shape needs a link")?;
            let net = EmulatedNet::start(n, link, s, cfg, out)?;
            args.extend([
                "--workers".into(),
                net.addrs().join(","),
                "--transport".into(),
                s.transport.into(),
                "--cluster-key-file".into(),
                net.key_file.display().to_string(),
            ]);
            _net = Some(net);
        }
    }
    let text = run_self(&args, &log, Duration::from_secs(900))?;
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("reading bench's JSON: {text:?}"))?;
    let f = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("bench's JSON lacks {k}"))
    };
    Ok((f("decode_tok_s")?, f("prefill_tok_s")?))
}

/// Names of the emulated hosts' namespaces and veth ends.
fn ns_name(i: usize) -> String {
    format!("msval-h{i}")
}

fn ip(args: &[&str]) -> Result<()> {
    run_tool("ip", args)
}

/// Runs `prog args`; its error output becomes the error when it fails.
fn run_tool(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tc(ns: Option<&str>, dev: &str, link: Link) -> Result<()> {
    // A bucket of 100 us of traffic, at least two full frames: a message pays its bytes over the
    // rate, as on a real link, instead of passing at memory speed out of a large burst.
    let burst = (u64::from(link.rate_mbit) * 1_000_000 / 8 / 10_000).max(2 * 1514);
    let rate = format!("{}mbit", link.rate_mbit);
    let burst = burst.to_string();
    let mut a: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        a.extend(["netns", "exec", ns, "tc"]);
    }
    a.extend([
        "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "200ms",
    ]);
    let (prog, rest) = if ns.is_some() {
        ("ip", &a[..])
    } else {
        ("tc", &a[..])
    };
    run_tool(prog, rest)
}

/// Network namespaces with one worker each, shaped veth links and a delay proxy per worker;
/// all of it removed on drop.
struct EmulatedNet {
    namespaces: Vec<String>,
    workers: Vec<Child>,
    proxies: Vec<DelayProxy>,
    key_file: PathBuf,
}

impl EmulatedNet {
    fn start(n: usize, link: Link, s: &Shape, cfg: &Path, out: &Path) -> Result<Self> {
        let mut net = EmulatedNet {
            namespaces: Vec::new(),
            workers: Vec::new(),
            proxies: Vec::new(),
            key_file: out.join("cluster.key"),
        };
        moeshard_proto::auth::ClusterKey::generate_file(&net.key_file)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", net.key_file.display()))?;
        for i in 1..=n {
            let ns = ns_name(i);
            // A namespace left by a run that was killed: remove it first.
            let _ = ip(&["netns", "del", &ns]);
            let (a, b) = (format!("{ns}a"), format!("{ns}b"));
            let _ = ip(&["link", "del", &a]);
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let subnet = format!("10.97.{i}");
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &b, "netns", &ns])?;
            ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &a])?;
            ip(&["link", "set", &a, "up"])?;
            ip(&[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{subnet}.2/24"),
                "dev",
                &b,
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", &b, "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            tc(None, &a, link)?;
            tc(Some(&ns), &b, link)?;
            let worker_log = out.join(format!("{}-worker{i}.log", s.name));
            let logf = std::fs::File::create(&worker_log)?;
            let mut args: Vec<String> = vec![
                "netns".into(),
                "exec".into(),
                ns.clone(),
                exe()?.display().to_string(),
                "worker".into(),
            ];
            args.extend(model_args(cfg, s.layers, s.quant));
            args.extend([
                "--listen".into(),
                format!("{subnet}.2:0"),
                "--transport".into(),
                s.transport.into(),
                "--cluster-key-file".into(),
                net.key_file.display().to_string(),
                "--exit-with-parent".into(),
            ]);
            let mut child = Command::new("ip")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(logf)
                .spawn()
                .context("starting a worker in its namespace")?;
            let stdout = child.stdout.take().context("no worker stdout")?;
            net.workers.push(child);
            let addr = read_listening(stdout, Duration::from_secs(300))
                .with_context(|| format!("worker {i} (log: {})", worker_log.display()))?;
            let delay = Duration::from_micros(u64::from(link.rtt_us) / 2);
            net.proxies.push(DelayProxy::start(addr, delay)?);
        }
        Ok(net)
    }

    fn addrs(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.addr.to_string()).collect()
    }
}

impl Drop for EmulatedNet {
    fn drop(&mut self) {
        self.proxies.clear();
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        for ns in &self.namespaces {
            // Deleting the namespace removes the veth pair.
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// Reads a worker's "listening on" line.
fn read_listening(stdout: std::process::ChildStdout, timeout: Duration) -> Result<SocketAddr> {
    let (tx, rx) = sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = rx
        .recv_timeout(timeout)
        .context("the worker did not say where it listens in time")??;
    moeshard_proto::parse_listening_line(&line)
        .map(|(a, _)| a)
        .with_context(|| format!("unexpected worker output {line:?}"))
}

/// A TCP relay on 127.0.0.1 that delays every chunk by a fixed time in each direction, without
/// limiting throughput (reading and writing run on separate threads, a bounded queue between).
pub(crate) struct DelayProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// Chunks in flight per direction (each at most CHUNK bytes).
const QUEUE: usize = 256;
const CHUNK: usize = 64 << 10;

impl DelayProxy {
    pub(crate) fn start(target: SocketAddr, delay: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the delay proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((a, _)) => {
                        let _ = a.set_nonblocking(false);
                        match TcpStream::connect(target) {
                            Ok(b) => {
                                let _ = relay(a, b, delay);
                            }
                            Err(e) => tracing::warn!(%target, %e, "delay proxy: connect failed"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        tracing::warn!(%e, "delay proxy: accept failed");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
        Ok(DelayProxy {
            addr,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Starts both directions of one proxied connection.
fn relay(a: TcpStream, b: TcpStream, delay: Duration) -> std::io::Result<()> {
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    for (from, to) in [(a.try_clone()?, b.try_clone()?), (b, a)] {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::spawn(move || read_side(from, tx, delay));
        std::thread::spawn(move || write_side(to, rx));
    }
    Ok(())
}

fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, delay: Duration) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, data)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&data).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshard_coordinator::plan::Rates;
    use std::collections::BTreeMap;

    fn cal() -> Calibration {
        let mut rates = BTreeMap::new();
        rates.insert(
            "bf16".to_string(),
            Rates {
                dense_gbs: 10.0,
                head_gbs: 12.0,
                expert_gbs: 8.0,
                prefill_dense_gflops: 80.0,
                prefill_expert_gflops: 40.0,
            },
        );
        Calibration {
            name: "this".into(),
            memory_gb: 24.0,
            mem_bw_gbs: 13.0,
            cores: 2,
            gflops_per_core: 40.0,
            loopback_rtt_us: 20.0,
            model: None,
            layers: None,
            rates,
            rpc: vec![
                RpcFigures {
                    transport: "grpc".into(),
                    overhead_us: 150.0,
                    per_worker_us: 40.0,
                    per_kb_us: 0.5,
                },
                RpcFigures {
                    transport: "quic".into(),
                    overhead_us: 120.0,
                    per_worker_us: 30.0,
                    per_kb_us: 0.4,
                },
            ],
        }
    }

    const BENCH_CFG: &str = include_str!("../examples/configs/qwen3-moe-bench.json");

    fn find(name: &str) -> Shape {
        shapes(false, true)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no shape {name}"))
    }

    #[test]
    fn every_shape_has_a_cluster_file_that_plans_like_the_runtime_places() {
        let m = ModelShape::from_config_json(BENCH_CFG).unwrap();
        let all = shapes(false, true);
        assert!(all.len() >= 15, "{}", all.len());
        let names: std::collections::BTreeSet<_> = all.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), all.len(), "shape names are unique");
        for s in all.iter().filter(|s| s.model == BENCH) {
            let toml = cluster_toml(s, &cal()).unwrap();
            let c =
                ClusterSpec::from_toml(&toml).unwrap_or_else(|e| panic!("{}: {e}\n{toml}", s.name));
            let p = plan(&m, &c, request(s, 64).unwrap());
            assert!(p.fits, "{}", s.name);
            let experts: Vec<usize> = p.nodes.iter().map(|n| n.experts).collect();
            match s.placement {
                Placement::Single => assert_eq!(experts, vec![12 * 64]),
                Placement::Local(n) | Placement::Netns(n) => {
                    // As the runtime does without --coordinator-capacity: none on the
                    // coordinator, the workers share them evenly.
                    assert_eq!(experts.len(), n + 1);
                    assert_eq!(experts[0], 0, "{}", s.name);
                    let (lo, hi) = (
                        experts[1..].iter().min().unwrap(),
                        experts[1..].iter().max().unwrap(),
                    );
                    assert!(hi - lo <= 12, "{}: {experts:?}", s.name);
                    assert_eq!(experts.iter().sum::<usize>(), 12 * 64);
                    assert!(p.decode.network_s > 0.0);
                }
            }
        }
        // The link of a netns shape is the emulated one; loopback shapes get the measured
        // dispatch figures of their transport.
        let s = find("bench-bf16-netns2-grpc-100mbit-1000us");
        let c = ClusterSpec::from_toml(&cluster_toml(&s, &cal()).unwrap()).unwrap();
        assert_eq!(c.link.bandwidth_gbps, 0.1);
        assert_eq!(c.link.rtt_us, 1000.0);
        assert_eq!(c.link.overhead_us, 150.0);
        let s = find("bench-bf16-local2-quic");
        let c = ClusterSpec::from_toml(&cluster_toml(&s, &cal()).unwrap()).unwrap();
        assert_eq!((c.link.overhead_us, c.link.per_worker_us), (120.0, 30.0));
        assert!(c.nodes.iter().all(|n| n.host.as_deref() == Some("this")));
        assert_eq!(c.nodes[1].rates["bf16"].expert_gbs, 8.0);
        // A calibration without the transport's figures is refused with a reason.
        let mut no_quic = cal();
        no_quic.rpc.truncate(1);
        let e = cluster_toml(&s, &no_quic).unwrap_err().to_string();
        assert!(e.contains("quic"), "{e}");
    }

    #[test]
    fn slower_links_predict_slower_decode() {
        let m = ModelShape::from_config_json(BENCH_CFG).unwrap();
        let tok_s = |name: &str| {
            let s = find(name);
            let c = ClusterSpec::from_toml(&cluster_toml(&s, &cal()).unwrap()).unwrap();
            plan(&m, &c, request(&s, 64).unwrap()).decode_tok_s
        };
        let single = tok_s("bench-bf16-single");
        let local = tok_s("bench-bf16-local2-grpc");
        let fast = tok_s("bench-bf16-netns2-grpc-1000mbit-200us");
        let mid = tok_s("bench-bf16-netns2-grpc-100mbit-1000us");
        let slow = tok_s("bench-bf16-netns2-grpc-20mbit-4000us");
        assert!(single > local && local > fast && fast > mid && mid > slow);
        // 20 Mbit/s: per layer at least the 4 ms round trip plus ~5 rows of 4 KB back.
        assert!(1.0 / slow > 12.0 * (4e-3 + 5.0 * 4096.0 * 8.0 / 20e6));
    }

    #[test]
    fn the_verdict_follows_the_limit() {
        let row = |p: f64, m: f64| Row {
            shape: format!("s{p}"),
            predicted_decode: p,
            measured_decode: m,
            predicted_prefill: 1.0,
            measured_prefill: 2.0,
            runs: vec![(m, 2.0)],
            failed: None,
        };
        assert!(verdict(&[row(119.0, 100.0), row(81.0, 100.0)], 0.2).is_ok());
        let e = verdict(&[row(119.0, 100.0), row(79.0, 100.0)], 0.2).unwrap_err();
        assert!(e.to_string().contains("s79"), "{e}");
        assert!(verdict(&[row(121.0, 100.0)], 0.2).is_err());
        // Prefill is reported, not judged.
        assert!(verdict(&[row(100.0, 100.0)], 0.2).is_ok());
        let mut failed = row(100.0, 100.0);
        failed.failed = Some("worker died".into());
        assert!(verdict(&[failed.clone()], 0.2).is_err());
        assert!(verdict(&[], 0.2).is_err());
        let t = table(&[row(119.0, 100.0), row(79.0, 100.0), failed], 0.2);
        assert!(t.contains("+19.0%") && t.contains("-21.0%") && t.contains("OFF"));
        assert!(t.contains("FAILED: worker died"));
        assert!(t.contains("1 of 3 shapes within 20%"), "{t}");
    }

    #[test]
    fn measured_figures_are_each_rounds_median() {
        let p = Pending {
            predicted: (30.0, 200.0),
            runs: vec![(22.0, 210.0), (28.0, 150.0), (25.0, 180.0)],
            failed: None,
        };
        let r = p.into_row("s");
        // Decode and prefill medians are taken apart: from different rounds here.
        assert_eq!((r.measured_decode, r.measured_prefill), (25.0, 180.0));
        assert_eq!((r.predicted_decode, r.predicted_prefill), (30.0, 200.0));
        assert_eq!(r.runs.len(), 3);
        assert!(r.passes(0.2));
        // A round that failed fails the shape, whatever the others measured.
        let p = Pending {
            predicted: (30.0, 200.0),
            runs: vec![(29.0, 200.0)],
            failed: Some("round 2: worker died".into()),
        };
        let r = p.into_row("s");
        assert!(!r.passes(0.2));
        assert!(table(&[r], 0.2).contains("round 2: worker died"));
    }

    #[test]
    fn the_delay_proxy_delays_each_direction_and_passes_bytes_intact() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(20)).unwrap();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let t0 = Instant::now();
        let mut w = c.try_clone().unwrap();
        let m2 = msg.clone();
        let writer = std::thread::spawn(move || w.write_all(&m2).unwrap());
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        // Both directions delayed: at least 40 ms (an upper bound would be timing-sensitive).
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert_eq!(back, msg);
        drop(c);
        drop(proxy);
    }
}
