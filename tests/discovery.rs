//! Discovery across network namespaces: a coordinator (`serve --discover`) and workers
//! (`worker --join auto`), each in its own namespace, joined by a bridge in a fourth one (this
//! test makes them all and removes them; nothing is added to the host's own namespace). Workers
//! join and leave while the coordinator serves; the placement follows, and the greedy output
//! stays the same, bit for bit, whichever workers hold the experts.
//!
//! Needs root and iproute2 (`ip netns`), as CI has.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn sh(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `<tag>c` (coordinator, 10.213.0.1), `<tag>w1`, `<tag>w2` (workers, .2 and .3) on a
/// bridge in `<tag>br`. Removed on drop.
struct Net {
    tag: String,
}

impl Net {
    fn up() -> Net {
        let tag = format!("msd{}", std::process::id() % 100_000);
        let net = Net { tag: tag.clone() };
        let br = format!("{tag}br");
        sh(&["netns", "add", &br]);
        sh(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        sh(&["-n", &br, "link", "set", "br0", "up"]);
        for (i, host) in ["c", "w1", "w2"].iter().enumerate() {
            let ns = format!("{tag}{host}");
            let (inner, outer) = (format!("{tag}{host}i"), format!("{tag}{host}o"));
            sh(&["netns", "add", &ns]);
            sh(&[
                "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer,
                "netns", &br,
            ]);
            sh(&["-n", &br, "link", "set", &outer, "master", "br0", "up"]);
            let addr = format!("10.213.0.{}/24", i + 1);
            sh(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            sh(&["-n", &ns, "link", "set", &inner, "up", "multicast", "on"]);
            sh(&["-n", &ns, "link", "set", "lo", "up"]);
            // mDNS goes to 224.0.0.251 out of the veth.
            sh(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &inner]);
        }
        net
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in ["c", "w1", "w2", "br"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(host)])
                .status();
        }
    }
}

