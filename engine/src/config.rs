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
    /// `deepseek_v3` (and Kimi K2, `kimi_k2`): multi-head latent attention, sigmoid routing with a
    /// selection bias and group-limited top-k, shared experts, leading dense layers.
    DeepseekV3,
    /// `gpt_oss`: attention sinks, alternating sliding-window layers, biased projections and
    /// router, fused experts with a clamped SwiGLU.
    GptOss,
    /// `qwen3_5_moe_text` (the text model of Qwen3.5-MoE) and `qwen3_next`: Gated DeltaNet
    /// linear-attention layers mixed with gated full attention (partial rotary), zero-centred
    /// RMSNorm weights, a gated shared expert.
    Qwen3Next,
}

/// The `model_type` strings we accept.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v3",
    "kimi_k2",
    "gpt_oss",
    "qwen3_5_moe_text",
    "qwen3_5_moe",
    "qwen3_next",
];

impl Arch {
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Mixtral => "mixtral",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::GptOss => "gpt_oss",
            Arch::Qwen3Next => "qwen3_next",
        }
    }
}

/// Shapes of DeepSeek's multi-head latent attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent (what the cache holds, with the rope key).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without position.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width that carries rope (the key part is shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

impl MlaConfig {
    /// Query/key width of one head.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// Rotary embedding frequencies: plain, or YaRN-scaled (`rope_type: "yarn"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/dim)`.
    Default,
    /// YaRN: frequencies blended between interpolated and extrapolated, cos/sin scaled.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
        /// Rotations above which dimensions are extrapolated.
        beta_fast: f64,
        /// Rotations below which dimensions are interpolated.
        beta_slow: f64,
        /// Numerator magnitude scale (DeepSeek).
        mscale: Option<f64>,
        /// Denominator magnitude scale (DeepSeek; also scales DeepSeek's softmax).
        mscale_all_dim: Option<f64>,
        /// Explicit cos/sin factor.
        attention_factor: Option<f64>,
        /// Round the correction range to whole dimensions.
        truncate: bool,
    },
}

/// How router logits become expert weights (see [`crate::routing::RoutingRule`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterKind {
    /// Softmax over all experts, top-k, optional renormalisation (Qwen, Mixtral).
    SoftmaxTopK,
    /// DeepSeek-V3: sigmoid scores, biased group-limited choice, unbiased weights.
    SigmoidGrouped {
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Factor on the final weights.
        routed_scaling_factor: f32,
    },
    /// GPT-OSS: top-k of the (biased) router logits, softmax over those k.
    TopKSoftmax,
}

