//! Capacity planning: where a model's parts go on a cluster, the memory each node needs, and the
//! tokens/s to expect, from a `config.json` alone (no weights).
//!
//! Plain data in, plain data out. The cost model is deliberately simple and stated in full:
//! - decode is memory-bound: every step reads the coordinator's dense weights once, the KV cache of
//!   every running sequence, and on each host the distinct experts its tokens chose;
//! - each MoE layer costs the slowest host's share plus, for remote hosts, one round trip, the
//!   activations over the link and the dispatch overhead measured by `moeshard calibrate`;
//! - prefill is compute-bound (2 flops per weight per token, plus attention).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::placement::{HostCapacity, place};

/// Errors of the planner.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The config is malformed or describes an architecture the planner cannot size.
    #[error("config: {0}")]
    Config(String),
    /// The cluster description is malformed.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Weight storage formats the planner knows the size of.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quant {
    /// 4 bytes per weight.
    F32,
    /// 2 bytes per weight.
    Bf16,
    /// 2 bytes per weight.
    F16,
    /// 34 bytes per 32 weights.
    Q8_0,
    /// 144 bytes per 256 weights.
    Q4_K,
    /// 18 bytes per 32 weights.
    Q4_0,
    /// 17 bytes per 32 weights (GPT-OSS native experts).
    Mxfp4,
    /// 1 byte per weight plus a 4-byte scale per 128x128 block (DeepSeek-V3 native).
    Fp8,
}

impl Quant {
    /// Bytes per weight.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Quant::F32 => 4.0,
            Quant::Bf16 | Quant::F16 => 2.0,
            Quant::Q8_0 => 34.0 / 32.0,
            Quant::Q4_K => 144.0 / 256.0,
            Quant::Q4_0 => 18.0 / 32.0,
            Quant::Mxfp4 => 17.0 / 32.0,
            Quant::Fp8 => 1.0 + 4.0 / 16384.0,
        }
    }

    /// The name `parse` reads and cluster files key their rates by.
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::Bf16 => "bf16",
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_K => "q4_k",
            Quant::Q4_0 => "q4_0",
            Quant::Mxfp4 => "mxfp4",
            Quant::Fp8 => "fp8",
        }
    }

    /// Parses `q4_k`, `bf16`, ...
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Quant::F32,
            "bf16" => Quant::Bf16,
            "f16" => Quant::F16,
            "q8_0" => Quant::Q8_0,
            "q4_k" | "q4_k_m" => Quant::Q4_K,
            "q4_0" => Quant::Q4_0,
            "mxfp4" => Quant::Mxfp4,
            "fp8" => Quant::Fp8,
            _ => return None,
        })
    }
}

/// The sizes of a model that matter for planning.
#[derive(Clone, Debug, Serialize)]
pub struct ModelShape {
    /// `model_type`.
    pub model_type: String,
    /// Residual width.
    pub hidden: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub experts: u64,
    /// Experts chosen per token.
    pub top_k: u64,
    /// Weights of one routed expert.
    pub expert_params: u64,
    /// Weights that live with the coordinator (everything but routed experts).
    pub dense_params: u64,
    /// Dense weights read per decoded token (the embedding table is only indexed).
    pub dense_active_params: u64,
    /// KV cache elements per token, per full-attention layer, summed over those layers.
    pub kv_elems_per_token: u64,
    /// KV elements per token of the sliding-window layers, summed, and their window.
    pub window_kv: Option<(u64, u64)>,
    /// Fixed recurrent state per sequence (linear attention), in elements.
    pub state_elems_per_seq: u64,
    /// Attention flops per token per position of context (2 * heads * head widths, summed).
    pub attn_flops_per_ctx: u64,
    /// Weights read once per decoded token outside the decoder layers: the LM head (tied or not)
    /// and the final norm. `dense_active_params - head_params` are the layers' own dense weights.
    pub head_params: u64,
}

struct J<'a>(&'a Value);

impl J<'_> {
    fn u(&self, k: &str) -> Option<u64> {
        self.0.get(k).and_then(Value::as_u64)
    }
    fn req(&self, k: &str) -> Result<u64, PlanError> {
        self.u(k)
            .ok_or_else(|| PlanError::Config(format!("missing or non-integer {k}")))
    }
    fn strings(&self, k: &str) -> Vec<String> {
        self.0
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn b(&self, k: &str, d: bool) -> bool {
        self.0.get(k).and_then(Value::as_bool).unwrap_or(d)
    }
}

