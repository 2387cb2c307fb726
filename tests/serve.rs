//! End-to-end tests of `moeshard serve`: the real binary on a loopback port, driven over HTTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moeshard_coordinator::serve::client;
use serde_json::{Value, json};

const MODEL: &str = "qwen3_moe_tiny";
const TIMEOUT: Duration = Duration::from_secs(60);

/// A running server, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(MODEL);
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
            .arg("serve")
            .arg("--model")
            .arg(&fixture)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start moeshard serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let started = Instant::now();
        let addr = rx.recv_timeout(Duration::from_secs(20));
        let mut server = Server {
            child,
            addr: String::new(),
        };
        match addr {
            Ok(a) => server.addr = a,
            Err(_) => panic!("the server printed no address within 20 s"),
        }
        eprintln!("server up at {} in {:?}", server.addr, started.elapsed());
        server
    }

    fn post(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = client::post_json(&self.addr, path, &headers, body, TIMEOUT).expect("request");
        let status = r.status;
        (status, r.json().expect("JSON body"))
    }

    fn post_raw(&self, path: &str, body: &[u8], key: Option<&str>) -> (u16, Value) {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = client::request(&self.addr, "POST", path, &headers, Some(body), TIMEOUT)
            .expect("request");
        let status = r.status;
        (status, r.json().expect("JSON body"))
    }

    fn metrics(&self) -> String {
        client::get(&self.addr, "/metrics", TIMEOUT)
            .expect("metrics")
            .text()
            .expect("metrics text")
    }

    /// The value of an unlabelled (or fully labelled) series in /metrics.
    fn metric(&self, series: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut(&Server) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(p) = want_param {
        assert_eq!(e["param"], json!(p), "{body}");
    }
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[test]
fn error_answers() {
    let s = Server::start(&["--api-key", "k1", "--api-key", "k2", "--max-context", "64"]);
    let ok = chat("hello", 4);
    // 401: missing and wrong keys; both keys work.
    let (st, b) = s.post("/v1/chat/completions", &ok, None);
    assert_error(st, &b, 401, None);
    let (st, b) = s.post("/v1/chat/completions", &ok, Some("nope"));
    assert_error(st, &b, 401, None);
    for key in ["k1", "k2"] {
        let (st, b) = s.post("/v1/chat/completions", &ok, Some(key));
        assert_eq!(st, 200, "{b}");
    }
    let r = client::get(&s.addr, "/v1/models", TIMEOUT).unwrap();
    assert_eq!(r.status, 401, "models need the key too");
    // /health and /metrics stay open for probes and scrapers.
    assert_eq!(
        client::get(&s.addr, "/health", TIMEOUT).unwrap().status,
        200
    );
    let key = Some("k1");
    // 404: unknown model.
    let mut m = ok.clone();
    m["model"] = json!("gpt-5");
    let (st, b) = s.post("/v1/chat/completions", &m, key);
    assert_error(st, &b, 404, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    // 400: malformed JSON, wrong field types and values, n > 1.
    let (st, b) = s.post_raw("/v1/chat/completions", b"{\"messages\": [", key);
    assert_error(st, &b, 400, None);
    let (st, b) = s.post_raw("/v1/completions", b"not json", key);
    assert_error(st, &b, 400, None);
    let cases = [
        ("max_tokens", json!("ten")),
        ("max_tokens", json!(0)),
        ("temperature", json!(9)),
        ("top_p", json!(-1)),
        ("stream", json!("yes")),
        ("stop", json!([1, 2])),
        ("n", json!(2)),
    ];
    for (field, value) in cases {
        let mut body = ok.clone();
        body[field] = value;
        let (st, b) = s.post("/v1/chat/completions", &body, key);
        assert_error(st, &b, 400, Some(field));
    }
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": "hi"}),
        key,
    );
    assert_error(st, &b, 400, Some("messages"));
    let (st, b) = s.post("/v1/completions", &json!({"prompt": ["a", "b"]}), key);
    assert_error(st, &b, 400, Some("prompt"));
    // 400: context length (prompt alone, and prompt plus max_tokens).
    let long = "word ".repeat(200);
    let (st, b) = s.post("/v1/chat/completions", &chat(&long, 4), key);
    assert_error(st, &b, 400, Some("messages"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 100}),
        key,
    );
    assert_error(st, &b, 400, Some("prompt"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    // Out-of-vocabulary token ids are a 400, not a crash.
    let (st, b) = s.post("/v1/completions", &json!({"prompt": [1, 99999]}), key);
    assert_error(st, &b, 400, Some("prompt"));
    // Unknown routes get an OpenAI-style 404.
    let r = client::get(&s.addr, "/v1/nothing", TIMEOUT).unwrap();
    assert_eq!(r.status, 404);
    // The server is still fine, and counted the answers by status.
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 2}),
        key,
    );
    assert_eq!(st, 200);
    let text = s.metrics();
    assert!(
        text.contains("moeshard_requests_total{endpoint=\"chat_completions\",status=\"401\"} 2"),
        "{text}"
    );
}

