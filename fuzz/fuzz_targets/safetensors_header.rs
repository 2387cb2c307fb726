//! The safetensors header parser on arbitrary file bytes: errors are fine, panics and runaway
//! allocations are not.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moeshard_engine::safetensors::parse_header(Path::new("fuzz.safetensors"), data);
});
