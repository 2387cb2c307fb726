//! Dense kernels with one canonical reduction order.
//!
//! Every dot product is computed as 16 interleaved lanes (`lane = k % 16`), each a chain of fused
//! multiply-adds, then folded 16 -> 8 -> 4 -> 2 -> 1 (`a[i] + a[i + w]`). The scalar reference, the
//! AVX2, AVX-512 and NEON paths all follow that order, so their results are bit-identical, and so is a
//! row computed alone or inside a batch: that is what makes distributed output equal single-process
//! output and keeps a sequence's tokens independent of its batch.
//!
//! How the SIMD paths keep the order:
//! - AVX-512 holds lanes 0-15 of one (row, token) pair in one `__m512`; AVX2 in two `__m256`
//!   (lanes 0-7 and 8-15); NEON in four `float32x4_t`. Each full chunk of 16 columns is one
//!   fused multiply-add per register, in increasing `k`.
//! - The tail (`k` past the last full chunk) is added with scalar `mul_add` into lane `k % 16` of
//!   the spilled accumulators, and [`fold_lanes`] folds them; both are shared by every path (a
//!   dot product without a tail is folded in registers with the same additions).
//! - Blocking over rows and tokens only changes which independent dot products run side by side,
//!   never the operations inside one, so batch size, tile shape and the rayon split cannot change a
//!   single bit of the output. Blocking along `k` (long rows, many tokens) stores the lane sums to
//!   memory between blocks and reloads them: exact, so it changes nothing either.
//!
//! Performance shape of [`matmul`]: rayon tasks over blocks of rows (about 64 KiB of weights
//! each, serial below ~64K multiply-adds); inside a task, register tiles of 4 rows x 6 tokens
//! (AVX-512) or 2 x 3 (AVX2): each weight chunk is loaded and converted once per 6 tokens, and the
//! weight block stays in L2 while the token tiles pass over it. Weights are prefetched 1 KiB ahead.
//! Decoding (one token) streams the weights at about the machine's memory bandwidth.
//!
//! Non-finite inputs: a NaN anywhere in a dot product gives a NaN, but the NaN's payload and sign
//! may differ between paths (hardware and libm propagate different operands). Everything else,
//! including signed zeros, infinities and subnormals, is bit-identical.

pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

#[cfg(target_arch = "x86_64")]
mod quant_x86;

#[cfg(any(all(target_arch = "aarch64", target_feature = "neon"), test))]
mod quant_neon;

// The NEON path is compiled on aarch64 and, for its unit tests only, on other targets against a
// small software emulation of the four intrinsics it uses.
#[cfg(any(all(target_arch = "aarch64", target_feature = "neon"), test))]
mod neon;

use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::quant::{QActs, QType};
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

/// A kernel implementation ("code path"). Every path gives bit-identical results; they differ only
/// in speed and in which CPUs can run them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Portable scalar code (the reference order, run through the same blocking and threading).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, 256-bit registers.
    Avx2,
    /// x86-64 AVX-512F (+ AVX2, FMA, F16C), 512-bit registers.
    Avx512,
    /// aarch64 NEON, 128-bit registers.
    Neon,
}

impl Path {
    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Path::Scalar => true,
            Path::Avx2 => cpu().avx2,
            Path::Avx512 => cpu().avx512,
            Path::Neon => cfg!(all(target_arch = "aarch64", target_feature = "neon")),
        }
    }

    /// Columns per block when a matmul is blocked along `k` (so a tile's activations stay in L1
    /// across the rows of a task), for the paths whose kernels support [`Span::Part`].
    fn k_block(self) -> Option<usize> {
        match self {
            Path::Avx512 | Path::Avx2 => Some(K_BLOCK),
            Path::Scalar | Path::Neon => None,
        }
    }

    /// Row x token tile shape (rows, tokens) of the path's matmul micro-kernel.
    fn tile_shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => (x86::R512, x86::T512),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => (x86::R256, x86::T256),
            _ => (1, 1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Cpu {
    avx2: bool,
    avx512: bool,
}

/// CPU features, detected once.
fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    let avx2 = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
    Cpu { avx2, avx512 }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu {
        avx2: false,
        avx512: false,
    }
}

