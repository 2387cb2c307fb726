//! Dequantization and quantization against the `gguf` Python package (llama.cpp's reference in
//! NumPy), from the blocks in tests/fixtures/quant (made by tests/fixtures/make_quant_fixtures.py).

use std::path::PathBuf;

use moeshard_engine::quant::{self, QType};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/quant")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn dequantization_matches_gguf_python_bit_for_bit() {
    for q in quant::ALL {
        let blocks = fixture(&format!("{}.blocks", q.name()));
        let want = f32s(&fixture(&format!("{}.dequant.f32", q.name())));
        let mut got = vec![0f32; want.len()];
        quant::dequantize(q, &blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{q:?} element {i}: {g} vs {w}");
        }
    }
}

#[test]
fn q8_0_and_q4_0_quantization_match_gguf_python() {
    let x = f32s(&fixture("input.f32"));
    for q in [QType::Q8_0, QType::Q4_0] {
        let want = fixture(&format!("{}.quantized", q.name()));
        let mut got = Vec::new();
        quant::quantize(q, &x, &mut got);
        assert_eq!(got.len(), want.len());
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{q:?}: first differing byte");
    }
}
