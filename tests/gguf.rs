//! A GGUF file alone is a complete model: the files llama.cpp's converter made from our fixtures
//! (tests/fixtures/gguf, see make_gguf_fixtures.py) load, compute and tokenize like the
//! safetensors checkpoints they came from, and malformed ones fail with errors naming what.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, ids, reference, run};
use moeshard_engine::generate::{GenerateRequest, all_logits, generate};
use moeshard_engine::gguf::{GgmlType, GgufFile, Value, Writer};
use moeshard_engine::sampling::{SamplingParams, argmax};
use moeshard_engine::tokenizer::{ChatMessage, Tokenizer};
use moeshard_engine::{LocalExperts, Model, npy};

fn gguf(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

/// (GGUF file, the safetensors fixture it was converted from).
const SAME_WEIGHTS: &[(&str, &str)] = &[
    ("qwen3_moe_gguf-f32.gguf", "qwen3_moe_gguf"),
    ("qwen2_moe_gguf-f32.gguf", "qwen2_moe_gguf"),
    ("mixtral_tiny-f32.gguf", "mixtral_tiny"),
    // Stored f16 in both: the same values, so the same bits out.
    ("mixtral_top1_f16-f16.gguf", "mixtral_top1_f16"),
];

/// f16 files made from f32 checkpoints: within a bound of the f32 reference.
const F16_FROM_F32: &[(&str, &str)] = &[
    ("qwen3_moe_gguf-f16.gguf", "qwen3_moe_gguf"),
    ("qwen2_moe_gguf-f16.gguf", "qwen2_moe_gguf"),
];

fn load(path: &Path) -> (Model, LocalExperts) {
    let (model, ckpt) =
        Model::load(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let experts = LocalExperts::load_all(&model.cfg, &ckpt).unwrap();
    (model, experts)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gguf_config_equals_the_checkpoint_config() {
    for (file, dir) in SAME_WEIGHTS.iter().chain(F16_FROM_F32) {
        let (a, _) = load(&gguf(file));
        let (b, _) = load(&fixture(dir));
        assert_eq!(
            format!("{:?}", a.cfg),
            format!("{:?}", b.cfg),
            "{file} vs {dir}"
        );
    }
}

#[test]
fn gguf_logits_equal_the_safetensors_path_bit_for_bit() {
    for (file, dir) in SAME_WEIGHTS {
        let tokens = ids(&reference(dir)["tokens"]);
        let (gm, ge) = load(&gguf(file));
        let (sm, se) = load(&fixture(dir));
        let got = all_logits(&gm, &ge, &tokens).unwrap();
        let want = all_logits(&sm, &se, &tokens).unwrap();
        assert_eq!(got.len(), want.len(), "{file}");
        assert!(
            bits(&got) == bits(&want),
            "{file}: logits differ from {dir}"
        );
        // And both are the transformers reference (to its tolerance).
        let (_, reference_logits) =
            npy::read_f32(&fixture(dir).join("reference/logits.npy")).unwrap();
        let max_ref = reference_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&reference_logits)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err / max_ref <= 1e-4, "{file}: {:e}", err / max_ref);
    }
}

#[test]
fn gguf_greedy_tokens_equal_the_reference() {
    for (file, dir) in SAME_WEIGHTS.iter().chain(F16_FROM_F32) {
        let r = reference(dir);
        let want = ids(&r["greedy_tokens"]);
        let (model, experts) = load(&gguf(file));
        let req = GenerateRequest {
            prompt: ids(&r["greedy_prompt"]),
            max_tokens: want.len(),
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            max_context: 4096,
        };
        let got = generate(&model, &experts, &req, |_| Ok(true)).unwrap();
        assert_eq!(got.tokens, want, "{file}: greedy tokens");
    }
}

/// Stated bound: f16 weights (from f32 ones) move the logits by at most 3e-3 of the largest
/// logit (measured: 7.1e-4 for qwen3moe, 7.5e-4 for qwen2moe), and never the argmax of the
/// reference positions.
#[test]
fn f16_gguf_logits_are_within_the_stated_bound() {
    for (file, dir) in F16_FROM_F32 {
        let tokens = ids(&reference(dir)["tokens"]);
        let (_, want) = npy::read_f32(&fixture(dir).join("reference/logits.npy")).unwrap();
        let (model, experts) = load(&gguf(file));
        let got = all_logits(&model, &experts, &tokens).unwrap();
        let vocab = model.cfg.vocab_size;
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{file}: max relative logit error {:.3e}", err / max_ref);
        assert!(err / max_ref <= 3e-3, "{file}: {:e}", err / max_ref);
        assert!(
            err > 0.0,
            "{file}: f16 weights cannot give the f32 logits exactly"
        );
        for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            assert_eq!(argmax(g), argmax(w), "{file}: argmax at {pos}");
        }
    }
}

