//! NEON dot products on block-quantized weights (aarch64), in the canonical order of
//! [`crate::quant`].
//!
//! NOT compiled natively or benchmarked on the development machine (x86-64, no aarch64
//! toolchain), so it is kept small: weights are unpacked to signed bytes with the scalar code the
//! reference uses, and NEON does the exact integer dot products (`vmull_s8` widening products,
//! pairwise additions into the sums of four consecutive elements) and, for the 32-element types,
//! the canonical float lanes with `vfmaq_f32`. It uses only stable intrinsics (`vdotq_s32` is not
//! stable in the toolchain this builds with). On other targets the unit tests run this same
//! source against a software emulation of the intrinsics (`emu`).

#![allow(unused_unsafe)]
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::{
    float32x4_t, int32x4_t, vaddq_s32, vaddvq_s32, vcvtq_f32_s32, vdupq_n_f32, vfmaq_f32,
    vget_low_s8, vld1q_s8, vmull_high_s8, vmull_s8, vpaddlq_s16, vpaddq_s32, vst1q_f32,
};

#[cfg(not(target_arch = "aarch64"))]
use emu::{
    float32x4_t, int32x4_t, vaddq_s32, vaddvq_s32, vcvtq_f32_s32, vdupq_n_f32, vfmaq_f32,
    vget_low_s8, vld1q_s8, vmull_high_s8, vmull_s8, vpaddlq_s16, vpaddq_s32, vst1q_f32,
};

use crate::kernels::{LANES, fold_lanes};
use crate::quant::{
    QType, block32_values, k_accumulate, k_block_scales, k_fold, k45_values, q6_values,
    scale_min_k4,
};

/// The sums of the products of 16 byte pairs, four consecutive elements per lane (exact).
#[inline(always)]
fn quad_sums(a: &[i8], b: &[i8]) -> int32x4_t {
    assert!(a.len() >= 16 && b.len() >= 16);
    // SAFETY: both slices hold 16 bytes (checked above); the rest is register arithmetic.
    unsafe {
        let (va, vb) = (vld1q_s8(a.as_ptr()), vld1q_s8(b.as_ptr()));
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(va), vget_low_s8(vb)));
        let hi = vpaddlq_s16(vmull_high_s8(va, vb));
        vpaddq_s32(lo, hi)
    }
}

/// Exact dot product of `n` (a multiple of 16) byte pairs.
#[inline(always)]
fn int_dot(a: &[i8], b: &[i8], n: usize) -> i32 {
    let mut acc = quad_sums(a, b);
    for k in (16..n).step_by(16) {
        // SAFETY: register arithmetic.
        acc = unsafe { vaddq_s32(acc, quad_sums(&a[k..], &b[k..])) };
    }
    // SAFETY: register arithmetic.
    unsafe { vaddvq_s32(acc) }
}

/// Dot product of one quantized row with one token's quantized activations (see
/// [`crate::quant::dot_row_ref`], which this equals bit for bit).
pub(super) fn dot_row(q: QType, row: &[u8], x: &[i8], xd: &[f32], s16: &[i16]) -> f32 {
    let bb = q.block_bytes();
    if q.is_k() {
        let mut acc = [0f32; 4];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let xb = &x[256 * b..256 * b + 256];
            let (s, m) = match q {
                QType::Q6_K => {
                    let vals = q6_values(blk);
                    let w: [i8; 256] = std::array::from_fn(|i| vals[i] as i8 - 32);
                    let s: i32 = (0..16)
                        .map(|j| {
                            i32::from(blk[192 + j] as i8) * int_dot(&w[16 * j..], &xb[16 * j..], 16)
                        })
                        .sum();
                    (s, 0)
                }
                _ => {
                    let vals = if q == QType::Q5_K {
                        k45_values(&blk[48..], Some(&blk[16..48]))
                    } else {
                        k45_values(&blk[16..], None)
                    };
                    let w: [i8; 256] = std::array::from_fn(|i| vals[i] as i8);
                    let sb = &s16[16 * b..16 * b + 16];
                    let (mut s, mut m) = (0i32, 0i32);
                    for j in 0..8 {
                        let (sc, mn) = scale_min_k4(j, &blk[4..16]);
                        s += i32::from(sc) * int_dot(&w[32 * j..], &xb[32 * j..], 32);
                        m += i32::from(mn) * (i32::from(sb[2 * j]) + i32::from(sb[2 * j + 1]));
                    }
                    (s, m)
                }
            };
            let (d, dmin) = k_block_scales(q, blk);
            k_accumulate(&mut acc, b, d, dmin, xd[b], s, m);
        }
        return k_fold(&acc);
    }
    // SAFETY: plain register initialisation.
    let mut acc: [[float32x4_t; 2]; 2] = unsafe { [[vdupq_n_f32(0.0); 2]; 2] };
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let (w, dw) = block32_values(q, blk);
        let xb = &x[32 * b..32 * b + 32];
        // SAFETY: register arithmetic.
        unsafe {
            let s = vdupq_n_f32(dw * xd[b]);
            let a = &mut acc[b % 2];
            a[0] = vfmaq_f32(a[0], s, vcvtq_f32_s32(quad_sums(&w[..16], &xb[..16])));
            a[1] = vfmaq_f32(a[1], s, vcvtq_f32_s32(quad_sums(&w[16..], &xb[16..])));
        }
    }
    let mut lanes = [0f32; LANES];
    for (i, v) in acc.iter().flatten().enumerate() {
        // SAFETY: `lanes` holds 16 floats; offsets `4 * i .. 4 * i + 4` (i < 4) are in bounds.
        unsafe { vst1q_f32(lanes.as_mut_ptr().add(4 * i), *v) };
    }
    fold_lanes(&lanes)
}

