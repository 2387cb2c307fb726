//! A GGUF file as a complete model: its metadata read as a [`ModelConfig`], its tensors named the
//! way a Hugging Face checkpoint names them, so the rest of the engine cannot tell the two apart.
//!
//! Facts from llama.cpp's conversion script and `gguf` package (`constants.py`,
//! `tensor_mapping.py`): tensor dims are listed fastest-varying first (`ne[0]` = columns), so a
//! Hugging Face `[out, in]` weight is stored with dims `[in, out]`; routed experts are stacked into
//! one `[in, out, n_experts]` tensor per projection (`ffn_gate_exps`, ...), expert `e` being a
//! contiguous slice; the `llama` architecture's converter permutes the rows of Q and K within each
//! head (its rope rotates adjacent pairs), which we undo at load; qwen2moe and qwen3moe are stored
//! unpermuted. llama.cpp renormalises the chosen experts' weights for qwen3moe and llama and not for
//! qwen2moe unless `{arch}.expert_weights_norm` says otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::{GgmlType, GgufFile, GgufTensorInfo, Value};
use crate::safetensors::TensorInfo;
use crate::tensor::{DType, Tensor};

/// The GGUF architectures we load, and the engine's name for each.
pub const SUPPORTED_ARCHS: &[&str] = &["qwen3moe", "qwen2moe", "llama (with experts)"];

/// Whether `path` names a GGUF file (by its extension) rather than a checkpoint directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}

/// The engine dtype a GGUF tensor type is computed in, if this build computes with it.
pub fn dtype_of(ty: GgmlType) -> Option<DType> {
    match ty {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        GgmlType::Q8_0 => Some(DType::Q8_0),
        GgmlType::Q4_0 => Some(DType::Q4_0),
        GgmlType::Q4_K => Some(DType::Q4_K),
        GgmlType::Q5_K => Some(DType::Q5_K),
        GgmlType::Q6_K => Some(DType::Q6_K),
        GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q2_K | GgmlType::Q3_K => None,
    }
}

/// How a mapped tensor's bytes become the Hugging Face tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fixup {
    /// Used as stored (mapped, no copy).
    None,
    /// Rows permuted by llama.cpp's converter for its rope: undo within each of `heads` heads.
    UnpermuteRope {
        /// Heads whose rows are interleaved.
        heads: usize,
    },
}

/// One Hugging Face-named tensor inside a GGUF file.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Placement (dtype, Hugging Face shape, absolute byte range).
    pub info: TensorInfo,
    /// The GGUF tensor it comes from (for messages).
    pub gguf_name: String,
    /// What to do to the bytes.
    pub fixup: Fixup,
}

/// A GGUF file opened as a checkpoint.
pub struct GgufModel {
    file: GgufFile,
    cfg: ModelConfig,
    entries: BTreeMap<String, Entry>,
}

fn format_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Format {
        path: path.to_path_buf(),
        format: "GGUF",
        msg: msg.into(),
    }
}

/// `blk.N.` suffixes and the Hugging Face names (after `model.layers.N.`) they become. `{mlp}` is the
/// MoE block's prefix (`mlp` or Mixtral's `block_sparse_moe`).
pub(crate) const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_gate_inp.weight", "{mlp}.gate.weight"),
    (
        "ffn_gate_shexp.weight",
        "mlp.shared_expert.gate_proj.weight",
    ),
    ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    (
        "ffn_down_shexp.weight",
        "mlp.shared_expert.down_proj.weight",
    ),
    ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Stacked expert tensors: GGUF suffix, projection (Qwen name, Mixtral name).
pub(crate) const EXPERT_NAMES: &[(&str, &str, &str)] = &[
    ("ffn_gate_exps.weight", "gate_proj", "w1"),
    ("ffn_up_exps.weight", "up_proj", "w3"),
    ("ffn_down_exps.weight", "down_proj", "w2"),
];

/// Older Mixtral GGUFs store one tensor per expert: `blk.N.ffn_gate.E.weight`.
const SPLIT_EXPERT_NAMES: &[(&str, &str, &str)] = &[
    ("ffn_gate", "gate_proj", "w1"),
    ("ffn_up", "up_proj", "w3"),
    ("ffn_down", "down_proj", "w2"),
];

