//! Dense kernels with one canonical reduction order.
//!
//! Every dot product is computed as 16 interleaved lanes (`lane = k % 16`), each a chain of fused
//! multiply-adds, then folded 16 -> 8 -> 4 -> 2 -> 1 (`a[i] + a[i + w]`). The scalar reference, the
//! AVX2, AVX-512 and NEON paths all follow that order, so their results are bit-identical, and so is a
//! row computed alone or inside a batch: that is what makes distributed output equal single-process
//! output and keeps a sequence's tokens independent of its batch.

pub mod scalar;

use crate::tensor::Mat;

/// Number of interleaved accumulator lanes in the canonical dot product.
pub const LANES: usize = 16;

/// Folds the 16 lane sums in the canonical order.
#[inline]
pub fn fold_lanes(acc: &[f32; LANES]) -> f32 {
    let mut a = *acc;
    let mut w = LANES / 2;
    while w >= 1 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

/// Canonical dot product of two f32 slices of equal length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    scalar::dot_f32(a, b)
}

/// `out[t * rows + r] = dot(W[r, :], x[t, :])` for a weight matrix `w` of shape `[rows, cols]`
/// (row-major, any stored dtype) and `n_tokens` activations `x` of length `cols` each.
///
/// # Panics
/// When the slice lengths disagree with `rows`, `cols` and `n_tokens` (a caller bug, not input).
pub fn matmul(w: Mat<'_>, rows: usize, cols: usize, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight size");
    assert_eq!(x.len(), n_tokens * cols, "activation size");
    assert_eq!(out.len(), n_tokens * rows, "output size");
    scalar::matmul(w, rows, cols, x, n_tokens, out);
}

/// Converts `out.len()` elements of `w` starting at element `offset` to f32.
pub fn convert_to_f32(w: Mat<'_>, offset: usize, out: &mut [f32]) {
    let n = out.len();
    match w {
        Mat::F32(s) => out.copy_from_slice(&s[offset..offset + n]),
        Mat::F16(s) => {
            for (o, v) in out.iter_mut().zip(&s[offset..offset + n]) {
                *o = v.to_f32();
            }
        }
        Mat::BF16(s) => {
            for (o, v) in out.iter_mut().zip(&s[offset..offset + n]) {
                *o = v.to_f32();
            }
        }
    }
}
