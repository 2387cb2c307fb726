//! `moeshard bench-serve`: drives a running `moeshard serve` with N concurrent streams (one thread
//! each, streamed completions of a fixed length) and reports the aggregate generated tokens/s and
//! the time to first token at each concurrency.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use moeshard_coordinator::serve::client;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Args)]
pub(crate) struct BenchServeArgs {
    /// The server, `http://host:port` or `host:port`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    url: String,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests each stream sends one after another.
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    /// Tokens generated per request (end-of-sequence is ignored so every request has this many).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Words in each prompt.
    #[arg(long, default_value_t = 32)]
    prompt_words: usize,
    /// API key, if the server wants one.
    #[arg(long)]
    api_key: Option<String>,
    /// Model name (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// Print one JSON object per concurrency instead of a table.
    #[arg(long)]
    json: bool,
}

/// One request's measurements.
struct Sample {
    ttft: Duration,
    tokens: usize,
}

/// The figures of one concurrency level.
#[derive(Serialize, Debug)]
struct Level {
    streams: usize,
    requests: usize,
    generated_tokens: usize,
    wall_s: f64,
    aggregate_tok_s: f64,
    per_stream_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    ratio_to_one_stream: Option<f64>,
}

fn addr_of(url: &str) -> String {
    let s = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .trim_end_matches("/v1");
    s.to_string()
}

fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Words of a prompt that differ per stream and request, so no two prompts are the same.
fn prompt(words: usize, stream: usize, req: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "cluster", "expert", "token", "layer", "router", "batch", "model", "stream",
        "worker", "cache", "mixture", "quick", "brown", "fox", "jumps",
    ];
    (0..words)
        .map(|i| WORDS[(i * 7 + stream * 3 + req * 5) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn one_request(
    addr: &str,
    headers: &[(&str, &str)],
    body: &Value,
    timeout: Duration,
) -> Result<Sample> {
    let started = Instant::now();
    let resp = client::post_json(addr, "/v1/completions", headers, body, timeout)?;
    if resp.status != 200 {
        let status = resp.status;
        let text = resp.text().unwrap_or_default();
        bail!("the server answered {status}: {text}");
    }
    let mut events = resp.events();
    let mut ttft = None;
    let mut tokens = None;
    while let Some(data) = events.next_data()? {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).context("a chunk is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!("the stream failed: {e}");
        }
        if ttft.is_none() && v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
            ttft = Some(started.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    Ok(Sample {
        ttft: ttft.ok_or_else(|| anyhow!("the stream had no chunk"))?,
        tokens: tokens.ok_or_else(|| anyhow!("the stream had no usage chunk"))?,
    })
}

fn level(a: &BenchServeArgs, addr: &str, model: &str, streams: usize) -> Result<Level> {
    let auth = a.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let started = Instant::now();
    let results: Vec<Result<Vec<Sample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|stream| {
                let auth = auth.clone();
                s.spawn(move || -> Result<Vec<Sample>> {
                    let headers: Vec<(&str, &str)> = auth
                        .as_deref()
                        .map(|v| vec![("Authorization", v)])
                        .unwrap_or_default();
                    let mut out = Vec::new();
                    for req in 0..a.requests_per_stream {
                        let body = json!({
                            "model": model,
                            "prompt": prompt(a.prompt_words, stream, req),
                            "max_tokens": a.max_tokens,
                            "temperature": 0,
                            "ignore_eos": true,
                            "stream": true,
                            "stream_options": {"include_usage": true},
                        });
                        out.push(one_request(
                            addr,
                            &headers,
                            &body,
                            Duration::from_secs(600),
                        )?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a stream thread panicked")))
            })
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for r in results {
        samples.extend(r?);
    }
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    ttft.sort_unstable();
    Ok(Level {
        streams,
        requests: samples.len(),
        generated_tokens: tokens,
        wall_s: wall,
        aggregate_tok_s: tokens as f64 / wall,
        per_stream_tok_s: tokens as f64 / wall / streams as f64,
        ttft_p50_ms: quantile_ms(&ttft, 0.5),
        ttft_p99_ms: quantile_ms(&ttft, 0.99),
        ratio_to_one_stream: None,
    })
}

/// `moeshard bench-serve`.
pub(crate) fn cmd_bench_serve(a: BenchServeArgs) -> Result<()> {
    if a.concurrency.is_empty() || a.concurrency.contains(&0) {
        bail!("--concurrency needs positive numbers");
    }
    if a.concurrency.iter().any(|&c| c > 256) {
        bail!("--concurrency is limited to 256 streams");
    }
    let addr = addr_of(&a.url);
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let auth = a.api_key.as_ref().map(|k| format!("Bearer {k}"));
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|v| vec![("Authorization", v)])
                .unwrap_or_default();
            let v = client::request(
                &addr,
                "GET",
                "/v1/models",
                &headers,
                None,
                Duration::from_secs(30),
            )
            .with_context(|| format!("asking {addr} for its models"))?
            .json()?;
            v["data"][0]["id"]
                .as_str()
                .ok_or_else(|| anyhow!("the server lists no model: {v}"))?
                .to_string()
        }
    };
    // Warm up: the first request pages weights in and fills the allocator's pools.
    let warm = BenchServeArgs {
        requests_per_stream: 1,
        max_tokens: a.max_tokens.min(8),
        api_key: a.api_key.clone(),
        model: None,
        url: a.url.clone(),
        concurrency: Vec::new(),
        prompt_words: a.prompt_words,
        json: a.json,
    };
    level(&warm, &addr, &model, 1).context("warming up")?;
    let mut levels = Vec::new();
    let mut base = None;
    for &c in &a.concurrency {
        let mut l = level(&a, &addr, &model, c)?;
        if c == 1 {
            base = Some(l.aggregate_tok_s);
        }
        l.ratio_to_one_stream = base.map(|b| l.aggregate_tok_s / b);
        if a.json {
            println!("{}", serde_json::to_string(&l)?);
        }
        levels.push(l);
    }
    if !a.json {
        println!(
            "{:>7}  {:>8}  {:>10}  {:>9}  {:>12}  {:>12}  {:>12}  {:>7}",
            "streams",
            "requests",
            "gen tokens",
            "wall s",
            "agg tok/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "ratio"
        );
        for l in &levels {
            println!(
                "{:>7}  {:>8}  {:>10}  {:>9.2}  {:>12.1}  {:>12.1}  {:>12.1}  {:>7}",
                l.streams,
                l.requests,
                l.generated_tokens,
                l.wall_s,
                l.aggregate_tok_s,
                l.ttft_p50_ms,
                l.ttft_p99_ms,
                l.ratio_to_one_stream
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(())
}