impl ModelShape {
    /// Sizes a model from the text of its `config.json`.
    pub fn from_config_json(text: &str) -> Result<Self, PlanError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| PlanError::Config(format!("not valid JSON: {e}")))?;
        // Multimodal wrappers keep the language model in text_config.
        let v = match v.get("text_config") {
            Some(t) if t.get("hidden_size").is_some() => {
                let mut t = t.clone();
                if t.get("model_type").is_none() {
                    t["model_type"] = v["model_type"].clone();
                }
                t
            }
            _ => v,
        };
        let j = J(&v);
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| PlanError::Config("missing model_type".into()))?
            .to_string();
        let h = j.req("hidden_size")?;
        let layers = j.req("num_hidden_layers")?;
        let vocab = j.req("vocab_size")?;
        let nh = j.req("num_attention_heads")?;
        let nkv = j.u("num_key_value_heads").unwrap_or(nh);
        let hd = j.u("head_dim").unwrap_or(h / nh.max(1));
        let experts = j
            .u("num_experts")
            .or_else(|| j.u("num_local_experts"))
            .or_else(|| j.u("n_routed_experts"))
            .ok_or_else(|| {
                PlanError::Config(
                    "no expert count (num_experts, num_local_experts or n_routed_experts)".into(),
                )
            })?;
        let top_k = j
            .u("num_experts_per_tok")
            .or_else(|| j.u("experts_per_token"))
            .ok_or_else(|| PlanError::Config("missing num_experts_per_tok".into()))?;
        let inter = j.u("intermediate_size").unwrap_or(0);
        let moe_inter = j.u("moe_intermediate_size").unwrap_or(inter);
        let tied = j.b("tie_word_embeddings", false);
        let embed = vocab * h;
        let lm_head = if tied { 0 } else { vocab * h };
        let std_attn = h * nh * hd * 2 + 2 * h * nkv * hd;
        let mut s = ModelShape {
            model_type: model_type.clone(),
            hidden: h,
            layers,
            moe_layers: Vec::new(),
            experts,
            top_k,
            expert_params: 3 * h * moe_inter,
            dense_params: 0,
            dense_active_params: 0,
            kv_elems_per_token: 0,
            window_kv: None,
            state_elems_per_seq: 0,
            attn_flops_per_ctx: 0,
            head_params: vocab * h + h,
        };
        let mut dense = h; // final norm
        match model_type.as_str() {
            "qwen3_moe" | "qwen2_moe" | "mixtral" | "olmoe" => {
                let step = j.u("decoder_sparse_step").unwrap_or(1).max(1) as usize;
                let only: Vec<usize> = v
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|x| x as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                let shared = j.u("shared_expert_intermediate_size").unwrap_or(0);
                for l in 0..layers as usize {
                    dense += std_attn + 2 * h;
                    let moe =
                        model_type == "mixtral" || (!only.contains(&l) && (l + 1) % step == 0);
                    if moe {
                        s.moe_layers.push(l);
                        dense += experts * h;
                        if shared > 0 {
                            dense += 3 * h * shared + h;
                        }
                    } else {
                        dense += 3 * h * inter;
                    }
                }
                s.kv_elems_per_token = layers * 2 * nkv * hd;
                s.attn_flops_per_ctx = layers * 4 * nh * hd;
            }
            "deepseek_v3" | "kimi_k2" | "deepseek_v2" => {
                let qr = j.u("q_lora_rank").unwrap_or(0);
                let kvr = j.req("kv_lora_rank")?;
                let nope = j.req("qk_nope_head_dim")?;
                let rope = j.req("qk_rope_head_dim")?;
                let vd = j.req("v_head_dim")?;
                let first_dense = j.u("first_k_dense_replace").unwrap_or(0) as usize;
                let n_shared = j.u("n_shared_experts").unwrap_or(0);
                let q = if qr > 0 {
                    h * qr + qr + qr * nh * (nope + rope)
                } else {
                    h * nh * (nope + rope)
                };
                let attn = q + h * (kvr + rope) + kvr + kvr * nh * (nope + vd) + nh * vd * h;
                for l in 0..layers as usize {
                    dense += attn + 2 * h;
                    if l >= first_dense {
                        s.moe_layers.push(l);
                        dense += experts * h + experts + n_shared * 3 * h * moe_inter;
                    } else {
                        dense += 3 * h * inter;
                    }
                }
                // The cache holds the compressed latent and the rope key.
                s.kv_elems_per_token = layers * (kvr + rope);
                s.attn_flops_per_ctx = layers * 2 * nh * (nope + rope + vd);
            }
            "gpt_oss" => {
                let window = j.u("sliding_window").unwrap_or(128);
                let types = j.strings("layer_types");
                s.expert_params = 3 * h * moe_inter + 2 * moe_inter + h;
                let attn = std_attn + nh * hd * 2 + nkv * hd * 2 + h + nh; // biases, sinks
                let mut full = 0;
                let mut sliding = 0;
                for l in 0..layers as usize {
                    dense += attn + 2 * h + experts * h + experts;
                    s.moe_layers.push(l);
                    if types.get(l).is_some_and(|t| t == "sliding_attention") {
                        sliding += 1;
                    } else {
                        full += 1;
                    }
                }
                s.kv_elems_per_token = full * 2 * nkv * hd;
                s.window_kv = (sliding > 0).then_some((sliding * 2 * nkv * hd, window));
                s.attn_flops_per_ctx = full * 4 * nh * hd;
            }
            "qwen3_5_moe" | "qwen3_next" | "qwen3_5_moe_text" => {
                let types = j.strings("layer_types");
                let interval = j.u("full_attention_interval").unwrap_or(4).max(1) as usize;
                let nk = j.req("linear_num_key_heads")?;
                let nv = j.req("linear_num_value_heads")?;
                let dk = j.req("linear_key_head_dim")?;
                let dv = j.req("linear_value_head_dim")?;
                let kernel = j.u("linear_conv_kernel_dim").unwrap_or(4);
                let shared = j.u("shared_expert_intermediate_size").unwrap_or(0);
                let conv_dim = 2 * nk * dk + nv * dv;
                let linear = h * conv_dim
                    + h * nv * dv
                    + 2 * h * nv
                    + conv_dim * kernel
                    + 2 * nv
                    + dv
                    + nv * dv * h;
                let gated_attn = h * nh * hd * 2 + 2 * h * nkv * hd + nh * hd * h + 2 * hd;
                let mut full = 0;
                for l in 0..layers as usize {
                    let is_full = match types.get(l) {
                        Some(t) => t == "full_attention",
                        None => (l + 1) % interval == 0,
                    };
                    if is_full {
                        full += 1;
                        dense += gated_attn;
                    } else {
                        dense += linear;
                        s.state_elems_per_seq += nv * dk * dv + conv_dim * (kernel - 1);
                    }
                    dense += 2 * h + experts * h + 3 * h * shared + h;
                    s.moe_layers.push(l);
                }
                s.kv_elems_per_token = full * 2 * nkv * hd;
                s.attn_flops_per_ctx = full * 4 * nh * hd;
            }
            other => {
                return Err(PlanError::Config(format!(
                    "model_type {other:?} cannot be sized; known: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3, kimi_k2, gpt_oss, qwen3_5_moe, qwen3_next"
                )));
            }
        }
        s.dense_params = dense + embed + lm_head;
        // Per token the embedding is one row; the LM head is read whole (tied or not).
        s.dense_active_params = dense + vocab * h;
        Ok(s)
    }

    /// Sizes a model from GGUF metadata (llama.cpp's keys): architectures `qwen3moe`, `qwen2moe`
    /// and `llama` with experts (Mixtral).
    pub fn from_gguf_metadata(
        meta: &std::collections::BTreeMap<String, moeshard_engine::gguf::Value>,
    ) -> Result<Self, PlanError> {
        let arch = meta
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PlanError::Config("GGUF metadata has no general.architecture".into()))?;
        let model_type = match arch {
            "qwen3moe" => "qwen3_moe",
            "qwen2moe" => "qwen2_moe",
            "llama" | "mixtral" => "mixtral",
            other => {
                return Err(PlanError::Config(format!(
                    "GGUF architecture {other:?} cannot be sized yet; known: qwen3moe, qwen2moe, llama (with experts)"
                )));
            }
        };
        let key = |k: &str| meta.get(&format!("{arch}.{k}")).and_then(|v| v.as_u64());
        let need = |k: &str| {
            key(k).ok_or_else(|| PlanError::Config(format!("GGUF metadata lacks {arch}.{k}")))
        };
        let vocab = key("vocab_size")
            .or_else(|| {
                meta.get("tokenizer.ggml.tokens")
                    .and_then(|v| v.as_array())
                    .map(|a| a.len() as u64)
            })
            .ok_or_else(|| PlanError::Config("GGUF metadata gives no vocabulary size".into()))?;
        let mut cfg = serde_json::json!({
            "model_type": model_type,
            "hidden_size": need("embedding_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": need("attention.head_count")?,
            "num_experts": need("expert_count")?,
            "num_experts_per_tok": need("expert_used_count")?,
            "vocab_size": vocab,
            "intermediate_size": key("feed_forward_length").unwrap_or(0),
        });
        if let Some(kv) = key("attention.head_count_kv") {
            cfg["num_key_value_heads"] = kv.into();
        }
        if let Some(d) = key("attention.key_length") {
            cfg["head_dim"] = d.into();
        }
        if let Some(m) = key("expert_feed_forward_length") {
            cfg["moe_intermediate_size"] = m.into();
        }
        if let Some(s) = key("expert_shared_feed_forward_length") {
            cfg["shared_expert_intermediate_size"] = s.into();
        }
        Self::from_config_json(&cfg.to_string())
    }

    /// All weights.
    pub fn total_params(&self) -> u64 {
        self.dense_params + self.moe_layers.len() as u64 * self.experts * self.expert_params
    }

    /// Weights used per token.
    pub fn active_params(&self) -> u64 {
        self.dense_active_params + self.moe_layers.len() as u64 * self.top_k * self.expert_params
    }

    /// The same model cut to its first `k` decoder layers, as `--synthetic --layers K` runs it.
    /// The per-layer parts (dense weights, caches, attention flops) scale by `k / layers`, which
    /// is exact for models whose layers are alike; the embedding and the LM head stay.
    pub fn with_layers(&self, k: u64) -> Self {
        let k = k.clamp(1, self.layers.max(1));
        if k == self.layers {
            return self.clone();
        }
        let scale = |v: u64| (v as u128 * k as u128 / self.layers.max(1) as u128) as u64;
        let layer_dense = self.dense_active_params.saturating_sub(self.head_params);
        let mut m = self.clone();
        m.layers = k;
        m.moe_layers.retain(|&l| (l as u64) < k);
        m.dense_params = self.dense_params - layer_dense + scale(layer_dense);
        m.dense_active_params = self.head_params + scale(layer_dense);
        m.kv_elems_per_token = scale(self.kv_elems_per_token);
        m.window_kv = self.window_kv.map(|(e, w)| (scale(e), w));
        m.state_elems_per_seq = scale(self.state_elems_per_seq);
        m.attn_flops_per_ctx = scale(self.attn_flops_per_ctx);
        m
    }

    /// Dense weights of the decoder layers read per decoded token (attention, norms, routers,
    /// shared experts, dense MLPs), without the LM head.
    pub fn layer_dense_params(&self) -> u64 {
        self.dense_active_params.saturating_sub(self.head_params)
    }

    /// KV-cache and state bytes of one sequence at `context` tokens (f32 cache).
    pub fn cache_bytes(&self, context: u64) -> u64 {
        let window = self.window_kv.map(|(e, w)| e * context.min(w)).unwrap_or(0);
        4 * (self.kv_elems_per_token * context + window + self.state_elems_per_seq)
    }
}