struct Proc {
    child: Child,
    line: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixture_named(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn fixture() -> String {
    fixture_named("qwen3_moe_tiny")
}

/// Runs moeshard in namespace `ns`; waits for the stdout line starting with `prefix`.
fn start_in(ns: &str, args: &[&str], prefix: &'static str) -> Proc {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_moeshard")])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start moeshard in a namespace");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{args:?} in {ns} printed no `{prefix}` line"));
    Proc { child, line }
}

fn worker(net: &Net, host: &str) -> Proc {
    worker_of(net, host, &fixture())
}

fn worker_of(net: &Net, host: &str, model: &str) -> Proc {
    start_in(
        &net.ns(host),
        &[
            "worker",
            "--model",
            model,
            "--listen",
            "0.0.0.0:0",
            "--transport",
            "quic",
            "--join",
            "auto",
        ],
        "moeshard worker listening on ",
    )
}

/// One HTTP request made from inside namespace `ns` (python3's standard library).
fn http(ns: &str, method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    const SCRIPT: &str = r#"
import json, sys, urllib.request, urllib.error
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let body = body.map(Value::to_string).unwrap_or_default();
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "python3", "-c", SCRIPT, method, url, &body,
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, rest) = text
        .split_once('\n')
        .unwrap_or_else(|| panic!("no answer: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (
        status.trim().parse().expect("status"),
        serde_json::from_str(rest.trim()).unwrap_or(Value::Null),
    )
}

fn cluster(net: &Net, base: &str) -> Value {
    let (st, v) = http(&net.ns("c"), "GET", &format!("{base}/v1/cluster"), None);
    assert_eq!(st, 200, "{v}");
    v
}

fn host_names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn wait_hosts(net: &Net, base: &str, want: &[String], within: Duration) -> Value {
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let v = cluster(net, base);
        if host_names(&v) == want {
            eprintln!("hosts {want:?} after {:?}", started.elapsed());
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "hosts {:?}, waited for {want:?}",
            host_names(&v)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn greedy(net: &Net, base: &str) -> String {
    let (st, v) = http(
        &net.ns("c"),
        "POST",
        &format!("{base}/v1/completions"),
        Some(
            &json!({"prompt": "the cluster", "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// `10.213.0.N:PORT` of a worker from its listening line (`0.0.0.0:PORT transport=quic`).
fn reach(line: &str, n: u8) -> String {
    let port = line
        .split_whitespace()
        .next()
        .and_then(|a| a.rsplit(':').next())
        .expect("port");
    format!("10.213.0.{n}:{port}")
}

#[test]
fn workers_join_and_leave_a_serving_coordinator_across_namespaces() {
    let net = Net::up();
    let w1 = worker(&net, "w1");
    let a1 = reach(&w1.line, 2);
    // A worker of another model announces itself too: its hello fails, so it is never admitted
    // (an announcement proves nothing), and the coordinator serves without it.
    let stranger = worker_of(&net, "w2", &fixture_named("mixtral_tiny"));
    let stranger_addr = reach(&stranger.line, 3);
    let coord = start_in(
        &net.ns("c"),
        &[
            "serve",
            "--model",
            &fixture(),
            "--listen",
            "10.213.0.1:0",
            "--transport",
            "quic",
            "--discover",
            "--discover-wait",
            "30",
            "--min-workers",
            "2",
        ],
        "listening on ",
    );
    let base = format!("http://{}", coord.line);

    // Found by mDNS in another namespace, admitted through hello: it holds every expert.
    let v = wait_hosts(
        &net,
        &base,
        std::slice::from_ref(&a1),
        Duration::from_secs(5),
    );
    assert_eq!(v["hosts"][0]["expert_count"], 10);
    let alone = greedy(&net, &base);

    // A second worker joins while serving: the experts are spread over both.
    let mut w2 = worker(&net, "w2");
    let a2 = reach(&w2.line, 3);
    let both = {
        let mut v = vec![a1.clone(), a2.clone()];
        v.sort();
        v
    };
    let v = wait_hosts(&net, &base, &both, Duration::from_secs(30));
    let counts: Vec<u64> = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["expert_count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 10, "{v}");
    assert!(counts.iter().all(|&c| c > 0), "{v}");
    assert_eq!(greedy(&net, &base), alone, "same output on two workers");
    let v = cluster(&net, &base);
    let w2_rows = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == a2.as_str())
        .map(|h| h["stats"]["rows"].as_u64().unwrap())
        .unwrap();
    assert!(w2_rows > 0, "the new worker computed rows: {v}");

    // It leaves cleanly (SIGTERM: its announcement is withdrawn): the other takes its experts.
    let _ = Command::new("kill")
        .args(["-TERM", &w2.child.id().to_string()])
        .status();
    let _ = w2.child.wait();
    let v = wait_hosts(
        &net,
        &base,
        std::slice::from_ref(&a1),
        Duration::from_secs(30),
    );
    assert_eq!(v["hosts"][0]["expert_count"], 10);
    assert_eq!(greedy(&net, &base), alone, "same output after a leave");
    drop(w2);

    // It comes back and then dies without a word (SIGKILL): health checks remove it.
    let w2 = worker(&net, "w2");
    let a2 = reach(&w2.line, 3);
    let both = {
        let mut v = vec![a1.clone(), a2.clone()];
        v.sort();
        v
    };
    wait_hosts(&net, &base, &both, Duration::from_secs(30));
    assert_eq!(greedy(&net, &base), alone);
    drop(w2); // SIGKILL
    let started = Instant::now();
    wait_hosts(
        &net,
        &base,
        std::slice::from_ref(&a1),
        Duration::from_secs(20),
    );
    eprintln!("a killed worker was removed after {:?}", started.elapsed());
    assert_eq!(greedy(&net, &base), alone, "same output after a crash");
    assert!(!cluster(&net, &base).to_string().contains(&stranger_addr));
    drop(coord);
    drop(w1);
    drop(stranger);
}