/// The paths this CPU can run, slowest first (always starts with [`Path::Scalar`]).
pub fn available_paths() -> Vec<Path> {
    [Path::Scalar, Path::Neon, Path::Avx2, Path::Avx512]
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// Whether AVX-512 F and BW are available (the activation quantizer's SIMD form).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512bw() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) use quant_x86::quantize_block_512;

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn in_serial() -> bool {
    SERIAL.with(|s| s.get())
}

/// Runs `f` with every kernel it calls on this thread kept on this thread (no rayon split):
/// for callers that already run independent products in parallel (whole experts per thread),
/// where splitting each small product again costs more than it gains. Results are the same
/// bits either way.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _reset = Reset(SERIAL.with(|s| s.replace(true)));
    f()
}

/// The fastest available path, chosen once per process.
pub fn best_path() -> Path {
    static BEST: OnceLock<Path> = OnceLock::new();
    *BEST.get_or_init(|| available_paths().last().copied().unwrap_or(Path::Scalar))
}

fn check_path(path: Path) {
    assert!(
        path.is_available(),
        "kernel path {path:?} is not available on this CPU"
    );
}

/// Weight element types the kernels read.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Elem: Copy + Send + Sync + x86::Load {
    /// Exact conversion to f32.
    fn to_f32(self) -> f32;
}

/// Weight element types the kernels read.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Elem: Copy + Send + Sync {
    /// Exact conversion to f32.
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Adds the tail `w[j] * x[j]` (columns past the last full chunk of 16) into lane `j` of the spilled
/// accumulators; `j` is the column's lane because the tail starts at a multiple of 16.
#[inline(always)]
pub(crate) fn tail_fma<W: Elem>(lanes: &mut [f32; LANES], w: &[W], x: &[f32]) {
    for ((l, wv), xv) in lanes.iter_mut().zip(w).zip(x) {
        *l = wv.to_f32().mul_add(*xv, *l);
    }
}

/// Canonical dot product of two f32 slices of equal length.
///
/// # Panics
/// When the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(best_path(), a, b)
}

/// [`dot`] on a chosen path.
///
/// # Panics
/// When the lengths differ or the path is not available.
pub fn dot_with(path: Path, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    check_path(path);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX-512F, AVX2, FMA and F16C.
        Path::Avx512 => unsafe { x86::dot512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX2, FMA and F16C.
        Path::Avx2 => unsafe { x86::dot256(a, b) },
        _ => {
            let mut out = [0f32];
            tile(path, a, a.len(), b, 1, 1, Span::Full, &mut out);
            out[0]
        }
    }
}

/// `out[t * rows + r] = dot(W[r, :], x[t, :])` for a weight matrix `w` of shape `[rows, cols]`
/// (row-major, any stored dtype) and `n_tokens` activations `x` of length `cols` each.
///
/// Runs on the calling thread for small products and on the current rayon pool otherwise; the
/// result never depends on the number of threads or on `n_tokens`.
///
/// # Panics
/// When the slice lengths disagree with `rows`, `cols` and `n_tokens` (a caller bug, not input).
pub fn matmul(w: Mat<'_>, rows: usize, cols: usize, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    matmul_with(best_path(), w, rows, cols, x, n_tokens, out);
}

/// [`matmul`] on a chosen path.
///
/// # Panics
/// As [`matmul`], and when the path is not available on this CPU.
pub fn matmul_with(
    path: Path,
    w: Mat<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    assert_eq!(Some(w.len()), rows.checked_mul(cols), "weight size");
    assert_eq!(Some(x.len()), n_tokens.checked_mul(cols), "activation size");
    assert_eq!(Some(out.len()), n_tokens.checked_mul(rows), "output size");
    check_path(path);
    match w {
        Mat::F32(s) => drive(path, s, rows, cols, x, n_tokens, out),
        Mat::F16(s) => drive(path, s, rows, cols, x, n_tokens, out),
        Mat::BF16(s) => drive(path, s, rows, cols, x, n_tokens, out),
        Mat::Quant(q, b) => drive_quant(path, q, b, rows, cols, x, n_tokens, out),
    }
}

