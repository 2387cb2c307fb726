//! Gated DeltaNet linear attention of Qwen3.5-MoE and Qwen3-Next, following transformers'
//! `modeling_qwen3_5_moe.py` (`Qwen3_5MoeGatedDeltaNet`, `torch_recurrent_gated_delta_rule`) and
//! `modeling_qwen3_next.py` (the same layer with fused input projections).
//!
//! Per token: `qkv = conv1d(in_proj_qkv(x))` (causal, depthwise, SiLU), split into queries and keys
//! (`linear_num_key_heads` x `linear_key_head_dim`, L2-normalised, queries divided by
//! `sqrt(dk)`) and values (`linear_num_value_heads` x `linear_value_head_dim`); per value head
//! `S = S * exp(g)`, `S += k (beta (v - S^T k))^T`, `o = S^T q`, with
//! `g = -exp(A_log) softplus(a + dt_bias)` and `beta = sigmoid(b)`; then
//! `out_proj(rmsnorm(o) * silu(z))`. The state a sequence carries is the last `kernel - 1` conv
//! inputs and `S` (`dk x dv` per value head): no cache grows with the sequence. Prefill runs the
//! same recurrence token by token as decoding does, so both give the same bits.

use crate::error::{EngineError, Result};
use crate::layers::{Linear, load_vec, sigmoid};
use crate::safetensors::Checkpoint;

/// Shapes of a Gated DeltaNet layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaNetConfig {
    /// Key (and query) heads.
    pub num_key_heads: usize,
    /// Value heads (a multiple of the key heads).
    pub num_value_heads: usize,
    /// Key head width.
    pub key_head_dim: usize,
    /// Value head width.
    pub value_head_dim: usize,
    /// Causal convolution width.
    pub conv_kernel: usize,
}

impl DeltaNetConfig {
    /// Channels of the convolution: queries, keys and values.
    pub fn conv_dim(&self) -> usize {
        2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
    }

    /// Elements of the convolution state (the last `kernel - 1` inputs).
    pub fn conv_state_len(&self) -> usize {
        (self.conv_kernel - 1) * self.conv_dim()
    }

    /// Elements of the recurrent state.
    pub fn recurrent_state_len(&self) -> usize {
        self.num_value_heads * self.key_head_dim * self.value_head_dim
    }
}

/// The weights of one Gated DeltaNet layer.
#[derive(Clone, Debug)]
pub struct GatedDeltaNet {
    /// `[conv_dim, hidden]`: queries, keys, values.
    pub in_proj_qkv: Linear,
    /// `[nv * dv, hidden]`: the output gate.
    pub in_proj_z: Linear,
    /// `[nv, hidden]`: the write strength (through a sigmoid).
    pub in_proj_b: Linear,
    /// `[nv, hidden]`: the decay input.
    pub in_proj_a: Linear,
    /// Depthwise convolution `[conv_dim, kernel]`.
    pub conv1d: Vec<f32>,
    /// Added to `a` before the softplus, per value head.
    pub dt_bias: Vec<f32>,
    /// `-exp(A_log)` per value head.
    pub neg_a: Vec<f32>,
    /// Gated RMSNorm weight `[dv]`.
    pub norm: Vec<f32>,
    /// `[hidden, nv * dv]`
    pub out_proj: Linear,
    shape: DeltaNetConfig,
    eps: f32,
}

/// `log(1 + exp(x))` as torch computes it (linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn l2norm(x: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss + 1e-6).sqrt();
    for v in x {
        *v *= inv;
    }
}

/// Rows `rows` (in order) of a `[_, cols]` tensor as f32.
fn gather_rows(t: &crate::tensor::Tensor, rows: &[usize], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len() * cols];
    for (o, &r) in out.chunks_exact_mut(cols).zip(rows) {
        t.row_to_f32(r, o);
    }
    out
}

