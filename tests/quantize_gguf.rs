//! `moeshard quantize`: GGUF in, GGUF out, float matrices quantized, the rest kept.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use common::run;
use moeshard_engine::gguf::{GgmlType, GgufFile, Value, Writer};
use moeshard_engine::quant::{self, QType};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
}

fn write_input(path: &std::path::Path) {
    let mut w = Writer::new();
    w.meta("general.architecture", Value::String("qwen3moe".into()))
        .meta("general.file_type", Value::U32(0))
        .meta("qwen3moe.block_count", Value::U32(1));
    // [rows 4, cols 512] matrix; stacked experts [cols 256, rows 3, experts 2]; a 96-wide matrix
    // (not whole K blocks: falls back to Q8_0); a 40-wide one (stays F32); a router and a norm.
    w.tensor(
        "blk.0.attn_q.weight",
        GgmlType::F32,
        vec![512, 4],
        f32_bytes(&values(2048, 1.0)),
    );
    let f16: Vec<u8> = values(1536, 2.0)
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    w.tensor(
        "blk.0.ffn_up_exps.weight",
        GgmlType::F16,
        vec![256, 3, 2],
        f16,
    );
    w.tensor(
        "blk.0.attn_k.weight",
        GgmlType::F32,
        vec![96, 2],
        f32_bytes(&values(192, 3.0)),
    );
    w.tensor(
        "blk.0.attn_v.weight",
        GgmlType::F32,
        vec![40, 2],
        f32_bytes(&values(80, 4.0)),
    );
    w.tensor(
        "blk.0.ffn_gate_inp.weight",
        GgmlType::F32,
        vec![256, 2],
        f32_bytes(&values(512, 5.0)),
    );
    w.tensor(
        "blk.0.attn_norm.weight",
        GgmlType::F32,
        vec![256],
        f32_bytes(&values(256, 6.0)),
    );
    std::fs::write(path, w.to_bytes()).unwrap();
}

#[test]
fn quantize_writes_a_gguf_with_the_float_matrices_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.gguf");
    let output = dir.path().join("out.gguf");
    write_input(&input);
    let (ok, stdout, stderr) = run(&[
        "quantize",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        "--type",
        "q4_k",
    ]);
    assert!(ok, "quantize failed: {stderr}");
    assert!(stdout.contains("3 of 6 tensors quantized"), "{stdout}");
    let out = GgufFile::open(&output).unwrap();
    let ty = |n: &str| out.tensors[n].ty;
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.ffn_up_exps.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.attn_k.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::F32);
    assert_eq!(ty("blk.0.ffn_gate_inp.weight"), GgmlType::F32);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
    assert_eq!(
        out.tensors["blk.0.ffn_up_exps.weight"].dims,
        vec![256, 3, 2]
    );
    assert_eq!(out.get("general.file_type"), Some(&Value::U32(14)));
    assert_eq!(
        out.get("general.architecture"),
        Some(&Value::String("qwen3moe".into()))
    );
    // The kept tensors are byte for byte the input's; the quantized ones decode close to it.
    let inp = GgufFile::open(&input).unwrap();
    for n in [
        "blk.0.attn_v.weight",
        "blk.0.ffn_gate_inp.weight",
        "blk.0.attn_norm.weight",
    ] {
        assert_eq!(out.tensor_bytes(n), inp.tensor_bytes(n), "{n}");
    }
    let mut deq = vec![0f32; 2048];
    quant::dequantize(
        QType::Q4_K,
        out.tensor_bytes("blk.0.attn_q.weight").unwrap(),
        &mut deq,
    );
    let want = values(2048, 1.0);
    let err = deq
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.15, "q4_k round trip error {err}");
}

#[test]
fn quantize_refuses_bad_input_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let out = dir.path().join("out.gguf");
    let (ok, _, stderr) = run(&[
        "quantize",
        junk.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("junk.gguf"), "{stderr}");
    assert!(!out.exists() && !dir.path().join("out.gguf.partial").exists());
    let (ok, _, stderr) = run(&[
        "quantize",
        dir.path().to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("is a directory"), "{stderr}");
}
