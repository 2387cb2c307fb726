//! AVX2 and AVX-512 kernels (x86-64), selected at run time.
//!
//! A micro-kernel computes an `R x T` tile of dot products (R weight rows, T tokens) with one
//! accumulator per (row, token) and lane group: each weight chunk is loaded (and converted) once
//! and used for T tokens, each activation chunk once for R rows. Every accumulator register sees
//! exactly the canonical chain of fused multiply-adds for its lanes, in increasing `k`; tails and
//! folding are the shared scalar code, so every tile shape gives the reference bits.

// The AVX-512 intrinsics and `target_feature(enable = "avx512f")` are stable since Rust 1.89,
// the workspace's declared `rust-version`.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{Elem, LANES, Span, fold_lanes, tail_fma};

/// AVX-512 tile: rows x tokens (16 + 4 + 1 of the 32 zmm registers).
pub(super) const R512: usize = 4;
/// See [`R512`].
pub(super) const T512: usize = 6;
/// AVX2 tile: rows x tokens (2 x 3 x 2 = 12 accumulators + 2 + 1 of the 16 ymm registers).
pub(super) const R256: usize = 2;
/// See [`R256`].
pub(super) const T256: usize = 3;

/// Loading weights as f32 vectors (exact conversions).
pub(crate) trait Load: Copy {
    /// Loads 16 elements from `p` as f32.
    ///
    /// # Safety
    /// `p..p + 16` must be readable and the CPU must have AVX-512F.
    unsafe fn load16(p: *const Self) -> __m512;

    /// Loads 8 elements from `p` as f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable and the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Load for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable floats at `p`; the load is unaligned.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable floats at `p`; the load is unaligned.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load for f16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable halves (32 bytes) at `p`; unaligned load.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        // vcvtph2ps is exact (every f16 is an f32).
        _mm512_cvtph_ps(h)
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable halves (16 bytes) at `p`; unaligned load.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(h)
    }
}