impl GatedDeltaNet {
    /// Loads the layer under `prefix` (`model.layers.N.linear_attn`): Qwen3.5's separate
    /// `in_proj_qkv`/`in_proj_z`/`in_proj_b`/`in_proj_a`, or Qwen3-Next's fused `in_proj_qkvz`
    /// and `in_proj_ba` (grouped by key head), which are reordered into the former.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        d: DeltaNetConfig,
        eps: f32,
    ) -> Result<Self> {
        let (nk, nv, dk, dv) = (
            d.num_key_heads,
            d.num_value_heads,
            d.key_head_dim,
            d.value_head_dim,
        );
        let conv_dim = d.conv_dim();
        let (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) =
            if ckpt.contains(&format!("{prefix}.in_proj_qkvz.weight")) {
                let r = nv / nk;
                let per = 2 * dk + 2 * r * dv;
                let qkvz = ckpt.get_shaped(
                    &format!("{prefix}.in_proj_qkvz.weight"),
                    &[nk * per, hidden],
                )?;
                let ba = ckpt.get_shaped(
                    &format!("{prefix}.in_proj_ba.weight"),
                    &[nk * 2 * r, hidden],
                )?;
                let pick = |f: &dyn Fn(usize) -> std::ops::Range<usize>| -> Vec<usize> {
                    (0..nk)
                        .flat_map(|g| f(g).map(move |i| g * per + i))
                        .collect()
                };
                let q_rows = pick(&|_| 0..dk);
                let k_rows = pick(&|_| dk..2 * dk);
                let v_rows = pick(&|_| 2 * dk..2 * dk + r * dv);
                let z_rows = pick(&|_| 2 * dk + r * dv..per);
                let qkv_rows: Vec<usize> = q_rows.into_iter().chain(k_rows).chain(v_rows).collect();
                let b_rows: Vec<usize> = (0..nk)
                    .flat_map(|g| (0..r).map(move |i| g * 2 * r + i))
                    .collect();
                let a_rows: Vec<usize> = (0..nk)
                    .flat_map(|g| (0..r).map(move |i| g * 2 * r + r + i))
                    .collect();
                let lin = |name: &str, rows: &[usize], t: &crate::tensor::Tensor| {
                    Linear::from_weight(crate::tensor::Tensor::from_f32(
                        &format!("{prefix}.{name}"),
                        vec![rows.len(), hidden],
                        &gather_rows(t, rows, hidden),
                    ))
                };
                (
                    lin("in_proj_qkv", &qkv_rows, &qkvz)?,
                    lin("in_proj_z", &z_rows, &qkvz)?,
                    lin("in_proj_b", &b_rows, &ba)?,
                    lin("in_proj_a", &a_rows, &ba)?,
                )
            } else {
                (
                    Linear::load(
                        ckpt,
                        &format!("{prefix}.in_proj_qkv"),
                        conv_dim,
                        hidden,
                        false,
                    )?,
                    Linear::load(ckpt, &format!("{prefix}.in_proj_z"), nv * dv, hidden, false)?,
                    Linear::load(ckpt, &format!("{prefix}.in_proj_b"), nv, hidden, false)?,
                    Linear::load(ckpt, &format!("{prefix}.in_proj_a"), nv, hidden, false)?,
                )
            };
        let conv = ckpt.get_shaped(
            &format!("{prefix}.conv1d.weight"),
            &[conv_dim, 1, d.conv_kernel],
        )?;
        if ckpt.contains(&format!("{prefix}.conv1d.bias")) {
            return Err(EngineError::BadTensor {
                name: format!("{prefix}.conv1d.bias"),
                msg: "a bias on the DeltaNet convolution is not supported".into(),
            });
        }
        let a_log = load_vec(ckpt, &format!("{prefix}.A_log"), nv)?;
        Ok(GatedDeltaNet {
            in_proj_qkv,
            in_proj_z,
            in_proj_b,
            in_proj_a,
            conv1d: conv.to_f32_vec(),
            dt_bias: load_vec(ckpt, &format!("{prefix}.dt_bias"), nv)?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            norm: load_vec(ckpt, &format!("{prefix}.norm.weight"), dv)?,
            out_proj: Linear::load(ckpt, &format!("{prefix}.out_proj"), hidden, nv * dv, false)?,
            shape: d,
            eps,
        })
    }

    /// Runs the `n` rows of `hn`; `spans` gives each sequence's `(first row, rows)` and
    /// `states` its `(conv state, recurrent state)`, updated in place.
    pub fn forward(
        &self,
        hn: &[f32],
        n: usize,
        spans: &[(usize, usize)],
        states: &mut [(&mut Vec<f32>, &mut Vec<f32>)],
    ) -> Vec<f32> {
        let d = self.shape;
        let (nk, nv, dk, dv, kernel) = (
            d.num_key_heads,
            d.num_value_heads,
            d.key_head_dim,
            d.value_head_dim,
            d.conv_kernel,
        );
        let conv_dim = d.conv_dim();
        let [qkv, z, b, a]: [Vec<f32>; 4] = Linear::forward_many(
            &[
                &self.in_proj_qkv,
                &self.in_proj_z,
                &self.in_proj_b,
                &self.in_proj_a,
            ],
            hn,
            n,
        )
        .try_into()
        .expect("four outputs");
        let mut core = vec![0f32; n * nv * dv];
        let rep = nv / nk;
        let q_scale = (dk as f32).sqrt();
        for (&(first, len), (conv_state, state)) in spans.iter().zip(states.iter_mut()) {
            if conv_state.len() != d.conv_state_len() {
                conv_state.clear();
                conv_state.resize(d.conv_state_len(), 0.0);
            }
            if state.len() != d.recurrent_state_len() {
                state.clear();
                state.resize(d.recurrent_state_len(), 0.0);
            }
            let mut y = vec![0f32; conv_dim];
            let mut kv_mem = vec![0f32; dv];
            for t in first..first + len {
                let x = &qkv[t * conv_dim..(t + 1) * conv_dim];
                // Causal depthwise convolution over the last kernel - 1 inputs and this one.
                for (c, yc) in y.iter_mut().enumerate() {
                    let w = &self.conv1d[c * kernel..(c + 1) * kernel];
                    let mut acc = 0f32;
                    for i in 0..kernel - 1 {
                        acc += w[i] * conv_state[i * conv_dim + c];
                    }
                    acc += w[kernel - 1] * x[c];
                    *yc = silu(acc);
                }
                if kernel > 1 {
                    conv_state.copy_within(conv_dim.., 0);
                    let last = (kernel - 2) * conv_dim;
                    conv_state[last..last + conv_dim].copy_from_slice(x);
                }
                let (q, rest) = y.split_at_mut(nk * dk);
                let (k, v) = rest.split_at_mut(nk * dk);
                for head in q.chunks_exact_mut(dk) {
                    l2norm(head);
                    for x in head.iter_mut() {
                        *x /= q_scale;
                    }
                }
                for head in k.chunks_exact_mut(dk) {
                    l2norm(head);
                }
                for h in 0..nv {
                    let kh = h / rep;
                    let (qh, khv) = (&q[kh * dk..(kh + 1) * dk], &k[kh * dk..(kh + 1) * dk]);
                    let vh = &v[h * dv..(h + 1) * dv];
                    let g = self.neg_a[h] * softplus(a[t * nv + h] + self.dt_bias[h]);
                    let decay = g.exp();
                    let beta = sigmoid(b[t * nv + h]);
                    let s = &mut state[h * dk * dv..(h + 1) * dk * dv];
                    for x in s.iter_mut() {
                        *x *= decay;
                    }
                    kv_mem.fill(0.0);
                    for (i, &ki) in khv.iter().enumerate() {
                        for (m, &sv) in kv_mem.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
                            *m += sv * ki;
                        }
                    }
                    for (m, &vj) in kv_mem.iter_mut().zip(vh) {
                        *m = (vj - *m) * beta; // delta
                    }
                    for (i, &ki) in khv.iter().enumerate() {
                        for (sv, &dj) in s[i * dv..(i + 1) * dv].iter_mut().zip(&kv_mem) {
                            *sv += ki * dj;
                        }
                    }
                    let o = &mut core[(t * nv + h) * dv..(t * nv + h + 1) * dv];
                    o.fill(0.0);
                    for (i, &qi) in qh.iter().enumerate() {
                        for (ov, &sv) in o.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
                            *ov += sv * qi;
                        }
                    }
                }
            }
        }
        // Gated RMSNorm per value head: weight * rmsnorm(o) * silu(z).
        for (o, zr) in core.chunks_exact_mut(dv).zip(z.chunks_exact(dv)) {
            let ms = o.iter().map(|v| v * v).sum::<f32>() / dv as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((ov, w), &zv) in o.iter_mut().zip(&self.norm).zip(zr) {
                *ov = w * (*ov * r) * silu(zv);
            }
        }
        self.out_proj.forward(&core, n)
    }
}