/// One machine of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Name for the tables.
    pub name: String,
    /// Memory in GB (1e9 bytes).
    pub memory_gb: f64,
    /// Memory read bandwidth our kernels reach, GB/s.
    pub mem_bw_gbs: f64,
    /// Cores used for compute.
    pub cores: u32,
    /// Sustained f32 GFLOP/s per core of our batched kernels.
    #[serde(default = "default_gflops")]
    pub gflops_per_core: f64,
    /// Disk read bandwidth, GB/s (for paged experts).
    #[serde(default)]
    pub disk_bw_gbs: Option<f64>,
    /// Memory kept free for the OS and other programs, GB.
    #[serde(default = "default_reserve")]
    pub reserve_gb: f64,
    /// This node runs the coordinator (exactly one does).
    #[serde(default)]
    pub coordinator: bool,
    /// The machine this node runs on. Nodes naming the same host share its cores and memory
    /// bandwidth: their expert work in one layer adds up instead of running in parallel (local
    /// worker processes on one box). Default: the node's own name (a machine of its own).
    #[serde(default)]
    pub host: Option<String>,
    /// Most routed-expert bytes this node hosts, GB (0: none, like a coordinator whose experts all
    /// live on workers). Default: whatever its memory allows.
    #[serde(default)]
    pub expert_capacity_gb: Option<f64>,
    /// Rates of the forward pass measured by `moeshard calibrate --model`, keyed by weight format
    /// (`bf16`, `q8_0`, `q4_k`, ...). A format listed here is planned with these figures instead of
    /// `mem_bw_gbs` and `gflops_per_core`.
    #[serde(default)]
    pub rates: std::collections::BTreeMap<String, Rates>,
}

/// What the forward pass achieves on a node for one weight format, measured by running it
/// (`moeshard calibrate --model`): bytes or flops of a part divided by the time that part took.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    /// Decode: the decoder layers' dense weights (attention projections, norms, router, shared
    /// experts) over the time of everything a layer does besides its routed experts (attention
    /// over the cache, rope, norms, top-k included), GB/s.
    pub dense_gbs: f64,
    /// Decode: the LM head's bytes over the time of final norm + LM head + embedding lookup, GB/s.
    pub head_gbs: f64,
    /// Decode: one token's routed experts (top-k distinct experts, cold in memory) over the time
    /// the engine's expert code takes for them, GB/s.
    pub expert_gbs: f64,
    /// Prefill: dense flops (2 per weight per token plus attention) per second, GFLOP/s.
    pub prefill_dense_gflops: f64,
    /// Prefill: routed-expert flops (2 per weight per routed row) per second, GFLOP/s.
    pub prefill_expert_gflops: f64,
}

impl Rates {
    /// The `[node.rates.FORMAT]` table of a cluster.toml holding these rates, each with
    /// `decimals` digits after the point (`None`: as many as it takes to read back the same
    /// value).
    pub fn toml_table(&self, format: &str, decimals: Option<usize>) -> String {
        let v = |x: f64| match decimals {
            Some(d) => format!("{x:.d$}"),
            None => format!("{x}"),
        };
        format!(
            "[node.rates.{format}]\ndense_gbs = {}\nhead_gbs = {}\nexpert_gbs = {}\nprefill_dense_gflops = {}\nprefill_expert_gflops = {}\n",
            v(self.dense_gbs),
            v(self.head_gbs),
            v(self.expert_gbs),
            v(self.prefill_dense_gflops),
            v(self.prefill_expert_gflops)
        )
    }
}

fn default_gflops() -> f64 {
    60.0
}

fn default_reserve() -> f64 {
    2.0
}

/// The link between the coordinator and a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Bandwidth in Gbit/s.
    pub bandwidth_gbps: f64,
    /// Round-trip time in microseconds.
    pub rtt_us: f64,
    /// Software cost of one dispatch (encode, send, decode, the wake-ups of the threads on both
    /// sides), microseconds. `moeshard calibrate` measures it as what sending a decode layer's
    /// rows (one token through the top-k experts, at the model's widths) to a real local worker
    /// adds to computing the same rows in-process, less their bytes at `per_kb_us`; `rtt_us` is
    /// then what the network adds to it.
    #[serde(default = "default_overhead")]
    pub overhead_us: f64,
    /// Added cost of each further worker contacted in the same layer, microseconds (measured by
    /// `moeshard calibrate` as the same decode rows split over two local workers against one).
    #[serde(default)]
    pub per_worker_us: f64,
    /// Software cost of each KB a dispatch moves (request plus reply: encoding, encryption,
    /// copies), microseconds; it adds up over the workers of a layer, since the coordinator
    /// handles every byte (measured by `moeshard calibrate` with a large request).
    #[serde(default)]
    pub per_kb_us: f64,
}

fn default_overhead() -> f64 {
    60.0
}

/// A cluster: nodes plus the default link and per-worker overrides.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// The machines.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// The link from the coordinator to every worker.
    pub link: LinkSpec,
}

impl ClusterSpec {
    /// Parses `cluster.toml`.
    pub fn from_toml(text: &str) -> Result<Self, PlanError> {
        let c: ClusterSpec = toml::from_str(text).map_err(|e| PlanError::Cluster(e.to_string()))?;
        let coords = c.nodes.iter().filter(|n| n.coordinator).count();
        if c.nodes.is_empty() {
            return Err(PlanError::Cluster("no [[node]] entries".into()));
        }
        if coords > 1 {
            return Err(PlanError::Cluster(format!(
                "{coords} nodes say coordinator = true; one must"
            )));
        }
        for n in &c.nodes {
            if n.memory_gb <= 0.0 || n.mem_bw_gbs <= 0.0 || n.cores == 0 {
                return Err(PlanError::Cluster(format!(
                    "node {}: memory_gb, mem_bw_gbs and cores must be positive",
                    n.name
                )));
            }
        }
        Ok(c)
    }

    /// Index of the coordinator node (the one marked, else the first).
    pub fn coordinator(&self) -> usize {
        self.nodes.iter().position(|n| n.coordinator).unwrap_or(0)
    }
}

