//! The cluster end to end: real `moeshard worker` processes on 127.0.0.1, both transports.
//!
//! Distributed must equal single-process to the bit (logits .npy bytes, greedy text), for every
//! fixture and 1, 2 and 3 workers with uneven capacities; two coordinators can share workers; and
//! every failure (unreachable worker, other model, worker killed mid-generation with no room left
//! on the survivors) is reported with the worker's address (and the layer) within a bounded time.
//! Failover itself is tested in tests/failover.rs.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{FIXTURES, bin, copy_fixture, fixture, ids, reference, run};
use moeshard_coordinator::placement::{HostCapacity, place};
use moeshard_coordinator::{
    ClusterExperts, ClusterOptions, LocalWorkers, LocalWorkersConfig, Transport,
};
use moeshard_engine::fingerprint::model_fingerprint;
use moeshard_engine::generate::all_logits;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{ExpertBackend, ExpertRow, LocalExperts, Model};

const TRANSPORTS: [Transport; 2] = [Transport::Grpc, Transport::Quic];
const GB: u64 = 1 << 30;

/// Starts workers serving `dir` with the given capacities; they are killed when dropped.
fn workers(dir: &Path, transport: Transport, capacities: &[Option<u64>]) -> LocalWorkers {
    let mut cfg = LocalWorkersConfig::new(bin(), dir.to_path_buf(), transport, capacities.len());
    cfg.capacities = capacities.to_vec();
    cfg.quiet = true;
    LocalWorkers::start(&cfg).unwrap()
}

