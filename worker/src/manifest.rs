//! Weight integrity: a manifest of BLAKE3 hashes, one per tensor, with the model fingerprint.
//!
//! `moeshard manifest DIR` writes one (by default `DIR/moeshard.manifest.json`) from a checkpoint
//! known to be good; `moeshard verify DIR` checks a checkpoint against it; a worker finding one
//! beside its checkpoint checks every tensor it is assigned before it serves it, and refuses a
//! mismatch naming the tensor. Hashes are over the tensor's stored bytes (its range of the
//! safetensors file), so a flipped byte anywhere in a tensor is caught, and so is a tensor moved
//! to other bytes.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use moeshard_engine::safetensors::Checkpoint;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Result, WorkerError};

/// File name of a checkpoint's manifest, in its directory.
pub const MANIFEST_FILE: &str = "moeshard.manifest.json";

/// The `format` field of manifests this build writes and reads.
pub const FORMAT: &str = "moeshard-manifest/1";

/// Largest manifest file read (a model with a million tensors fits).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Bytes read at a time while hashing.
const CHUNK: usize = 1 << 20;

/// A checkpoint's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The model fingerprint (config and tensor index) the hashes belong to.
    pub model_fingerprint: String,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// One tensor of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The safetensors file holding it, relative to the checkpoint directory.
    pub file: String,
    /// Stored bytes.
    pub bytes: u64,
    /// Hex BLAKE3 of the stored bytes.
    pub blake3: String,
}

/// A tensor that does not match its manifest entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The tensor's name.
    pub tensor: String,
    /// Its file.
    pub file: PathBuf,
    /// What differs.
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tensor {} in {}: {}",
            self.tensor,
            self.file.display(),
            self.what
        )
    }
}

fn io_err(path: &Path, e: std::io::Error) -> WorkerError {
    WorkerError::Manifest {
        msg: format!("{}: {e}", path.display()),
    }
}

/// Hex BLAKE3 of `len` bytes of `path` from `start`, reporting progress in bytes.
pub fn hash_range(
    path: &Path,
    start: u64,
    len: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| io_err(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = f.read(&mut buf[..want]).map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Err(WorkerError::Manifest {
                msg: format!(
                    "{}: ends {left} bytes before the tensor at {start}+{len}",
                    path.display()
                ),
            });
        }
        h.update(&buf[..n]);
        left -= n as u64;
        progress(n as u64);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Bytes of every tensor of `ckpt` (for a progress bar's length).
pub fn total_bytes(ckpt: &Checkpoint) -> u64 {
    ckpt.names()
        .filter_map(|n| ckpt.info(n))
        .map(|(_, i)| i.len as u64)
        .sum()
}

/// Hashes every tensor of the checkpoint in `dir` (in parallel).
pub fn build(
    dir: &Path,
    ckpt: &Checkpoint,
    fingerprint: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Manifest> {
    if ckpt.is_synthetic() {
        return Err(WorkerError::Manifest {
            msg: "synthetic weights have no bytes to hash".into(),
        });
    }
    let names: Vec<&str> = ckpt.names().collect();
    let entries: Vec<(String, TensorEntry)> = names
        .par_iter()
        .map(|&name| {
            let (path, info) = ckpt.info(name).ok_or_else(|| WorkerError::Manifest {
                msg: format!("tensor {name} is in the index but not in a file"),
            })?;
            let hash = hash_range(path, info.start as u64, info.len as u64, progress)?;
            Ok((
                name.to_string(),
                TensorEntry {
                    file: relative(dir, path),
                    bytes: info.len as u64,
                    blake3: hash,
                },
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Manifest {
        format: FORMAT.to_string(),
        model_fingerprint: fingerprint.to_string(),
        tensors: entries.into_iter().collect(),
    })
}

/// Reads a manifest file.
pub fn load(path: &Path) -> Result<Manifest> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(WorkerError::Manifest {
            msg: format!(
                "{}: {} bytes is more than a manifest may have ({MAX_MANIFEST_BYTES})",
                path.display(),
                meta.len()
            ),
        });
    }
    let text = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| WorkerError::Manifest {
        msg: format!("{}: not a manifest: {e}", path.display()),
    })?;
    if m.format != FORMAT {
        return Err(WorkerError::Manifest {
            msg: format!(
                "{}: format {:?}, this build reads {FORMAT:?}",
                path.display(),
                m.format
            ),
        });
    }
    Ok(m)
}

/// Checks `names` (every tensor when `None`) of `ckpt` against `manifest`, in parallel; returns
/// the mismatches, sorted by tensor name. A tensor the manifest lacks is a mismatch, and so is a
/// manifest entry the checkpoint lacks (when checking everything).
pub fn verify(
    ckpt: &Checkpoint,
    manifest: &Manifest,
    names: Option<&[String]>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Mismatch>> {
    let all: Vec<String>;
    let names: &[String] = match names {
        Some(n) => n,
        None => {
            all = ckpt.names().map(str::to_string).collect();
            &all
        }
    };
    let mut out: Vec<Mismatch> = names
        .par_iter()
        .map(|name| -> Result<Option<Mismatch>> {
            let Some((path, info)) = ckpt.info(name) else {
                return Ok(Some(Mismatch {
                    tensor: name.clone(),
                    file: PathBuf::new(),
                    what: "not in the checkpoint".into(),
                }));
            };
            let mismatch = |what: String| {
                Ok(Some(Mismatch {
                    tensor: name.clone(),
                    file: path.to_path_buf(),
                    what,
                }))
            };
            let Some(want) = manifest.tensors.get(name) else {
                return mismatch("not in the manifest".into());
            };
            if want.bytes != info.len as u64 {
                return mismatch(format!(
                    "{} bytes, the manifest says {}",
                    info.len, want.bytes
                ));
            }
            let got = hash_range(path, info.start as u64, info.len as u64, progress)?;
            if got != want.blake3 {
                return mismatch(format!(
                    "BLAKE3 {got} differs from the manifest's {}",
                    want.blake3
                ));
            }
            Ok(None)
        })
        .filter_map(|r| r.transpose())
        .collect::<Result<_>>()?;
    if names.len() == ckpt.names().count() {
        for name in manifest.tensors.keys() {
            if !ckpt.contains(name) {
                out.push(Mismatch {
                    tensor: name.clone(),
                    file: PathBuf::new(),
                    what: "in the manifest but not in the checkpoint".into(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.tensor.cmp(&b.tensor));
    Ok(out)
}
