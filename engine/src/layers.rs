//! The dense building blocks: linear layers, RMSNorm, rotary embeddings, SwiGLU MLP.

use crate::config::RopeScaling;
use crate::error::{EngineError, Result};
use crate::kernels;
use crate::safetensors::Checkpoint;
use crate::tensor::Tensor;

/// `y = x W^T (+ b)` with `W` stored `[out, in]` as in the checkpoint.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out_dim, in_dim]`
    pub weight: Tensor,
    /// Optional bias of `out_dim`.
    pub bias: Option<Vec<f32>>,
    /// Output features.
    pub out_dim: usize,
    /// Input features.
    pub in_dim: usize,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`), checking the shape.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = ckpt.get_weight(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(
                ckpt.get_shaped(&format!("{prefix}.bias"), &[out_dim])?
                    .to_f32_vec(),
            )
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_dim,
            in_dim,
        })
    }

    /// A linear layer over an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Result<Self> {
        let &[out_dim, in_dim] = weight.shape() else {
            return Err(EngineError::BadTensor {
                name: weight.name().to_string(),
                msg: format!("expected 2 dimensions, found {:?}", weight.shape()),
            });
        };
        Ok(Linear {
            weight,
            bias: None,
            out_dim,
            in_dim,
        })
    }

    /// Applies the layer to `n` rows of `x`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.out_dim];
        kernels::matmul(self.weight.mat(), self.out_dim, self.in_dim, x, n, &mut y);
        self.add_bias(&mut y);
        y
    }

    /// Several layers of the same input width over the same `n` rows of `x`, the quantized ones
    /// of one type in one pass ([`kernels::matmul_many`]): the same values as
    /// [`Linear::forward`] of each.
    ///
    /// # Panics
    /// When the layers' input widths differ (or as [`kernels::matmul`]).
    pub fn forward_many(layers: &[&Linear], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let Some(first) = layers.first() else {
            return Vec::new();
        };
        let cols = first.in_dim;
        assert!(
            layers.iter().all(|l| l.in_dim == cols),
            "forward_many: input widths differ"
        );
        let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; n * l.out_dim]).collect();
        let mut jobs: Vec<(crate::tensor::Mat<'_>, usize, &mut [f32])> = layers
            .iter()
            .zip(ys.iter_mut())
            .map(|(l, y)| (l.weight.mat(), l.out_dim, y.as_mut_slice()))
            .collect();
        kernels::matmul_many(&mut jobs, cols, x, n);
        drop(jobs);
        for (l, y) in layers.iter().zip(&mut ys) {
            l.add_bias(y);
        }
        ys
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_dim) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
}

/// Loads a 1-D f32 copy of a norm weight of length `dim`.
pub fn load_vec(ckpt: &Checkpoint, name: &str, dim: usize) -> Result<Vec<f32>> {
    Ok(ckpt.get_shaped(name, &[dim])?.to_f32_vec())
}

/// RMSNorm of every `weight.len()`-wide row of `x`, into a new buffer.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    rms_norm_inplace(&mut y, weight, eps);
    y
}

/// RMSNorm in place: `x * rsqrt(mean(x^2) + eps) * weight`, row by row.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for row in x.chunks_exact_mut(d) {
        let ms = kernels::dot(row, row) / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * r);
        }
    }
}

/// Rotary embedding: frequencies (plain or YaRN), a cos/sin factor, and the pair layout.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// YaRN's `attention_factor`, multiplied into cos and sin (1 otherwise).
    scale: f32,
    /// Pairs are adjacent elements (DeepSeek) rather than the two halves of a head.
    interleaved: bool,
}

/// YaRN's magnitude correction `0.1 * m * ln(s) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Rope {
    /// Default ("rotate half") rope for a head width of `dim` and base `theta`.
    pub fn new(dim: usize, theta: f64) -> Self {
        let inv_freq = (0..dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / dim as f64)) as f32)
            .collect();
        Rope {
            inv_freq,
            scale: 1.0,
            interleaved: false,
        }
    }

    /// Rope over `dim` dimensions as the config describes it (transformers'
    /// `_compute_yarn_parameters` for YaRN, computed in f32 as torch does).
    pub fn from_config(dim: usize, theta: f64, scaling: &RopeScaling, interleaved: bool) -> Self {
        let mut rope = match *scaling {
            RopeScaling::Default => Rope::new(dim, theta),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: omax,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let attention_factor =
                    attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) => yarn_mscale(factor, m) / yarn_mscale(factor, ma),
                        _ => yarn_mscale(factor, 1.0),
                    });
                let d = dim as f64;
                let correction_dim = |rot: f64| {
                    d * (omax / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                let (low32, span32) = (low as f32, (high - low) as f32);
                let factor32 = factor as f32;
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let pos_freq = theta.powf(f64::from((2 * i) as f32 / dim as f32)) as f32;
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor32 * pos_freq);
                        let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        interpolation * (1.0 - extra) + extrapolation * extra
                    })
                    .collect();
                Rope {
                    inv_freq,
                    scale: attention_factor as f32,
                    interleaved: false,
                }
            }
        };
        rope.interleaved = interleaved;
        rope
    }

    /// Rotates every `2 * inv_freq.len()`-wide head of `x` (one token) for position `pos`.
    /// Interleaved pairs come out in the "halves" layout (as transformers returns them): keys and
    /// queries share the layout, so their dot products are unchanged.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let a = pos as f32 * f;
                (a.cos() * self.scale, a.sin() * self.scale)
            })
            .unzip();
        let mut pairs = vec![0f32; 2 * half];
        for head in x.chunks_exact_mut(2 * half) {
            if self.interleaved {
                for i in 0..half {
                    pairs[i] = head[2 * i];
                    pairs[half + i] = head[2 * i + 1];
                }
                head.copy_from_slice(&pairs);
            }
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `[inter, hidden]`
    pub gate_proj: Linear,
    /// `[inter, hidden]`
    pub up_proj: Linear,
    /// `[hidden, inter]`
    pub down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj` etc.
    pub fn load(ckpt: &Checkpoint, prefix: &str, hidden: usize, inter: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(ckpt, &format!("{prefix}.gate_proj"), inter, hidden, false)?,
            up_proj: Linear::load(ckpt, &format!("{prefix}.up_proj"), inter, hidden, false)?,
            down_proj: Linear::load(ckpt, &format!("{prefix}.down_proj"), hidden, inter, false)?,
        })
    }

    /// Applies the MLP to `n` rows of `x`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let [mut g, u]: [Vec<f32>; 2] =
            Linear::forward_many(&[&self.gate_proj, &self.up_proj], x, n)
                .try_into()
                .expect("two outputs");
        kernels::silu_mul(&mut g, &u);
        self.down_proj.forward(&g, n)
    }
}

/// Numerically stable softmax in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// The logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