/// The gated activation of the experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertAct {
    /// `silu(gate) * up`.
    SiluMul,
    /// GPT-OSS: `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiGlu {
        /// `swiglu_alpha`.
        alpha: f32,
        /// `swiglu_limit`.
        limit: f32,
    },
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
    /// Sliding-window attention span of each layer (`None`: full attention).
    pub layer_windows: Vec<Option<usize>>,
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
    /// Multi-head latent attention shapes (DeepSeek-V3).
    pub mla: Option<MlaConfig>,
    /// Gated DeltaNet shapes and, per layer, whether the layer is linear attention (Qwen3-Next).
    pub linear_attn: Option<(crate::deltanet::DeltaNetConfig, Vec<bool>)>,
    /// Rotated width of a head (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Attention output scaled by `sigmoid(gate)`, the gate coming from a doubled `q_proj`.
    pub attn_output_gate: bool,
    /// RMSNorm weights are stored as offsets from one (`(1 + w) * x_normed`).
    pub norm_plus_one: bool,
    /// Rotary frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Rope pairs are adjacent elements `(x0, x1), (x2, x3)...` rather than the two halves
    /// (DeepSeek's `rope_interleave`).
    pub rope_interleave: bool,
    /// Routing rule family.
    pub router: RouterKind,
    /// Name of the shared expert module inside the MoE block (`shared_expert`, `shared_experts`).
    pub shared_expert_name: &'static str,
    /// Whether the shared expert's output is scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert_gated: bool,
    /// Name of the router inside the MoE block (`gate`, GPT-OSS `router`) and whether it has a bias.
    pub router_name: &'static str,
    /// Bias on the router.
    pub router_bias: bool,
    /// Per-head learned attention sink logits (GPT-OSS `sinks`).
    pub attention_sinks: bool,
    /// Activation of the routed experts.
    pub expert_act: ExpertAct,
    /// Experts carry biases on their projections (GPT-OSS).
    pub expert_bias: bool,
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

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err(format!("{key} must list strings, got {v}")))
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

    /// RoPE base and scaling from either spelling (`rope_parameters`, or `rope_theta` with
    /// `rope_scaling`).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let block = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        let theta = block
            .and_then(|b| b.get("rope_theta"))
            .and_then(Value::as_f64)
            .map(Ok)
            .unwrap_or_else(|| Ok(self.f64_opt("rope_theta")?.unwrap_or(10000.0)))?;
        let Some(b) = block else {
            return Ok((theta, RopeScaling::Default));
        };
        let ty = b
            .get("rope_type")
            .or_else(|| b.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| b.get(k).and_then(Value::as_f64);
        match ty {
            "default" => Ok((theta, RopeScaling::Default)),
            "yarn" => {
                let factor =
                    num("factor").ok_or_else(|| self.err("yarn rope needs a numeric factor"))?;
                let original = num("original_max_position_embeddings")
                    .ok_or_else(|| self.err("yarn rope needs original_max_position_embeddings"))?;
                if factor <= 0.0 || original <= 0.0 {
                    return Err(self.err(format!(
                        "yarn factor {factor} and original_max_position_embeddings {original} must be positive"
                    )));
                }
                Ok((
                    theta,
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: num("beta_fast").filter(|v| *v != 0.0).unwrap_or(32.0),
                        beta_slow: num("beta_slow").filter(|v| *v != 0.0).unwrap_or(1.0),
                        mscale: num("mscale").filter(|v| *v != 0.0),
                        mscale_all_dim: num("mscale_all_dim").filter(|v| *v != 0.0),
                        attention_factor: num("attention_factor"),
                        truncate: b.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                    },
                ))
            }
            other => Err(self.err(format!(
                "rope type {other:?} is not supported (default, yarn)"
            ))),
        }
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
            "deepseek_v3" | "kimi_k2" => Arch::DeepseekV3,
            "gpt_oss" => Arch::GptOss,
            "qwen3_5_moe_text" | "qwen3_next" => Arch::Qwen3Next,
            // The multimodal wrapper nests the text model and prefixes its tensors.
            "qwen3_5_moe" if r.get("text_config").is_some() => {
                return Err(r.err(
                    "the multimodal qwen3_5_moe layout (text_config, model.language_model.*) is not supported; use its text model (qwen3_5_moe_text)",
                ));
            }
            "qwen3_5_moe" => Arch::Qwen3Next,
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
        let mla = match arch {
            Arch::DeepseekV3 => {
                let m = MlaConfig {
                    q_lora_rank: r.usize_opt("q_lora_rank")?.filter(|&n| n > 0),
                    kv_lora_rank: r.usize_req("kv_lora_rank")?,
                    qk_nope_head_dim: r.usize_req("qk_nope_head_dim")?,
                    qk_rope_head_dim: r.usize_req("qk_rope_head_dim")?,
                    v_head_dim: r.usize_req("v_head_dim")?,
                };
                if m.kv_lora_rank == 0 || m.v_head_dim == 0 || m.qk_head_dim() == 0 {
                    return Err(
                        r.err("kv_lora_rank, v_head_dim and qk_*_head_dim must be positive")
                    );
                }
                if !m.qk_rope_head_dim.is_multiple_of(2) {
                    return Err(r.err(format!(
                        "qk_rope_head_dim {} must be even",
                        m.qk_rope_head_dim
                    )));
                }
                Some(m)
            }
            _ => None,
        };
        // For MLA, `head_dim` is the rope width (what transformers sets it to).
        let head_dim = match (mla, r.usize_opt("head_dim")?) {
            (Some(m), _) => m.qk_rope_head_dim,
            (None, Some(d)) => d,
            (None, None) => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.err(format!("head_dim {head_dim} must be positive and even")));
        }
        let num_experts = match arch {
            Arch::Mixtral => r.usize_req("num_local_experts")?,
            Arch::GptOss => r.usize_req("num_local_experts")?,
            Arch::DeepseekV3 => match r.usize_opt("n_routed_experts")? {
                Some(n) => n,
                None => r.usize_req("num_local_experts")?,
            },
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
        // Qwen3.5's text config has no dense layers and no intermediate_size.
        let intermediate_size = match arch {
            Arch::Qwen3Next => r.usize_or("intermediate_size", 0)?,
            _ => r.usize_req("intermediate_size")?,
        };
        let moe_intermediate_size = match arch {
            Arch::Mixtral | Arch::GptOss => intermediate_size,
            _ => r.usize_req("moe_intermediate_size")?,
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral | Arch::GptOss => true,
            Arch::Qwen3Next => r.bool_or("norm_topk_prob", true)?,
            _ => r.bool_or("norm_topk_prob", false)?,
        };
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen2Moe | Arch::Qwen3Next => {
                Some(r.usize_req("shared_expert_intermediate_size")?).filter(|&n| n > 0)
            }
            Arch::DeepseekV3 => {
                Some(r.usize_or("n_shared_experts", 0)? * moe_intermediate_size).filter(|&n| n > 0)
            }
            _ => None,
        };
        let router = match arch {
            Arch::DeepseekV3 => {
                if let Some(f) = r.get("scoring_func").and_then(Value::as_str)
                    && f != "sigmoid"
                {
                    return Err(r.err(format!(
                        "scoring_func {f:?} is not supported for deepseek_v3 (sigmoid)"
                    )));
                }
                let n_group = r.usize_or("n_group", 1)?;
                let topk_group = r.usize_or("topk_group", n_group)?;
                if n_group == 0
                    || num_experts % n_group != 0
                    || topk_group == 0
                    || topk_group > n_group
                {
                    return Err(r.err(format!(
                        "n_group {n_group} must divide the {num_experts} experts and topk_group {topk_group} lie in 1..=n_group"
                    )));
                }
                if topk_group * (num_experts / n_group) < num_experts_per_tok {
                    return Err(r.err(format!(
                        "topk_group {topk_group} groups of {} experts cannot supply num_experts_per_tok {num_experts_per_tok}",
                        num_experts / n_group
                    )));
                }
                RouterKind::SigmoidGrouped {
                    n_group,
                    topk_group,
                    routed_scaling_factor: r.f64_opt("routed_scaling_factor")?.unwrap_or(1.0)
                        as f32,
                }
            }
            Arch::GptOss => RouterKind::TopKSoftmax,
            _ => RouterKind::SoftmaxTopK,
        };
        let layer_kinds = match arch {
            Arch::Mixtral | Arch::GptOss => vec![MlpKind::Moe; num_hidden_layers],
            Arch::DeepseekV3 => {
                let k = r.usize_or("first_k_dense_replace", 0)?;
                (0..num_hidden_layers)
                    .map(|i| if i >= k { MlpKind::Moe } else { MlpKind::Dense })
                    .collect()
            }
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
            Arch::Qwen3Next => {
                let b = r.bool_or("attention_bias", false)?;
                (b, b)
            }
            Arch::DeepseekV3 => {
                let b = r.bool_or("attention_bias", false)?;
                (b, b)
            }
            Arch::GptOss => {
                let b = r.bool_or("attention_bias", true)?;
                (b, b)
            }
        };
        let sliding_window = match arch {
            Arch::Mixtral | Arch::GptOss => r.usize_opt("sliding_window")?.filter(|&w| w > 0),
            _ if r.bool_or("use_sliding_window", false)? => r.usize_opt("sliding_window")?,
            _ => None,
        };
        let layer_windows = match arch {
            Arch::GptOss => {
                let types = r.strings("layer_types")?;
                if types.len() != num_hidden_layers {
                    return Err(r.err(format!(
                        "layer_types lists {} layers, num_hidden_layers is {num_hidden_layers}",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(None),
                        "sliding_attention" => sliding_window
                            .map(Some)
                            .ok_or_else(|| r.err("sliding_attention layers need a sliding_window")),
                        other => Err(r.err(format!("unknown layer type {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => vec![sliding_window; num_hidden_layers],
        };
        let linear_attn = match arch {
            Arch::Qwen3Next => {
                let d = crate::deltanet::DeltaNetConfig {
                    num_key_heads: r.usize_req("linear_num_key_heads")?,
                    num_value_heads: r.usize_req("linear_num_value_heads")?,
                    key_head_dim: r.usize_req("linear_key_head_dim")?,
                    value_head_dim: r.usize_req("linear_value_head_dim")?,
                    conv_kernel: r.usize_or("linear_conv_kernel_dim", 4)?,
                };
                if d.num_key_heads == 0
                    || !d.num_value_heads.is_multiple_of(d.num_key_heads)
                    || d.key_head_dim == 0
                    || d.value_head_dim == 0
                    || d.conv_kernel == 0
                {
                    return Err(r.err(format!(
                        "linear attention shapes {d:?} must be positive, value heads a multiple of key heads"
                    )));
                }
                let types = r.strings("layer_types")?;
                let linear: Vec<bool> = if types.is_empty() {
                    let every = r.usize_or("full_attention_interval", 4)?.max(1);
                    (0..num_hidden_layers)
                        .map(|i| (i + 1) % every != 0)
                        .collect()
                } else if types.len() != num_hidden_layers {
                    return Err(r.err(format!(
                        "layer_types lists {} layers, num_hidden_layers is {num_hidden_layers}",
                        types.len()
                    )));
                } else {
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "linear_attention" => Ok(true),
                            "full_attention" => Ok(false),
                            other => Err(r.err(format!("unknown layer type {other:?}"))),
                        })
                        .collect::<Result<_>>()?
                };
                Some((d, linear))
            }
            _ => None,
        };
        let partial = r
            .get("rope_parameters")
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .map_or_else(|| r.f64_opt("partial_rotary_factor"), |f| Ok(Some(f)))?
            .unwrap_or(1.0);
        let rotary_dim = ((head_dim as f64 * partial) as usize).min(head_dim);
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(r.err(format!(
                "rotary width {rotary_dim} (head_dim {head_dim} x partial_rotary_factor {partial}) must be positive and even"
            )));
        }
        let expert_act = match arch {
            Arch::GptOss => ExpertAct::ClampedSwiGlu {
                alpha: r.f64_opt("swiglu_alpha")?.unwrap_or(1.702) as f32,
                limit: r.f64_opt("swiglu_limit")?.unwrap_or(7.0) as f32,
            },
            _ => ExpertAct::SiluMul,
        };
        let eos_token_ids = r.token_ids("eos_token_id")?;
        let bos_token_id = r.token_ids("bos_token_id")?.first().copied();
        let (rope_theta, rope_scaling) = r.rope()?;
        if let Some(q) = r.get("quantization_config") {
            check_quantization(&r, q)?;
        }
        Ok(ModelConfig {
            arch,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: r.usize_req("vocab_size")?,
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            max_position_embeddings: r.usize_or("max_position_embeddings", 32768)?,
            layer_windows,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            qk_norm: matches!(arch, Arch::Qwen3Moe | Arch::Qwen3Next),
            intermediate_size,
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            norm_topk_prob,
            shared_expert_intermediate_size,
            layer_kinds,
            mla,
            linear_attn,
            rotary_dim,
            attn_output_gate: arch == Arch::Qwen3Next,
            norm_plus_one: arch == Arch::Qwen3Next,
            rope_scaling,
            rope_interleave: arch == Arch::DeepseekV3 && r.bool_or("rope_interleave", true)?,
            router,
            shared_expert_name: match arch {
                Arch::DeepseekV3 => "shared_experts",
                _ => "shared_expert",
            },
            shared_expert_gated: matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Next),
            router_name: match arch {
                Arch::GptOss => "router",
                _ => "gate",
            },
            router_bias: arch == Arch::GptOss,
            attention_sinks: arch == Arch::GptOss,
            expert_act,
            expert_bias: arch == Arch::GptOss,
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
            // Fused over experts: every expert names the same tensors (see crate::experts).
            Arch::GptOss => {
                let p = format!("{}.experts", self.moe_prefix(layer));
                ExpertTensorNames {
                    gate_proj: format!("{p}.gate_up_proj"),
                    up_proj: format!("{p}.gate_up_proj"),
                    down_proj: format!("{p}.down_proj"),
                }
            }
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

/// Accepts the quantization schemes whose weights [`crate::safetensors::Checkpoint`] decodes:
/// DeepSeek's block FP8 (`quant_method: "fp8"`, e4m3, 128x128 blocks).
fn check_quantization(r: &Reader<'_>, q: &Value) -> Result<()> {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    match method {
        "fp8" => {
            if let Some(f) = q.get("fmt").and_then(Value::as_str)
                && f != "e4m3"
            {
                return Err(r.err(format!("fp8 format {f:?} is not supported (e4m3)")));
            }
            let block: Option<Vec<u64>> = q
                .get("weight_block_size")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect());
            match block.as_deref() {
                None | Some([128, 128]) => Ok(()),
                Some(b) => Err(r.err(format!(
                    "fp8 weight_block_size {b:?} is not supported ([128, 128])"
                ))),
            }
        }
        // GPT-OSS: expert weights as MXFP4 `_blocks` + `_scales` (see crate::mxfp4).
        "mxfp4" => Ok(()),
        other => Err(r.err(format!(
            "quantization_config.quant_method {other:?} is not supported (fp8, mxfp4)"
        ))),
    }
}

/// Path of a model directory's config, for messages.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Hub spelling of DeepSeek-V3's config (transformers-4 style: `rope_scaling` with
    /// `type`, `scoring_func`, `quantization_config`), shapes cut down.
    const DEEPSEEK_HUB: &str = r#"{"model_type":"deepseek_v3","hidden_size":64,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":4,
        "q_lora_rank":32,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":8,
        "v_head_dim":16,"n_routed_experts":8,"n_group":4,"topk_group":2,
        "num_experts_per_tok":2,"first_k_dense_replace":3,"moe_intermediate_size":16,
        "intermediate_size":48,"n_shared_experts":1,"norm_topk_prob":true,
        "routed_scaling_factor":2.5,"scoring_func":"sigmoid","vocab_size":128,
        "rope_theta":10000,"rope_scaling":{"type":"yarn","factor":40,"beta_fast":32,
        "beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0,
        "original_max_position_embeddings":4096},
        "quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3",
        "quant_method":"fp8","weight_block_size":[128,128]}}"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn deepseek_hub_config() {
        let c = parse(DEEPSEEK_HUB).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.num_experts, 8);
        assert_eq!(c.shared_expert_intermediate_size, Some(16));
        assert_eq!(
            c.layer_kinds,
            [MlpKind::Dense, MlpKind::Dense, MlpKind::Dense, MlpKind::Moe]
        );
        assert_eq!(c.mla.unwrap().q_lora_rank, Some(32));
        assert_eq!(c.head_dim, 8, "rope width");
        assert!(c.rope_interleave);
        assert!(matches!(
            c.router,
            RouterKind::SigmoidGrouped {
                n_group: 4,
                topk_group: 2,
                ..
            }
        ));
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn { factor, truncate: true, .. } if factor == 40.0
        ));
        // Kimi K2 names the same architecture otherwise.
        let kimi = DEEPSEEK_HUB.replace("\"deepseek_v3\"", "\"kimi_k2\"");
        assert_eq!(parse(&kimi).unwrap().arch, Arch::DeepseekV3);
    }

    #[test]
    fn deepseek_config_errors_name_the_field() {
        let cases = [
            ("\"n_group\":4", "\"n_group\":3", "n_group"),
            (
                "\"scoring_func\":\"sigmoid\"",
                "\"scoring_func\":\"softmax\"",
                "scoring_func",
            ),
            ("[128,128]", "[64,64]", "weight_block_size"),
            (
                "\"quant_method\":\"fp8\"",
                "\"quant_method\":\"gptq\"",
                "gptq",
            ),
            ("\"type\":\"yarn\"", "\"type\":\"longrope\"", "longrope"),
            (
                "\"qk_rope_head_dim\":8",
                "\"qk_rope_head_dim\":7",
                "qk_rope_head_dim",
            ),
        ];
        for (from, to, want) in cases {
            let text = DEEPSEEK_HUB.replace(from, to);
            assert_ne!(text, DEEPSEEK_HUB, "{from}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
    }

    #[test]
    fn qwen3_5_flat_config_parses_and_the_multimodal_wrapper_is_refused() {
        let flat = r#"{"model_type":"qwen3_5_moe","hidden_size":64,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "linear_num_key_heads":2,"linear_num_value_heads":4,"linear_key_head_dim":16,
            "linear_value_head_dim":8,"num_experts":4,"num_experts_per_tok":2,
            "moe_intermediate_size":16,"shared_expert_intermediate_size":16,"vocab_size":128,
            "partial_rotary_factor":0.25}"#;
        let c = parse(flat).unwrap();
        assert_eq!(c.arch, Arch::Qwen3Next);
        assert_eq!(c.rotary_dim, 4);
        assert_eq!(c.linear_attn.unwrap().1, [true, true, true, false]);
        let wrapped = r#"{"model_type":"qwen3_5_moe","text_config":{}}"#;
        let err = parse(wrapped).unwrap_err().to_string();
        assert!(err.contains("text_config"), "{err}");
    }

    #[test]
    fn gpt_oss_layer_types_must_match_the_layers() {
        let base = r#"{"model_type":"gpt_oss","hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "intermediate_size":32,"num_local_experts":4,"num_experts_per_tok":2,
            "vocab_size":128,"sliding_window":8,
            "layer_types":["sliding_attention","full_attention"]}"#;
        let c = parse(base).unwrap();
        assert_eq!(c.layer_windows, [Some(8), None]);
        assert!(matches!(c.expert_act, ExpertAct::ClampedSwiGlu { .. }));
        let short = base.replace(",\"full_attention\"", "");
        let err = parse(&short).unwrap_err().to_string();
        assert!(err.contains("layer_types"), "{err}");
    }
}
