//! Block-quantized weights in ggml's layouts (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): dequantization,
//! quantization, and the integer dot products the kernels run on them.
//!
//! ## Block layouts (little-endian, no padding)
//! - `Q8_0`, 32 elements in 34 bytes: `d: f16`, `q: [i8; 32]`; `x = d * q`.
//! - `Q4_0`, 32 elements in 18 bytes: `d: f16`, `q: [u8; 16]`; element `i < 16` is the low nibble
//!   of byte `i`, element `16 + i` its high nibble; `x = d * (nibble - 8)`.
//! - `Q4_K`, 256 elements in 144 bytes: `d: f16`, `dmin: f16`, 12 bytes of 6-bit scales and mins
//!   for 8 sub-blocks of 32, `q: [u8; 128]`. Elements `64c..64c+32` are the low nibbles of bytes
//!   `32c..32c+32`, elements `64c+32..64c+64` their high nibbles; `x = (d * sc) * q - dmin * m`.
//! - `Q5_K`, 256 elements in 176 bytes: as `Q4_K` plus `qh: [u8; 32]` (after the scales, before
//!   `q`): bit `j` of `qh[l]` is the fifth bit of element `32j + l`.
//! - `Q6_K`, 256 elements in 210 bytes: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`
//!   (one per 16 elements), `d: f16`. In half `h` (128 elements), element `32k + l` takes the low
//!   (k = 0, 1) or high (k = 2, 3) nibble of `ql[64h + 32(k % 2) + l]` and bits `2k, 2k+1` of
//!   `qh[32h + l]` as its top two bits; `x = (d * sc) * (q - 32)`.
//!
//! ## Dot products
//! Activations are quantized to 8 bits once per product ([`QActs`]): blocks of 32 with an f32
//! scale for `Q8_0`/`Q4_0`, blocks of 256 with an f32 scale and exact sums per 16 elements for the
//! K types. Everything inside a weight block is then exact integer arithmetic, and the float part
//! has one canonical order, which the scalar reference below defines and every SIMD path follows:
//! - 32-element types: 16 lanes; lane `8 * (b % 2) + j` accumulates, over blocks `b` in order,
//!   `fma(dw_b * dx_b, p_bj, lane)` where `p_bj` is the integer dot product of the block's
//!   elements `4j..4j+4`; then [`fold_lanes`].
//! - K types: per 256-block the exact integers `S = sum_j sc_j * dot_j(q, x)` and
//!   `M = sum_j m_j * sum_j(x)`; lane `b % 4` accumulates `fma(d_b * dx_b, S)` then
//!   `fma(-(dmin_b * dx_b), M)`; lanes fold `(l0 + l2) + (l1 + l3)`.
//!
//! So results are bit-identical across paths, thread counts and batch sizes, like the float
//! kernels. How the x86 paths map this order onto registers: AVX2 keeps lanes 0-7 and 8-15 of
//! the 32-element order in two 256-bit accumulators (even and odd blocks); the AVX-512 tiles keep
//! all 16 in one register, a block pair per step, and for the K types build `S` and `M` per
//! (row, token) in 512-bit integer registers, reduce them exactly, and run the two fused
//! multiply-adds for four (row, token) pairs at once, lane `b % 4` kept apart.
//!
//! The activation quantizer ([`QActs::new`]) has a SIMD form on AVX-512 that gives the same
//! bytes and scales as the scalar code ([`round_to_i8`] of `v * 127 / amax`, NaN-ignoring
//! `amax`).

use half::f16;

use crate::kernels::{LANES, fold_lanes};

/// A block-quantized element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QType {
    /// 8-bit, blocks of 32.
    Q8_0,
    /// 4-bit, blocks of 32.
    Q4_0,
    /// 4-bit K-quant, super-blocks of 256.
    Q4_K,
    /// 5-bit K-quant, super-blocks of 256.
    Q5_K,
    /// 6-bit K-quant, super-blocks of 256.
    Q6_K,
}

/// Every quantized type, for tests and listings.
pub const ALL: [QType; 5] = [
    QType::Q8_0,
    QType::Q4_0,
    QType::Q4_K,
    QType::Q5_K,
    QType::Q6_K,
];

