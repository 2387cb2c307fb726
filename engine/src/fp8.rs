//! DeepSeek-V3's native FP8 weights: OCP E4M3 ("fn": finite only, `S.1111.111` is NaN) with one
//! float32 inverse scale per 128x128 block, stored beside the weight as `<name>_scale_inv`.
//!
//! Weights are decoded once, at load, into owned float32 tensors: `w = e4m3(q) * scale_inv`,
//! one f32 multiply per element, which is exactly what the reference (transformers with the
//! dequantized weights) computes with. That costs 4x the FP8 bytes in memory; a kernel over the
//! FP8 bytes is future work.

use crate::error::{EngineError, Result};
use crate::safetensors::Checkpoint;
use crate::tensor::{DType, Tensor};

/// Rows and columns of one scale block (`weight_block_size` of the real checkpoints).
pub const BLOCK: usize = 128;

/// The value of one E4M3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        // subnormal: m/8 * 2^-6
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * mag
}

fn table() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// Name of the inverse-scale tensor of weight `name` (`x.weight` -> `x.weight_scale_inv`).
pub fn scale_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

/// Decodes `q` (`rows x cols` E4M3 bytes) with `scale` (`ceil(rows/128) x ceil(cols/128)`
/// inverse scales) into row-major f32.
pub fn dequantize_blocks(
    q: &[u8],
    rows: usize,
    cols: usize,
    scale: &[f32],
    name: &str,
) -> Result<Vec<f32>> {
    let (br, bc) = (rows.div_ceil(BLOCK), cols.div_ceil(BLOCK));
    if q.len() != rows * cols || scale.len() != br * bc {
        return Err(EngineError::BadTensor {
            name: name.into(),
            msg: format!(
                "{} FP8 bytes and {} scales for a {rows}x{cols} weight in {BLOCK}x{BLOCK} blocks (want {} and {})",
                q.len(),
                scale.len(),
                rows * cols,
                br * bc
            ),
        });
    }
    let t = table();
    let mut out = vec![0f32; rows * cols];
    for (r, (orow, qrow)) in out
        .chunks_exact_mut(cols)
        .zip(q.chunks_exact(cols))
        .enumerate()
    {
        let srow = &scale[(r / BLOCK) * bc..(r / BLOCK + 1) * bc];
        for (c, (o, &b)) in orow.iter_mut().zip(qrow).enumerate() {
            *o = t[b as usize] * srow[c / BLOCK];
        }
    }
    Ok(out)
}

/// Loads FP8 weight `name` (raw bytes `raw` of shape `shape`) and its scales from `ckpt`.
pub fn dequantize(ckpt: &Checkpoint, name: &str, shape: &[usize], raw: &[u8]) -> Result<Tensor> {
    let &[rows, cols] = shape else {
        return Err(EngineError::BadTensor {
            name: name.into(),
            msg: format!("an FP8 weight must be 2-D, found shape {shape:?}"),
        });
    };
    let sname = scale_name(name);
    if !ckpt.contains(&sname) {
        return Err(EngineError::BadTensor {
            name: name.into(),
            msg: format!("stored as F8_E4M3 but the checkpoint has no {sname}"),
        });
    }
    let s = ckpt.get(&sname)?;
    let want = [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)];
    if s.shape() != want || s.dtype() == DType::F8E4M3 {
        return Err(EngineError::BadTensor {
            name: sname,
            msg: format!(
                "expected {want:?} block scales of a {rows}x{cols} weight, found {:?} {}",
                s.shape(),
                s.dtype().name()
            ),
        });
    }
    let data = dequantize_blocks(raw, rows, cols, &s.to_f32_vec(), name)?;
    Ok(Tensor::from_f32(name, vec![rows, cols], &data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_of_known_codes() {
        // (byte, value) from the OCP 8-bit floating point specification's E4M3 column.
        let cases: &[(u8, f32)] = &[
            (0x00, 0.0),
            (0x01, 2f32.powi(-9)), // smallest subnormal
            (0x07, 0.875 * 2f32.powi(-6)),
            (0x08, 2f32.powi(-6)), // smallest normal
            (0x38, 1.0),
            (0x40, 2.0),
            (0x7e, 448.0), // largest finite
            (0xb8, -1.0),
            (0xfe, -448.0),
        ];
        for &(b, v) in cases {
            assert_eq!(e4m3_to_f32(b).to_bits(), v.to_bits(), "byte {b:#04x}");
        }
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
        // every other code is finite and the positive codes increase
        let pos: Vec<f32> = (0u8..0x7f).map(e4m3_to_f32).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn blocks_scale_their_own_rows_and_columns() {
        // 130 x 129: four blocks, three of them partial.
        let (rows, cols) = (130, 129);
        let q = vec![0x38u8; rows * cols]; // all 1.0
        let scale = [1.0f32, 2.0, 3.0, 4.0];
        let w = dequantize_blocks(&q, rows, cols, &scale, "w").unwrap();
        assert_eq!(w[0], 1.0);
        assert_eq!(w[127], 1.0);
        assert_eq!(w[128], 2.0);
        assert_eq!(w[127 * cols + 128], 2.0);
        assert_eq!(w[128 * cols], 3.0);
        assert_eq!(w[129 * cols + 128], 4.0);
        assert!(dequantize_blocks(&q, rows, cols, &scale[..3], "w").is_err());
        assert!(dequantize_blocks(&q[1..], rows, cols, &scale, "w").is_err());
    }
}