fn tokens_arg(name: &str) -> String {
    ids(&reference(name)["tokens"])
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn prompt(name: &str) -> String {
    reference(name)["prompt_text"].as_str().unwrap().to_string()
}

/// `moeshard logits` with extra arguments; returns the .npy bytes.
fn logits_bytes(name: &str, extra: &[&str]) -> Vec<u8> {
    let (ok, bytes, stderr) = common::logits_npy(&fixture(name), &tokens_arg(name), extra);
    assert!(ok, "{name} logits {extra:?} failed: {stderr}");
    bytes
}

/// Greedy `moeshard generate` with extra arguments; returns stdout.
fn generate_text(name: &str, max_tokens: usize, extra: &[&str]) -> String {
    let dir = fixture(name);
    let p = prompt(name);
    let n = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &p,
        "--max-tokens",
        &n,
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{name} generate {extra:?} failed: {stderr}");
    stdout
}

#[test]
fn every_fixture_on_1_2_3_workers_over_both_transports_equals_single_process() {
    for name in FIXTURES {
        let single_logits = logits_bytes(name, &[]);
        let single_text = generate_text(name, 24, &[]);
        for transport in TRANSPORTS {
            // Uneven capacities 1:2:3; worker 0 alone can hold everything, and assignments from
            // successive coordinators add up on a worker.
            let w = workers(
                &fixture(name),
                transport,
                &[Some(GB), Some(2 * GB), Some(3 * GB)],
            );
            let addrs = w.addrs();
            for n in 1..=3 {
                let list = addrs[..n].join(",");
                let extra = ["--workers", &list, "--transport", transport.name()];
                let got = logits_bytes(name, &extra);
                assert!(
                    got == single_logits,
                    "{name}: logits over {n} {transport} workers differ from single-process"
                );
                let text = generate_text(name, 24, &extra);
                assert_eq!(
                    text, single_text,
                    "{name}: greedy text over {n} {transport} workers"
                );
            }
        }
    }
}

#[test]
fn local_workers_flag_writes_the_single_process_bytes() {
    let name = "qwen3_moe_tiny";
    let single = logits_bytes(name, &[]);
    for transport in TRANSPORTS {
        let got = logits_bytes(
            name,
            &["--local-workers", "2", "--transport", transport.name()],
        );
        assert!(got == single, "--local-workers 2 over {transport}");
    }
    // Uneven local capacities, with a share hosted by the coordinator itself.
    let got = logits_bytes(
        name,
        &[
            "--local-workers",
            "2",
            "--local-capacities",
            "50000,200000",
            "--coordinator-capacity",
            "100000",
        ],
    );
    assert!(
        got == single,
        "uneven local workers plus a coordinator share"
    );
    // Weights read through the file mapping (coordinator and workers) instead of copied into
    // resident memory: the same bytes.
    for extra in [&["--mmap"][..], &["--mmap", "--local-workers", "2"]] {
        assert!(logits_bytes(name, extra) == single, "{extra:?}");
    }
}

/// Spawns `moeshard generate` with stdout piped.
fn spawn_generate(name: &str, max_tokens: usize, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(["generate", "--model"])
        .arg(fixture(name))
        .args(["--prompt", "Hello", "--max-tokens", &max_tokens.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`; kills it and fails the test past that.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> (bool, String, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut s) = child.stdout.take() {
                s.read_to_string(&mut out).unwrap();
            }
            if let Some(mut s) = child.stderr.take() {
                s.read_to_string(&mut err).unwrap();
            }
            return (status.success(), out, err);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_generations_at_once_share_the_same_workers() {
    let name = "mixtral_tiny";
    let single = {
        let c = spawn_generate(name, 300, &[]);
        wait_bounded(c, Duration::from_secs(60), "single-process").1
    };
    for transport in TRANSPORTS {
        let w = workers(&fixture(name), transport, &[None, None]);
        let list = w.addrs().join(",");
        let extra = ["--workers", &list, "--transport", transport.name()];
        let a = spawn_generate(name, 300, &extra);
        let b = spawn_generate(name, 300, &extra);
        let (ok_a, out_a, err_a) = wait_bounded(a, Duration::from_secs(60), "first");
        let (ok_b, out_b, err_b) = wait_bounded(b, Duration::from_secs(60), "second");
        assert!(ok_a && ok_b, "{transport}: {err_a} / {err_b}");
        assert_eq!(out_a, single, "{transport}: first generation");
        assert_eq!(out_b, single, "{transport}: second generation");
    }
}

/// The CLI's final `error: ...` line (logs may precede it).
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_unreachable_worker_is_named() {
    let name = "qwen3_moe_tiny";
    let dead = format!("127.0.0.1:{}", free_port());
    for transport in TRANSPORTS {
        let good = workers(&fixture(name), transport, &[None]);
        // A live worker first, so the error is about the dead one, not the first one.
        let list = format!("{},{dead}", good.addrs()[0]);
        let dir = fixture(name);
        let started = Instant::now();
        let (ok, _, stderr) = run(&[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--out",
            "/dev/null",
            "--workers",
            &list,
            "--transport",
            transport.name(),
            "--connect-timeout",
            "2",
        ]);
        assert!(!ok, "{transport}: succeeded with an unreachable worker");
        let error = error_line(&stderr);
        assert!(
            error.contains(&dead) && error.contains("unreachable"),
            "{transport}: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{transport}: too slow"
        );
    }
}

#[test]
fn a_worker_serving_another_model_is_refused_with_both_fingerprints() {
    let ours = fixture("qwen3_moe_tiny");
    let theirs = fixture("mixtral_tiny");
    let fp = |dir: &Path| model_fingerprint(dir, &Checkpoint::open(dir).unwrap()).unwrap();
    let (fp_ours, fp_theirs) = (fp(&ours), fp(&theirs));
    assert_ne!(fp_ours, fp_theirs);
    for transport in TRANSPORTS {
        let w = workers(&theirs, transport, &[None]);
        let addr = &w.addrs()[0];
        let (ok, _, stderr) = run(&[
            "logits",
            "--model",
            ours.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--out",
            "/dev/null",
            "--workers",
            addr,
            "--transport",
            transport.name(),
        ]);
        assert!(!ok, "{transport}: a worker of another model was accepted");
        let error = error_line(&stderr);
        for needle in [addr.as_str(), &fp_ours, &fp_theirs] {
            assert!(
                error.contains(needle),
                "{transport}: no {needle} in {stderr}"
            );
        }
    }
}

/// A capacity for each of two workers that holds its share plus one expert: when one dies, the
/// survivor cannot take all of its experts, so failover must give up.
fn room_for_half_plus_one(name: &str) -> Option<u64> {
    let dir = fixture(name);
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = &model.cfg;
    let first = cfg.moe_layers().next().map(|l| (l, 0));
    let eb = moeshard_engine::experts::stored_bytes(cfg, &ckpt, first).unwrap();
    let total = (cfg.moe_layers().count() * cfg.num_experts) as u64;
    Some((total.div_ceil(2) + 1) * eb)
}

#[test]
fn a_worker_killed_mid_generation_fails_it_naming_worker_and_layer_when_no_survivor_has_room() {
    let name = "qwen3_moe_tiny";
    let cap = room_for_half_plus_one(name);
    for transport in TRANSPORTS {
        let mut w = workers(&fixture(name), transport, &[cap, cap]);
        let victim = w.addrs()[1].clone();
        let list = w.addrs().join(",");
        let mut child = spawn_generate(
            name,
            4000,
            &[
                "--workers",
                &list,
                "--transport",
                transport.name(),
                "--max-context",
                "4096",
                "--rpc-timeout",
                "3",
            ],
        );
        // Wait until tokens stream, then kill a worker as a crash would.
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut seen = Vec::new();
        while seen.len() < 64 {
            let buf = stdout.fill_buf().unwrap();
            assert!(!buf.is_empty(), "{transport}: the generation ended early");
            let n = buf.len();
            seen.extend_from_slice(buf);
            stdout.consume(n);
        }
        let killed_at = Instant::now();
        w.kill(1);
        // Keep reading so the coordinator never blocks on a full pipe.
        let drain = std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = stdout.read_to_end(&mut rest);
        });
        let (ok, _, stderr) = wait_bounded(child, Duration::from_secs(30), "killed worker");
        drain.join().unwrap();
        let took = killed_at.elapsed();
        assert!(
            !ok,
            "{transport}: generation succeeded after its worker died"
        );
        let error = error_line(&stderr);
        assert!(
            error.contains(&victim) && error.contains("layer"),
            "{transport}: the error names neither worker nor layer: {stderr}"
        );
        assert!(took < Duration::from_secs(15), "{transport}: took {took:?}");
        eprintln!("{transport}: failed {took:?} after the kill: {error}");
    }
}

/// Loads the dense model and connects a cluster in this process.
fn connect(
    name: &str,
    addrs: Vec<String>,
    transport: Transport,
) -> (Model, ClusterExperts, LocalExperts) {
    let dir = fixture(name);
    let (model, ckpt) = Model::load(&dir).unwrap();
    let opts = ClusterOptions {
        workers: addrs,
        transport,
        rpc_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(3),
        ..ClusterOptions::default()
    };
    let cluster = ClusterExperts::connect(&dir, &model.cfg, &ckpt, &opts).unwrap();
    let local = LocalExperts::load_all(&model.cfg, &ckpt).unwrap();
    (model, cluster, local)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn after_a_worker_dies_with_no_room_left_every_later_request_fails_clearly_and_quickly() {
    let name = "qwen2_moe_tiny";
    let tokens = ids(&reference(name)["tokens"]);
    let cap = room_for_half_plus_one(name);
    for transport in TRANSPORTS {
        let mut w = workers(&fixture(name), transport, &[cap, cap]);
        let victim = w.addrs()[0].clone();
        let (model, cluster, local) = connect(name, w.addrs(), transport);
        let want = all_logits(&model, &local, &tokens).unwrap();
        assert!(same_bits(
            &all_logits(&model, &cluster, &tokens).unwrap(),
            &want
        ));
        assert!(!cluster.dispatch_latencies().is_empty());
        cluster.reset_dispatch_latencies();
        assert!(cluster.dispatch_latencies().is_empty());
        w.kill(0);
        for attempt in 0..3 {
            let started = Instant::now();
            let err = all_logits(&model, &cluster, &tokens)
                .unwrap_err()
                .to_string();
            let took = started.elapsed();
            assert!(
                err.contains(&victim) && err.contains("layer"),
                "{transport} attempt {attempt}: {err}"
            );
            assert!(took < Duration::from_secs(10), "{transport}: took {took:?}");
        }
    }
}

#[test]
fn dispatch_sends_only_the_needed_tokens_and_nothing_to_idle_workers() {
    let name = "mixtral_top1_f16";
    for transport in TRANSPORTS {
        let w = workers(&fixture(name), transport, &[None, None, None]);
        let (model, cluster, local) = connect(name, w.addrs(), transport);
        let p = cluster.placement().clone();
        // Three experts on three equal workers: one each, per layer.
        let layer = 0;
        let owned_by_0: Vec<usize> = p
            .experts_of(0)
            .into_iter()
            .filter(|&(l, _)| l == layer)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(owned_by_0.len(), 1);
        let h = model.cfg.hidden_size;
        let hidden: Vec<f32> = (0..4 * h).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let rows = [
            ExpertRow {
                token: 3,
                expert: owned_by_0[0] as u32,
                weight: 0.75,
            },
            ExpertRow {
                token: 1,
                expert: owned_by_0[0] as u32,
                weight: 0.25,
            },
        ];
        let got = cluster
            .dispatch(layer, &hidden, &rows)
            .unwrap()
            .wait()
            .unwrap();
        let want = local.compute(layer, &hidden, &rows).unwrap();
        assert!(same_bits(&got, &want), "{transport}");
        let stats = cluster.worker_stats();
        let s0 = stats[0].1.as_ref().unwrap();
        assert_eq!((s0.batches, s0.rows, s0.tokens), (1, 2, 2), "{transport}");
        assert_eq!(
            s0.bytes_in,
            (2 * h * 4) as u64,
            "only two tokens' hidden states"
        );
        for (addr, s) in &stats[1..] {
            assert_eq!(
                s.as_ref().unwrap().batches,
                0,
                "{transport}: {addr} got a request"
            );
        }
    }
}

/// Overwrites every byte of `names` in the checkpoint at `dir` with 0xFF (a NaN in every float
/// dtype).
fn poison(dir: &Path, names: &[String]) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let places: Vec<_> = names
        .iter()
        .map(|n| {
            let (path, info) = ckpt.info(n).unwrap();
            (path.to_path_buf(), info.start, info.len)
        })
        .collect();
    drop(ckpt);
    for (path, start, len) in places {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(start as u64)).unwrap();
        f.write_all(&vec![0xFF; len]).unwrap();
    }
}

#[test]
fn workers_never_use_experts_they_were_not_assigned() {
    let name = "qwen3_moe_tiny";
    let single = logits_bytes(name, &[]);
    let dir = fixture(name);
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = &model.cfg;
    let layers: Vec<usize> = cfg.moe_layers().collect();
    let expert_bytes: u64 = {
        let n = cfg.expert_tensor_names(layers[0], 0);
        [n.gate_proj, n.up_proj, n.down_proj]
            .iter()
            .map(|t| ckpt.info(t).unwrap().1.len as u64)
            .sum()
    };
    let caps = [GB, 2 * GB];
    let hosts: Vec<HostCapacity> = caps
        .iter()
        .map(|&capacity| HostCapacity {
            name: String::new(),
            capacity,
        })
        .collect();
    let placement = place(&hosts, &layers, cfg.num_experts, expert_bytes).unwrap();
    // Each worker's copy has every expert it is not assigned poisoned with NaNs.
    let copies: Vec<tempfile::TempDir> = (0..caps.len())
        .map(|i| {
            let copy = copy_fixture(name);
            let others: Vec<String> = layers
                .iter()
                .flat_map(|&l| (0..cfg.num_experts).map(move |e| (l, e)))
                .filter(|&(l, e)| placement.owner(l, e) != Some(i))
                .flat_map(|(l, e)| {
                    let n = cfg.expert_tensor_names(l, e);
                    [n.gate_proj, n.up_proj, n.down_proj]
                })
                .collect();
            poison(copy.path(), &others);
            copy
        })
        .collect();
    // Control: the poison does reach the logits when a poisoned expert is used.
    let poisoned = Model::load(copies[0].path()).unwrap();
    let all = LocalExperts::load_all(&poisoned.0.cfg, &poisoned.1).unwrap();
    let tokens = ids(&reference(name)["tokens"]);
    let bad = all_logits(&poisoned.0, &all, &tokens).unwrap();
    assert!(bad.iter().any(|v| v.is_nan()), "the poison has no effect");

    let mut running = Vec::new();
    for (copy, cap) in copies.iter().zip(caps) {
        running.push(workers(copy.path(), Transport::Grpc, &[Some(cap)]));
    }
    let list = running
        .iter()
        .map(|w| w.addrs()[0].clone())
        .collect::<Vec<_>>()
        .join(",");
    let got = logits_bytes(name, &["--workers", &list]);
    assert!(got == single, "a worker used an expert it was not assigned");
}

/// Not a check: prints the decode round trip of one MoE layer (p50/p99) over loopback for each
/// transport and worker count. `cargo test --release --test cluster -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_decode_dispatch_round_trip() {
    use moeshard_coordinator::percentile;
    use moeshard_engine::generate::{GenerateRequest, generate};
    use moeshard_engine::sampling::SamplingParams;
    let name = "qwen3_moe_tiny";
    let dir = fixture(name);
    eprintln!("{name}: decode, 1 token per step; round trip of one MoE layer (all workers)");
    eprintln!("transport  workers  samples  p50_us  p99_us");
    for transport in TRANSPORTS {
        for n in 1..=3 {
            let w = workers(&dir, transport, &vec![None; n]);
            let (model, cluster, _) = connect(name, w.addrs(), transport);
            let req = GenerateRequest {
                prompt: vec![1, 2, 3],
                max_tokens: 64,
                sampling: SamplingParams::default(),
                stop_tokens: Vec::new(),
                max_context: 4096,
            };
            generate(&model, &cluster, &req, |_| Ok(true)).unwrap(); // warm-up
            cluster.reset_dispatch_latencies();
            let req = GenerateRequest {
                max_tokens: 1000,
                ..req
            };
            generate(&model, &cluster, &req, |_| Ok(true)).unwrap();
            let lat = cluster.dispatch_latencies();
            let us = |q| percentile(&lat, q).unwrap().as_secs_f64() * 1e6;
            eprintln!(
                "{:<9}  {n:>7}  {:>7}  {:>6.0}  {:>6.0}",
                transport.name(),
                lat.len(),
                us(0.5),
                us(0.99)
            );
        }
    }
}

/// Process ids whose parent is `ppid` (from /proc).
fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn local_workers_do_not_outlive_a_killed_coordinator() {
    let mut child = spawn_generate(
        "qwen3_moe_tiny",
        4000,
        &["--local-workers", "2", "--max-context", "4096"],
    );
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // Tokens stream once the workers are up.
    assert!(!stdout.fill_buf().unwrap().is_empty());
    let workers = children_of(child.id());
    assert_eq!(workers.len(), 2, "expected two local worker processes");
    // SIGKILL: no destructor runs; the workers must notice their stdin closing.
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    while workers.iter().any(|&p| alive(p)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "local workers outlived their coordinator"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