impl QType {
    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            QType::Q8_0 | QType::Q4_0 => 32,
            QType::Q4_K | QType::Q5_K | QType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4_K => 144,
            QType::Q5_K => 176,
            QType::Q6_K => 210,
        }
    }

    /// Lower-case name as users type it (`q8_0`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4_K => "q4_k",
            QType::Q5_K => "q5_k",
            QType::Q6_K => "q6_k",
        }
    }

    /// Parses a name (any case).
    pub fn from_name(s: &str) -> Option<Self> {
        ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(s))
    }

    /// Bytes of a row of `n` elements, if `n` is a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems())
            .then(|| n / self.block_elems() * self.block_bytes())
    }

    /// The type rows of `cols` elements are stored in when this one is asked for: itself when
    /// they are whole blocks, else `Q8_0` when they are whole blocks of that, else none (they
    /// stay as stored).
    pub fn fitting(self, cols: usize) -> Option<QType> {
        [self, QType::Q8_0]
            .into_iter()
            .find(|q| cols.is_multiple_of(q.block_elems()))
    }

    /// Whether activations for this type are quantized in 256-element blocks.
    pub fn is_k(self) -> bool {
        self.block_elems() == 256
    }
}

/// Rounds half away from zero, like C's `roundf` (and `f32::round`), without a libm call on
/// baseline x86-64; exact for every finite value (beyond 2^23 all floats are integers already).
#[inline(always)]
pub fn round_away(v: f32) -> f32 {
    if v.abs() >= 8_388_608.0 || v.is_nan() {
        return v;
    }
    let t = v as i32 as f32;
    let f = v - t;
    if f >= 0.5 {
        t + 1.0
    } else if f <= -0.5 {
        t - 1.0
    } else {
        t.copysign(v)
    }
}

/// `round_away(v) as i8` without branches, so the activation quantizer vectorizes: truncate,
/// then step away from zero when the exact remainder is at least one half. Equal to
/// `round_away(v) as i8` for every `f32` (saturating at the ends, NaN to 0; tested).
#[inline(always)]
pub fn round_to_i8(v: f32) -> i8 {
    let t = v as i32 as f32;
    let f = v - t;
    let up = f32::from(u8::from(f >= 0.5)) - f32::from(u8::from(f <= -0.5));
    (t + up) as i8
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) from a K-quant's 12 packed bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 6-bit unsigned quants of a `Q6_K` block, element order.
#[inline(always)]
pub(crate) fn q6_values(blk: &[u8]) -> [u8; 256] {
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    let mut q = [0u8; 256];
    for h in 0..2 {
        for l in 0..32 {
            let (a, b, hb) = (ql[64 * h + l], ql[64 * h + 32 + l], qh[32 * h + l]);
            q[128 * h + l] = (a & 0xF) | ((hb & 3) << 4);
            q[128 * h + 32 + l] = (b & 0xF) | (((hb >> 2) & 3) << 4);
            q[128 * h + 64 + l] = (a >> 4) | (((hb >> 4) & 3) << 4);
            q[128 * h + 96 + l] = (b >> 4) | (((hb >> 6) & 3) << 4);
        }
    }
    q
}

/// The 4- or 5-bit unsigned quants of a `Q4_K`/`Q5_K` block's data part, element order.
#[inline(always)]
pub(crate) fn k45_values(qs: &[u8], qh: Option<&[u8]>) -> [u8; 256] {
    let mut q = [0u8; 256];
    for c in 0..4 {
        for l in 0..32 {
            let b = qs[32 * c + l];
            q[64 * c + l] = b & 0xF;
            q[64 * c + 32 + l] = b >> 4;
            if let Some(h) = qh {
                q[64 * c + l] |= ((h[l] >> (2 * c)) & 1) << 4;
                q[64 * c + 32 + l] |= ((h[l] >> (2 * c + 1)) & 1) << 4;
            }
        }
    }
    q
}

