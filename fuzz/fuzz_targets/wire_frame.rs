//! The QUIC frame reader and the protobuf decoder of every message, on arbitrary stream bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard_proto::frame::read_frame;
use moeshard_proto::v1::Envelope;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // A byte slice never waits, so a current-thread runtime drives the reader to its end.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut r = data;
        // Read frames until the bytes end or one is refused.
        for _ in 0..64 {
            if read_frame(&mut r, 1 << 20).await.is_err() {
                break;
            }
        }
    });
    let _ = Envelope::decode(data);
});
