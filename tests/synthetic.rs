//! Synthetic weights: a config alone runs, the same on every process, across real workers.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use common::{fixture, run};

fn logits(args: &[&str]) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut all = vec![
        "logits",
        "--tokens",
        "1,5,9,200,31,7",
        "--out",
        out.path().to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let (ok, _, err) = run(&all);
    assert!(ok, "{err}");
    std::fs::read(out.path()).unwrap()
}

#[test]
fn a_bare_config_runs_and_workers_make_the_same_weights() {
    // A config.json alone, copied away from its weights.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("model-config.json");
    std::fs::copy(fixture("qwen2_moe_tiny").join("config.json"), &cfg).unwrap();
    let cfg = cfg.to_str().unwrap();
    let single = logits(&["--model", cfg, "--synthetic"]);
    assert_eq!(
        single,
        logits(&["--model", cfg, "--synthetic"]),
        "deterministic"
    );
    for transport in ["grpc", "quic"] {
        let two = logits(&[
            "--model",
            cfg,
            "--synthetic",
            "--local-workers",
            "2",
            "--transport",
            transport,
        ]);
        assert_eq!(single, two, "{transport}: workers made other weights");
    }
    // Another seed makes other weights.
    assert_ne!(
        single,
        logits(&["--model", cfg, "--synthetic", "--synthetic-seed", "9"])
    );
    // Fewer layers: a different model, still runnable.
    let one = logits(&["--model", cfg, "--synthetic", "--layers", "1"]);
    assert_ne!(single, one);
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        cfg,
        "--synthetic",
        "--layers",
        "7",
        "--tokens",
        "1",
        "--out",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("--layers 7"), "{err}");
}

#[test]
fn synthetic_layers_need_synthetic() {
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        fixture("qwen3_moe_tiny").to_str().unwrap(),
        "--layers",
        "1",
        "--tokens",
        "1",
        "--out",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("--synthetic"), "{err}");
}

#[test]
fn new_architectures_run_from_a_bare_config() {
    // MLA + grouped sigmoid routing, and Gated DeltaNet + gated attention: the synthetic index
    // has every tensor they load, and workers make the same weights.
    for name in [
        "deepseek_v3_no_q_lora",
        "deepseek_v3_tiny",
        "qwen3_5_moe_tiny",
        "qwen3_next_tiny",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::copy(fixture(name).join("config.json"), &cfg).unwrap();
        let cfg = cfg.to_str().unwrap();
        let single = logits(&["--model", cfg, "--synthetic"]);
        assert!(!single.is_empty(), "{name}");
        let two = logits(&["--model", cfg, "--synthetic", "--local-workers", "2"]);
        assert_eq!(single, two, "{name}: workers made other weights");
    }
    // GPT-OSS keeps its experts fused: refused with a reason, not a missing tensor.
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        fixture("gpt_oss_tiny")
            .join("config.json")
            .to_str()
            .unwrap(),
        "--synthetic",
        "--tokens",
        "1",
        "--out",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("gpt_oss"), "{err}");
}
