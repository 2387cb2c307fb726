//! A model's fingerprint: what a coordinator and its workers compare before they cooperate.
//!
//! BLAKE3 over the bytes of `config.json` and the sorted tensor index (name, dtype, shape) of the
//! checkpoint. No weight bytes are read, so it costs the same for a tiny model and a 600 GB one;
//! checking weights against their hashes is a separate, slower step.

use std::path::Path;

use crate::config::config_path;
use crate::error::{EngineError, Result};
use crate::safetensors::Checkpoint;

/// Domain separation, bumped if the hashed layout ever changes.
const DOMAIN: &[u8] = b"moeshard model fingerprint v1\0";

/// Hex BLAKE3 fingerprint of the checkpoint in `dir` (already opened as `ckpt`).
pub fn model_fingerprint(dir: &Path, ckpt: &Checkpoint) -> Result<String> {
    // A GGUF file describes itself in its header (metadata and tensor directory).
    if let Some(g) = ckpt.gguf() {
        return Ok(fingerprint_of(g.file().header_bytes(), ckpt));
    }
    let path = if ckpt.is_synthetic() {
        ckpt.config_file()
    } else {
        config_path(dir)
    };
    let config = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
    Ok(fingerprint_of(&config, ckpt))
}

/// Fingerprint of given config bytes and a checkpoint's tensor index.
pub fn fingerprint_of(config_json: &[u8], ckpt: &Checkpoint) -> String {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    // Every variable-length field is length-prefixed so no two inputs hash the same bytes.
    h.update(&(config_json.len() as u64).to_le_bytes());
    h.update(config_json);
    let mut names: Vec<&str> = ckpt.names().collect();
    names.sort_unstable();
    if let Some(seed) = ckpt.synthetic_seed() {
        h.update(b"synthetic weights, seed");
        h.update(&seed.to_le_bytes());
    }
    if let Some(q) = ckpt.quantize() {
        h.update(b"quantized on load to");
        h.update(q.qtype.name().as_bytes());
        h.update(&[u8::from(q.all)]);
    }
    h.update(&(names.len() as u64).to_le_bytes());
    for name in names {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        if let Some((_, info)) = ckpt.info(name) {
            h.update(info.dtype.name().as_bytes());
            h.update(&(info.shape.len() as u64).to_le_bytes());
            for &d in &info.shape {
                h.update(&(d as u64).to_le_bytes());
            }
        }
    }
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    fn fp(dir: &Path) -> String {
        let ckpt = Checkpoint::open(dir).unwrap();
        model_fingerprint(dir, &ckpt).unwrap()
    }

    #[test]
    fn fingerprints_are_stable_and_tell_models_apart() {
        let names = ["qwen3_moe_tiny", "qwen3_moe_hf4_config", "mixtral_tiny"];
        let fps: Vec<String> = names.iter().map(|n| fp(&fixture(n))).collect();
        for (n, f) in names.iter().zip(&fps) {
            assert_eq!(f.len(), 64, "{n}: {f}");
            assert_eq!(*f, fp(&fixture(n)), "{n}: not stable");
        }
        assert_ne!(fps[0], fps[1]);
        assert_ne!(fps[0], fps[2]);
        assert_ne!(fps[1], fps[2]);
    }

    #[test]
    fn config_bytes_matter() {
        let dir = fixture("qwen3_moe_tiny");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let config = std::fs::read(dir.join("config.json")).unwrap();
        let mut other = config.clone();
        other.push(b'\n');
        assert_eq!(fingerprint_of(&config, &ckpt), fp(&dir));
        assert_ne!(
            fingerprint_of(&config, &ckpt),
            fingerprint_of(&other, &ckpt)
        );
    }
}
