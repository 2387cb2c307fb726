//! The decoder of the supported MoE architectures, following transformers' `modeling_qwen3_moe.py`,
//! `modeling_qwen2_moe.py`, `modeling_mixtral.py`, `modeling_deepseek_v3.py` (multi-head latent
//! attention: see [`crate::mla`]), `modeling_gpt_oss.py` (sinks, sliding layers; fused experts in
//! [`crate::experts`]) and `modeling_qwen3_5_moe.py` / `modeling_qwen3_next.py` (linear attention:
//! see [`crate::deltanet`]).
//!
//! The model holds the dense part (embeddings, attention, norms, routers, shared experts, LM head);
//! routed experts are computed by an [`ExpertBackend`], in this process or on workers.

use std::path::Path;

use crate::attention::{self, Heads, SeqKv};
use crate::config::{Arch, MlpKind, ModelConfig, RouterKind};
use crate::deltanet::GatedDeltaNet;
use crate::error::{EngineError, Result};
use crate::experts::{ExpertBackend, ExpertRow};
use crate::kernels;
use crate::layers::{Linear, Mlp, Rope, load_vec, rms_norm, sigmoid};
use crate::mla::MlaAttention;
use crate::routing::RoutingRule;
use crate::safetensors::Checkpoint;
use crate::tensor::Tensor;

/// Self-attention of one layer.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Per-head query RMSNorm (Qwen3).
    pub q_norm: Option<Vec<f32>>,
    /// Per-head key RMSNorm (Qwen3).
    pub k_norm: Option<Vec<f32>>,
    /// Per-head sink logits (GPT-OSS): an extra softmax entry with no value.
    pub sinks: Option<Vec<f32>>,
}

/// A layer's token mixer.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once
pub enum Mixer {
    /// Multi-head (grouped-query) attention with a key/value cache.
    Attention(Attention),
    /// DeepSeek's multi-head latent attention; the cache holds the latent and the rope key.
    Mla(MlaAttention),
    /// Gated DeltaNet linear attention; the cache holds its fixed-size state.
    Linear(GatedDeltaNet),
}

/// The routed part of a MoE layer that lives with the dense model.
#[derive(Clone, Debug)]
pub struct SparseMoe {
    /// Router `[num_experts, hidden]`.
    pub gate: Linear,
    /// DeepSeek-V3's `e_score_correction_bias`: added to the scores only to choose experts.
    pub e_score_correction_bias: Option<Vec<f32>>,
    /// Shared expert (Qwen2-MoE `shared_expert`, DeepSeek-V3 `shared_experts`).
    pub shared_expert: Option<Mlp>,
    /// Shared expert's sigmoid gate `[1, hidden]`.
    pub shared_expert_gate: Option<Linear>,
}

/// A layer's feed-forward block.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once: size does not matter here
pub enum FeedForward {
    /// Dense SwiGLU.
    Dense(Mlp),
    /// Routed experts.
    Moe(SparseMoe),
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: Vec<f32>,
    /// Attention.
    pub self_attn: Mixer,
    /// Norm before the MLP.
    pub post_attention_layernorm: Vec<f32>,
    /// MLP.
    pub mlp: FeedForward,
}

/// The dense part of a MoE decoder.
pub struct Model {
    /// The configuration.
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// Layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: Vec<f32>,
    /// LM head (the embedding when tied).
    pub lm_head: Linear,
    rope: Rope,
    router: RoutingRule,
}

/// Key/value cache of one sequence. Layer `l` holds two row streams, `k[l]` and `v[l]`, of
/// widths `widths[l]`: keys and values for attention layers, the compressed latent and the rope
/// key for multi-head latent attention. Sliding-window layers keep only the positions a later
/// query can still see: their first stored row is position `starts[l]`.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    starts: Vec<usize>,
    len: usize,
    max_len: usize,
    widths: Vec<(usize, usize)>,
}

