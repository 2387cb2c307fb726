//! One worker as the coordinator sees it: the same calls over gRPC or QUIC.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use moeshard_proto::auth::ClusterKey;
use moeshard_proto::frame::{read_frame, write_frame};
use moeshard_proto::v1::envelope::Msg;
use moeshard_proto::v1::expert_worker_client::ExpertWorkerClient;
use moeshard_proto::v1::{
    AssignRequest, AssignResponse, Envelope, ExpertBatchRequest, ExpertBatchResponse,
    HealthRequest, HealthResponse, HelloRequest, HelloResponse, StatsRequest, StatsResponse,
};
use moeshard_proto::{MAX_FRAME_BYTES, Transport, grpc_tls, tls};
use tonic::transport::{Channel, Endpoint};

/// Why a call to a worker failed; the caller adds the worker and the layer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No answer within the deadline.
    Timeout(Duration),
    /// No connection could be made or kept.
    Connection(String),
    /// The worker answered with an error.
    Status { code: tonic::Code, msg: String },
    /// The reply is not what the call expects.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout(d) => write!(f, "no answer within {d:?}"),
            CallError::Connection(m) => write!(f, "connection failed: {m}"),
            CallError::Status { code, msg } => write!(f, "worker error ({code:?}): {msg}"),
            CallError::Protocol(m) => write!(f, "bad reply: {m}"),
        }
    }
}

fn from_status(s: tonic::Status) -> CallError {
    match s.code() {
        // tonic reports transport failures (refused, reset, closed) as Unavailable/Unknown
        // with no worker-made message.
        // A link that breaks at the HTTP/2 level (e.g. a TLS worker reached in plaintext) is a
        // connection failure too, not the worker's answer.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            let mut msg = s.message().to_string();
            let mut src = std::error::Error::source(&s);
            while let Some(inner) = src {
                msg.push_str(": ");
                msg.push_str(&inner.to_string());
                src = inner.source();
            }
            CallError::Connection(msg)
        }
        tonic::Code::Internal if s.message().starts_with("h2 protocol error") => {
            CallError::Connection(s.message().to_string())
        }
        code => CallError::Status {
            code,
            msg: s.message().to_string(),
        },
    }
}

/// A connection to one worker.
pub(crate) enum Client {
    Grpc(ExpertWorkerClient<Channel>),
    Quic(QuicClient),
}

pub(crate) struct QuicClient {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    conn: Mutex<quinn::Connection>,
    connect_timeout: Duration,
}

async fn resolve(addr: &str) -> Result<SocketAddr, CallError> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| CallError::Connection(format!("cannot resolve {addr}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| CallError::Connection(format!("{addr} resolves to no address")))
}

async fn quic_connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, CallError> {
    let connecting = endpoint
        .connect(addr, tls::SERVER_NAME)
        .map_err(|e| CallError::Connection(e.to_string()))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(CallError::Connection(e.to_string())),
        Err(_) => Err(CallError::Connection(format!(
            "no QUIC handshake within {timeout:?}"
        ))),
    }
}

impl Client {
    /// Connects to `addr` (host:port).
    pub(crate) async fn connect(
        addr: &str,
        transport: Transport,
        connect_timeout: Duration,
        key: Option<&ClusterKey>,
    ) -> Result<Self, CallError> {
        Self::connect_inner(addr, transport, connect_timeout, key).await
    }

    async fn connect_inner(
        addr: &str,
        transport: Transport,
        connect_timeout: Duration,
        key: Option<&ClusterKey>,
    ) -> Result<Self, CallError> {
        match transport {
            Transport::Grpc => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| CallError::Connection(format!("bad address: {e}")))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(tls::IDLE_TIMEOUT / 3)
                    .keep_alive_timeout(tls::IDLE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(16 << 20)
                    .initial_connection_window_size(64 << 20);
                let connecting = async {
                    match key {
                        Some(k) => {
                            let connector = grpc_tls::Connector::new(k)
                                .map_err(|e| CallError::Connection(e.to_string()))?;
                            endpoint
                                .connect_with_connector(connector)
                                .await
                                .map_err(|e| CallError::Connection(error_chain(&e)))
                        }
                        None => endpoint
                            .connect()
                            .await
                            .map_err(|e| CallError::Connection(error_chain(&e))),
                    }
                };
                let channel = match tokio::time::timeout(connect_timeout, connecting).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(CallError::Connection(format!(
                            "no connection within {connect_timeout:?}"
                        )));
                    }
                };
                Ok(Client::Grpc(
                    ExpertWorkerClient::new(channel)
                        .max_decoding_message_size(MAX_FRAME_BYTES)
                        .max_encoding_message_size(MAX_FRAME_BYTES),
                ))
            }
            Transport::Quic => {
                let addr = resolve(addr).await?;
                let bind: SocketAddr = if addr.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                };
                let mut endpoint = quinn::Endpoint::client(bind)
                    .map_err(|e| CallError::Connection(format!("cannot open a UDP socket: {e}")))?;
                endpoint.set_default_client_config(
                    tls::client_config(key).map_err(|e| CallError::Connection(e.to_string()))?,
                );
                let conn = quic_connect(&endpoint, addr, connect_timeout).await?;
                Ok(Client::Quic(QuicClient {
                    endpoint,
                    addr,
                    conn: Mutex::new(conn),
                    connect_timeout,
                }))
            }
        }
    }

    pub(crate) async fn hello(&self, req: HelloRequest) -> Result<HelloResponse, CallError> {
        match self {
            Client::Grpc(c) => Ok(c
                .clone()
                .hello(req)
                .await
                .map_err(from_status)?
                .into_inner()),
            Client::Quic(q) => match q.call(Msg::HelloRequest(req)).await? {
                Msg::HelloResponse(r) => Ok(r),
                other => Err(unexpected(&other)),
            },
        }
    }

    pub(crate) async fn assign(&self, req: AssignRequest) -> Result<AssignResponse, CallError> {
        match self {
            Client::Grpc(c) => Ok(c
                .clone()
                .assign(req)
                .await
                .map_err(from_status)?
                .into_inner()),
            Client::Quic(q) => match q.call(Msg::AssignRequest(req)).await? {
                Msg::AssignResponse(r) => Ok(r),
                other => Err(unexpected(&other)),
            },
        }
    }

    pub(crate) async fn compute(
        &self,
        req: ExpertBatchRequest,
    ) -> Result<ExpertBatchResponse, CallError> {
        match self {
            Client::Grpc(c) => Ok(c
                .clone()
                .compute_experts(req)
                .await
                .map_err(from_status)?
                .into_inner()),
            Client::Quic(q) => match q.call(Msg::ExpertBatchRequest(req)).await? {
                Msg::ExpertBatchResponse(r) => Ok(r),
                other => Err(unexpected(&other)),
            },
        }
    }

    pub(crate) async fn health(&self) -> Result<HealthResponse, CallError> {
        match self {
            Client::Grpc(c) => Ok(c
                .clone()
                .health(HealthRequest {})
                .await
                .map_err(from_status)?
                .into_inner()),
            Client::Quic(q) => match q.call(Msg::HealthRequest(HealthRequest {})).await? {
                Msg::HealthResponse(r) => Ok(r),
                other => Err(unexpected(&other)),
            },
        }
    }

    pub(crate) async fn stats(&self) -> Result<StatsResponse, CallError> {
        match self {
            Client::Grpc(c) => Ok(c
                .clone()
                .stats(StatsRequest {})
                .await
                .map_err(from_status)?
                .into_inner()),
            Client::Quic(q) => match q.call(Msg::StatsRequest(StatsRequest {})).await? {
                Msg::StatsResponse(r) => Ok(r),
                other => Err(unexpected(&other)),
            },
        }
    }
}

