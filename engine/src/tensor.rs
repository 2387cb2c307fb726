//! Tensors over memory-mapped or owned bytes, with the dtypes checkpoints store.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{EngineError, Result};
use crate::quant::QType;
use crate::resident::{Chunk, ResidentArena};

/// Element types of stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// ggml's 8-bit blocks of 32 (see [`crate::quant`]).
    Q8_0,
    /// ggml's 4-bit blocks of 32.
    Q4_0,
    /// ggml's 4-bit K-quant super-blocks of 256.
    Q4_K,
    /// ggml's 5-bit K-quant super-blocks of 256.
    Q5_K,
    /// ggml's 6-bit K-quant super-blocks of 256.
    Q6_K,
    /// OCP FP8 E4M3 ("fn": no infinities), stored by block-scaled checkpoints; decoded at load
    /// by [`crate::fp8`], never held by a [`Tensor`].
    F8E4M3,
    /// Raw bytes (MXFP4 blocks and exponents); decoded at load, never held by a [`Tensor`].
    U8,
}

impl DType {
    /// `(elements, bytes)` of one block: `(1, 4)` for f32, `(32, 34)` for Q8_0, ...
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::F8E4M3 | DType::U8 => (1, 1),
            q => {
                let q = q.quant().expect("block type");
                (q.block_elems(), q.block_bytes())
            }
        }
    }

    /// The block-quantized type, for the quantized dtypes.
    pub fn quant(self) -> Option<QType> {
        Some(match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::U8 => return None,
            DType::Q8_0 => QType::Q8_0,
            DType::Q4_0 => QType::Q4_0,
            DType::Q4_K => QType::Q4_K,
            DType::Q5_K => QType::Q5_K,
            DType::Q6_K => QType::Q6_K,
        })
    }

    /// The dtype of a block-quantized type.
    pub fn from_quant(q: QType) -> Self {
        match q {
            QType::Q8_0 => DType::Q8_0,
            QType::Q4_0 => DType::Q4_0,
            QType::Q4_K => DType::Q4_K,
            QType::Q5_K => DType::Q5_K,
            QType::Q6_K => DType::Q6_K,
        }
    }

    /// Bytes of a tensor of this shape, when its last dimension is a whole number of blocks
    /// (and the size does not overflow).
    pub fn bytes_for(self, shape: &[usize]) -> Option<usize> {
        let (be, bb) = self.block();
        let last = shape.last().copied().unwrap_or(1);
        if !last.is_multiple_of(be) {
            return None;
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        (numel / be).checked_mul(bb)
    }

    /// Alignment the kernels need for the stored elements.
    fn align(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            _ => 1,
        }
    }

    /// The safetensors (or GGUF) spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::F8E4M3 => "F8_E4M3",
            DType::U8 => "U8",
        }
    }

    /// Whether a [`Tensor`] can hold this dtype (the others are decoded when loaded).
    pub fn is_compute(self) -> bool {
        !matches!(self, DType::F8E4M3 | DType::U8)
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
enum Bytes {
    /// A range of a memory-mapped file.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// Owned, 8-byte aligned storage (`len` bytes of `buf` from byte `start`).
    Owned {
        buf: Arc<Vec<u64>>,
        start: usize,
        len: usize,
    },
    /// A copy in a [`ResidentArena`] (64-byte aligned).
    Resident {
        chunk: Arc<Chunk>,
        start: usize,
        len: usize,
    },
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { buf, start, len } => {
                &bytemuck::cast_slice::<u64, u8>(buf)[*start..*start + *len]
            }
            Bytes::Resident { chunk, start, len } => chunk.slice(*start, *len),
        }
    }
}

/// A dense tensor in row-major order.
#[derive(Clone)]
pub struct Tensor {
    name: Arc<str>,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({}, {:?}, {:?})",
            self.name, self.dtype, self.shape
        )
    }
}

/// A borrowed 2-D weight matrix `[rows, cols]`, row-major, in its stored dtype.
#[derive(Clone, Copy, Debug)]
pub enum Mat<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// Whole blocks of a block-quantized type (rows are whole numbers of blocks).
    Quant(QType, &'a [u8]),
}