/// Dequantizes whole blocks: `out.len()` must be `data.len() / block_bytes * block_elems`.
/// The float operations are those of ggml's reference (products, no fused multiply-adds), so the
/// result matches the `gguf` Python package bit for bit.
///
/// # Panics
/// When the lengths disagree (a caller bug).
pub fn dequantize(q: QType, data: &[u8], out: &mut [f32]) {
    let (be, bb) = (q.block_elems(), q.block_bytes());
    assert_eq!(data.len() % bb, 0, "dequantize: partial block");
    assert_eq!(data.len() / bb * be, out.len(), "dequantize: output size");
    for (blk, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        match q {
            QType::Q8_0 => {
                let d = f16_at(blk, 0);
                for (o, &v) in y.iter_mut().zip(&blk[2..]) {
                    *o = f32::from(v as i8) * d;
                }
            }
            QType::Q4_0 => {
                let d = f16_at(blk, 0);
                for (i, &v) in blk[2..].iter().enumerate() {
                    y[i] = d * f32::from((v & 0xF) as i8 - 8);
                    y[i + 16] = d * f32::from((v >> 4) as i8 - 8);
                }
            }
            QType::Q4_K | QType::Q5_K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let vals = if q == QType::Q5_K {
                    k45_values(&blk[48..], Some(&blk[16..48]))
                } else {
                    k45_values(&blk[16..], None)
                };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, scales);
                    let (ds, dm) = (d * f32::from(sc), dmin * f32::from(m));
                    for l in 0..32 {
                        y[32 * j + l] = ds * f32::from(vals[32 * j + l]) - dm;
                    }
                }
            }
            QType::Q6_K => {
                let d = f16_at(blk, 208);
                let vals = q6_values(blk);
                for j in 0..16 {
                    let ds = d * f32::from(blk[192 + j] as i8);
                    for l in 0..16 {
                        y[16 * j + l] = ds * f32::from(vals[16 * j + l] as i8 - 32);
                    }
                }
            }
        }
    }
}

/// Quantizes `x` (a whole number of blocks) to `q`, appending the blocks to `out`.
///
/// `Q8_0` and `Q4_0` follow ggml's reference rounding. The K types use a simple search of our
/// own for each sub-block's scale and min (a few candidate ranges, keeping the one with the
/// least squared error); it is not llama.cpp's importance-weighted search.
///
/// # Panics
/// When `x` is not a whole number of blocks.
pub fn quantize(q: QType, x: &[f32], out: &mut Vec<u8>) {
    let be = q.block_elems();
    assert_eq!(x.len() % be, 0, "quantize: partial block");
    out.reserve(x.len() / be * q.block_bytes());
    for blk in x.chunks_exact(be) {
        match q {
            QType::Q8_0 => quantize_q8_0(blk, out),
            QType::Q4_0 => quantize_q4_0(blk, out),
            QType::Q4_K => quantize_k45(blk, 4, out),
            QType::Q5_K => quantize_k45(blk, 5, out),
            QType::Q6_K => quantize_q6_k(blk, out),
        }
    }
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    push_f16(out, d);
    out.extend(x.iter().map(|v| round_away(v * id) as i8 as u8));
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The element of largest magnitude maps to -8 exactly (its sign kept in d).
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    push_f16(out, d);
    let qv = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    for i in 0..16 {
        out.push(qv(x[i]) | (qv(x[i + 16]) << 4));
    }
}

/// Best (scale, min) for `x` on `levels` unsigned levels: `x ~ scale * q - min`, min >= 0.
fn fit_scale_min(x: &[f32], levels: u32) -> (f32, f32) {
    let lo = x.iter().fold(f32::INFINITY, |m, &v| m.min(v)).min(0.0);
    let hi = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let nmax = (levels - 1) as f32;
    if hi <= lo {
        return (0.0, -lo);
    }
    let mut best = (f32::INFINITY, (hi - lo) / nmax, -lo);
    // Shrinking the range slightly often lowers the error (outliers clip, the rest gain levels).
    for step in 0..8 {
        let shrink = 1.0 - 0.02 * step as f32;
        let (a, b) = (lo * shrink, hi * shrink);
        let scale = (b - a) / nmax;
        let min = -a;
        let err: f32 = x
            .iter()
            .map(|&v| {
                let qv = round_away((v + min) / scale).clamp(0.0, nmax);
                let e = qv * scale - min - v;
                e * e
            })
            .sum();
        if err < best.0 {
            best = (err, scale, min);
        }
    }
    (best.1, best.2)
}