/// The GGUF tensor a Hugging Face name comes from, for messages about tensors that are missing.
pub fn gguf_name_of(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let tail_mlp = tail.replacen("block_sparse_moe.", "mlp.", 1);
    for (g, h) in LAYER_NAMES {
        if h.replace("{mlp}", "mlp") == tail_mlp {
            return Some(format!("blk.{layer}.{g}"));
        }
    }
    let after = tail_mlp.strip_prefix("mlp.experts.")?;
    let (_, proj) = after.split_once('.')?;
    for (g, q, m) in EXPERT_NAMES {
        if proj == format!("{q}.weight") || proj == format!("{m}.weight") {
            return Some(format!("blk.{layer}.{g}"));
        }
    }
    None
}

fn meta_u64(file: &GgufFile, key: &str) -> Result<Option<u64>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            format_err(
                file.path(),
                format!("metadata {key} must be a non-negative integer, found {v:?}"),
            )
        }),
    }
}

fn meta_f64(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            format_err(
                file.path(),
                format!("metadata {key} must be a number, found {v:?}"),
            )
        }),
    }
}

fn meta_bool(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            format_err(
                file.path(),
                format!("metadata {key} must be a boolean, found {v:?}"),
            )
        }),
    }
}

fn meta_str<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            format_err(
                file.path(),
                format!("metadata {key} must be a string, found {v:?}"),
            )
        }),
    }
}

/// The engine's `model_type` for a GGUF architecture.
fn model_type(file: &GgufFile, arch: &str) -> Result<&'static str> {
    match arch {
        "qwen3moe" => Ok("qwen3_moe"),
        "qwen2moe" => Ok("qwen2_moe"),
        "llama" | "mixtral" => {
            if meta_u64(file, &format!("{arch}.expert_count"))?.unwrap_or(0) == 0 {
                return Err(EngineError::UnsupportedModel {
                    model_type: format!("{arch} without experts (a dense model)"),
                    supported: SUPPORTED_ARCHS.join(", "),
                });
            }
            Ok("mixtral")
        }
        other => Err(EngineError::UnsupportedModel {
            model_type: format!("GGUF architecture {other}"),
            supported: SUPPORTED_ARCHS.join(", "),
        }),
    }
}

