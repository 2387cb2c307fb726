//! Quantize-on-load (`--quantize`): logits stay close to the transformers reference, and the
//! distributed run still equals the single-process run to the bit.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use common::{fixture, ids, reference};
use moeshard_engine::npy;

const MODELS: &[&str] = &["qwen3_moe_tiny", "mixtral_tiny", "qwen2_moe_tiny"];

fn logits(name: &str, extra: &[&str]) -> (Vec<u8>, Vec<f32>) {
    let toks: Vec<String> = ids(&reference(name)["tokens"])
        .iter()
        .map(u32::to_string)
        .collect();
    let (ok, bytes, stderr) = common::logits_npy(&fixture(name), &toks.join(","), extra);
    assert!(ok, "{name} logits {extra:?} failed: {stderr}");
    let (_, vals) = npy::decode_f32(&bytes, std::path::Path::new("logits.npy")).unwrap();
    (bytes, vals)
}

/// (max |error| / max |reference logit|, share of positions whose argmax agrees).
fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &v)| if v > m.1 { (i, v) } else { m },
            )
            .0
    };
    let rows = want.len() / vocab;
    let agree = (0..rows)
        .filter(|&r| {
            argmax(&got[r * vocab..(r + 1) * vocab]) == argmax(&want[r * vocab..(r + 1) * vocab])
        })
        .count();
    (err / scale, agree as f32 / rows as f32)
}

#[test]
fn quantized_logits_stay_close_to_the_reference() {
    for name in MODELS {
        let (shape, want) = npy::read_f32(&fixture(name).join("reference/logits.npy")).unwrap();
        let vocab = shape[1];
        for (q, all, bound) in [
            ("q8_0", false, 0.02),
            ("q8_0", true, 0.03),
            ("q4_0", false, 0.2),
        ] {
            let mut extra = vec!["--quantize", q];
            if all {
                extra.push("--quantize-all");
            }
            let (_, got) = logits(name, &extra);
            let (rel, agree) = compare(&got, &want, vocab);
            eprintln!(
                "{name} {extra:?}: max error {rel:.2e} of the largest logit, argmax agrees at {:.0}%",
                agree * 100.0
            );
            assert!(rel < bound, "{name} {extra:?}: error {rel} above {bound}");
            if q == "q8_0" {
                assert!(
                    agree >= 0.9,
                    "{name} {extra:?}: argmax agrees at only {agree}"
                );
            }
        }
    }
}

#[test]
fn quantized_cluster_equals_quantized_single_process() {
    for name in MODELS {
        let q = ["--quantize", "q8_0", "--quantize-all"];
        let (single, _) = logits(name, &q);
        let (plain, _) = logits(name, &[]);
        assert_ne!(single, plain, "{name}: --quantize changed nothing");
        for transport in ["grpc", "quic"] {
            let mut extra = q.to_vec();
            extra.extend(["--local-workers", "2", "--transport", transport]);
            let (dist, _) = logits(name, &extra);
            assert!(
                dist == single,
                "{name}: quantized logits over 2 {transport} workers differ from single-process"
            );
        }
    }
}
