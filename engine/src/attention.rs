//! Causal softmax attention over a key/value cache, computed in tiles with exactly the arithmetic
//! of the plain per-(row, head) formulation (transformers' eager attention, in our kernels' order).
//!
//! For one query row and head the plain formulation is: `s_j = kernels::dot(q, k_j) * scale` for
//! each visible key `j` in increasing order, the sink logit (if any) after them,
//! [`softmax_inplace`], then `out = 0` and `out = p_j * v_j + out` (fused) for each `j` in
//! increasing order. This module computes the very same operations for every (row, head), only
//! grouped so loads are shared:
//! - the query heads of one key/value group and several consecutive rows of a sequence form one
//!   tile of queries; each key chunk is loaded once per tile (register tiles of keys x queries,
//!   each accumulator holding the canonical 16 lanes of one dot product, folded in the canonical
//!   order), and each value chunk once per tile of queries x output columns;
//! - a causal tile's rows see slightly different key ranges: the scores of the whole range are
//!   computed (the extra ones are never used) and each query's value sum runs over its own range
//!   only, in increasing `j`, so its chain of fused multiply-adds is exactly the plain one;
//! - there is no per-call path dispatch in the inner loops, score buffers are reused, and the
//!   parallel split is over (sequence, row tile) or, for single rows, (row, key/value head).
//!
//! The portable path calls [`kernels::dot_with`] and [`kernels::axpy_with`] on the chosen path, so
//! it is the plain formulation itself; the AVX2 and AVX-512 paths are tested against it bit for
//! bit.

use rayon::prelude::*;

use crate::kernels::{self, Path};
use crate::layers::softmax_inplace;

/// `n` rows of `len` floats, row `j` at `data[j * stride..]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided<'a> {
    data: &'a [f32],
    stride: usize,
    len: usize,
    n: usize,
}

impl<'a> Strided<'a> {
    /// Rows `data[j * stride..j * stride + len]` for `j < n`.
    ///
    /// # Panics
    /// When `data` is too short for them (a caller bug).
    pub(crate) fn new(data: &'a [f32], stride: usize, len: usize, n: usize) -> Self {
        assert!(
            n == 0 || (n - 1) * stride + len <= data.len(),
            "strided rows out of bounds"
        );
        Strided {
            data,
            stride,
            len,
            n,
        }
    }

    fn row(&self, j: usize) -> &'a [f32] {
        &self.data[j * self.stride..j * self.stride + self.len]
    }
}

/// `out[t * ld + j] = dot(q[t * d..(t + 1) * d], keys.row(j))` (the canonical dot product of
/// [`kernels::dot`]) for `t < tq`, `j < keys.n`, with `d = keys.len`.
///
/// # Panics
/// When the slices are too short (a caller bug) or the path is not available.
pub(crate) fn dots(
    path: Path,
    q: &[f32],
    tq: usize,
    keys: Strided<'_>,
    out: &mut [f32],
    ld: usize,
) {
    let d = keys.len;
    assert!(q.len() >= tq * d, "dots: queries out of bounds");
    assert!(
        tq == 0 || keys.n == 0 || ((tq - 1) * ld + keys.n <= out.len() && keys.n <= ld),
        "dots: output out of bounds"
    );
    assert!(path.is_available(), "kernel path {path:?} is not available");
    if tq == 0 || keys.n == 0 {
        return;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX-512F, AVX2 and FMA; bounds checked.
        Path::Avx512 => unsafe { x86::dots512(q, tq, keys, out, ld) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX2 and FMA; bounds checked above.
        Path::Avx2 => unsafe { x86::dots256(q, tq, keys, out, ld) },
        _ => {
            for t in 0..tq {
                let qt = &q[t * d..(t + 1) * d];
                for j in 0..keys.n {
                    out[t * ld + j] = kernels::dot_with(path, qt, keys.row(j));
                }
            }
        }
    }
}

/// `out[t * d..(t + 1) * d] = sum over j in ranges[t] of p[t * ld + j] * vals.row(j)`, with
/// `d = vals.len`: starting from `+0`, one fused multiply-add per `j` in increasing order (the
/// chain of [`kernels::axpy`] calls).
///
/// # Panics
/// When a range or slice is out of bounds (a caller bug) or the path is not available.
pub(crate) fn weighted_sums(
    path: Path,
    p: &[f32],
    ld: usize,
    ranges: &[(usize, usize)],
    vals: Strided<'_>,
    out: &mut [f32],
) {
    let d = vals.len;
    let tq = ranges.len();
    assert!(out.len() >= tq * d, "weighted_sums: output out of bounds");
    for (t, &(a, b)) in ranges.iter().enumerate() {
        assert!(
            a <= b && b <= vals.n && b <= ld && (b == 0 || t * ld + b <= p.len()),
            "weighted_sums: range out of bounds"
        );
    }
    assert!(path.is_available(), "kernel path {path:?} is not available");
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX-512F and FMA; bounds checked.
        Path::Avx512 => unsafe { x86::sums512(p, ld, ranges, vals, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX2 and FMA; bounds checked above.
        Path::Avx2 => unsafe { x86::sums256(p, ld, ranges, vals, out) },
        _ => {
            for (t, &(a, b)) in ranges.iter().enumerate() {
                let o = &mut out[t * d..(t + 1) * d];
                o.fill(0.0);
                for j in a..b {
                    kernels::axpy_with(path, p[t * ld + j], vals.row(j), o);
                }
            }
        }
    }
}

/// The shapes and per-layer settings of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads<'a> {
    /// Query heads.
    pub nh: usize,
    /// Key/value heads (`nh` is a multiple).
    pub nkv: usize,
    /// Head width.
    pub hd: usize,
    /// Score scale.
    pub scale: f32,
    /// Sliding window (a query at `pos` sees positions `pos + 1 - w..=pos`).
    pub window: Option<usize>,
    /// Per-head sink logits (an extra softmax entry with no value).
    pub sinks: Option<&'a [f32]>,
}

/// One sequence's share of the step: its query rows `rows` (indices into the step's rows) and its
/// cache after this step's keys and values were appended, whose first row is position `start`.
#[derive(Clone, Debug)]
pub(crate) struct SeqKv<'a> {
    /// Keys, `[positions, nkv * hd]`.
    pub k: &'a [f32],
    /// Values, like `k`.
    pub v: &'a [f32],
    /// Position of the cache's first row.
    pub start: usize,
    /// The step's rows of this sequence.
    pub rows: std::ops::Range<usize>,
}