/// Reads the model description from a GGUF file's metadata and tensor directory.
///
/// The description is written as the `config.json` a Hugging Face checkpoint of the same model
/// would have and parsed by [`ModelConfig::from_json_str`], so both sources go through one set of
/// checks and defaults.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path();
    let arch = meta_str(file, "general.architecture")?
        .ok_or_else(|| format_err(path, "metadata general.architecture is missing"))?
        .to_string();
    let model_type = model_type(file, &arch)?;
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64> {
        meta_u64(file, &key(k))?
            .ok_or_else(|| format_err(path, format!("metadata {} is missing", key(k))))
    };
    if let Some(Value::Array(_)) = file.get(&key("attention.head_count")) {
        return Err(format_err(
            path,
            format!(
                "metadata {} varies per layer; only a single head count is supported",
                key("attention.head_count")
            ),
        ));
    }
    if let Some(t) = meta_str(file, &key("rope.scaling.type"))?
        && t != "none"
    {
        return Err(format_err(
            path,
            format!(
                "metadata {} = {t:?}: only unscaled rope is supported",
                key("rope.scaling.type")
            ),
        ));
    }
    if let Some(g) = meta_u64(file, &key("expert_gating_func"))?
        && g != 1
    {
        return Err(format_err(
            path,
            format!(
                "metadata {} = {g}: only softmax gating (1) is supported",
                key("expert_gating_func")
            ),
        ));
    }
    if let Some(s) = meta_f64(file, &key("expert_weights_scale"))?
        && s != 0.0
        && s != 1.0
    {
        return Err(format_err(
            path,
            format!(
                "metadata {} = {s}: scaled expert weights are not supported",
                key("expert_weights_scale")
            ),
        ));
    }
    let hidden = need("embedding_length")?;
    let layers = need("block_count")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta_u64(file, &key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match meta_u64(file, &key("attention.key_length"))? {
        Some(d) => d,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    if let Some(v) = meta_u64(file, &key("attention.value_length"))?
        && v != head_dim
    {
        return Err(format_err(
            path,
            format!(
                "metadata {} = {v} differs from the key length {head_dim}",
                key("attention.value_length")
            ),
        ));
    }
    let tensor = |n: &str| file.tensors.get(n);
    // The vocabulary is the embedding's row count; the metadata may omit it or count the
    // tokenizer's tokens instead.
    let vocab = match tensor("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as u64,
        Some(t) => {
            return Err(format_err(
                path,
                format!(
                    "tensor token_embd.weight has dims {:?}, expected [hidden, vocab]",
                    t.dims
                ),
            ));
        }
        None => return Err(format_err(path, "tensor token_embd.weight is missing")),
    };
    let experts = need("expert_count")?;
    let experts_used = need("expert_used_count")?;
    let ffn = meta_u64(file, &key("feed_forward_length"))?;
    // Expert width: the metadata key, else the stacked tensor's middle dim, else (Mixtral) the
    // feed-forward length.
    let moe_width = match meta_u64(file, &key("expert_feed_forward_length"))? {
        Some(w) => Some(w),
        None => file
            .tensors
            .iter()
            .find(|(n, _)| n.ends_with(".ffn_gate_exps.weight"))
            .and_then(|(_, t)| t.dims.get(1).map(|&d| d as u64))
            .or(ffn),
    };
    let mut mlp_only = Vec::new();
    for l in 0..layers {
        if tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_none() {
            mlp_only.push(l);
        }
    }
    let eos = meta_u64(file, "tokenizer.ggml.eos_token_id")?;
    let bos = meta_u64(file, "tokenizer.ggml.bos_token_id")?;
    let mut cfg = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "num_experts": experts,
        "num_local_experts": experts,
        "num_experts_per_tok": experts_used,
        "intermediate_size": ffn.or(moe_width).unwrap_or(0),
        "moe_intermediate_size": moe_width.unwrap_or(0),
        "mlp_only_layers": mlp_only,
        "decoder_sparse_step": 1,
        "tie_word_embeddings": tensor("output.weight").is_none(),
        "rms_norm_eps": meta_f64(file, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": meta_f64(file, &key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": meta_u64(file, &key("context_length"))?.unwrap_or(32768),
        "attention_bias": tensor("blk.0.attn_q.bias").is_some(),
        "norm_topk_prob": meta_bool(file, &key("expert_weights_norm"))?
            .unwrap_or(model_type != "qwen2_moe"),
        "eos_token_id": eos,
        "bos_token_id": bos,
    });
    if model_type == "qwen2_moe" {
        let shared = match meta_u64(file, &key("expert_shared_feed_forward_length"))? {
            Some(s) => s,
            None => file
                .tensors
                .iter()
                .find(|(n, _)| n.ends_with(".ffn_gate_shexp.weight"))
                .and_then(|(_, t)| t.dims.get(1).map(|&d| d as u64))
                .unwrap_or(0),
        };
        cfg["shared_expert_intermediate_size"] = shared.into();
    }
    if model_type == "mixtral" && !mlp_only.is_empty() {
        return Err(format_err(
            path,
            format!(
                "layer {} has no router (blk.{}.ffn_gate_inp.weight): every layer of a llama model with experts must be MoE",
                mlp_only[0], mlp_only[0]
            ),
        ));
    }
    ModelConfig::from_json_str(&cfg.to_string(), path)
}

impl GgufModel {
    /// Maps `path`, reads its config and indexes its tensors under Hugging Face names.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let cfg = config_from_gguf(&file)?;
        let entries = index(&file, &cfg)?;
        Ok(GgufModel { file, cfg, entries })
    }

    /// The model description.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The parsed file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Names and placement of the Hugging Face-named tensors.
    pub(crate) fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// A tensor by its Hugging Face name, or `None` when the file has no such tensor.
    pub fn tensor(&self, name: &str) -> Option<Result<Tensor>> {
        let e = self.entries.get(name)?;
        let map = self.file.map();
        Some(match e.fixup {
            Fixup::None => Tensor::mapped(
                name,
                e.info.dtype,
                e.info.shape.clone(),
                Arc::clone(map),
                e.info.start,
                e.info.len,
            ),
            Fixup::UnpermuteRope { heads } => unpermute(name, e, map, heads),
        })
    }
}

