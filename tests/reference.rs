//! Every fixture against the Hugging Face `transformers` reference it was made with.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use common::{FIXTURES, fixture, ids, reference};
use moeshard_engine::generate::{GenerateRequest, all_logits, generate};
use moeshard_engine::sampling::{SamplingParams, argmax};
use moeshard_engine::tokenizer::{ChatMessage, Tokenizer};
use moeshard_engine::{LocalExperts, Model, SeqStep, WantLogits, npy};

fn load(name: &str) -> (Model, LocalExperts) {
    let (model, ckpt) = Model::load(&fixture(name)).expect("load model");
    let experts = LocalExperts::load_all(&model.cfg, &ckpt).expect("load experts");
    (model, experts)
}

#[test]
fn logits_match_the_reference() {
    for name in FIXTURES {
        let r = reference(name);
        let tokens = ids(&r["tokens"]);
        let (shape, want) = npy::read_f32(&fixture(name).join("reference/logits.npy")).unwrap();
        let (model, experts) = load(name);
        let vocab = model.cfg.vocab_size;
        assert_eq!(shape, vec![tokens.len(), vocab], "{name}: reference shape");
        let got = all_logits(&model, &experts, &tokens).unwrap();
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = max_err / max_ref;
        eprintln!("{name}: max relative logit error {rel:.3e}");
        assert!(rel <= 1e-4, "{name}: relative error {rel:e} > 1e-4");
        for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            assert_eq!(
                argmax(g),
                argmax(w),
                "{name}: argmax differs at position {pos}"
            );
        }
    }
}

#[test]
fn greedy_continuation_matches_the_reference() {
    for name in FIXTURES {
        let r = reference(name);
        let want = ids(&r["greedy_tokens"]);
        let (model, experts) = load(name);
        let req = GenerateRequest {
            prompt: ids(&r["greedy_prompt"]),
            max_tokens: want.len(),
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            max_context: 4096,
        };
        let got = generate(&model, &experts, &req, |_| Ok(true)).unwrap();
        assert_eq!(got.tokens, want, "{name}: greedy tokens");
    }
}

#[test]
fn incremental_decode_equals_prefill_bit_for_bit() {
    for name in FIXTURES {
        let tokens = ids(&reference(name)["tokens"]);
        let (model, experts) = load(name);
        let prefill = all_logits(&model, &experts, &tokens).unwrap();
        let mut cache = model.new_cache(tokens.len());
        let mut decoded = Vec::new();
        // The first three tokens as one chunk, then one at a time.
        for chunk in std::iter::once(&tokens[..3]).chain(tokens[3..].chunks(1)) {
            let mut steps = [SeqStep {
                tokens: chunk,
                cache: &mut cache,
                want: WantLogits::All,
            }];
            decoded.extend(model.forward(&mut steps, &experts).unwrap().remove(0));
        }
        assert_eq!(prefill.len(), decoded.len());
        let same = prefill
            .iter()
            .zip(&decoded)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: decode logits differ from prefill logits");
    }
}

#[test]
fn batched_sequences_equal_sequences_alone() {
    let name = "qwen3_moe_tiny";
    let tokens = ids(&reference(name)["tokens"]);
    let (model, experts) = load(name);
    let (a, b) = (&tokens[..7], &tokens[4..]);
    let alone_a = all_logits(&model, &experts, a).unwrap();
    let alone_b = all_logits(&model, &experts, b).unwrap();
    let mut ca = model.new_cache(64);
    let mut cb = model.new_cache(64);
    let mut steps = [
        SeqStep {
            tokens: a,
            cache: &mut ca,
            want: WantLogits::All,
        },
        SeqStep {
            tokens: b,
            cache: &mut cb,
            want: WantLogits::All,
        },
    ];
    let out = model.forward(&mut steps, &experts).unwrap();
    assert!(
        out[0]
            .iter()
            .zip(&alone_a)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert!(
        out[1]
            .iter()
            .zip(&alone_b)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        let text = r["prompt_text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&r["prompt_text_ids"]),
            "{name}: encode"
        );
        let mut chats = vec![r["chat"].clone()];
        if let Some(v) = r["chat_variants"].as_array() {
            chats.extend(v.iter().cloned());
        }
        for chat in chats {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(chat["messages"].clone()).unwrap();
            let add = chat["add_generation_prompt"].as_bool().unwrap();
            let rendered = tok.apply_chat_template(&messages, add).unwrap();
            assert_eq!(
                rendered,
                chat["rendered"].as_str().unwrap(),
                "{name}: template"
            );
            if chat.get("rendered_ids").is_some() {
                assert_eq!(
                    tok.encode(&rendered, false).unwrap(),
                    ids(&chat["rendered_ids"]),
                    "{name}: rendered ids"
                );
            }
        }
    }
}

/// The planner sizes each sequence's cache from config.json alone; after a prompt the engine's
/// cache holds exactly that (latent + rope key for MLA, the fixed DeltaNet state, keys and values
/// of full-attention layers), except that a sliding-window layer keeps one position fewer than
/// its window between steps.
#[test]
fn planner_cache_bytes_match_the_engine_cache() {
    for name in FIXTURES {
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        let shape = moeshard_coordinator::plan::ModelShape::from_config_json(&text).unwrap();
        let tokens = ids(&reference(name)["tokens"]);
        let (model, experts) = load(name);
        let mut cache = model.new_cache(tokens.len());
        let mut steps = [SeqStep {
            tokens: &tokens,
            cache: &mut cache,
            want: WantLogits::Last,
        }];
        model.forward(&mut steps, &experts).unwrap();
        let got = cache.bytes() as u64;
        let planned = shape.cache_bytes(tokens.len() as u64);
        let slack = match shape.window_kv {
            Some((elems, w)) if (w as usize) < tokens.len() => 4 * elems,
            _ => 0,
        };
        assert!(
            got <= planned && planned - got <= slack,
            "{name}: engine cache {got} bytes, planner {planned} (slack {slack})"
        );
    }
}
