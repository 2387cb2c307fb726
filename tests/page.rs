//! The cluster page at `/`: a real `moeshard serve` with two local workers, loaded in headless
//! Chromium (Debian's `chromium` package; `.ci/run` installs it). The rendered DOM must show the
//! nodes, the layer x expert maps and the recent requests, and the screenshot must be a real
//! picture of the page, not a blank one.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moeshard_coordinator::serve::client;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

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

fn start(extra: &[&str]) -> Server {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_moe_tiny");
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
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server printed its address within 30 s");
    Server { child, addr }
}

/// Runs headless Chromium on `url` with a fresh profile; returns its stdout.
fn chromium(profile: &Path, args: &[String]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            // Long enough for three polls of /v1/cluster (one every 2 s).
            "--virtual-time-budget=6500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium (install Debian's `chromium` package: .ci/run does)");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn the_cluster_page_shows_nodes_experts_and_requests_in_chromium() {
    let s = start(&["--local-workers", "2", "--transport", "quic"]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = client::post_json(
            &s.addr,
            "/v1/completions",
            &[],
            &json!({"prompt": format!("hello {i}"), "max_tokens": 5, "ignore_eos": true}),
            TIMEOUT,
        )
        .expect("completion");
        assert_eq!(r.status, 200);
        let v = r.json().expect("json");
        ids.push(v["id"].as_str().expect("id").to_string());
    }

    // The JSON the page draws.
    let v: Value = client::get(&s.addr, "/v1/cluster", TIMEOUT)
        .unwrap()
        .json()
        .unwrap();
    let hosts = v["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2, "{v}");
    for h in hosts {
        assert_eq!(h["healthy"], true, "{h}");
        assert!(h["stats"]["hosted_bytes"].as_u64().unwrap() > 0, "{h}");
        assert!(h["stats"]["rows"].as_u64().unwrap() > 0, "{h}");
        // Each worker's own round trips, as the page's "dispatch p50" column shows them.
        let p50 = h["dispatch_p50_us"]
            .as_f64()
            .expect("a worker's dispatch p50");
        let p99 = h["dispatch_p99_us"]
            .as_f64()
            .expect("a worker's dispatch p99");
        assert!(p50 > 0.0 && p50 <= p99, "{h}");
    }
    assert_eq!(v["routing"]["moe_layers"], json!([0, 2]));
    assert_eq!(v["routing"]["num_experts"], 5);
    let rows: u64 = v["routing"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    // 3 requests: (prompt + 5 generated - 1 last not fed) tokens x 2 MoE layers x top-2 rows.
    let routed_total: u64 = hosts
        .iter()
        .map(|h| h["routed_rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, routed_total, "every routed row is on some host");
    assert!(rows > 0);
    let recent: Vec<&str> = v["recent_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(recent, newest_first);
    assert_eq!(v["recent_requests"][0]["completion_tokens"], 5);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["generation_tokens_total"], 15);
    assert!(v["coordinator"]["memory"]["total_bytes"].as_u64().unwrap() > 0);

    // The page itself: one self-contained document, nothing fetched from elsewhere.
    let page = client::get(&s.addr, "/", TIMEOUT).unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap_or("")
            .starts_with("text/html")
    );
    let html = page.text().unwrap();
    assert!(html.contains("/v1/cluster"));
    for external in ["http://", "https://", "<link", "src="] {
        assert!(!html.contains(external), "the page refers to {external}");
    }

    // Rendered by Chromium.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", s.addr);
    let started = Instant::now();
    let dom = chromium(profile.path(), &["--dump-dom".into(), url.clone()]);
    eprintln!("dump-dom took {:?}", started.elapsed());
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never rendered:\n{dom}"
    );
    assert!(dom.contains("data-node=\"coordinator\""), "{dom}");
    for h in hosts {
        let name = h["name"].as_str().unwrap();
        assert!(
            dom.contains(&format!("data-node=\"{name}\"")),
            "worker {name} missing"
        );
    }
    // Two maps (owner and heat) of 2 MoE layers x 5 experts.
    assert_eq!(count(&dom, "class=\"cell\""), 2 * 2 * 5, "{dom}");
    assert!(
        dom.contains("data-layers=\"2\" data-experts=\"5\""),
        "{dom}"
    );
    for h in hosts {
        let name = h["name"].as_str().unwrap();
        let owned = h["experts"].as_array().unwrap().len();
        // Each owned expert shows in both maps.
        assert_eq!(
            count(&dom, &format!("data-host=\"{name}\"")),
            2 * owned,
            "{name}"
        );
    }
    // Heat: some cell has rows routed to it.
    assert!(!dom.contains("id=\"heatmax\">0 rows"), "{dom}");
    for id in &ids {
        assert!(dom.contains(&format!("data-id=\"{id}\"")), "request {id}");
    }
    // Load rates need two polls: the workers' rows show as busy percentages.
    assert!(dom.contains("% busy"), "{dom}");
    assert!(
        dom.contains("<div id=\"error\" role=\"alert\"></div>"),
        "the page shows an error: {dom}"
    );

    let shot = profile.path().join("page.png");
    chromium(
        profile.path(),
        &[format!("--screenshot={}", shot.display()), url],
    );
    let bytes = std::fs::metadata(&shot).expect("a screenshot").len();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/png_stats.py"))
        .arg(&shot)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("screenshot: {bytes} bytes, {stats}");
    assert_eq!(stats["width"], 1280);
    assert_eq!(stats["height"], 1000);
    // Text, swatches, two maps and a chart: many colours, and much of the frame is not
    // background.
    assert!(stats["distinct_colours"].as_u64().unwrap() > 50, "{stats}");
    assert!(
        stats["non_background_share"].as_f64().unwrap() > 0.1,
        "{stats}"
    );
    if let Ok(dir) = std::env::var("MOESHARD_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, Path::new(&dir).join("cluster-page.png"));
    }
}
