//! Continuous batching: one plain thread owns the model and the expert backend and runs one
//! batched forward step after another over every running sequence.
//!
//! Each step admits waiting requests up to the sequence limit, then gives every decoding sequence
//! one token and the prefilling ones prompt chunks within a per-step token budget (so a long prompt
//! never stalls running decodes), and runs ONE [`Model::forward`] over all of them: every MoE layer
//! dispatches all sequences' rows together, so within a layer each worker gets one request. Every
//! sequence samples from its own logits with its own seeded [`Sampler`]; the forward pass computes
//! each row independently of the others, so a sequence's tokens do not depend on its batch.
//!
//! The planning of a step ([`plan_step`]) is a pure function; [`Core`] is the state machine that
//! a thread ([`run`]) drives, and that tests drive directly.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use moeshard_engine::sampling::{Sampler, SamplingParams};
use moeshard_engine::tokenizer::Tokenizer;
use moeshard_engine::{ExpertBackend, KvCache, Model, SeqStep, WantLogits};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::metrics::{Metrics, Outcome};
use super::text::{IncrementalDecoder, StopMatcher};

/// Events buffered per request between the scheduler and its HTTP handler. When the handler falls
/// behind, the scheduler merges further text into one pending event instead of blocking.
pub const EVENTS_PER_REQUEST: usize = 64;

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence token or stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the scheduler tells a request's handler.
#[derive(Debug, PartialEq)]
pub enum SeqEvent {
    /// New text (possibly empty while a character or a possible stop string is incomplete) and
    /// the tokens it came from.
    Text {
        /// Text to append to the output.
        text: String,
        /// Token ids generated since the last event.
        tokens: Vec<u32>,
    },
    /// The generation ended; no more events follow.
    Done {
        /// Why.
        finish: Finish,
        /// Prompt length.
        prompt_tokens: usize,
        /// Tokens generated (including an end-of-sequence token).
        completion_tokens: usize,
    },
    /// The generation failed (a forward step failed); no more events follow.
    Failed {
        /// What happened.
        message: String,
    },
}

/// A request as the scheduler takes it: already tokenized and checked against the limits.
#[derive(Debug)]
pub struct SeqRequest {
    /// Prompt token ids (at least one, each inside the vocabulary).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one; prompt plus this fits the context).
    pub max_tokens: usize,
    /// Sampling settings (each sequence has its own generator).
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Where events go; a closed receiver cancels the sequence.
    pub events: mpsc::Sender<SeqEvent>,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
}

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences computed at once.
    pub max_seqs: usize,
    /// Tokens in one forward step (decodes first, prompt chunks in what remains).
    pub max_batch_tokens: usize,
    /// Context per sequence (prompt plus output).
    pub max_context: usize,
}

/// What one running sequence needs from the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Prompt tokens still to prefill.
    Prefill(usize),
    /// One token to decode.
    Decode,
    /// Nothing (finished, waiting for its last events to be delivered).
    Idle,
}

/// Tokens each sequence gets in the next step: every decode gets one, then prompt chunks go in
/// arrival order within what is left of `budget` (at least one prompt token per step when any
/// prefill waits, so prefills always progress).
pub fn plan_step(needs: &[Need], budget: usize) -> Vec<usize> {
    let decodes = needs.iter().filter(|n| **n == Need::Decode).count();
    let mut left = budget.saturating_sub(decodes).max(1);
    needs
        .iter()
        .map(|n| match *n {
            Need::Decode => 1,
            Need::Prefill(remaining) => {
                let take = remaining.min(left);
                left -= take;
                take
            }
            Need::Idle => 0,
        })
        .collect()
}

/// Text and events not yet handed to the handler (its channel was full).
#[derive(Debug, Default)]
struct Outbox {
    text: String,
    tokens: Vec<u32>,
    last: Option<SeqEvent>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.tokens.is_empty() && self.last.is_none()
    }
}

