//! Multi-head latent attention of DeepSeek-V2/V3 and Kimi K2, following transformers'
//! `modeling_deepseek_v3.py` (`DeepseekV3Attention`).
//!
//! Keys and values are never materialised. The cache holds, per position, the normalised latent
//! `c = kv_a_layernorm(kv_a_proj_with_mqa(x)[..kv_lora_rank])` and the rope key
//! `k_rot = rope(kv_a_proj_with_mqa(x)[kv_lora_rank..])` (one, shared by every head). The
//! per-head key and value projections of `kv_b_proj` are absorbed instead: with `W_k[h]`
//! (`qk_nope x rank`) and `W_v[h]` (`v x rank`) the rows of head `h`,
//! `score_j = (W_k[h]^T q_nope) . c_j + q_rot . k_rot_j` and
//! `out_h = W_v[h] (sum_j p_j c_j)`, the same function as transformers' expanded form.
//! Every row is computed on its own in a fixed order, so a token's output does not depend on
//! the batch or on how the prompt was split into chunks.

use rayon::prelude::*;

use crate::config::{MlaConfig, ModelConfig, RopeScaling};
use crate::error::Result;
use crate::kernels;
use crate::layers::{
    Linear, Rope, load_vec, rms_norm, rms_norm_inplace, softmax_inplace, yarn_mscale,
};
use crate::model::SeqStep;
use crate::safetensors::Checkpoint;

/// The query path: a plain projection, or DeepSeek-V3's low-rank pair with a norm between.
#[derive(Clone, Debug)]
pub enum QueryProj {
    /// `q_proj` (`q_lora_rank: null`).
    Plain(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        /// `[q_lora_rank, hidden]`
        q_a_proj: Linear,
        /// RMSNorm of `q_lora_rank`.
        q_a_layernorm: Vec<f32>,
        /// `[heads * qk_head_dim, q_lora_rank]`
        q_b_proj: Linear,
    },
}

/// The weights of one MLA layer.
#[derive(Clone, Debug)]
pub struct MlaAttention {
    /// Query projection.
    pub q: QueryProj,
    /// `[kv_lora_rank + qk_rope_head_dim, hidden]`
    pub kv_a_proj_with_mqa: Linear,
    /// RMSNorm of the latent.
    pub kv_a_layernorm: Vec<f32>,
    /// `kv_b_proj` `[heads * (qk_nope + v), kv_lora_rank]`, as f32 rows (absorbed per head).
    pub kv_b_proj: Vec<f32>,
    /// `[hidden, heads * v_head_dim]`
    pub o_proj: Linear,
    shape: MlaConfig,
    heads: usize,
    eps: f32,
    scale: f32,
}