/// Q8_0 files from llama.cpp's converter (every matrix but the routers in Q8_0) against the f32
/// reference.
const Q8_0_FROM_F32: &[(&str, &str)] = &[
    ("qwen3_moe_gguf-q8_0.gguf", "qwen3_moe_gguf"),
    ("qwen2_moe_gguf-q8_0.gguf", "qwen2_moe_gguf"),
    ("mixtral_tiny-q8_0.gguf", "mixtral_tiny"),
];

/// Stated bound: Q8_0 weights move the logits by at most 3e-2 of the largest logit (the
/// benchmark-shaped model's Q8_0 error is 2.3e-2 in llama.cpp); the greedy tokens are reported.
#[test]
fn q8_0_gguf_logits_are_within_the_stated_bound() {
    for (file, dir) in Q8_0_FROM_F32 {
        let r = reference(dir);
        let tokens = ids(&r["tokens"]);
        let (_, want) = npy::read_f32(&fixture(dir).join("reference/logits.npy")).unwrap();
        let (model, experts) = load(&gguf(file));
        let got = all_logits(&model, &experts, &tokens).unwrap();
        let vocab = model.cfg.vocab_size;
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let same_argmax = got
            .chunks(vocab)
            .zip(want.chunks(vocab))
            .filter(|(g, w)| argmax(g) == argmax(w))
            .count();
        let want_greedy = ids(&r["greedy_tokens"]);
        let req = GenerateRequest {
            prompt: ids(&r["greedy_prompt"]),
            max_tokens: want_greedy.len(),
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            max_context: 4096,
        };
        let greedy = generate(&model, &experts, &req, |_| Ok(true))
            .unwrap()
            .tokens;
        let agree = greedy
            .iter()
            .zip(&want_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{file}: max relative logit error {:.3e}, argmax equal at {same_argmax}/{} positions, greedy tokens equal to the f32 reference for the first {agree}/{}",
            err / max_ref,
            tokens.len(),
            want_greedy.len()
        );
        assert!(err / max_ref <= 3e-2, "{file}: {:e}", err / max_ref);
        assert!(
            err > 0.0,
            "{file}: Q8_0 weights cannot give the f32 logits exactly"
        );
    }
}

#[test]
fn gguf_tokenizer_matches_the_hugging_face_tokenizer() {
    let strings = [
        "Hello, world!",
        "The robot counted 1234567 stones on 2026-11-26, didn't it? It's 3.14.",
        "naïve café — Ünïcödé 😀 日本語のテキスト",
        "  leading spaces,\ttabs\n\nand newlines  \n",
        "<|im_start|>user\nhi<|im_end|>",
        "<s> [INST] inline </s> specials <unk>",
        "",
    ];
    for (file, dir) in SAME_WEIGHTS.iter().chain(F16_FROM_F32) {
        let g = Tokenizer::from_dir(&gguf(file)).unwrap();
        let h = Tokenizer::from_dir(&fixture(dir)).unwrap();
        let r = reference(dir);
        let prompt = r["prompt_text"].as_str().unwrap();
        assert_eq!(
            g.encode(prompt, false).unwrap(),
            ids(&r["prompt_text_ids"]),
            "{file}: prompt text"
        );
        assert_eq!(
            g.encode(prompt, true).unwrap(),
            ids(&r["prompt_text_ids_with_special_tokens"]),
            "{file}: prompt text with special tokens"
        );
        for s in strings {
            for special in [false, true] {
                let a = g.encode(s, special).unwrap();
                assert_eq!(a, h.encode(s, special).unwrap(), "{file}: encode {s:?}");
                assert_eq!(
                    g.decode(&a).unwrap(),
                    h.decode(&a).unwrap(),
                    "{file}: {s:?}"
                );
            }
        }
        // Every id, alone and in a run (padding ids decode to nothing in both).
        let all: Vec<u32> = (0..model_vocab(file)).collect();
        assert_eq!(g.decode(&all).unwrap(), h.decode(&all).unwrap(), "{file}");
        for id in all {
            assert_eq!(
                g.decode(&[id]).unwrap(),
                h.decode(&[id]).unwrap(),
                "{file}: {id}"
            );
        }
        assert_eq!(g.eos_token(), h.eos_token(), "{file}: eos");
        let mut chats = vec![r["chat"].clone()];
        chats.extend(r["chat_variants"].as_array().unwrap().iter().cloned());
        for chat in chats {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(chat["messages"].clone()).unwrap();
            let rendered = g.apply_chat_template(&messages, true).unwrap();
            assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{file}");
            assert_eq!(
                g.encode(&rendered, false).unwrap(),
                ids(&chat["rendered_ids"]),
                "{file}: rendered ids"
            );
        }
    }
}

