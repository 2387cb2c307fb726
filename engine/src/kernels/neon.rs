//! NEON kernel (aarch64).
//!
//! NOT compiled natively or benchmarked on the development machine (x86-64, no aarch64
//! toolchain): it is kept deliberately small so it is obviously correct. One (row, token) pair at a
//! time; the 16 canonical lanes live in four `float32x4_t` (lanes 0-3, 4-7, 8-11, 12-15), each
//! updated with one fused `vfmaq_f32` per chunk of 16 columns in increasing `k`; the tail and the
//! fold are the scalar code every path shares. Weights are converted chunk by chunk to f32 with the
//! exact scalar conversions first. On other targets, the unit tests below run this same source
//! against a software emulation of the four intrinsics (`emu`), which checks the lane bookkeeping.

// The intrinsics are `unsafe fn` on older toolchains and safe (in NEON contexts) on newer ones;
// calling them inside `unsafe` blocks compiles on both.
#![allow(unused_unsafe)]
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::{float32x4_t, vdupq_n_f32, vfmaq_f32, vld1q_f32, vst1q_f32};

#[cfg(not(target_arch = "aarch64"))]
use emu::{float32x4_t, vdupq_n_f32, vfmaq_f32, vld1q_f32, vst1q_f32};

use super::{Elem, LANES, fold_lanes, tail_fma};

/// `res[r * tn + t] = dot(w[r * cols..], x[t * cols..])` for `r < rn`, `t < tn`.
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
            res[r * tn + t] = dot(wr, &x[t * cols..(t + 1) * cols]);
        }
    }
}

/// Canonical dot product of one weight row with one activation row of the same length.
fn dot<W: Elem>(w: &[W], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let n16 = n - n % LANES;
    // SAFETY: plain register initialisation.
    let mut acc: [float32x4_t; 4] = unsafe { [vdupq_n_f32(0.0); 4] };
    let mut wbuf = [0f32; LANES];
    for k in (0..n16).step_by(LANES) {
        for (b, v) in wbuf.iter_mut().zip(&w[k..k + LANES]) {
            *b = v.to_f32();
        }
        let xs = &x[k..k + LANES];
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `wbuf` and `xs` hold 16 floats, so offsets `4 * j .. 4 * j + 4` (j < 4) are
            // in bounds; vld1q_f32 has no alignment requirement beyond f32's.
            unsafe {
                let wv = vld1q_f32(wbuf.as_ptr().add(4 * j));
                let xv = vld1q_f32(xs.as_ptr().add(4 * j));
                // a + wv * xv, one rounding.
                *a = vfmaq_f32(*a, wv, xv);
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for (j, a) in acc.iter().enumerate() {
        // SAFETY: `lanes` holds 16 floats, offsets `4 * j .. 4 * j + 4` (j < 4) are in bounds.
        unsafe { vst1q_f32(lanes.as_mut_ptr().add(4 * j), *a) };
    }
    tail_fma(&mut lanes, &w[n16..n], &x[n16..n]);
    fold_lanes(&lanes)
}

/// Software stand-ins for the NEON intrinsics, with their semantics (lane-wise, `vfmaq_f32(a, b, c)
/// = a + b * c` fused), so the tests can run this file on other targets.
#[cfg(not(target_arch = "aarch64"))]
#[allow(non_camel_case_types)]
mod emu {
    #[derive(Clone, Copy)]
    pub struct float32x4_t([f32; 4]);

    pub unsafe fn vdupq_n_f32(v: f32) -> float32x4_t {
        float32x4_t([v; 4])
    }

    /// # Safety
    /// `p..p + 4` must be readable.
    pub unsafe fn vld1q_f32(p: *const f32) -> float32x4_t {
        // SAFETY: guaranteed by the caller.
        float32x4_t(unsafe { p.cast::<[f32; 4]>().read_unaligned() })
    }

    /// # Safety
    /// `p..p + 4` must be writable.
    pub unsafe fn vst1q_f32(p: *mut f32, a: float32x4_t) {
        // SAFETY: guaranteed by the caller.
        unsafe { p.cast::<[f32; 4]>().write_unaligned(a.0) }
    }

    pub unsafe fn vfmaq_f32(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        float32x4_t(std::array::from_fn(|i| b.0[i].mul_add(c.0[i], a.0[i])))
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::super::scalar;
    use crate::tensor::Mat;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn neon_source_matches_reference() {
        for (rows, cols) in [(1, 1), (3, 15), (2, 16), (5, 17), (4, 47), (3, 100)] {
            let w = values(rows * cols, (rows * 31 + cols) as u32);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for n_tokens in 1..=3 {
                let x = values(n_tokens * cols, (cols * 7 + n_tokens) as u32);
                for mat in [Mat::F32(&w), Mat::F16(&wh), Mat::BF16(&wb)] {
                    let mut want = vec![0f32; rows * n_tokens];
                    scalar::matmul(mat, rows, cols, &x, n_tokens, &mut want);
                    let mut res = vec![0f32; rows * n_tokens];
                    match mat {
                        Mat::F32(s) => super::tile(s, cols, &x, rows, n_tokens, &mut res),
                        Mat::F16(s) => super::tile(s, cols, &x, rows, n_tokens, &mut res),
                        Mat::BF16(s) => super::tile(s, cols, &x, rows, n_tokens, &mut res),
                        Mat::Quant(..) => unreachable!("float matrices only"),
                    }
                    for r in 0..rows {
                        for t in 0..n_tokens {
                            assert_eq!(
                                res[r * n_tokens + t].to_bits(),
                                want[t * rows + r].to_bits(),
                                "{mat:?} r={r} t={t}"
                            );
                        }
                    }
                }
            }
        }
    }
}
