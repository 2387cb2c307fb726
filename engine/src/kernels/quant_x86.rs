//! AVX2 dot products on block-quantized weights, in the canonical order of [`crate::quant`]:
//! the integer parts are exact (8-bit products summed in 16 and 32 bits, all within range), and
//! the float accumulation follows the reference lane for lane, so results equal
//! [`crate::quant::dot_row_ref`] bit for bit.
//!
//! [`dot_tile`] (AVX2, with 256-bit `vpdpbusd` where available) computes one weight row against
//! up to [`TN`] tokens, so a block's weights are loaded and unpacked once for all of them. Where
//! AVX-512 F/BW/VNNI are detected, the [`Path::Avx512`](super::Path) driver uses
//! [`tile32_512`] and [`tile_k_512`] instead: tiles of up to [`R512`] rows x [`T512`] tokens in
//! 512-bit registers (a weight block is unpacked once per tile, each activation load serves four
//! rows), still in the canonical order. 16-bit pair sums cannot saturate:
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
                // The same place in the next row (the driver's next call), as the 512-bit
                // tiles do: decode streams rows from DRAM.
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(row.len()).cast());
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
            let pf = blk.wrapping_add(row.len());
            _mm_prefetch::<_MM_HINT_T0>(pf.cast());
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64).cast());
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(128).cast());
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
            let pf = blk.wrapping_add(row.len());
            for o in [0, 64, 128, 192] {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(o).cast());
            }
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

/// Whether the 512-bit kernels ([`tile32_512`]) can run: AVX-512 F and BW with VNNI.
pub(super) fn has_vnni512() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Most rows and tokens one [`tile32_512`] call handles.
pub(super) const R512: usize = 4;
/// Tiles ahead the row tiles prefetch into L2 as well (besides the next tile into L1): decode
/// is bound by how many reads are in flight, and on 2 MiB pages the far prefetch stays cheap
/// (benchmark model Q8_0 decode +8-12% in alternating runs against the next tile alone).
const PF_FAR: usize = 8;
/// See [`R512`].
pub(super) const T512: usize = 4;
/// Widest token tile of [`tile_k_512`] (which also takes 8): the K types' per-row work (scales,
/// unpacking) is shared by more tokens. 16 against 8: wide-narrow expert shapes at 32 tokens
/// 2048x256 Q4_K 345 -> 321 us, Q6_K 335 -> 315 us, 256x2048 within 1% (`quant_ab`).
pub(super) const TK512: usize = 16;

/// The totals of four vectors of 8 `i32` lanes, in lanes 0-3 (exact: integer additions).
#[inline(always)]
unsafe fn reduce4_256(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    // SAFETY: register-only AVX2 operations (the caller has AVX-512F, hence AVX2).
    unsafe {
        // Per 128-bit lane as in `reduce4`, then the two lanes added.
        let ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
        let s = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
    }
}

/// `res[r * tn + t] = dot(row r, token t0 + t)` for `rn` (1..=[`R512`]) rows starting at `w`
/// (`row_bytes` apart) and `tn` (1..=[`T512`]) tokens, for `Q8_0` or `Q4_0` weights.
///
/// One 512-bit register holds the canonical lanes of a block pair: lanes 0-7 are the 8 quads of
/// even block `b` and lanes 8-15 those of block `b + 1` (lane `8 * (b % 2) + j`), so a pair is one
/// `vpdpbusd`, one scale product and one fused multiply-add per (row, token), in exactly the
/// reference's order. The signed x signed 8-bit products go through `vpdpbusd`'s unsigned x
/// signed form exactly: `Q8_0` offsets the activations by 128 (`x ^ 0x80`) and starts the sum at
/// `-128 * sum(w)`; `Q4_0` keeps its unsigned nibbles and starts at `-8 * sum(x)`. Every integer
/// stays far inside `i32`.
///
/// # Safety
/// [`has_vnni512`] must hold; `w` holds `rn` rows of `row_bytes` (whole blocks of `q` matching
/// `acts.cols`), and tokens `t0..t0 + tn` exist in `acts`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile32_512(
    q: QType,
    w: &[u8],
    row_bytes: usize,
    rn: usize,
    acts: &QActs,
    t0: usize,
    tn: usize,
    res: &mut [f32],
) {
    assert!(
        matches!(q, QType::Q8_0 | QType::Q4_0),
        "32-element types only"
    );
    assert_eq!(Some(row_bytes), q.row_bytes(acts.cols), "row size");
    assert!(
        (1..=R512).contains(&rn) && (1..=T512).contains(&tn),
        "tile shape"
    );
    assert!(w.len() >= rn * row_bytes, "rows");
    assert!(res.len() >= rn * tn, "results");
    assert!((t0 + tn) * acts.cols <= acts.q.len(), "token range");
    // SAFETY: sizes checked above; the kernel reads only inside the rows and the tokens'
    // activations (the last odd block is read with 256-bit or masked loads).
    unsafe {
        macro_rules! go {
            ($r:literal, $t:literal) => {
                if q == QType::Q8_0 {
                    t32_512::<false, $r, $t>(w.as_ptr(), row_bytes, acts, t0, res)
                } else {
                    t32_512::<true, $r, $t>(w.as_ptr(), row_bytes, acts, t0, res)
                }
            };
        }
        macro_rules! rows {
            ($t:literal) => {
                match rn {
                    1 => go!(1, $t),
                    2 => go!(2, $t),
                    3 => go!(3, $t),
                    _ => go!(4, $t),
                }
            };
        }
        match tn {
            1 => rows!(1),
            2 => rows!(2),
            3 => rows!(3),
            _ => rows!(4),
        }
    }
}