impl Load for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at `p`; unaligned load.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        // bf16 is the top half of an f32: widen and shift left 16 (exact).
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p`; unaligned load.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Software prefetch distance along each weight row, in bytes (hardware prefetchers alone leave
/// some bandwidth unused when several rows stream at once).
const PREFETCH: usize = 1024;

/// Row tiles ahead whose same columns the decode-sized tiles (up to 4 tokens) also prefetch into
/// L2, as the quantized tiles do: decode is bound by the reads in flight, more than the near
/// prefetch and the hardware keep. Benchmark model bf16 decode (synthetic weights), alternating
/// runs: 35-41 -> 51-54 tokens/s with the AVX-512 tile; the AVX2 tile does the same, unmeasured
/// here (this machine runs the AVX-512 one).
const PF_FAR: usize = 8;

/// Checks the slice sizes a tile of `rn x tn` needs (the kernels read through raw pointers) and
/// the span's chunk range; returns the end of the full chunks of 16 columns.
#[inline]
fn check_tile<W>(
    w: &[W],
    cols: usize,
    x: &[f32],
    rn: usize,
    tn: usize,
    span: &Span<'_>,
    res: &[f32],
) -> usize {
    assert!(
        w.len() >= rn * cols && x.len() >= tn * cols && res.len() >= rn * tn,
        "kernel tile out of bounds"
    );
    let n16 = cols - cols % LANES;
    if let Span::Part { k0, k1, state } = span {
        assert!(
            k0 % LANES == 0 && k0 <= k1 && *k1 <= n16 && state.len() >= rn * tn,
            "kernel span out of bounds"
        );
    }
    n16
}

/// Calls `$kern::<W, $r, tn>` for the runtime `tn` in the listed token counts.
macro_rules! by_tokens {
    ($kern:ident, $r:expr, $tn:expr, ($w:expr, $cols:expr, $x:expr, $span:expr, $res:expr), [$($t:literal),*]) => {
        match $tn {
            $(
                // SAFETY: the CPU features are guaranteed by the caller of the enclosing
                // function; the kernel checks its bounds.
                $t => unsafe { $kern::<W, $r, $t>($w, $cols, $x, $span, $res) },
            )*
            _ => unreachable!("tile has more tokens than the kernel supports"),
        }
    };
}

/// AVX-512 tile of `rn <= R512` rows and `tn <= T512` tokens (see [`super::tile`]).
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile512<W: Elem>(
    w: &[W],
    cols: usize,
    x: &[f32],
    rn: usize,
    tn: usize,
    span: Span<'_>,
    res: &mut [f32],
) {
    check_tile(w, cols, x, rn, tn, &span, res);
    assert!(rn <= R512 && tn <= T512);
    if rn == R512 {
        by_tokens!(
            kern512,
            R512,
            tn,
            (w, cols, x, span, res),
            [1, 2, 3, 4, 5, 6]
        );
        return;
    }
    let mut span = span;
    for r in 0..rn {
        let wr = &w[r * cols..(r + 1) * cols];
        let out = &mut res[r * tn..(r + 1) * tn];
        let sub = match &mut span {
            Span::Full => Span::Full,
            Span::Part { k0, k1, state } => Span::Part {
                k0: *k0,
                k1: *k1,
                state: &mut state[r * tn..(r + 1) * tn],
            },
        };
        by_tokens!(kern512, 1, tn, (wr, cols, x, sub, out), [1, 2, 3, 4, 5, 6]);
    }
}

/// Canonical dot product of two equally long f32 slices, AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dot512(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    // SAFETY: the features are guaranteed by the caller; the kernel checks the lengths.
    unsafe { kern512::<f32, 1, 1>(a, a.len(), b, Span::Full, &mut out) };
    out[0]
}

/// Canonical dot product of two equally long f32 slices, AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot256(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    // SAFETY: the features are guaranteed by the caller; the kernel checks the lengths.
    unsafe { kern256::<f32, 1, 1>(a, a.len(), b, Span::Full, &mut out) };
    out[0]
}

/// The AVX-512 micro-kernel: rows `w[r * cols..]`, tokens `x[t * cols..]`; results `res[r * T + t]`
/// for [`Span::Full`], lane sums `state[r * T + t]` for [`Span::Part`].
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C.
#[inline]
#[allow(clippy::needless_range_loop)] // acc[r][t] indexing mirrors the tile.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn kern512<W: Elem, const R: usize, const T: usize>(
    w: &[W],
    cols: usize,
    x: &[f32],
    mut span: Span<'_>,
    res: &mut [f32],
) {
    let n16 = check_tile(w, cols, x, R, T, &span, res);
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let (k0, k1) = match &span {
        Span::Full => (0, n16),
        Span::Part { k0, k1, state } => {
            for r in 0..R {
                for t in 0..T {
                    // SAFETY: `state` has at least R * T entries of 16 floats (checked).
                    acc[r][t] = unsafe { _mm512_loadu_ps(state[r * T + t].as_ptr()) };
                }
            }
            (*k0, *k1)
        }
    };
    let mut k = k0;
    while k < k1 {
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            let p = wp.wrapping_add(r * cols + k);
            // Prefetching any address is harmless; `wrapping_add` keeps the arithmetic defined.
            _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
            if T <= 4 {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PF_FAR * R * cols).cast::<i8>());
            }
            // SAFETY: `r * cols + k + 16 <= R * cols <= w.len()` since `k + 16 <= n16 <= cols`.
            *v = unsafe { W::load16(p) };
        }
        for t in 0..T {
            // SAFETY: `t * cols + k + 16 <= T * cols <= x.len()`, as above.
            let xv = unsafe { _mm512_loadu_ps(xp.add(t * cols + k)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        k += LANES;
    }
    if let Span::Part { state, .. } = &mut span {
        for r in 0..R {
            for t in 0..T {
                // SAFETY: as for the loads above.
                unsafe { _mm512_storeu_ps(state[r * T + t].as_mut_ptr(), acc[r][t]) };
            }
        }
        return;
    }
    for r in 0..R {
        for t in 0..T {
            if n16 == cols {
                res[r * T + t] = fold512(acc[r][t]);
                continue;
            }
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds 16 floats; the store is unaligned.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
            tail_fma(
                &mut lanes,
                &w[r * cols + n16..(r + 1) * cols],
                &x[t * cols + n16..(t + 1) * cols],
            );
            res[r * T + t] = fold_lanes(&lanes);
        }
    }
}

/// AVX2 tile of `rn <= R256` rows and `tn <= T256` tokens (see [`super::tile`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile256<W: Elem>(
    w: &[W],
    cols: usize,
    x: &[f32],
    rn: usize,
    tn: usize,
    span: Span<'_>,
    res: &mut [f32],
) {
    check_tile(w, cols, x, rn, tn, &span, res);
    assert!(rn <= R256 && tn <= T256);
    if rn == R256 {
        by_tokens!(kern256, R256, tn, (w, cols, x, span, res), [1, 2, 3]);
        return;
    }
    let mut span = span;
    for r in 0..rn {
        let wr = &w[r * cols..(r + 1) * cols];
        let out = &mut res[r * tn..(r + 1) * tn];
        let sub = match &mut span {
            Span::Full => Span::Full,
            Span::Part { k0, k1, state } => Span::Part {
                k0: *k0,
                k1: *k1,
                state: &mut state[r * tn..(r + 1) * tn],
            },
        };
        by_tokens!(kern256, 1, tn, (wr, cols, x, sub, out), [1, 2, 3]);
    }
}

/// The AVX2 micro-kernel: like [`kern512`] with lanes 0-7 in `acc[..][..][0]` and 8-15 in
/// `acc[..][..][1]`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[inline]
#[allow(clippy::needless_range_loop)] // acc[r][t][h] indexing mirrors the tile.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kern256<W: Elem, const R: usize, const T: usize>(
    w: &[W],
    cols: usize,
    x: &[f32],
    mut span: Span<'_>,
    res: &mut [f32],
) {
    let n16 = check_tile(w, cols, x, R, T, &span, res);
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut acc = [[[_mm256_setzero_ps(); 2]; T]; R];
    let (k0, k1) = match &span {
        Span::Full => (0, n16),
        Span::Part { k0, k1, state } => {
            for r in 0..R {
                for t in 0..T {
                    for h in 0..2 {
                        // SAFETY: `state` has at least R * T entries of 16 floats (checked).
                        acc[r][t][h] =
                            unsafe { _mm256_loadu_ps(state[r * T + t].as_ptr().add(8 * h)) };
                    }
                }
            }
            (*k0, *k1)
        }
    };
    let mut k = k0;
    while k < k1 {
        for h in 0..2 {
            let kh = k + 8 * h;
            let mut wv = [_mm256_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                let p = wp.wrapping_add(r * cols + kh);
                if h == 0 {
                    // Prefetching any address is harmless; `wrapping_add` keeps it defined.
                    _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
                    if T <= 4 {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PF_FAR * R * cols).cast::<i8>());
                    }
                }
                // SAFETY: `r * cols + kh + 8 <= R * cols <= w.len()` since `k + 16 <= cols`.
                *v = unsafe { W::load8(p) };
            }
            for t in 0..T {
                // SAFETY: `t * cols + kh + 8 <= T * cols <= x.len()`, as above.
                let xv = unsafe { _mm256_loadu_ps(xp.add(t * cols + kh)) };
                for r in 0..R {
                    acc[r][t][h] = _mm256_fmadd_ps(wv[r], xv, acc[r][t][h]);
                }
            }
        }
        k += LANES;
    }
    if let Span::Part { state, .. } = &mut span {
        for r in 0..R {
            for t in 0..T {
                for h in 0..2 {
                    // SAFETY: as for the loads above.
                    unsafe {
                        _mm256_storeu_ps(state[r * T + t].as_mut_ptr().add(8 * h), acc[r][t][h])
                    };
                }
            }
        }
        return;
    }
    for r in 0..R {
        for t in 0..T {
            if n16 == cols {
                res[r * T + t] = fold8(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
                continue;
            }
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds 16 floats: lanes 0-7 then 8-15; unaligned stores.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][t][0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][t][1]);
            }
            tail_fma(
                &mut lanes,
                &w[r * cols + n16..(r + 1) * cols],
                &x[t * cols + n16..(t + 1) * cols],
            );
            res[r * T + t] = fold_lanes(&lanes);
        }
    }
}

/// [`fold_lanes`] in registers: lanes `i + 8` onto `i`, then the 8 -> 1 steps of [`fold8`].
#[inline]
#[target_feature(enable = "avx512f,avx2")]
pub(crate) fn fold512(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    fold8(_mm256_add_ps(lo, hi))
}

/// The last three steps of [`fold_lanes`] on 8 lanes: `a[i] += a[i + 4]`, `a[i] += a[i + 2]`,
/// `a[0] += a[1]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn fold8(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
    _mm_cvtss_f32(s1)
}

