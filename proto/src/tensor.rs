//! Activations and outputs on the wire: raw little-endian bytes beside a small header.

use crate::{ProtoError, Result};

/// `values` as little-endian f32 bytes.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Little-endian f32 bytes back into values; the length must be a multiple of 4 and, when
/// `expected` is given, hold exactly that many values.
pub fn f32_from_le_bytes(bytes: &[u8], expected: Option<usize>) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ProtoError::BadTensor {
            msg: format!("{} bytes are not a whole number of f32 values", bytes.len()),
        });
    }
    let n = bytes.len() / 4;
    if let Some(want) = expected
        && want != n
    {
        return Err(ProtoError::BadTensor {
            msg: format!("expected {want} f32 values, got {n}"),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_bit() {
        let v = [
            0.0,
            -0.0,
            1.5,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            1e-42,
        ];
        let b = f32_to_le_bytes(&v);
        assert_eq!(&b[8..12], &1.5f32.to_le_bytes());
        let back = f32_from_le_bytes(&b, Some(v.len())).unwrap();
        assert!(v.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn lengths_are_checked() {
        assert!(f32_from_le_bytes(&[0; 7], None).is_err());
        assert!(f32_from_le_bytes(&[0; 8], Some(3)).is_err());
        assert_eq!(f32_from_le_bytes(&[], Some(0)).unwrap(), Vec::<f32>::new());
    }
}