/// Undoes llama.cpp's rope permutation of Q or K rows: within each head of `hd` rows the file holds
/// row `2i + j` where the model has row `j * hd / 2 + i` (`j` in 0..2). Rows are whole blocks, so
/// this copies bytes whatever the element type.
fn unpermute(name: &str, e: &Entry, map: &Arc<Mmap>, heads: usize) -> Result<Tensor> {
    let rows = e.info.shape[0];
    let bad = |msg: String| EngineError::BadTensor {
        name: format!("{name} ({})", e.gguf_name),
        msg,
    };
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(bad(format!(
            "{rows} rows cannot be split into {heads} heads of an even size"
        )));
    }
    let src = map
        .get(e.info.start..e.info.start + e.info.len)
        .ok_or_else(|| bad("bytes lie outside the file".into()))?;
    let row_bytes = e.info.len / rows;
    let mut out = MmapMut::map_anon(e.info.len.max(1))
        .map_err(|err| bad(format!("allocating {} bytes: {err}", e.info.len)))?;
    for (model_row, file_row) in crate::gguf_export::rope_row_pairs(rows, heads) {
        out[model_row * row_bytes..(model_row + 1) * row_bytes]
            .copy_from_slice(&src[file_row * row_bytes..(file_row + 1) * row_bytes]);
    }
    let map = out
        .make_read_only()
        .map_err(|err| bad(format!("sealing the copy: {err}")))?;
    Tensor::mapped(
        name,
        e.info.dtype,
        e.info.shape.clone(),
        Arc::new(map),
        0,
        e.info.len,
    )
}

