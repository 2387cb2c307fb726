//! Bad input gets a clear error naming what and where, and a non-zero exit; never a panic.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::path::Path;

use common::{copy_fixture, fixture, run};

const FIX: &str = "qwen3_moe_tiny";

/// Runs `logits` on `dir`; asserts failure and that stderr mentions every one of `needles`.
fn expect_failure(dir: &Path, tokens: &str, needles: &[&str]) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        tokens,
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok, "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Replaces `from` by `to` (same length) inside the safetensors header.
fn edit_header(file: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    assert!(header.contains(from), "header lacks {from}");
    let header = header.replacen(from, to, 1);
    bytes[8..8 + n].copy_from_slice(header.as_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn missing_config() {
    let d = copy_fixture(FIX);
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    expect_failure(d.path(), "1,2", &["config.json", "missing"]);
}

#[test]
fn missing_weights() {
    let d = copy_fixture(FIX);
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_failure(d.path(), "1,2", &["model.safetensors", "missing"]);
}

#[test]
fn missing_shard() {
    let d = copy_fixture("qwen3_moe_bf16_sharded");
    std::fs::remove_file(d.path().join("model-00002-of-00003.safetensors")).unwrap();
    expect_failure(
        d.path(),
        "1,2",
        &["model-00002-of-00003.safetensors", "missing"],
    );
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture(FIX);
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(d.path(), "1,2", &["model.safetensors", "truncated"]);
}

#[test]
fn file_shorter_than_its_header() {
    let d = copy_fixture(FIX);
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..100]).unwrap();
    expect_failure(d.path(), "1,2", &["model.safetensors", "header"]);
}

#[test]
fn corrupt_header_json() {
    let d = copy_fixture(FIX);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&p, bytes).unwrap();
    expect_failure(d.path(), "1,2", &["model.safetensors", "not valid JSON"]);
}

#[test]
fn absurd_header_length() {
    let d = copy_fixture(FIX);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    expect_failure(d.path(), "1,2", &["model.safetensors", "exceeds"]);
}

#[test]
fn missing_tensor() {
    let d = copy_fixture(FIX);
    edit_header(
        &d.path().join("model.safetensors"),
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_prox.weight",
    );
    expect_failure(
        d.path(),
        "1,2",
        &["model.layers.2.self_attn.q_proj.weight", "not found"],
    );
}

#[test]
fn tensor_of_wrong_shape_for_the_config() {
    let d = copy_fixture(FIX);
    edit_config(d.path(), |v| v["moe_intermediate_size"] = 31.into());
    expect_failure(
        d.path(),
        "1,2",
        &["experts.0.gate_proj.weight", "[31, 64]", "[32, 64]"],
    );
}

#[test]
fn tensor_of_unsupported_dtype() {
    let d = copy_fixture(FIX);
    edit_header(&d.path().join("model.safetensors"), "\"F32\"", "\"I32\"");
    expect_failure(d.path(), "1,2", &["dtype I32 is not supported"]);
}

#[test]
fn tensor_whose_dtype_disagrees_with_its_size() {
    let d = copy_fixture(FIX);
    edit_header(&d.path().join("model.safetensors"), "\"F32\"", "\"F16\"");
    expect_failure(d.path(), "1,2", &["model.safetensors", "needs", "bytes"]);
}

#[test]
fn token_outside_the_vocabulary() {
    expect_failure(
        &fixture(FIX),
        "1,2,512",
        &["token id 512", "vocabulary of 512"],
    );
}

#[test]
fn unsupported_model_type() {
    let d = copy_fixture(FIX);
    edit_config(d.path(), |v| v["model_type"] = "llama".into());
    expect_failure(d.path(), "1,2", &["\"llama\"", "qwen3_moe", "mixtral"]);
}

#[test]
fn unsupported_rope_type() {
    let d = copy_fixture(FIX);
    edit_config(d.path(), |v| {
        v["rope_parameters"]["rope_type"] = "longrope".into()
    });
    expect_failure(d.path(), "1,2", &["config.json", "longrope"]);
}

#[test]
fn yarn_rope_without_its_factor() {
    let d = copy_fixture(FIX);
    edit_config(d.path(), |v| {
        v["rope_parameters"]["rope_type"] = "yarn".into()
    });
    expect_failure(d.path(), "1,2", &["config.json", "yarn", "factor"]);
}

#[test]
fn malformed_config_value() {
    let d = copy_fixture(FIX);
    edit_config(d.path(), |v| v["hidden_size"] = "wide".into());
    expect_failure(d.path(), "1,2", &["config.json", "hidden_size"]);
}

#[test]
fn generate_with_a_missing_tokenizer() {
    let d = copy_fixture(FIX);
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let (ok, _, err) = run(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!ok && !err.contains("panicked"));
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn logits_cli_writes_what_the_library_computes() {
    let r = common::reference(FIX);
    let tokens: Vec<String> = common::ids(&r["tokens"])
        .iter()
        .map(u32::to_string)
        .collect();
    let out = tempfile::NamedTempFile::new().unwrap();
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        fixture(FIX).to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (shape, got) = moeshard_engine::npy::read_f32(out.path()).unwrap();
    let (_, want) =
        moeshard_engine::npy::read_f32(&fixture(FIX).join("reference/logits.npy")).unwrap();
    assert_eq!(shape, vec![tokens.len(), 512]);
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err / max_ref <= 1e-4);
}

#[test]
fn generate_streams_text_greedily() {
    let (ok, out, err) = run(&[
        "generate",
        "--model",
        fixture(FIX).to_str().unwrap(),
        "--prompt",
        "The robot",
        "--max-tokens",
        "12",
    ]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty(), "no text generated");
    let (ok2, out2, _) = run(&[
        "generate",
        "--model",
        fixture(FIX).to_str().unwrap(),
        "--prompt",
        "The robot",
        "--max-tokens",
        "12",
    ]);
    assert!(ok2);
    assert_eq!(out, out2, "greedy generation is deterministic");
    let (ok3, out3, err3) = run(&[
        "generate",
        "--model",
        fixture(FIX).to_str().unwrap(),
        "--prompt",
        "Tell me about stones",
        "--chat",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ]);
    assert!(ok3 && !out3.trim().is_empty(), "{err3}");
}
