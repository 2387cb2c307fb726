//! Hugging Face safetensors checkpoints, single-file or sharded, memory-mapped.
//!
//! Layout: an 8-byte little-endian header length, a JSON header mapping names to
//! `{dtype, shape, data_offsets}`, then the data. Every length, offset and size is checked against
//! the file before a tensor is handed out, and the header size is capped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::quant::QType;
use crate::resident::{LoadMode, ResidentArena};
use crate::tensor::{DType, Tensor};

/// Largest header we parse (real checkpoints have a few MB at most).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Where one tensor lies in one file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Stored dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub start: usize,
    /// Byte length.
    pub len: usize,
}

/// One mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
}

fn format_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Format {
        path: path.to_path_buf(),
        format: "safetensors",
        msg: msg.into(),
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "F8_E4M3" => Some(DType::F8E4M3),
        "U8" => Some(DType::U8),
        _ => None,
    }
}

impl SafetensorsFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the file is mapped read-only; moeshard never writes checkpoint files while
        // serving them, and every access below is bounds-checked against the mapped length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let tensors = parse_header(path, &map)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names and placement of every tensor.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The stored bytes of a tensor (checked against the file when the header was parsed).
    pub fn raw(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name)?;
        Some((info, &self.map[info.start..info.start + info.len]))
    }

    /// A tensor over the mapped bytes.
    pub fn tensor(&self, name: &str) -> Option<Result<Tensor>> {
        let info = self.tensors.get(name)?;
        Some(Tensor::mapped(
            name,
            info.dtype,
            info.shape.clone(),
            Arc::clone(&self.map),
            info.start,
            info.len,
        ))
    }
}