/// The Hugging Face names of every tensor in the file that the engine uses.
fn index(file: &GgufFile, cfg: &ModelConfig) -> Result<BTreeMap<String, Entry>> {
    let path = file.path();
    let mixtral = cfg.arch == crate::config::Arch::Mixtral;
    let mut out = BTreeMap::new();
    let checked = |gname: &str, t: &GgufTensorInfo| -> Result<DType> {
        dtype_of(t.ty).ok_or_else(|| EngineError::BadTensor {
            name: gname.to_string(),
            msg: format!(
                "unsupported tensor type {:?} in {} (moeshard computes with F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K)",
                t.ty,
                path.display()
            ),
        })
    };
    // Hugging Face shape of a GGUF tensor: its dims reversed.
    let hf_shape = |t: &GgufTensorInfo| -> Vec<usize> { t.dims.iter().rev().copied().collect() };
    for (gname, t) in &file.tensors {
        let whole = |hf: String, shape: Vec<usize>, fixup: Fixup| -> Result<(String, Entry)> {
            Ok((
                hf,
                Entry {
                    info: TensorInfo {
                        dtype: checked(gname, t)?,
                        shape,
                        start: t.start,
                        len: t.len,
                    },
                    gguf_name: gname.clone(),
                    fixup,
                },
            ))
        };
        match gname.as_str() {
            "token_embd.weight" => {
                let (k, v) = whole("model.embed_tokens.weight".into(), hf_shape(t), Fixup::None)?;
                out.insert(k, v);
                continue;
            }
            "output_norm.weight" => {
                let (k, v) = whole("model.norm.weight".into(), hf_shape(t), Fixup::None)?;
                out.insert(k, v);
                continue;
            }
            "output.weight" => {
                let (k, v) = whole("lm_head.weight".into(), hf_shape(t), Fixup::None)?;
                out.insert(k, v);
                continue;
            }
            _ => {}
        }
        let Some(rest) = gname.strip_prefix("blk.") else {
            continue;
        };
        let Some((layer, suffix)) = rest.split_once('.') else {
            continue;
        };
        let Ok(layer) = layer.parse::<usize>() else {
            continue;
        };
        if layer >= cfg.num_hidden_layers {
            return Err(format_err(
                path,
                format!(
                    "tensor {gname} belongs to layer {layer} but the model has {} layers",
                    cfg.num_hidden_layers
                ),
            ));
        }
        let prefix = cfg.layer_prefix(layer);
        let moe = cfg.moe_prefix(layer);
        let moe_tail = moe
            .strip_prefix(&format!("{prefix}."))
            .unwrap_or("mlp")
            .to_string();
        if let Some((_, hf)) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix) {
            let hf = format!("{prefix}.{}", hf.replace("{mlp}", &moe_tail));
            let mut shape = hf_shape(t);
            if suffix == "ffn_gate_inp_shexp.weight" && shape.len() == 1 {
                // llama.cpp stores the shared expert's gate as a vector; the model reads `[1, hidden]`.
                shape.insert(0, 1);
            }
            let fixup = match suffix {
                "attn_q.weight" | "attn_q.bias" if mixtral => Fixup::UnpermuteRope {
                    heads: cfg.num_attention_heads,
                },
                "attn_k.weight" | "attn_k.bias" if mixtral => Fixup::UnpermuteRope {
                    heads: cfg.num_key_value_heads,
                },
                _ => Fixup::None,
            };
            let (k, v) = whole(hf, shape, fixup)?;
            out.insert(k, v);
            continue;
        }
        if let Some((_, q, m)) = EXPERT_NAMES.iter().find(|(g, _, _)| *g == suffix) {
            let dtype = checked(gname, t)?;
            let &[cols, rows, n] = t.dims.as_slice() else {
                return Err(EngineError::BadTensor {
                    name: gname.clone(),
                    msg: format!(
                        "stacked experts need 3 dims [in, out, experts], found {:?}",
                        t.dims
                    ),
                });
            };
            if n != cfg.num_experts {
                return Err(EngineError::BadTensor {
                    name: gname.clone(),
                    msg: format!(
                        "stacks {n} experts but the metadata says {}",
                        cfg.num_experts
                    ),
                });
            }
            let per = t.len / n.max(1);
            for e in 0..n {
                let proj = if mixtral { m } else { q };
                out.insert(
                    format!("{moe}.experts.{e}.{proj}.weight"),
                    Entry {
                        info: TensorInfo {
                            dtype,
                            shape: vec![rows, cols],
                            start: t.start + e * per,
                            len: per,
                        },
                        gguf_name: format!("{gname} (expert {e})"),
                        fixup: Fixup::None,
                    },
                );
            }
            continue;
        }
        // `ffn_gate.E.weight`: one expert per tensor (older Mixtral files).
        if let Some((kind, tail)) = suffix.split_once('.')
            && let Some((e, "weight")) = tail.split_once('.')
            && let Ok(e) = e.parse::<usize>()
            && let Some((_, q, m)) = SPLIT_EXPERT_NAMES.iter().find(|(g, _, _)| *g == kind)
        {
            let proj = if mixtral { m } else { q };
            let (k, v) = whole(
                format!("{moe}.experts.{e}.{proj}.weight"),
                hf_shape(t),
                Fixup::None,
            )?;
            out.insert(k, v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_back_to_gguf() {
        for (hf, g) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
            ),
            (
                "model.layers.0.mlp.gate.weight",
                "blk.0.ffn_gate_inp.weight",
            ),
            (
                "model.layers.1.block_sparse_moe.gate.weight",
                "blk.1.ffn_gate_inp.weight",
            ),
            (
                "model.layers.2.mlp.experts.4.down_proj.weight",
                "blk.2.ffn_down_exps.weight",
            ),
            (
                "model.layers.2.block_sparse_moe.experts.4.w1.weight",
                "blk.2.ffn_gate_exps.weight",
            ),
            (
                "model.layers.1.mlp.shared_expert_gate.weight",
                "blk.1.ffn_gate_inp_shexp.weight",
            ),
        ] {
            assert_eq!(gguf_name_of(hf).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(gguf_name_of("something.else"), None);
    }
}