impl MlaAttention {
    /// Loads the layer under `prefix` (`model.layers.N.self_attn`).
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &ModelConfig, m: MlaConfig) -> Result<Self> {
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let bias = cfg.qkv_bias;
        let q = match m.q_lora_rank {
            None => QueryProj::Plain(Linear::load(
                ckpt,
                &format!("{prefix}.q_proj"),
                nh * m.qk_head_dim(),
                h,
                false,
            )?),
            Some(r) => QueryProj::LowRank {
                q_a_proj: Linear::load(ckpt, &format!("{prefix}.q_a_proj"), r, h, bias)?,
                q_a_layernorm: load_vec(ckpt, &format!("{prefix}.q_a_layernorm.weight"), r)?,
                q_b_proj: Linear::load(
                    ckpt,
                    &format!("{prefix}.q_b_proj"),
                    nh * m.qk_head_dim(),
                    r,
                    false,
                )?,
            },
        };
        let kv_b = ckpt.get_shaped(
            &format!("{prefix}.kv_b_proj.weight"),
            &[nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank],
        )?;
        // transformers: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.
        let mut scale = (m.qk_head_dim() as f64).powf(-0.5);
        if let RopeScaling::Yarn {
            factor,
            mscale_all_dim: Some(ma),
            ..
        } = cfg.rope_scaling
        {
            let ms = yarn_mscale(factor, ma);
            scale = scale * ms * ms;
        }
        Ok(MlaAttention {
            q,
            kv_a_proj_with_mqa: Linear::load(
                ckpt,
                &format!("{prefix}.kv_a_proj_with_mqa"),
                m.kv_lora_rank + m.qk_rope_head_dim,
                h,
                bias,
            )?,
            kv_a_layernorm: load_vec(
                ckpt,
                &format!("{prefix}.kv_a_layernorm.weight"),
                m.kv_lora_rank,
            )?,
            kv_b_proj: kv_b.to_f32_vec(),
            o_proj: Linear::load(
                ckpt,
                &format!("{prefix}.o_proj"),
                h,
                nh * m.v_head_dim,
                bias,
            )?,
            shape: m,
            heads: nh,
            eps: cfg.rms_norm_eps,
            scale: scale as f32,
        })
    }

    /// Attention of layer `li` over the `n = positions.len()` rows of `hn` (the sequences' rows
    /// in order); appends each sequence's latents to its cache.
    pub fn forward(
        &self,
        li: usize,
        rope: &Rope,
        hn: &[f32],
        positions: &[usize],
        seqs: &mut [SeqStep<'_>],
    ) -> Vec<f32> {
        let m = self.shape;
        let n = positions.len();
        let nh = self.heads;
        let (nope, rd, vd, rank) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let qk = nope + rd;
        let mut q = match &self.q {
            QueryProj::Plain(p) => p.forward(hn, n),
            QueryProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let qa = rms_norm(&q_a_proj.forward(hn, n), q_a_layernorm, self.eps);
                q_b_proj.forward(&qa, n)
            }
        };
        let ckv = self.kv_a_proj_with_mqa.forward(hn, n);
        let mut latent = Vec::with_capacity(n * rank);
        let mut k_rot = Vec::with_capacity(n * rd);
        for (row, &pos) in ckv.chunks_exact(rank + rd).zip(positions) {
            latent.extend_from_slice(&row[..rank]);
            let start = k_rot.len();
            k_rot.extend_from_slice(&row[rank..]);
            rope.apply(&mut k_rot[start..], pos);
        }
        rms_norm_inplace(&mut latent, &self.kv_a_layernorm, self.eps);
        for (row, &pos) in q.chunks_exact_mut(nh * qk).zip(positions) {
            for head in row.chunks_exact_mut(qk) {
                rope.apply(&mut head[nope..], pos);
            }
        }
        // Append the latents to each sequence's cache.
        let mut offset = 0;
        let mut items = Vec::with_capacity(n);
        for (s, step) in seqs.iter_mut().enumerate() {
            let len = step.tokens.len();
            step.cache.k[li].extend_from_slice(&latent[offset * rank..(offset + len) * rank]);
            step.cache.v[li].extend_from_slice(&k_rot[offset * rd..(offset + len) * rd]);
            for i in 0..len {
                items.push((offset + i, s));
            }
            offset += len;
        }
        let caches: Vec<(&[f32], &[f32])> = seqs
            .iter()
            .map(|s| (s.cache.k[li].as_slice(), s.cache.v[li].as_slice()))
            .collect();
        let wkv = &self.kv_b_proj;
        let compute = |row: usize, s: usize, o: &mut [f32]| {
            let (lat, kr) = caches[s];
            let pos = positions[row];
            let mut scores = vec![0f32; pos + 1];
            let mut q_lat = vec![0f32; rank];
            let mut o_lat = vec![0f32; rank];
            for head in 0..nh {
                let qh = &q[(row * nh + head) * qk..(row * nh + head + 1) * qk];
                let (q_nope, q_rot) = qh.split_at(nope);
                let base = head * (nope + vd);
                q_lat.fill(0.0);
                for (i, &qi) in q_nope.iter().enumerate() {
                    kernels::axpy(
                        qi,
                        &wkv[(base + i) * rank..(base + i + 1) * rank],
                        &mut q_lat,
                    );
                }
                for (j, sc) in scores.iter_mut().enumerate() {
                    let c = &lat[j * rank..(j + 1) * rank];
                    let r = &kr[j * rd..(j + 1) * rd];
                    *sc = (kernels::dot(&q_lat, c) + kernels::dot(q_rot, r)) * self.scale;
                }
                softmax_inplace(&mut scores);
                o_lat.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    kernels::axpy(p, &lat[j * rank..(j + 1) * rank], &mut o_lat);
                }
                let oh = &mut o[head * vd..(head + 1) * vd];
                for (d, out) in oh.iter_mut().enumerate() {
                    let w = &wkv[(base + nope + d) * rank..(base + nope + d + 1) * rank];
                    *out = kernels::dot(w, &o_lat);
                }
            }
        };
        let mut out = vec![0f32; n * nh * vd];
        let work: usize = items.iter().map(|&(r, _)| positions[r] + 1).sum::<usize>() * nh * rank;
        if work > 1 << 16 {
            out.par_chunks_mut(nh * vd)
                .zip(items.par_iter())
                .for_each(|(o, &(row, s))| compute(row, s, o));
        } else {
            for (o, &(row, s)) in out.chunks_mut(nh * vd).zip(items.iter()) {
                compute(row, s, o);
            }
        }
        self.o_proj.forward(&out, n)
    }
}