/// One quantized row's dot products with tokens `t0..t0 + out.len()` of `acts` (at most
/// [`QUANT_TN`]), on `path` (available).
#[inline]
fn quant_tile(path: Path, q: QType, row: &[u8], acts: &QActs, t0: usize, out: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 paths imply AVX2, FMA and F16C (checked by the public entry point).
        Path::Avx2 | Path::Avx512 => unsafe { quant_x86::dot_tile(q, row, acts, t0, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Path::Neon => {
            for (i, o) in out.iter_mut().enumerate() {
                let (xq, xd, s16) = acts.token(t0 + i);
                *o = quant_neon::dot_row(q, row, xq, xd, s16);
            }
        }
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                let (xq, xd, s16) = acts.token(t0 + i);
                *o = crate::quant::dot_row_ref(q, row, xq, xd, s16);
            }
        }
    }
}

/// Tokens per quantized micro-kernel call.
const QUANT_TN: usize = 4;

/// [`matmul`] for block-quantized weights: the activations are quantized once (see
/// [`crate::quant`]), then row blocks run in parallel like the float driver.
#[allow(clippy::too_many_arguments)]
fn drive_quant(
    path: Path,
    q: QType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    let acts = QActs::new(q, x, cols);
    drive_quant_many(path, q, &acts, n_tokens, &mut [(w, rows, out)]);
}

