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
    assert!(stdout.contains("3 of 6 tensors converted"), "{stdout}");
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
    // A directory is read as a checkpoint: this one has none.
    assert!(!ok);
    assert!(
        stderr.contains(dir.path().to_str().unwrap()) && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Metadata keys llama.cpp's converter writes that we do not (or write differently on purpose):
/// the display name (ours is the directory's), its size label, and the sep flag of a tokenizer
/// without a separator.
const NOT_COMPARED: &[&str] = &[
    "general.name",
    "general.size_label",
    "tokenizer.ggml.add_sep_token",
];

/// A Hugging Face checkpoint converted by `moeshard quantize DIR` equals what llama.cpp's own
/// convert_hf_to_gguf.py wrote from the same checkpoint (tests/fixtures/gguf, made by
/// make_gguf_fixtures.py): the same metadata values, tensor names, types, dims and bytes, for
/// f32, f16 and q8_0, on the three GGUF architectures (the llama one with its Q/K permutation).
#[test]
fn a_checkpoint_converts_to_the_file_llama_cpps_converter_writes() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = common::fixture("gguf");
    let mut compared = 0;
    for model in ["qwen3_moe_gguf", "qwen2_moe_gguf", "mixtral_tiny"] {
        for ty in ["f32", "f16", "q8_0"] {
            let theirs = fixtures.join(format!("{model}-{ty}.gguf"));
            if !theirs.exists() {
                continue; // not every pair was made (see tests/fixtures/gguf/README.md)
            }
            let ours = dir.path().join(format!("{model}-{ty}.gguf"));
            let (ok, stdout, stderr) = run(&[
                "quantize",
                common::fixture(model).to_str().unwrap(),
                ours.to_str().unwrap(),
                "--type",
                ty,
            ]);
            assert!(ok, "{model} {ty}: {stderr}");
            assert!(stdout.contains("wrote"), "{stdout}");
            let a = GgufFile::open(&ours).unwrap();
            let b = GgufFile::open(&theirs).unwrap();
            for (k, v) in &b.metadata {
                if NOT_COMPARED.contains(&k.as_str()) {
                    continue;
                }
                assert_eq!(a.metadata.get(k), Some(v), "{model} {ty}: metadata {k}");
            }
            for k in a.metadata.keys() {
                assert!(
                    b.metadata.contains_key(k)
                        || NOT_COMPARED.contains(&k.as_str())
                        || k == "tokenizer.ggml.add_eos_token",
                    "{model} {ty}: we write {k}, llama.cpp does not"
                );
            }
            assert_eq!(
                a.tensors.keys().collect::<Vec<_>>(),
                b.tensors.keys().collect::<Vec<_>>(),
                "{model} {ty}"
            );
            for (name, tb) in &b.tensors {
                let ta = &a.tensors[name];
                assert_eq!((ta.ty, &ta.dims), (tb.ty, &tb.dims), "{model} {ty}: {name}");
                assert!(
                    a.tensor_bytes(name) == b.tensor_bytes(name),
                    "{model} {ty}: the bytes of {name} differ"
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 8, "the fixtures of tests/fixtures/gguf");
}

/// The converted file is a model: a converted F32 checkpoint gives the safetensors path's logits
/// bit for bit; a Q8_0 one runs too (its closeness to the reference is what tests/gguf.rs checks
/// of llama.cpp's identical file).
#[test]
fn a_converted_checkpoint_runs_and_equals_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("qwen3_moe_gguf");
    let gguf = dir.path().join("m.gguf");
    let (ok, _, stderr) = run(&[
        "quantize",
        src.to_str().unwrap(),
        gguf.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    assert!(ok, "{stderr}");
    let logits = |model: &std::path::Path| {
        let (ok, bytes, stderr) = common::logits_npy(model, "3,14,15,92,65,35", &[]);
        assert!(ok, "{stderr}");
        bytes
    };
    assert!(logits(&src) == logits(&gguf));
}

/// What llama.cpp's GGUF architectures cannot hold is refused by name, and nothing is left behind.
#[test]
fn a_checkpoint_llama_cpp_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    for (model, needle) in [
        ("qwen3_moe_tiny", "layer 1 is a dense MLP"),
        ("deepseek_v3_tiny", "deepseek_v3"),
    ] {
        let (ok, _, stderr) = run(&[
            "quantize",
            common::fixture(model).to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            "q8_0",
        ]);
        assert!(!ok, "{model}");
        assert!(stderr.contains(needle), "{model}: {stderr}");
        assert!(!out.exists() && !dir.path().join("out.gguf.partial").exists());
    }
}