/// What to plan for.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PlanRequest {
    /// Weight format of the routed experts.
    pub expert_quant: Quant,
    /// Weight format of the dense part.
    pub dense_quant: Quant,
    /// Tokens of context per sequence.
    pub context: u64,
    /// Sequences decoding together.
    pub concurrency: u64,
    /// Prompt length for the prefill figure.
    pub prefill_tokens: u64,
}

/// Memory of one node in the plan.
#[derive(Clone, Debug, Serialize)]
pub struct NodePlan {
    /// Node name.
    pub name: String,
    /// Coordinator or worker.
    pub role: &'static str,
    /// Routed experts placed here (over all layers).
    pub experts: usize,
    /// Bytes of those experts.
    pub expert_bytes: u64,
    /// Dense weights (coordinator only).
    pub dense_bytes: u64,
    /// KV cache and state at the requested context and concurrency (coordinator only).
    pub cache_bytes: u64,
    /// Activations and buffers.
    pub activation_bytes: u64,
    /// Memory left after all of it (negative: short).
    pub headroom_bytes: i64,
    /// Seconds of this node's share of one decode step (memory or compute, the larger).
    pub decode_busy_s: f64,
}

/// Time of one decode step, broken down.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeBreakdown {
    /// Reading the dense weights and caches on the coordinator.
    pub dense_memory_s: f64,
    /// Dense arithmetic on the coordinator.
    pub dense_compute_s: f64,
    /// Expert time (the slowest host of each layer, summed over layers).
    pub expert_s: f64,
    /// Network: round trips, transfer and dispatch overhead, summed over layers.
    pub network_s: f64,
    /// Network share of one MoE layer.
    pub network_per_layer_us: f64,
    /// Whole step.
    pub step_s: f64,
}

/// A complete plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The model's sizes.
    pub model: ModelShape,
    /// What was asked.
    pub request: PlanRequest,
    /// Total and active weights.
    pub total_params: u64,
    /// Weights used per token.
    pub active_params: u64,
    /// Per node.
    pub nodes: Vec<NodePlan>,
    /// Whether everything fits.
    pub fits: bool,
    /// Bytes missing in total (0 when it fits).
    pub shortfall_bytes: u64,
    /// What would make it fit.
    pub advice: Vec<String>,
    /// Decode step breakdown.
    pub decode: DecodeBreakdown,
    /// Generated tokens/s over all sequences.
    pub decode_tok_s: f64,
    /// Prompt tokens/s.
    pub prefill_tok_s: f64,
}

const GB: f64 = 1e9;

/// Decode cost of routed experts on one node.
#[derive(Clone, Copy, Debug)]
struct ExpertCost {
    /// Reading one expert's weights.
    read_s: f64,
    /// Arithmetic of one routed row (one token through one expert).
    row_s: f64,
}

struct LayerInputs<'a> {
    experts: usize,
    top_k: usize,
    tokens: usize,
    hidden: f64,
    /// Experts of one layer held per node.
    per_layer: &'a [f64],
    costs: &'a [ExpertCost],
    /// Index of the first node on the same host.
    host_of: &'a [usize],
    coordinator: usize,
    link: &'a LinkSpec,
}

/// Expected time of one MoE layer's routed experts in decode.
struct LayerCost {
    /// Expert compute on the busiest host (with the network of the slowest worker added in
    /// `network_s`, not here).
    compute_s: f64,
    /// Round trip, transfer and dispatch overhead.
    network_s: f64,
    /// Seconds each node is busy per layer.
    busy_s: Vec<f64>,
}

/// Draws of routing decisions the decode cost is averaged over (fixed, so plans are repeatable).
const ROUTING_DRAWS: usize = 400;

