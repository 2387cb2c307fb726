//! Routed experts: the one interface the forward pass uses to run them, and the in-process host.
//!
//! The forward pass hands a backend the rows `(token, expert, weight)` of one MoE layer; the
//! backend returns `weight * FFN_expert(hidden[token])` for every row, in row order. Whether the
//! experts run here or on remote workers is invisible to the caller, and because every row is a
//! fixed function of its inputs (see `kernels`) the answer is the same bits either way.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::config::{Arch, ExpertAct, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels;
use crate::quant::{QActs, QType};
use crate::safetensors::Checkpoint;
use crate::tensor::{Mat, Tensor};

/// One routed (token, expert) pair of a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertRow {
    /// Index of the token in the batch's hidden states.
    pub token: u32,
    /// Expert index within the layer.
    pub expert: u32,
    /// Routing weight the output is scaled by.
    pub weight: f32,
}

/// Something that computes routed experts for a batch.
pub trait ExpertBackend: Send + Sync {
    /// Starts computing `rows` of `layer` over `hidden` (`n_tokens * hidden_size`, row-major).
    /// The returned job yields `rows.len() * hidden_size` values, row by row.
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> Result<Box<dyn PendingExperts + 'a>>;
}

/// A dispatched expert batch whose outputs can be waited for.
pub trait PendingExperts: Send {
    /// Blocks until the outputs are ready.
    fn wait(self: Box<Self>) -> Result<Vec<f32>>;
}

/// One expert's weights.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    /// `[moe_intermediate, hidden]`
    pub gate_proj: Tensor,
    /// `[moe_intermediate, hidden]`
    pub up_proj: Tensor,
    /// `[hidden, moe_intermediate]`
    pub down_proj: Tensor,
    /// Biases of gate, up and down (GPT-OSS).
    pub biases: Option<ExpertBiases>,
    /// The gated activation.
    pub act: ExpertAct,
}

/// The projection biases of one expert.
#[derive(Clone, Debug)]
pub struct ExpertBiases {
    /// `[moe_intermediate]`
    pub gate: Vec<f32>,
    /// `[moe_intermediate]`
    pub up: Vec<f32>,
    /// `[hidden]`
    pub down: Vec<f32>,
}

fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

impl ExpertWeights {
    /// Bytes of the three matrices.
    pub fn bytes(&self) -> usize {
        self.gate_proj.raw().len() + self.up_proj.raw().len() + self.down_proj.raw().len()
    }

    /// `out[i] = weight[i] * down(silu(gate(x_i)) * up(x_i))` for the `n` rows of `x`.
    pub fn forward(&self, x: &[f32], n: usize, weights: &[f32], out: &mut [f32]) {
        let hidden = self.down_proj.shape()[0];
        let inter = self.gate_proj.shape()[0];
        let mut g = vec![0f32; n * inter];
        let mut u = vec![0f32; n * inter];
        let (gate, up) = (self.gate_proj.mat(), self.up_proj.mat());
        kernels::matmul_pair(gate, up, inter, hidden, x, n, &mut g, &mut u);
        self.finish(g, u, n, weights, out);
    }

    /// The quantized type both `gate_proj` and `up_proj` are stored in, if they are stored in
    /// types whose activations take one form ([`QActs::fits`]): then [`Self::forward_acts`]
    /// can run on activations quantized once for several experts.
    pub fn gate_up_quant(&self) -> Option<QType> {
        match (self.gate_proj.mat(), self.up_proj.mat()) {
            (Mat::Quant(a, _), Mat::Quant(b, _)) if a.block_elems() == b.block_elems() => Some(a),
            _ => None,
        }
    }

    /// [`Self::forward`] on the rows of `x` already quantized for the gate and up projections
    /// (`x` fits [`Self::gate_up_quant`]): the same bits as [`Self::forward`] on the rows `x`
    /// was quantized from.
    ///
    /// # Panics
    /// When gate and up are not quantized to types `x` fits, or sizes disagree.
    pub fn forward_acts(&self, x: &QActs, weights: &[f32], out: &mut [f32]) {
        let n = x.n_tokens();
        let inter = self.gate_proj.shape()[0];
        let mut g = vec![0f32; n * inter];
        let mut u = vec![0f32; n * inter];
        let (gate, up) = (self.gate_proj.mat(), self.up_proj.mat());
        kernels::matmul_many_acts(&mut [(gate, inter, &mut g), (up, inter, &mut u)], x);
        self.finish(g, u, n, weights, out);
    }

