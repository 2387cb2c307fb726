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
//! Every (row, head) is computed with the same operations in a fixed order whatever the tiling
//! (see `latent_attend`), so a token's output does not depend on the batch or on how the
//! prompt was split into chunks.

use crate::attention::{Strided, dots, weighted_sums};
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
        // The query's first projection and the compressed key/value projection read the same
        // input: one pass (one activation quantization and parallel loop per weight type).
        let first = match &self.q {
            QueryProj::Plain(p) => p,
            QueryProj::LowRank { q_a_proj, .. } => q_a_proj,
        };
        let [q0, ckv]: [Vec<f32>; 2] =
            Linear::forward_many(&[first, &self.kv_a_proj_with_mqa], hn, n)
                .try_into()
                .expect("two outputs");
        let mut q = match &self.q {
            QueryProj::Plain(_) => q0,
            QueryProj::LowRank {
                q_a_layernorm,
                q_b_proj,
                ..
            } => q_b_proj.forward(&rms_norm(&q0, q_a_layernorm, self.eps), n),
        };
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
        let mut spans = Vec::with_capacity(seqs.len());
        for step in seqs.iter_mut() {
            let len = step.tokens.len();
            step.cache.k[li].extend_from_slice(&latent[offset * rank..(offset + len) * rank]);
            step.cache.v[li].extend_from_slice(&k_rot[offset * rd..(offset + len) * rd]);
            spans.push(offset..offset + len);
            offset += len;
        }
        let caches: Vec<LatentSeq<'_>> = seqs
            .iter()
            .zip(&spans)
            .map(|(s, rows)| LatentSeq {
                latent: s.cache.k[li].as_slice(),
                k_rot: s.cache.v[li].as_slice(),
                rows: rows.clone(),
            })
            .collect();
        let mut out = vec![0f32; n * nh * vd];
        let shape = LatentShape {
            heads: nh,
            nope,
            rope: rd,
            v: vd,
            rank,
            scale: self.scale,
        };
        latent_attend(
            kernels::best_path(),
            &shape,
            &q,
            positions,
            &self.kv_b_proj,
            &caches,
            &mut out,
        );
        self.o_proj.forward(&out, n)
    }
}

/// The head shapes of [`latent_attend`].
#[derive(Clone, Copy, Debug)]
struct LatentShape {
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    rank: usize,
    scale: f32,
}

/// One sequence's cache (positions from 0) and its rows of the step.
#[derive(Clone, Debug)]
struct LatentSeq<'a> {
    latent: &'a [f32],
    k_rot: &'a [f32],
    rows: std::ops::Range<usize>,
}

/// Queries per tile the driver aims for (rows x heads).
const TILE_QUERIES: usize = 16;

/// Reusable buffers of one thread.
#[derive(Default)]
struct Scratch {
    q_lat: Vec<f32>,
    q_rot: Vec<f32>,
    s: Vec<f32>,
    s_rot: Vec<f32>,
    o_lat: Vec<f32>,
    ranges: Vec<(usize, usize)>,
}