/// Starts a streamed request and reads its first event; the returned stream keeps it open.
fn open_stream(s: &Server, body: &Value) -> client::Events {
    let r =
        client::post_json(&s.addr, "/v1/completions", &[], body, TIMEOUT).expect("request step");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    );
    let mut ev = r.events();
    let first = ev
        .next_data()
        .expect("request step")
        .expect("a first chunk");
    let v: Value = serde_json::from_str(&first).expect("request step");
    assert_eq!(v["object"], "text_completion");
    ev
}

fn long_stream() -> Value {
    json!({
        "prompt": "tell me a long story",
        "max_tokens": 3500,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    })
}

#[test]
fn queue_full_is_a_429() {
    let s = Server::start(&["--max-seqs", "1", "--max-queue", "1"]);
    // A occupies the only sequence slot.
    let a = open_stream(&s, &long_stream());
    // B waits in the queue.
    let addr = s.addr.clone();
    let b = std::thread::spawn(move || {
        let r = client::post_json(
            &addr,
            "/v1/completions",
            &[],
            &json!({"prompt": "queued", "max_tokens": 3, "temperature": 0}),
            TIMEOUT,
        )
        .unwrap();
        r.status
    });
    s.wait_for("B to queue", |s| {
        s.metric("moeshard_waiting_sequences") == 1.0
    });
    // C finds the queue full.
    let (st, body) = s.post(
        "/v1/completions",
        &json!({"prompt": "one too many", "max_tokens": 3}),
        None,
    );
    assert_error(st, &body, 429, None);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // Dropping A frees the slot, and B is served.
    drop(a);
    assert_eq!(b.join().unwrap(), 200);
}

#[test]
fn a_disconnected_stream_frees_its_sequence() {
    let s = Server::start(&[]);
    let ev = open_stream(&s, &long_stream());
    // The gauges are set after each step: wait for one that holds the sequence.
    s.wait_for("the sequence to run", |s| {
        s.metric("moeshard_running_sequences") == 1.0 && s.metric("moeshard_kv_cache_bytes") > 0.0
    });
    let dropped = Instant::now();
    drop(ev);
    s.wait_for("the sequence to be freed", |s| {
        s.metric("moeshard_running_sequences") == 0.0 && s.metric("moeshard_kv_cache_bytes") == 0.0
    });
    eprintln!("freed {:?} after the disconnect", dropped.elapsed());
    assert_eq!(
        s.metric("moeshard_request_outcomes_total{finish=\"cancelled\"}"),
        1.0,
        "freed because the client left, not because it finished"
    );
    // Still serving.
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 2}),
        None,
    );
    assert_eq!(st, 200);
}

/// One greedy completion: (text, completion tokens).
fn greedy(addr: &str, prompt: &str) -> (String, u64) {
    let body = json!({
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
    });
    let r = client::post_json(addr, "/v1/completions", &[], &body, TIMEOUT).expect("request step");
    assert_eq!(r.status, 200);
    let v = r.json().expect("request step");
    (
        v["choices"][0]["text"]
            .as_str()
            .expect("request step")
            .to_string(),
        v["usage"]["completion_tokens"]
            .as_u64()
            .expect("request step"),
    )
}

fn batched_steps(s: &Server) -> f64 {
    s.metric("moeshard_forward_step_sequences_count")
        - s.metric("moeshard_forward_step_sequences_bucket{le=\"8\"}")
}