fn quantize_k45(x: &[f32], bits: u32, out: &mut Vec<u8>) {
    let levels = 1u32 << bits;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        (scales[j], mins[j]) = fit_scale_min(&x[32 * j..32 * j + 32], levels);
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        sc[j] = if d > 0.0 {
            round_away(scales[j] / d).clamp(0.0, 63.0) as u8
        } else {
            0
        };
        mn[j] = if dmin > 0.0 {
            round_away(mins[j] / dmin).clamp(0.0, 63.0) as u8
        } else {
            0
        };
    }
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    let nmax = (levels - 1) as f32;
    let mut qv = [0u8; 256];
    for j in 0..8 {
        let (ds, dm) = (d * f32::from(sc[j]), dmin * f32::from(mn[j]));
        for l in 0..32 {
            let v = x[32 * j + l];
            qv[32 * j + l] = if ds > 0.0 {
                round_away((v + dm) / ds).clamp(0.0, nmax) as u8
            } else {
                0
            };
        }
    }
    push_f16(out, d);
    push_f16(out, dmin);
    out.extend_from_slice(&packed);
    if bits == 5 {
        let mut qh = [0u8; 32];
        for (j, chunk) in qv.chunks_exact(32).enumerate() {
            for (l, &v) in chunk.iter().enumerate() {
                qh[l] |= ((v >> 4) & 1) << j;
            }
        }
        out.extend_from_slice(&qh);
    }
    for c in 0..4 {
        for l in 0..32 {
            out.push((qv[64 * c + l] & 0xF) | ((qv[64 * c + 32 + l] & 0xF) << 4));
        }
    }
}

fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    // Per 16 elements a signed scale mapping the largest magnitude to -32; the scales themselves
    // are 8-bit with one f16 super-scale.
    let mut sub = [0f32; 16];
    for (j, s) in sub.iter_mut().enumerate() {
        let max = x[16 * j..16 * j + 16]
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        *s = max / -32.0;
    }
    let amax = sub
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(amax / -128.0).to_f32();
    let mut sc = [0i8; 16];
    for j in 0..16 {
        sc[j] = if d != 0.0 {
            round_away(sub[j] / d).clamp(-128.0, 127.0) as i8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for j in 0..16 {
        let ds = d * f32::from(sc[j]);
        for l in 0..16 {
            let v = x[16 * j + l];
            q[16 * j + l] = if ds != 0.0 {
                (round_away(v / ds).clamp(-32.0, 31.0) as i32 + 32) as u8
            } else {
                32
            };
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * h + 32 * k + l];
            ql[64 * h + l] = (v(0) & 0xF) | ((v(2) & 0xF) << 4);
            ql[64 * h + 32 + l] = (v(1) & 0xF) | ((v(3) & 0xF) << 4);
            qh[32 * h + l] =
                (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    push_f16(out, d);
}

/// One run of whole blocks [`QActs::new`] quantizes on its own: values, their bytes, scales
/// and 16-sums.
type QuantRun<'a> = (&'a [f32], &'a mut [i8], &'a mut [f32], &'a mut [i16]);

/// Activation values from which [`QActs::new`] quantizes on the rayon pool.
const PAR_QUANT: usize = 1 << 16;

/// Quantizes whole blocks of `block` values `x` into `qv` with one scale each in `d` and, when
/// `sums16` is not empty, the exact sums of each 16 quantized values there.
fn quantize_acts(block: usize, x: &[f32], qv: &mut [i8], d: &mut [f32], sums16: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    let simd = crate::kernels::has_avx512bw();
    for ((xb, qb), db) in x
        .chunks_exact(block)
        .zip(qv.chunks_exact_mut(block))
        .zip(d.iter_mut())
    {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512 F/BW detected; both blocks have `block` (32 or 256) values.
            *db = unsafe { crate::kernels::quantize_block_512(xb, qb) } / 127.0;
            continue;
        }
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = round_to_i8(v * id);
        }
        *db = amax / 127.0;
    }
    for (s, c) in sums16.iter_mut().zip(qv.chunks_exact(16)) {
        *s = c.iter().fold(0i16, |s, &v| s + i16::from(v));
    }
}

/// Activations quantized to 8 bits for the integer dot products against one weight type.
pub struct QActs {
    /// Elements per activation block (32 or 256).
    pub block: usize,
    /// Values per token.
    pub cols: usize,
    /// Quantized values, `[n_tokens * cols]`.
    pub q: Vec<i8>,
    /// One scale per block, `[n_tokens * cols / block]`.
    pub d: Vec<f32>,
    /// Exact sums of each 16 quantized values (K types only), `[n_tokens * cols / 16]`.
    pub sums16: Vec<i16>,
}

impl QActs {
    /// Quantizes `n_tokens` rows of `cols` activations for products with weights of type `q`.
    ///
    /// # Panics
    /// When `cols` is not a whole number of `q`'s blocks or `x` is not `n_tokens * cols` long.
    pub fn new(q: QType, x: &[f32], cols: usize) -> Self {
        let block = q.block_elems();
        assert!(cols.is_multiple_of(block), "activations: partial block");
        assert!(
            cols == 0 || x.len().is_multiple_of(cols),
            "activations: size"
        );
        let k = q.is_k();
        let mut qv = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / block];
        let mut sums16 = vec![0i16; if k { x.len() / 16 } else { 0 }];
        // Blocks are quantized independently, so large inputs are split into runs of whole
        // blocks on the rayon pool: the same bytes in any split.
        let threads = rayon::current_num_threads();
        if threads > 1 && x.len() >= PAR_QUANT && !crate::kernels::in_serial() {
            let run = x.len().div_ceil(4 * threads).div_ceil(block) * block;
            let mut parts: Vec<QuantRun<'_>> = Vec::new();
            let (mut qr, mut dr, mut sr) = (&mut qv[..], &mut d[..], &mut sums16[..]);
            for xs in x.chunks(run) {
                let (qa, qb) = std::mem::take(&mut qr).split_at_mut(xs.len());
                let (da, db) = std::mem::take(&mut dr).split_at_mut(xs.len() / block);
                let (sa, sb) =
                    std::mem::take(&mut sr).split_at_mut(if k { xs.len() / 16 } else { 0 });
                parts.push((xs, qa, da, sa));
                (qr, dr, sr) = (qb, db, sb);
            }
            use rayon::prelude::*;
            parts
                .into_par_iter()
                .for_each(|(xs, qs, ds, ss)| quantize_acts(block, xs, qs, ds, ss));
        } else {
            quantize_acts(block, x, &mut qv, &mut d, &mut sums16);
        }
        QActs {
            block,
            cols,
            q: qv,
            d,
            sums16,
        }
    }

    /// Number of tokens held.
    pub fn n_tokens(&self) -> usize {
        self.q.len().checked_div(self.cols).unwrap_or(0)
    }

    /// Whether these activations are the form products with weights of type `q` take: blocks
    /// of its size (the K types' 256 come with 16-sums, as [`Self::new`] makes them).
    pub fn fits(&self, q: QType) -> bool {
        self.block == q.block_elems()
    }

    /// Tokens `tokens` of these activations, in that order: the same values as quantizing
    /// those tokens' rows alone (every block is quantized on its own).
    ///
    /// # Panics
    /// When a token index is out of range (a caller bug).
    pub fn gather(&self, tokens: &[usize]) -> QActs {
        let n = self.n_tokens();
        let nb = self.cols / self.block.max(1);
        let s16 = if self.sums16.is_empty() {
            0
        } else {
            self.cols / 16
        };
        let mut q = Vec::with_capacity(tokens.len() * self.cols);
        let mut d = Vec::with_capacity(tokens.len() * nb);
        let mut sums16 = Vec::with_capacity(tokens.len() * s16);
        for &t in tokens {
            assert!(t < n, "activations: token {t} of {n}");
            q.extend_from_slice(&self.q[t * self.cols..(t + 1) * self.cols]);
            d.extend_from_slice(&self.d[t * nb..(t + 1) * nb]);
            sums16.extend_from_slice(&self.sums16[t * s16..(t + 1) * s16]);
        }
        QActs {
            block: self.block,
            cols: self.cols,
            q,
            d,
            sums16,
        }
    }

    /// Token `t`'s quantized values, scales and 16-sums.
    #[inline]
    pub fn token(&self, t: usize) -> (&[i8], &[f32], &[i16]) {
        let nb = self.cols / self.block;
        let s16 = if self.sums16.is_empty() {
            &[][..]
        } else {
            &self.sums16[t * self.cols / 16..(t + 1) * self.cols / 16]
        };
        (
            &self.q[t * self.cols..(t + 1) * self.cols],
            &self.d[t * nb..(t + 1) * nb],
            s16,
        )
    }
}

