//! AVX2 dot products on block-quantized weights, in the canonical order of [`crate::quant`]:
//! the integer parts are exact (8-bit products summed in 16 and 32 bits, all within range), and
//! the float accumulation follows the reference lane for lane, so results equal
//! [`crate::quant::dot_row_ref`] bit for bit.
//!
//! Each call computes one weight row against up to [`TN`] tokens, so a block's weights are
//! loaded and unpacked once for all of them. 16-bit pair sums cannot saturate:
//! `_mm256_maddubs_epi16` multiplies an unsigned weight (at most 128 after the sign trick, 63 for
//! K types) by an activation in [-127, 127].

use std::arch::x86_64::*;

use crate::kernels::{LANES, fold_lanes};
use crate::quant::{QActs, QType, k_accumulate, k_fold};

/// Most tokens one call handles.
pub(super) const TN: usize = 4;

/// f16 bits at `p` to f32 (F16C; exact, like `half`).
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller passes a pointer to two readable bytes and has F16C.
    unsafe {
        let bits = u16::from_le(p.cast::<u16>().read_unaligned());
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

/// `out[i] = dot(row, token t0 + i)` for `i < out.len()` (1..=[`TN`] tokens).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `row` holds whole blocks of `q` matching `acts.cols`,
/// and `t0 + out.len()` tokens exist in `acts`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_tile(q: QType, row: &[u8], acts: &QActs, t0: usize, out: &mut [f32]) {
    // SAFETY: the caller's guarantees are passed on; the VNNI variant runs only where detected.
    unsafe {
        if vnni() && matches!(q, QType::Q8_0 | QType::Q4_0) {
            dot_tile_vnni(q, row, acts, t0, out)
        } else {
            dot_tile_impl::<false>(q, row, acts, t0, out)
        }
    }
}

/// Whether the CPU has 256-bit VNNI (`vpdpbusd`): it replaces two instructions of the 8-bit
/// dot product and gives the same exact integers.
fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_tile_vnni(q: QType, row: &[u8], acts: &QActs, t0: usize, out: &mut [f32]) {
    // SAFETY: as `dot_tile`, and the CPU has AVX512-VNNI and AVX512-VL (checked by the caller).
    unsafe { dot_tile_impl::<true>(q, row, acts, t0, out) }
}

#[inline(always)]
unsafe fn dot_tile_impl<const VNNI: bool>(
    q: QType,
    row: &[u8],
    acts: &QActs,
    t0: usize,
    out: &mut [f32],
) {
    assert_eq!(Some(row.len()), q.row_bytes(acts.cols), "row size");
    assert!((1..=TN).contains(&out.len()), "token tile");
    assert!((t0 + out.len()) * acts.cols <= acts.q.len(), "token range");
    // SAFETY: the sizes were checked above; the kernels only read inside `row` and the tokens'
    // activations.
    unsafe {
        macro_rules! go {
            ($n:literal) => {
                match q {
                    QType::Q8_0 => tile32::<false, VNNI, $n>(row, acts, t0, out),
                    QType::Q4_0 => tile32::<true, VNNI, $n>(row, acts, t0, out),
                    QType::Q4_K => tile_k45::<false, $n>(row, acts, t0, out),
                    QType::Q5_K => tile_k45::<true, $n>(row, acts, t0, out),
                    QType::Q6_K => tile_q6k::<$n>(row, acts, t0, out),
                }
            };
        }
        match out.len() {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            _ => go!(4),
        }
    }
}