impl Mat<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Mat::F32(s) => s.len(),
            Mat::F16(s) => s.len(),
            Mat::BF16(s) => s.len(),
            Mat::Quant(q, b) => b.len() / q.block_bytes() * q.block_elems(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Tensor {
    /// A tensor over `len` bytes of a mapped file starting at `start`.
    /// The range and its alignment are checked here so every later view is safe.
    pub fn mapped(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    ) -> Result<Self> {
        if !dtype.is_compute() {
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg: format!("{} data must be decoded before use", dtype.name()),
            });
        }
        let want = dtype.bytes_for(&shape);
        if want != Some(len) {
            let msg = match want {
                Some(w) => format!(
                    "shape {shape:?} of {} needs {w} bytes, the file gives {len}",
                    dtype.name()
                ),
                None => format!(
                    "shape {shape:?} does not fit {} (its last dimension must be a multiple of {} \
                     and the size must not overflow)",
                    dtype.name(),
                    dtype.block().0
                ),
            };
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg,
            });
        }
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg: format!(
                    "bytes {start}..{} lie outside the file ({} bytes)",
                    start.saturating_add(len),
                    map.len()
                ),
            });
        }
        let t = Tensor {
            name: name.into(),
            dtype,
            shape,
            bytes: Bytes::Mapped { map, start, len },
        };
        if !(t.bytes.as_slice().as_ptr() as usize).is_multiple_of(dtype.align()) {
            // Misaligned data in the file: copy once into aligned memory.
            return Ok(t.to_owned_copy());
        }
        Ok(t)
    }

    /// A tensor owning f32 data.
    pub fn from_f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self::owned(name, DType::F32, shape, bytemuck::cast_slice(data))
    }

    /// A tensor owning bf16 data.
    pub fn from_bf16(name: &str, shape: Vec<usize>, data: &[half::bf16]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self::owned(name, DType::BF16, shape, bytemuck::cast_slice(data))
    }

    /// A tensor owning already-encoded bytes of `dtype` (checked against the shape).
    pub fn from_raw(name: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Self> {
        if dtype.bytes_for(&shape) != Some(bytes.len()) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg: format!(
                    "{} bytes do not hold shape {shape:?} of {}",
                    bytes.len(),
                    dtype.name()
                ),
            });
        }
        Ok(Self::owned(name, dtype, shape, bytes))
    }

    /// A tensor over `len` bytes of an owned buffer from byte `start` (e.g. a direct read of a
    /// file range into an aligned buffer), without copying them; checked like [`Self::mapped`]
    /// (a start misaligned for the dtype is copied once into aligned memory).
    pub fn from_owned_words(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        buf: Arc<Vec<u64>>,
        start: usize,
        len: usize,
    ) -> Result<Self> {
        if !dtype.is_compute() || dtype.bytes_for(&shape) != Some(len) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg: format!(
                    "{len} bytes do not hold shape {shape:?} of {}",
                    dtype.name()
                ),
            });
        }
        if start.checked_add(len).is_none_or(|end| end > buf.len() * 8) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                msg: format!(
                    "bytes {start}..{} lie outside the {}-byte buffer",
                    start.saturating_add(len),
                    buf.len() * 8
                ),
            });
        }
        let t = Tensor {
            name: name.into(),
            dtype,
            shape,
            bytes: Bytes::Owned { buf, start, len },
        };
        if !(t.bytes.as_slice().as_ptr() as usize).is_multiple_of(dtype.align()) {
            return Ok(t.to_owned_copy());
        }
        Ok(t)
    }

    fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Self {
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
        Tensor {
            name: name.into(),
            dtype,
            shape,
            bytes: Bytes::Owned {
                buf: Arc::new(buf),
                start: 0,
                len: bytes.len(),
            },
        }
    }

    fn to_owned_copy(&self) -> Self {
        Self::owned(
            &self.name,
            self.dtype,
            self.shape.clone(),
            self.bytes.as_slice(),
        )
    }

    /// The tensor's name in the checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stored dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Raw little-endian bytes.
    pub fn raw(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Drops this tensor's pages from the process's resident set (a mapped tensor whose contents
    /// were copied elsewhere, e.g. quantized on load). The pages stay in the page cache, and a
    /// later read faults them back in with the same contents: the file is mapped read-only.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, start, len } = &self.bytes {
            // SAFETY: the map is read-only and backed by an unchanging file, so MADV_DONTNEED only
            // drops page-table entries; any later access (by this or an overlapping tensor) reads
            // the same bytes again.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, *len)
            };
        }
    }

    /// This tensor copied into `arena` (and a mapped original's pages released), or itself
    /// when it already is there or the arena has no room.
    pub fn into_resident(self, arena: &ResidentArena) -> Tensor {
        if matches!(self.bytes, Bytes::Resident { .. }) {
            return self;
        }
        let raw = self.bytes.as_slice();
        let Some((chunk, start)) = arena.copy(&self.name, raw) else {
            return self;
        };
        let len = raw.len();
        self.release_pages();
        Tensor {
            name: self.name,
            dtype: self.dtype,
            shape: self.shape,
            bytes: Bytes::Resident { chunk, start, len },
        }
    }

    /// Whether the bytes are a copy in a [`ResidentArena`].
    pub fn is_resident(&self) -> bool {
        matches!(self.bytes, Bytes::Resident { .. })
    }

    /// Whether the bytes come from a memory map (not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped { .. })
    }

    /// A view of the whole tensor as a matrix in its stored dtype.
    pub fn mat(&self) -> Mat<'_> {
        let raw = self.raw();
        // Alignment and length were checked at construction, so these casts cannot fail.
        match self.dtype {
            DType::F32 => Mat::F32(bytemuck::cast_slice(raw)),
            DType::F16 => Mat::F16(bytemuck::cast_slice(raw)),
            DType::BF16 => Mat::BF16(bytemuck::cast_slice(raw)),
            // `mapped` refuses these and the owned constructors only make compute dtypes.
            DType::F8E4M3 | DType::U8 => unreachable!("a Tensor never holds {}", self.dtype.name()),
            q => Mat::Quant(q.quant().expect("block type"), raw),
        }
    }

    /// Checks the shape against what the config expects.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(EngineError::BadTensor {
                name: self.name.to_string(),
                msg: format!("expected shape {shape:?}, found {:?}", self.shape),
            });
        }
        Ok(())
    }

    /// The elements converted to f32 (for small tensors: norms, biases, embeddings rows).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        crate::kernels::convert_to_f32(self.mat(), 0, &mut out);
        out
    }

    /// Row `i` of a 2-D tensor, converted to f32, into `out`.
    pub fn row_to_f32(&self, i: usize, out: &mut [f32]) {
        let cols = out.len();
        crate::kernels::convert_to_f32(self.mat(), i * cols, out);
    }
}