/// The exact integer parts `(S, M)` of a K-quant block's dot product with 256 quantized
/// activations `x` whose 16-sums are `s16` (see the module docs); the scalar reference.
pub fn k_block_ints(q: QType, blk: &[u8], x: &[i8], s16: &[i16]) -> (i32, i32) {
    match q {
        QType::Q4_K | QType::Q5_K => {
            let vals = if q == QType::Q5_K {
                k45_values(&blk[48..], Some(&blk[16..48]))
            } else {
                k45_values(&blk[16..], None)
            };
            let (mut s, mut m) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, &blk[4..16]);
                let dot: i32 = (0..32)
                    .map(|l| i32::from(vals[32 * j + l]) * i32::from(x[32 * j + l]))
                    .sum();
                s += i32::from(sc) * dot;
                m += i32::from(mn) * (i32::from(s16[2 * j]) + i32::from(s16[2 * j + 1]));
            }
            (s, m)
        }
        QType::Q6_K => {
            let vals = q6_values(blk);
            let mut s = 0i32;
            for j in 0..16 {
                let dot: i32 = (0..16)
                    .map(|l| (i32::from(vals[16 * j + l]) - 32) * i32::from(x[16 * j + l]))
                    .sum();
                s += i32::from(blk[192 + j] as i8) * dot;
            }
            (s, 0)
        }
        QType::Q8_0 | QType::Q4_0 => unreachable!("not a K type"),
    }
}

/// The float scales `(d, dmin)` of a K-quant block.
#[inline(always)]
pub(crate) fn k_block_scales(q: QType, blk: &[u8]) -> (f32, f32) {
    match q {
        QType::Q6_K => (f16_at(blk, 208), 0.0),
        _ => (f16_at(blk, 0), f16_at(blk, 2)),
    }
}

/// Adds one K block's contribution to the canonical lanes.
#[inline(always)]
pub(crate) fn k_accumulate(
    acc: &mut [f32; 4],
    b: usize,
    d: f32,
    dmin: f32,
    dx: f32,
    s: i32,
    m: i32,
) {
    let l = &mut acc[b % 4];
    *l = (d * dx).mul_add(s as f32, *l);
    *l = (-(dmin * dx)).mul_add(m as f32, *l);
}

