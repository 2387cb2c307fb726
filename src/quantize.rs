//! `moeshard quantize IN OUT.gguf --type T`: writes a GGUF file llama.cpp loads, from either
//! - a GGUF file: its float matrices requantized, everything else (metadata, tokenizer, names,
//!   norms, routers) kept as it is; or
//! - a Hugging Face checkpoint directory (qwen3_moe, qwen2_moe, mixtral): converted as llama.cpp's
//!   converter would (architecture and tokenizer metadata, tensor names, stacked experts, the
//!   llama Q/K row permutation), the matrices in the type asked, norms and routers in f32.
//!
//! One output tensor at a time is held in memory; the file is written under a temporary name and
//! renamed when complete.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use moeshard_engine::gguf::{GgmlType, GgufFile, TensorEntry, Value, write_streaming};
use moeshard_engine::gguf_export::{self, ExportTensor, Source, encode, permute_rows};
use moeshard_engine::quant::QType;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_engine::{DType, Tensor};

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// Input: a GGUF file (its F32, F16 and BF16 matrices are converted; other types are copied)
    /// or a Hugging Face checkpoint directory (qwen3_moe, qwen2_moe or mixtral).
    input: PathBuf,
    /// Output GGUF file (written next to it under a temporary name, then renamed).
    output: PathBuf,
    /// Type of the matrices: a block type, or a float type (a plain conversion).
    #[arg(long = "type", value_parser = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "f32", "f16", "bf16"])]
    ty: String,
    /// Convert only the routed experts' stacked tensors; keep the dense weights as stored.
    #[arg(long)]
    experts_only: bool,
}

/// The type `--type` names.
fn dtype_named(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        q => DType::from_quant(QType::from_name(q).context("quantization type")?),
    })
}

fn ggml_type(d: DType) -> Result<GgmlType> {
    Ok(match d {
        DType::F32 => GgmlType::F32,
        DType::F16 => GgmlType::F16,
        DType::BF16 => GgmlType::BF16,
        other => match other.quant() {
            Some(QType::Q8_0) => GgmlType::Q8_0,
            Some(QType::Q4_0) => GgmlType::Q4_0,
            Some(QType::Q4_K) => GgmlType::Q4_K,
            Some(QType::Q5_K) => GgmlType::Q5_K,
            Some(QType::Q6_K) => GgmlType::Q6_K,
            None => bail!("{} has no GGUF type", other.name()),
        },
    })
}

/// llama.cpp's `general.file_type` for a file mostly of this type.
fn file_type(d: DType) -> u32 {
    match d.quant() {
        Some(QType::Q4_0) => 2,
        Some(QType::Q8_0) => 7,
        Some(QType::Q4_K) => 14,
        Some(QType::Q5_K) => 16,
        Some(QType::Q6_K) => 18,
        None => match d {
            DType::F16 => 1,
            DType::BF16 => 32,
            _ => 0,
        },
    }
}

/// What a matrix with rows of `cols` becomes under `--type to`: block types fall back (to Q8_0,
/// or to the stored type) where rows are not whole blocks.
fn matrix_type(to: DType, cols: usize) -> Option<DType> {
    match to.quant() {
        Some(q) => q.fitting(cols).map(DType::from_quant),
        None => Some(to),
    }
}

/// `moeshard quantize`.
pub(crate) fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let to = dtype_named(&a.ty)?;
    let started = Instant::now();
    let (n_converted, n_tensors, bytes_in, bytes_out) = if a.input.is_dir() {
        from_checkpoint(&a, to)?
    } else {
        from_gguf(&a, to)?
    };
    println!(
        "wrote {}: {} of {} tensors converted to {}, {:.1} MB -> {:.1} MB in {:.1} s",
        a.output.display(),
        n_converted,
        n_tensors,
        a.ty,
        bytes_in as f64 / 1e6,
        bytes_out as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `entries` (data from `data`) under a temporary name and renames it to `out`; on any
/// failure the partial file is removed.
fn write_file(
    out: &Path,
    metadata: &[(String, Value)],
    entries: &[TensorEntry],
    data: impl FnMut(usize) -> moeshard_engine::Result<Vec<u8>>,
) -> Result<()> {
    let tmp = out.with_extension("gguf.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let result = write_streaming(&mut w, metadata, entries, data)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            use std::io::Write;
            w.flush().context("flushing the output")?;
            drop(w);
            std::fs::rename(&tmp, out)
                .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
        });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    Ok(())
}

/// The float dtype of a GGUF tensor type (None for block types).
fn float_dtype(t: GgmlType) -> Option<DType> {
    moeshard_engine::gguf_model::dtype_of(t).filter(|d| d.quant().is_none())
}

