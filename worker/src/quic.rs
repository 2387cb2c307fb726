//! The worker over QUIC: each request is a bidirectional stream carrying one length-prefixed
//! [`Envelope`] each way.

use std::net::SocketAddr;
use std::sync::Arc;

use moeshard_proto::auth::ClusterKey;
use moeshard_proto::frame::{read_frame, write_frame};
use moeshard_proto::v1::envelope::Msg;
use moeshard_proto::v1::{Envelope, ErrorResponse};
use moeshard_proto::{MAX_FRAME_BYTES, ProtoError, tls};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{Result, WorkerCore, WorkerError};

pub(crate) async fn serve(
    core: Arc<WorkerCore>,
    listen: SocketAddr,
    key: Option<ClusterKey>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let config = tls::server_config(key.as_ref())?;
    let endpoint = quinn::Endpoint::server(config, listen).map_err(|source| WorkerError::Bind {
        addr: listen,
        source,
    })?;
    let addr = endpoint.local_addr().map_err(|source| WorkerError::Bind {
        addr: listen,
        source,
    })?;
    on_listening(addr);
    while let Some(incoming) = endpoint.accept().await {
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    info!(%remote, "coordinator connected over QUIC");
                    serve_connection(core, conn).await;
                }
                Err(e) => {
                    warn!(%remote, "QUIC handshake failed (a peer without the cluster key?): {e}")
                }
            }
        });
    }
    Ok(())
}

async fn serve_connection(core: Arc<WorkerCore>, conn: quinn::Connection) {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let core = Arc::clone(&core);
                tokio::spawn(serve_stream(core, send, recv));
            }
            Err(e) => {
                info!(remote = %conn.remote_address(), "QUIC connection ended: {e}");
                return;
            }
        }
    }
}

async fn serve_stream(
    core: Arc<WorkerCore>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply = match read_frame(&mut recv, MAX_FRAME_BYTES).await {
        Ok(req) => handle(&core, req).await,
        Err(ProtoError::Closed) => return,
        Err(e) => error_reply(&WorkerError::Proto(e)),
    };
    if let Err(e) = write_frame(&mut send, &reply).await {
        debug!("reply not sent: {e}");
        return;
    }
    // Finishing only fails when the peer already reset the stream.
    let _ = send.finish();
}

fn error_reply(e: &WorkerError) -> Envelope {
    warn!("request failed: {e}");
    Envelope {
        msg: Some(Msg::Error(ErrorResponse {
            code: e.code() as i32,
            message: e.to_string(),
        })),
    }
}

fn reply(msg: Msg) -> Envelope {
    Envelope { msg: Some(msg) }
}

async fn handle(core: &Arc<WorkerCore>, req: Envelope) -> Envelope {
    match req.msg {
        Some(Msg::HelloRequest(r)) => reply(Msg::HelloResponse(core.hello(&r))),
        Some(Msg::AssignRequest(r)) => match core.assign_blocking(r).await {
            Ok(a) => reply(Msg::AssignResponse(a)),
            Err(e) => error_reply(&e),
        },
        Some(Msg::ExpertBatchRequest(r)) => {
            let span = info_span!("batch", layer = r.layer, transport = "quic");
            match core.compute(r).instrument(span).await {
                Ok(a) => reply(Msg::ExpertBatchResponse(a)),
                Err(e) => error_reply(&e),
            }
        }
        Some(Msg::HealthRequest(_)) => reply(Msg::HealthResponse(core.health())),
        Some(Msg::StatsRequest(_)) => reply(Msg::StatsResponse(core.stats())),
        Some(_) | None => error_reply(&WorkerError::BadRequest {
            msg: "the envelope holds no request".into(),
        }),
    }
}