/// Parses and validates a safetensors header against the file bytes.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, TensorInfo>> {
    if bytes.len() < 8 {
        return Err(format_err(
            path,
            format!("{} bytes is too short for the header length", bytes.len()),
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(format_err(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap"),
        ));
    }
    let header_end = 8 + header_len as usize;
    if header_end > bytes.len() {
        return Err(format_err(
            path,
            format!(
                "header of {header_len} bytes runs past the end of the file ({} bytes): truncated?",
                bytes.len()
            ),
        ));
    }
    let header: Value = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| format_err(path, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| format_err(path, "header is not a JSON object"))?;
    let data_len = bytes.len() - header_end;
    let mut out = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: String| format_err(path, format!("tensor {name:?}: {msg}"));
        let dtype_s = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype".into()))?;
        let dtype = parse_dtype(dtype_s).ok_or_else(|| {
            bad(format!(
                "dtype {dtype_s} is not supported (F32, F16, BF16, F8_E4M3, U8)"
            ))
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape must list non-negative integers".into()))?;
        let offs = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("data_offsets must be [begin, end]".into()))?;
        let (Some(b), Some(e)) = (offs[0].as_u64(), offs[1].as_u64()) else {
            return Err(bad("data_offsets must be integers".into()));
        };
        if b > e || e > data_len as u64 {
            return Err(bad(format!(
                "data_offsets [{b}, {e}] lie outside the {data_len} data bytes: truncated or corrupt"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let want = numel.checked_mul(dtype.block().1 as u64);
        if want != Some(e - b) {
            return Err(bad(format!(
                "shape {shape:?} of {dtype_s} needs {} bytes but data_offsets give {}",
                numel.saturating_mul(dtype.block().1 as u64),
                e - b
            )));
        }
        out.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start: header_end + b as usize,
                len: (e - b) as usize,
            },
        );
    }
    Ok(out)
}

/// All the safetensors files of a checkpoint directory, with a name index.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    synthetic: Option<Synthetic>,
    quantize: Option<Quantize>,
    gguf: Option<crate::gguf_model::GgufModel>,
    /// Where [`Self::get_weight`] copies weights to (`None`: they stay in the file mapping).
    resident: Option<Arc<ResidentArena>>,
}

/// Quantization applied as tensors are loaded (`--quantize`): float weights become owned
/// block-quantized copies, so resident memory is the quantized size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantize {
    /// The target type.
    pub qtype: QType,
    /// Also the dense linear weights (attention, shared experts, embeddings, LM head), not only
    /// the routed experts. Routers and norms always stay as stored.
    pub all: bool,
}

impl Quantize {
    /// The type tensor `name` of `shape` and `dtype` becomes, if any. A tensor whose rows are
    /// not whole blocks of the asked type falls back to `Q8_0` (blocks of 32) when they are
    /// whole blocks of that, and otherwise stays as stored.
    pub fn target(&self, name: &str, dtype: DType, shape: &[usize]) -> Option<QType> {
        if dtype.quant().is_some() || shape.len() != 2 || !name.ends_with(".weight") {
            return None;
        }
        let expert = name.contains(".experts.");
        let router = name.ends_with(".gate.weight")
            || name.ends_with("shared_expert_gate.weight")
            || name.ends_with(".router.weight");
        if !(expert || (self.all && !router)) {
            return None;
        }
        self.qtype.fitting(shape[1])
    }
}

/// The generated stand-in for files (see [`crate::synthetic`]).
struct Synthetic {
    seed: u64,
    config_file: PathBuf,
    tensors: BTreeMap<String, TensorInfo>,
}

/// The path synthetic tensors report as their file.
pub const SYNTHETIC_PATH: &str = "<synthetic>";

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`; or, when
    /// `dir` is a `.gguf` file, that file with its tensors under Hugging Face names (see
    /// [`crate::gguf_model`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if crate::gguf_model::is_gguf(dir) {
            return Ok(Checkpoint {
                dir: dir.to_path_buf(),
                files: Vec::new(),
                index: HashMap::new(),
                synthetic: None,
                quantize: None,
                gguf: Some(crate::gguf_model::GgufModel::open(dir)?),
                resident: default_arena(),
            });
        }
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| format_err(&index_path, format!("index is not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| format_err(&index_path, "index has no weight_map object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    format_err(
                        &index_path,
                        format!("weight_map[{tensor:?}] is not a file name"),
                    )
                })?;
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(format_err(
                        &index_path,
                        format!("weight_map[{tensor:?}] names {f:?} outside the model directory"),
                    ));
                }
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.sort();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(EngineError::MissingFile {
                path: single,
                what: "the weights (model.safetensors or model.safetensors.index.json)",
            });
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut index = HashMap::new();
        for (i, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            if !path.exists() {
                return Err(EngineError::MissingFile {
                    path,
                    what: "a weight shard listed in model.safetensors.index.json",
                });
            }
            let f = SafetensorsFile::open(&path)?;
            for t in f.tensors().keys() {
                index.insert(t.clone(), i);
            }
            files.push(f);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            synthetic: None,
            quantize: None,
            gguf: None,
            resident: default_arena(),
        })
    }

    /// The model description and the checkpoint at `path`: a Hugging Face directory
    /// (`config.json` and safetensors) or a `.gguf` file.
    pub fn open_with_config(path: &Path) -> Result<(crate::config::ModelConfig, Self)> {
        let ckpt = Self::open(path)?;
        let cfg = match ckpt.gguf() {
            Some(g) => g.config().clone(),
            None => crate::config::ModelConfig::from_dir(path)?,
        };
        Ok((cfg, ckpt))
    }

    /// A checkpoint of deterministic random weights in the shapes `cfg` describes, generated on
    /// first use and never written to disk. `dir` is only used in messages.
    pub fn synthetic(
        config_file: &Path,
        cfg: &crate::config::ModelConfig,
        dtype: DType,
        seed: u64,
    ) -> Self {
        Checkpoint {
            dir: config_file.parent().unwrap_or(config_file).to_path_buf(),
            files: Vec::new(),
            index: HashMap::new(),
            synthetic: Some(Synthetic {
                seed,
                config_file: config_file.to_path_buf(),
                tensors: crate::synthetic::tensor_index(cfg, dtype),
            }),
            quantize: None,
            gguf: None,
            resident: default_arena(),
        }
    }

    /// Sets the quantization applied as tensors are loaded (none by default).
    pub fn set_quantize(&mut self, q: Option<Quantize>) {
        self.quantize = q;
    }

    /// The quantization applied as tensors are loaded.
    pub fn quantize(&self) -> Option<Quantize> {
        self.quantize
    }

    /// The dtype and byte size tensor `name` has once loaded (after `--quantize`).
    pub fn loaded_form(&self, name: &str) -> Option<(DType, usize)> {
        let (_, info) = self.info(name)?;
        match self
            .quantize
            .and_then(|q| q.target(name, info.dtype, &info.shape))
        {
            Some(q) => {
                let dt = DType::from_quant(q);
                Some((dt, dt.bytes_for(&info.shape)?))
            }
            None => Some((info.dtype, info.len)),
        }
    }

    /// Whether the weights are synthetic.
    pub fn is_synthetic(&self) -> bool {
        self.synthetic.is_some()
    }

    /// The seed of synthetic weights.
    pub fn synthetic_seed(&self) -> Option<u64> {
        self.synthetic.as_ref().map(|s| s.seed)
    }

    /// The GGUF file this checkpoint is, if it is one.
    pub fn gguf(&self) -> Option<&crate::gguf_model::GgufModel> {
        self.gguf.as_ref()
    }

    /// The config file this checkpoint was described by (a GGUF file describes itself).
    pub fn config_file(&self) -> PathBuf {
        match &self.synthetic {
            Some(s) => s.config_file.clone(),
            None if self.gguf.is_some() => self.dir.clone(),
            None => self.dir.join("config.json"),
        }
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        if let Some(g) = &self.gguf {
            return g.entries().contains_key(name);
        }
        match &self.synthetic {
            Some(s) => s.tensors.contains_key(name),
            None => self.index.contains_key(name),
        }
    }

    /// All tensor names.
    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        if let Some(g) = &self.gguf {
            return Box::new(g.entries().keys().map(String::as_str));
        }
        match &self.synthetic {
            Some(s) => Box::new(s.tensors.keys().map(String::as_str)),
            None => Box::new(self.index.keys().map(String::as_str)),
        }
    }

    /// Placement of a tensor (its file and range), if present.
    pub fn info(&self, name: &str) -> Option<(&Path, &TensorInfo)> {
        if let Some(s) = &self.synthetic {
            return Some((Path::new(SYNTHETIC_PATH), s.tensors.get(name)?));
        }
        if let Some(g) = &self.gguf {
            return Some((g.file().path(), &g.entries().get(name)?.info));
        }
        let f = &self.files[*self.index.get(name)?];
        Some((f.path(), f.tensors().get(name)?))
    }

    /// The file and byte range of tensor `name` when it is used exactly as stored: no
    /// quantization on load, no decoding (FP8) and no GGUF fix-up, so reading that range gives
    /// the very bytes [`Self::get`] would map. `None` otherwise (and for synthetic weights).
    pub fn plain_range(&self, name: &str) -> Option<(&Path, &TensorInfo)> {
        if self.synthetic.is_some() {
            return None;
        }
        let (path, info) = self.info(name)?;
        if !info.dtype.is_compute()
            || self
                .quantize
                .and_then(|q| q.target(name, info.dtype, &info.shape))
                .is_some()
        {
            return None;
        }
        if let Some(g) = &self.gguf
            && !matches!(g.entries().get(name)?.fixup, crate::gguf_model::Fixup::None)
        {
            return None;
        }
        Some((path, info))
    }

    /// A tensor by name, or an error naming it (quantized if [`Self::set_quantize`] asks).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.get_stored(name)?;
        match self
            .quantize
            .and_then(|q| q.target(name, t.dtype(), t.shape()))
        {
            Some(q) => {
                let out = quantize_tensor(&t, q)?;
                // The float original is no longer needed: keep resident only the quantized copy.
                t.release_pages();
                Ok(out)
            }
            None => Ok(t),
        }
    }

    /// A tensor as stored.
    fn get_stored(&self, name: &str) -> Result<Tensor> {
        let missing = || EngineError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        };
        if let Some(s) = &self.synthetic {
            let info = s.tensors.get(name).ok_or_else(missing)?;
            return Ok(crate::synthetic::generate(name, info, s.seed));
        }
        if let Some(g) = &self.gguf {
            return g.tensor(name).unwrap_or_else(|| {
                Err(EngineError::MissingTensor {
                    name: match crate::gguf_model::gguf_name_of(name) {
                        Some(gn) => format!("{name} (GGUF {gn})"),
                        None => name.to_string(),
                    },
                    dir: self.dir.clone(),
                })
            });
        }
        let i = *self.index.get(name).ok_or_else(missing)?;
        let (info, raw) = self.files[i].raw(name).ok_or_else(missing)?;
        if info.dtype == DType::F8E4M3 {
            return crate::fp8::dequantize(self, name, &info.shape, raw);
        }
        self.files[i].tensor(name).ok_or_else(missing)?
    }

    /// The stored bytes and placement of a tensor of a real (not synthetic) checkpoint.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let missing = || EngineError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        };
        let i = *self.index.get(name).ok_or_else(missing)?;
        self.files[i].raw(name).ok_or_else(missing)
    }

    /// A tensor whose shape must be `shape`.
    ///
    /// (Shape checks see the logical shape, whatever the loaded dtype.)
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        t.expect_shape(shape)?;
        Ok(t)
    }

    /// A weight matrix a layer computes with: [`Self::get_shaped`], then copied into this
    /// checkpoint's resident memory (see [`crate::resident`]) unless the load mode is
    /// [`LoadMode::Mmap`] or the memory budget is spent.
    pub fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_shaped(name, shape)?;
        Ok(match &self.resident {
            Some(a) => t.into_resident(a),
            None => t,
        })
    }

    /// Where the weights [`Self::get_weight`] returns are held (default [`LoadMode::Memory`]).
    pub fn set_load_mode(&mut self, mode: LoadMode) {
        self.resident = match mode {
            LoadMode::Memory => self.resident.take().or_else(default_arena),
            LoadMode::Mmap => None,
        };
    }

    /// [`LoadMode::Memory`] with a fresh arena of `budget` bytes (instead of the memory the
    /// system has available when the checkpoint was opened).
    pub fn set_resident_budget(&mut self, budget: u64) {
        self.resident = Some(Arc::new(ResidentArena::with_budget(budget)));
    }

    /// Bytes of weights copied into resident memory so far.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.as_ref().map_or(0, |a| a.used())
    }
}

/// The arena a checkpoint starts with: budgeted by the memory available now.
fn default_arena() -> Option<Arc<ResidentArena>> {
    Some(Arc::new(ResidentArena::from_system()))
}

/// An owned copy of a 2-D float tensor quantized row by row (rows in parallel).
pub fn quantize_tensor(t: &Tensor, q: QType) -> Result<Tensor> {
    use rayon::prelude::*;
    let shape = t.shape().to_vec();
    let (rows, cols) = (shape[0], shape[1]);
    let rb = q.row_bytes(cols).ok_or_else(|| EngineError::BadTensor {
        name: t.name().to_string(),
        msg: format!("rows of {cols} are not whole {} blocks", q.name()),
    })?;
    let mut out = vec![0u8; rows * rb];
    out.par_chunks_mut(rb.max(1)).enumerate().for_each_init(
        || (vec![0f32; cols], Vec::with_capacity(rb)),
        |(buf, enc), (r, dst)| {
            t.row_to_f32(r, buf);
            enc.clear();
            crate::quant::quantize(q, buf, enc);
            dst.copy_from_slice(enc);
        },
    );
    Tensor::from_raw(t.name(), DType::from_quant(q), shape, &out)
}
