//! Failover with real worker processes on 127.0.0.1, over both transports: a worker killed with
//! SIGKILL in the middle of a generation costs no token (the output is the fault-free one, to the
//! byte), replicas take over without re-homing, and a worker restarted at the same address
//! rejoins and takes load again.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, fixture, ids, reference, run};
use moeshard_coordinator::{ClusterExperts, ClusterOptions, Transport};
use moeshard_engine::generate::all_logits;
use moeshard_engine::{LocalExperts, Model};

const TRANSPORTS: [Transport; 2] = [Transport::Grpc, Transport::Quic];

/// A `moeshard worker` process at a fixed address; killed (SIGKILL) on drop.
struct Worker {
    child: Child,
    addr: String,
}

impl Worker {
    /// Starts a worker on `addr` (port 0 picks one) and waits for its address line.
    fn start(dir: &Path, transport: Transport, addr: &str) -> Worker {
        let mut child = Command::new(bin())
            .arg("worker")
            .arg("--model")
            .arg(dir)
            .args(["--listen", addr, "--transport", transport.name()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (addr, _) = moeshard_proto::parse_listening_line(&line)
            .unwrap_or_else(|| panic!("no address line: {line:?}"));
        Worker {
            child,
            addr: addr.to_string(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_workers(dir: &Path, transport: Transport, n: usize) -> Vec<Worker> {
    (0..n)
        .map(|_| Worker::start(dir, transport, "127.0.0.1:0"))
        .collect()
}

fn list(workers: &[Worker]) -> String {
    workers
        .iter()
        .map(|w| w.addr.clone())
        .collect::<Vec<_>>()
        .join(",")
}

const GEN_TOKENS: &str = "1500";

fn generate_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "--model",
        dir,
        "--prompt",
        "Hello",
        "--max-tokens",
        GEN_TOKENS,
        "--max-context",
        "4096",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_worker_killed_mid_generation_costs_no_token() {
    let name = "qwen3_moe_tiny";
    let dir = fixture(name);
    let dir_s = dir.to_str().unwrap();
    let (ok, fault_free, err) = run(&generate_args(dir_s, &[]));
    assert!(ok, "single-process run failed: {err}");
    assert!(fault_free.len() > 256, "the fault-free text is too short");
    for transport in TRANSPORTS {
        let mut workers = start_workers(&dir, transport, 3);
        let addrs = list(&workers);
        let victim = workers[1].addr.clone();
        let mut child = Command::new(bin())
            .args(generate_args(
                dir_s,
                &[
                    "--workers",
                    &addrs,
                    "--transport",
                    transport.name(),
                    "--rpc-timeout",
                    "5",
                ],
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until tokens stream, then kill a worker as a crash would.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut seen = Vec::new();
        while seen.len() < 64 {
            let buf = stdout.fill_buf().unwrap();
            assert!(!buf.is_empty(), "{transport}: the generation ended early");
            let n = buf.len();
            seen.extend_from_slice(buf);
            stdout.consume(n);
        }
        workers[1].kill();
        let killed_at = Instant::now();
        stdout.read_to_end(&mut seen).unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{transport}: the generation failed: {stderr}"
        );
        let text = String::from_utf8(seen).unwrap();
        assert!(
            text == fault_free,
            "{transport}: the output differs from the fault-free run"
        );
        assert!(
            stderr.contains(&victim) && stderr.contains("marked down"),
            "{transport}: the failover is not logged: {stderr}"
        );
        eprintln!(
            "{transport}: finished {:?} after the kill, same {} bytes as fault-free",
            killed_at.elapsed(),
            text.len()
        );
    }
}

fn options(addrs: Vec<String>, transport: Transport, replicas: usize) -> ClusterOptions {
    ClusterOptions {
        workers: addrs,
        transport,
        rpc_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(3),
        replicas,
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        ..ClusterOptions::default()
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_worker_rejoins_and_takes_load_again() {
    let name = "qwen2_moe_tiny";
    let dir = fixture(name);
    let tokens = ids(&reference(name)["tokens"]);
    let (model, ckpt) = Model::load(&dir).unwrap();
    let want = all_logits(
        &model,
        &LocalExperts::load_all(&model.cfg, &ckpt).unwrap(),
        &tokens,
    )
    .unwrap();
    for transport in TRANSPORTS {
        let mut workers = start_workers(&dir, transport, 2);
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let cluster =
            ClusterExperts::connect(&dir, &model.cfg, &ckpt, &options(addrs, transport, 1))
                .unwrap();
        assert!(same_bits(
            &all_logits(&model, &cluster, &tokens).unwrap(),
            &want
        ));
        let share = cluster.placement().experts_of(0).len();
        assert!(share > 0);

        // Kill worker 0: the next pass fails over to worker 1 with the same bits.
        workers[0].kill();
        assert!(
            same_bits(&all_logits(&model, &cluster, &tokens).unwrap(), &want),
            "{transport}: logits after the kill"
        );
        assert!(!cluster.workers()[0].up, "{transport}: still marked up");
        assert!(
            cluster.workers()[1].experts > cluster.placement().experts_of(1).len(),
            "{transport}: worker 0's experts were not re-homed on worker 1"
        );

        // Restart it at the same address: the heartbeat reconnects it and gives it its experts.
        let addr = workers[0].addr.clone();
        workers[0] = Worker::start(&dir, transport, &addr);
        wait_until(
            &format!("{transport}: rejoin"),
            Duration::from_secs(20),
            || cluster.workers()[0].up,
        );
        assert!(
            same_bits(&all_logits(&model, &cluster, &tokens).unwrap(), &want),
            "{transport}: logits after the rejoin"
        );
        let stats = cluster.worker_stats();
        let s0 = stats[0].1.as_ref().unwrap();
        assert!(
            s0.batches > 0,
            "{transport}: the restarted worker took no load"
        );
        assert!(s0.hosted_experts as usize >= share, "{transport}: {s0:?}");
    }
}

#[test]
fn replicas_take_over_without_re_homing() {
    let name = "mixtral_tiny";
    let dir = fixture(name);
    let tokens = ids(&reference(name)["tokens"]);
    let (model, ckpt) = Model::load(&dir).unwrap();
    let want = all_logits(
        &model,
        &LocalExperts::load_all(&model.cfg, &ckpt).unwrap(),
        &tokens,
    )
    .unwrap();
    for transport in TRANSPORTS {
        let mut workers = start_workers(&dir, transport, 3);
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let cluster =
            ClusterExperts::connect(&dir, &model.cfg, &ckpt, &options(addrs, transport, 2))
                .unwrap();
        let before = cluster.holders();
        assert!(
            before.values().flatten().all(|hs| hs.len() == 2),
            "{transport}: not two copies of everything: {before:?}"
        );
        workers[2].kill();
        assert!(
            same_bits(&all_logits(&model, &cluster, &tokens).unwrap(), &want),
            "{transport}: logits after the kill"
        );
        // Every expert still had a live copy: nothing was re-homed.
        assert_eq!(cluster.holders(), before, "{transport}");
        assert!(!cluster.workers()[2].up);
    }
}
