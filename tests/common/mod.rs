//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Every reference fixture (made by tests/fixtures/make_fixtures.py; the `*_gguf` ones by
/// make_gguf_fixtures.py with the same machinery).
pub const FIXTURES: &[&str] = &[
    "qwen3_moe_tiny",
    "qwen3_moe_bf16_sharded",
    "qwen3_moe_hf4_config",
    "mixtral_tiny",
    "mixtral_top1_f16",
    "qwen2_moe_tiny",
    "deepseek_v3_tiny",
    "deepseek_v3_no_q_lora",
    "deepseek_v3_fp8",
    "gpt_oss_tiny",
    "gpt_oss_mxfp4",
    "qwen3_5_moe_tiny",
    "qwen3_next_tiny",
    "qwen3_moe_gguf",
    "qwen2_moe_gguf",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    let p = fixture(name).join("reference/ref.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an id: {x}")) as u32)
        .collect()
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moeshard"))
}

/// Runs the binary; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .expect("run moeshard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `moeshard logits --model MODEL --tokens TOKENS --out <a temporary file>` followed by `extra`:
/// (it succeeded, the .npy bytes it wrote (empty on failure), its stderr).
#[allow(dead_code)] // not every test crate computes logits
pub fn logits_npy(model: &Path, tokens: &str, extra: &[&str]) -> (bool, Vec<u8>, String) {
    let out = tempfile::NamedTempFile::new().expect("temporary file");
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--tokens",
        tokens,
        "--out",
        out.path().to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = run(&args);
    (ok, std::fs::read(out.path()).unwrap_or_default(), stderr)
}

/// Copies a fixture into a temporary directory (for tests that damage it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("read fixture") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    dir
}