#[inline(always)]
unsafe fn t32_512<const Q4: bool, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    acts: &QActs,
    t0: usize,
    res: &mut [f32],
) {
    let bb = if Q4 { 18 } else { 34 };
    let cols = acts.cols;
    let nb = cols / 32;
    // SAFETY: see `tile32_512`.
    unsafe {
        let zero = _mm512_setzero_si512();
        let bias = _mm512_set1_epi8(-128);
        let eights = _mm512_set1_epi8(8);
        let m4 = _mm256_set1_epi8(0x0F);
        // Lanes 0-7 take element 0 (the even block's scale), lanes 8-15 element 1.
        let pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let xq = acts.q.as_ptr().add(t0 * cols);
        let xd = acts.d.as_ptr().add(t0 * nb);
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        // One block pair (or, with `$single`, the last odd block in lanes 0-7).
        macro_rules! step {
            ($b:expr, $single:expr) => {{
                let b: usize = $b;
                let single: bool = $single;
                let xmask: __mmask64 = if single { 0xFFFF_FFFF } else { !0 };
                // Per token: activations (offset for Q8_0), their pair scales, Q4_0's start.
                let mut xv = [zero; N];
                let mut xs = [_mm512_setzero_ps(); N];
                let mut start = [zero; N];
                for t in 0..N {
                    let x = _mm512_maskz_loadu_epi8(xmask, xq.add(t * cols + 32 * b).cast());
                    xv[t] = if Q4 { x } else { _mm512_xor_si512(x, bias) };
                    xs[t] = if single {
                        _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(*xd.add(t * nb + b)))
                    } else {
                        let two = _mm_castpd_ps(_mm_load_sd(xd.add(t * nb + b).cast()));
                        _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(two))
                    };
                    if Q4 {
                        start[t] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, eights, x));
                    }
                }
                for r in 0..R {
                    let blk = w.add(r * row_bytes + b * bb);
                    // The same place in the next tile's rows (the driver's next call): decode
                    // streams rows from DRAM, and the hardware prefetchers restart at every page.
                    let pf = blk.wrapping_add(R * row_bytes);
                    _mm_prefetch::<_MM_HINT_T0>(pf.cast());
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64).cast());
                    let pf2 = blk.wrapping_add(PF_FAR * R * row_bytes);
                    _mm_prefetch::<_MM_HINT_T1>(pf2.cast());
                    _mm_prefetch::<_MM_HINT_T1>(pf2.wrapping_add(64).cast());
                    let h0 = blk.cast::<u16>().read_unaligned() as i16;
                    let h1 = if single {
                        0
                    } else {
                        blk.add(bb).cast::<u16>().read_unaligned() as i16
                    };
                    let dw =
                        _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(h1), _mm_set1_epi16(h0)));
                    let wv = if Q4 {
                        let r0 = _mm_loadu_si128(blk.add(2).cast());
                        let r1 = if single {
                            _mm_setzero_si128()
                        } else {
                            _mm_loadu_si128(blk.add(bb + 2).cast())
                        };
                        let y = _mm256_set_m128i(r1, r0);
                        let lo = _mm256_and_si256(y, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(y), m4);
                        // [lo0 lo1 hi0 hi1] -> [lo0 hi0 lo1 hi1] (128-bit lanes): block order.
                        let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                        _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z)
                    } else {
                        let lo = _mm256_loadu_si256(blk.add(2).cast());
                        let hi = if single {
                            _mm256_setzero_si256()
                        } else {
                            _mm256_loadu_si256(blk.add(bb + 2).cast())
                        };
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                    };
                    let wstart = if Q4 {
                        zero
                    } else {
                        _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv))
                    };
                    for t in 0..N {
                        let p = if Q4 {
                            _mm512_dpbusd_epi32(start[t], wv, xv[t])
                        } else {
                            _mm512_dpbusd_epi32(wstart, xv[t], wv)
                        };
                        let s = _mm512_mul_ps(dw, xs[t]);
                        let p = _mm512_cvtepi32_ps(p);
                        acc[r][t] = if single {
                            _mm512_mask3_fmadd_ps(s, p, acc[r][t], 0x00FF)
                        } else {
                            _mm512_fmadd_ps(s, p, acc[r][t])
                        };
                    }
                }
            }};
        }
        let mut b = 0;
        while b + 1 < nb {
            step!(b, false);
            b += 2;
        }
        if b < nb {
            step!(b, true);
        }
        for (r, accr) in acc.iter().enumerate() {
            for (t, a) in accr.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
                res[r * N + t] = fold_lanes(&lanes);
            }
        }
    }
}