/// `y += a * x` (fused), AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn axpy512(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let n16 = n - n % 16;
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i < n16 {
        // SAFETY: `i + 16 <= n <= x.len(), y.len()`; unaligned loads and store.
        unsafe {
            let xv = _mm512_loadu_ps(x.as_ptr().add(i));
            let yv = _mm512_loadu_ps(y.as_ptr().add(i));
            _mm512_storeu_ps(y.as_mut_ptr().add(i), _mm512_fmadd_ps(av, xv, yv));
        }
        i += 16;
    }
    super::scalar::axpy(a, &x[n16..n], &mut y[n16..n]);
}

/// `y += a * x` (fused), AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpy256(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let n8 = n - n % 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n8 {
        // SAFETY: `i + 8 <= n <= x.len(), y.len()`; unaligned loads and store.
        unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            let yv = _mm256_loadu_ps(y.as_ptr().add(i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(av, xv, yv));
        }
        i += 8;
    }
    super::scalar::axpy(a, &x[n8..n], &mut y[n8..n]);
}

/// The scalar `silu_mul` compiled for AVX-512 (LLVM may vectorise it; it never changes the
/// operations, which are all exactly rounded IEEE ones).
///
/// # Safety
/// The CPU must have AVX-512F and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn silu_mul512(gate: &mut [f32], up: &[f32]) {
    super::scalar::silu_mul(gate, up);
}

/// The scalar `silu_mul` compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul256(gate: &mut [f32], up: &[f32]) {
    super::scalar::silu_mul(gate, up);
}