/// Queries per tile the drivers aim for (rows x heads of a group).
const TILE_QUERIES: usize = 12;

/// Below this many multiply-adds (summed over rows of `span x heads x head width`) the call runs
/// on the calling thread.
const SERIAL_WORK: usize = 1 << 16;

/// Runs `run` on every job with one scratch value per thread: in parallel when there are
/// several jobs and more than [`SERIAL_WORK`] work, else in order on this thread. (Each job
/// writes only its own output, so the results do not depend on which.)
pub(crate) fn run_jobs<J: Send, S: Default>(
    jobs: Vec<J>,
    work: usize,
    run: impl Fn(&mut S, J) + Sync + Send,
) {
    if work > SERIAL_WORK && jobs.len() > 1 {
        jobs.into_par_iter().for_each_init(S::default, run);
    } else {
        let mut sc = S::default();
        for job in jobs {
            run(&mut sc, job);
        }
    }
}

/// A unit of parallel work: rows `r0..r1` of sequence `s`, key/value heads `h0..h1`; either one
/// row or all heads, so its output is one contiguous run of `out`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    s: usize,
    r0: usize,
    r1: usize,
    h0: usize,
    h1: usize,
}

/// Reusable buffers of one thread.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    ranges: Vec<(usize, usize)>,
}

/// Causal attention of `q` (`[rows, nh * hd]`, the step's rows at `positions`) over each
/// sequence's cache, into `out` (`[rows, nh * hd]`); bit-identical to the plain per-(row, head)
/// formulation on every path.
///
/// # Panics
/// When the shapes disagree (a caller bug) or the path is not available.
pub(crate) fn attend(
    path: Path,
    heads: &Heads<'_>,
    q: &[f32],
    positions: &[usize],
    seqs: &[SeqKv<'_>],
    out: &mut [f32],
) {
    let Heads { nh, nkv, hd, .. } = *heads;
    assert!(
        nkv > 0 && nh % nkv == 0,
        "attend: {nh} heads over {nkv} kv heads"
    );
    let n = positions.len();
    let w = nh * hd;
    assert!(q.len() == n * w && out.len() == n * w, "attend: shapes");
    let group = nh / nkv;
    let tile_rows = (TILE_QUERIES / group).max(1);
    let mut units = Vec::new();
    for (s, sq) in seqs.iter().enumerate() {
        assert!(sq.rows.end <= n, "attend: rows out of bounds");
        if sq.rows.len() == 1 {
            for h in 0..nkv {
                units.push(Unit {
                    s,
                    r0: sq.rows.start,
                    r1: sq.rows.end,
                    h0: h,
                    h1: h + 1,
                });
            }
        } else {
            for r0 in sq.rows.clone().step_by(tile_rows) {
                units.push(Unit {
                    s,
                    r0,
                    r1: (r0 + tile_rows).min(sq.rows.end),
                    h0: 0,
                    h1: nkv,
                });
            }
        }
    }
    // Each unit's output is a contiguous run; units are in increasing order of it.
    let mut rest: &mut [f32] = out;
    let mut at = 0;
    let mut jobs = Vec::with_capacity(units.len());
    for u in units {
        let begin = u.r0 * w + u.h0 * group * hd;
        let end = (u.r1 - 1) * w + u.h1 * group * hd;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(begin - at);
        let (mine, tail) = tail.split_at_mut(end - begin);
        rest = tail;
        at = end;
        jobs.push((u, mine));
    }
    let work: usize = positions.iter().map(|&p| p + 1).sum::<usize>() * nh * hd;
    let run = |sc: &mut Scratch, (u, o): (Unit, &mut [f32])| {
        attend_unit(path, heads, q, positions, &seqs[u.s], u, o, sc);
    };
    run_jobs(jobs, work, run);
}

/// First position a query at `pos` sees.
fn first_visible(window: Option<usize>, pos: usize) -> usize {
    match window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    }
}

