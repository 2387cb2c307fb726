//! GPT-OSS's native MXFP4 expert weights (OCP microscaling, FP4 E2M1 elements, one E8M0 shared
//! exponent per 32 elements).
//!
//! A weight `[E, out, in]` is stored as `<name>_blocks` (`u8 [E, out, in/32, 16]`, two elements per
//! byte, the low nibble first) and `<name>_scales` (`u8 [E, out, in/32]`, the exponent biased by
//! 127): `w = fp4(nibble) * 2^(scale - 127)`. Decoding is exact in f32; weights are decoded at load
//! into owned f32 tensors (4 bytes per weight instead of half a byte: a kernel over the packed
//! bytes is future work).

use crate::error::{EngineError, Result};
use crate::safetensors::Checkpoint;
use crate::tensor::DType;

/// Elements sharing one exponent.
pub const BLOCK: usize = 32;

/// The sixteen E2M1 values, by nibble.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decodes `rows` rows of `blocks` (`rows * in/32 * 16` bytes) with their `scales`
/// (`rows * in/32` bytes) into row-major f32 `[rows, in]`.
pub fn dequantize_rows(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let groups = cols / BLOCK;
    let mut out = vec![0f32; rows * cols];
    for (g, (o, b)) in out
        .chunks_exact_mut(BLOCK)
        .zip(blocks.chunks_exact(BLOCK / 2))
        .enumerate()
        .take(rows * groups)
    {
        let s = 2f32.powi(i32::from(scales[g]) - 127);
        for (pair, &byte) in o.chunks_exact_mut(2).zip(b) {
            pair[0] = FP4_VALUES[(byte & 0x0f) as usize] * s;
            pair[1] = FP4_VALUES[(byte >> 4) as usize] * s;
        }
    }
    out
}

/// Expert `e` of the MXFP4 weight `name` (`<name>_blocks`, `<name>_scales` in `ckpt`) as
/// row-major f32 `[out, in]`, checking every shape.
pub fn load_expert(
    ckpt: &Checkpoint,
    name: &str,
    e: usize,
    experts: usize,
    out_dim: usize,
    in_dim: usize,
) -> Result<Vec<f32>> {
    let bname = format!("{name}_blocks");
    let sname = format!("{name}_scales");
    let (binfo, blocks) = ckpt.raw(&bname)?;
    let (sinfo, scales) = ckpt.raw(&sname)?;
    let groups = in_dim / BLOCK;
    let bad = |n: &str, msg: String| EngineError::BadTensor {
        name: n.to_string(),
        msg,
    };
    if !in_dim.is_multiple_of(BLOCK) {
        return Err(bad(
            &bname,
            format!("input width {in_dim} is not a multiple of the {BLOCK}-element MXFP4 block"),
        ));
    }
    let want_b = [experts, out_dim, groups, BLOCK / 2];
    if binfo.dtype != DType::U8 || binfo.shape != want_b {
        return Err(bad(
            &bname,
            format!(
                "expected U8 {want_b:?}, found {} {:?}",
                binfo.dtype.name(),
                binfo.shape
            ),
        ));
    }
    let want_s = [experts, out_dim, groups];
    if sinfo.dtype != DType::U8 || sinfo.shape != want_s {
        return Err(bad(
            &sname,
            format!(
                "expected U8 {want_s:?}, found {} {:?}",
                sinfo.dtype.name(),
                sinfo.shape
            ),
        ));
    }
    let per_b = out_dim * groups * BLOCK / 2;
    let per_s = out_dim * groups;
    Ok(dequantize_rows(
        &blocks[e * per_b..(e + 1) * per_b],
        &scales[e * per_s..(e + 1) * per_s],
        out_dim,
        in_dim,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_low_first_scaled_by_the_shared_exponent() {
        // one row of 32 elements: bytes 0x21 -> (0.5, 1.0), 0xf7 -> (6.0, -6.0), rest 0x98
        let mut blocks = vec![0x98u8; 16];
        blocks[0] = 0x21;
        blocks[1] = 0xf7;
        let w = dequantize_rows(&blocks, &[128], 1, 32); // 2^1
        assert_eq!(&w[..4], &[1.0, 2.0, 12.0, -12.0]);
        assert_eq!(w[4].to_bits(), (-0.0f32).to_bits()); // nibble 8 is -0
        assert_eq!(w[5], -1.0);
        let w = dequantize_rows(&blocks, &[125], 1, 32); // 2^-2
        assert_eq!(&w[..2], &[0.125, 0.25]);
    }

    #[test]
    fn rows_and_groups_take_their_own_scale() {
        let blocks = vec![0x22u8; 2 * 2 * 16]; // all 1.0
        let w = dequantize_rows(&blocks, &[127, 128, 129, 126], 2, 64);
        assert_eq!((w[0], w[31], w[32], w[63]), (1.0, 1.0, 2.0, 2.0));
        assert_eq!((w[64], w[96], w[127]), (4.0, 0.5, 0.5));
    }
}