/// A GGUF file requantized: (tensors converted, tensors, bytes in, bytes out).
fn from_gguf(a: &QuantizeArgs, to: DType) -> Result<(usize, usize, u64, u64)> {
    let f = GgufFile::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    // Matrices (and stacked experts) only; norms, routers and vectors stay.
    let target = |name: &str, ty: GgmlType, dims: &[usize]| -> Option<DType> {
        let current = float_dtype(ty)?;
        if dims.len() < 2 || name.contains("ffn_gate_inp") || name.contains("_norm") {
            return None;
        }
        if a.experts_only && !name.contains("_exps") {
            return None;
        }
        matrix_type(to, dims[0]).filter(|&d| d != current)
    };
    let mut plan = Vec::with_capacity(f.tensors.len());
    let mut entries = Vec::with_capacity(f.tensors.len());
    for (name, info) in &f.tensors {
        let t = target(name, info.ty, &info.dims);
        let (ty, len) = match t {
            Some(d) => {
                let rows = info.numel() / info.dims[0];
                let len = d.bytes_for(&[rows, info.dims[0]]).unwrap_or(0);
                (ggml_type(d)?, len)
            }
            None => (info.ty, info.len),
        };
        entries.push(TensorEntry {
            name: name.clone(),
            ty,
            dims: info.dims.clone(),
            len,
        });
        plan.push((name.clone(), t));
    }
    let mut metadata: Vec<(String, Value)> = f
        .metadata
        .iter()
        .filter(|(k, _)| *k != "general.file_type" && *k != "general.quantization_version")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(file_type(to))));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));

    let (mut n, mut bytes_in, mut bytes_out) = (0usize, 0u64, 0u64);
    write_file(&a.output, &metadata, &entries, |i| {
        let (name, t) = &plan[i];
        let info = &f.tensors[name];
        let raw = f.tensor_bytes(name).unwrap_or_default();
        bytes_in += raw.len() as u64;
        let bytes = match (t, float_dtype(info.ty)) {
            (Some(d), Some(dt)) => {
                let cols = info.dims[0];
                let tensor = Tensor::from_raw(name, dt, vec![info.numel() / cols, cols], raw)?;
                n += 1;
                encode(&tensor, *d)?
            }
            _ => raw.to_vec(),
        };
        bytes_out += bytes.len() as u64;
        tracing::info!(tensor = %name, to = ?t, bytes = bytes.len(), "wrote");
        Ok(bytes)
    })?;
    Ok((n, entries.len(), bytes_in, bytes_out))
}

/// A checkpoint tensor, with llama.cpp's Q/K row permutation applied when asked.
fn source_tensor(ckpt: &Checkpoint, name: &str, permute: Option<usize>) -> Result<Tensor> {
    let t = ckpt.get(name)?;
    let Some(heads) = permute else {
        return Ok(t);
    };
    let rows = t.shape()[0];
    let bytes = permute_rows(t.raw(), t.raw().len() / rows.max(1), heads)
        .with_context(|| format!("permuting {name} for llama.cpp's rope layout"))?;
    Ok(Tensor::from_raw(
        name,
        t.dtype(),
        t.shape().to_vec(),
        &bytes,
    )?)
}

/// The type one exported tensor is written in.
fn export_type(t: &ExportTensor, stored: DType, to: DType, experts_only: bool) -> DType {
    if !t.is_matrix() {
        return DType::F32;
    }
    if experts_only && !t.is_experts() {
        return stored;
    }
    // Rows that are not whole blocks of any type fall back to f16, as llama.cpp's converter does.
    matrix_type(to, t.cols()).unwrap_or(DType::F16)
}

/// A Hugging Face checkpoint converted: (tensors converted, tensors, bytes in, bytes out).
fn from_checkpoint(a: &QuantizeArgs, to: DType) -> Result<(usize, usize, u64, u64)> {
    let (cfg, ckpt) = Checkpoint::open_with_config(&a.input)
        .with_context(|| format!("opening {}", a.input.display()))?;
    let plan = gguf_export::tensors(&cfg, &ckpt)?;
    let first = |t: &ExportTensor| match &t.source {
        Source::One(n) => n.clone(),
        Source::Stacked(ns) => ns[0].clone(),
    };
    let mut entries = Vec::with_capacity(plan.len());
    let mut types = Vec::with_capacity(plan.len());
    for t in &plan {
        let src = first(t);
        let (_, info) = ckpt
            .info(&src)
            .with_context(|| format!("tensor {src} is missing"))?;
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!(
                "tensor {src} is stored as {}; only f32, f16 and bf16 checkpoints are converted",
                info.dtype.name()
            );
        }
        let d = export_type(t, info.dtype, to, a.experts_only);
        let len = d
            .bytes_for(&[t.rows(), t.cols()])
            .with_context(|| format!("{} of {:?} as {}", t.name, t.dims, d.name()))?;
        entries.push(TensorEntry {
            name: t.name.clone(),
            ty: ggml_type(d)?,
            dims: t.dims.clone(),
            len,
        });
        types.push((d, info.dtype));
    }
    let name = a
        .input
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut metadata = gguf_export::model_metadata(&cfg, &name)?;
    metadata.push(("general.file_type".into(), Value::U32(file_type(to))));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.extend(gguf_export::tokenizer_metadata(&a.input, &cfg)?);

    let (mut n, mut bytes_in, mut bytes_out) = (0usize, 0u64, 0u64);
    write_file(&a.output, &metadata, &entries, |i| {
        let t = &plan[i];
        let (d, stored) = types[i];
        let one = |hf: &str| -> moeshard_engine::Result<(usize, Vec<u8>)> {
            let src = source_tensor(&ckpt, hf, t.permute_heads).map_err(|e| {
                moeshard_engine::EngineError::BadTensor {
                    name: hf.to_string(),
                    msg: format!("{e:#}"),
                }
            })?;
            Ok((src.raw().len(), encode(&src, d)?))
        };
        let mut bytes = Vec::with_capacity(entries[i].len);
        match &t.source {
            Source::One(hf) => {
                let (inb, b) = one(hf)?;
                bytes_in += inb as u64;
                bytes.extend_from_slice(&b);
            }
            Source::Stacked(names) => {
                for hf in names {
                    let (inb, b) = one(hf)?;
                    bytes_in += inb as u64;
                    bytes.extend_from_slice(&b);
                }
            }
        }
        if d != stored {
            n += 1;
        }
        bytes_out += bytes.len() as u64;
        tracing::info!(tensor = %t.name, to = d.name(), bytes = bytes.len(), "wrote");
        Ok(bytes)
    })?;
    Ok((n, entries.len(), bytes_in, bytes_out))
}