#[test]
fn batched_greedy_output_equals_output_alone() {
    let s = Server::start(&["--max-seqs", "16", "--max-batch-tokens", "64"]);
    let prompts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "request {i}: {}",
                "the experts route tokens ".repeat(1 + i % 5)
            )
        })
        .collect();
    let alone: Vec<(String, u64)> = prompts.iter().map(|p| greedy(&s.addr, p)).collect();
    assert_eq!(batched_steps(&s), 0.0, "requests alone run one at a time");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(prompts.len()));
    let together: Vec<(String, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (addr, barrier) = (s.addr.clone(), barrier.clone());
                sc.spawn(move || {
                    barrier.wait();
                    greedy(&addr, p)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        batched_steps(&s) > 0.0,
        "some steps ran more than 8 sequences together"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.1, 24);
        assert_eq!(a, t, "request {i}: alone vs among 15 others");
    }
}

#[test]
fn streams_follow_the_openai_format() {
    let s = Server::start(&[]);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = client::post_json(&s.addr, "/v1/chat/completions", &[], &body, TIMEOUT).unwrap();
    assert_eq!(r.status, 200);
    let mut ev = r.events();
    let mut chunks = Vec::new();
    while let Some(d) = ev.next_data().unwrap() {
        chunks.push(d);
    }
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let first = &parsed[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &parsed {
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], MODEL);
        assert!(c["created"].is_u64());
    }
    let usage = &parsed[parsed.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    let n = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&n));
    let last = &parsed[parsed.len() - 2];
    assert!(["stop", "length"].contains(&last["choices"][0]["finish_reason"].as_str().unwrap()));
    for c in &parsed[..parsed.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    // The cluster view shows the single process holding every expert.
    let v = client::get(&s.addr, "/v1/cluster", TIMEOUT)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["mode"], "single-process");
    assert_eq!(v["hosts"][0]["expert_count"], 10);
    assert!(v["hosts"][0]["routed_rows"].as_u64().unwrap() > 0);
    let m = s.metrics();
    for series in [
        "moeshard_time_to_first_token_seconds_count 1",
        "moeshard_inter_token_latency_seconds_count",
        "moeshard_moe_dispatch_seconds_count{layer=\"0\"}",
        "moeshard_expert_routed_tokens_total{layer=\"2\",expert=\"4\"}",
    ] {
        assert!(m.contains(series), "{series} missing from:\n{m}");
    }
}

#[test]
fn the_official_openai_python_client_works() {
    let s = Server::start(&["--api-key", "test-key"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/v1", s.addr))
        .arg("test-key")
        .arg(MODEL)
        .output()
        .expect("python3 must be installed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client script failed (is `openai` installed? `python3 -m pip install openai`)\
         \nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("checks passed"));
}

/// Child process ids of `pid` (Linux).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

#[test]
fn a_dead_worker_fails_requests_but_not_the_server() {
    let s = Server::start(&["--local-workers", "1", "--rpc-timeout", "3"]);
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 3}),
        None,
    );
    assert_eq!(st, 200, "served through the worker");
    // The cluster view lists the worker and every expert it holds.
    let v = client::get(&s.addr, "/v1/cluster", TIMEOUT)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["mode"], "cluster");
    assert_eq!(v["hosts"][0]["expert_count"], 10);
    assert_eq!(v["hosts"][0]["experts"].as_array().map(Vec::len), Some(10));
    assert_eq!(v["hosts"][0]["experts"][0], json!([0, 0]));
    let workers = children(s.child.id());
    assert!(!workers.is_empty(), "the local worker process is a child");
    for w in &workers {
        let _ = Command::new("kill").arg("-9").arg(w.to_string()).status();
    }
    std::thread::sleep(Duration::from_millis(200));
    // Non-streamed: a 5xx with an OpenAI error body.
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 3}),
        None,
    );
    assert_error(st, &b, 500, None);
    assert_eq!(b["error"]["code"], "generation_failed");
    // Streamed: an error event ends the stream.
    let r = client::post_json(
        &s.addr,
        "/v1/completions",
        &[],
        &json!({"prompt": "hi", "max_tokens": 3, "stream": true}),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let mut ev = r.events();
    let mut last = None;
    while let Some(d) = ev.next_data().unwrap() {
        last = Some(d);
    }
    let last: Value = serde_json::from_str(&last.expect("an event")).unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    // The server is still up and answering.
    assert_eq!(
        client::get(&s.addr, "/health", TIMEOUT).unwrap().status,
        200
    );
    assert!(s.metric("moeshard_forward_step_failures_total") >= 2.0);
    assert_eq!(s.metric("moeshard_running_sequences"), 0.0);
}