#[inline(always)]
unsafe fn tile32<const Q4: bool, const VNNI: bool, const N: usize>(
    row: &[u8],
    acts: &QActs,
    t0: usize,
    out: &mut [f32],
) {
    let bb = if Q4 { 18 } else { 34 };
    let nb = acts.cols / 32;
    // SAFETY: see `dot_tile`.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let xq = acts.q.as_ptr().add(t0 * acts.cols);
        let xd = acts.d.as_ptr().add(t0 * nb);
        // Accumulators: [token][block parity].
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        // A macro, not a closure: closures do not reliably inherit the target features, and a
        // non-inlined one would call every intrinsic out of line.
        macro_rules! step {
            ($b:expr, $parity:expr) => {{
                let b: usize = $b;
                let blk = row.as_ptr().add(b * bb);
                let w = if Q4 {
                    let raw = _mm_loadu_si128(blk.add(2).cast());
                    let lo = _mm_and_si128(raw, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m4);
                    _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight)
                } else {
                    _mm256_loadu_si256(blk.add(2).cast())
                };
                let aw = _mm256_sign_epi8(w, w);
                let dw = f16_at(blk);
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(xq.add(t * acts.cols + 32 * b).cast());
                    let sx = _mm256_sign_epi8(xv, w);
                    let p = if VNNI {
                        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx))
                    } else {
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones))
                    };
                    let s = _mm256_set1_ps(dw * *xd.add(t * nb + b));
                    a[$parity] = _mm256_fmadd_ps(s, p, a[$parity]);
                }
            }};
        }
        let mut b = 0;
        while b + 3 < nb {
            step!(b, 0);
            step!(b + 1, 1);
            step!(b + 2, 0);
            step!(b + 3, 1);
            b += 4;
        }
        while b < nb {
            step!(b, b % 2);
            b += 1;
        }
        for (t, a) in acc.iter().enumerate() {
            let mut lanes = [0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
            out[t] = fold_lanes(&lanes);
        }
    }
}

/// The 8 scales and 8 mins of a `Q4_K`/`Q5_K` block (12 packed bytes at `p`), as bytes.
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> (u64, u64) {
    // SAFETY: the caller passes 12 readable bytes.
    let (w0, w1, w2) = unsafe {
        (
            u32::from_le_bytes(*p.cast::<[u8; 4]>()),
            u32::from_le_bytes(*p.add(4).cast::<[u8; 4]>()),
            u32::from_le_bytes(*p.add(8).cast::<[u8; 4]>()),
        )
    };
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let sc_lo = w0 & LOW6;
    let m_lo = w1 & LOW6;
    let sc_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let m_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(m_lo) | (u64::from(m_hi) << 32),
    )
}

/// Byte-shuffle masks broadcasting the 16-bit element `j` of each 128-bit half.
#[inline(always)]
unsafe fn bcast16(j: usize) -> __m256i {
    let lo = (2 * j) as i8;
    // SAFETY: register-only (the caller has AVX2).
    unsafe { _mm256_set1_epi16(i16::from_le_bytes([lo as u8, (lo + 1) as u8])) }
}