    /// The rest of [`Self::forward`] from the gate and up projections `g` and `u` of `n` rows.
    fn finish(&self, mut g: Vec<f32>, mut u: Vec<f32>, n: usize, weights: &[f32], out: &mut [f32]) {
        let hidden = self.down_proj.shape()[0];
        let inter = self.gate_proj.shape()[0];
        if let Some(b) = &self.biases {
            add_bias(&mut g, &b.gate);
            add_bias(&mut u, &b.up);
        }
        match self.act {
            ExpertAct::SiluMul => kernels::silu_mul(&mut g, &u),
            ExpertAct::ClampedSwiGlu { alpha, limit } => {
                for (gv, &uv) in g.iter_mut().zip(&u) {
                    let gate = gv.min(limit);
                    let up = uv.clamp(-limit, limit);
                    let glu = gate * crate::layers::sigmoid(gate * alpha);
                    *gv = (up + 1.0) * glu;
                }
            }
        }
        kernels::matmul(self.down_proj.mat(), hidden, inter, &g, n, out);
        if let Some(b) = &self.biases {
            add_bias(out, &b.down);
        }
        for (row, &w) in out.chunks_exact_mut(hidden).zip(weights) {
            for v in row {
                *v *= w;
            }
        }
    }
}

/// Loads expert `e` of `layer`, checking shapes against the config.
pub fn load_expert(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    layer: usize,
    e: usize,
) -> Result<ExpertWeights> {
    if cfg.arch == Arch::GptOss {
        return load_fused_expert(cfg, ckpt, layer, e);
    }
    let names = cfg.expert_tensor_names(layer, e);
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    Ok(ExpertWeights {
        gate_proj: ckpt.get_weight(&names.gate_proj, &[i, h])?,
        up_proj: ckpt.get_weight(&names.up_proj, &[i, h])?,
        down_proj: ckpt.get_weight(&names.down_proj, &[h, i])?,
        biases: None,
        act: cfg.expert_act,
    })
}

/// GPT-OSS keeps all experts of a layer in fused tensors: `gate_up_proj` `[E, H, 2I]` (used as
/// `x @ W`, gate and up interleaved in the columns: even gate, odd up) with `gate_up_proj_bias`
/// `[E, 2I]`, and `down_proj` `[E, I, H]` with `down_proj_bias` `[E, H]`; or, natively, the
/// weights as MXFP4 `_blocks`/`_scales` laid out `[E, out, in]` (rows interleaved the same way).
/// Expert `e` is cut out into `[out, in]` f32 matrices.
fn load_fused_expert(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    layer: usize,
    e: usize,
) -> Result<ExpertWeights> {
    let (h, i, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let p = format!("{}.experts", cfg.moe_prefix(layer));
    let gu_name = format!("{p}.gate_up_proj");
    let down_name = format!("{p}.down_proj");
    // gate_up as [2I, H] rows (row 2j gate j, row 2j+1 up j) and down as [H, I].
    let (gate_up, down) = if ckpt.contains(&format!("{gu_name}_blocks")) {
        (
            crate::mxfp4::load_expert(ckpt, &gu_name, e, ne, 2 * i, h)?,
            crate::mxfp4::load_expert(ckpt, &down_name, e, ne, h, i)?,
        )
    } else {
        let gu = ckpt.get_shaped(&gu_name, &[ne, h, 2 * i])?;
        let dn = ckpt.get_shaped(&down_name, &[ne, i, h])?;
        let mut gu_t = vec![0f32; 2 * i * h];
        let mut row = vec![0f32; 2 * i];
        for r in 0..h {
            gu.row_to_f32(e * h + r, &mut row);
            for (c, &v) in row.iter().enumerate() {
                gu_t[c * h + r] = v;
            }
        }
        let mut dn_t = vec![0f32; h * i];
        let mut row = vec![0f32; h];
        for r in 0..i {
            dn.row_to_f32(e * i + r, &mut row);
            for (c, &v) in row.iter().enumerate() {
                dn_t[c * i + r] = v;
            }
        }
        (gu_t, dn_t)
    };
    let mut gate = Vec::with_capacity(i * h);
    let mut up = Vec::with_capacity(i * h);
    for (j, row) in gate_up.chunks_exact(h).enumerate() {
        if j % 2 == 0 {
            gate.extend_from_slice(row);
        } else {
            up.extend_from_slice(row);
        }
    }
    let gub = ckpt.get_shaped(&format!("{gu_name}_bias"), &[ne, 2 * i])?;
    let mut gu_bias = vec![0f32; 2 * i];
    gub.row_to_f32(e, &mut gu_bias);
    let db = ckpt.get_shaped(&format!("{down_name}_bias"), &[ne, h])?;
    let mut down_bias = vec![0f32; h];
    db.row_to_f32(e, &mut down_bias);
    let name = |what: &str| format!("{p}.{e}.{what}");
    Ok(ExpertWeights {
        gate_proj: Tensor::from_f32(&name("gate_proj"), vec![i, h], &gate),
        up_proj: Tensor::from_f32(&name("up_proj"), vec![i, h], &up),
        down_proj: Tensor::from_f32(&name("down_proj"), vec![h, i], &down),
        biases: Some(ExpertBiases {
            gate: gu_bias.iter().step_by(2).copied().collect(),
            up: gu_bias.iter().skip(1).step_by(2).copied().collect(),
            down: down_bias,
        }),
        act: cfg.expert_act,
    })
}

/// Stored bytes of the weights of `experts` (`(layer, expert)` pairs), from the tensor index:
/// nothing is read from the weights.
pub fn stored_bytes(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    experts: impl IntoIterator<Item = (usize, usize)>,
) -> Result<u64> {
    let mut total = 0u64;
    for (l, e) in experts {
        if cfg.arch == Arch::GptOss {
            // An expert's share of the fused tensors (weights, or MXFP4 blocks and scales, and
            // biases).
            let p = format!("{}.experts", cfg.moe_prefix(l));
            let mut bytes = 0u64;
            for base in ["gate_up_proj", "down_proj"] {
                for suffix in ["", "_blocks", "_scales", "_bias"] {
                    if let Some((_, info)) = ckpt.info(&format!("{p}.{base}{suffix}")) {
                        bytes += info.len as u64;
                    }
                }
            }
            if bytes == 0 {
                return Err(EngineError::MissingTensor {
                    name: format!("{p}.gate_up_proj"),
                    dir: ckpt.dir().to_path_buf(),
                });
            }
            total += bytes / cfg.num_experts as u64;
            continue;
        }
        let names = cfg.expert_tensor_names(l, e);
        for name in [&names.gate_proj, &names.up_proj, &names.down_proj] {
            let (_, len) = ckpt
                .loaded_form(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.clone(),
                    dir: ckpt.dir().to_path_buf(),
                })?;
            total += len as u64;
        }
    }
    Ok(total)
}

