//! A Hugging Face checkpoint described as llama.cpp's GGUF describes it: the architecture name,
//! the metadata keys, the tokenizer keys and one GGUF tensor (name, dims, where its data comes
//! from) per tensor of the file. `moeshard quantize DIR OUT.gguf` streams the data; this module
//! only decides what goes where, so the mapping can be checked against files llama.cpp's own
//! converter wrote (tests/quantize_gguf.rs) and mirrors [`crate::gguf_model`], which reads them.

use std::path::Path;

use serde_json::Value as J;

use crate::config::{Arch, MlpKind, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::gguf::Value;
use crate::gguf_model::{EXPERT_NAMES, LAYER_NAMES};
use crate::safetensors::Checkpoint;
use crate::tensor::{DType, Tensor};

/// Where one GGUF tensor's data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One checkpoint tensor.
    One(String),
    /// The experts' tensors of one projection, stacked along a new slowest dimension.
    Stacked(Vec<String>),
}

/// One tensor of the GGUF file to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportTensor {
    /// GGUF name (`blk.3.ffn_up_exps.weight`).
    pub name: String,
    /// GGUF dims, fastest-varying first (the Hugging Face shape reversed, plus the expert count
    /// for stacked tensors).
    pub dims: Vec<usize>,
    /// The data.
    pub source: Source,
    /// llama.cpp's rope permutation of Q or K rows (heads of the tensor), for the `llama`
    /// architecture: within each head of `hd` rows, file row `2i + j` holds model row
    /// `j * hd / 2 + i`.
    pub permute_heads: Option<usize>,
}

impl ExportTensor {
    /// Elements in one row (the fastest dimension).
    pub fn cols(&self) -> usize {
        self.dims[0]
    }

    /// Number of rows (every dimension but the fastest).
    pub fn rows(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// A matrix (or stacked matrices): a candidate for a block type. Vectors (norms, biases)
    /// stay f32, and so do the routers, as llama.cpp keeps them.
    pub fn is_matrix(&self) -> bool {
        self.dims.len() >= 2 && !self.name.contains("ffn_gate_inp")
    }

    /// A routed experts' stacked tensor.
    pub fn is_experts(&self) -> bool {
        matches!(self.source, Source::Stacked(_))
    }
}

/// llama.cpp's architecture name for a model, or why it has none we write.
pub fn architecture(cfg: &ModelConfig) -> Result<&'static str> {
    let unsupported = |why: String| EngineError::UnsupportedModel {
        model_type: format!("{} as GGUF ({why})", cfg.arch.model_type()),
        supported: "qwen3_moe, qwen2_moe and mixtral checkpoints".into(),
    };
    let arch = match cfg.arch {
        Arch::Qwen3Moe => "qwen3moe",
        Arch::Qwen2Moe => "qwen2moe",
        Arch::Mixtral => "llama",
        other => {
            return Err(unsupported(format!(
                "moeshard writes GGUF only for the architectures it also reads as GGUF, not {}",
                other.model_type()
            )));
        }
    };
    if let Some(l) = cfg.layer_kinds.iter().position(|k| *k != MlpKind::Moe) {
        return Err(unsupported(format!(
            "layer {l} is a dense MLP; llama.cpp's {arch} has routed experts in every layer"
        )));
    }
    if cfg.layer_windows.iter().any(Option::is_some) {
        return Err(unsupported("sliding-window attention".into()));
    }
    if !matches!(cfg.rope_scaling, RopeScaling::Default) {
        return Err(unsupported("rope scaling".into()));
    }
    Ok(arch)
}

