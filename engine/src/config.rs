//! `config.json` of a Hugging Face MoE checkpoint, parsed into one typed description.
//!
//! Real Hub checkpoints spell their configs the transformers-4 way (`num_experts`, `rope_theta`,
//! `rope_scaling`) while transformers 5 writes `num_local_experts` and a `rope_parameters` block; both
//! are accepted.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EngineError, Result};

/// Architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `qwen3_moe`: q/k RMSNorm per head, explicit head_dim, softmax top-k routing.
    Qwen3Moe,
    /// `qwen2_moe`: q/k/v biases, a shared expert with a sigmoid gate.
    Qwen2Moe,
    /// `mixtral`: softmax over the chosen experts' logits.
    Mixtral,
}

/// The `model_type` strings we accept.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen3_moe", "qwen2_moe", "mixtral"];

impl Arch {
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Mixtral => "mixtral",
        }
    }
}

/// Whether a decoder layer's MLP is dense or a routed mixture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// A plain SwiGLU MLP of `intermediate_size`.
    Dense,
    /// Routed experts (plus a shared expert where the architecture has one).
    Moe,
}

/// Everything the forward pass needs to know about a model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Which architecture.
    pub arch: Arch,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest sequence the model was made for.
    pub max_position_embeddings: usize,
    /// Sliding-window attention span, if any.
    pub sliding_window: Option<usize>,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Width of dense layers' MLP.
    pub intermediate_size: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Renormalise the chosen experts' weights to sum to one.
    pub norm_topk_prob: bool,
    /// Width of the shared expert, if the architecture has one.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per-layer MLP kind.
    pub layer_kinds: Vec<MlpKind>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

/// Names of one expert's three projection tensors.
#[derive(Clone, Debug)]
pub struct ExpertTensorNames {
    /// Gate projection `[moe_intermediate, hidden]`.
    pub gate_proj: String,
    /// Up projection `[moe_intermediate, hidden]`.
    pub up_proj: String,
    /// Down projection `[hidden, moe_intermediate]`.
    pub down_proj: String,
}