/// Several products of the same activations with matrices of one quantized type (`(weights,
/// rows, out)` each, like [`matmul`]): the activations are quantized once and the row blocks of
/// all matrices share one parallel loop (an expert's gate and up projections).
fn drive_quant_many(
    path: Path,
    q: QType,
    acts: &QActs,
    n_tokens: usize,
    jobs: &mut [(&[u8], usize, &mut [f32])],
) {
    if jobs.iter().all(|j| j.2.is_empty()) {
        return;
    }
    let cols = acts.cols;
    assert!(cols == 0 || acts.n_tokens() == n_tokens, "activation size");
    assert!(
        acts.fits(q),
        "activations quantized for another type than {q:?}"
    );
    let row_bytes = q
        .row_bytes(cols)
        .unwrap_or_else(|| panic!("matmul: {cols} columns are not whole {q:?} blocks"));
    let threads = rayon::current_num_threads();
    let total_rows: usize = jobs.iter().map(|j| j.1).sum();
    let work = total_rows.saturating_mul(cols).saturating_mul(n_tokens);
    let serial = threads <= 1 || work < SERIAL_WORK || total_rows < 2 || in_serial();
    let mut block = (BLOCK_BYTES / row_bytes.max(1)).max(1);
    if !serial {
        block = block.min(total_rows.div_ceil(4 * threads));
    }
    // A multiple of the widest row tile, so tiles are not split at block ends.
    let block = block.div_ceil(4) * 4;
    // Tasks: (job, first row) for every block of every job, in job order.
    let tasks: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(k, j)| (0..j.1).step_by(block).map(move |r| (k, r)))
        .collect();
    let outs: Vec<(&[u8], usize, usize, OutPtr)> = jobs
        .iter_mut()
        .map(|(w, rows, out)| (*w, *rows, out.len(), OutPtr(out.as_mut_ptr())))
        .collect();
    // The 512-bit multi-row tiles (AVX-512 with VNNI).
    #[cfg(target_arch = "x86_64")]
    let wide = path == Path::Avx512 && quant_x86::has_vnni512();
    let run = |&(k, r_begin): &(usize, usize)| {
        let (w, rows, out_len, optr) = outs[k];
        let r_end = (r_begin + block).min(rows);
        #[cfg(target_arch = "x86_64")]
        if wide {
            let mut res = [0f32; quant_x86::R512 * quant_x86::TK512];
            let mut t0 = 0;
            while t0 < n_tokens {
                // Token tiles: the K types take sixteen, else eight, at a time where as many are
                // left.
                let left = n_tokens - t0;
                let tn = if q.is_k() && left >= quant_x86::TK512 {
                    quant_x86::TK512
                } else if q.is_k() && left >= 8 {
                    8
                } else {
                    quant_x86::T512.min(left)
                };
                for r0 in (r_begin..r_end).step_by(quant_x86::R512) {
                    let rn = quant_x86::R512.min(r_end - r0);
                    let ws = &w[r0 * row_bytes..(r0 + rn) * row_bytes];
                    // SAFETY: `wide` means the CPU has AVX-512 F/BW/VNNI (and AVX2, FMA, F16C);
                    // `ws` holds `rn` whole rows and the tokens exist in `acts`.
                    unsafe {
                        if q.is_k() {
                            quant_x86::tile_k_512(q, ws, row_bytes, rn, acts, t0, tn, &mut res)
                        } else {
                            quant_x86::tile32_512(q, ws, row_bytes, rn, acts, t0, tn, &mut res)
                        }
                    };
                    // Every index below is at most the tile's last one, checked once.
                    assert!((t0 + tn - 1) * rows + r0 + rn - 1 < out_len && rn * tn <= res.len());
                    for t in 0..tn {
                        // SAFETY: as below; every index is inside the tile checked above, and
                        // `r * tn + t < rn * tn <= res.len()`.
                        unsafe {
                            let dst = optr.get().add((t0 + t) * rows + r0);
                            for r in 0..rn {
                                *dst.add(r) = *res.get_unchecked(r * tn + t);
                            }
                        }
                    }
                }
                t0 += tn;
            }
            return;
        }
        let mut res = [0f32; QUANT_TN];
        for t0 in (0..n_tokens).step_by(QUANT_TN) {
            let tn = QUANT_TN.min(n_tokens - t0);
            for r in r_begin..r_end {
                let row = &w[r * row_bytes..(r + 1) * row_bytes];
                quant_tile(path, q, row, acts, t0, &mut res[..tn]);
                for (t, v) in res[..tn].iter().enumerate() {
                    let i = (t0 + t) * rows + r;
                    assert!(i < out_len);
                    // SAFETY: `i < out.len()` of job `k`, and row `r` of job `k` belongs to
                    // this task alone; the outputs are exclusively borrowed for the whole call
                    // and outlive the tasks.
                    unsafe { *optr.get().add(i) = *v };
                }
            }
        }
    };
    if serial {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// `out1 = W1 x` and `out2 = W2 x` (each like [`matmul`], both `[rows, cols]`): see
/// [`matmul_many`].
///
/// # Panics
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_pair(
    w1: Mat<'_>,
    w2: Mat<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    out1: &mut [f32],
    out2: &mut [f32],
) {
    matmul_many(&mut [(w1, rows, out1), (w2, rows, out2)], cols, x, n_tokens);
}

/// `out_k = W_k x` for several matrices `[rows_k, cols]` over the same activations (each like
/// [`matmul`]): the ones quantized to the same type share one quantization of the activations
/// and one parallel loop (an expert's gate and up projections; attention's query, key and value
/// projections). The results are the same bits as one [`matmul`] each.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_many(
    jobs: &mut [(Mat<'_>, usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    n_tokens: usize,
) {
    let path = best_path();
    assert_eq!(Some(x.len()), n_tokens.checked_mul(cols), "activation size");
    let mut done = vec![false; jobs.len()];
    for i in 0..jobs.len() {
        if done[i] {
            continue;
        }
        let Mat::Quant(q, _) = jobs[i].0 else {
            let (w, rows, out) = &mut jobs[i];
            matmul_with(path, *w, *rows, cols, x, n_tokens, out);
            done[i] = true;
            continue;
        };
        check_path(path);
        let mut group = quant_group(jobs, q, cols, n_tokens, &mut done);
        let acts = QActs::new(q, x, cols);
        drive_quant_many(path, q, &acts, n_tokens, &mut group);
    }
}

/// `out_k = W_k x` like [`matmul_many`] for matrices quantized to types whose activations
/// take the form of `acts` ([`QActs::fits`]), from activations already quantized: several
/// products sharing one quantization, or the rows of a larger quantized batch
/// ([`QActs::gather`]). The results are the same bits as [`matmul_many`] on the activations
/// `acts` was made from.
///
/// # Panics
/// When a matrix is not quantized, its type does not fit `acts`, or a size disagrees.
pub fn matmul_many_acts(jobs: &mut [(Mat<'_>, usize, &mut [f32])], acts: &QActs) {
    let path = best_path();
    check_path(path);
    let (cols, n_tokens) = (acts.cols, acts.n_tokens());
    let mut done = vec![false; jobs.len()];
    for i in 0..jobs.len() {
        if done[i] {
            continue;
        }
        let Mat::Quant(q, _) = jobs[i].0 else {
            panic!("matmul_many_acts: matrix {i} is not quantized");
        };
        let mut group = quant_group(jobs, q, cols, n_tokens, &mut done);
        drive_quant_many(path, q, acts, n_tokens, &mut group);
    }
}

/// The products of `jobs` quantized to `q` and not `done` yet (now marked done), their sizes
/// checked: what one [`drive_quant_many`] call runs on one quantization of the activations.
fn quant_group<'a, 'b>(
    jobs: &'b mut [(Mat<'a>, usize, &mut [f32])],
    q: QType,
    cols: usize,
    n_tokens: usize,
    done: &mut [bool],
) -> Vec<(&'a [u8], usize, &'b mut [f32])> {
    let mut group = Vec::new();
    for (k, (w, rows, out)) in jobs.iter_mut().enumerate() {
        match *w {
            Mat::Quant(qk, b) if qk == q && !done[k] => {
                assert_eq!(
                    Some(b.len()),
                    q.row_bytes(cols).and_then(|r| r.checked_mul(*rows)),
                    "weight size"
                );
                assert_eq!(Some(out.len()), n_tokens.checked_mul(*rows), "output size");
                group.push((b, *rows, &mut **out));
                done[k] = true;
            }
            _ => {}
        }
    }
    group
}

/// Largest tile any path uses (rows x tokens), for the stack buffer of a tile's results.
const MAX_TILE: usize = 32;

/// Columns per `k` block for batched matmuls with long rows: 6 tokens x 1024 columns of f32
/// activations (24 KiB) stay in a 48 KiB L1 while a task's rows stream past them.
const K_BLOCK: usize = 1024;

/// Which columns one micro-kernel call covers.
pub(crate) enum Span<'a> {
    /// All columns: start from zero lanes, add the tail and fold into the results.
    Full,
    /// The full chunks `k0..k1` (multiples of 16 within the last full chunk), continuing from
    /// and returning to the spilled lane sums `state[r * tn + t]`; the caller finishes with
    /// [`tail_fma`] and [`fold_lanes`]. Spilling an exact f32 and reloading it changes nothing.
    Part {
        k0: usize,
        k1: usize,
        state: &'a mut [[f32; LANES]],
    },
}

/// Below this many multiply-adds a matmul runs on the calling thread (rayon costs microseconds).
const SERIAL_WORK: usize = 1 << 16;

/// Weight bytes per parallel task (rows are grouped so a task streams about this much).
const BLOCK_BYTES: usize = 64 << 10;

/// Computes the `rn x tn` dot products of rows `w[r * cols..]` and tokens `x[t * cols..]` into
/// `res[r * tn + t]` (or, for [`Span::Part`], advances their lane sums), on `path` (which the
/// caller has checked is available).
#[inline]
#[allow(clippy::too_many_arguments)]
fn tile<W: Elem>(
    path: Path,
    w: &[W],
    cols: usize,
    x: &[f32],
    rn: usize,
    tn: usize,
    span: Span<'_>,
    res: &mut [f32],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `path` is available (checked by every public entry point), so the CPU has
        // AVX-512F, AVX2, FMA and F16C.
        Path::Avx512 => unsafe { x86::tile512(w, cols, x, rn, tn, span, res) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX2, FMA and F16C.
        Path::Avx2 => unsafe { x86::tile256(w, cols, x, rn, tn, span, res) },
        _ => {
            assert!(matches!(span, Span::Full), "{path:?} has no k blocking");
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            if path == Path::Neon {
                return neon::tile(w, cols, x, rn, tn, res);
            }
            scalar::tile(w, cols, x, rn, tn, res)
        }
    }
}

/// The output pointer shared by the parallel tasks; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: the pointer is only used to write elements that exactly one task owns (see `drive`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn drive<W: Elem>(
    path: Path,
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    if out.is_empty() {
        return;
    }
    let (rt, tt) = path.tile_shape();
    debug_assert!(rt * tt <= MAX_TILE);
    // Block along k only when several token tiles reuse the rows and a row is long; a task's
    // rows then only need their current k block (not whole rows) to stay in L2.
    let n16 = cols - cols % LANES;
    let k_block = path.k_block().filter(|&kb| n_tokens > tt && n16 > kb);
    let row_bytes = (k_block.unwrap_or(cols).min(cols) * size_of::<W>()).max(1);
    let threads = rayon::current_num_threads();
    let work = rows.saturating_mul(cols).saturating_mul(n_tokens);
    let serial = threads <= 1 || work < SERIAL_WORK || rows <= rt || in_serial();

    // Rows per task: about BLOCK_BYTES of weights, a multiple of the tile height, and small enough
    // that every thread gets several tasks (work stealing then evens out the load).
    let mut block = (BLOCK_BYTES / row_bytes).max(1);
    if !serial {
        block = block.min(rows.div_ceil(4 * threads));
    }
    let block = block.div_ceil(rt) * rt;
    let n_blocks = rows.div_ceil(block);

    let out_len = out.len();
    let optr = OutPtr(out.as_mut_ptr());
    let run = |b: usize| {
        let r_begin = b * block;
        let r_end = (r_begin + block).min(rows);
        let mut res = [0f32; MAX_TILE];
        let mut state = match k_block {
            Some(_) => vec![[0f32; LANES]; (r_end - r_begin) * tt],
            None => Vec::new(),
        };
        let store = |t0: usize, tn: usize, r0: usize, rn: usize, res: &[f32]| {
            for r in 0..rn {
                for t in 0..tn {
                    let i = (t0 + t) * rows + r0 + r;
                    assert!(i < out_len);
                    // SAFETY: `i < out.len()` (checked above) and element `(t, r)` with `r` in
                    // this task's row block belongs to this task alone; `out` is exclusively
                    // borrowed for the whole call and outlives the tasks.
                    unsafe { *optr.get().add(i) = res[r * tn + t] };
                }
            }
        };
        for t0 in (0..n_tokens).step_by(tt) {
            let tn = tt.min(n_tokens - t0);
            let xs = &x[t0 * cols..(t0 + tn) * cols];
            let Some(kb) = k_block else {
                for r0 in (r_begin..r_end).step_by(rt) {
                    let rn = rt.min(r_end - r0);
                    let ws = &w[r0 * cols..(r0 + rn) * cols];
                    tile(path, ws, cols, xs, rn, tn, Span::Full, &mut res[..rn * tn]);
                    store(t0, tn, r0, rn, &res[..rn * tn]);
                }
                continue;
            };
            // Lane sums of rows r_begin.. for this token tile: state[(r - r_begin) * tn + t].
            state.fill([0f32; LANES]);
            for k0 in (0..n16).step_by(kb) {
                let k1 = (k0 + kb).min(n16);
                for r0 in (r_begin..r_end).step_by(rt) {
                    let rn = rt.min(r_end - r0);
                    let ws = &w[r0 * cols..(r0 + rn) * cols];
                    let st = &mut state[(r0 - r_begin) * tn..(r0 - r_begin + rn) * tn];
                    let span = Span::Part { k0, k1, state: st };
                    tile(path, ws, cols, xs, rn, tn, span, &mut res[..rn * tn]);
                }
            }
            for r0 in (r_begin..r_end).step_by(rt) {
                let rn = rt.min(r_end - r0);
                for r in 0..rn {
                    let wr = &w[(r0 + r) * cols..(r0 + r + 1) * cols];
                    for t in 0..tn {
                        let lanes = &mut state[(r0 - r_begin + r) * tn + t];
                        tail_fma(lanes, &wr[n16..], &xs[t * cols + n16..(t + 1) * cols]);
                        res[r * tn + t] = fold_lanes(lanes);
                    }
                }
                store(t0, tn, r0, rn, &res[..rn * tn]);
            }
        }
    };
    if serial {
        (0..n_blocks).for_each(run);
    } else {
        (0..n_blocks).into_par_iter().for_each(run);
    }
}