struct Seq {
    req: SeqRequest,
    /// `None` once finished: the cache is freed at once.
    cache: Option<KvCache>,
    sampler: Sampler,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The token to feed next when decoding.
    next: [u32; 1],
    generated: usize,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    outbox: Outbox,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn need(&self) -> Need {
        match &self.cache {
            None => Need::Idle,
            Some(_) if self.fed < self.req.prompt.len() => {
                Need::Prefill(self.req.prompt.len() - self.fed)
            }
            Some(_) => Need::Decode,
        }
    }
}

/// The scheduler's state: the model, the backend and the running sequences.
pub struct Core {
    model: Model,
    backend: Box<dyn ExpertBackend>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    cfg: SchedulerConfig,
    running: Vec<Seq>,
    metrics: Arc<Metrics>,
}

impl Core {
    /// A scheduler over `model` and `backend`; `eos` are the end-of-sequence token ids.
    pub fn new(
        model: Model,
        backend: Box<dyn ExpertBackend>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Core {
            model,
            backend,
            tokenizer,
            eos,
            cfg,
            running: Vec::new(),
            metrics,
        }
    }

    /// True when another sequence can be admitted.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.cfg.max_seqs
    }

    /// True when no sequence is held at all.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// True when some sequence needs a forward step.
    pub fn has_work(&self) -> bool {
        self.running.iter().any(|s| s.need() != Need::Idle)
    }

    /// Sequences held (computing, or finished with events still to deliver).
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Takes a request in. One whose client is already gone is dropped here.
    pub fn admit(&mut self, req: SeqRequest) {
        if req.events.is_closed() {
            self.metrics.outcome(Outcome::Cancelled);
            return;
        }
        self.metrics
            .prompt_tokens
            .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        let cache = self.model.new_cache(self.cfg.max_context);
        let sampler = Sampler::new(req.sampling);
        let stops = StopMatcher::new(req.stop.clone());
        self.running.push(Seq {
            req,
            cache: Some(cache),
            sampler,
            fed: 0,
            next: [0],
            generated: 0,
            decoder: IncrementalDecoder::new(),
            stops,
            outbox: Outbox::default(),
            last_token_at: None,
        });
        self.update_gauges();
    }

    /// Runs one forward step over every sequence that needs one, samples, delivers events and
    /// lets go of finished and cancelled sequences.
    pub fn step(&mut self) {
        self.reap();
        let needs: Vec<Need> = self.running.iter().map(Seq::need).collect();
        let plan = plan_step(&needs, self.cfg.max_batch_tokens);
        let in_batch: Vec<usize> = (0..plan.len()).filter(|&i| plan[i] > 0).collect();
        if !in_batch.is_empty() {
            let started = Instant::now();
            let n_tokens: usize = plan.iter().sum();
            let result = self.forward(&plan);
            match result {
                Ok(logits) => {
                    self.metrics
                        .step_latency
                        .observe_duration(started.elapsed());
                    self.metrics.step_tokens.observe(n_tokens as f64);
                    self.metrics.step_sequences.observe(in_batch.len() as f64);
                    for (&i, l) in in_batch.iter().zip(logits) {
                        self.advance(i, plan[i], &l);
                    }
                }
                Err(message) => {
                    // The caches of the whole batch may hold a partial step: end them all.
                    warn!(sequences = in_batch.len(), "forward step failed: {message}");
                    self.metrics.step_failures.fetch_add(1, Ordering::Relaxed);
                    for &i in &in_batch {
                        self.fail(i, message.clone());
                    }
                }
            }
        }
        self.reap();
    }

    /// One batched forward step; returns the logits of each sequence in the batch (in order).
    fn forward(&mut self, plan: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let mut steps = Vec::with_capacity(plan.len());
        for (seq, &n) in self.running.iter_mut().zip(plan) {
            if n == 0 {
                continue;
            }
            let Seq {
                req,
                cache,
                fed,
                next,
                ..
            } = seq;
            let Some(cache) = cache.as_mut() else {
                continue;
            };
            let (tokens, want): (&[u32], WantLogits) = if *fed < req.prompt.len() {
                let end = (*fed + n).min(req.prompt.len());
                let want = if end == req.prompt.len() {
                    WantLogits::Last
                } else {
                    WantLogits::None
                };
                (&req.prompt[*fed..end], want)
            } else {
                (&next[..], WantLogits::Last)
            };
            steps.push(SeqStep {
                tokens,
                cache,
                want,
            });
        }
        let (model, backend) = (&self.model, self.backend.as_ref());
        // A panic in the forward pass is a bug, but it must not take the server down with it.
        match catch_unwind(AssertUnwindSafe(|| model.forward(&mut steps, backend))) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("internal error in the forward pass".into()),
        }
    }

    /// Applies one step's result to sequence `i`, which was given `n` tokens.
    fn advance(&mut self, i: usize, n: usize, logits: &[f32]) {
        let now = Instant::now();
        let eos = &self.eos;
        let tokenizer = &self.tokenizer;
        let metrics = &self.metrics;
        let Some(seq) = self.running.get_mut(i) else {
            return;
        };
        if seq.fed < seq.req.prompt.len() {
            seq.fed = (seq.fed + n).min(seq.req.prompt.len());
            if seq.fed < seq.req.prompt.len() {
                return;
            }
        }
        if logits.is_empty() {
            return;
        }
        let tok = seq.sampler.sample(logits);
        seq.generated += 1;
        metrics.generated();
        match seq.last_token_at {
            None => metrics
                .time_to_first_token
                .observe_duration(now.saturating_duration_since(seq.req.arrived)),
            Some(t) => metrics
                .inter_token_latency
                .observe_duration(now.saturating_duration_since(t)),
        }
        seq.last_token_at = Some(now);
        let mut finish = None;
        if !seq.req.ignore_eos && eos.contains(&tok) {
            finish = Some(Finish::Stop);
        } else {
            seq.outbox.tokens.push(tok);
            let piece = match seq.decoder.push(tok, |ids| tokenizer.decode(ids)) {
                Ok(p) => p,
                Err(e) => {
                    let message = format!("cannot decode token {tok}: {e}");
                    self.fail(i, message);
                    return;
                }
            };
            let (text, stopped) = seq.stops.push(&piece);
            seq.outbox.text.push_str(&text);
            if stopped {
                finish = Some(Finish::Stop);
            }
        }
        let cache_full = seq.cache.as_ref().is_none_or(|c| c.len() + 1 > c.max_len());
        if finish.is_none() && (seq.generated >= seq.req.max_tokens || cache_full) {
            finish = Some(Finish::Length);
        }
        match finish {
            Some(f) => {
                if f == Finish::Length {
                    let rest = seq.stops.flush();
                    seq.outbox.text.push_str(&rest);
                }
                seq.outbox.last = Some(SeqEvent::Done {
                    finish: f,
                    prompt_tokens: seq.req.prompt.len(),
                    completion_tokens: seq.generated,
                });
                seq.cache = None;
                metrics
                    .request_latency
                    .observe_duration(now.saturating_duration_since(seq.req.arrived));
                metrics.outcome(match f {
                    Finish::Stop => Outcome::Stop,
                    Finish::Length => Outcome::Length,
                });
            }
            None => seq.next = [tok],
        }
    }

    /// Ends sequence `i` with an error.
    fn fail(&mut self, i: usize, message: String) {
        if let Some(seq) = self.running.get_mut(i) {
            seq.cache = None;
            seq.outbox.text.clear();
            seq.outbox.tokens.clear();
            seq.outbox.last = Some(SeqEvent::Failed { message });
            self.metrics.outcome(Outcome::Error);
        }
    }

    /// Delivers pending events; drops sequences whose client is gone or that are done.
    fn reap(&mut self) {
        let metrics = &self.metrics;
        self.running.retain_mut(|seq| {
            if seq.req.events.is_closed() {
                if seq.cache.is_some() {
                    debug!("client went away: cancelling its sequence");
                    metrics.outcome(Outcome::Cancelled);
                }
                return false;
            }
            flush(seq);
            // Keep it while it computes or has something left to deliver.
            seq.cache.is_some() || !seq.outbox.is_empty()
        });
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let computing = self.running.iter().filter(|s| s.cache.is_some()).count();
        let kv: usize = self
            .running
            .iter()
            .filter_map(|s| s.cache.as_ref())
            .map(KvCache::bytes)
            .sum();
        self.metrics
            .running
            .store(computing as i64, Ordering::Relaxed);
        self.metrics
            .kv_cache_bytes
            .store(kv as i64, Ordering::Relaxed);
    }
}