/// Software stand-ins for the NEON intrinsics above, with their lane semantics, so the tests can
/// run this file on other targets.
#[cfg(not(target_arch = "aarch64"))]
#[allow(non_camel_case_types)]
mod emu {
    #[derive(Clone, Copy)]
    pub struct float32x4_t([f32; 4]);
    #[derive(Clone, Copy)]
    pub struct int8x16_t([i8; 16]);
    #[derive(Clone, Copy)]
    pub struct int8x8_t([i8; 8]);
    #[derive(Clone, Copy)]
    pub struct int16x8_t([i16; 8]);
    #[derive(Clone, Copy)]
    pub struct int32x4_t([i32; 4]);

    /// # Safety
    /// `p..p + 16` must be readable.
    pub unsafe fn vld1q_s8(p: *const i8) -> int8x16_t {
        // SAFETY: guaranteed by the caller.
        int8x16_t(unsafe { p.cast::<[i8; 16]>().read_unaligned() })
    }
    pub unsafe fn vget_low_s8(a: int8x16_t) -> int8x8_t {
        int8x8_t(std::array::from_fn(|i| a.0[i]))
    }
    pub unsafe fn vmull_s8(a: int8x8_t, b: int8x8_t) -> int16x8_t {
        int16x8_t(std::array::from_fn(|i| {
            i16::from(a.0[i]) * i16::from(b.0[i])
        }))
    }
    pub unsafe fn vmull_high_s8(a: int8x16_t, b: int8x16_t) -> int16x8_t {
        int16x8_t(std::array::from_fn(|i| {
            i16::from(a.0[8 + i]) * i16::from(b.0[8 + i])
        }))
    }
    pub unsafe fn vpaddlq_s16(a: int16x8_t) -> int32x4_t {
        int32x4_t(std::array::from_fn(|i| {
            i32::from(a.0[2 * i]) + i32::from(a.0[2 * i + 1])
        }))
    }
    pub unsafe fn vpaddq_s32(a: int32x4_t, b: int32x4_t) -> int32x4_t {
        int32x4_t([
            a.0[0] + a.0[1],
            a.0[2] + a.0[3],
            b.0[0] + b.0[1],
            b.0[2] + b.0[3],
        ])
    }
    pub unsafe fn vaddq_s32(a: int32x4_t, b: int32x4_t) -> int32x4_t {
        int32x4_t(std::array::from_fn(|i| a.0[i] + b.0[i]))
    }
    pub unsafe fn vaddvq_s32(a: int32x4_t) -> i32 {
        a.0.iter().sum()
    }
    pub unsafe fn vcvtq_f32_s32(a: int32x4_t) -> float32x4_t {
        float32x4_t(std::array::from_fn(|i| a.0[i] as f32))
    }
    pub unsafe fn vdupq_n_f32(v: f32) -> float32x4_t {
        float32x4_t([v; 4])
    }
    pub unsafe fn vfmaq_f32(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        float32x4_t(std::array::from_fn(|i| b.0[i].mul_add(c.0[i], a.0[i])))
    }
    /// # Safety
    /// `p..p + 4` must be writable.
    pub unsafe fn vst1q_f32(p: *mut f32, a: float32x4_t) {
        // SAFETY: guaranteed by the caller.
        unsafe { p.cast::<[f32; 4]>().write_unaligned(a.0) }
    }
}

#[cfg(test)]
mod tests {
    use crate::quant::{self, ALL, QActs};

    #[test]
    fn neon_source_matches_the_reference_bit_for_bit() {
        for q in ALL {
            for nb in 1..4 {
                let cols = nb * q.block_elems();
                let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.91 + 0.3).sin()).collect();
                let mut row = Vec::new();
                quant::quantize(q, &w, &mut row);
                let x: Vec<f32> = (0..cols)
                    .map(|i| (i as f32 * 0.37 - 1.0).cos() * 2.0)
                    .collect();
                let acts = QActs::new(q, &x, cols);
                let (xq, xd, s16) = acts.token(0);
                let want = quant::dot_row_ref(q, &row, xq, xd, s16);
                let got = super::dot_row(q, &row, xq, xd, s16);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{q:?} cols {cols}: {got} vs {want}"
                );
            }
        }
    }
}
