//! The axum routes: authentication, the two generation endpoints (JSON or server-sent events),
//! models, health, metrics and the cluster view.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use moeshard_engine::tokenizer::Tokenizer;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

use super::api::{
    ApiError, ChatRequest, CompletionRequest, Generation, ModelCard, PromptInput, Usage, parse_body,
};
use super::cluster_view::ClusterView;
use super::metrics::{Metrics, RecentRequest};
use super::scheduler::{EVENTS_PER_REQUEST, Finish, SeqEvent, SeqRequest};

/// State shared by the handlers.
pub(crate) struct App {
    pub served_model_name: String,
    pub api_keys: Vec<String>,
    pub max_context: usize,
    pub vocab: usize,
    pub tokenizer: Arc<Tokenizer>,
    pub queue: SyncSender<SeqRequest>,
    pub metrics: Arc<Metrics>,
    pub cluster: Arc<dyn ClusterView>,
    pub scheduler_alive: Arc<AtomicBool>,
    pub created: u64,
    pub started: Instant,
    pub next_id: AtomicU64,
}

type AppState = State<Arc<App>>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

pub(crate) fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/cluster", get(cluster))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ));
    Router::new()
        .merge(v1)
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), count))
        .layer(DefaultBodyLimit::max(super::MAX_BODY_BYTES))
        .with_state(app)
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/v1/cluster" => "cluster",
        "/health" => "health",
        "/metrics" => "metrics",
        "/" => "page",
        p if p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

async fn count(State(app): AppState, req: Request, next: Next) -> Response {
    let ep = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    app.metrics.request(ep, resp.status().as_u16());
    resp
}

/// Compares without an early exit, so the time taken does not tell how much of a key matched.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

async fn authenticate(State(app): AppState, req: Request, next: Next) -> Response {
    if app.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let err = |message: &str| ApiError {
        status: 401,
        message: message.into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    };
    match given {
        None => err("missing API key: send it as 'Authorization: Bearer KEY'").into_response(),
        Some(k)
            if app
                .api_keys
                .iter()
                .any(|key| same_key(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => err("incorrect API key provided").into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    ApiError {
        status: 404,
        message: format!("no route for {} {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
    .into_response()
}

/// The cluster page: one self-contained file (no external scripts, styles or fonts) that polls
/// `/v1/cluster`.
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src data:",
                ),
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn health(State(app): AppState) -> Response {
    if app.scheduler_alive.load(Ordering::Relaxed) {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "scheduler stopped"})),
        )
            .into_response()
    }
}