/// The expected cost of one MoE layer, averaged over random routings: each token picks `top_k`
/// distinct experts uniformly, experts sit on the nodes in contiguous blocks of their per-layer
/// counts. Per draw: a node reads each distinct expert it was sent once and computes each row;
/// nodes on one host add up; a remote worker's time is its link (round trip + bytes over the
/// bandwidth) plus its host's compute; the layer waits for the slowest, plus the dispatch
/// overhead of one request and `per_worker_us` for each further worker contacted.
fn expected_layer(l: &LayerInputs<'_>) -> LayerCost {
    let n = l.costs.len();
    let mut owner = Vec::with_capacity(l.experts);
    let mut acc = 0f64;
    for (i, &k) in l.per_layer.iter().enumerate() {
        acc += k;
        while (owner.len() as f64) < acc.round() && owner.len() < l.experts {
            owner.push(i);
        }
    }
    while owner.len() < l.experts {
        owner.push(n.saturating_sub(1));
    }
    let mut rng = moeshard_engine::sampling::Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let (mut compute, mut network) = (0f64, 0f64);
    let mut busy = vec![0f64; n];
    let top_k = l.top_k.min(l.experts).max(1);
    for _ in 0..ROUTING_DRAWS {
        let mut touched = vec![false; l.experts];
        let mut rows = vec![0usize; n];
        let mut distinct = vec![0usize; n];
        let mut tokens_to = vec![0usize; n];
        for _ in 0..l.tokens.max(1) {
            let mut picked: Vec<usize> = Vec::with_capacity(top_k);
            while picked.len() < top_k {
                let e = (next() % l.experts as u64) as usize;
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            let mut sent = vec![false; n];
            for e in picked {
                let o = owner[e];
                rows[o] += 1;
                if !touched[e] {
                    touched[e] = true;
                    distinct[o] += 1;
                }
                sent[o] = true;
            }
            for (t, s) in tokens_to.iter_mut().zip(sent) {
                *t += usize::from(s);
            }
        }
        let mut host_s = vec![0f64; n];
        for i in 0..n {
            let c = &l.costs[i];
            let t = (distinct[i] as f64 * c.read_s).max(rows[i] as f64 * c.row_s);
            busy[i] += t;
            host_s[l.host_of[i]] += t;
        }
        let mut slowest_remote = 0f64;
        let mut contacted = 0usize;
        let mut moved = 0f64;
        for i in 0..n {
            if i == l.coordinator || rows[i] == 0 {
                continue;
            }
            contacted += 1;
            let bytes =
                tokens_to[i] as f64 * l.hidden * 4.0 + rows[i] as f64 * (12.0 + l.hidden * 4.0);
            moved += bytes;
            let wire = l.link.rtt_us * 1e-6 + bytes * 8.0 / (l.link.bandwidth_gbps * 1e9);
            slowest_remote = slowest_remote.max(wire + host_s[l.host_of[i]]);
        }
        let local = host_s[l.host_of[l.coordinator]];
        let net = if contacted > 0 {
            (l.link.overhead_us
                + (contacted - 1) as f64 * l.link.per_worker_us
                + moved / 1e3 * l.link.per_kb_us)
                * 1e-6
        } else {
            0.0
        };
        // Split the layer into compute (the busiest host) and what the network adds to it.
        let busiest = host_s.iter().copied().fold(0.0, f64::max);
        let layer = local.max(slowest_remote) + net;
        compute += busiest;
        network += layer - busiest;
    }
    let d = ROUTING_DRAWS as f64;
    LayerCost {
        compute_s: compute / d,
        network_s: network / d,
        busy_s: busy.into_iter().map(|b| b / d).collect(),
    }
}

/// Plans `model` on `cluster`.
pub fn plan(model: &ModelShape, cluster: &ClusterSpec, req: PlanRequest) -> Plan {
    let ci = cluster.coordinator();
    let ebytes = (model.expert_params as f64 * req.expert_quant.bytes_per_weight()).ceil() as u64;
    let dense_bytes = (model.dense_params as f64 * req.dense_quant.bytes_per_weight()) as u64;
    let cache_bytes = model.cache_bytes(req.context) * req.concurrency;
    // Activations: a prefill chunk of 256 tokens through the widest layer, a few buffers.
    let act = 256 * model.hidden * 4 * 16 + (64 << 20);
    let usable: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|n| ((n.memory_gb - n.reserve_gb) * GB).max(0.0))
        .collect();
    let caps: Vec<HostCapacity> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let other = if i == ci {
                dense_bytes + cache_bytes + act
            } else {
                act
            };
            HostCapacity {
                name: n.name.clone(),
                capacity: match n.expert_capacity_gb {
                    Some(cap) => (usable[i] - other as f64).clamp(0.0, cap.max(0.0) * GB) as u64,
                    None => (usable[i] - other as f64).max(0.0) as u64,
                },
            }
        })
        .collect();
    let total_expert_bytes = model.moe_layers.len() as u64 * model.experts * ebytes;
    let offered: u64 = caps.iter().map(|c| c.capacity).sum();
    let placement = place(&caps, &model.moe_layers, model.experts as usize, ebytes).ok();
    let fits = placement.is_some();
    // Counts per host: from the placement, or (when it does not fit) by capacity share, so the
    // table still shows how short each node is.
    let counts: Vec<usize> = match &placement {
        Some(p) => p.counts(),
        None => {
            let total_cap: f64 = usable.iter().sum::<f64>().max(1.0);
            let n_total = model.moe_layers.len() as f64 * model.experts as f64;
            usable
                .iter()
                .map(|u| (n_total * u / total_cap).round() as usize)
                .collect()
        }
    };
    let n_moe = model.moe_layers.len().max(1) as f64;
    let n_moe_layers = model.moe_layers.len() as f64;
    let c = req.concurrency.max(1) as f64;
    let coord = &cluster.nodes[ci];
    let link = &cluster.link;
    // Per node: seconds per distinct expert read (memory) and per routed row (compute) in decode,
    // and routed-expert GFLOP/s in prefill; from the node's measured rates for the expert format
    // when it has them, else from its memory bandwidth and core throughput.
    let expert_rates: Vec<Option<&Rates>> = cluster
        .nodes
        .iter()
        .map(|n| n.rates.get(req.expert_quant.name()))
        .collect();
    let costs: Vec<ExpertCost> = cluster
        .nodes
        .iter()
        .zip(&expert_rates)
        .map(|(n, r)| ExpertCost {
            read_s: ebytes as f64 / (r.map_or(n.mem_bw_gbs, |r| r.expert_gbs) * GB),
            row_s: 2.0 * model.expert_params as f64 / (n.gflops_per_core * n.cores as f64 * 1e9),
        })
        .collect();
    let host_of: Vec<usize> = {
        let names: Vec<&str> = cluster
            .nodes
            .iter()
            .map(|n| n.host.as_deref().unwrap_or(&n.name))
            .collect();
        names
            .iter()
            .map(|h| names.iter().position(|x| x == h).unwrap_or(0))
            .collect()
    };
    let per_layer: Vec<f64> = counts.iter().map(|&k| k as f64 / n_moe).collect();
    let layer = expected_layer(&LayerInputs {
        experts: model.experts as usize,
        top_k: model.top_k as usize,
        tokens: c as usize,
        hidden: model.hidden as f64,
        per_layer: &per_layer,
        costs: &costs,
        host_of: &host_of,
        coordinator: ci,
        link,
    });
    let mut nodes = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let (dense_b, cache_b, act_b) = if i == ci {
            (dense_bytes, cache_bytes, act)
        } else {
            (0, 0, act)
        };
        let used = counts[i] as u64 * ebytes + dense_b + cache_b + act_b;
        nodes.push(NodePlan {
            name: n.name.clone(),
            role: if i == ci { "coordinator" } else { "worker" },
            experts: counts[i],
            expert_bytes: counts[i] as u64 * ebytes,
            dense_bytes: dense_b,
            cache_bytes: cache_b,
            activation_bytes: act_b,
            headroom_bytes: (n.memory_gb * GB) as i64 - (n.reserve_gb * GB) as i64 - used as i64,
            decode_busy_s: layer.busy_s[i] * n_moe_layers,
        });
    }
    // The dense part on the coordinator: the layers' dense weights, the LM head, the KV cache.
    let dense_rates = coord.rates.get(req.dense_quant.name());
    let dq = req.dense_quant.bytes_per_weight();
    let layer_dense_bytes = model.layer_dense_params() as f64 * dq;
    let head_bytes = model.head_params as f64 * dq;
    let kv_bytes = (model.cache_bytes(req.context / 2) * req.concurrency) as f64;
    let dense_memory_s = match dense_rates {
        Some(r) => {
            layer_dense_bytes / (r.dense_gbs * GB)
                + head_bytes / (r.head_gbs * GB)
                + kv_bytes / (coord.mem_bw_gbs * GB)
        }
        None => (layer_dense_bytes + head_bytes + kv_bytes) / (coord.mem_bw_gbs * GB),
    };
    let coord_gflops = coord.gflops_per_core * coord.cores as f64;
    let dense_compute_s = 2.0 * c * model.dense_active_params as f64 / (coord_gflops * 1e9);
    let expert_s = layer.compute_s * n_moe_layers;
    let network_s = layer.network_s * n_moe_layers;
    let network_per_layer = layer.network_s;
    let step_s = dense_memory_s.max(dense_compute_s) + expert_s + network_s;
    // Prefill: flops over the coordinator (dense) and the hosts (experts, in parallel across
    // hosts, adding up on a shared host), plus the network cost of each 256-token chunk.
    let p = req.prefill_tokens.max(1) as f64;
    let dense_flops =
        2.0 * p * model.dense_active_params as f64 + model.attn_flops_per_ctx as f64 * p * p / 2.0;
    let t_dense =
        dense_flops / (dense_rates.map_or(coord_gflops, |r| r.prefill_dense_gflops) * 1e9);
    let mut host_s = vec![0f64; cluster.nodes.len()];
    for (i, n) in cluster.nodes.iter().enumerate() {
        let share = counts[i] as f64 / (n_moe * model.experts as f64);
        let f = 2.0 * p * model.top_k as f64 * share * model.expert_params as f64;
        let gflops = expert_rates[i].map_or(n.gflops_per_core * n.cores as f64, |r| {
            r.prefill_expert_gflops
        });
        host_s[host_of[i]] += f / (gflops * 1e9);
    }
    let t_exp_layer = host_s.iter().copied().fold(0.0, f64::max);
    let chunks = (p / 256.0).ceil();
    // Bytes of a prompt's layer to and from each remote node, as the requests carry them (and as
    // decode counts them): the hidden state of each token with a row there goes out once, each
    // row's output comes back with 12 bytes of routing, 4 bytes a value. A node holding `e` of a
    // layer's E experts gets a token when any of its top-k distinct experts is one of them.
    let h4 = 4.0 * model.hidden as f64;
    let big_e = model.experts as f64;
    let node_bytes: Vec<f64> = counts
        .iter()
        .enumerate()
        .filter(|&(i, &n)| i != ci && n > 0)
        .map(|(_, &n)| {
            let e = n as f64 / n_moe;
            let miss: f64 = (0..model.top_k)
                .map(|j| ((big_e - e - j as f64) / (big_e - j as f64)).clamp(0.0, 1.0))
                .product();
            p * (1.0 - miss) * h4 + p * model.top_k as f64 * (e / big_e) * (h4 + 12.0)
        })
        .collect();
    let busiest_bytes = node_bytes.iter().copied().fold(0.0, f64::max);
    let all_bytes: f64 = node_bytes.iter().sum();
    let remote_nodes = node_bytes.len() as f64;
    let t_net_prefill = if !node_bytes.is_empty() {
        n_moe_layers
            * (chunks
                * (link.rtt_us + link.overhead_us + (remote_nodes - 1.0) * link.per_worker_us)
                * 1e-6
                + busiest_bytes * 8.0 / (link.bandwidth_gbps * 1e9)
                + all_bytes / 1e3 * link.per_kb_us * 1e-6)
    } else {
        0.0
    };
    let prefill_s = t_dense + t_exp_layer * n_moe_layers + t_net_prefill;
    let need_total = total_expert_bytes + dense_bytes + cache_bytes;
    let shortfall = if fits {
        0
    } else {
        total_expert_bytes
            .saturating_sub(offered)
            .max((need_total as f64 - usable.iter().sum::<f64>()).max(0.0) as u64)
    };
    let mut advice = Vec::new();
    if !fits {
        advice.push(format!(
            "short by {:.1} GB: add that much memory across the nodes",
            shortfall as f64 / GB
        ));
        for q in [Quant::Q8_0, Quant::Q4_K] {
            if q.bytes_per_weight() < req.expert_quant.bytes_per_weight() {
                let need = model.moe_layers.len() as f64
                    * model.experts as f64
                    * (model.expert_params as f64 * q.bytes_per_weight()).ceil()
                    + model.dense_params as f64 * req.dense_quant.bytes_per_weight().min(2.0)
                    + cache_bytes as f64;
                if need <= usable.iter().sum::<f64>() - act as f64 * usable.len() as f64 {
                    advice.push(format!(
                        "or quantize the experts to {q:?} ({:.1} GB in all)",
                        need / GB
                    ));
                    break;
                }
            }
        }
        advice.push(
            "or page experts from local SSD (--memory-budget) at the cost of disk reads".into(),
        );
    }
    Plan {
        model: model.clone(),
        request: req,
        total_params: model.total_params(),
        active_params: model.active_params(),
        nodes,
        fits,
        shortfall_bytes: shortfall,
        advice,
        decode: DecodeBreakdown {
            dense_memory_s,
            dense_compute_s,
            expert_s,
            network_s,
            network_per_layer_us: network_per_layer * 1e6,
            step_s,
        },
        decode_tok_s: c / step_s,
        prefill_tok_s: p / prefill_s,
    }
}

