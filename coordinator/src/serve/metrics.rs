//! The server's metrics, rendered in the Prometheus text format (a small fixed registry: every
//! series is known up front, so scraping never allocates per label set it has not seen).
//!
//! Also [`RoutedBackend`], the expert backend wrapper that counts every `(layer, expert)` row the
//! forward pass routes and times each MoE layer's dispatch-to-wait round trip.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moeshard_engine::{ExpertBackend, ExpertRow, PendingExperts};
use serde::Serialize;

/// Finished requests the cluster page lists.
pub const RECENT_REQUESTS: usize = 32;
/// Seconds of generated tokens the tokens/s figure averages over.
const RATE_WINDOW_SECS: u64 = 10;
const RATE_SLOTS: usize = 16;

/// One finished request, as the cluster page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct RecentRequest {
    /// The response id (`chatcmpl-...`, `cmpl-...`).
    pub id: String,
    /// `chat_completions` or `completions`.
    pub endpoint: &'static str,
    /// Streamed as server-sent events.
    pub stream: bool,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// `stop`, `length` or `error`.
    pub finish: &'static str,
    /// From arrival to the last token, milliseconds.
    pub duration_ms: f64,
    /// From arrival to the first token, milliseconds (`None`: no token came).
    pub ttft_ms: Option<f64>,
    /// When it ended, Unix milliseconds.
    pub ended_unix_ms: u64,
}

/// Generated tokens per second of a monotonic clock, in a small ring of one-second slots.
#[derive(Debug)]
struct RateWindow {
    started: Instant,
    slots: [(u64, u64); RATE_SLOTS],
}

impl RateWindow {
    fn new() -> Self {
        RateWindow {
            started: Instant::now(),
            slots: [(u64::MAX, 0); RATE_SLOTS],
        }
    }

    fn add(&mut self, now: Instant, n: u64) {
        let sec = now.saturating_duration_since(self.started).as_secs();
        let slot = &mut self.slots[(sec % RATE_SLOTS as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += n;
    }

    /// Tokens per second over the last [`RATE_WINDOW_SECS`] (fewer right after start).
    fn per_second(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.started);
        let sec = elapsed.as_secs();
        let first = sec.saturating_sub(RATE_WINDOW_SECS - 1);
        let tokens: u64 = self
            .slots
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s >= first && *s <= sec)
            .map(|(_, n)| n)
            .sum();
        let span = elapsed.as_secs_f64() - first as f64;
        if span <= 0.0 {
            0.0
        } else {
            tokens as f64 / span.max(1.0)
        }
    }
}

/// Latency buckets in seconds, from sub-millisecond decode steps to minute-long prefills.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Buckets of tokens per forward step.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in nanounits (1e-9 of the observed unit) so it can stay an atomic integer.
    sum_nano: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nano: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nano = (v.max(0.0) * 1e9).min(u64::MAX as f64) as u64;
        self.sum_nano.fetch_add(nano, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_nano.load(Ordering::Relaxed) as f64 * 1e-9;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// How a request ended, for `moeshard_request_outcomes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The client went away before the end.
    Cancelled,
    /// A forward step failed.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

/// Every metric the server keeps.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    outcomes: Mutex<BTreeMap<Outcome, u64>>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Submission to first generated token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of one sequence.
    pub inter_token_latency: Histogram,
    /// Submission to last token.
    pub request_latency: Histogram,
    /// One batched forward step.
    pub step_latency: Histogram,
    /// Tokens in one forward step.
    pub step_tokens: Histogram,
    /// Sequences in one forward step.
    pub step_sequences: Histogram,
    /// Sequences being computed (prefilling or decoding).
    pub running: AtomicI64,
    /// Requests accepted but not yet admitted.
    pub waiting: AtomicI64,
    /// Bytes of the running sequences' KV caches.
    pub kv_cache_bytes: AtomicI64,
    /// Forward steps that failed.
    pub step_failures: AtomicU64,
    moe_layers: Vec<usize>,
    num_experts: usize,
    /// Per MoE layer (indexed like `moe_layers`): dispatch-to-wait round trip.
    dispatch: Vec<Histogram>,
    /// `routed[i * num_experts + e]`: rows routed to expert `e` of MoE layer `moe_layers[i]`.
    routed: Vec<AtomicU64>,
    layer_index: Vec<Option<usize>>,
    recent: Mutex<VecDeque<RecentRequest>>,
    rate: Mutex<RateWindow>,
}