/// The totals of four vectors of 16 `i32` lanes, in lanes 0-3 (exact: integer additions).
#[inline(always)]
unsafe fn reduce4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
    // SAFETY: register-only AVX-512F operations (the caller has AVX-512F).
    unsafe {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partial sums.
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        let s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        // Across the four 128-bit lanes.
        let s = _mm512_add_epi32(s, _mm512_shuffle_i32x4::<0b01_00_11_10>(s, s));
        let s = _mm512_add_epi32(s, _mm512_shuffle_i32x4::<0b10_11_00_01>(s, s));
        _mm512_castsi512_si128(s)
    }
}

/// The totals of sixteen vectors of 16 `i32` lanes, total `t` in lane `t` (exact: integer
/// additions): the transposing tree of [`reduce4`], two levels further across the 128-bit lanes.
#[inline(always)]
unsafe fn reduce16(v: &[__m512i; 16]) -> __m512i {
    // SAFETY: register-only AVX-512F operations (the caller has AVX-512F).
    unsafe {
        macro_rules! pair {
            ($x:expr, $y:expr) => {
                _mm512_add_epi32(_mm512_unpacklo_epi32($x, $y), _mm512_unpackhi_epi32($x, $y))
            };
        }
        // Per 128-bit lane, that lane's parts of totals 4m..4m + 4.
        macro_rules! quad {
            ($m:literal) => {{
                let a = pair!(v[4 * $m], v[4 * $m + 1]);
                let b = pair!(v[4 * $m + 2], v[4 * $m + 3]);
                _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
            }};
        }
        // [x lanes 0+2, x lanes 1+3, y lanes 0+2, y lanes 1+3].
        macro_rules! half {
            ($x:expr, $y:expr) => {
                _mm512_add_epi32(
                    _mm512_shuffle_i32x4::<0b01_00_01_00>($x, $y),
                    _mm512_shuffle_i32x4::<0b11_10_11_10>($x, $y),
                )
            };
        }
        let d01 = half!(quad!(0), quad!(1));
        let d23 = half!(quad!(2), quad!(3));
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(d01, d23),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(d01, d23),
        )
    }
}

/// `res[r * tn + t] = dot(row r, token t0 + t)` for `rn` (1..=[`R512`]) rows starting at `w`
/// (`row_bytes` apart) and `tn` (1..=[`T512`], 8 or [`TK512`]) tokens, for the K types (`Q4_K`,
/// `Q5_K`, `Q6_K`).
///
/// Per 256-block and (row, token) the exact integers `S` and `M` of the reference are built in
/// 512-bit registers (64 elements per two `vpdpbusd`, halves packed, one `vpdpwssd` with the
/// sub-block scales; for
/// `Q6_K` the `-32` offset folded in as `-32 * sum(sc * sums16)`), reduced four (row, token) pairs
/// at a time, and the two fused multiply-adds of [`k_accumulate`] run on four pairs at once
/// with 128-bit float vectors, lane `b % 4` kept apart as in the reference, then folded as in
/// [`k_fold`]. So the result equals [`crate::quant::dot_row_ref`] bit for bit.
///
/// # Safety
/// [`has_vnni512`] must hold; `w` holds `rn` rows of `row_bytes` (whole blocks of `q` matching
/// `acts.cols`), and tokens `t0..t0 + tn` exist in `acts` (with their 16-sums).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_k_512(
    q: QType,
    w: &[u8],
    row_bytes: usize,
    rn: usize,
    acts: &QActs,
    t0: usize,
    tn: usize,
    res: &mut [f32],
) {
    assert!(q.is_k(), "K types only");
    assert_eq!(Some(row_bytes), q.row_bytes(acts.cols), "row size");
    assert!(
        (1..=R512).contains(&rn) && (tn <= T512 || tn == 8 || tn == TK512) && tn > 0,
        "tile shape"
    );
    assert!(w.len() >= rn * row_bytes, "rows");
    assert!(res.len() >= rn * tn, "results");
    assert!((t0 + tn) * acts.cols <= acts.q.len(), "token range");
    assert!(
        (t0 + tn) * acts.cols / 16 <= acts.sums16.len(),
        "token sums"
    );
    // SAFETY: sizes checked above; the kernel reads only inside the rows and the tokens'
    // activations and sums.
    unsafe {
        macro_rules! go {
            ($r:literal, $t:literal) => {
                match q {
                    QType::Q4_K => tk_512::<0, $r, $t>(w.as_ptr(), row_bytes, acts, t0, res),
                    QType::Q5_K => tk_512::<1, $r, $t>(w.as_ptr(), row_bytes, acts, t0, res),
                    _ => tk_512::<2, $r, $t>(w.as_ptr(), row_bytes, acts, t0, res),
                }
            };
        }
        macro_rules! rows {
            ($t:literal) => {
                match rn {
                    1 => go!(1, $t),
                    2 => go!(2, $t),
                    3 => go!(3, $t),
                    _ => go!(4, $t),
                }
            };
        }
        match tn {
            1 => rows!(1),
            2 => rows!(2),
            3 => rows!(3),
            4 => rows!(4),
            8 => rows!(8),
            _ => rows!(16),
        }
    }
}