#[inline(always)]
unsafe fn tile_k45<const Q5: bool, const N: usize>(
    row: &[u8],
    acts: &QActs,
    t0: usize,
    out: &mut [f32],
) {
    let bb = if Q5 { 176 } else { 144 };
    let nb = acts.cols / 256;
    let mut acc = [[0f32; 4]; N];
    // SAFETY: see `dot_tile`.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let sixteen = _mm256_set1_epi8(16);
        let xq = acts.q.as_ptr().add(t0 * acts.cols);
        let s16 = acts.sums16.as_ptr().add(t0 * acts.cols / 16);
        let xd = acts.d.as_ptr().add(t0 * nb);
        let masks = [
            bcast16(0),
            bcast16(1),
            bcast16(2),
            bcast16(3),
            bcast16(4),
            bcast16(5),
            bcast16(6),
            bcast16(7),
        ];
        for b in 0..nb {
            let blk = row.as_ptr().add(b * bb);
            let (sc, mn) = k4_scales_mins(blk.add(4));
            // Scales as 16-bit values, the same 8 in both halves.
            let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            // Mins, each twice, against the 16 sums of 16 activations.
            let mb = _mm_cvtsi64_si128(mn as i64);
            let mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mb, mb));
            let (qs, qh) = if Q5 {
                (blk.add(48), _mm256_loadu_si256(blk.add(16).cast()))
            } else {
                (blk.add(16), _mm256_setzero_si256())
            };
            let mut sums = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let raw = _mm256_loadu_si256(qs.add(32 * c).cast());
                let mut lo = _mm256_and_si256(raw, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
                if Q5 {
                    macro_rules! top {
                        ($j:expr) => {{
                            let bj = _mm256_set1_epi8((1u8 << $j) as i8);
                            _mm256_and_si256(
                                _mm256_cmpeq_epi8(_mm256_and_si256(qh, bj), bj),
                                sixteen,
                            )
                        }};
                    }
                    lo = _mm256_or_si256(lo, top!(2 * c));
                    hi = _mm256_or_si256(hi, top!(2 * c + 1));
                }
                let s_lo = _mm256_shuffle_epi8(sc16, masks[2 * c]);
                let s_hi = _mm256_shuffle_epi8(sc16, masks[2 * c + 1]);
                for (t, sum) in sums.iter_mut().enumerate() {
                    let x = xq.add(t * acts.cols + 256 * b + 64 * c);
                    let p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast()));
                    let p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32).cast()));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p0, s_lo));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p1, s_hi));
                }
            }
            let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
            for (t, sum) in sums.iter().enumerate() {
                let sv = _mm256_loadu_si256(s16.add(t * acts.cols / 16 + 16 * b).cast());
                let m = hsum_i32(_mm256_madd_epi16(mn16, sv));
                let s = hsum_i32(*sum);
                k_accumulate(&mut acc[t], b, d, dmin, *xd.add(t * nb + b), s, m);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = k_fold(a);
    }
}

#[inline(always)]
unsafe fn tile_q6k<const N: usize>(row: &[u8], acts: &QActs, t0: usize, out: &mut [f32]) {
    let nb = acts.cols / 256;
    let mut acc = [[0f32; 4]; N];
    // SAFETY: see `dot_tile`.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m3 = _mm256_set1_epi8(3);
        let xq = acts.q.as_ptr().add(t0 * acts.cols);
        let s16 = acts.sums16.as_ptr().add(t0 * acts.cols / 16);
        let xd = acts.d.as_ptr().add(t0 * nb);
        for b in 0..nb {
            let blk = row.as_ptr().add(b * 210);
            let sc8 = _mm_loadu_si128(blk.add(192).cast());
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            let mut sums = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(blk.add(64 * h).cast());
                let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                let qhv = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                macro_rules! top {
                    ($v:expr) => {
                        _mm256_slli_epi16::<4>(_mm256_and_si256($v, m3))
                    };
                }
                let groups = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), top!(qhv)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), top!(_mm256_srli_epi16::<2>(qhv))),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        top!(_mm256_srli_epi16::<4>(qhv)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        top!(_mm256_srli_epi16::<6>(qhv)),
                    ),
                ];
                for (k, g) in groups.into_iter().enumerate() {
                    let j = 8 * h + 2 * k;
                    // Scale j for the first 16 elements (low half), j + 1 for the next 16.
                    let sj = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(*blk.add(192 + j + 1) as i8)),
                        _mm_set1_epi16(i16::from(*blk.add(192 + j) as i8)),
                    );
                    for (t, sum) in sums.iter_mut().enumerate() {
                        let x = xq.add(t * acts.cols + 256 * b + 128 * h + 32 * k);
                        let p = _mm256_maddubs_epi16(g, _mm256_loadu_si256(x.cast()));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p, sj));
                    }
                }
            }
            let d = f16_at(blk.add(208));
            for (t, sum) in sums.iter().enumerate() {
                let sv = _mm256_loadu_si256(s16.add(t * acts.cols / 16 + 16 * b).cast());
                let off = hsum_i32(_mm256_madd_epi16(sc16, sv));
                let s = hsum_i32(*sum) - 32 * off;
                k_accumulate(&mut acc[t], b, d, 0.0, *xd.add(t * nb + b), s, 0);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = k_fold(a);
    }
}
