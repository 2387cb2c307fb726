//! AVX2 dot products on block-quantized weights, in the canonical order of [`crate::quant`]:
//! the integer parts are exact (8-bit products summed in 16 and 32 bits, all within range), and
//! the float accumulation follows the reference lane for lane, so results equal
//! [`crate::quant::dot_row_ref`] bit for bit.
//!
//! 16-bit pair sums cannot saturate: `_mm256_maddubs_epi16` multiplies an unsigned weight (at
//! most 128 after the sign trick, 63 for K types) by an activation in [-127, 127].

use std::arch::x86_64::*;

use crate::kernels::{LANES, fold_lanes};
use crate::quant::{QType, k_accumulate, k_fold, scale_min_k4};

/// f16 bits at `p` to f32 (F16C; exact, like `half`).
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller passes a pointer to two readable bytes and has F16C.
    unsafe {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: register-only AVX2 operations (the caller has AVX2).
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Dot product of one quantized row with one token's quantized activations.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `row` holds whole blocks of `q` and `x`, `xd`, `s16`
/// are the matching token's activations (see [`crate::quant::QActs::token`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_row(q: QType, row: &[u8], x: &[i8], xd: &[f32], s16: &[i32]) -> f32 {
    let nb = row.len() / q.block_bytes();
    assert!(
        x.len() >= nb * q.block_elems() && xd.len() >= nb,
        "activation size"
    );
    if q.is_k() {
        assert!(s16.len() >= nb * 16, "activation sums");
    }
    // SAFETY: the lengths were checked above; every load below stays inside block `b` of `row`
    // and of `x`.
    unsafe {
        match q {
            QType::Q8_0 => dot32::<false>(row, x, xd, nb),
            QType::Q4_0 => dot32::<true>(row, x, xd, nb),
            _ => dot_k(q, row, x, xd, s16, nb),
        }
    }
}

#[inline(always)]
unsafe fn dot32<const Q4: bool>(row: &[u8], x: &[i8], xd: &[f32], nb: usize) -> f32 {
    let bb = if Q4 { 18 } else { 34 };
    // SAFETY: see `dot_row`.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            let blk = row.as_ptr().add(b * bb);
            let w = if Q4 {
                let raw = _mm_loadu_si128(blk.add(2).cast());
                let lo = _mm_and_si128(raw, m4);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m4);
                _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight)
            } else {
                _mm256_loadu_si256(blk.add(2).cast())
            };
            let xv = _mm256_loadu_si256(x.as_ptr().add(32 * b).cast());
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            let s = _mm256_set1_ps(f16_at(blk) * *xd.get_unchecked(b));
            acc[b % 2] = _mm256_fmadd_ps(s, p, acc[b % 2]);
        }
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        fold_lanes(&lanes)
    }
}

#[inline(always)]
unsafe fn dot_k(q: QType, row: &[u8], x: &[i8], xd: &[f32], s16: &[i32], nb: usize) -> f32 {
    let bb = q.block_bytes();
    let mut acc = [0f32; 4];
    // SAFETY: see `dot_row`.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        for b in 0..nb {
            let blk = row.as_ptr().add(b * bb);
            let xb = x.as_ptr().add(256 * b);
            let sb = &s16[16 * b..16 * b + 16];
            let xload = |i: usize| _mm256_loadu_si256(xb.add(i).cast());
            let mut sum = _mm256_setzero_si256();
            let (s, m, d, dmin) = match q {
                QType::Q4_K | QType::Q5_K => {
                    let scales = std::slice::from_raw_parts(blk.add(4), 12);
                    let (qs, qh) = if q == QType::Q5_K {
                        (blk.add(48), Some(_mm256_loadu_si256(blk.add(16).cast())))
                    } else {
                        (blk.add(16), None)
                    };
                    let mut m = 0i32;
                    for c in 0..4 {
                        let raw = _mm256_loadu_si256(qs.add(32 * c).cast());
                        let mut lo = _mm256_and_si256(raw, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
                        if let Some(h) = qh {
                            let sixteen = _mm256_set1_epi8(16);
                            let bit = |j: usize| _mm256_set1_epi8((1u8 << j) as i8);
                            let top = |j: usize| {
                                let bj = bit(j);
                                _mm256_and_si256(
                                    _mm256_cmpeq_epi8(_mm256_and_si256(h, bj), bj),
                                    sixteen,
                                )
                            };
                            lo = _mm256_or_si256(lo, top(2 * c));
                            hi = _mm256_or_si256(hi, top(2 * c + 1));
                        }
                        let (sc0, m0) = scale_min_k4(2 * c, scales);
                        let (sc1, m1) = scale_min_k4(2 * c + 1, scales);
                        let p0 = _mm256_maddubs_epi16(lo, xload(64 * c));
                        let p1 = _mm256_maddubs_epi16(hi, xload(64 * c + 32));
                        sum = _mm256_add_epi32(
                            sum,
                            _mm256_madd_epi16(p0, _mm256_set1_epi16(i16::from(sc0))),
                        );
                        sum = _mm256_add_epi32(
                            sum,
                            _mm256_madd_epi16(p1, _mm256_set1_epi16(i16::from(sc1))),
                        );
                        m += i32::from(m0) * (sb[4 * c] + sb[4 * c + 1])
                            + i32::from(m1) * (sb[4 * c + 2] + sb[4 * c + 3]);
                    }
                    (hsum_i32(sum), m, f16_at(blk), f16_at(blk.add(2)))
                }
                _ => {
                    let sc = std::slice::from_raw_parts(blk.add(192).cast::<i8>(), 16);
                    let m3 = _mm256_set1_epi8(3);
                    for h in 0..2 {
                        let ql0 = _mm256_loadu_si256(blk.add(64 * h).cast());
                        let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                        let qhv = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                        let top = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m3));
                        let groups = [
                            _mm256_or_si256(_mm256_and_si256(ql0, m4), top(qhv)),
                            _mm256_or_si256(
                                _mm256_and_si256(ql1, m4),
                                top(_mm256_srli_epi16::<2>(qhv)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                                top(_mm256_srli_epi16::<4>(qhv)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                                top(_mm256_srli_epi16::<6>(qhv)),
                            ),
                        ];
                        for (k, g) in groups.into_iter().enumerate() {
                            let j = 8 * h + 2 * k;
                            let scv = _mm256_set_m128i(
                                _mm_set1_epi16(i16::from(sc[j + 1])),
                                _mm_set1_epi16(i16::from(sc[j])),
                            );
                            let p = _mm256_maddubs_epi16(g, xload(128 * h + 32 * k));
                            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, scv));
                        }
                    }
                    let off: i32 = (0..16).map(|j| i32::from(sc[j]) * sb[j]).sum();
                    (hsum_i32(sum) - 32 * off, 0, f16_at(blk.add(208)), 0.0)
                }
            };
            k_accumulate(&mut acc, b, d, dmin, *xd.get_unchecked(b), s, m);
        }
    }
    k_fold(&acc)
}
