//! Paged experts (`--memory-budget`) end to end, with real processes: at a quarter of the expert
//! bytes the logits and the greedy text are those of the unconstrained run to the bit, in this
//! process and on local worker processes (gRPC); `bench` reports the paged counters with the
//! budget held; what cannot be paged is refused with the reason.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, run};
use moeshard_engine::paged::{min_budget, paged_bytes};
use moeshard_engine::safetensors::Checkpoint;

const TOKENS: &str = "3,17,42,5,99,8,21,64,11,2,30,7";

fn model(name: &str) -> PathBuf {
    if name.ends_with(".gguf") {
        fixture("gguf").join(name)
    } else {
        fixture(name)
    }
}

/// Bytes of all routed experts (as paged buffers) and the smallest possible budget.
fn expert_bytes(path: &Path) -> (u64, u64) {
    let (cfg, ckpt) = Checkpoint::open_with_config(path).unwrap();
    let all: Vec<_> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .collect();
    (
        paged_bytes(&cfg, &ckpt, all.iter().copied()).unwrap(),
        min_budget(&cfg, &ckpt, all).unwrap(),
    )
}

fn logits(path: &Path, extra: &[&str]) -> Vec<u8> {
    let (ok, bytes, stderr) = common::logits_npy(path, TOKENS, extra);
    assert!(ok, "logits {} {extra:?} failed: {stderr}", path.display());
    bytes
}

fn generate(path: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "16",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "generate {} {extra:?} failed: {stderr}", path.display());
    stdout
}

#[test]
fn quarter_budget_equals_unconstrained_in_process_and_on_workers() {
    for name in ["qwen3_moe_tiny", "mixtral_tiny", "qwen3_moe_gguf-q8_0.gguf"] {
        let path = model(name);
        let (total, least) = expert_bytes(&path);
        let quarter = (total / 4).max(least).to_string();
        // Two workers each host about half: a quarter of that.
        let per_worker = (total / 8).max(least).to_string();
        let want = logits(&path, &[]);
        let got = logits(&path, &["--memory-budget", &quarter]);
        assert!(
            got == want,
            "{name}: paged logits differ from the unconstrained run"
        );
        let got = logits(
            &path,
            &["--local-workers", "2", "--memory-budget", &per_worker],
        );
        assert!(got == want, "{name}: paged workers' logits differ");
        let text = generate(&path, &[]);
        assert_eq!(
            generate(&path, &["--memory-budget", &quarter]),
            text,
            "{name}: paged greedy text"
        );
    }
}

fn bench_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--model",
        path.to_str().unwrap(),
        "--decode-prompt",
        "4",
        "--decode-tokens",
        "12",
        "--prefill-tokens",
        "0",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "bench {extra:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn bench_reports_hit_rate_disk_reads_and_a_held_budget() {
    let path = model("qwen3_moe_tiny");
    let (total, least) = expert_bytes(&path);
    let quarter = (total / 4).max(least);
    for extra in [vec![], vec!["--local-workers".to_string(), "2".to_string()]] {
        let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let b = quarter.to_string();
        args.extend(["--memory-budget", &b]);
        let r = bench_json(&path, &args);
        let p = &r["paged"];
        assert_eq!(p["memory_budget_bytes"].as_u64(), Some(quarter), "{r}");
        let hit = p["hit_rate"].as_f64().unwrap();
        assert!(
            (0.0..1.0).contains(&hit),
            "a quarter cannot hit always: {r}"
        );
        assert!(p["disk_bytes_per_token"].as_f64().unwrap() > 0.0, "{r}");
        let hosts = if extra.is_empty() { 1 } else { 2 };
        assert!(
            p["resident_bytes"].as_u64().unwrap() <= hosts * quarter,
            "resident over the budget: {r}"
        );
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0);
    }
    // Without a budget there is nothing paged to report.
    let r = bench_json(&path, &[]);
    assert!(r.get("paged").is_none(), "{r}");
}

