//! A worker holds only its assigned experts: after computing with a quarter of the experts, about a
//! quarter of the expert bytes are resident in its memory, and every other expert's bytes are
//! untouched; both when it copies its experts into anonymous memory at assignment (the default)
//! and when it computes from the file mapping (`--mmap`: nothing is read before the first batch).
//! An assignment that grows copies only the new experts. The control (assign everything, touch
//! everything) shows the measurement can fail.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use moeshard_engine::resident::LoadMode;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{ExpertRow, LocalExperts, ModelConfig};
use moeshard_proto::tensor::{f32_from_le_bytes, f32_to_le_bytes};
use moeshard_proto::v1::{AssignRequest, Dtype, ExpertBatchRequest, ExpertId};
use moeshard_worker::{WorkerCore, WorkerError};

const HIDDEN: usize = 256;
const INTER: usize = 2048;
const EXPERTS: usize = 8;
const EXPERT_BYTES: u64 = (3 * HIDDEN * INTER * 4) as u64;
const MIB: u64 = 1 << 20;
const ALIGN: usize = 2 << 20;

/// Writes a one-layer qwen3_moe checkpoint holding only routed experts (all a worker opens).
fn write_checkpoint(dir: &Path) {
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": HIDDEN, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
        "intermediate_size": 512, "moe_intermediate_size": INTER, "num_experts": EXPERTS,
        "num_experts_per_tok": 2, "norm_topk_prob": true, "vocab_size": 32
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut header = BTreeMap::new();
    let mut data: Vec<u8> = Vec::new();
    let mut seed = 1u32;
    for e in 0..EXPERTS {
        for (name, shape) in [
            ("gate_proj", [INTER, HIDDEN]),
            ("up_proj", [INTER, HIDDEN]),
            ("down_proj", [HIDDEN, INTER]),
        ] {
            let start = data.len();
            for _ in 0..shape[0] * shape[1] {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = ((seed >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * 0.1;
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                format!("model.layers.0.mlp.experts.{e}.{name}.weight"),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
    }
    // Pad the header so the data, and so every 6 MiB expert, starts on a 2 MiB boundary: the
    // page cache may hold the file in folios up to that size, and a fault maps a whole folio.
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(ALIGN - 8, b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

fn assign(core: &WorkerCore, experts: &[usize]) -> Result<(), WorkerError> {
    core.assign(&AssignRequest {
        model_fingerprint: core.fingerprint().to_string(),
        experts: experts
            .iter()
            .map(|&e| ExpertId {
                layer: 0,
                expert: e as u32,
            })
            .collect(),
    })
    .map(|_| ())
}

fn hidden(n_tokens: usize) -> Vec<f32> {
    (0..n_tokens * HIDDEN)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect()
}

fn batch(n_tokens: usize, experts: &[usize]) -> (ExpertBatchRequest, Vec<ExpertRow>) {
    let rows: Vec<ExpertRow> = (0..n_tokens)
        .flat_map(|t| {
            experts.iter().map(move |&e| ExpertRow {
                token: t as u32,
                expert: e as u32,
                weight: 0.25 + t as f32 * 0.1,
            })
        })
        .collect();
    let req = ExpertBatchRequest {
        layer: 0,
        hidden_size: HIDDEN as u32,
        dtype: Dtype::F32 as i32,
        n_tokens: n_tokens as u32,
        activations: Bytes::from(f32_to_le_bytes(&hidden(n_tokens))),
        tokens: rows.iter().map(|r| r.token).collect(),
        experts: rows.iter().map(|r| r.expert).collect(),
        weights: rows.iter().map(|r| r.weight).collect(),
    };
    (req, rows)
}

/// A worker over the checkpoint in `dir`, holding its weights as `mode` says.
fn open(dir: &Path, mode: LoadMode, capacity: Option<u64>) -> WorkerCore {
    let (cfg, mut ckpt) = Checkpoint::open_with_config(dir).unwrap();
    ckpt.set_load_mode(mode);
    WorkerCore::from_checkpoint(dir, cfg, ckpt, capacity).unwrap()
}

#[tokio::test]
async fn a_quarter_of_the_experts_is_a_quarter_of_the_bytes() {
    for mode in [LoadMode::Memory, LoadMode::Mmap] {
        a_quarter_of_the_experts(mode).await;
    }
}

async fn a_quarter_of_the_experts(mode: LoadMode) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let core = open(dir.path(), mode, None);
    assert_eq!(core.capacity(), EXPERTS as u64 * EXPERT_BYTES);
    // The header (its first 2 MiB) was read at open; nothing else.
    let before = core.resident_checkpoint_bytes().expect("Linux smaps");
    assert!(
        before <= ALIGN as u64,
        "{mode:?}: {before} bytes resident before any assignment"
    );

    let mine = [1, 5];
    let quarter = mine.len() as u64 * EXPERT_BYTES;
    assign(&core, &mine).unwrap();
    let assigned = core.resident_checkpoint_bytes().unwrap() - before;
    match mode {
        // Copied at assignment, exactly, and the file's pages let go again.
        LoadMode::Memory => {
            assert_eq!(core.copied_weight_bytes(), quarter, "copied at assignment");
            assert!(
                assigned >= quarter && assigned <= quarter + MIB / 4,
                "{assigned} bytes resident after assigning {quarter}"
            );
        }
        LoadMode::Mmap => {
            assert_eq!(core.copied_weight_bytes(), 0);
            assert_eq!(assigned, 0, "assignment read weights");
        }
    }
    let (req, rows) = batch(4, &mine);
    let got = core.compute(req).await.unwrap();
    let resident = core.resident_checkpoint_bytes().unwrap() - before;
    eprintln!(
        "{mode:?}: resident after computing 2 of 8 experts: {:.2} MiB (assigned {:.2} MiB, all experts {:.2} MiB)",
        resident as f64 / MIB as f64,
        quarter as f64 / MIB as f64,
        (EXPERTS as u64 * EXPERT_BYTES) as f64 / MIB as f64
    );
    assert!(
        resident >= quarter * 95 / 100 && resident <= quarter + MIB / 4,
        "{mode:?}: resident {resident} bytes, assigned experts hold {quarter}"
    );

    // The answer is the in-process one.
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let all = LocalExperts::load_all(&cfg, &ckpt).unwrap();
    let want = all.compute(0, &hidden(4), &rows).unwrap();
    let got = f32_from_le_bytes(&got.outputs, Some(want.len())).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[tokio::test]
async fn control_touching_every_expert_makes_every_byte_resident() {
    for mode in [LoadMode::Memory, LoadMode::Mmap] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let core = open(dir.path(), mode, None);
        let every: Vec<usize> = (0..EXPERTS).collect();
        assign(&core, &every).unwrap();
        let (req, _) = batch(2, &every);
        core.compute(req).await.unwrap();
        let resident = core.resident_checkpoint_bytes().unwrap();
        let all = EXPERTS as u64 * EXPERT_BYTES;
        assert!(
            resident >= all * 95 / 100,
            "{mode:?}: resident {resident} of {all}"
        );
    }
}

#[tokio::test]
async fn a_growing_assignment_copies_only_the_new_experts() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let core = open(dir.path(), LoadMode::Memory, None);
    assign(&core, &[0, 1]).unwrap();
    assert_eq!(core.copied_weight_bytes(), 2 * EXPERT_BYTES);
    // Assignments add up: 0 and 1 are kept as they are, 2 and 3 copied.
    assign(&core, &[2, 3]).unwrap();
    assert_eq!(core.health().hosted_experts, 4);
    assert_eq!(
        core.copied_weight_bytes(),
        4 * EXPERT_BYTES,
        "held experts copied again"
    );
    let (req, rows) = batch(3, &[0, 3]);
    let got = core.compute(req).await.unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let want = LocalExperts::load_all(&cfg, &ckpt)
        .unwrap()
        .compute(0, &hidden(3), &rows)
        .unwrap();
    let got = f32_from_le_bytes(&got.outputs, Some(want.len())).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[tokio::test]
async fn requests_outside_the_assignment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let core = WorkerCore::open(dir.path(), Some(3 * EXPERT_BYTES)).unwrap();
    assert!(!core.health().ready);
    assign(&core, &[0, 1]).unwrap();
    assert!(core.health().ready);
    // Assignments add up, within capacity.
    assign(&core, &[2]).unwrap();
    assert_eq!(core.health().hosted_experts, 3);
    let err = assign(&core, &[3]).unwrap_err();
    assert!(
        matches!(err, WorkerError::OverCapacity { experts: 4, .. }),
        "{err}"
    );
    let err = assign(&core, &[EXPERTS]).unwrap_err();
    assert!(matches!(err, WorkerError::NoSuchExpert { .. }), "{err}");
    let err = core
        .assign(&AssignRequest {
            model_fingerprint: "0".repeat(64),
            experts: vec![],
        })
        .unwrap_err();
    assert!(
        matches!(err, WorkerError::FingerprintMismatch { .. }),
        "{err}"
    );
    // A batch for an expert not hosted, and malformed batches.
    let (req, _) = batch(1, &[4]);
    let err = core.compute(req).await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::NotHosted {
                layer: 0,
                expert: 4
            }
        ),
        "{err}"
    );
    let (mut req, _) = batch(2, &[0]);
    req.n_tokens = 3;
    assert!(matches!(
        core.compute(req).await,
        Err(WorkerError::BadBatch { .. })
    ));
    let (mut req, _) = batch(2, &[0]);
    req.tokens[1] = 2;
    assert!(matches!(
        core.compute(req).await,
        Err(WorkerError::BadBatch { .. })
    ));
    let (mut req, _) = batch(2, &[0]);
    req.weights.pop();
    assert!(matches!(
        core.compute(req).await,
        Err(WorkerError::BadBatch { .. })
    ));
    let (mut req, _) = batch(2, &[0]);
    req.dtype = Dtype::Bf16 as i32;
    assert!(matches!(
        core.compute(req).await,
        Err(WorkerError::BadBatch { .. })
    ));
    let (mut req, _) = batch(2, &[0]);
    req.n_tokens = u32::MAX;
    assert!(matches!(
        core.compute(req).await,
        Err(WorkerError::BadBatch { .. })
    ));
}
