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

#[test]
fn calibrate_refuses_a_model_larger_than_memory_and_says_what_to_pass() {
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/configs/qwen3-235b-a22b.json");
    let cfg = cfg.to_str().unwrap();
    let (ok, _, err) = run(&["calibrate", "--model", cfg, "--rpc", "grpc"]);
    assert!(!ok, "a 235B model cannot be built four times over here");
    assert!(
        err.contains("qwen3-235b-a22b.json") && err.contains("GB") && err.contains("--layers"),
        "{err}"
    );
    assert!(err.contains("--rpc none"), "{err}");
    let (ok, _, err) = run(&["calibrate", "--model", cfg, "--rpc", "none"]);
    assert!(
        !ok && err.contains("--layers") && !err.contains("--rpc none"),
        "{err}"
    );
}

#[test]
fn calibrate_measures_dispatches_to_real_workers_and_plans_read_them() {
    let cfg = fixture("qwen3_moe_tiny").join("config.json");
    let cfg = cfg.to_str().unwrap();
    let common = [
        "calibrate",
        "--name",
        "probe-node",
        "--model",
        cfg,
        "--quant",
        "bf16",
        "--rpc",
        "grpc,quic",
        "--bytes",
        "4194304",
        "--decode-tokens",
        "8",
        "--prefill-tokens",
        "16",
        "--rounds",
        "2",
    ];
    let (ok, out, err) = run(&[&common[..], &["--json"]].concat());
    assert!(ok, "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rpc = c["rpc"].as_array().unwrap();
    let transports: Vec<&str> = rpc
        .iter()
        .map(|r| r["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports, ["grpc", "quic"]);
    for r in rpc {
        for k in ["overhead_us", "per_worker_us", "per_kb_us"] {
            let v = r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
            // Figures of real round trips: never negative, never absurd on loopback.
            assert!(v.is_finite() && (0.0..1e6).contains(&v), "{k} = {v} in {r}");
        }
        // A dispatch to another process costs more than computing the rows here: at least a
        // loopback round trip and the wake-ups around it.
        let o = r["overhead_us"].as_f64().unwrap();
        assert!(o > 10.0, "overhead_us = {o} in {r}");
    }
    assert!(c["rates"]["bf16"]["expert_gbs"].as_f64().unwrap() > 0.0);
    // The node entry and link written as TOML plan the model.
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("cluster.toml");
    let (ok, _, err) = run(&[&common[..], &["--out", toml.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("name = \"probe-node\""), "{text}");
    assert!(text.contains("[node.rates.bf16]"), "{text}");
    assert!(
        text.contains("overhead_us = ") && text.contains("per_worker_us = "),
        "{text}"
    );
    let (ok, out, err) = run(&[
        "plan",
        "--model",
        cfg,
        "--cluster",
        toml.to_str().unwrap(),
        "--quant",
        "bf16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(p["decode_tok_s"].as_f64().unwrap() > 0.0, "{p}");
}

#[test]
fn the_example_plans_in_the_docs_are_what_plan_prints() {
    // docs/plans.md shows `moeshard plan` runs on the example configs and clusters; a change of
    // the planner that moves any figure must show there too.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/plans.md")).unwrap();
    let mut checked = 0;
    for block in doc.split("```\n").skip(1).step_by(2) {
        let Some(rest) = block.strip_prefix("$ moeshard plan ") else {
            continue;
        };
        let (cmd, shown) = rest.split_once('\n').unwrap();
        let args: Vec<String> = std::iter::once("plan".to_string())
            .chain(cmd.split_whitespace().map(|a| {
                if a.starts_with("examples/") {
                    root.join(a).display().to_string()
                } else {
                    a.to_string()
                }
            }))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = run(&args);
        assert!(ok, "moeshard plan {cmd}: {err}");
        let out = out.replace(&format!("{}/", root.display()), "");
        assert_eq!(
            out.trim_end(),
            shown.trim_end(),
            "docs/plans.md is stale for `moeshard plan {cmd}`"
        );
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} example plans found in docs/plans.md"
    );
}