/// Folds the K lanes in the canonical order.
#[inline(always)]
pub(crate) fn k_fold(acc: &[f32; 4]) -> f32 {
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

/// The signed 8-bit weights of a 32-element block (`Q8_0` or `Q4_0`) and its scale.
#[inline(always)]
pub(crate) fn block32_values(q: QType, blk: &[u8]) -> ([i8; 32], f32) {
    let mut w = [0i8; 32];
    match q {
        QType::Q8_0 => {
            for (o, &v) in w.iter_mut().zip(&blk[2..34]) {
                *o = v as i8;
            }
        }
        _ => {
            for (i, &v) in blk[2..18].iter().enumerate() {
                w[i] = (v & 0xF) as i8 - 8;
                w[i + 16] = (v >> 4) as i8 - 8;
            }
        }
    }
    (w, f16_at(blk, 0))
}

/// Reference dot product of one quantized weight row with one token's quantized activations
/// (`x`, `xd`, `s16` from [`QActs::token`]), in the canonical order.
pub fn dot_row_ref(q: QType, row: &[u8], x: &[i8], xd: &[f32], s16: &[i16]) -> f32 {
    let bb = q.block_bytes();
    if q.is_k() {
        let mut acc = [0f32; 4];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let (s, m) = k_block_ints(
                q,
                blk,
                &x[256 * b..256 * b + 256],
                &s16[16 * b..16 * b + 16],
            );
            let (d, dmin) = k_block_scales(q, blk);
            k_accumulate(&mut acc, b, d, dmin, xd[b], s, m);
        }
        k_fold(&acc)
    } else {
        let mut acc = [0f32; LANES];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let (w, dw) = block32_values(q, blk);
            let s = dw * xd[b];
            let xb = &x[32 * b..32 * b + 32];
            for j in 0..8 {
                let p: i32 = (4 * j..4 * j + 4)
                    .map(|i| i32::from(w[i]) * i32::from(xb[i]))
                    .sum();
                let l = &mut acc[8 * (b % 2) + j];
                *l = s.mul_add(p as f32, *l);
            }
        }
        fold_lanes(&acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 1.7 + (i % 7) as f32 * 0.05)
            .collect()
    }

    #[test]
    fn round_trip_error_is_small() {
        let x = wave(1024, 3);
        for q in ALL {
            let mut buf = Vec::new();
            quantize(q, &x, &mut buf);
            assert_eq!(buf.len(), q.row_bytes(1024).unwrap());
            let mut y = vec![0f32; 1024];
            dequantize(q, &buf, &mut y);
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / 1024.0).sqrt();
            let err = (x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / 1024.0)
                .sqrt();
            let bound = match q {
                QType::Q8_0 => 0.01,
                QType::Q6_K => 0.03,
                QType::Q5_K => 0.05,
                QType::Q4_K | QType::Q4_0 => 0.11,
            };
            assert!(err / rms < bound, "{q:?}: relative rms error {}", err / rms);
        }
    }

    #[test]
    fn reference_dot_is_close_to_float_dot() {
        let cols = 512;
        let w = wave(cols, 1);
        let x = wave(cols, 9);
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        for q in ALL {
            let mut buf = Vec::new();
            quantize(q, &w, &mut buf);
            let mut wd = vec![0f32; cols];
            dequantize(q, &buf, &mut wd);
            let deq: f32 = wd.iter().zip(&x).map(|(a, b)| a * b).sum();
            let acts = QActs::new(q, &x, cols);
            let (xq, xd, s16) = acts.token(0);
            let got = dot_row_ref(q, &buf, xq, xd, s16);
            let scale = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>();
            // Only the activations' 8-bit rounding separates `got` from the dequantized product.
            assert!(
                (got - deq).abs() < 0.01 * scale,
                "{q:?}: {got} vs {deq} (exact {exact})"
            );
        }
    }

    #[test]
    fn round_away_is_roundf() {
        let mut v = -300.0f32;
        while v < 300.0 {
            for x in [v, v + 0.5, v - 0.5, f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(round_away(x).to_bits(), x.round().to_bits(), "{x}");
            }
            v += 0.123_7;
        }
        for x in [
            0.499_999_97f32,
            -0.499_999_97,
            0.5,
            -0.5,
            1e9,
            -1e9,
            0.0,
            -0.0,
            f32::INFINITY,
        ] {
            assert_eq!(round_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
        assert!(round_away(f32::NAN).is_nan());
    }

    #[test]
    fn round_to_i8_is_round_away() {
        let mut v = -200.0f32;
        while v < 200.0 {
            for x in [v, v + 0.5, v - 0.5, f32::from_bits(v.to_bits() + 1), -v] {
                assert_eq!(round_to_i8(x), round_away(x) as i8, "{x}");
            }
            v += 0.031_3;
        }
        for x in [
            0.499_999_97f32,
            -0.499_999_97,
            0.5,
            -0.5,
            126.5,
            -126.5,
            127.49,
            127.5,
            -127.5,
            -128.5,
            1e9,
            -1e9,
            3e38,
            -3e38,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(round_to_i8(x), round_away(x) as i8, "{x}");
        }
    }

    #[test]
    fn names_parse() {
        for q in ALL {
            assert_eq!(QType::from_name(q.name()), Some(q));
            assert_eq!(QType::from_name(&q.name().to_uppercase()), Some(q));
        }
        assert_eq!(QType::from_name("q3_k"), None);
    }
}