/// `y[i] = a.mul_add(x[i], y[i])` (fused: one rounding) for every `i`.
///
/// # Panics
/// When the lengths differ.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_with(best_path(), a, x, y);
}

/// [`axpy`] on a chosen path.
///
/// # Panics
/// When the lengths differ or the path is not available.
pub fn axpy_with(path: Path, a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths differ");
    check_path(path);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX-512F and FMA.
        Path::Avx512 => unsafe { x86::axpy512(a, x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX2 and FMA.
        Path::Avx2 => unsafe { x86::axpy256(a, x, y) },
        _ => scalar::axpy(a, x, y),
    }
}

/// The canonical `exp`: built from IEEE additions, multiplications, fused multiply-adds and bit
/// operations only, so it gives the same bits on every machine, compiler and code path (unlike the
/// platform libm). Relative error about 1 ulp; `exp(x)` is `+inf` above about 88.72 and `0` below
/// about -103.97.
#[inline]
pub fn exp(x: f32) -> f32 {
    // 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (Cody-Waite with a two-part ln 2).
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI = 0.693359375 with few mantissa bits.
    const LN2_HI: f32 = f32::from_bits(0x3F31_8000);
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to nearest (even) for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits.
    const ROUND: f32 = 12_582_912.0;
    // NaN passes through `clamp`; the limits keep n within [-150, 129].
    let x = x.clamp(-104.0, 89.0);
    let n = x.mul_add(LOG2E, ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    // e^r on |r| <= 0.35: Taylor series to degree 7 (truncation < 2^-27 relative).
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2^n as two factors so each stays a normal float (n in [-150, 129]).
    let n = n as i32;
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    p * s1 * s2
}

/// The canonical SiLU, `x / (1 + exp(-x))` with the canonical [`exp`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU), with [`silu`].
///
/// # Panics
/// When the lengths differ.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_with(best_path(), gate, up);
}

/// [`silu_mul`] on a chosen path (the same operations everywhere; the SIMD paths only compile
/// them with wider registers and hardware FMA).
///
/// # Panics
/// When the lengths differ or the path is not available.
pub fn silu_mul_with(path: Path, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    check_path(path);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX-512F and FMA.
        Path::Avx512 => unsafe { x86::silu_mul512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is available, so the CPU has AVX2 and FMA.
        Path::Avx2 => unsafe { x86::silu_mul256(gate, up) },
        _ => scalar::silu_mul(gate, up),
    }
}

/// Converts `out.len()` elements of `w` starting at element `offset` to f32 (for block types,
/// `offset` and `out.len()` must be whole blocks).
pub fn convert_to_f32(w: Mat<'_>, offset: usize, out: &mut [f32]) {
    let n = out.len();
    match w {
        Mat::Quant(q, b) => {
            let (be, bb) = (q.block_elems(), q.block_bytes());
            assert!(
                offset.is_multiple_of(be) && n.is_multiple_of(be),
                "convert_to_f32: {offset}..+{n} is not whole {q:?} blocks"
            );
            crate::quant::dequantize(q, &b[offset / be * bb..(offset + n) / be * bb], out);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -110.0f32;
        while x < 88.7 {
            let got = f64::from(exp(x));
            let want = f64::from(x).exp();
            // Relative error in the normal range, error in units of the smallest subnormal below.
            let err = if want >= f64::from(f32::MIN_POSITIVE) {
                ((got - want) / want).abs()
            } else {
                (got - want).abs() / 2f64.powi(-149) * 1e-7
            };
            assert!(err < 2.5e-7, "exp({x}) = {got:e}, want {want:e}");
            worst = worst.max(err);
            x += 0.000_7;
        }
        eprintln!("exp: worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((silu(-1.0) + 0.268_941_42).abs() < 1e-6);
        assert_eq!(silu(100.0), 100.0);
        assert_eq!(silu(-100.0), -0.0);
    }
}