/// Output values from which [`LocalExperts::compute`] puts rows back in order on every thread.
const PAR_GATHER: usize = 1 << 18;

/// Experts held in this process.
pub struct LocalExperts {
    hidden_size: usize,
    experts: BTreeMap<(usize, usize), ExpertWeights>,
}

impl LocalExperts {
    /// Holds the given experts.
    pub fn new(hidden_size: usize, experts: BTreeMap<(usize, usize), ExpertWeights>) -> Self {
        LocalExperts {
            hidden_size,
            experts,
        }
    }

    /// Loads the experts `(layer, expert)` listed in `which` from a checkpoint (see
    /// [`Checkpoint::get_weight`] for where their weights are held).
    pub fn load(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        which: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self> {
        Self::load_keeping(cfg, ckpt, which, None)
    }

    /// [`Self::load`], sharing the weights of the experts `keep` already holds instead of
    /// loading (and copying) them again: a worker whose assignment grows loads only the new ones.
    pub fn load_keeping(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        which: impl IntoIterator<Item = (usize, usize)>,
        keep: Option<&LocalExperts>,
    ) -> Result<Self> {
        let which: Vec<(usize, usize)> = which.into_iter().collect();
        // In parallel: loading copies (and may quantize) every expert's weights.
        let loaded: Vec<ExpertWeights> = which
            .par_iter()
            .map(|&(l, e)| match keep.and_then(|k| k.get(l, e)) {
                Some(w) => Ok(w.clone()),
                None => load_expert(cfg, ckpt, l, e),
            })
            .collect::<Result<_>>()?;
        Ok(Self::new(
            cfg.hidden_size,
            which.into_iter().zip(loaded).collect(),
        ))
    }

    /// Loads every routed expert of every MoE layer.
    pub fn load_all(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Self> {
        let all: Vec<_> = cfg
            .moe_layers()
            .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
            .collect();
        Self::load(cfg, ckpt, all)
    }

    /// The `(layer, expert)` pairs held.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.experts.keys().copied()
    }

    /// The weights of one held expert.
    pub fn get(&self, layer: usize, expert: usize) -> Option<&ExpertWeights> {
        self.experts.get(&(layer, expert))
    }

    /// Total bytes of the held experts' weights.
    pub fn bytes(&self) -> usize {
        self.experts.values().map(ExpertWeights::bytes).sum()
    }

    /// Residual width.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Computes `rows` over `hidden` now; returns `rows.len() * hidden_size` values.
    pub fn compute(&self, layer: usize, hidden: &[f32], rows: &[ExpertRow]) -> Result<Vec<f32>> {
        let h = self.hidden_size;
        if !hidden.len().is_multiple_of(h) {
            return Err(EngineError::Experts {
                layer,
                host: "local".into(),
                msg: format!("{} hidden values are not a multiple of {h}", hidden.len()),
            });
        }
        let n_tokens = hidden.len() / h;
        // Group row indices by expert, in expert order then row order.
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            if r.token as usize >= n_tokens {
                return Err(EngineError::Experts {
                    layer,
                    host: "local".into(),
                    msg: format!("row {i} names token {} of {n_tokens}", r.token),
                });
            }
            groups.entry(r.expert).or_default().push(i);
        }
        let mut jobs = Vec::with_capacity(groups.len());
        for (e, idx) in groups {
            let w = self
                .experts
                .get(&(layer, e as usize))
                .ok_or_else(|| EngineError::Experts {
                    layer,
                    host: "local".into(),
                    msg: format!("expert {e} is not held here"),
                })?;
            jobs.push((w, idx));
        }
        // Decode-like batches (a few rows per expert) with enough experts for every thread:
        // each thread runs whole experts, without splitting the small products again (decode's
        // 8 experts on 2 threads). Larger batches split the products (uneven experts balance
        // better that way). The same bits either way.
        let whole = jobs.len() >= 2 * rayon::current_num_threads() && rows.len() <= 4 * jobs.len();
        // When every expert's gate and up take one form of quantized activations, the layer's
        // hidden states are quantized once and each expert gathers its tokens' rows (the same
        // bytes as quantizing its own rows: every block is quantized on its own), instead of
        // each of a token's experts quantizing it again.
        let form = jobs.first().and_then(|(w, _)| w.gate_up_quant());
        let acts = form
            .filter(|q| {
                jobs.iter().all(|(w, _)| {
                    w.gate_up_quant()
                        .is_some_and(|p| p.block_elems() == q.block_elems())
                })
            })
            .map(|q| QActs::new(q, hidden, h));
        let outputs: Vec<(Vec<usize>, Vec<f32>)> = jobs
            .into_par_iter()
            .map(|(w, idx)| {
                let n = idx.len();
                let ws: Vec<f32> = idx.iter().map(|&i| rows[i].weight).collect();
                let mut y = vec![0f32; n * h];
                if let Some(acts) = &acts {
                    let tokens: Vec<usize> = idx.iter().map(|&i| rows[i].token as usize).collect();
                    let x = acts.gather(&tokens);
                    if whole {
                        kernels::serial(|| w.forward_acts(&x, &ws, &mut y));
                    } else {
                        w.forward_acts(&x, &ws, &mut y);
                    }
                    return (idx, y);
                }
                let mut x = Vec::with_capacity(n * h);
                for &i in &idx {
                    let t = rows[i].token as usize;
                    x.extend_from_slice(&hidden[t * h..(t + 1) * h]);
                }
                if whole {
                    kernels::serial(|| w.forward(&x, n, &ws, &mut y));
                } else {
                    w.forward(&x, n, &ws, &mut y);
                }
                (idx, y)
            })
            .collect();
        // Back in the order of `rows` (every row belongs to exactly one expert's group), built
        // by appending: no pass zeroing what is overwritten (a prefill layer's rows are tens of
        // megabytes).
        let mut from = vec![(0u32, 0u32); rows.len()];
        for (j, (idx, _)) in outputs.iter().enumerate() {
            for (k, &i) in idx.iter().enumerate() {
                from[i] = (j as u32, k as u32);
            }
        }
        let src = |&(j, k): &(u32, u32)| {
            let y = &outputs[j as usize].1;
            &y[k as usize * h..(k as usize + 1) * h]
        };
        if rows.len() * h >= PAR_GATHER && rayon::current_num_threads() > 1 && h > 0 {
            // A prefill layer's rows: copied on every thread into the unwritten capacity (no
            // pass zeroing what is overwritten).
            let n = rows.len() * h;
            let mut out: Vec<f32> = Vec::with_capacity(n);
            out.spare_capacity_mut()[..n]
                .par_chunks_mut(h)
                .zip(from.par_iter())
                .for_each(|(o, f)| {
                    let y = src(f);
                    assert_eq!(o.len(), y.len(), "row width");
                    for (d, v) in o.iter_mut().zip(y) {
                        d.write(*v);
                    }
                });
            // SAFETY: the `rows.len()` chunks of `h` values, all `n` of the capacity's first
            // values, were each written above in full (checked widths).
            unsafe { out.set_len(n) };
            return Ok(out);
        }
        let mut out = Vec::with_capacity(rows.len() * h);
        for f in &from {
            out.extend_from_slice(src(f));
        }
        Ok(out)
    }
}