/// A SentencePiece tokenizer (`tokenizer.ggml.model = "llama"`, as Mixtral and Llama GGUF files
/// carry it; no merges stored, only scores) encodes and decodes as SentencePiece itself does:
/// tests/fixtures/make_spm_fixture.py trained it, had llama.cpp's converter write the file and
/// recorded SentencePiece's ids and decoded texts.
#[test]
fn sentencepiece_gguf_tokenizer_matches_sentencepiece() {
    let file = gguf("mixtral_spm-f16.gguf");
    let t = Tokenizer::from_dir(&file).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf("mixtral_spm_tokens.json")).unwrap())
            .unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        // With bos, as Llama's tokenizer adds it.
        assert_eq!(t.encode(text, true).unwrap(), want, "encode {text:?}");
        assert_eq!(t.encode(text, false).unwrap(), want[1..], "encode {text:?}");
        assert_eq!(
            t.decode(&want).unwrap(),
            c["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
    }
    // The same weights as mixtral_top1_f16's GGUF: the same logits for the same ids.
    let (a, ea) = load(&file);
    let (b, eb) = load(&gguf("mixtral_top1_f16-f16.gguf"));
    let toks = [1, 433, 480, 434, 351, 436, 278];
    assert!(
        bits(&all_logits(&a, &ea, &toks).unwrap()) == bits(&all_logits(&b, &eb, &toks).unwrap())
    );
}

fn model_vocab(file: &str) -> u32 {
    let f = GgufFile::open(&gguf(file)).unwrap();
    f.tensors["token_embd.weight"].dims[1] as u32
}

#[test]
fn cli_generates_and_computes_logits_from_a_gguf_file() {
    let (file, dir) = SAME_WEIGHTS[0];
    let path = gguf(file);
    let tokens: Vec<String> = ids(&reference(dir)["tokens"])
        .iter()
        .map(u32::to_string)
        .collect();
    let tokens = tokens.join(",");
    let out = tempfile::NamedTempFile::new().unwrap();
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        path.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--out",
        out.path().to_str().unwrap(),
        "--local-workers",
        "2",
    ]);
    assert!(ok, "{err}");
    let (_, got) = npy::read_f32(out.path()).unwrap();
    let (model, experts) = load(&fixture(dir));
    let want = all_logits(&model, &experts, &ids(&reference(dir)["tokens"])).unwrap();
    assert!(
        bits(&got) == bits(&want),
        "two workers serving the GGUF's experts give other logits"
    );
    let generate_text = |model: &Path| {
        let (ok, out, err) = run(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Tell me about the robot",
            "--chat",
            "--max-tokens",
            "12",
        ]);
        assert!(ok, "{err}");
        out
    };
    let a = generate_text(&path);
    assert!(!a.trim().is_empty());
    assert_eq!(
        a,
        generate_text(&fixture(dir)),
        "GGUF and safetensors generate other text"
    );
}

// ---- malformed files ------------------------------------------------------------------------