/// The absorbed attention of `q` (`[rows, heads * (nope + rope)]`, roped) over the latent
/// caches into `out` (`[rows, heads * v]`), for each (row, head) exactly the operations of the
/// plain formulation: `q_lat = 0`, `q_lat = q_nope[i] * W_k[i] + q_lat` (fused, `i` increasing);
/// `s_j = (dot(q_lat, c_j) + dot(q_rot, r_j)) * scale`; softmax; `o_lat` the fused sum of
/// `p_j c_j` in increasing `j`; `out[d] = dot(W_v[d], o_lat)`. The tiles share each latent row
/// among all heads and several rows (see [`crate::attention`]).
fn latent_attend(
    path: kernels::Path,
    m: &LatentShape,
    q: &[f32],
    positions: &[usize],
    wkv: &[f32],
    seqs: &[LatentSeq<'_>],
    out: &mut [f32],
) {
    let (nh, vd) = (m.heads, m.v);
    let qk = m.nope + m.rope;
    let n = positions.len();
    assert!(
        q.len() == n * nh * qk && out.len() == n * nh * vd,
        "latent_attend: shapes"
    );
    assert!(
        wkv.len() == nh * (m.nope + vd) * m.rank,
        "latent_attend: kv_b_proj"
    );
    let tile_rows = (TILE_QUERIES / nh).max(1);
    let head_split = nh.div_ceil(4).max(1);
    // Units: (sequence, rows r0..r1, heads h0..h1), one row or all heads, so each unit's
    // output is one contiguous run; in increasing order of it.
    let mut units = Vec::new();
    for (s, sq) in seqs.iter().enumerate() {
        assert!(sq.rows.end <= n, "latent_attend: rows out of bounds");
        if sq.rows.len() == 1 {
            for h0 in (0..nh).step_by(head_split) {
                units.push((s, sq.rows.start, sq.rows.end, h0, (h0 + head_split).min(nh)));
            }
        } else {
            for r0 in sq.rows.clone().step_by(tile_rows) {
                units.push((s, r0, (r0 + tile_rows).min(sq.rows.end), 0, nh));
            }
        }
    }
    let w = nh * vd;
    let mut rest: &mut [f32] = out;
    let mut at = 0;
    let mut jobs = Vec::with_capacity(units.len());
    for u in units {
        let (_, r0, r1, h0, h1) = u;
        let (begin, end) = (r0 * w + h0 * vd, (r1 - 1) * w + h1 * vd);
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(begin - at);
        let (mine, tail) = tail.split_at_mut(end - begin);
        rest = tail;
        at = end;
        jobs.push((u, mine));
    }
    let work: usize = positions.iter().map(|&p| p + 1).sum::<usize>() * nh * m.rank;
    let run =
        |sc: &mut Scratch,
         ((s, r0, r1, h0, h1), o): ((usize, usize, usize, usize, usize), &mut [f32])| {
            latent_unit(
                path,
                m,
                q,
                positions,
                wkv,
                &seqs[s],
                (r0, r1, h0, h1),
                o,
                sc,
            );
        };
    crate::attention::run_jobs(jobs, work, run);
}

/// One unit of [`latent_attend`]: rows `r0..r1`, heads `h0..h1`; `o` is its run of the output.
#[allow(clippy::too_many_arguments)]
fn latent_unit(
    path: kernels::Path,
    m: &LatentShape,
    q: &[f32],
    positions: &[usize],
    wkv: &[f32],
    seq: &LatentSeq<'_>,
    (r0, r1, h0, h1): (usize, usize, usize, usize),
    o: &mut [f32],
    sc: &mut Scratch,
) {
    let (nh, nope, rd, vd, rank) = (m.heads, m.nope, m.rope, m.v, m.rank);
    let qk = nope + rd;
    let rows = r1 - r0;
    let hn = h1 - h0;
    // Queries t = (head - h0) * rows + row.
    let tq = rows * hn;
    let span = positions[r0..r1].iter().map(|&p| p + 1).max().unwrap_or(0);
    assert!(
        span * rank <= seq.latent.len() && span * rd <= seq.k_rot.len(),
        "latent_attend: cache shorter than position {span}"
    );
    sc.q_lat.resize(tq * rank, 0.0);
    sc.q_rot.resize(tq * rd, 0.0);
    sc.o_lat.resize(tq * rank, 0.0);
    sc.s.resize(tq * span, 0.0);
    sc.s_rot.resize(tq * span, 0.0);
    let from_q = |h: usize| &q[r0 * nh * qk + h * qk..];
    for h in h0..h1 {
        let t0 = (h - h0) * rows;
        let base = h * (nope + vd);
        sc.ranges.clear();
        sc.ranges.resize(rows, (0, nope));
        let w_k = Strided::new(&wkv[base * rank..], rank, rank, nope);
        let dst = &mut sc.q_lat[t0 * rank..(t0 + rows) * rank];
        weighted_sums(path, from_q(h), nh * qk, &sc.ranges, w_k, dst);
        for r in 0..rows {
            let src = &q[((r0 + r) * nh + h) * qk + nope..((r0 + r) * nh + h + 1) * qk];
            sc.q_rot[(t0 + r) * rd..(t0 + r + 1) * rd].copy_from_slice(src);
        }
    }
    let lat = Strided::new(seq.latent, rank, rank, span);
    let kr = Strided::new(seq.k_rot, rd, rd, span);
    dots(path, &sc.q_lat, tq, lat, &mut sc.s, span);
    dots(path, &sc.q_rot, tq, kr, &mut sc.s_rot, span);
    sc.ranges.clear();
    for t in 0..tq {
        let b = positions[r0 + t % rows] + 1;
        let srow = &mut sc.s[t * span..t * span + b];
        for (a, r) in srow.iter_mut().zip(&sc.s_rot[t * span..t * span + b]) {
            *a = (*a + r) * m.scale;
        }
        softmax_inplace(srow);
        sc.ranges.push((0, b));
    }
    weighted_sums(path, &sc.s, span, &sc.ranges, lat, &mut sc.o_lat);
    for h in h0..h1 {
        let t0 = (h - h0) * rows;
        let base = h * (nope + vd);
        let w_v = Strided::new(&wkv[(base + nope) * rank..], rank, rank, vd);
        let src = &sc.o_lat[t0 * rank..(t0 + rows) * rank];
        dots(path, src, rows, w_v, &mut o[(h - h0) * vd..], nh * vd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain formulation: every (row, head) alone with [`kernels::dot`] and
    /// [`kernels::axpy`] (the code `MlaAttention::forward` ran before the tiles).
    fn reference(
        m: &LatentShape,
        q: &[f32],
        positions: &[usize],
        wkv: &[f32],
        seqs: &[LatentSeq<'_>],
        out: &mut [f32],
    ) {
        let (nh, nope, rd, vd, rank) = (m.heads, m.nope, m.rope, m.v, m.rank);
        let qk = nope + rd;
        for sq in seqs {
            let (lat, kr) = (sq.latent, sq.k_rot);
            for row in sq.rows.clone() {
                let o = &mut out[row * nh * vd..(row + 1) * nh * vd];
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
                        *sc = (kernels::dot(&q_lat, c) + kernels::dot(q_rot, r)) * m.scale;
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
            }
        }
    }

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn tiled_latent_attention_equals_plain() {
        // (heads, nope, rope, v, rank), then sequences as (cached positions, new rows).
        let shapes = [
            (4, 16, 8, 16, 32),
            (3, 24, 16, 20, 72),
            (16, 32, 16, 32, 64),
            (1, 8, 4, 8, 16),
        ];
        let batches: [&[(usize, usize)]; 4] = [
            &[(0, 37)],
            &[(120, 1)],
            &[(0, 5), (60, 1), (9, 0), (17, 11)],
            &[(3, 200)],
        ];
        for (nh, nope, rd, vd, rank) in shapes {
            let m = LatentShape {
                heads: nh,
                nope,
                rope: rd,
                v: vd,
                rank,
                scale: 0.17,
            };
            let wkv = values(1, nh * (nope + vd) * rank);
            for batch in batches {
                let mut positions = Vec::new();
                let mut caches = Vec::new();
                for (i, &(cached, len)) in batch.iter().enumerate() {
                    let total = cached + len;
                    let seed = 10 + i as u64;
                    caches.push((values(seed, total * rank), values(seed + 50, total * rd)));
                    positions.extend(cached..total);
                }
                let n = positions.len();
                let q = values(99, n * nh * (nope + rd));
                let mut at = 0;
                let seqs: Vec<LatentSeq<'_>> = batch
                    .iter()
                    .zip(&caches)
                    .map(|(&(_, len), (lat, kr))| {
                        at += len;
                        LatentSeq {
                            latent: lat,
                            k_rot: kr,
                            rows: at - len..at,
                        }
                    })
                    .collect();
                let mut want = vec![f32::NAN; n * nh * vd];
                reference(&m, &q, &positions, &wkv, &seqs, &mut want);
                for path in kernels::available_paths() {
                    let mut got = vec![f32::NAN; n * nh * vd];
                    latent_attend(path, &m, &q, &positions, &wkv, &seqs, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{path:?}: shape {nh}/{nope}/{rd}/{vd}/{rank}, batch {batch:?}"
                    );
                }
            }
        }
    }
}