/// `K`: 0 = `Q4_K`, 1 = `Q5_K`, 2 = `Q6_K`.
#[inline(always)]
// (row, token) indices address several arrays at once.
#[allow(clippy::needless_range_loop)]
unsafe fn tk_512<const K: u8, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    acts: &QActs,
    t0: usize,
    res: &mut [f32],
) {
    let bb = match K {
        0 => 144,
        1 => 176,
        _ => 210,
    };
    let cols = acts.cols;
    let nb = cols / 256;
    // (row, token) pairs in groups of four: pair p = r * N + t.
    let groups = (R * N).div_ceil(4);
    // SAFETY: see `tile_k_512`.
    unsafe {
        let zero = _mm512_setzero_si512();
        let m4 = _mm512_set1_epi8(0x0F);
        let xq = acts.q.as_ptr().add(t0 * cols);
        let s16p = acts.sums16.as_ptr().add(t0 * cols / 16);
        let xd = acts.d.as_ptr().add(t0 * nb);
        // i16 lane -> scale index: Q4_K/Q5_K chunk c takes scales 2c, 2c + 1 (one per 256-bit
        // half); Q6_K register v takes sub-blocks 4v..4v + 4 (8 lanes each).
        //
        // The products run as `vpdpbusd` (four byte products per 32-bit lane, at most
        // 4 * 63 * 127 in size, so each lane fits 16 bits), two chunks' lanes packed into one
        // register of 16-bit lanes (`vpackssdw`: no saturation can occur), then one `vpdpwssd`
        // with the sub-block scales: the same exact integer `S` as a `vpmaddubsw` per chunk.
        // After the pack of chunks `c` (first) and `c'` (second), 128-bit lane `l` holds four
        // lanes of each: 16-bit element `e` of lane `l` comes from chunk `c` when `e % 8 < 4`.
        // Q4_K/Q5_K chunk `c` holds sub-block `2c` in its low 256 bits and `2c + 1` in its high
        // ones; Q6_K chunk `c` holds sub-block `4c + l` in 128-bit lane `l`.
        let mut idx45 = [zero; 2];
        let mut idx6 = [zero; 2];
        for h in 0..2 {
            let mut a = [0i16; 32];
            let mut b6 = [0i16; 32];
            for (i, (a, b6)) in a.iter_mut().zip(b6.iter_mut()).enumerate() {
                let (l, e) = (i / 8, i % 8);
                let chunk = 2 * h + usize::from(e >= 4);
                *a = (2 * chunk + usize::from(l >= 2)) as i16;
                *b6 = (4 * chunk + l) as i16;
            }
            idx45[h] = _mm512_loadu_si512(a.as_ptr().cast());
            idx6[h] = _mm512_loadu_si512(b6.as_ptr().cast());
        }
        let m30 = _mm512_set1_epi8(0x30);
        // Q6_K high bits: shift counts per 256-bit half.
        let shl_a = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
        let shr_b = _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(2));
        // Float lanes: acc[g][b % 4], lane i of group g = pair 4g + i.
        let mut acc = [[_mm_setzero_ps(); 4]; R512 * 8 / 4];
        // N = 16: acc16[r][b % 4], lane t = pair (r, t).
        let mut acc16 = [[_mm512_setzero_ps(); 4]; R];
        for b in 0..nb {
            // With whole groups of four tokens (N = 4 or 8), a group is one row and four
            // consecutive tokens: each row's sums are reduced and accumulated as soon as they
            // are complete, straight from registers; the tokens' activation scales are loaded
            // once per block here, and the row's scales broadcast (the same lane values as the
            // general gathers below). Otherwise (N < 4) groups span rows, and the sums wait in
            // `s` until the block's rows are done.
            let whole = N.is_multiple_of(4);
            let mut dxq = [_mm_setzero_ps(); TK512 / 4];
            if whole {
                for (q4, v) in dxq.iter_mut().enumerate().take(N / 4) {
                    *v = _mm_setr_ps(
                        *xd.add(4 * q4 * nb + b),
                        *xd.add((4 * q4 + 1) * nb + b),
                        *xd.add((4 * q4 + 2) * nb + b),
                        *xd.add((4 * q4 + 3) * nb + b),
                    );
                }
            }
            // The sixteen tokens' scales in one register (N = 16).
            let dx16 = if N == 16 {
                let v = _mm512_castps128_ps512(dxq[0]);
                let v = _mm512_insertf32x4::<1>(v, dxq[1]);
                let v = _mm512_insertf32x4::<2>(v, dxq[2]);
                _mm512_insertf32x4::<3>(v, dxq[3])
            } else {
                _mm512_setzero_ps()
            };
            // Q4_K/Q5_K with whole groups: the 32-sums `X_j = sums16[2j] + sums16[2j + 1]` of
            // tokens `4k..4k + 4` as 16-bit lanes (at most 32 * 128 in size), in the order the
            // pack leaves them: 128-bit lane `l` holds `X_{4(l % 2)..}` of tokens `4k + l / 2`
            // (first four lanes) and `4k + 2 + l / 2` (last four). One `vpmaddwd` with a row's
            // minimums in the same order then gives every (row, token) pair's `M` in four lanes.
            let mut xm = [zero; TK512 / 4];
            if whole && K != 2 {
                let ones = _mm512_set1_epi16(1);
                // (Macros, not closures: a closure does not inherit the target features, and
                // one that is not inlined passes vectors through memory.)
                macro_rules! s16 {
                    ($t:expr) => {
                        _mm256_loadu_si256(s16p.add($t * cols / 16 + 16 * b).cast())
                    };
                }
                macro_rules! pair {
                    ($t:expr) => {
                        _mm512_madd_epi16(
                            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(s16!($t)), s16!($t + 1)),
                            ones,
                        )
                    };
                }
                for (k, v) in xm.iter_mut().enumerate().take(N / 4) {
                    *v = _mm512_packs_epi32(pair!(4 * k), pair!(4 * k + 2));
                }
            }
            let mut s = [[zero; N]; R];
            // Each row's minimums as 16-bit lanes (Q4_K/Q5_K); their products with the tokens'
            // sums are formed where they are reduced, so they never occupy registers across
            // the row loop.
            let mut mn16r = [_mm256_setzero_si256(); R];
            let mut dr = [0f32; R];
            let mut dmr = [0f32; R];
            for r in 0..R {
                // This row's sums, in registers while its block is consumed (an array indexed by
                // the row would live in memory: a load and a store per update).
                let mut sr = [zero; N];
                let blk = w.add(r * row_bytes + b * bb);
                // As in `t32_512`: the same block of the next tile's rows.
                let pf = blk.wrapping_add(R * row_bytes);
                let pf2 = blk.wrapping_add(PF_FAR * R * row_bytes);
                let mut o = 0;
                while o < bb {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(o).cast());
                    // Decode-sized tiles only: wide prefill tiles compute long enough per row.
                    if N <= T512 {
                        _mm_prefetch::<_MM_HINT_T1>(pf2.wrapping_add(o).cast());
                    }
                    o += 64;
                }
                // The row's eight 6-bit minimums, one byte each (Q4_K/Q5_K).
                let mut mn_raw = 0u64;
                if K == 2 {
                    dr[r] = f16_at(blk.add(208));
                    let sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                        blk.add(192).cast(),
                    )));
                    for h in 0..2 {
                        let ql = _mm512_loadu_si512(blk.add(64 * h).cast());
                        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                            blk.add(128 + 32 * h).cast(),
                        ));
                        let va = _mm512_or_si512(
                            _mm512_and_si512(ql, m4),
                            _mm512_and_si512(_mm512_sllv_epi16(qh, shl_a), m30),
                        );
                        let vb = _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                            _mm512_and_si512(_mm512_srlv_epi16(qh, shr_b), m30),
                        );
                        let scv = _mm512_permutexvar_epi16(idx6[h], sc16);
                        for t in 0..N {
                            let x = xq.add(t * cols + 256 * b + 128 * h);
                            let pa = _mm512_dpbusd_epi32(zero, va, _mm512_loadu_si512(x.cast()));
                            let pb =
                                _mm512_dpbusd_epi32(zero, vb, _mm512_loadu_si512(x.add(64).cast()));
                            let p = _mm512_packs_epi32(pa, pb);
                            sr[t] = _mm512_dpwssd_epi32(sr[t], p, scv);
                        }
                    }
                    // The -32 offset: S -= 32 * sum_j sc_j * sums16_j (exact).
                    for t in 0..N {
                        let sv = _mm256_loadu_si256(s16p.add(t * cols / 16 + 16 * b).cast());
                        let off = _mm256_madd_epi16(_mm512_castsi512_si256(sc16), sv);
                        let off = _mm512_slli_epi32::<5>(_mm512_zextsi256_si512(off));
                        sr[t] = _mm512_sub_epi32(sr[t], off);
                    }
                } else {
                    dr[r] = f16_at(blk);
                    dmr[r] = f16_at(blk.add(2));
                    let (sc, mn) = k4_scales_mins(blk.add(4));
                    mn_raw = mn;
                    let sc16 =
                        _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                    let mb = _mm_cvtsi64_si128(mn as i64);
                    let mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mb, mb));
                    let qs = blk.add(if K == 1 { 48 } else { 16 });
                    let qh = if K == 1 {
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(16).cast()))
                    } else {
                        zero
                    };
                    for c2 in 0..2 {
                        let raw = _mm512_loadu_si512(qs.add(64 * c2).cast());
                        let lo = _mm512_and_si512(raw, m4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
                        // [lo_c | hi_c] and [lo_c+1 | hi_c+1] (256-bit halves).
                        let ws = [
                            _mm512_shuffle_i64x2::<0b01_00_01_00>(lo, hi),
                            _mm512_shuffle_i64x2::<0b11_10_11_10>(lo, hi),
                        ];
                        let mut ws = ws;
                        if K == 1 {
                            for (k, v) in ws.iter_mut().enumerate() {
                                let c = 2 * c2 + k;
                                // Fifth bits: bit 2c of qh for the low half, 2c + 1 for the high.
                                let sel = _mm512_inserti64x4::<1>(
                                    _mm512_set1_epi8((1u8 << (2 * c)) as i8),
                                    _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8),
                                );
                                let top = _mm512_test_epi8_mask(qh, sel);
                                *v = _mm512_mask_add_epi8(*v, top, *v, _mm512_set1_epi8(16));
                            }
                        }
                        let scv = _mm512_permutexvar_epi16(idx45[c2], sc16);
                        for t in 0..N {
                            let x = xq.add(t * cols + 256 * b + 128 * c2);
                            let pa = _mm512_dpbusd_epi32(zero, ws[0], _mm512_loadu_si512(x.cast()));
                            let pb = _mm512_dpbusd_epi32(
                                zero,
                                ws[1],
                                _mm512_loadu_si512(x.add(64).cast()),
                            );
                            let p = _mm512_packs_epi32(pa, pb);
                            sr[t] = _mm512_dpwssd_epi32(sr[t], p, scv);
                        }
                    }
                    mn16r[r] = mn16;
                }
                if whole {
                    // Groups `N / 4 * r + k`: this row and tokens `4k..4k + 4`, in the order
                    // of the general loop below.
                    let dv = _mm_set1_ps(dr[r]);
                    let mv4 = _mm_set1_ps(dmr[r]);
                    // The row's minimums in the order of `xm`: [m0-3, m0-3] in even 128-bit
                    // lanes, [m4-7, m4-7] in odd ones.
                    let mz = if K == 2 {
                        zero
                    } else {
                        let m8 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn_raw as i64));
                        let lh = _mm256_set_m128i(
                            _mm_unpackhi_epi64(m8, m8),
                            _mm_unpacklo_epi64(m8, m8),
                        );
                        _mm512_broadcast_i64x4(lh)
                    };
                    if N == 16 {
                        // All sixteen tokens of the row at once: lane `t` of one register per
                        // value, the same per-lane operations as the groups below.
                        let st = reduce16(sr[..16].try_into().unwrap_unchecked());
                        let mt = if K == 2 {
                            zero
                        } else {
                            macro_rules! m {
                                ($k:literal) => {{
                                    let v = _mm512_madd_epi16(xm[$k], mz);
                                    let v = _mm512_add_epi32(
                                        v,
                                        _mm512_shuffle_epi32::<_MM_PERM_CDAB>(v),
                                    );
                                    let v = _mm512_add_epi32(
                                        v,
                                        _mm512_shuffle_i32x4::<0b10_11_00_01>(v, v),
                                    );
                                    let pick = _mm512_castsi128_si512(_mm_setr_epi32(0, 8, 2, 10));
                                    _mm512_castsi512_si128(_mm512_permutexvar_epi32(pick, v))
                                }};
                            }
                            let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(m!(0)), m!(1));
                            let v = _mm512_inserti32x4::<2>(v, m!(2));
                            _mm512_inserti32x4::<3>(v, m!(3))
                        };
                        let ds = _mm512_mul_ps(_mm512_set1_ps(dr[r]), dx16);
                        let dm = _mm512_castsi512_ps(_mm512_xor_si512(
                            _mm512_castps_si512(_mm512_mul_ps(_mm512_set1_ps(dmr[r]), dx16)),
                            _mm512_set1_epi32(i32::MIN),
                        ));
                        let a = &mut acc16[r][b % 4];
                        *a = _mm512_fmadd_ps(ds, _mm512_cvtepi32_ps(st), *a);
                        *a = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(mt), *a);
                        continue;
                    }
                    for k in 0..N / 4 {
                        let st = reduce4(sr[4 * k], sr[4 * k + 1], sr[4 * k + 2], sr[4 * k + 3]);
                        let dx = dxq[k];
                        let ds = _mm_mul_ps(dv, dx);
                        let dm = _mm_xor_ps(_mm_mul_ps(mv4, dx), _mm_set1_ps(-0.0));
                        let a = &mut acc[N / 4 * r + k][b % 4];
                        *a = _mm_fmadd_ps(ds, _mm_cvtepi32_ps(st), *a);
                        let mt = if K == 2 {
                            _mm_setzero_si128()
                        } else {
                            // Lanes [t0, t0, t2, t2] of 128-bit lane 0 and [t1, t1, t3, t3] of
                            // lane 2 after the two sums (pairs, then lanes 0 + 1 and 2 + 3).
                            let v = _mm512_madd_epi16(xm[k], mz);
                            let v = _mm512_add_epi32(v, _mm512_shuffle_epi32::<_MM_PERM_CDAB>(v));
                            let v =
                                _mm512_add_epi32(v, _mm512_shuffle_i32x4::<0b10_11_00_01>(v, v));
                            let pick = _mm512_castsi128_si512(_mm_setr_epi32(0, 8, 2, 10));
                            _mm512_castsi512_si128(_mm512_permutexvar_epi32(pick, v))
                        };
                        *a = _mm_fmadd_ps(dm, _mm_cvtepi32_ps(mt), *a);
                    }
                } else {
                    s[r] = sr;
                }
            }
            if whole {
                continue;
            }
            // Reduce and accumulate four pairs at a time.
            for g in 0..groups {
                macro_rules! pick {
                    ($v:expr, $i:expr) => {{
                        let p = 4 * g + $i;
                        if p < R * N { $v[p / N][p % N] } else { zero }
                    }};
                }
                let st = reduce4(pick!(s, 0), pick!(s, 1), pick!(s, 2), pick!(s, 3));
                // Pair i's row scale and token scale (padding pairs repeat the last pair).
                let pr = |i: usize| (4 * g + i).min(R * N - 1);
                let (p0, p1, p2, p3) = (pr(0), pr(1), pr(2), pr(3));
                let dx = _mm_setr_ps(
                    *xd.add((p0 % N) * nb + b),
                    *xd.add((p1 % N) * nb + b),
                    *xd.add((p2 % N) * nb + b),
                    *xd.add((p3 % N) * nb + b),
                );
                let dv = _mm_setr_ps(dr[p0 / N], dr[p1 / N], dr[p2 / N], dr[p3 / N]);
                let mv4 = _mm_setr_ps(dmr[p0 / N], dmr[p1 / N], dmr[p2 / N], dmr[p3 / N]);
                let ds = _mm_mul_ps(dv, dx);
                let dm = _mm_xor_ps(_mm_mul_ps(mv4, dx), _mm_set1_ps(-0.0));
                let a = &mut acc[g][b % 4];
                *a = _mm_fmadd_ps(ds, _mm_cvtepi32_ps(st), *a);
                let mt = if K == 2 {
                    _mm_setzero_si128()
                } else {
                    let m = |i: usize| {
                        let p = 4 * g + i;
                        if p < R * N {
                            let t = p % N;
                            let sv = _mm256_loadu_si256(s16p.add(t * cols / 16 + 16 * b).cast());
                            _mm256_madd_epi16(mn16r[p / N], sv)
                        } else {
                            _mm256_setzero_si256()
                        }
                    };
                    reduce4_256(m(0), m(1), m(2), m(3))
                };
                *a = _mm_fmadd_ps(dm, _mm_cvtepi32_ps(mt), *a);
            }
        }
        if N == 16 {
            for (r, a) in acc16.iter().enumerate() {
                let f = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
                _mm512_storeu_ps(res.as_mut_ptr().add(r * N), f);
            }
            return;
        }
        for g in 0..groups {
            let a = &acc[g];
            let f = _mm_add_ps(_mm_add_ps(a[0], a[2]), _mm_add_ps(a[1], a[3]));
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), f);
            for (i, v) in lanes.iter().enumerate() {
                let p = 4 * g + i;
                if p < R * N {
                    res[p] = *v;
                }
            }
        }
    }
}