/// Rewrites `src` into a temporary file: `meta` edits the metadata, `tensor` maps each tensor
/// (name, type, dims, bytes) to its replacement or drops it.
fn rewrite(
    src: &str,
    meta: impl Fn(&str, &Value) -> Option<Value>,
    tensor: impl Fn(&str, GgmlType, &[usize], &[u8]) -> Option<(String, GgmlType, Vec<usize>, Vec<u8>)>,
) -> tempfile::TempPath {
    let f = GgufFile::open(&gguf(src)).unwrap();
    let mut w = Writer::new();
    for (k, v) in &f.metadata {
        if let Some(v) = meta(k, v) {
            w.meta(k, v);
        }
    }
    for (name, t) in &f.tensors {
        let bytes = f.tensor_bytes(name).unwrap();
        if let Some((n, ty, dims, data)) = tensor(name, t.ty, &t.dims, bytes) {
            w.tensor(&n, ty, dims, data);
        }
    }
    let out = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::fs::write(out.path(), w.to_bytes()).unwrap();
    out.into_temp_path()
}

fn keep(
    name: &str,
    ty: GgmlType,
    dims: &[usize],
    b: &[u8],
) -> Option<(String, GgmlType, Vec<usize>, Vec<u8>)> {
    Some((name.to_string(), ty, dims.to_vec(), b.to_vec()))
}

/// `logits` on `path` fails without a panic and stderr names every needle.
fn expect_failure(path: &Path, needles: &[&str]) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        path.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok, "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn an_unchanged_rewrite_still_loads() {
    // The rewriting helper itself keeps a working model (so the failures below are the edits').
    let p = rewrite("qwen2_moe_gguf-f32.gguf", |_, v| Some(v.clone()), keep);
    let (model, experts) = load(&p);
    let (sm, se) = load(&fixture("qwen2_moe_gguf"));
    let t = [5, 6, 7];
    assert!(
        bits(&all_logits(&model, &experts, &t).unwrap())
            == bits(&all_logits(&sm, &se, &t).unwrap())
    );
}

#[test]
fn missing_tensor_is_named() {
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |_, v| Some(v.clone()),
        |n, ty, d, b| {
            (n != "blk.1.attn_k.weight")
                .then(|| keep(n, ty, d, b))
                .flatten()
        },
    );
    expect_failure(
        &p,
        &[
            "model.layers.1.self_attn.k_proj.weight",
            "blk.1.attn_k.weight",
        ],
    );
    let p = rewrite(
        "mixtral_tiny-f32.gguf",
        |_, v| Some(v.clone()),
        |n, ty, d, b| {
            (n != "blk.0.ffn_up_exps.weight")
                .then(|| keep(n, ty, d, b))
                .flatten()
        },
    );
    expect_failure(&p, &["blk.0.ffn_up_exps.weight", "w3"]);
}

#[test]
fn tensor_of_wrong_shape_is_named() {
    // attn_q of [64, 64] declared as [32, 128] (same bytes).
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |_, v| Some(v.clone()),
        |n, ty, d, b| {
            let dims = if n == "blk.0.attn_q.weight" {
                vec![32, 128]
            } else {
                d.to_vec()
            };
            Some((n.to_string(), ty, dims, b.to_vec()))
        },
    );
    expect_failure(&p, &["q_proj", "expected shape [64, 64]", "[128, 32]"]);
    // Stacked experts whose count disagrees with the metadata.
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |_, v| Some(v.clone()),
        |n, ty, d, b| {
            if n == "blk.1.ffn_gate_exps.weight" {
                let per = b.len() / 4;
                return Some((n.to_string(), ty, vec![64, 32, 3], b[..3 * per].to_vec()));
            }
            keep(n, ty, d, b)
        },
    );
    expect_failure(
        &p,
        &["blk.1.ffn_gate_exps.weight", "stacks 3 experts", "says 4"],
    );
}