/// The GGUF tensors of a checkpoint, in llama.cpp's order (output, embedding, then each layer).
/// Every checkpoint tensor the model uses appears exactly once; a tensor the mapping does not
/// know is an error naming it.
pub fn tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Vec<ExportTensor>> {
    let arch = architecture(cfg)?;
    let llama = cfg.arch == Arch::Mixtral;
    let shape = |hf: &str| -> Result<Vec<usize>> {
        ckpt.info(hf)
            .map(|(_, i)| i.shape.clone())
            .ok_or_else(|| EngineError::MissingTensor {
                name: hf.to_string(),
                dir: ckpt.dir().to_path_buf(),
            })
    };
    let rev = |s: &[usize]| s.iter().rev().copied().collect::<Vec<_>>();
    let one = |name: &str, hf: &str, permute: Option<usize>| -> Result<ExportTensor> {
        let dims = rev(&shape(hf)?);
        Ok(ExportTensor {
            name: name.to_string(),
            dims,
            source: Source::One(hf.to_string()),
            permute_heads: permute,
        })
    };
    let mut out = Vec::new();
    if !cfg.tie_word_embeddings {
        out.push(one("output.weight", "lm_head.weight", None)?);
    }
    out.push(one("token_embd.weight", "model.embed_tokens.weight", None)?);
    out.push(one("output_norm.weight", "model.norm.weight", None)?);
    let mut stacked = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let prefix = cfg.layer_prefix(l);
        let moe_tail = cfg
            .moe_prefix(l)
            .strip_prefix(&format!("{prefix}."))
            .unwrap_or("mlp")
            .to_string();
        for (g, h) in LAYER_NAMES {
            let hf = format!("{prefix}.{}", h.replace("{mlp}", &moe_tail));
            if !ckpt.contains(&hf) {
                continue;
            }
            let permute = match *g {
                "attn_q.weight" | "attn_q.bias" if llama => Some(cfg.num_attention_heads),
                "attn_k.weight" | "attn_k.bias" if llama => Some(cfg.num_key_value_heads),
                _ => None,
            };
            out.push(one(&format!("blk.{l}.{g}"), &hf, permute)?);
        }
        for (g, _, _) in EXPERT_NAMES {
            let names: Vec<String> = (0..cfg.num_experts)
                .map(|e| {
                    let n = cfg.expert_tensor_names(l, e);
                    match *g {
                        "ffn_gate_exps.weight" => n.gate_proj,
                        "ffn_up_exps.weight" => n.up_proj,
                        _ => n.down_proj,
                    }
                })
                .collect();
            let first = shape(&names[0])?;
            for n in &names[1..] {
                let s = shape(n)?;
                if s != first {
                    return Err(EngineError::BadTensor {
                        name: n.clone(),
                        msg: format!("shape {s:?} differs from expert 0's {first:?}"),
                    });
                }
            }
            let mut dims = rev(&first);
            dims.push(cfg.num_experts);
            stacked.push(ExportTensor {
                name: format!("blk.{l}.{g}"),
                dims,
                source: Source::Stacked(names),
                permute_heads: None,
            });
        }
        out.append(&mut stacked);
    }
    // Everything in the checkpoint has a place.
    let mut placed = std::collections::BTreeSet::new();
    for t in &out {
        match &t.source {
            Source::One(n) => {
                placed.insert(n.as_str());
            }
            Source::Stacked(ns) => placed.extend(ns.iter().map(String::as_str)),
        }
    }
    if let Some(n) = ckpt
        .names()
        .find(|n| !(placed.contains(n) || cfg.tie_word_embeddings && *n == "lm_head.weight"))
    {
        return Err(EngineError::BadTensor {
            name: n.to_string(),
            msg: format!("has no GGUF name in llama.cpp's {arch} architecture"),
        });
    }
    Ok(out)
}

/// The model's metadata keys as llama.cpp's converter writes them (without `general.file_type`,
/// which depends on the tensor types the caller picks).
pub fn model_metadata(cfg: &ModelConfig, name: &str) -> Result<Vec<(String, Value)>> {
    let arch = architecture(cfg)?;
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps),
        ),
        (k("expert_count"), u(cfg.num_experts)),
        (k("expert_used_count"), u(cfg.num_experts_per_tok)),
    ];
    match cfg.arch {
        Arch::Qwen3Moe => {
            m.push((k("attention.key_length"), u(cfg.head_dim)));
            m.push((k("attention.value_length"), u(cfg.head_dim)));
            m.push((
                k("expert_feed_forward_length"),
                u(cfg.moe_intermediate_size),
            ));
        }
        Arch::Qwen2Moe => {
            m.push((
                k("expert_feed_forward_length"),
                u(cfg.moe_intermediate_size),
            ));
            if let Some(s) = cfg.shared_expert_intermediate_size {
                m.push((k("expert_shared_feed_forward_length"), u(s)));
            }
        }
        _ => {
            m.push((k("vocab_size"), u(cfg.vocab_size)));
            m.push((k("rope.dimension_count"), u(cfg.head_dim)));
        }
    }
    // llama.cpp renormalises the chosen experts' weights for qwen3moe and llama and not for
    // qwen2moe; say so only where the checkpoint does otherwise.
    let renormalises = cfg.arch != Arch::Qwen2Moe;
    if cfg.norm_topk_prob != renormalises {
        m.push((k("expert_weights_norm"), Value::Bool(cfg.norm_topk_prob)));
    }
    Ok(m)
}

