//! The GGUF reader (metadata only, and the whole directory with tensor ranges) on arbitrary bytes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.gguf");
    let _ = moeshard_engine::gguf::parse_metadata(path, data);
    let _ = moeshard_engine::gguf::parse(path, data);
});