impl KvCache {
    /// An empty cache for up to `max_len` positions.
    pub fn new(cfg: &ModelConfig, max_len: usize) -> Self {
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let width = match cfg.mla {
            Some(m) => (m.kv_lora_rank, m.qk_rope_head_dim),
            None => (kv, kv),
        };
        // Linear-attention layers keep a fixed state (conv inputs in `k`, the recurrent state in
        // `v`), nothing per position.
        let widths = (0..cfg.num_hidden_layers)
            .map(|l| match &cfg.linear_attn {
                Some((_, linear)) if linear[l] => (0, 0),
                _ => width,
            })
            .collect();
        KvCache {
            k: vec![Vec::new(); cfg.num_hidden_layers],
            v: vec![Vec::new(); cfg.num_hidden_layers],
            starts: vec![0; cfg.num_hidden_layers],
            len: 0,
            max_len,
            widths,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Largest number of positions.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes in use.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Vec::len).sum::<usize>() * 4
    }

    /// Elements stored per position, summed over layers.
    pub fn elems_per_token(&self) -> usize {
        self.widths.iter().map(|(a, b)| a + b).sum()
    }
}

/// Which logits a sequence wants back from a forward step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WantLogits {
    /// Every position of the chunk.
    All,
    /// Only the last position.
    Last,
    /// None (a prefill chunk that is not the last).
    None,
}

/// One sequence's share of a batched forward step.
pub struct SeqStep<'a> {
    /// New tokens, appended after what the cache holds.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub cache: &'a mut KvCache,
    /// Which logits to return.
    pub want: WantLogits,
}

impl Model {
    /// Loads the dense part of the model in `dir` (a checkpoint directory or a `.gguf` file).
    pub fn load(dir: &Path) -> Result<(Self, Checkpoint)> {
        let (cfg, ckpt) = Checkpoint::open_with_config(dir)?;
        let model = Self::from_checkpoint(cfg, &ckpt)?;
        Ok((model, ckpt))
    }

    /// A model of synthetic weights (see [`crate::synthetic`]) in the shapes of the config at
    /// `config` (a `config.json` or a directory holding one), optionally cut to its first
    /// `layers` layers.
    pub fn load_synthetic(
        config: &Path,
        layers: Option<usize>,
        seed: u64,
    ) -> Result<(Self, Checkpoint)> {
        let cfg = synthetic_config(config, layers)?;
        let file = if config.is_dir() {
            config.join("config.json")
        } else {
            config.to_path_buf()
        };
        let ckpt = Checkpoint::synthetic(&file, &cfg, crate::tensor::DType::BF16, seed);
        let model = Self::from_checkpoint(cfg, &ckpt)?;
        Ok((model, ckpt))
    }

