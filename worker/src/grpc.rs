//! The worker over gRPC: tonic's generated `ExpertWorker` service around [`WorkerCore`].

use std::net::SocketAddr;
use std::sync::Arc;

use moeshard_proto::auth::ClusterKey;
use moeshard_proto::v1::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use moeshard_proto::v1::{
    AssignRequest, AssignResponse, ExpertBatchRequest, ExpertBatchResponse, HealthRequest,
    HealthResponse, HelloRequest, HelloResponse, StatsRequest, StatsResponse,
};
use moeshard_proto::{MAX_CONCURRENT_REQUESTS, MAX_FRAME_BYTES, grpc_tls};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span, warn};

use crate::{Result, WorkerCore, WorkerError};

struct GrpcWorker(Arc<WorkerCore>);

fn status(e: WorkerError) -> Status {
    warn!("request failed: {e}");
    Status::new(e.code(), e.to_string())
}

#[tonic::async_trait]
impl ExpertWorker for GrpcWorker {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        Ok(Response::new(self.0.hello(req.get_ref())))
    }

    async fn assign(
        &self,
        req: Request<AssignRequest>,
    ) -> Result<Response<AssignResponse>, Status> {
        self.0
            .assign_blocking(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn compute_experts(
        &self,
        req: Request<ExpertBatchRequest>,
    ) -> Result<Response<ExpertBatchResponse>, Status> {
        let req = req.into_inner();
        let span = info_span!("batch", layer = req.layer, transport = "grpc");
        self.0
            .compute(req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(self.0.health()))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(self.0.stats()))
    }
}

pub(crate) async fn serve(
    core: Arc<WorkerCore>,
    listen: SocketAddr,
    key: Option<ClusterKey>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let bind_err = |source| WorkerError::Bind {
        addr: listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let service = ExpertWorkerServer::new(GrpcWorker(core))
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES);
    // Prefill batches are megabytes: windows big enough that a request needs no round trip for
    // flow control on a fast link.
    let router = Server::builder()
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .max_concurrent_streams(Some(MAX_CONCURRENT_REQUESTS))
        .add_service(service);
    match key {
        Some(key) => {
            let incoming = grpc_tls::incoming(listener, &key)?;
            on_listening(addr);
            router.serve_with_incoming(incoming).await?;
        }
        None => {
            // Decode is latency-bound: small messages must leave at once.
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            on_listening(addr);
            router.serve_with_incoming(incoming).await?;
        }
    }
    Ok(())
}