/// The plan as a readable table.
pub fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let gb = |b: f64| b / GB;
    let _ = writeln!(
        s,
        "model {}: {:.1}B weights, {:.2}B active per token, {} MoE layers x {} experts (top-{})",
        p.model.model_type,
        p.total_params as f64 / 1e9,
        p.active_params as f64 / 1e9,
        p.model.moe_layers.len(),
        p.model.experts,
        p.model.top_k
    );
    let _ = writeln!(
        s,
        "experts as {:?}, dense part as {:?}, context {} x {} sequences\n",
        p.request.expert_quant, p.request.dense_quant, p.request.context, p.request.concurrency
    );
    let _ = writeln!(
        s,
        "{:<14} {:<12} {:>8} {:>11} {:>10} {:>10} {:>10} {:>11}",
        "node", "role", "experts", "experts GB", "dense GB", "KV GB", "act GB", "headroom GB"
    );
    for n in &p.nodes {
        let _ = writeln!(
            s,
            "{:<14} {:<12} {:>8} {:>11.2} {:>10.2} {:>10.2} {:>10.2} {:>11.2}",
            n.name,
            n.role,
            n.experts,
            gb(n.expert_bytes as f64),
            gb(n.dense_bytes as f64),
            gb(n.cache_bytes as f64),
            gb(n.activation_bytes as f64),
            gb(n.headroom_bytes as f64)
        );
    }
    if p.fits {
        let d = &p.decode;
        let _ = writeln!(
            s,
            "\ndecode  {:.1} tokens/s  (step {:.2} ms = dense memory {:.2} ms | dense compute {:.2} ms, experts {:.2} ms, network {:.2} ms = {:.0} us per MoE layer)",
            p.decode_tok_s,
            d.step_s * 1e3,
            d.dense_memory_s * 1e3,
            d.dense_compute_s * 1e3,
            d.expert_s * 1e3,
            d.network_s * 1e3,
            d.network_per_layer_us
        );
        let _ = writeln!(s, "prefill {:.1} tokens/s", p.prefill_tok_s);
    } else {
        let _ = writeln!(
            s,
            "\nDOES NOT FIT: short by {:.1} GB",
            gb(p.shortfall_bytes as f64)
        );
        for a in &p.advice {
            let _ = writeln!(s, "  - {a}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3_BENCH: &str = r#"{"model_type":"qwen3_moe","hidden_size":1024,"num_hidden_layers":12,
        "num_attention_heads":16,"num_key_value_heads":4,"head_dim":128,"intermediate_size":3072,
        "moe_intermediate_size":512,"num_experts":64,"num_experts_per_tok":8,"vocab_size":32768}"#;

    fn cluster(nodes: &[(f64, f64)], rtt_us: f64) -> ClusterSpec {
        ClusterSpec {
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, &(mem, bw))| NodeSpec {
                    name: format!("n{i}"),
                    memory_gb: mem,
                    mem_bw_gbs: bw,
                    cores: 2,
                    gflops_per_core: 60.0,
                    disk_bw_gbs: None,
                    reserve_gb: 0.5,
                    coordinator: i == 0,
                    host: None,
                    expert_capacity_gb: None,
                    rates: Default::default(),
                })
                .collect(),
            link: LinkSpec {
                bandwidth_gbps: 10.0,
                rtt_us,
                overhead_us: 60.0,
                per_worker_us: 0.0,
                per_kb_us: 0.0,
            },
        }
    }

    fn req(q: Quant) -> PlanRequest {
        PlanRequest {
            expert_quant: q,
            dense_quant: q,
            context: 4096,
            concurrency: 1,
            prefill_tokens: 512,
        }
    }

    #[test]
    fn benchmark_model_counts_match_the_issue() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        // 1.34B weights, 248M active per token (the benchmark model's published figures).
        assert!(
            (m.total_params() as f64 / 1e9 - 1.339).abs() < 0.01,
            "{}",
            m.total_params()
        );
        assert!(
            (m.active_params() as f64 / 1e6 - 248.0).abs() < 2.0,
            "{}",
            m.active_params()
        );
        assert_eq!(m.kv_elems_per_token, 12 * 2 * 4 * 128);
    }

    #[test]
    fn real_configs_have_their_published_sizes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/configs");
        // (file, total B, active B) as published, with 4% slack for what the counts leave out.
        let cases = [
            ("qwen3-235b-a22b.json", 235.0, 22.0),
            ("mixtral-8x22b.json", 141.0, 39.0),
            ("deepseek-v3.json", 671.0, 37.0),
            ("gpt-oss-120b.json", 117.0, 5.1),
            ("qwen3.5-397b-a17b.json", 397.0, 17.0),
        ];
        for (f, total, active) in cases {
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            let m = ModelShape::from_config_json(&text).unwrap();
            let t = m.total_params() as f64 / 1e9;
            let a = m.active_params() as f64 / 1e9;
            assert!(
                (t / total - 1.0).abs() < 0.04,
                "{f}: total {t:.1}B vs {total}B"
            );
            assert!(
                (a / active - 1.0).abs() < 0.15,
                "{f}: active {a:.2}B vs {active}B"
            );
        }
    }

    #[test]
    fn placement_follows_memory_and_more_workers_cost_network() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        let single = plan(&m, &cluster(&[(24.0, 60.0)], 0.0), req(Quant::Bf16));
        assert!(single.fits);
        assert_eq!(single.nodes[0].experts, 12 * 64);
        assert_eq!(single.decode.network_s, 0.0);
        let three = plan(
            &m,
            &cluster(&[(4.0, 60.0), (8.0, 60.0), (8.0, 60.0)], 100.0),
            req(Quant::Bf16),
        );
        assert!(three.fits);
        assert_eq!(
            three.nodes.iter().map(|n| n.experts).sum::<usize>(),
            12 * 64
        );
        assert!(three.nodes[1].experts > three.nodes[0].experts);
        assert!(three.decode.network_s > 0.0);
        // Spreading experts shortens the expert time, the network adds to it.
        assert!(three.decode.expert_s < single.decode.expert_s);
    }

    #[test]
    fn too_small_says_by_how_much_and_what_fixes_it() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        let p = plan(
            &m,
            &cluster(&[(2.0, 60.0), (1.5, 60.0)], 100.0),
            req(Quant::Bf16),
        );
        assert!(!p.fits);
        assert!(p.shortfall_bytes > 0);
        assert!(
            p.advice
                .iter()
                .any(|a| a.contains("Q8_0") || a.contains("Q4_K")),
            "{:?}",
            p.advice
        );
        assert!(render(&p).contains("DOES NOT FIT"));
    }

    #[test]
    fn quantization_and_concurrency_move_the_figures_the_right_way() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        let c = cluster(&[(24.0, 60.0)], 0.0);
        let short = |q| PlanRequest {
            context: 256,
            ..req(q)
        };
        let bf16 = plan(&m, &c, short(Quant::Bf16));
        let q4 = plan(&m, &c, short(Quant::Q4_K));
        assert!(q4.decode_tok_s > 2.0 * bf16.decode_tok_s);
        // At long context the f32 KV cache is read every step and narrows the gap.
        let long_bf16 = plan(&m, &c, req(Quant::Bf16));
        let long_q4 = plan(&m, &c, req(Quant::Q4_K));
        assert!(
            long_q4.decode_tok_s / long_bf16.decode_tok_s < q4.decode_tok_s / bf16.decode_tok_s
        );
        let mut r = short(Quant::Bf16);
        r.concurrency = 8;
        let eight = plan(&m, &c, r);
        // Eight sequences share the dense weights but touch most of the 64 experts (1 - (56/64)^8
        // = 66% of them), so batching helps, but far less than 8x.
        let gain = eight.decode_tok_s / bf16.decode_tok_s;
        assert!(gain > 1.5 && gain < 8.0, "gain {gain}");
        assert!(eight.decode.expert_s > 4.0 * bf16.decode.expert_s);
    }

    fn rated(name: &str, host: &str, experts: bool) -> NodeSpec {
        let mut rates = std::collections::BTreeMap::new();
        rates.insert(
            "bf16".to_string(),
            Rates {
                dense_gbs: 10.0,
                head_gbs: 20.0,
                expert_gbs: 8.0,
                prefill_dense_gflops: 100.0,
                prefill_expert_gflops: 50.0,
            },
        );
        NodeSpec {
            name: name.into(),
            memory_gb: 24.0,
            mem_bw_gbs: 13.0,
            cores: 2,
            // Arithmetic far from the limit: decode is the reads.
            gflops_per_core: 1e6,
            disk_bw_gbs: None,
            reserve_gb: 0.5,
            coordinator: name == "c",
            host: Some(host.into()),
            expert_capacity_gb: (!experts).then_some(0.0),
            rates,
        }
    }

    fn link() -> LinkSpec {
        LinkSpec {
            bandwidth_gbps: 1.0,
            rtt_us: 100.0,
            overhead_us: 50.0,
            per_worker_us: 30.0,
            per_kb_us: 0.5,
        }
    }

    fn no_cache(q: Quant) -> PlanRequest {
        PlanRequest {
            context: 0,
            ..req(q)
        }
    }

    // The benchmark model's sizes, by hand: per layer q/o 1024x2048 twice, k/v 1024x512 twice,
    // two norms of 1024, a 64x1024 router; the LM head 32768x1024 plus the final norm; an
    // expert 3x1024x512.
    const LAYER_DENSE: f64 =
        12.0 * (2.0 * 1024.0 * 2048.0 + 2.0 * 1024.0 * 512.0 + 2048.0 + 65536.0);
    const HEAD: f64 = 32768.0 * 1024.0 + 1024.0;
    const EXPERT_BYTES: f64 = 3.0 * 1024.0 * 512.0 * 2.0;

    #[test]
    fn measured_rates_give_the_step_by_hand() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        assert_eq!(m.layer_dense_params() as f64, LAYER_DENSE);
        assert_eq!(m.head_params as f64, HEAD);
        let c = ClusterSpec {
            nodes: vec![rated("c", "box", true)],
            link: link(),
        };
        let p = plan(&m, &c, no_cache(Quant::Bf16));
        // bf16: 2 bytes a weight; dense 10 GB/s, head 20 GB/s, experts 8 GB/s.
        let dense = LAYER_DENSE * 2.0 / 10e9 + HEAD * 2.0 / 20e9;
        let experts = 12.0 * 8.0 * EXPERT_BYTES / 8e9;
        let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-9;
        assert!(close(p.decode.dense_memory_s, dense), "{:?}", p.decode);
        assert!(close(p.decode.expert_s, experts), "{:?}", p.decode);
        assert_eq!(p.decode.network_s, 0.0);
        assert!(close(p.decode_tok_s, 1.0 / (dense + experts)));
        // A format without measured rates falls back to the node's memory bandwidth.
        let q8 = plan(&m, &c, no_cache(Quant::Q8_0));
        let bpw = 34.0 / 32.0;
        assert!(close(
            q8.decode.dense_memory_s,
            (LAYER_DENSE + HEAD) * bpw / 13e9
        ));
        // Prefill: flops over the measured GFLOP/s.
        let pt = 512.0;
        let dense_flops =
            2.0 * pt * (LAYER_DENSE + HEAD) + (12.0 * 4.0 * 16.0 * 128.0) * pt * pt / 2.0;
        let expert_flops = 2.0 * pt * 8.0 * (EXPERT_BYTES / 2.0) * 12.0;
        assert!(close(
            pt / p.prefill_tok_s,
            dense_flops / 100e9 + expert_flops / 50e9
        ));
    }

    #[test]
    fn workers_on_one_host_add_up_and_pay_the_link() {
        let m = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        let one = ClusterSpec {
            nodes: vec![rated("c", "box", false), rated("w0", "box", true)],
            link: link(),
        };
        let p = plan(&m, &one, no_cache(Quant::Bf16));
        assert_eq!(p.nodes[0].experts, 0);
        assert_eq!(p.nodes[1].experts, 12 * 64);
        let per_layer = 8.0 * EXPERT_BYTES / 8e9;
        // One worker gets all 8 rows: the token's 4 KB out, 8 rows of (12 + 4 KB) back.
        let bytes = 4096.0 + 8.0 * (12.0 + 4096.0);
        let wire = 100e-6 + bytes * 8.0 / 1e9;
        let net = (50.0 + bytes / 1e3 * 0.5) * 1e-6;
        let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-9;
        assert!(close(p.decode.expert_s, 12.0 * per_layer), "{:?}", p.decode);
        assert!(
            close(p.decode.network_per_layer_us, (wire + net) * 1e6),
            "{:?}",
            p.decode
        );
        // Prefill of 512 tokens in two chunks: each token's 4 KB out once (the only worker has
        // every expert), its 8 rows of (12 + 4 KB) back; per layer two round trips and overheads,
        // the bytes over the link and at per_kb_us.
        let pt = 512.0;
        let prompt_bytes = pt * 4096.0 + pt * 8.0 * (12.0 + 4096.0);
        let prompt_net =
            12.0 * (2.0 * 150e-6 + prompt_bytes * 8.0 / 1e9 + prompt_bytes / 1e3 * 0.5e-6);
        let dense_flops =
            2.0 * pt * (LAYER_DENSE + HEAD) + (12.0 * 4.0 * 16.0 * 128.0) * pt * pt / 2.0;
        let expert_flops = 2.0 * pt * 8.0 * (EXPERT_BYTES / 2.0) * 12.0;
        assert!(close(
            pt / p.prefill_tok_s,
            dense_flops / 100e9 + expert_flops / 50e9 + prompt_net
        ));
        // Two workers on the same box: their reads add up (the same 8 experts in every draw),
        // a second request costs per_worker_us when both get rows.
        let two_same = ClusterSpec {
            nodes: vec![
                rated("c", "box", false),
                rated("w0", "box", true),
                rated("w1", "box", true),
            ],
            link: link(),
        };
        let q = plan(&m, &two_same, no_cache(Quant::Bf16));
        assert!(close(q.decode.expert_s, 12.0 * per_layer), "{:?}", q.decode);
        assert!(q.decode.network_per_layer_us > 50.0 + 100.0);
        // On two machines they read in parallel: the busier one's share, between half and all.
        let mut two_hosts = two_same.clone();
        two_hosts.nodes[2].host = Some("other".into());
        let r = plan(&m, &two_hosts, no_cache(Quant::Bf16));
        assert!(r.decode.expert_s < q.decode.expert_s);
        assert!(r.decode.expert_s > 0.5 * q.decode.expert_s);
        assert!(r.decode_tok_s > q.decode_tok_s);
        // The same plan twice is the same plan (the routing draws are fixed).
        assert_eq!(
            plan(&m, &two_hosts, no_cache(Quant::Bf16)).decode_tok_s,
            r.decode_tok_s
        );
        // A slower link costs its bytes: 8x less bandwidth, 7x the transfer time more.
        let mut slow = one.clone();
        slow.link.bandwidth_gbps = 0.125;
        let s = plan(&m, &slow, no_cache(Quant::Bf16));
        assert!(close(
            s.decode.network_per_layer_us - p.decode.network_per_layer_us,
            7.0 * bytes * 8.0 / 1e9 * 1e6
        ));
    }

    #[test]
    fn fewer_layers_scale_the_layer_parts_only() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/configs");
        let text = std::fs::read_to_string(format!("{dir}/qwen3-235b-a22b.json")).unwrap();
        let m = ModelShape::from_config_json(&text).unwrap();
        assert_eq!(m.layers, 94);
        let k = m.with_layers(2);
        assert_eq!(k.layers, 2);
        assert_eq!(k.moe_layers, vec![0, 1]);
        assert_eq!(k.head_params, m.head_params);
        // Alike layers: exactly 2/94 of the layer weights, caches and attention.
        assert_eq!(k.layer_dense_params() * 47, m.layer_dense_params());
        assert_eq!(k.kv_elems_per_token * 47, m.kv_elems_per_token);
        assert_eq!(
            m.dense_params - k.dense_params,
            m.layer_dense_params() - k.layer_dense_params()
        );
        assert_eq!(k.total_params(), k.dense_params + 2 * 128 * m.expert_params);
        assert_eq!(m.with_layers(94).total_params(), m.total_params());
        assert_eq!(m.with_layers(500).layers, 94);
    }

    #[test]
    fn a_gguf_header_sizes_like_its_config() {
        use moeshard_engine::gguf::{Value, Writer, parse_metadata};
        let arch = "qwen3moe";
        let mut w = Writer::new();
        w.meta("general.architecture", Value::String(arch.into()));
        for (k, v) in [
            ("block_count", 12u32),
            ("embedding_length", 1024),
            ("attention.head_count", 16),
            ("attention.head_count_kv", 4),
            ("attention.key_length", 128),
            ("expert_count", 64),
            ("expert_used_count", 8),
            ("expert_feed_forward_length", 512),
            ("feed_forward_length", 3072),
            ("vocab_size", 32768),
        ] {
            w.meta(&format!("{arch}.{k}"), Value::U32(v));
        }
        let bytes = w.to_bytes();
        // Only the first bytes of a file are needed.
        let (_, meta) = parse_metadata(std::path::Path::new("h.gguf"), &bytes).unwrap();
        let g = ModelShape::from_gguf_metadata(&meta).unwrap();
        let c = ModelShape::from_config_json(QWEN3_BENCH).unwrap();
        assert_eq!(
            (g.total_params(), g.active_params()),
            (c.total_params(), c.active_params())
        );
        let mut bad = meta.clone();
        bad.remove("qwen3moe.expert_count");
        let e = ModelShape::from_gguf_metadata(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("qwen3moe.expert_count"), "{e}");
    }

    #[test]
    fn cluster_toml_is_checked() {
        let ok = r#"
            [[node]]
            name = "mac1"
            memory_gb = 64
            mem_bw_gbs = 100
            cores = 10
            coordinator = true
            [[node]]
            name = "mac2"
            memory_gb = 64
            mem_bw_gbs = 100
            cores = 10
            [link]
            bandwidth_gbps = 10
            rtt_us = 300
        "#;
        let c = ClusterSpec::from_toml(ok).unwrap();
        assert_eq!(c.coordinator(), 0);
        assert!(c.nodes[0].rates.is_empty() && c.nodes[0].host.is_none());
        let rated = format!(
            "{ok}\n[[node]]\nname = \"w\"\nhost = \"mac2\"\nmemory_gb = 8\nmem_bw_gbs = 10\ncores = 2\nexpert_capacity_gb = 1.5\n[node.rates.q8_0]\ndense_gbs = 1\nhead_gbs = 2\nexpert_gbs = 3\nprefill_dense_gflops = 4\nprefill_expert_gflops = 5\n"
        );
        let c = ClusterSpec::from_toml(&rated).unwrap();
        assert_eq!(c.nodes[2].rates["q8_0"].expert_gbs, 3.0);
        assert_eq!(c.nodes[2].expert_capacity_gb, Some(1.5));
        assert!(ClusterSpec::from_toml(&rated.replace("head_gbs", "heads_gbs")).is_err());
        assert!(ClusterSpec::from_toml("[link]\nbandwidth_gbps = 1\nrtt_us = 1\n").is_err());
        let typo = ok.replace(
            "mem_bw_gbs = 100\n            cores = 10\n            coordinator",
            "mem_bw = 100\n            cores = 10\n            coordinator",
        );
        assert!(ClusterSpec::from_toml(&typo).is_err());
    }
}