    /// Builds the dense part from an open checkpoint.
    pub fn from_checkpoint(cfg: ModelConfig, ckpt: &Checkpoint) -> Result<Self> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let tied = cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight");
        // Tied, the table is the LM head, read whole every step: resident like the other
        // weights. Untied, only the prompt's rows are read: it stays in the file mapping.
        let embed_tokens = if tied {
            ckpt.get_weight("model.embed_tokens.weight", &[cfg.vocab_size, h])?
        } else {
            ckpt.get_shaped("model.embed_tokens.weight", &[cfg.vocab_size, h])?
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = cfg.layer_prefix(i);
            let a = format!("{p}.self_attn");
            let linear = cfg
                .linear_attn
                .as_ref()
                .filter(|(_, linear)| linear[i])
                .map(|(d, _)| *d);
            let q_rows = if cfg.attn_output_gate {
                2 * nh * hd
            } else {
                nh * hd
            };
            let self_attn = match (cfg.mla, linear) {
                (Some(m), _) => Mixer::Mla(MlaAttention::load(ckpt, &a, &cfg, m)?),
                (None, Some(d)) => Mixer::Linear(GatedDeltaNet::load(
                    ckpt,
                    &format!("{p}.linear_attn"),
                    h,
                    d,
                    cfg.rms_norm_eps,
                )?),
                (None, None) => Mixer::Attention(Attention {
                    q_proj: Linear::load(ckpt, &format!("{a}.q_proj"), q_rows, h, cfg.qkv_bias)?,
                    k_proj: Linear::load(ckpt, &format!("{a}.k_proj"), nkv * hd, h, cfg.qkv_bias)?,
                    v_proj: Linear::load(ckpt, &format!("{a}.v_proj"), nkv * hd, h, cfg.qkv_bias)?,
                    o_proj: Linear::load(ckpt, &format!("{a}.o_proj"), h, nh * hd, cfg.o_bias)?,
                    q_norm: if cfg.qk_norm {
                        Some(load_norm(&cfg, ckpt, &format!("{a}.q_norm.weight"), hd)?)
                    } else {
                        None
                    },
                    k_norm: if cfg.qk_norm {
                        Some(load_norm(&cfg, ckpt, &format!("{a}.k_norm.weight"), hd)?)
                    } else {
                        None
                    },
                    sinks: if cfg.attention_sinks {
                        Some(load_vec(ckpt, &format!("{a}.sinks"), nh)?)
                    } else {
                        None
                    },
                }),
            };
            let mlp = match cfg.layer_kinds[i] {
                MlpKind::Dense => FeedForward::Dense(Mlp::load(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                )?),
                MlpKind::Moe => {
                    let m = cfg.moe_prefix(i);
                    let shared_expert = match cfg.shared_expert_intermediate_size {
                        Some(si) => Some(Mlp::load(
                            ckpt,
                            &format!("{m}.{}", cfg.shared_expert_name),
                            h,
                            si,
                        )?),
                        None => None,
                    };
                    let shared_expert_gate = if shared_expert.is_some() && cfg.shared_expert_gated {
                        Some(Linear::load(
                            ckpt,
                            &format!("{m}.shared_expert_gate"),
                            1,
                            h,
                            false,
                        )?)
                    } else {
                        None
                    };
                    let e_score_correction_bias = match cfg.router {
                        RouterKind::SigmoidGrouped { .. } => Some(load_vec(
                            ckpt,
                            &format!("{m}.gate.e_score_correction_bias"),
                            cfg.num_experts,
                        )?),
                        RouterKind::SoftmaxTopK | RouterKind::TopKSoftmax => None,
                    };
                    FeedForward::Moe(SparseMoe {
                        gate: Linear::load(
                            ckpt,
                            &format!("{m}.{}", cfg.router_name),
                            cfg.num_experts,
                            h,
                            cfg.router_bias,
                        )?,
                        e_score_correction_bias,
                        shared_expert,
                        shared_expert_gate,
                    })
                }
            };
            layers.push(DecoderLayer {
                input_layernorm: load_norm(&cfg, ckpt, &format!("{p}.input_layernorm.weight"), h)?,
                self_attn,
                post_attention_layernorm: load_norm(
                    &cfg,
                    ckpt,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                mlp,
            });
        }
        let norm = load_norm(&cfg, ckpt, "model.norm.weight", h)?;
        let lm_head = if tied {
            Linear::from_weight(embed_tokens.clone())?
        } else {
            Linear::load(ckpt, "lm_head", cfg.vocab_size, h, false)?
        };
        let rope = Rope::from_config(
            cfg.rotary_dim,
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.rope_interleave,
        );
        let router = match cfg.router {
            RouterKind::SoftmaxTopK => RoutingRule::SoftmaxTopK {
                k: cfg.num_experts_per_tok,
                renormalize: cfg.norm_topk_prob,
            },
            RouterKind::SigmoidGrouped {
                n_group,
                topk_group,
                routed_scaling_factor,
            } => RoutingRule::SigmoidGroupedTopK {
                k: cfg.num_experts_per_tok,
                n_group,
                topk_group,
                renormalize: cfg.norm_topk_prob,
                scaling: routed_scaling_factor,
            },
            RouterKind::TopKSoftmax => RoutingRule::TopKSoftmax {
                k: cfg.num_experts_per_tok,
            },
        };
        Ok(Model {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            router,
        })
    }