struct Reader<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: impl Into<String>) -> EngineError {
        EngineError::Config {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing {key}")))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("{key} must be true or false, got {v}"))),
        }
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.err(format!("{key} must list integers, got {v}")))
                })
                .collect(),
            Some(v) => Err(self.err(format!("{key} must be a list, got {v}"))),
        }
    }

    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| self.err(format!("{key} must list token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| vec![n])
                .ok_or_else(|| self.err(format!("{key} must be a token id, got {v}"))),
        }
    }

    /// RoPE base and type from either spelling; only the default rope is supported so far.
    fn rope_theta(&self) -> Result<f64> {
        let check_type = |block: &Value, what: &str| -> Result<()> {
            let ty = block
                .get("rope_type")
                .or_else(|| block.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if ty != "default" {
                return Err(self.err(format!(
                    "{what} asks for rope type {ty:?}; only \"default\" rope is supported"
                )));
            }
            Ok(())
        };
        if let Some(p) = self.get("rope_parameters") {
            check_type(p, "rope_parameters")?;
            if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
                return Ok(t);
            }
        }
        if let Some(s) = self.get("rope_scaling") {
            check_type(s, "rope_scaling")?;
        }
        Ok(self.f64_opt("rope_theta")?.unwrap_or(10000.0))
    }
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` beside it for eos/bos, if present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path,
                what: "the model's config.json",
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let v: Value = serde_json::from_str(&gen_text).map_err(|e| EngineError::Config {
                path: gen_path.clone(),
                msg: e.to_string(),
            })?;
            let r = Reader {
                v: &v,
                path: &gen_path,
            };
            let eos = r.token_ids("eos_token_id")?;
            if !eos.is_empty() {
                cfg.eos_token_ids = eos;
            }
            if let Some(b) = r.token_ids("bos_token_id")?.first() {
                cfg.bos_token_id = Some(*b);
            }
        }
        Ok(cfg)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let r = Reader { v: &v, path };
        let model_type = r
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| r.err("missing model_type"))?;
        let arch = match model_type {
            "qwen3_moe" => Arch::Qwen3Moe,
            "qwen2_moe" => Arch::Qwen2Moe,
            "mixtral" => Arch::Mixtral,
            other => {
                return Err(EngineError::UnsupportedModel {
                    model_type: other.to_string(),
                    supported: SUPPORTED_MODEL_TYPES.join(", "),
                });
            }
        };
        let hidden_size = r.usize_req("hidden_size")?;
        let num_hidden_layers = r.usize_req("num_hidden_layers")?;
        let num_attention_heads = r.usize_req("num_attention_heads")?;
        let num_key_value_heads = r.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(r.err(format!(
                "num_attention_heads {num_attention_heads} must be a positive multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.err(format!("head_dim {head_dim} must be positive and even")));
        }
        let num_experts = match arch {
            Arch::Mixtral => r.usize_req("num_local_experts")?,
            _ => match r.usize_opt("num_experts")? {
                Some(n) => n,
                None => r.usize_req("num_local_experts")?,
            },
        };
        let num_experts_per_tok = r.usize_req("num_experts_per_tok")?;
        if num_experts == 0 || num_experts_per_tok == 0 || num_experts_per_tok > num_experts {
            return Err(r.err(format!(
                "num_experts_per_tok {num_experts_per_tok} must be between 1 and the number of experts {num_experts}"
            )));
        }
        let intermediate_size = r.usize_req("intermediate_size")?;
        let moe_intermediate_size = match arch {
            Arch::Mixtral => intermediate_size,
            _ => r.usize_req("moe_intermediate_size")?,
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            _ => r.bool_or("norm_topk_prob", false)?,
        };
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen2Moe => {
                Some(r.usize_req("shared_expert_intermediate_size")?).filter(|&n| n > 0)
            }
            _ => None,
        };
        let layer_kinds = match arch {
            Arch::Mixtral => vec![MlpKind::Moe; num_hidden_layers],
            _ => {
                let only_mlp = r.usize_list("mlp_only_layers")?;
                let step = r.usize_or("decoder_sparse_step", 1)?;
                if step == 0 {
                    return Err(r.err("decoder_sparse_step must be at least 1"));
                }
                (0..num_hidden_layers)
                    .map(|i| {
                        if !only_mlp.contains(&i) && (i + 1) % step == 0 {
                            MlpKind::Moe
                        } else {
                            MlpKind::Dense
                        }
                    })
                    .collect()
            }
        };
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2Moe => (true, false),
            Arch::Qwen3Moe => {
                let b = r.bool_or("attention_bias", false)?;
                (b, b)
            }
            Arch::Mixtral => (false, false),
        };
        let sliding_window = match arch {
            Arch::Mixtral => r.usize_opt("sliding_window")?,
            _ if r.bool_or("use_sliding_window", false)? => r.usize_opt("sliding_window")?,
            _ => None,
        };
        let eos_token_ids = r.token_ids("eos_token_id")?;
        let bos_token_id = r.token_ids("bos_token_id")?.first().copied();
        Ok(ModelConfig {
            arch,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: r.usize_req("vocab_size")?,
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: r.rope_theta()?,
            max_position_embeddings: r.usize_or("max_position_embeddings", 32768)?,
            sliding_window,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3Moe,
            intermediate_size,
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            norm_topk_prob,
            shared_expert_intermediate_size,
            layer_kinds,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Prefix of the tensors of layer `i`.
    pub fn layer_prefix(&self, i: usize) -> String {
        format!("model.layers.{i}")
    }

    /// Prefix of the MoE block of layer `i` (`mlp` or Mixtral's `block_sparse_moe`).
    pub fn moe_prefix(&self, i: usize) -> String {
        match self.arch {
            Arch::Mixtral => format!("model.layers.{i}.block_sparse_moe"),
            _ => format!("model.layers.{i}.mlp"),
        }
    }

    /// Tensor names of routed expert `e` of layer `layer`.
    pub fn expert_tensor_names(&self, layer: usize, e: usize) -> ExpertTensorNames {
        let p = format!("{}.experts.{e}", self.moe_prefix(layer));
        match self.arch {
            Arch::Mixtral => ExpertTensorNames {
                gate_proj: format!("{p}.w1.weight"),
                up_proj: format!("{p}.w3.weight"),
                down_proj: format!("{p}.w2.weight"),
            },
            _ => ExpertTensorNames {
                gate_proj: format!("{p}.gate_proj.weight"),
                up_proj: format!("{p}.up_proj.weight"),
                down_proj: format!("{p}.down_proj.weight"),
            },
        }
    }

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layer_kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == MlpKind::Moe)
            .map(|(i, _)| i)
    }

    /// Bytes of one routed expert at `bytes_per_weight`.
    pub fn expert_params(&self) -> usize {
        3 * self.hidden_size * self.moe_intermediate_size
    }
}

/// Path of a model directory's config, for messages.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
