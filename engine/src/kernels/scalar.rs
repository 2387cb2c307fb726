//! The scalar reference kernels: the definition every SIMD path is tested against.

use half::{bf16, f16};

use super::{Elem, LANES, fold_lanes, silu};
use crate::tensor::Mat;

/// Canonical-order dot product (see the module docs of `kernels`).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_by(a.len(), |k| a[k], b)
}

#[inline]
fn dot_by(n: usize, w: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (k, xk) in x[..n].iter().enumerate() {
        let l = k % LANES;
        acc[l] = w(k).mul_add(*xk, acc[l]);
    }
    fold_lanes(&acc)
}

/// Dot product of weight row `r` (stored dtype) with `x`.
pub fn dot_row(w: Mat<'_>, r: usize, x: &[f32]) -> f32 {
    let cols = x.len();
    let base = r * cols;
    match w {
        Mat::F32(s) => dot_by(cols, |k| s[base + k], x),
        Mat::F16(s) => dot_by(cols, |k| f16::to_f32(s[base + k]), x),
        Mat::BF16(s) => dot_by(cols, |k| bf16::to_f32(s[base + k]), x),
        Mat::Quant(q, b) => {
            let acts = crate::quant::QActs::new(q, x, cols);
            let (xq, xd, s16) = acts.token(0);
            let rb = q.row_bytes(cols).expect("whole blocks");
            crate::quant::dot_row_ref(q, &b[r * rb..(r + 1) * rb], xq, xd, s16)
        }
    }
}

/// Reference matrix product, see [`super::matmul`].
pub fn matmul(w: Mat<'_>, rows: usize, cols: usize, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            out[t * rows + r] = dot_row(w, r, xt);
        }
    }
}

/// Scalar micro-kernel for the blocked driver: `res[r * tn + t] = dot(w[r], x[t])`.
pub(super) fn tile<W: Elem>(
    w: &[W],
    cols: usize,
    x: &[f32],
    rn: usize,
    tn: usize,
    res: &mut [f32],
) {
    for r in 0..rn {
        let wr = &w[r * cols..(r + 1) * cols];
        for t in 0..tn {
            res[r * tn + t] = dot_by(cols, |k| wr[k].to_f32(), &x[t * cols..(t + 1) * cols]);
        }
    }
}

/// Reference `y[i] = a.mul_add(x[i], y[i])`, see [`super::axpy`].
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = a.mul_add(*xv, *yv);
    }
}

/// Reference `gate[i] = silu(gate[i]) * up[i]`, see [`super::silu_mul`].
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * *u;
    }
}