fn tok_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(format!("{}: {}", path.display(), msg.into()))
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.ggml.pre` name of a byte-level BPE tokenizer's pre-tokenizer.
fn pre_tokenizer_name(pre: &J, path: &Path) -> Result<&'static str> {
    let is_byte_level = |v: &J| v.get("type").and_then(J::as_str) == Some("ByteLevel");
    if is_byte_level(pre) && pre.get("use_regex").and_then(J::as_bool) != Some(false) {
        return Ok("gpt-2");
    }
    if pre.get("type").and_then(J::as_str) == Some("Sequence")
        && let Some(items) = pre.get("pretokenizers").and_then(J::as_array)
        && let [split, last] = items.as_slice()
        && is_byte_level(last)
        && split.get("type").and_then(J::as_str) == Some("Split")
        && let Some(regex) = split
            .get("pattern")
            .and_then(|p| p.get("Regex"))
            .and_then(J::as_str)
    {
        for (name, pattern) in crate::tokenizer::GGUF_PRE_PATTERNS {
            if regex == *pattern {
                return Ok(name);
            }
        }
    }
    Err(tok_err(
        path,
        format!(
            "its pre-tokenizer has no tokenizer.ggml.pre name moeshard knows ({}); llama.cpp's \
             convert_hf_to_gguf.py names more",
            crate::tokenizer::GGUF_PRE_TOKENIZERS.join(", ")
        ),
    ))
}

/// The `tokenizer.*` keys of a checkpoint directory's byte-level BPE tokenizer (`tokenizer.json`,
/// `tokenizer_config.json`), the vocabulary padded with `[PADn]` tokens to the model's
/// `vocab_size` as llama.cpp does.
pub fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let read = |p: &Path| -> Result<J> {
        let text = std::fs::read_to_string(p).map_err(|e| EngineError::io(p, e))?;
        serde_json::from_str(&text).map_err(|e| tok_err(p, e.to_string()))
    };
    let tj = read(&path)?;
    let model = tj
        .get("model")
        .ok_or_else(|| tok_err(&path, "no \"model\""))?;
    if model.get("type").and_then(J::as_str) != Some("BPE") {
        return Err(tok_err(
            &path,
            format!(
                "model type {} is not byte-level BPE (the only tokenizer moeshard writes to GGUF)",
                model.get("type").unwrap_or(&J::Null)
            ),
        ));
    }
    let pre = pre_tokenizer_name(tj.get("pre_tokenizer").unwrap_or(&J::Null), &path)?;
    let vocab = model
        .get("vocab")
        .and_then(J::as_object)
        .ok_or_else(|| tok_err(&path, "model.vocab is not an object"))?;
    let mut by_id: std::collections::BTreeMap<usize, (String, i32)> = vocab
        .iter()
        .filter_map(|(t, id)| Some((id.as_u64()? as usize, (t.clone(), NORMAL))))
        .collect();
    if by_id.len() != vocab.len() {
        return Err(tok_err(&path, "model.vocab has ids that are not integers"));
    }
    for a in tj
        .get("added_tokens")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(J::as_u64),
            a.get("content").and_then(J::as_str),
        ) else {
            return Err(tok_err(
                &path,
                format!("added token {a} has no id or content"),
            ));
        };
        let special = a.get("special").and_then(J::as_bool).unwrap_or(false);
        by_id.insert(
            id as usize,
            (
                content.to_string(),
                if special { CONTROL } else { USER_DEFINED },
            ),
        );
    }
    let n = by_id.keys().next_back().map_or(0, |&m| m + 1);
    if n > cfg.vocab_size {
        return Err(tok_err(
            &path,
            format!(
                "{n} tokens do not fit the model's vocab_size {}",
                cfg.vocab_size
            ),
        ));
    }
    let mut tokens = Vec::with_capacity(cfg.vocab_size);
    let mut types = Vec::with_capacity(cfg.vocab_size);
    for i in 0..cfg.vocab_size {
        let (t, ty) = by_id
            .remove(&i)
            .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        tokens.push(Value::String(t));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .map(|m| match m {
            J::String(s) => Ok(s.clone()),
            J::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err(tok_err(&path, format!("merge {m} is not two strings"))),
            },
            other => Err(tok_err(&path, format!("merge {other} is not \"a b\""))),
        })
        .map(|r| r.map(Value::String))
        .collect::<Result<_>>()?;

    let mut m = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.clone())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    // Special tokens: by their text in tokenizer_config.json, else config.json's ids.
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read(&tc_path)?
    } else {
        J::Null
    };
    let id_of_text = |text: &str| {
        tokens
            .iter()
            .position(|t| matches!(t, Value::String(s) if s == text))
    };
    let mut special = |key: &str, text_key: &str, fallback: Option<u32>| {
        let id = crate::tokenizer::token_text(tc.get(text_key))
            .and_then(|t| id_of_text(&t))
            .map(|i| i as u32)
            .or(fallback);
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    };
    special("bos_token_id", "bos_token", cfg.bos_token_id);
    special(
        "eos_token_id",
        "eos_token",
        cfg.eos_token_ids.first().copied(),
    );
    special("unknown_token_id", "unk_token", None);
    special("padding_token_id", "pad_token", None);
    // Whether encoding adds bos/eos: the tokenizer config's flags, else what the post-processor
    // template inserts around the sequence.
    let template = tj.get("post_processor").and_then(|p| p.get("single"));
    let adds = |which: usize| {
        template.and_then(J::as_array).is_some_and(|items| {
            let seq = items.iter().position(|i| i.get("Sequence").is_some());
            match (which, seq) {
                (0, Some(s)) => items[..s].iter().any(|i| i.get("SpecialToken").is_some()),
                (_, Some(s)) => items[s + 1..]
                    .iter()
                    .any(|i| i.get("SpecialToken").is_some()),
                _ => false,
            }
        })
    };
    let add_bos = tc
        .get("add_bos_token")
        .and_then(J::as_bool)
        .unwrap_or(adds(0));
    let add_eos = tc
        .get("add_eos_token")
        .and_then(J::as_bool)
        .unwrap_or(adds(1));
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    let template = match crate::tokenizer::template_in(&tc) {
        Some(t) => Some(t),
        None => crate::tokenizer::template_file(dir)?,
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(m)
}

/// Reorders rows (of `row_bytes` each) the way llama.cpp's converter permutes Q and K for the
/// `llama` architecture; the inverse of what [`crate::gguf_model`] undoes at load.
pub fn permute_rows(bytes: &[u8], row_bytes: usize, heads: usize) -> Result<Vec<u8>> {
    let rows = bytes.len() / row_bytes.max(1);
    if heads == 0
        || row_bytes == 0
        || rows * row_bytes != bytes.len()
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
    {
        return Err(EngineError::BadTensor {
            name: "q/k projection".into(),
            msg: format!("{rows} rows cannot be split into {heads} heads of an even size"),
        });
    }
    let mut out = vec![0u8; bytes.len()];
    for (model_row, file_row) in rope_row_pairs(rows, heads) {
        out[file_row * row_bytes..(file_row + 1) * row_bytes]
            .copy_from_slice(&bytes[model_row * row_bytes..(model_row + 1) * row_bytes]);
    }
    Ok(out)
}

/// llama.cpp's rope permutation of `rows` Q or K rows in `heads` heads (of an even size): the
/// pairs (model row, file row). Within each head of `hd` rows, file row `2i + j` holds model row
/// `j * hd / 2 + i`.
pub(crate) fn rope_row_pairs(rows: usize, heads: usize) -> impl Iterator<Item = (usize, usize)> {
    let hd = rows / heads.max(1);
    (0..heads).flat_map(move |h| {
        (0..hd / 2)
            .flat_map(move |i| (0..2).map(move |j| (h * hd + j * hd / 2 + i, h * hd + 2 * i + j)))
    })
}

/// The bytes of `t` (a float tensor; rows are its last dimension) in `to`: the same bytes when the
/// dtype is already `to`, f32/f16/bf16 converted with round-to-nearest-even, block types through
/// [`crate::safetensors::quantize_tensor`].
pub fn encode(t: &Tensor, to: DType) -> Result<Vec<u8>> {
    if t.dtype() == to {
        return Ok(t.raw().to_vec());
    }
    if let Some(q) = to.quant() {
        let cols = t.shape().last().copied().unwrap_or(0);
        let rows = t.numel() / cols.max(1);
        let flat = Tensor::from_raw(t.name(), t.dtype(), vec![rows, cols], t.raw())?;
        return Ok(crate::safetensors::quantize_tensor(&flat, q)?
            .raw()
            .to_vec());
    }
    let x = t.to_f32_vec();
    Ok(match to {
        DType::F32 => bytemuck::cast_slice(&x).to_vec(),
        DType::F16 => {
            let v: Vec<half::f16> = x.iter().map(|&f| half::f16::from_f32(f)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = x.iter().map(|&f| half::bf16::from_f32(f)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        other => {
            return Err(EngineError::BadTensor {
                name: t.name().to_string(),
                msg: format!("cannot encode as {}", other.name()),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows, one byte per row: model rows [a0 a1 b0 b1] -> file [a0 b0 a1 b1].
        let rows: Vec<u8> = (0..8).collect();
        assert_eq!(
            permute_rows(&rows, 1, 2).unwrap(),
            vec![0, 2, 1, 3, 4, 6, 5, 7]
        );
        assert!(permute_rows(&rows, 1, 3).is_err());
        assert!(permute_rows(&rows, 3, 2).is_err());
    }
}