impl Metrics {
    /// An empty registry for a model with these MoE layers (indices) and experts per layer.
    pub fn new(num_layers: usize, moe_layers: &[usize], num_experts: usize) -> Self {
        let mut layer_index = vec![None; num_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            if let Some(slot) = layer_index.get_mut(l) {
                *slot = Some(i);
            }
        }
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            outcomes: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            request_latency: Histogram::new(LATENCY_BUCKETS),
            step_latency: Histogram::new(LATENCY_BUCKETS),
            step_tokens: Histogram::new(BATCH_BUCKETS),
            step_sequences: Histogram::new(BATCH_BUCKETS),
            running: AtomicI64::new(0),
            waiting: AtomicI64::new(0),
            kv_cache_bytes: AtomicI64::new(0),
            step_failures: AtomicU64::new(0),
            moe_layers: moe_layers.to_vec(),
            num_experts,
            dispatch: moe_layers
                .iter()
                .map(|_| Histogram::new(LATENCY_BUCKETS))
                .collect(),
            routed: (0..moe_layers.len() * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            layer_index,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_REQUESTS)),
            rate: Mutex::new(RateWindow::new()),
        }
    }

    /// Counts one generated token (the total and the tokens/s window).
    pub fn generated(&self) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(Instant::now(), 1);
    }

    /// Generated tokens per second over the last ten seconds.
    pub fn tokens_per_second(&self) -> f64 {
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .per_second(Instant::now())
    }

    /// Remembers a finished request (the oldest of [`RECENT_REQUESTS`] is forgotten).
    pub fn finished(&self, r: RecentRequest) {
        let mut q = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == RECENT_REQUESTS {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// The requests that ended last, newest first.
    pub fn recent(&self) -> Vec<RecentRequest> {
        let q = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().rev().cloned().collect()
    }

    /// The MoE layers (indices) and the experts per layer the counts cover.
    pub fn routing_shape(&self) -> (&[usize], usize) {
        (&self.moe_layers, self.num_experts)
    }

    /// Rows routed to every expert, one row of `num_experts` counts per MoE layer.
    pub fn routed_table(&self) -> Vec<Vec<u64>> {
        (0..self.moe_layers.len())
            .map(|i| {
                self.routed[i * self.num_experts..(i + 1) * self.num_experts]
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect()
            })
            .collect()
    }

    /// Counts one HTTP answer.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint, status)).or_default() += 1;
    }

    /// Counts how one generation ended.
    pub fn outcome(&self, o: Outcome) {
        let mut m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(o).or_default() += 1;
    }

    /// How many generations ended this way so far.
    pub fn outcome_count(&self, o: Outcome) -> u64 {
        let m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&o).copied().unwrap_or(0)
    }

    /// Counts the rows of one MoE layer's dispatch.
    pub fn route(&self, layer: usize, rows: &[ExpertRow]) {
        let Some(Some(i)) = self.layer_index.get(layer) else {
            return;
        };
        let base = i * self.num_experts;
        for r in rows {
            if let Some(c) = self.routed.get(base + r.expert as usize)
                && (r.expert as usize) < self.num_experts
            {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Rows routed so far to `(layer, expert)`.
    pub fn routed(&self, layer: usize, expert: usize) -> u64 {
        match self.layer_index.get(layer) {
            Some(Some(i)) if expert < self.num_experts => {
                self.routed[i * self.num_experts + expert].load(Ordering::Relaxed)
            }
            _ => 0,
        }
    }

    /// Records one MoE layer's round trip.
    pub fn dispatched(&self, layer: usize, d: Duration) {
        if let Some(Some(i)) = self.layer_index.get(layer) {
            self.dispatch[*i].observe_duration(d);
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "moeshard_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status code.",
        );
        {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            for ((ep, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "moeshard_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
                );
            }
        }
        head(
            &mut out,
            "moeshard_request_outcomes_total",
            "counter",
            "Generations by how they ended (stop, length, cancelled by the client, error).",
        );
        {
            let m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            for o in [
                Outcome::Stop,
                Outcome::Length,
                Outcome::Cancelled,
                Outcome::Error,
            ] {
                let n = m.get(&o).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "moeshard_request_outcomes_total{{finish=\"{}\"}} {n}",
                    o.label()
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            head(out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            head(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            &mut out,
            "moeshard_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "moeshard_generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "moeshard_forward_step_failures_total",
            "Forward steps that failed (their sequences were ended with an error).",
            self.step_failures.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "moeshard_running_sequences",
            "Sequences being prefilled or decoded.",
            self.running.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "moeshard_waiting_sequences",
            "Requests queued for a free sequence slot.",
            self.waiting.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "moeshard_kv_cache_bytes",
            "Bytes held by the running sequences' key/value caches.",
            self.kv_cache_bytes.load(Ordering::Relaxed),
        );
        let histograms: [(&str, &str, &Histogram); 6] = [
            (
                "moeshard_time_to_first_token_seconds",
                "From the request's arrival to its first generated token.",
                &self.time_to_first_token,
            ),
            (
                "moeshard_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence.",
                &self.inter_token_latency,
            ),
            (
                "moeshard_request_duration_seconds",
                "From the request's arrival to its last token.",
                &self.request_latency,
            ),
            (
                "moeshard_forward_step_seconds",
                "One batched forward step over all running sequences.",
                &self.step_latency,
            ),
            (
                "moeshard_forward_step_tokens",
                "Tokens (decode plus prefill chunks) in one forward step.",
                &self.step_tokens,
            ),
            (
                "moeshard_forward_step_sequences",
                "Sequences in one forward step (the batch size).",
                &self.step_sequences,
            ),
        ];
        for (name, help, h) in histograms {
            head(&mut out, name, "histogram", help);
            h.render(&mut out, name, "");
        }
        head(
            &mut out,
            "moeshard_moe_dispatch_seconds",
            "histogram",
            "Round trip of one MoE layer's routed experts, from dispatch to the last output, by layer.",
        );
        for (&l, h) in self.moe_layers.iter().zip(&self.dispatch) {
            h.render(
                &mut out,
                "moeshard_moe_dispatch_seconds",
                &format!("layer=\"{l}\""),
            );
        }
        head(
            &mut out,
            "moeshard_expert_routed_tokens_total",
            "counter",
            "Token rows the router sent to each expert, by layer and expert.",
        );
        for (i, &l) in self.moe_layers.iter().enumerate() {
            for e in 0..self.num_experts {
                let n = self.routed[i * self.num_experts + e].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "moeshard_expert_routed_tokens_total{{layer=\"{l}\",expert=\"{e}\"}} {n}"
                );
            }
        }
        out
    }
}

/// An expert backend that counts routing decisions and times round trips, then defers to the
/// backend it wraps. Every routed row of the forward pass goes through `dispatch`, so the counts
/// are exact without touching the engine.
pub struct RoutedBackend {
    inner: Box<dyn ExpertBackend>,
    metrics: std::sync::Arc<Metrics>,
}

impl RoutedBackend {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn ExpertBackend>, metrics: std::sync::Arc<Metrics>) -> Self {
        RoutedBackend { inner, metrics }
    }
}

struct TimedPending<'a> {
    inner: Box<dyn PendingExperts + 'a>,
    layer: usize,
    started: Instant,
    metrics: &'a Metrics,
}

impl PendingExperts for TimedPending<'_> {
    fn wait(self: Box<Self>) -> moeshard_engine::Result<Vec<f32>> {
        let out = self.inner.wait();
        if out.is_ok() {
            self.metrics.dispatched(self.layer, self.started.elapsed());
        }
        out
    }
}

impl ExpertBackend for RoutedBackend {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> moeshard_engine::Result<Box<dyn PendingExperts + 'a>> {
        self.metrics.route(layer, rows);
        let started = Instant::now();
        let inner = self.inner.dispatch(layer, hidden, rows)?;
        Ok(Box::new(TimedPending {
            inner,
            layer,
            started,
            metrics: &self.metrics,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(7.0);
        let mut s = String::new();
        h.render(&mut s, "x", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"2\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count{a=\"b\"} 3\n"), "{s}");
        assert!(s.contains("x_sum{a=\"b\"} 9\n"), "{s}");
    }

    #[test]
    fn routing_counts_only_known_layers_and_experts() {
        let m = Metrics::new(3, &[0, 2], 4);
        let row = |expert| ExpertRow {
            token: 0,
            expert,
            weight: 1.0,
        };
        m.route(2, &[row(1), row(1), row(3), row(9)]);
        m.route(1, &[row(0)]);
        m.route(7, &[row(0)]);
        assert_eq!(m.routed(2, 1), 2);
        assert_eq!(m.routed(2, 3), 1);
        assert_eq!(m.routed(0, 0), 0);
        let text = m.render();
        assert!(text.contains("moeshard_expert_routed_tokens_total{layer=\"2\",expert=\"1\"} 2"));
        assert!(!text.contains("layer=\"1\""));
        assert_eq!(m.routed_table(), vec![vec![0, 0, 0, 0], vec![0, 2, 0, 1]]);
    }

    #[test]
    fn token_rate_covers_the_last_seconds_only() {
        let mut w = RateWindow::new();
        let t0 = w.started;
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        w.add(at(0.5), 10);
        w.add(at(1.5), 10);
        // Two seconds in: 20 tokens over 2 s.
        assert!((w.per_second(at(2.0)) - 10.0).abs() < 1e-9);
        w.add(at(12.2), 30);
        // The first two slots left the window (seconds 4..=13 remain): 30 tokens over 9 s.
        let r = w.per_second(at(13.0));
        assert!((r - 30.0 / 9.0).abs() < 1e-9, "{r}");
        // A slot reused by a later second starts from zero.
        w.add(at(16.5), 5);
        w.add(at(0.5 + 16.0 * 2.0), 1);
        let r = w.per_second(at(32.9));
        assert!((r - 1.0 / 9.9).abs() < 1e-9, "{r}");
    }

    #[test]
    fn recent_requests_are_bounded_and_newest_first() {
        let m = Metrics::new(1, &[0], 2);
        for i in 0..RECENT_REQUESTS + 5 {
            m.finished(RecentRequest {
                id: format!("r{i}"),
                endpoint: "completions",
                stream: false,
                prompt_tokens: 1,
                completion_tokens: 1,
                finish: "stop",
                duration_ms: 1.0,
                ttft_ms: None,
                ended_unix_ms: 0,
            });
        }
        let r = m.recent();
        assert_eq!(r.len(), RECENT_REQUESTS);
        assert_eq!(r[0].id, format!("r{}", RECENT_REQUESTS + 4));
        assert_eq!(r[RECENT_REQUESTS - 1].id, "r5");
    }
}