/// Writes row `k` of `y` (rows of `h` values) to row `idx[k]` of `out`: a host's outputs put
/// back in the order of the step's rows.
pub fn scatter_rows(out: &mut [f32], idx: &[usize], y: &[f32], h: usize) {
    for (k, &i) in idx.iter().enumerate() {
        out[i * h..(i + 1) * h].copy_from_slice(&y[k * h..(k + 1) * h]);
    }
}

/// How a host of experts computes a step's rows: `(host, layer, hidden, rows) -> outputs`.
pub(crate) type ComputeFn<H> = fn(&H, usize, &[f32], &[ExpertRow]) -> Result<Vec<f32>>;

/// Experts of this process, computed when the step waits for them (`compute` of `host`).
pub(crate) struct Deferred<'a, H> {
    pub(crate) host: &'a H,
    pub(crate) compute: ComputeFn<H>,
    pub(crate) layer: usize,
    pub(crate) hidden: &'a [f32],
    pub(crate) rows: &'a [ExpertRow],
}

impl<H: Sync> PendingExperts for Deferred<'_, H> {
    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        (self.compute)(self.host, self.layer, self.hidden, self.rows)
    }
}

impl ExpertBackend for LocalExperts {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        hidden: &'a [f32],
        rows: &'a [ExpertRow],
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        Ok(Box::new(Deferred {
            host: self,
            compute: LocalExperts::compute,
            layer,
            hidden,
            rows,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn wave(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn quantized(q: QType, shape: [usize; 2], seed: u32) -> Tensor {
        let mut b = Vec::new();
        crate::quant::quantize(q, &wave(shape[0] * shape[1], seed), &mut b);
        Tensor::from_raw("w", DType::from_quant(q), shape.to_vec(), &b).unwrap()
    }

    /// A layer's hidden states quantized once and gathered per expert give the bits of every
    /// expert quantizing its own rows (and of the f32 route when the experts' forms differ);
    /// 260 tokens' rows are put back in order on two threads.
    #[test]
    fn compute_quantizing_once_equals_per_expert_forward() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for n_tokens in [7, 260] {
            pool.install(|| compute_equals_forward(n_tokens));
        }
    }

    fn compute_equals_forward(n_tokens: usize) {
        let (h, inter) = (512, 256);
        assert!(n_tokens < 10 || 2 * n_tokens * h >= PAR_GATHER);
        let hidden = wave(n_tokens * h, 99);
        for gate_types in [
            [QType::Q4_K, QType::Q4_K, QType::Q5_K],
            [QType::Q8_0, QType::Q8_0, QType::Q4_0],
            // Two forms: each expert quantizes its own rows.
            [QType::Q4_K, QType::Q8_0, QType::Q4_K],
        ] {
            let mut experts = BTreeMap::new();
            for (e, &q) in gate_types.iter().enumerate() {
                let s = 10 * e as u32;
                let w = ExpertWeights {
                    gate_proj: quantized(q, [inter, h], s + 1),
                    up_proj: quantized(q, [inter, h], s + 2),
                    down_proj: quantized(QType::Q6_K, [h, inter], s + 3),
                    biases: None,
                    act: ExpertAct::SiluMul,
                };
                experts.insert((0, e), w);
            }
            let local = LocalExperts::new(h, experts);
            let rows: Vec<ExpertRow> = (0..n_tokens as u32)
                .flat_map(|t| {
                    [(t * 5) % 3, (t + 1) % 3].map(|e| ExpertRow {
                        token: t,
                        expert: e,
                        weight: 0.25 + t as f32 / 8.0,
                    })
                })
                .collect();
            let got = local.compute(0, &hidden, &rows).unwrap();
            assert_eq!(got.len(), rows.len() * h);
            for (i, r) in rows.iter().enumerate() {
                let t = r.token as usize;
                let w = local.get(0, r.expert as usize).unwrap();
                let mut want = vec![0f32; h];
                w.forward(&hidden[t * h..(t + 1) * h], 1, &[r.weight], &mut want);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got[i * h..(i + 1) * h]),
                    bits(&want),
                    "{gate_types:?} row {i}"
                );
            }
        }
    }
}
