//! Malformed messages against a live worker process, over both transports: truncated frames,
//! lying lengths, garbage, wrong dtypes, out-of-range expert and token ids, rows that do not add
//! up. Each is refused with a clear error (InvalidArgument where the sender is at fault), and the
//! worker keeps serving good requests afterwards.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::{bin, fixture};
use moeshard_engine::ModelConfig;
use moeshard_proto::frame::{encode_frame, read_frame};
use moeshard_proto::v1::envelope::Msg;
use moeshard_proto::v1::expert_worker_client::ExpertWorkerClient;
use moeshard_proto::v1::{
    AssignRequest, Dtype, Envelope, ExpertBatchRequest, ExpertId, HelloRequest,
};
use moeshard_proto::{MAX_BATCH_TOKENS, MAX_FRAME_BYTES, PROTOCOL_VERSION, Transport, tls};

const NAME: &str = "qwen3_moe_tiny";

struct Worker {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(transport: Transport) -> Worker {
    let mut child = Command::new(bin())
        .arg("worker")
        .arg("--model")
        .arg(fixture(NAME))
        .args(["--listen", "127.0.0.1:0", "--transport", transport.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (addr, _) = moeshard_proto::parse_listening_line(&line).unwrap();
    Worker { child, addr }
}

/// One raw QUIC request: `bytes` on a fresh stream, then the worker's reply envelope.
async fn quic_raw(conn: &quinn::Connection, bytes: &[u8]) -> Envelope {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    read_frame(&mut recv, MAX_FRAME_BYTES).await.unwrap()
}

fn error_of(env: &Envelope) -> (tonic::Code, String) {
    match &env.msg {
        Some(Msg::Error(e)) => (tonic::Code::from_i32(e.code), e.message.clone()),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn good_batch(cfg: &ModelConfig) -> ExpertBatchRequest {
    let h = cfg.hidden_size;
    let layer = cfg.moe_layers().next().unwrap();
    ExpertBatchRequest {
        layer: layer as u32,
        hidden_size: h as u32,
        dtype: Dtype::F32 as i32,
        n_tokens: 2,
        activations: Bytes::from(vec![0u8; 2 * h * 4]),
        tokens: vec![0, 1],
        experts: vec![0, 1],
        weights: vec![0.5, 0.5],
    }
}

/// The malformed batches and a word each error must contain.
fn bad_batches(cfg: &ModelConfig) -> Vec<(&'static str, ExpertBatchRequest, &'static str)> {
    let good = good_batch(cfg);
    let h = cfg.hidden_size;
    vec![
        (
            "bf16 activations",
            ExpertBatchRequest {
                dtype: Dtype::Bf16 as i32,
                ..good.clone()
            },
            "dtype",
        ),
        (
            "an unknown dtype",
            ExpertBatchRequest {
                dtype: 77,
                ..good.clone()
            },
            "dtype",
        ),
        (
            "a wrong hidden size",
            ExpertBatchRequest {
                hidden_size: h as u32 + 1,
                ..good.clone()
            },
            "hidden size",
        ),
        (
            "an out-of-range expert",
            ExpertBatchRequest {
                experts: vec![0, 999],
                ..good.clone()
            },
            "999",
        ),
        (
            "an out-of-range layer",
            ExpertBatchRequest {
                layer: 1000,
                ..good.clone()
            },
            "1000",
        ),
        (
            "a token past n_tokens",
            ExpertBatchRequest {
                tokens: vec![0, 2],
                ..good.clone()
            },
            "token 2",
        ),
        (
            "n_tokens lying about the activations",
            ExpertBatchRequest {
                n_tokens: 3,
                ..good.clone()
            },
            "activations",
        ),
        (
            "n_tokens over the limit",
            ExpertBatchRequest {
                n_tokens: MAX_BATCH_TOKENS as u32 + 1,
                ..good.clone()
            },
            "limit",
        ),
        (
            "rows that do not add up",
            ExpertBatchRequest {
                weights: vec![0.5],
                ..good.clone()
            },
            "rows",
        ),
        (
            "activations cut mid-value",
            ExpertBatchRequest {
                activations: Bytes::from(vec![0u8; 2 * h * 4 - 1]),
                ..good
            },
            "activations",
        ),
    ]
}

fn assign_all(cfg: &ModelConfig, fingerprint: &str) -> AssignRequest {
    AssignRequest {
        model_fingerprint: fingerprint.to_string(),
        experts: cfg
            .moe_layers()
            .flat_map(|l| {
                (0..cfg.num_experts).map(move |e| ExpertId {
                    layer: l as u32,
                    expert: e as u32,
                })
            })
            .collect(),
    }
}

fn fingerprint() -> String {
    let dir = fixture(NAME);
    let ckpt = moeshard_engine::safetensors::Checkpoint::open(&dir).unwrap();
    moeshard_engine::fingerprint::model_fingerprint(&dir, &ckpt).unwrap()
}

#[test]
fn malformed_quic_frames_and_messages_are_refused_and_the_worker_keeps_serving() {
    let cfg = ModelConfig::from_dir(&fixture(NAME)).unwrap();
    let w = start(Transport::Quic);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let conn = endpoint
            .connect(w.addr, tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let env = |m: Msg| Envelope { msg: Some(m) };
        // Assign everything first, so batches fail on their own faults.
        let r = quic_raw(
            &conn,
            &encode_frame(&env(Msg::AssignRequest(assign_all(&cfg, &fingerprint())))).unwrap(),
        )
        .await;
        assert!(matches!(r.msg, Some(Msg::AssignResponse(_))), "{r:?}");

        // Frame-level faults.
        let full = encode_frame(&env(Msg::ExpertBatchRequest(good_batch(&cfg)))).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "a frame cut in its length prefix",
                full[..2].to_vec(),
                "length prefix",
            ),
            (
                "a frame cut in its message",
                full[..full.len() - 7].to_vec(),
                "stream ended",
            ),
            (
                "a length claiming 4 GB",
                u32::MAX.to_le_bytes().to_vec(),
                "exceeds",
            ),
            (
                "a length longer than what follows",
                [&1000u32.to_le_bytes()[..], &[1, 2, 3]].concat(),
                "stream ended",
            ),
            (
                "garbage after a good length",
                [&5u32.to_le_bytes()[..], &[0xff; 5]].concat(),
                "malformed",
            ),
            (
                "an empty envelope",
                encode_frame(&Envelope { msg: None }).unwrap(),
                "no request",
            ),
            (
                "a reply where a request belongs",
                encode_frame(&env(Msg::HealthResponse(Default::default()))).unwrap(),
                "no request",
            ),
        ];
        for (what, bytes, needle) in cases {
            let (code, msg) = error_of(&quic_raw(&conn, &bytes).await);
            assert_eq!(code, tonic::Code::InvalidArgument, "{what}: {msg}");
            assert!(msg.contains(needle), "{what}: {msg}");
        }
        // Message-level faults.
        for (what, batch, needle) in bad_batches(&cfg) {
            let bytes = encode_frame(&env(Msg::ExpertBatchRequest(batch))).unwrap();
            let (code, msg) = error_of(&quic_raw(&conn, &bytes).await);
            assert!(
                matches!(
                    code,
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{what}: {code:?} {msg}"
            );
            assert!(msg.contains(needle), "{what}: {msg}");
        }
        // Still serving.
        let r = quic_raw(&conn, &full).await;
        assert!(matches!(r.msg, Some(Msg::ExpertBatchResponse(_))), "{r:?}");
        let hello = env(Msg::HelloRequest(HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            coordinator_id: "malformed-test".into(),
        }));
        let r = quic_raw(&conn, &encode_frame(&hello).unwrap()).await;
        assert!(matches!(r.msg, Some(Msg::HelloResponse(_))), "{r:?}");
    });
}

#[test]
fn malformed_grpc_messages_are_refused_and_the_worker_keeps_serving() {
    let cfg = ModelConfig::from_dir(&fixture(NAME)).unwrap();
    let w = start(Transport::Grpc);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", w.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = ExpertWorkerClient::new(channel).max_decoding_message_size(MAX_FRAME_BYTES);
        c.assign(assign_all(&cfg, &fingerprint())).await.unwrap();
        // An assignment for another model, and of an expert that does not exist.
        let err = c
            .assign(AssignRequest {
                model_fingerprint: "0".repeat(64),
                experts: vec![],
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("fingerprint"), "{err:?}");
        let mut bad = assign_all(&cfg, &fingerprint());
        bad.experts = vec![ExpertId {
            layer: 0,
            expert: 4242,
        }];
        let err = c.assign(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("4242"), "{err:?}");
        for (what, batch, needle) in bad_batches(&cfg) {
            let err = c.compute_experts(batch).await.unwrap_err();
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{what}: {err:?}"
            );
            assert!(err.message().contains(needle), "{what}: {err:?}");
        }
        // A message over the size limit is refused by the transport, not allocated.
        let mut huge = good_batch(&cfg);
        huge.activations = Bytes::from(vec![0u8; MAX_FRAME_BYTES + 1024]);
        let mut unlimited = c.clone().max_encoding_message_size(usize::MAX);
        let err = unlimited.compute_experts(huge).await.unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            ),
            "{err:?}"
        );
        // Still serving.
        let r = c
            .compute_experts(good_batch(&cfg))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outputs.len(), 2 * cfg.hidden_size * 4);
    });
}