#[test]
fn what_cannot_be_paged_is_refused_with_the_reason() {
    let path = model("qwen3_moe_tiny");
    let p = path.to_str().unwrap();
    let (_, least) = expert_bytes(&path);
    let small = (least - 1).to_string();
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        p,
        "--tokens",
        TOKENS,
        "--out",
        "/dev/null",
        "--memory-budget",
        &small,
    ]);
    assert!(!ok && err.contains("cannot hold one expert"), "{err}");
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        p,
        "--tokens",
        TOKENS,
        "--out",
        "/dev/null",
        "--quantize",
        "q8_0",
        "--memory-budget",
        "1G",
    ]);
    assert!(!ok && err.contains("--quantize"), "{err}");
    // A worker refuses at start, before it listens.
    let (ok, _, err) = run(&[
        "worker",
        "--model",
        p,
        "--listen",
        "127.0.0.1:0",
        "--memory-budget",
        &small,
    ]);
    assert!(!ok && err.contains("cannot hold one expert"), "{err}");
    let (ok, _, err) = run(&[
        "worker",
        "--model",
        fixture("gpt_oss_tiny").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--memory-budget",
        "1G",
    ]);
    assert!(!ok && err.contains("GPT-OSS"), "{err}");
}

/// A server's paged counters: `/metrics` carries the `moeshard_paged_*` series and `/v1/cluster`
/// a `paged` object per host, in this process and on local workers, after real requests.
#[test]
fn serve_reports_the_paged_counters() {
    use moeshard_coordinator::serve::client;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let timeout = Duration::from_secs(60);
    let path = model("qwen3_moe_tiny");
    let (total, least) = expert_bytes(&path);
    let quarter = (total / 4).max(least);
    for extra in [
        &[][..],
        &["--local-workers", "2", "--transport", "quic"][..],
    ] {
        let budget = quarter.to_string();
        let mut child = Command::new(common::bin())
            .args(["serve", "--model", path.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--memory-budget", &budget])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let stdout = child.stdout.take().unwrap();
        let _guard = Kill(child);
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
            .expect("the server printed its address");
        for i in 0..3 {
            let r = client::post_json(
                &addr,
                "/v1/completions",
                &[],
                &serde_json::json!({"prompt": format!("paged {i}"), "max_tokens": 6,
                                    "ignore_eos": true}),
                timeout,
            )
            .unwrap();
            assert_eq!(r.status, 200, "{extra:?}");
        }
        let metrics = client::get(&addr, "/metrics", timeout)
            .unwrap()
            .text()
            .unwrap();
        let series = |name: &str| -> Vec<f64> {
            metrics
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect()
        };
        let hosts = if extra.is_empty() { 1 } else { 2 };
        let budgets = series("moeshard_paged_memory_budget_bytes");
        assert_eq!(budgets, vec![quarter as f64; hosts], "{extra:?}\n{metrics}");
        let reads: f64 = series("moeshard_paged_disk_read_bytes_total").iter().sum();
        let uses: f64 = series("moeshard_paged_hits_total").iter().sum::<f64>()
            + series("moeshard_paged_misses_total").iter().sum::<f64>();
        assert!(reads > 0.0 && uses > 0.0, "{extra:?}\n{metrics}");
        for r in series("moeshard_paged_resident_bytes") {
            assert!(
                r <= quarter as f64,
                "{extra:?}: resident {r} over the budget"
            );
        }
        let v: serde_json::Value = client::get(&addr, "/v1/cluster", timeout)
            .unwrap()
            .json()
            .unwrap();
        let paged: Vec<&serde_json::Value> = v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|h| h["stats"].get("paged").or_else(|| h.get("paged")))
            .collect();
        assert_eq!(paged.len(), hosts, "{extra:?}: {v}");
        for p in paged {
            assert_eq!(p["memory_budget_bytes"].as_u64(), Some(quarter), "{p}");
        }
    }
}