    /// A new cache for this model holding up to `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(&self.cfg, max_len.min(self.cfg.max_position_embeddings))
    }

    /// The routing rule of the MoE layers.
    pub fn router(&self) -> RoutingRule {
        self.router
    }

    /// Runs one forward step over several sequences at once; returns each one's requested logits
    /// (`[n, vocab]` row-major: n = chunk length for `All`, 1 for `Last`, 0 for `None`).
    pub fn forward(
        &self,
        seqs: &mut [SeqStep<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        if rayon::current_thread_index().is_some() {
            return self.forward_on_pool(seqs, experts);
        }
        // The whole step runs on one of the pool's threads: each parallel loop inside is then
        // forked from a pool thread (the other threads steal its tasks) instead of being
        // injected from outside and waited for across threads, which cost two thread wake-ups
        // per loop (several per layer).
        rayon::scope(|_| self.forward_on_pool(seqs, experts))
    }

    fn forward_on_pool(
        &self,
        seqs: &mut [SeqStep<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        // Validate everything before touching any cache.
        let mut positions = Vec::new();
        let mut seq_of = Vec::new();
        for (s, step) in seqs.iter().enumerate() {
            let start = step.cache.len();
            if start + step.tokens.len() > step.cache.max_len() {
                return Err(EngineError::Input(format!(
                    "sequence of {} tokens exceeds the context limit of {}",
                    start + step.tokens.len(),
                    step.cache.max_len()
                )));
            }
            for (i, &t) in step.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab_size {
                    return Err(EngineError::Input(format!(
                        "token id {t} at position {} is outside the vocabulary of {}",
                        start + i,
                        cfg.vocab_size
                    )));
                }
                positions.push(start + i);
                seq_of.push(s);
            }
        }
        let n = positions.len();
        let mut x = vec![0f32; n * h];
        let all_tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        for (row, &t) in x.chunks_exact_mut(h).zip(&all_tokens) {
            self.embed_tokens.row_to_f32(t as usize, row);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps);
            let attn = match &layer.self_attn {
                Mixer::Attention(att) => self.attention(li, att, &hn, &positions, seqs)?,
                Mixer::Mla(mla) => mla.forward(li, &self.rope, &hn, &positions, seqs),
                Mixer::Linear(lin) => {
                    let mut spans = Vec::with_capacity(seqs.len());
                    let mut at = 0;
                    for s in seqs.iter() {
                        spans.push((at, s.tokens.len()));
                        at += s.tokens.len();
                    }
                    let mut states: Vec<(&mut Vec<f32>, &mut Vec<f32>)> = seqs
                        .iter_mut()
                        .map(|s| {
                            let c = &mut *s.cache;
                            (&mut c.k[li], &mut c.v[li])
                        })
                        .collect();
                    lin.forward(&hn, positions.len(), &spans, &mut states)
                }
            };
            for (a, b) in x.iter_mut().zip(&attn) {
                *a += b;
            }
            let hn = rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let ff = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.forward(&hn, n),
                FeedForward::Moe(moe) => self.moe(li, moe, &hn, n, experts)?,
            };
            for (a, b) in x.iter_mut().zip(&ff) {
                *a += b;
            }
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Final norm and LM head on the wanted rows only, all sequences' rows in one matmul so
        // a batch reads the LM head once (every row is computed independently of the others).
        let mut spans = Vec::with_capacity(seqs.len());
        let mut wanted = Vec::new();
        let mut offset = 0;
        for s in seqs.iter() {
            let len = s.tokens.len();
            let rows = match s.want {
                WantLogits::All => offset..offset + len,
                WantLogits::Last if len > 0 => offset + len - 1..offset + len,
                _ => offset..offset,
            };
            offset += len;
            spans.push(rows.len());
            wanted.extend_from_slice(&x[rows.start * h..rows.end * h]);
        }
        let m: usize = spans.iter().sum();
        let logits = if m == 0 {
            Vec::new()
        } else {
            let hn = rms_norm(&wanted, &self.norm, cfg.rms_norm_eps);
            self.lm_head.forward(&hn, m)
        };
        let vocab = cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for rows in spans {
            out.push(logits[at * vocab..(at + rows) * vocab].to_vec());
            at += rows;
        }
        Ok(out)
    }

    fn attention(
        &self,
        li: usize,
        att: &Attention,
        hn: &[f32],
        positions: &[usize],
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let n = positions.len();
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        // The three projections in one pass (one activation quantization and one parallel loop
        // per weight type).
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            Linear::forward_many(&[&att.q_proj, &att.k_proj, &att.v_proj], hn, n)
                .try_into()
                .expect("three outputs");
        // Qwen3-Next: each head's query is followed by its output gate.
        let gate = if cfg.attn_output_gate {
            let mut qs = Vec::with_capacity(n * nh * hd);
            let mut gs = Vec::with_capacity(n * nh * hd);
            for pair in q.chunks_exact(2 * hd) {
                qs.extend_from_slice(&pair[..hd]);
                gs.extend_from_slice(&pair[hd..]);
            }
            q = qs;
            Some(gs)
        } else {
            None
        };
        if let (Some(qn), Some(kn)) = (&att.q_norm, &att.k_norm) {
            crate::layers::rms_norm_inplace(&mut q, qn, cfg.rms_norm_eps);
            crate::layers::rms_norm_inplace(&mut k, kn, cfg.rms_norm_eps);
        }
        let rd = cfg.rotary_dim;
        for (i, &pos) in positions.iter().enumerate() {
            if rd == hd {
                self.rope.apply(&mut q[i * nh * hd..(i + 1) * nh * hd], pos);
                self.rope
                    .apply(&mut k[i * nkv * hd..(i + 1) * nkv * hd], pos);
            } else {
                // Partial rotary: only the first `rd` elements of each head turn.
                for head in q[i * nh * hd..(i + 1) * nh * hd].chunks_exact_mut(hd) {
                    self.rope.apply(&mut head[..rd], pos);
                }
                for head in k[i * nkv * hd..(i + 1) * nkv * hd].chunks_exact_mut(hd) {
                    self.rope.apply(&mut head[..rd], pos);
                }
            }
        }
        // Append this step's keys and values to each sequence's cache.
        let kvw = nkv * hd;
        let mut offset = 0;
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let len = s.tokens.len();
            s.cache.k[li].extend_from_slice(&k[offset * kvw..(offset + len) * kvw]);
            s.cache.v[li].extend_from_slice(&v[offset * kvw..(offset + len) * kvw]);
            spans.push((offset, len, s.cache.len()));
            offset += len;
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let window = cfg.layer_windows[li];
        let mut out = vec![0f32; n * nh * hd];
        let caches: Vec<SeqKv<'_>> = seqs
            .iter()
            .zip(&spans)
            .map(|(s, &(off, len, _))| SeqKv {
                k: s.cache.k[li].as_slice(),
                v: s.cache.v[li].as_slice(),
                start: s.cache.starts[li],
                rows: off..off + len,
            })
            .collect();
        let heads = Heads {
            nh,
            nkv,
            hd,
            scale,
            window,
            sinks: att.sinks.as_deref(),
        };
        attention::attend(
            kernels::best_path(),
            &heads,
            &q,
            positions,
            &caches,
            &mut out,
        );
        if let Some(w) = window {
            // The next query (position `total`) sees positions from `total + 1 - w` on.
            for (s, &(_, len, old)) in seqs.iter_mut().zip(&spans) {
                let keep_from = (old + len + 1).saturating_sub(w);
                let c = &mut *s.cache;
                if keep_from > c.starts[li] {
                    let drop = (keep_from - c.starts[li]) * kvw;
                    c.k[li].drain(..drop);
                    c.v[li].drain(..drop);
                    c.starts[li] = keep_from;
                }
            }
        }
        if let Some(g) = gate {
            for (o, gv) in out.iter_mut().zip(&g) {
                *o *= sigmoid(*gv);
            }
        }
        Ok(att.o_proj.forward(&out, n))
    }

    fn moe(
        &self,
        li: usize,
        moe: &SparseMoe,
        hn: &[f32],
        n: usize,
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let e = self.cfg.num_experts;
        let logits = moe.gate.forward(hn, n);
        let mut rows = Vec::with_capacity(n * self.cfg.num_experts_per_tok);
        for t in 0..n {
            let chosen = self.router.route(
                &logits[t * e..(t + 1) * e],
                moe.e_score_correction_bias.as_deref(),
            );
            for (expert, weight) in chosen {
                rows.push(ExpertRow {
                    token: t as u32,
                    expert: expert as u32,
                    weight,
                });
            }
        }
        let pending = experts.dispatch(li, hn, &rows)?;
        // The shared expert runs while the routed experts are computed elsewhere.
        let shared = moe.shared_expert.as_ref().map(|se| {
            let y = se.forward(hn, n);
            let gl = moe.shared_expert_gate.as_ref().map(|g| g.forward(hn, n));
            (y, gl)
        });
        let routed = pending.wait()?;
        if routed.len() != rows.len() * h {
            return Err(EngineError::Experts {
                layer: li,
                host: "backend".into(),
                msg: format!(
                    "returned {} values for {} rows of width {h}",
                    routed.len(),
                    rows.len()
                ),
            });
        }
        // Fixed combine order: token by token, experts in index order (rows are built that way).
        let mut out = vec![0f32; n * h];
        for (r, y) in rows.iter().zip(routed.chunks_exact(h)) {
            let o = &mut out[r.token as usize * h..(r.token as usize + 1) * h];
            for (a, b) in o.iter_mut().zip(y) {
                *a += b;
            }
        }
        if let Some((y, gl)) = shared {
            for t in 0..n {
                let gate = gl.as_ref().map_or(1.0, |gl| sigmoid(gl[t]));
                for (a, b) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[t * h..(t + 1) * h])
                {
                    *a += gate * b;
                }
            }
        }
        Ok(out)
    }

    /// Whether the architecture's experts have the shapes the checkpoint stores.
    pub fn arch(&self) -> Arch {
        self.cfg.arch
    }
}