fn unexpected(msg: &Msg) -> CallError {
    let name = match msg {
        Msg::HelloRequest(_) => "HelloRequest",
        Msg::HelloResponse(_) => "HelloResponse",
        Msg::AssignRequest(_) => "AssignRequest",
        Msg::AssignResponse(_) => "AssignResponse",
        Msg::ExpertBatchRequest(_) => "ExpertBatchRequest",
        Msg::ExpertBatchResponse(_) => "ExpertBatchResponse",
        Msg::HealthRequest(_) => "HealthRequest",
        Msg::HealthResponse(_) => "HealthResponse",
        Msg::StatsRequest(_) => "StatsRequest",
        Msg::StatsResponse(_) => "StatsResponse",
        Msg::Error(_) => "Error",
    };
    CallError::Protocol(format!("unexpected {name}"))
}

/// A connection failure with a hint when it reads like a refused TLS authentication: with a key,
/// a handshake or certificate failure; without one, a link that breaks at once (the worker speaks
/// TLS and wants a key).
pub(crate) fn auth_hint(msg: String, has_key: bool) -> String {
    let m = msg.to_ascii_lowercase();
    // Nobody there, or nobody answering: not an authentication matter.
    let absent = [
        "refused",
        "no connection within",
        "no quic handshake within",
        "resolve",
        "no answer within",
    ]
    .iter()
    .any(|k| m.contains(k));
    let tls_words = ["certificate", "cluster's key", "alert", "handshake", "tls"]
        .iter()
        .any(|k| m.contains(k));
    if absent {
        msg
    } else if has_key && tls_words {
        format!(
            "TLS authentication failed (does the worker use the same --cluster-key-file?): {msg}"
        )
    } else if !has_key {
        format!(
            "TLS authentication failed? (this coordinator has no --cluster-key-file; does the \
             worker require one?): {msg}"
        )
    } else {
        msg
    }
}

/// The error and its causes on one line (tonic's transport errors hide the useful part).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl QuicClient {
    /// The live connection, dialling again if the last one closed.
    async fn connection(&self) -> Result<quinn::Connection, CallError> {
        let current = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if current.close_reason().is_none() {
            return Ok(current);
        }
        let fresh = quic_connect(&self.endpoint, self.addr, self.connect_timeout).await?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// One request on its own bidirectional stream.
    async fn call(&self, msg: Msg) -> Result<Msg, CallError> {
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| CallError::Connection(e.to_string()))?;
        write_frame(&mut send, &Envelope { msg: Some(msg) })
            .await
            .map_err(|e| CallError::Connection(e.to_string()))?;
        send.finish()
            .map_err(|e| CallError::Connection(e.to_string()))?;
        let reply = read_frame(&mut recv, MAX_FRAME_BYTES)
            .await
            .map_err(|e| match e {
                moeshard_proto::ProtoError::Io(io) => CallError::Connection(io.to_string()),
                moeshard_proto::ProtoError::Closed => {
                    CallError::Connection("the stream closed without a reply".into())
                }
                other => CallError::Protocol(other.to_string()),
            })?;
        match reply.msg {
            Some(Msg::Error(e)) => Err(CallError::Status {
                code: tonic::Code::from_i32(e.code),
                msg: e.message,
            }),
            Some(m) => Ok(m),
            None => Err(CallError::Protocol("an empty envelope".into())),
        }
    }
}