#[test]
fn unknown_architecture_and_missing_keys_are_named() {
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |k, v| {
            Some(if k == "general.architecture" {
                Value::String("gemma3".into())
            } else {
                v.clone()
            })
        },
        keep,
    );
    expect_failure(&p, &["gemma3", "qwen3moe", "qwen2moe"]);
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |k, v| (k != "qwen3moe.expert_used_count").then(|| v.clone()),
        keep,
    );
    expect_failure(&p, &["qwen3moe.expert_used_count", "missing"]);
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |k, v| {
            Some(if k == "qwen3moe.block_count" {
                Value::String("two".into())
            } else {
                v.clone()
            })
        },
        keep,
    );
    expect_failure(&p, &["qwen3moe.block_count", "integer"]);
    // A dense llama (no experts) is not a MoE model.
    let p = rewrite(
        "mixtral_tiny-f32.gguf",
        |k, v| (k != "llama.expert_count").then(|| v.clone()),
        keep,
    );
    expect_failure(&p, &["llama without experts"]);
}

#[test]
fn unsupported_tensor_type_is_named() {
    // Q4_1 (32 elements in 20 bytes) is a real ggml type that moeshard does not compute with.
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |_, v| Some(v.clone()),
        |n, ty, d, b| {
            if n == "blk.0.attn_v.weight" {
                return Some((
                    n.to_string(),
                    GgmlType::Q4_1,
                    d.to_vec(),
                    vec![0u8; 32 * 2 * 20],
                ));
            }
            keep(n, ty, d, b)
        },
    );
    expect_failure(&p, &["blk.0.attn_v.weight", "unsupported tensor type Q4_1"]);
}

#[test]
fn truncated_gguf_is_an_error_not_a_panic() {
    let bytes = std::fs::read(gguf("qwen3_moe_gguf-f16.gguf")).unwrap();
    for cut in [10, 1000, bytes.len() / 2, bytes.len() - 100] {
        let t = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
        std::fs::write(t.path(), &bytes[..cut]).unwrap();
        expect_failure(t.path(), &["GGUF"]);
    }
}

#[test]
fn unsupported_pre_tokenizer_is_named() {
    let p = rewrite(
        "qwen3_moe_gguf-f32.gguf",
        |k, v| {
            Some(if k == "tokenizer.ggml.pre" {
                Value::String("default".into())
            } else {
                v.clone()
            })
        },
        keep,
    );
    let err = Tokenizer::from_dir(&p)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("tokenizer.ggml.pre \"default\"") && err.contains("qwen2"),
        "{err}"
    );
    for (model, needle) in [
        ("bert", "tokenizer.ggml.model \"bert\""),
        // SentencePiece without its scores (this file has merges instead).
        ("llama", "tokenizer.ggml.scores is missing"),
    ] {
        let p = rewrite(
            "qwen3_moe_gguf-f32.gguf",
            |k, v| {
                if k == "tokenizer.ggml.merges" && model == "llama" {
                    return None;
                }
                Some(if k == "tokenizer.ggml.model" {
                    Value::String(model.into())
                } else {
                    v.clone()
                })
            },
            keep,
        );
        let err = Tokenizer::from_dir(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(needle), "{model}: {err}");
    }
}

/// `moeshard serve --model X.gguf` on a loopback port: returns the child and its address.
fn serve(model: &Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(common::bin())
        .args(["serve", "--model"])
        .arg(model)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve {} printed no address", model.display());
        }
    }
}

#[test]
fn serve_answers_from_a_gguf_file_as_from_its_checkpoint() {
    use moeshard_coordinator::serve::client;
    let (file, dir) = SAME_WEIGHTS[0];
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Tell me about the robot"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let mut answers = Vec::new();
    for model in [gguf(file), fixture(dir)] {
        let (mut child, addr) = serve(&model);
        let r = client::post_json(
            &addr,
            "/v1/chat/completions",
            &[],
            &body,
            std::time::Duration::from_secs(60),
        );
        let _ = child.kill();
        let _ = child.wait();
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", model.display());
        let v = r.json().unwrap();
        answers.push((
            v["choices"][0]["message"]["content"].clone(),
            v["usage"].clone(),
        ));
    }
    assert!(
        answers[0].0.as_str().is_some_and(|s| !s.is_empty()),
        "{answers:?}"
    );
    assert_eq!(
        answers[0], answers[1],
        "GGUF and safetensors servers answer differently"
    );
}