async fn metrics(State(app): AppState) -> Response {
    let mut text = app.metrics.render();
    // Paged experts (--memory-budget) of every host that pages, from the cluster view.
    let view = Arc::clone(&app.cluster);
    if let Ok(snapshot) = tokio::task::spawn_blocking(move || view.snapshot()).await {
        text.push_str(&paged_metrics(&snapshot.hosts));
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// `moeshard_paged_*` gauges and counters of the hosts whose stats carry a `paged` object.
fn paged_metrics(hosts: &[super::cluster_view::HostStatus]) -> String {
    use std::fmt::Write;
    const FIELDS: [(&str, &str, &str, &str); 7] = [
        (
            "memory_budget_bytes",
            "moeshard_paged_memory_budget_bytes",
            "gauge",
            "Bytes of expert weights a host keeps resident at most (--memory-budget).",
        ),
        (
            "resident_bytes",
            "moeshard_paged_resident_bytes",
            "gauge",
            "Bytes of expert buffers a paging host holds now.",
        ),
        (
            "hits",
            "moeshard_paged_hits_total",
            "counter",
            "Expert uses found resident.",
        ),
        (
            "misses",
            "moeshard_paged_misses_total",
            "counter",
            "Expert uses that waited for a read from disk.",
        ),
        (
            "hit_rate",
            "moeshard_paged_hit_rate",
            "gauge",
            "Share of expert uses found resident since start.",
        ),
        (
            "disk_bytes",
            "moeshard_paged_disk_read_bytes_total",
            "counter",
            "Bytes of expert weights read from disk (divide by moeshard_generation_tokens_total for bytes per token).",
        ),
        (
            "stall_us",
            "moeshard_paged_stall_microseconds_total",
            "counter",
            "Microseconds batches waited for expert reads.",
        ),
    ];
    let paged: Vec<(&str, &serde_json::Value)> = hosts
        .iter()
        .filter_map(|h| {
            let p = h.stats.as_ref()?.get("paged")?;
            (!p.is_null()).then_some((h.name.as_str(), p))
        })
        .collect();
    let mut out = String::new();
    if paged.is_empty() {
        return out;
    }
    for (key, name, kind, help) in FIELDS {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (host, p) in &paged {
            if let Some(v) = p.get(key).and_then(serde_json::Value::as_f64) {
                let _ = writeln!(out, "{name}{{host=\"{host}\"}} {v}");
            }
        }
    }
    out
}

fn model_card(app: &App) -> ModelCard {
    ModelCard {
        id: app.served_model_name.clone(),
        object: "model",
        created: app.created,
        owned_by: "moeshard",
        max_model_len: app.max_context,
    }
}

async fn list_models(State(app): AppState) -> Response {
    axum::Json(json!({"object": "list", "data": [model_card(&app)]})).into_response()
}

fn unknown_model(name: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!("the model `{name}` does not exist"),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

async fn get_model(State(app): AppState, Path(model): Path<String>) -> Response {
    if model == app.served_model_name {
        axum::Json(model_card(&app)).into_response()
    } else {
        unknown_model(&model).into_response()
    }
}

async fn cluster(State(app): AppState) -> Response {
    let view = Arc::clone(&app.cluster);
    let snapshot = match tokio::task::spawn_blocking(move || view.snapshot()).await {
        Ok(s) => s,
        Err(_) => return server_error("the cluster view failed").into_response(),
    };
    let mut snapshot = snapshot;
    for host in &mut snapshot.hosts {
        if let Some(experts) = &host.experts {
            host.routed_rows = Some(experts.iter().map(|&(l, e)| app.metrics.routed(l, e)).sum());
        }
    }
    let m = &app.metrics;
    let (moe_layers, num_experts) = m.routing_shape();
    axum::Json(json!({
        "model": app.served_model_name,
        "mode": snapshot.mode,
        "transport": snapshot.transport,
        "hosts": snapshot.hosts,
        "dispatch_p50_us": snapshot.dispatch_p50_us,
        "dispatch_p99_us": snapshot.dispatch_p99_us,
        "running_sequences": m.running.load(Ordering::Relaxed),
        "waiting_sequences": m.waiting.load(Ordering::Relaxed),
        "kv_cache_bytes": m.kv_cache_bytes.load(Ordering::Relaxed),
        "coordinator": {
            "memory": super::host::memory(),
            "uptime_s": app.started.elapsed().as_secs_f64(),
        },
        "routing": {
            "moe_layers": moe_layers,
            "num_experts": num_experts,
            "rows": m.routed_table(),
        },
        "tokens_per_s": m.tokens_per_second(),
        "generation_tokens_total": m.generation_tokens.load(Ordering::Relaxed),
        "prompt_tokens_total": m.prompt_tokens.load(Ordering::Relaxed),
        "recent_requests": m.recent(),
    }))
    .into_response()
}

fn server_error(message: &str) -> ApiError {
    ApiError {
        status: 500,
        message: message.into(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// Which endpoint a generation came from; it decides the response shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Kind::Chat, body).await
}

async fn completions(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Kind::Completion, body).await
}

/// What to tokenize.
enum Input {
    Chat(Vec<moeshard_engine::tokenizer::ChatMessage>),
    Prompt(PromptInput),
}

async fn generate(app: Arc<App>, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    match prepare(&app, kind, body, arrived).await {
        Ok((gen_, rx, prompt_tokens, id)) => {
            debug!(%id, prompt_tokens, stream = gen_.stream, "request queued");
            let ctx = ResponseCtx {
                id,
                created: unix_now(),
                model: app.served_model_name.clone(),
                kind,
                include_usage: gen_.include_usage,
                log: RequestLog {
                    metrics: Arc::clone(&app.metrics),
                    arrived,
                    first_token: None,
                    stream: gen_.stream,
                    prompt_tokens,
                },
            };
            if gen_.stream {
                stream_response(ctx, rx).into_response()
            } else {
                collect_response(ctx, rx).await
            }
        }
        Err(e) => e.into_response(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses, validates, tokenizes and queues a request.
async fn prepare(
    app: &Arc<App>,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<(Generation, mpsc::Receiver<SeqEvent>, usize, String), ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status().as_u16(),
        message: format!("cannot read the request body: {e}"),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })?;
    let (params, input) = match kind {
        Kind::Chat => {
            let r: ChatRequest = parse_body(&body)?;
            let msgs = r.messages()?;
            (r.params, Input::Chat(msgs))
        }
        Kind::Completion => {
            let r: CompletionRequest = parse_body(&body)?;
            let p = r.prompt()?;
            (r.params, Input::Prompt(p))
        }
    };
    if let Some(m) = &params.model
        && *m != app.served_model_name
    {
        return Err(unknown_model(m));
    }
    let gen_ = params.validate()?;
    let tok = Arc::clone(&app.tokenizer);
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        let bad = |e: moeshard_engine::EngineError| {
            ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), "invalid_prompt")
        };
        match input {
            Input::Chat(msgs) => {
                let text = tok.apply_chat_template(&msgs, true).map_err(bad)?;
                tok.encode(&text, false).map_err(bad)
            }
            Input::Prompt(PromptInput::Text(s)) => tok.encode(&s, true).map_err(bad),
            Input::Prompt(PromptInput::Tokens(t)) => Ok(t),
        }
    })
    .await
    .map_err(|_| server_error("tokenization failed"))??;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            "the prompt has no tokens",
        ));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= app.vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {t} is outside the vocabulary of {}", app.vocab),
        ));
    }
    let max_context = app.max_context;
    let context_error = |requested: usize| ApiError {
        status: 400,
        message: format!(
            "this model's maximum context length is {max_context} tokens; the request needs \
             {requested} ({} in the prompt, {} to generate)",
            prompt.len(),
            requested.saturating_sub(prompt.len())
        ),
        kind: "invalid_request_error",
        param: Some(if kind == Kind::Chat {
            "messages".into()
        } else {
            "prompt".into()
        }),
        code: Some("context_length_exceeded"),
    };
    if prompt.len() >= max_context {
        return Err(context_error(prompt.len() + 1));
    }
    let max_tokens = match gen_.max_tokens {
        Some(m) => {
            if prompt.len().saturating_add(m) > max_context {
                return Err(context_error(prompt.len().saturating_add(m)));
            }
            m
        }
        None => max_context - prompt.len(),
    };
    let (tx, rx) = mpsc::channel(EVENTS_PER_REQUEST);
    let prompt_tokens = prompt.len();
    let req = SeqRequest {
        prompt,
        max_tokens,
        sampling: gen_.sampling,
        stop: gen_.stop.clone(),
        ignore_eos: gen_.ignore_eos,
        events: tx,
        arrived,
    };
    // Count it as waiting before the scheduler can take it (and count it down).
    app.metrics.waiting.fetch_add(1, Ordering::Relaxed);
    match app.queue.try_send(req) {
        Ok(()) => {}
        Err(e) => {
            app.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => ApiError {
                    status: 429,
                    message: "the server is at capacity (every sequence slot is busy and the \
                              waiting queue is full); retry later"
                        .into(),
                    kind: "rate_limit_exceeded",
                    param: None,
                    code: Some("rate_limit_exceeded"),
                },
                TrySendError::Disconnected(_) => ApiError {
                    status: 503,
                    message: "the scheduler has stopped".into(),
                    kind: "server_error",
                    param: None,
                    code: None,
                },
            });
        }
    }
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let id = format!("{prefix}-{:x}{n:08x}", app.created);
    Ok((gen_, rx, prompt_tokens, id))
}