/// Quantizes one block of activations (a multiple of 16 values) to 8 bits exactly as the scalar
/// code of [`QActs::new`] does (`amax` ignoring NaNs, `round_to_i8(v * 127 / amax)`), 16 lanes at
/// a time; returns `amax`.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `qb.len() == xb.len()`, a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_block_512(xb: &[f32], qb: &mut [i8]) -> f32 {
    assert!(
        xb.len() == qb.len() && xb.len().is_multiple_of(16),
        "block size"
    );
    // SAFETY: every load and store is inside `xb` / `qb` (16 lanes at offsets < len).
    unsafe {
        let absmask = _mm512_set1_epi32(0x7FFF_FFFF);
        let mut m = _mm512_setzero_ps();
        for i in (0..xb.len()).step_by(16) {
            let v = _mm512_loadu_ps(xb.as_ptr().add(i));
            let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), absmask));
            // `vmaxps` returns its second operand when either is NaN: NaN lanes keep `m`, like
            // `f32::max` in the scalar fold (and max is exact, so the order does not matter).
            m = _mm512_max_ps(a, m);
        }
        let amax = _mm512_reduce_max_ps(m);
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        let (lim, half) = (_mm512_set1_ps(200.0), _mm512_set1_ps(0.5));
        let one = _mm512_set1_ps(1.0);
        for i in (0..xb.len()).step_by(16) {
            let p = _mm512_mul_ps(_mm512_loadu_ps(xb.as_ptr().add(i)), idv);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(p, p);
            // Beyond +-200 every value saturates to the same i8 (as `as i8` does); NaN -> 0.
            let p = _mm512_max_ps(
                _mm512_min_ps(p, lim),
                _mm512_sub_ps(_mm512_setzero_ps(), lim),
            );
            let t = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(p));
            let f = _mm512_sub_ps(p, t);
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half);
            let down =
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_sub_ps(_mm512_setzero_ps(), half));
            let r = _mm512_mask_add_ps(t, up, t, one);
            let r = _mm512_mask_sub_ps(r, down, r, one);
            let q = _mm512_maskz_mov_epi32(!nan, _mm512_cvtps_epi32(r));
            _mm_storeu_si128(qb.as_mut_ptr().add(i).cast(), _mm512_cvtsepi32_epi8(q));
        }
        amax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_activation_quantizer_equals_scalar() {
        let ok = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw");
        if !ok {
            eprintln!("no AVX-512 BW here: the SIMD quantizer is not used on this machine");
            return;
        }
        let specials = [
            0.0f32,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-45,
            f32::MAX,
            -f32::MAX,
            0.5,
            -0.5,
        ];
        let mut s = 12345u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for case in 0..400 {
            let mut xb: Vec<f32> = (0..32)
                .map(|_| (next() as i32 as f32) / 2f32.powi((next() % 40) as i32))
                .collect();
            // Some blocks with special values, some with exact halves after scaling.
            if case % 3 == 0 {
                let i = (next() % 32) as usize;
                xb[i] = specials[(next() as usize) % specials.len()];
            }
            if case % 5 == 0 {
                for (k, v) in xb.iter_mut().enumerate() {
                    *v = (k as f32 - 16.0) * 0.5;
                }
            }
            if case == 7 {
                xb.iter_mut().for_each(|v| *v = 0.0);
            }
            if case == 11 {
                // A subnormal amax: the inverse scale is infinite (0 * inf is NaN).
                xb.iter_mut().for_each(|v| *v = 1e-40);
                xb[3] = 0.0;
                xb[4] = -1e-41;
            }
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let want: Vec<i8> = xb
                .iter()
                .map(|v| crate::quant::round_to_i8(v * id))
                .collect();
            let mut got = vec![0i8; 32];
            // SAFETY: AVX-512 F/BW checked above; equal lengths, a multiple of 16.
            let gm = unsafe { quantize_block_512(&xb, &mut got) };
            assert_eq!(gm.to_bits(), amax.to_bits(), "amax of {xb:?}");
            assert_eq!(got, want, "{xb:?}");
        }
    }
}