/// Loads an RMSNorm weight, adding the one that zero-centred checkpoints (Qwen3-Next) leave out.
fn load_norm(cfg: &ModelConfig, ckpt: &Checkpoint, name: &str, dim: usize) -> Result<Vec<f32>> {
    let mut w = load_vec(ckpt, name, dim)?;
    if cfg.norm_plus_one {
        for v in &mut w {
            *v += 1.0;
        }
    }
    Ok(w)
}

/// Reads the config a synthetic run uses: `path` is a `config.json` or a directory with one;
/// `layers` keeps only the first layers (a planner scales the result back up).
pub fn synthetic_config(path: &Path, layers: Option<usize>) -> Result<ModelConfig> {
    let mut cfg = if path.is_dir() {
        ModelConfig::from_dir(path)?
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        ModelConfig::from_json_str(&text, path)?
    };
    if cfg.arch == Arch::GptOss {
        // Its experts are fused over the whole layer: every expert would regenerate them all.
        return Err(EngineError::Input(
            "synthetic weights are not available for gpt_oss (its experts are stored fused)".into(),
        ));
    }
    if let Some(k) = layers {
        if k == 0 || k > cfg.num_hidden_layers {
            return Err(EngineError::Input(format!(
                "--layers {k} must be between 1 and the model's {} layers",
                cfg.num_hidden_layers
            )));
        }
        cfg.num_hidden_layers = k;
        cfg.layer_kinds.truncate(k);
        cfg.layer_windows.truncate(k);
        if let Some((_, linear)) = &mut cfg.linear_attn {
            linear.truncate(k);
        }
    }
    Ok(cfg)
}