struct ResponseCtx {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
    log: RequestLog,
}

/// What the list of recent requests needs to know about one.
struct RequestLog {
    metrics: Arc<Metrics>,
    arrived: Instant,
    first_token: Option<Instant>,
    stream: bool,
    prompt_tokens: usize,
}

impl ResponseCtx {
    fn token_arrived(&mut self) {
        if self.log.first_token.is_none() {
            self.log.first_token = Some(Instant::now());
        }
    }

    /// Adds the request to the recent ones once it has ended.
    fn ended(&self, finish: &'static str, completion_tokens: usize) {
        let l = &self.log;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        l.metrics.finished(RecentRequest {
            id: self.id.clone(),
            endpoint: match self.kind {
                Kind::Chat => "chat_completions",
                Kind::Completion => "completions",
            },
            stream: l.stream,
            prompt_tokens: l.prompt_tokens,
            completion_tokens,
            finish,
            duration_ms: ms(l.arrived.elapsed()),
            ttft_ms: l
                .first_token
                .map(|t| ms(t.saturating_duration_since(l.arrived))),
            ended_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        });
    }
}

impl ResponseCtx {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One streamed chunk with a choice (`text` for content; `role` on the first chat chunk).
    fn chunk(&self, role: bool, text: Option<&str>, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }

