//! A live worker core (the qwen3_moe_tiny fixture, every expert assigned) fed arbitrary expert
//! batch requests: malformed ones must be refused with an error, never a panic.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use moeshard_proto::v1::{AssignRequest, ExpertBatchRequest, ExpertId};
use moeshard_worker::WorkerCore;
use prost::Message;

fn core() -> &'static Arc<WorkerCore> {
    static CORE: OnceLock<Arc<WorkerCore>> = OnceLock::new();
    CORE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe_tiny");
        let core = WorkerCore::open(&dir, None).expect("the fixture opens");
        let cfg = core.config();
        let experts = cfg
            .moe_layers()
            .flat_map(|l| {
                (0..cfg.num_experts).map(move |e| ExpertId {
                    layer: l as u32,
                    expert: e as u32,
                })
            })
            .collect();
        core.assign(&AssignRequest {
            model_fingerprint: core.fingerprint().to_string(),
            experts,
        })
        .expect("assign every expert");
        Arc::new(core)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = ExpertBatchRequest::decode(data) else {
        return;
    };
    let core = core();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _ = rt.block_on(core.compute(req));
});
