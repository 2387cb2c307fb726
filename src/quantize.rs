//! `moeshard quantize IN.gguf OUT.gguf --type T`: requantizes a GGUF file's float weights to a
//! block type, keeping everything else (metadata, tokenizer, names, norms, routers) as it is, so
//! llama.cpp loads the output like its own. One tensor at a time is held in memory.

use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use moeshard_engine::gguf::{GgmlType, GgufFile, TensorEntry, Value, write_streaming};
use moeshard_engine::quant::QType;
use moeshard_engine::safetensors::quantize_tensor;
use moeshard_engine::{DType, Tensor};

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// Input GGUF file (its F32, F16 and BF16 weights are quantized; other types are copied).
    /// For a Hugging Face checkpoint, convert it to GGUF first (llama.cpp's
    /// convert_hf_to_gguf.py --outtype f16), or load it directly with `--quantize`.
    input: PathBuf,
    /// Output GGUF file (written next to it under a temporary name, then renamed).
    output: PathBuf,
    /// Target type.
    #[arg(long = "type", value_parser = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])]
    ty: String,
    /// Quantize only the routed experts' stacked tensors; keep the dense weights as stored.
    #[arg(long)]
    experts_only: bool,
}

fn ggml_type(q: QType) -> GgmlType {
    match q {
        QType::Q8_0 => GgmlType::Q8_0,
        QType::Q4_0 => GgmlType::Q4_0,
        QType::Q4_K => GgmlType::Q4_K,
        QType::Q5_K => GgmlType::Q5_K,
        QType::Q6_K => GgmlType::Q6_K,
    }
}

/// llama.cpp's `general.file_type` for a file mostly of this type.
fn file_type(q: QType) -> u32 {
    match q {
        QType::Q4_0 => 2,
        QType::Q8_0 => 7,
        QType::Q4_K => 14,
        QType::Q5_K => 16,
        QType::Q6_K => 18,
    }
}

/// The float dtype of a GGUF tensor type (None for block types).
fn float_dtype(t: GgmlType) -> Option<DType> {
    moeshard_engine::gguf_model::dtype_of(t).filter(|d| d.quant().is_none())
}

/// The type tensor `name` becomes: matrices (and stacked experts) only; norms, routers and
/// vectors stay. Rows that are not whole blocks of `q` fall back to Q8_0, or stay.
fn target(name: &str, ty: GgmlType, dims: &[usize], q: QType, experts_only: bool) -> Option<QType> {
    float_dtype(ty)?;
    if dims.len() < 2 || name.contains("ffn_gate_inp") || name.contains("_norm") {
        return None;
    }
    if experts_only && !name.contains("_exps") {
        return None;
    }
    q.fitting(dims[0])
}

/// `moeshard quantize`.
pub(crate) fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    if a.input.is_dir() {
        bail!(
            "{} is a directory: `moeshard quantize` reads a GGUF file. Convert the checkpoint \
             with llama.cpp's convert_hf_to_gguf.py (--outtype f16) first, or load it directly \
             with --quantize {}",
            a.input.display(),
            a.ty
        );
    }
    let q = QType::from_name(&a.ty).context("quantization type")?;
    let f = GgufFile::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let mut plan = Vec::with_capacity(f.tensors.len());
    let mut entries = Vec::with_capacity(f.tensors.len());
    for (name, info) in &f.tensors {
        let to = target(name, info.ty, &info.dims, q, a.experts_only);
        let (ty, len) = match to {
            Some(t) => {
                let rows = info.numel() / info.dims[0];
                (ggml_type(t), rows * t.row_bytes(info.dims[0]).unwrap_or(0))
            }
            None => (info.ty, info.len),
        };
        entries.push(TensorEntry {
            name: name.clone(),
            ty,
            dims: info.dims.clone(),
            len,
        });
        plan.push((name.clone(), to));
    }
    let mut metadata: Vec<(String, Value)> = f
        .metadata
        .iter()
        .filter(|(k, _)| *k != "general.file_type" && *k != "general.quantization_version")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(file_type(q))));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));

    let tmp = a.output.with_extension("gguf.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let started = Instant::now();
    let (mut n_quantized, mut bytes_in, mut bytes_out) = (0usize, 0u64, 0u64);
    let result = write_streaming(&mut out, &metadata, &entries, |i| {
        let (name, to) = &plan[i];
        let info = &f.tensors[name];
        let raw = f.tensor_bytes(name).unwrap_or_default();
        bytes_in += raw.len() as u64;
        let bytes = match (to, float_dtype(info.ty)) {
            (Some(t), Some(dt)) => {
                let cols = info.dims[0];
                let tensor = Tensor::from_raw(name, dt, vec![info.numel() / cols, cols], raw)?;
                n_quantized += 1;
                quantize_tensor(&tensor, *t)?.raw().to_vec()
            }
            _ => raw.to_vec(),
        };
        bytes_out += bytes.len() as u64;
        tracing::info!(tensor = %name, to = ?to, bytes = bytes.len(), "wrote");
        Ok(bytes)
    });
    if let Err(e) = result.map_err(anyhow::Error::from).and_then(|()| {
        use std::io::Write;
        out.flush().context("flushing the output")?;
        drop(out);
        std::fs::rename(&tmp, &a.output)
            .with_context(|| format!("renaming {} to {}", tmp.display(), a.output.display()))
    }) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", a.output.display())));
    }
    println!(
        "wrote {}: {} of {} tensors quantized to {}, {:.1} MB -> {:.1} MB in {:.1} s",
        a.output.display(),
        n_quantized,
        entries.len(),
        q.name(),
        bytes_in as f64 / 1e6,
        bytes_out as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