/// Hands the outbox to the handler as far as its channel has room.
fn flush(seq: &mut Seq) {
    let ob = &mut seq.outbox;
    if !ob.text.is_empty() || !ob.tokens.is_empty() {
        let ev = SeqEvent::Text {
            text: std::mem::take(&mut ob.text),
            tokens: std::mem::take(&mut ob.tokens),
        };
        match seq.req.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(SeqEvent::Text { text, tokens })) => {
                ob.text = text;
                ob.tokens = tokens;
                return;
            }
            Err(_) => return,
        }
    }
    if let Some(ev) = ob.last.take() {
        match seq.req.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => ob.last = Some(ev),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// The scheduler thread's loop: admits from `queue` while there is room, steps while there is
/// work, and returns once the queue is closed and every sequence has ended.
pub fn run(mut core: Core, queue: Receiver<SeqRequest>, metrics: Arc<Metrics>) {
    let mut open = true;
    loop {
        while open && core.has_room() {
            let got = if core.is_empty() {
                match queue.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                match queue.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            };
            match got {
                Some(req) => {
                    metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                    core.admit(req);
                }
                None => break,
            }
        }
        if !open && core.is_empty() {
            return;
        }
        if core.has_work() {
            core.step();
        } else if !core.is_empty() {
            // Only undelivered events are left: give the handlers a moment to drain.
            std::thread::sleep(Duration::from_millis(2));
            core.step();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshard_engine::LocalExperts;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe_tiny")
    }

    fn core(max_seqs: usize, budget: usize) -> (Core, Arc<Metrics>) {
        let dir = fixture();
        let (model, ckpt) = Model::load(&dir).expect("fixture model");
        let experts = LocalExperts::load_all(&model.cfg, &ckpt).expect("fixture experts");
        let tok = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let metrics = Arc::new(Metrics::new(3, &[0, 2], 5));
        let eos = model.cfg.eos_token_ids.clone();
        let cfg = SchedulerConfig {
            max_seqs,
            max_batch_tokens: budget,
            max_context: 512,
        };
        let c = Core::new(
            model,
            Box::new(experts),
            Arc::new(tok),
            eos,
            cfg,
            Arc::clone(&metrics),
        );
        (c, metrics)
    }

    fn request(prompt: Vec<u32>, max_tokens: usize) -> (SeqRequest, mpsc::Receiver<SeqEvent>) {
        let (tx, rx) = mpsc::channel(EVENTS_PER_REQUEST);
        let req = SeqRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: true,
            events: tx,
            arrived: Instant::now(),
        };
        (req, rx)
    }

    /// Drains a receiver: the token ids and how it ended.
    fn drain(rx: &mut mpsc::Receiver<SeqEvent>, out: &mut Vec<u32>) -> Option<Finish> {
        while let Ok(ev) = rx.try_recv() {
            match ev {
                SeqEvent::Text { tokens, .. } => out.extend(tokens),
                SeqEvent::Done { finish, .. } => return Some(finish),
                SeqEvent::Failed { message } => panic!("failed: {message}"),
            }
        }
        None
    }

    fn prompts() -> Vec<Vec<u32>> {
        (0..16u32)
            .map(|i| {
                (0..(3 + 17 * i as usize % 40))
                    .map(|j| (i * 31 + j as u32 * 7) % 480 + 3)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn batched_tokens_equal_tokens_alone() {
        let (mut c, _) = core(16, 24);
        let mut rxs = Vec::new();
        for p in prompts() {
            let (req, rx) = request(p, 12);
            c.admit(req);
            rxs.push(rx);
        }
        let mut batched = vec![Vec::new(); rxs.len()];
        let mut done = vec![false; rxs.len()];
        for _ in 0..1000 {
            c.step();
            for (i, rx) in rxs.iter_mut().enumerate() {
                if drain(rx, &mut batched[i]).is_some() {
                    done[i] = true;
                }
            }
            if c.is_empty() {
                break;
            }
        }
        assert!(done.iter().all(|d| *d), "every sequence finished");
        for (i, p) in prompts().into_iter().enumerate() {
            let (mut c1, _) = core(1, 256);
            let (req, mut rx) = request(p, 12);
            c1.admit(req);
            let mut alone = Vec::new();
            while !c1.is_empty() {
                c1.step();
                drain(&mut rx, &mut alone);
            }
            assert_eq!(alone.len(), 12);
            assert_eq!(batched[i], alone, "sequence {i}");
        }
    }

    #[test]
    fn a_dropped_receiver_frees_the_sequence() {
        let (mut c, metrics) = core(4, 64);
        let (req, rx) = request(vec![5; 40], 400);
        c.admit(req);
        let (req2, mut rx2) = request(vec![6; 10], 3);
        c.admit(req2);
        c.step();
        assert!(metrics.kv_cache_bytes.load(Ordering::Relaxed) > 0);
        drop(rx);
        c.step();
        assert_eq!(metrics.outcome_count(Outcome::Cancelled), 1);
        let mut toks = Vec::new();
        while !c.is_empty() {
            c.step();
            drain(&mut rx2, &mut toks);
        }
        assert_eq!(toks.len(), 3);
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.kv_cache_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slow_reader_gets_merged_text_and_the_end() {
        let (mut c, _) = core(1, 64);
        let (tx, mut rx) = mpsc::channel(2);
        c.admit(SeqRequest {
            prompt: vec![7; 5],
            max_tokens: 30,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: true,
            events: tx,
            arrived: Instant::now(),
        });
        for _ in 0..100 {
            c.step();
        }
        let mut toks = Vec::new();
        let mut finish = None;
        while finish.is_none() {
            finish = drain(&mut rx, &mut toks);
            c.step();
        }
        assert_eq!(finish, Some(Finish::Length));
        assert_eq!(toks.len(), 30);
        assert!(c.is_empty());
    }

    #[test]
    fn plan_table() {
        use Need::*;
        let cases: &[(&[Need], usize, &[usize])] = &[
            (&[], 8, &[]),
            (&[Decode, Decode], 8, &[1, 1]),
            (&[Prefill(100)], 8, &[8]),
            (&[Decode, Prefill(100), Decode], 8, &[1, 6, 1]),
            (&[Prefill(3), Prefill(10), Decode], 8, &[3, 4, 1]),
            (&[Prefill(3), Idle, Prefill(2)], 8, &[3, 0, 2]),
            // Decodes beyond the budget still run, and a prefill still progresses by one token.
            (&[Decode, Decode, Decode, Prefill(5)], 2, &[1, 1, 1, 1]),
            (&[Idle, Idle], 4, &[0, 0]),
        ];
        for (needs, budget, want) in cases {
            assert_eq!(
                plan_step(needs, *budget),
                *want,
                "{needs:?} budget {budget}"
            );
        }
    }
}