/// One unit of [`attend`]; `o` is its contiguous run of the output.
#[allow(clippy::too_many_arguments)]
fn attend_unit(
    path: Path,
    heads: &Heads<'_>,
    q: &[f32],
    positions: &[usize],
    seq: &SeqKv<'_>,
    u: Unit,
    o: &mut [f32],
    sc: &mut Scratch,
) {
    let Heads {
        nh,
        nkv,
        hd,
        scale,
        window,
        sinks,
    } = *heads;
    let group = nh / nkv;
    let kvw = nkv * hd;
    let w = nh * hd;
    let rows = u.r1 - u.r0;
    let tq = rows * group;
    // The key range of the whole tile (positions `lo..hi`), as rows of the cache.
    let (mut lo, mut hi) = (usize::MAX, 0);
    for &pos in &positions[u.r0..u.r1] {
        lo = lo.min(first_visible(window, pos));
        hi = hi.max(pos + 1);
    }
    assert!(lo >= seq.start, "attend: position {lo} left the cache");
    let span = hi - lo;
    let ld = span + 1;
    let base = (lo - seq.start) * kvw;
    assert!(
        (hi - seq.start) * kvw <= seq.k.len() && seq.k.len() == seq.v.len(),
        "attend: cache shorter than position {hi}"
    );
    sc.q.resize(tq * hd, 0.0);
    sc.s.resize(tq * ld, 0.0);
    sc.o.resize(tq * hd, 0.0);
    for kvh in u.h0..u.h1 {
        // Queries of the tile: t = row * group + head in the group.
        for r in 0..rows {
            let src = (u.r0 + r) * w + kvh * group * hd;
            sc.q[r * group * hd..(r + 1) * group * hd].copy_from_slice(&q[src..src + group * hd]);
        }
        let keys = Strided::new(&seq.k[base + kvh * hd..], kvw, hd, span);
        let vals = Strided::new(&seq.v[base + kvh * hd..], kvw, hd, span);
        dots(path, &sc.q, tq, keys, &mut sc.s, ld);
        sc.ranges.clear();
        for t in 0..tq {
            let pos = positions[u.r0 + t / group];
            let head = kvh * group + t % group;
            let (a, b) = (first_visible(window, pos) - lo, pos + 1 - lo);
            let srow = &mut sc.s[t * ld..(t + 1) * ld];
            for v in &mut srow[a..b] {
                *v *= scale;
            }
            let end = match sinks {
                Some(sk) => {
                    srow[b] = sk[head];
                    b + 1
                }
                None => b,
            };
            softmax_inplace(&mut srow[a..end]);
            sc.ranges.push((a, b));
        }
        weighted_sums(path, &sc.s, ld, &sc.ranges, vals, &mut sc.o);
        for r in 0..rows {
            let dst = r * w + (kvh - u.h0) * group * hd;
            o[dst..dst + group * hd].copy_from_slice(&sc.o[r * group * hd..(r + 1) * group * hd]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 and AVX2 tiles of [`super::dots`] and [`super::weighted_sums`].

    use std::arch::x86_64::*;

    use super::Strided;
    use crate::kernels::x86::{fold8, fold512};
    use crate::kernels::{LANES, fold_lanes};

    /// AVX-512 score tile: keys x queries (16 accumulators + 4 + 1 of the 32 zmm registers).
    const KR512: usize = 4;
    const QT512: usize = 6;
    /// AVX2 score tile: keys x queries (2 x 3 x 2 = 12 accumulators + 2 + 1 of 16 ymm).
    const KR256: usize = 2;
    const QT256: usize = 3;
    /// Rows ahead whose cache lines are prefetched (a decode step reads the cache from memory
    /// once; without prefetching the key loads wait on it).
    const PF_ROWS: usize = 8;
    /// Value-sum tiles: queries x column chunks (16 floats for AVX-512, 8 for AVX2).
    const ST512: usize = 4;
    const SD512: usize = 4;
    const ST256: usize = 4;
    const SD256: usize = 2;

    /// [`super::dots`] on AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA; the bounds are those [`super::dots`] checks.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dots512(
        q: &[f32],
        tq: usize,
        keys: Strided<'_>,
        out: &mut [f32],
        ld: usize,
    ) {
        let d = keys.len;
        for t0 in (0..tq).step_by(QT512) {
            let tn = QT512.min(tq - t0);
            let qs = &q[t0 * d..];
            let os = &mut out[t0 * ld..];
            let mut j = 0;
            while j < keys.n {
                let rn = if keys.n - j >= KR512 { KR512 } else { 1 };
                macro_rules! call {
                    ($($t:literal),*) => {
                        match (rn, tn) {
                            $(
                                // SAFETY: features from the caller; rows `j..j + R` and queries
                                // `t0..t0 + T` are in bounds (checked by `dots`).
                                (KR512, $t) => unsafe { dk512::<KR512, $t>(qs, keys, j, os, ld) },
                                // SAFETY: as above.
                                (1, $t) => unsafe { dk512::<1, $t>(qs, keys, j, os, ld) },
                            )*
                            _ => unreachable!("score tile shape"),
                        }
                    };
                }
                call!(1, 2, 3, 4, 5, 6);
                j += rn;
            }
        }
    }

    /// Dot products of keys `j0..j0 + R` with queries `0..T` of `q` into `out[t * ld + j]`.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA; `q` holds `T` rows of `keys.len`, keys `j0 + R <= keys.n`, and
    /// `out` holds `(T - 1) * ld + keys.n` floats.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[r][t] mirrors the tile.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn dk512<const R: usize, const T: usize>(
        q: &[f32],
        keys: Strided<'_>,
        j0: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let d = keys.len;
        let n16 = d - d % LANES;
        let kp = keys.data.as_ptr();
        let qp = q.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut k = 0;
        while k < n16 {
            let mut kv = [_mm512_setzero_ps(); R];
            for (r, v) in kv.iter_mut().enumerate() {
                let ahead = kp.wrapping_add((j0 + r + PF_ROWS) * keys.stride + k);
                // Prefetching any address is harmless; `wrapping_add` keeps it defined.
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                // SAFETY: `(j0 + r) * stride + k + 16 <= (n - 1) * stride + len`, inside `keys`.
                *v = unsafe { _mm512_loadu_ps(kp.add((j0 + r) * keys.stride + k)) };
            }
            for t in 0..T {
                // SAFETY: `t * d + k + 16 <= T * d <= q.len()`.
                let qv = unsafe { _mm512_loadu_ps(qp.add(t * d + k)) };
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(qv, kv[r], acc[r][t]);
                }
            }
            k += LANES;
        }
        for r in 0..R {
            let kr = keys.row(j0 + r);
            for t in 0..T {
                out[t * ld + j0 + r] = if n16 == d {
                    fold512(acc[r][t])
                } else {
                    let mut lanes = [0f32; LANES];
                    // SAFETY: `lanes` holds 16 floats; unaligned store.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
                    tail(&mut lanes, &q[t * d + n16..(t + 1) * d], &kr[n16..]);
                    fold_lanes(&lanes)
                };
            }
        }
    }

    /// The canonical tail: column `n16 + i` into lane `i`.
    #[inline(always)]
    fn tail(lanes: &mut [f32; LANES], a: &[f32], b: &[f32]) {
        for ((l, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *l = x.mul_add(*y, *l);
        }
    }

    /// [`super::dots`] on AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the bounds are those [`super::dots`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots256(
        q: &[f32],
        tq: usize,
        keys: Strided<'_>,
        out: &mut [f32],
        ld: usize,
    ) {
        let d = keys.len;
        for t0 in (0..tq).step_by(QT256) {
            let tn = QT256.min(tq - t0);
            let qs = &q[t0 * d..];
            let os = &mut out[t0 * ld..];
            let mut j = 0;
            while j < keys.n {
                let rn = if keys.n - j >= KR256 { KR256 } else { 1 };
                macro_rules! call {
                    ($($t:literal),*) => {
                        match (rn, tn) {
                            $(
                                // SAFETY: features from the caller; rows `j..j + R` and queries
                                // `t0..t0 + T` are in bounds (checked by `dots`).
                                (KR256, $t) => unsafe { dk256::<KR256, $t>(qs, keys, j, os, ld) },
                                // SAFETY: as above.
                                (1, $t) => unsafe { dk256::<1, $t>(qs, keys, j, os, ld) },
                            )*
                            _ => unreachable!("score tile shape"),
                        }
                    };
                }
                call!(1, 2, 3);
                j += rn;
            }
        }
    }

    /// [`dk512`] with lanes 0-7 in `acc[..][..][0]` and 8-15 in `acc[..][..][1]`.
    ///
    /// # Safety
    /// As [`dk512`], with AVX2 and FMA.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[r][t][h] mirrors the tile.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dk256<const R: usize, const T: usize>(
        q: &[f32],
        keys: Strided<'_>,
        j0: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let d = keys.len;
        let n16 = d - d % LANES;
        let kp = keys.data.as_ptr();
        let qp = q.as_ptr();
        let mut acc = [[[_mm256_setzero_ps(); 2]; T]; R];
        let mut k = 0;
        while k < n16 {
            for h in 0..2 {
                let kh = k + 8 * h;
                let mut kv = [_mm256_setzero_ps(); R];
                for (r, v) in kv.iter_mut().enumerate() {
                    if h == 0 {
                        let ahead = kp.wrapping_add((j0 + r + PF_ROWS) * keys.stride + k);
                        // Prefetching any address is harmless; `wrapping_add` keeps it defined.
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                    }
                    // SAFETY: `(j0 + r) * stride + kh + 8 <= (n - 1) * stride + len`.
                    *v = unsafe { _mm256_loadu_ps(kp.add((j0 + r) * keys.stride + kh)) };
                }
                for t in 0..T {
                    // SAFETY: `t * d + kh + 8 <= T * d <= q.len()`.
                    let qv = unsafe { _mm256_loadu_ps(qp.add(t * d + kh)) };
                    for r in 0..R {
                        acc[r][t][h] = _mm256_fmadd_ps(qv, kv[r], acc[r][t][h]);
                    }
                }
            }
            k += LANES;
        }
        for r in 0..R {
            let kr = keys.row(j0 + r);
            for t in 0..T {
                out[t * ld + j0 + r] = if n16 == d {
                    fold8(_mm256_add_ps(acc[r][t][0], acc[r][t][1]))
                } else {
                    let mut lanes = [0f32; LANES];
                    // SAFETY: `lanes` holds 16 floats: lanes 0-7 then 8-15; unaligned stores.
                    unsafe {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][t][0]);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][t][1]);
                    }
                    tail(&mut lanes, &q[t * d + n16..(t + 1) * d], &kr[n16..]);
                    fold_lanes(&lanes)
                };
            }
        }
    }

    /// The common part of the queries' ranges (`max a..min b`, possibly empty) and their union.
    fn bounds(ranges: &[(usize, usize)]) -> (usize, usize, usize, usize) {
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let ca = ranges.iter().map(|r| r.0).max().unwrap_or(0);
        let cb = ranges.iter().map(|r| r.1).min().unwrap_or(0);
        (lo, ca, cb, hi)
    }

    /// [`super::weighted_sums`] on AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and FMA; the bounds are those [`super::weighted_sums`] checks.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn sums512(
        p: &[f32],
        ld: usize,
        ranges: &[(usize, usize)],
        vals: Strided<'_>,
        out: &mut [f32],
    ) {
        let d = vals.len;
        let chunks = d.div_ceil(16);
        for t0 in (0..ranges.len()).step_by(ST512) {
            let rs = &ranges[t0..(t0 + ST512).min(ranges.len())];
            for c0 in (0..chunks).step_by(SD512) {
                let cn = SD512.min(chunks - c0);
                macro_rules! call {
                    ($(($t:literal, $c:literal)),*) => {
                        match (rs.len(), cn) {
                            $(
                                // SAFETY: features from the caller; ranges, `p` and `out` are
                                // in bounds (checked by `weighted_sums`).
                                ($t, $c) => unsafe {
                                    sk512::<$t, $c>(&p[t0 * ld..], ld, rs, vals, c0 * 16, &mut out[t0 * d..])
                                },
                            )*
                            _ => unreachable!("sum tile shape"),
                        }
                    };
                }
                call!(
                    (1, 1),
                    (1, 2),
                    (1, 3),
                    (1, 4),
                    (2, 1),
                    (2, 2),
                    (2, 3),
                    (2, 4),
                    (3, 1),
                    (3, 2),
                    (3, 3),
                    (3, 4),
                    (4, 1),
                    (4, 2),
                    (4, 3),
                    (4, 4)
                );
            }
        }
    }

    /// Queries `0..T` (weights `p[t * ld + j]`, ranges `rs[t]`) times value columns
    /// `c0..c0 + 16 C` (the last chunk masked at the row's end) into `out[t * d + c]`.
    ///
    /// # Safety
    /// AVX-512F and FMA; `rs[t].1 <= vals.n` and `t * ld + rs[t].1 <= p.len()` for each
    /// query, `out` holds `T` rows of `vals.len`, and `c0 < vals.len`.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[t][c] mirrors the tile.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn sk512<const T: usize, const C: usize>(
        p: &[f32],
        ld: usize,
        rs: &[(usize, usize)],
        vals: Strided<'_>,
        c0: usize,
        out: &mut [f32],
    ) {
        let d = vals.len;
        let mut mask = [0u16; C];
        for (c, m) in mask.iter_mut().enumerate() {
            let left = d.saturating_sub(c0 + 16 * c).min(16);
            *m = ((1u32 << left) - 1) as u16;
        }
        let vp = vals.data.as_ptr();
        let pp = p.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); C]; T];
        let (lo, ca, cb, hi) = bounds(rs);
        macro_rules! step {
            ($j:expr, $check:expr) => {{
                let j = $j;
                let mut vv = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    let ahead = vp.wrapping_add((j + PF_ROWS) * vals.stride + c0 + 16 * c);
                    // Prefetching any address is harmless; `wrapping_add` keeps it defined.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                    // SAFETY: `j < vals.n`; masked-off lanes are not read.
                    vv[c] = unsafe {
                        _mm512_maskz_loadu_ps(mask[c], vp.add(j * vals.stride + c0 + 16 * c))
                    };
                }
                for t in 0..T {
                    if !$check || (rs[t].0 <= j && j < rs[t].1) {
                        // SAFETY: `j < rs[t].1`, so `t * ld + j < p.len()`; for the unchecked
                        // loop `j` lies in every range.
                        let pv = _mm512_set1_ps(unsafe { *pp.add(t * ld + j) });
                        for c in 0..C {
                            acc[t][c] = _mm512_fmadd_ps(pv, vv[c], acc[t][c]);
                        }
                    }
                }
            }};
        }
        if ca < cb {
            for j in lo..ca {
                step!(j, true);
            }
            for j in ca..cb {
                step!(j, false);
            }
            for j in cb..hi {
                step!(j, true);
            }
        } else {
            for j in lo..hi {
                step!(j, true);
            }
        }
        let op = out.as_mut_ptr();
        for t in 0..T {
            for c in 0..C {
                // SAFETY: `t * d + c0 + 16 c + 16 * mask <= T * d <= out.len()`.
                unsafe { _mm512_mask_storeu_ps(op.add(t * d + c0 + 16 * c), mask[c], acc[t][c]) };
            }
        }
    }

    /// [`super::weighted_sums`] on AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the bounds are those [`super::weighted_sums`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sums256(
        p: &[f32],
        ld: usize,
        ranges: &[(usize, usize)],
        vals: Strided<'_>,
        out: &mut [f32],
    ) {
        let d = vals.len;
        let d8 = d - d % 8;
        let chunks = d8 / 8;
        for t0 in (0..ranges.len()).step_by(ST256) {
            let rs = &ranges[t0..(t0 + ST256).min(ranges.len())];
            for c0 in (0..chunks).step_by(SD256) {
                let cn = SD256.min(chunks - c0);
                macro_rules! call {
                    ($(($t:literal, $c:literal)),*) => {
                        match (rs.len(), cn) {
                            $(
                                // SAFETY: features from the caller; ranges, `p` and `out` are
                                // in bounds (checked by `weighted_sums`).
                                ($t, $c) => unsafe {
                                    sk256::<$t, $c>(&p[t0 * ld..], ld, rs, vals, c0 * 8, &mut out[t0 * d..])
                                },
                            )*
                            _ => unreachable!("sum tile shape"),
                        }
                    };
                }
                call!(
                    (1, 1),
                    (1, 2),
                    (2, 1),
                    (2, 2),
                    (3, 1),
                    (3, 2),
                    (4, 1),
                    (4, 2)
                );
            }
            if d8 < d {
                // Columns past the last full 8: the same fused chain, one element at a time.
                for (t, &(a, b)) in rs.iter().enumerate() {
                    let o = &mut out[(t0 + t) * d + d8..(t0 + t + 1) * d];
                    o.fill(0.0);
                    for j in a..b {
                        let pj = p[(t0 + t) * ld + j];
                        for (y, x) in o.iter_mut().zip(&vals.row(j)[d8..]) {
                            *y = pj.mul_add(*x, *y);
                        }
                    }
                }
            }
        }
    }

    /// [`sk512`] on AVX2 with 8-float chunks, all whole.
    ///
    /// # Safety
    /// As [`sk512`], with AVX2 and FMA, and `c0 + 8 C <= vals.len`.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[t][c] mirrors the tile.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sk256<const T: usize, const C: usize>(
        p: &[f32],
        ld: usize,
        rs: &[(usize, usize)],
        vals: Strided<'_>,
        c0: usize,
        out: &mut [f32],
    ) {
        let d = vals.len;
        let vp = vals.data.as_ptr();
        let pp = p.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); C]; T];
        let (lo, ca, cb, hi) = bounds(rs);
        macro_rules! step {
            ($j:expr, $check:expr) => {{
                let j = $j;
                let mut vv = [_mm256_setzero_ps(); C];
                for c in (0..C).step_by(2) {
                    let ahead = vp.wrapping_add((j + PF_ROWS) * vals.stride + c0 + 8 * c);
                    // Prefetching any address is harmless; `wrapping_add` keeps it defined.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                }
                for c in 0..C {
                    // SAFETY: `j < vals.n` and `c0 + 8 c + 8 <= vals.len`.
                    vv[c] = unsafe { _mm256_loadu_ps(vp.add(j * vals.stride + c0 + 8 * c)) };
                }
                for t in 0..T {
                    if !$check || (rs[t].0 <= j && j < rs[t].1) {
                        // SAFETY: `j < rs[t].1`, so `t * ld + j < p.len()`; for the unchecked
                        // loop `j` lies in every range.
                        let pv = _mm256_set1_ps(unsafe { *pp.add(t * ld + j) });
                        for c in 0..C {
                            acc[t][c] = _mm256_fmadd_ps(pv, vv[c], acc[t][c]);
                        }
                    }
                }
            }};
        }
        if ca < cb {
            for j in lo..ca {
                step!(j, true);
            }
            for j in ca..cb {
                step!(j, false);
            }
            for j in cb..hi {
                step!(j, true);
            }
        } else {
            for j in lo..hi {
                step!(j, true);
            }
        }
        let op = out.as_mut_ptr();
        for t in 0..T {
            for c in 0..C {
                // SAFETY: `t * d + c0 + 8 c + 8 <= T * d <= out.len()`.
                unsafe { _mm256_storeu_ps(op.add(t * d + c0 + 8 * c), acc[t][c]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain formulation this module must reproduce: every (row, head) alone, one
    /// [`kernels::dot`] per key and one [`kernels::axpy`] per value (the code `Model::attention`
    /// ran before the tiles).
    fn reference(
        heads: &Heads<'_>,
        q: &[f32],
        positions: &[usize],
        seqs: &[SeqKv<'_>],
        out: &mut [f32],
    ) {
        let Heads {
            nh,
            nkv,
            hd,
            scale,
            window,
            sinks,
        } = *heads;
        let group = nh / nkv;
        let kvw = nkv * hd;
        for sq in seqs {
            for row in sq.rows.clone() {
                let (kc, vc, start) = (sq.k, sq.v, sq.start);
                let pos = positions[row];
                let at = |j: usize| (j - start) * kvw;
                let first = match window {
                    Some(w) if pos + 1 > w => pos + 1 - w,
                    _ => 0,
                };
                let span = pos + 1 - first;
                let mut scores = vec![0f32; span + usize::from(sinks.is_some())];
                let o = &mut out[row * nh * hd..(row + 1) * nh * hd];
                for head in 0..nh {
                    let kvh = head / group;
                    let qh = &q[(row * nh + head) * hd..(row * nh + head + 1) * hd];
                    for (j, sc) in (first..=pos).zip(scores.iter_mut()) {
                        let kj = &kc[at(j) + kvh * hd..at(j) + (kvh + 1) * hd];
                        *sc = kernels::dot(qh, kj) * scale;
                    }
                    if let Some(sinks) = sinks {
                        scores[span] = sinks[head];
                    }
                    softmax_inplace(&mut scores);
                    let oh = &mut o[head * hd..(head + 1) * hd];
                    oh.fill(0.0);
                    for (j, &p) in (first..=pos).zip(scores.iter()) {
                        kernels::axpy(p, &vc[at(j) + kvh * hd..at(j) + (kvh + 1) * hd], oh);
                    }
                }
            }
        }
    }

    /// Deterministic pseudo-random values, with exact zeros of both signs now and then.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let u = (self.0 >> 40) as u32;
            match u % 97 {
                0 => 0.0,
                1 => -0.0,
                _ => (u as f32 / (1u32 << 24) as f32 - 0.5) * 4.0,
            }
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// One sequence of a test step: `cached` positions already in the cache, `len` new rows.
    struct Case {
        cached: usize,
        len: usize,
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Runs the step on every available path and compares with the reference, bit for bit.
    fn check(nh: usize, nkv: usize, hd: usize, window: Option<usize>, sinks: bool, cases: &[Case]) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (nh * 1000 + hd) as u64);
        let kvw = nkv * hd;
        let sink_vals = rng.vec(nh);
        let heads = Heads {
            nh,
            nkv,
            hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
            sinks: sinks.then_some(sink_vals.as_slice()),
        };
        let mut positions = Vec::new();
        let mut caches = Vec::new();
        for c in cases {
            // The cache after appending: a sliding layer kept positions from `old + 1 - w`.
            let start = window.map_or(0, |w| (c.cached + 1).saturating_sub(w));
            let rows = c.cached + c.len - start;
            caches.push((rng.vec(rows * kvw), rng.vec(rows * kvw), start));
            positions.extend(c.cached..c.cached + c.len);
        }
        let n = positions.len();
        let q = rng.vec(n * nh * hd);
        let mut seqs = Vec::new();
        let mut at = 0;
        for (c, (k, v, start)) in cases.iter().zip(&caches) {
            seqs.push(SeqKv {
                k,
                v,
                start: *start,
                rows: at..at + c.len,
            });
            at += c.len;
        }
        let mut want = vec![f32::NAN; n * nh * hd];
        reference(&heads, &q, &positions, &seqs, &mut want);
        for path in kernels::available_paths() {
            let mut got = vec![f32::NAN; n * nh * hd];
            attend(path, &heads, &q, &positions, &seqs, &mut got);
            assert!(
                bits(&got) == bits(&want),
                "{path:?}: heads {nh}/{nkv} of {hd}, window {window:?}, sinks {sinks}"
            );
        }
    }

    const SHAPES: [(usize, usize, usize); 7] = [
        (16, 4, 128),
        (4, 4, 64),
        (8, 1, 24),
        (6, 2, 40),
        (2, 1, 8),
        (12, 4, 80),
        (3, 3, 17),
    ];

    #[test]
    fn prefill_equals_plain_attention() {
        for (nh, nkv, hd) in SHAPES {
            for window in [None, Some(5), Some(37)] {
                for sinks in [false, true] {
                    let cases = [Case { cached: 0, len: 41 }];
                    check(nh, nkv, hd, window, sinks, &cases);
                    let cases = [Case {
                        cached: 23,
                        len: 13,
                    }];
                    check(nh, nkv, hd, window, sinks, &cases);
                }
            }
        }
    }

    #[test]
    fn decode_equals_plain_attention() {
        for (nh, nkv, hd) in SHAPES {
            for window in [None, Some(5), Some(64)] {
                for sinks in [false, true] {
                    check(nh, nkv, hd, window, sinks, &[Case { cached: 0, len: 1 }]);
                    check(
                        nh,
                        nkv,
                        hd,
                        window,
                        sinks,
                        &[Case {
                            cached: 150,
                            len: 1,
                        }],
                    );
                }
            }
        }
    }

    #[test]
    fn mixed_batch_equals_plain_attention() {
        let cases = [
            Case { cached: 0, len: 9 },
            Case { cached: 70, len: 1 },
            Case { cached: 4, len: 0 },
            Case { cached: 31, len: 6 },
            Case { cached: 3, len: 1 },
        ];
        for (nh, nkv, hd) in SHAPES {
            for window in [None, Some(7)] {
                for sinks in [false, true] {
                    check(nh, nkv, hd, window, sinks, &cases);
                }
            }
        }
    }

    /// Long enough that the parallel split runs (the result must not depend on it).
    #[test]
    fn long_prefill_equals_plain_attention() {
        check(
            16,
            4,
            128,
            None,
            false,
            &[Case {
                cached: 0,
                len: 300,
            }],
        );
        check(
            8,
            2,
            64,
            Some(128),
            true,
            &[Case {
                cached: 100,
                len: 200,
            }],
        );
        let cases = [
            Case {
                cached: 0,
                len: 150,
            },
            Case {
                cached: 400,
                len: 1,
            },
        ];
        check(4, 1, 32, None, false, &cases);
    }

    /// The tiles alone against the portable path, over widths around the chunk sizes and
    /// ragged, empty and disjoint ranges.
    #[test]
    fn tiles_equal_portable_path() {
        let mut rng = Rng(7);
        for d in [1, 7, 8, 9, 15, 16, 17, 31, 33, 48, 64, 72, 130] {
            for tq in [1, 2, 3, 4, 5, 6, 7, 9, 13] {
                let n = 11;
                let stride = d + 3;
                let data = rng.vec(n * stride);
                let rows = Strided::new(&data, stride, d, n);
                let q = rng.vec(tq * d);
                let ld = n + 2;
                let mut want = vec![0f32; tq * ld];
                dots(Path::Scalar, &q, tq, rows, &mut want, ld);
                let ranges: Vec<(usize, usize)> = (0..tq)
                    .map(|t| match t % 4 {
                        0 => (0, n),
                        1 => (t % n, n),
                        2 => (0, (t * 3) % n),
                        _ => (2, 2),
                    })
                    .collect();
                let mut want_sums = vec![0f32; tq * d];
                weighted_sums(Path::Scalar, &want, ld, &ranges, rows, &mut want_sums);
                for path in kernels::available_paths() {
                    let mut got = vec![0f32; tq * ld];
                    dots(path, &q, tq, rows, &mut got, ld);
                    for t in 0..tq {
                        assert_eq!(
                            bits(&got[t * ld..t * ld + n]),
                            bits(&want[t * ld..t * ld + n]),
                            "{path:?} dots d {d} tq {tq}"
                        );
                    }
                    let mut sums = vec![f32::NAN; tq * d];
                    weighted_sums(path, &want, ld, &ranges, rows, &mut sums);
                    assert_eq!(bits(&sums), bits(&want_sums), "{path:?} sums d {d} tq {tq}");
                }
            }
        }
    }
}
