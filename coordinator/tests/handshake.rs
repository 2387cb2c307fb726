//! Start-up refusals against a fake gRPC worker: another protocol version, another model.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moeshard_coordinator::{ClusterExperts, ClusterOptions, CoordinatorError};
use moeshard_engine::Model;
use moeshard_proto::v1::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use moeshard_proto::v1::{
    AssignRequest, AssignResponse, ExpertBatchRequest, ExpertBatchResponse, HealthRequest,
    HealthResponse, HelloRequest, HelloResponse, StatsRequest, StatsResponse,
};
use tonic::{Request, Response, Status};

struct Fake {
    version: u32,
    fingerprint: String,
}

#[tonic::async_trait]
impl ExpertWorker for Fake {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        Ok(Response::new(HelloResponse {
            protocol_version: self.version,
            worker_id: "fake".into(),
            capacity_bytes: 1 << 40,
            model_fingerprint: self.fingerprint.clone(),
            hidden_size: 64,
            num_experts: 5,
            memory_budget_bytes: 0,
        }))
    }
    async fn assign(&self, _: Request<AssignRequest>) -> Result<Response<AssignResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn compute_experts(
        &self,
        _: Request<ExpertBatchRequest>,
    ) -> Result<Response<ExpertBatchResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on a loopback port from a thread of its own; returns the address.
fn serve(fake: Fake) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(ExpertWorkerServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    });
    addr
}

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe_tiny")
}

fn connect(addr: SocketAddr) -> CoordinatorError {
    let dir = model_dir();
    let (model, ckpt) = Model::load(&dir).unwrap();
    let opts = ClusterOptions {
        workers: vec![addr.to_string()],
        rpc_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ..ClusterOptions::default()
    };
    ClusterExperts::connect(&dir, &model.cfg, &ckpt, &opts).unwrap_err()
}

fn our_fingerprint() -> String {
    let dir = model_dir();
    let ckpt = moeshard_engine::safetensors::Checkpoint::open(&dir).unwrap();
    moeshard_engine::fingerprint::model_fingerprint(&dir, &ckpt).unwrap()
}

#[test]
fn another_protocol_version_is_refused() {
    let addr = serve(Fake {
        version: moeshard_proto::PROTOCOL_VERSION + 1,
        fingerprint: our_fingerprint(),
    });
    let err = connect(addr);
    assert!(
        matches!(&err, CoordinatorError::ProtocolMismatch { worker, theirs, .. }
            if *worker == addr.to_string() && *theirs == moeshard_proto::PROTOCOL_VERSION + 1),
        "{err}"
    );
}

#[test]
fn another_model_is_refused_showing_both_fingerprints() {
    let addr = serve(Fake {
        version: moeshard_proto::PROTOCOL_VERSION,
        fingerprint: "ab".repeat(32),
    });
    let err = connect(addr);
    let msg = err.to_string();
    assert!(
        matches!(err, CoordinatorError::FingerprintMismatch { .. }),
        "{msg}"
    );
    for needle in [addr.to_string(), "ab".repeat(32), our_fingerprint()] {
        assert!(msg.contains(&needle), "no {needle} in {msg}");
    }
}