    fn full(&self, text: String, finish: Finish, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }
}

fn failure(message: String) -> ApiError {
    ApiError {
        status: 500,
        message: format!("generation failed: {message}"),
        kind: "server_error",
        param: None,
        code: Some("generation_failed"),
    }
}

async fn collect_response(mut ctx: ResponseCtx, mut rx: mpsc::Receiver<SeqEvent>) -> Response {
    let mut text = String::new();
    let mut tokens = 0;
    loop {
        match rx.recv().await {
            Some(SeqEvent::Text {
                text: t,
                tokens: ids,
            }) => {
                if !ids.is_empty() {
                    ctx.token_arrived();
                }
                tokens += ids.len();
                text.push_str(&t)
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                ctx.ended(finish.as_str(), completion_tokens);
                let usage = Usage::new(prompt_tokens, completion_tokens);
                return axum::Json(ctx.full(text, finish, usage)).into_response();
            }
            Some(SeqEvent::Failed { message }) => {
                ctx.ended("error", tokens);
                return failure(message).into_response();
            }
            None => {
                ctx.ended("error", tokens);
                return failure("the scheduler stopped".into()).into_response();
            }
        }
    }
}

struct StreamState {
    ctx: ResponseCtx,
    rx: mpsc::Receiver<SeqEvent>,
    pending: VecDeque<Event>,
    ended: bool,
    /// No token has been streamed yet.
    first: bool,
    /// Tokens received so far.
    tokens: usize,
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl StreamState {
    /// Turns the next scheduler event into SSE events; false when nothing more will come.
    async fn fill(&mut self) -> bool {
        match self.rx.recv().await {
            Some(SeqEvent::Text { text, tokens }) => {
                if !tokens.is_empty() {
                    self.ctx.token_arrived();
                }
                self.tokens += tokens.len();
                // The first token always makes a chunk (even one that is not printable yet), so
                // clients see the time to first token.
                if !text.is_empty() || (self.first && !tokens.is_empty()) {
                    self.first = false;
                    self.pending
                        .push_back(data(&self.ctx.chunk(false, Some(&text), None)));
                }
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                self.ctx.ended(finish.as_str(), completion_tokens);
                let last = match self.ctx.kind {
                    Kind::Chat => self.ctx.chunk(false, None, Some(finish)),
                    Kind::Completion => self.ctx.chunk(false, Some(""), Some(finish)),
                };
                self.pending.push_back(data(&last));
                if self.ctx.include_usage {
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    self.pending.push_back(data(&self.ctx.usage_chunk(usage)));
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.ended = true;
            }
            Some(SeqEvent::Failed { message }) => {
                self.ctx.ended("error", self.tokens);
                self.pending.push_back(data(&failure(message).body()));
                self.ended = true;
            }
            None => {
                self.ctx.ended("error", self.tokens);
                self.pending
                    .push_back(data(&failure("the scheduler stopped".into()).body()));
                self.ended = true;
            }
        }
        true
    }
}

fn stream_response(
    ctx: ResponseCtx,
    rx: mpsc::Receiver<SeqEvent>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut pending = VecDeque::new();
    if ctx.kind == Kind::Chat {
        pending.push_back(data(&ctx.chunk(true, Some(""), None)));
    }
    let state = StreamState {
        ctx,
        rx,
        pending,
        ended: false,
        first: true,
        tokens: 0,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.ended || !s.fill().await {
                return None;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
