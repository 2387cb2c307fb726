//! GGUF files (versions 2 and 3), memory-mapped: metadata, tensor directory and tensor bytes.
//!
//! Layout, as documented by the ggml project: magic `GGUF`, version (u32), tensor count (u64),
//! metadata count (u64), the metadata key/value pairs, the tensor infos (name, dims with the
//! fastest-varying first, type, offset), padding to `general.alignment` (default 32), then the
//! tensor data. Every count and length is checked against the bytes that remain before anything is
//! allocated, so a lying file costs at most its own size.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Caps that no real file approaches.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata entries.
pub const MAX_METADATA: u64 = 1 << 20;

/// Tensor element and block types (ggml's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// From ggml's type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }

    /// Bytes of a row of `n` elements, if `n` is a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let (be, bb) = self.block();
        // A file may claim any element count: the product must not overflow (found by fuzz/gguf).
        n.is_multiple_of(be)
            .then(|| (n / be).checked_mul(bb))
            .flatten()
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An unsigned integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float of any width (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Where one tensor lies.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Block type.
    pub ty: GgmlType,
    /// Dimensions, fastest-varying first (ggml's `ne`).
    pub dims: Vec<usize>,
    /// Absolute byte offset in the file.
    pub start: usize,
    /// Byte length.
    pub len: usize,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    /// Bytes before the tensor data: header, metadata and tensor directory (padded).
    header_len: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> EngineError {
        EngineError::Format {
            path: self.path.to_path_buf(),
            format: "GGUF",
            msg: format!("{} (at byte {})", msg.into(), self.pos),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain: truncated or corrupt",
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| self.err(format!("{what}: length {n}")))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("{key}: bool byte {b}"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{key}: arrays nested too deep")));
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the remaining bytes lies.
                if n > self.remaining() as u64 {
                    return Err(self.err(format!(
                        "{key}: array of {n} elements cannot fit in the {} remaining bytes",
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.err(format!("{key}: unknown value type {t}"))),
        })
    }
}

/// What [`parse`] reads: the version, the metadata and the tensor directory.
pub type Parsed = (
    u32,
    BTreeMap<String, Value>,
    BTreeMap<String, GgufTensorInfo>,
);

/// Parses a whole GGUF image (header, metadata, tensor directory) and checks every tensor's range.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    Ok(parse_with_header_len(path, bytes)?.0)
}

/// [`parse`], plus the length of everything before the tensor data.
fn parse_with_header_len(path: &Path, bytes: &[u8]) -> Result<(Parsed, usize)> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    let (version, n_tensors, metadata) = read_metadata(&mut c)?;
    read_tensors(&mut c, path, bytes, version, n_tensors, metadata)
}

/// Reads only the version and the metadata: enough to plan for a model, and it works on the first
/// bytes of a file (a header cut from a huge download).
pub fn parse_metadata(path: &Path, bytes: &[u8]) -> Result<(u32, BTreeMap<String, Value>)> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    let (version, _, metadata) = read_metadata(&mut c)?;
    Ok((version, metadata))
}

fn read_metadata(c: &mut Cursor<'_>) -> Result<(u32, u64, BTreeMap<String, Value>)> {
    let magic = c.u32("magic")?;
    if magic != MAGIC {
        return Err(c.err(format!("bad magic {magic:#010x}: not a GGUF file")));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(c.err(format!("version {version} is not supported (2 or 3)")));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_METADATA {
        return Err(c.err(format!(
            "{n_tensors} tensors and {n_kv} metadata entries exceed the caps"
        )));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let v = c.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    Ok((version, n_tensors, metadata))
}

fn read_tensors(
    c: &mut Cursor<'_>,
    path: &Path,
    bytes: &[u8],
    version: u32,
    n_tensors: u64,
    metadata: BTreeMap<String, Value>,
) -> Result<(Parsed, usize)> {
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(c.err(format!("general.alignment {v:?} is not a power of two"))),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors.min(c.remaining() as u64) as usize);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!("tensor {name:?}: {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            dims.push(usize::try_from(d).map_err(|_| c.err(format!("tensor {name:?}: dim {d}")))?);
        }
        let ty_id = c.u32(&name)?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| c.err(format!("tensor {name:?}: unsupported ggml type {ty_id}")))?;
        let offset = c.u64(&name)?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = BTreeMap::new();
    for (name, dims, ty, offset) in infos {
        let bad = |msg: String| EngineError::Format {
            path: path.to_path_buf(),
            format: "GGUF",
            msg: format!("tensor {name:?}: {msg}"),
        };
        if offset % alignment != 0 {
            return Err(bad(format!(
                "offset {offset} is not aligned to {alignment}"
            )));
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        let row = ty
            .row_bytes(dims[0])
            .ok_or_else(|| bad(format!("row of {} is not whole {ty:?} blocks", dims[0])))?;
        let len = row
            .checked_mul(numel / dims[0].max(1))
            .ok_or_else(|| bad("size overflows".into()))?;
        let start = data_start
            .checked_add(offset)
            .filter(|s| {
                s.checked_add(len as u64)
                    .is_some_and(|e| e <= bytes.len() as u64)
            })
            .ok_or_else(|| {
                bad(format!(
                    "{len} bytes at offset {offset} lie outside the file ({} bytes): truncated?",
                    bytes.len()
                ))
            })?;
        if tensors.contains_key(&name) {
            return Err(bad("appears twice".into()));
        }
        tensors.insert(
            name,
            GgufTensorInfo {
                ty,
                dims,
                start: start as usize,
                len,
            },
        );
    }
    let header_len = (data_start as usize).min(bytes.len());
    Ok(((version, metadata, tensors), header_len))
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: mapped read-only; every range handed out was checked against the map's length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let ((version, metadata, tensors), header_len) = parse_with_header_len(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version,
            metadata,
            tensors,
            header_len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        self.map.get(t.start..t.start + t.len)
    }

    /// The header, metadata and tensor directory: everything that describes the model, without
    /// the weights.
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[..self.header_len]
    }

    /// The shared map (to build tensors that outlive this struct).
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// Writes GGUF version 3 files (for `moeshard quantize` and for tests).
#[derive(Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, GgmlType, Vec<usize>, Vec<u8>)>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => {
            let elem = a.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl Writer {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Adds a tensor given its dims (fastest-varying first) and its encoded bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: Vec<usize>,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push((name.to_string(), ty, dims, data));
        self
    }

    /// The encoded file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, ty, dims, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += data.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }
}

/// One tensor's directory entry for [`write_streaming`].
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Block type.
    pub ty: GgmlType,
    /// Dimensions, fastest-varying first.
    pub dims: Vec<usize>,
    /// Byte length of its data.
    pub len: usize,
}

/// Writes a GGUF version 3 file without holding more than one tensor in memory: the header,
/// `metadata` (any `general.alignment` entry is dropped: data is aligned to 32), the directory of
/// `entries`, then each tensor's bytes as `data(i)` returns them (exactly `entries[i].len`).
pub fn write_streaming<W: std::io::Write>(
    out: &mut W,
    metadata: &[(String, Value)],
    entries: &[TensorEntry],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |e: std::io::Error| EngineError::io(Path::new("<gguf output>"), e);
    let align = DEFAULT_ALIGNMENT as usize;
    let meta: Vec<&(String, Value)> = metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .collect();
    let mut head = Vec::new();
    head.extend_from_slice(&MAGIC.to_le_bytes());
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_string(&mut head, k);
        head.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut head, v);
    }
    let mut offset = 0usize;
    for e in entries {
        put_string(&mut head, &e.name);
        head.extend_from_slice(&(e.dims.len() as u32).to_le_bytes());
        for d in &e.dims {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&e.ty.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += e.len.div_ceil(align) * align;
    }
    head.resize(head.len().div_ceil(align) * align, 0);
    out.write_all(&head).map_err(io)?;
    for (i, e) in entries.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != e.len {
            return Err(EngineError::BadTensor {
                name: e.name.clone(),
                msg: format!(
                    "{} bytes written, the directory says {}",
                    bytes.len(),
                    e.len
                ),
            });
        }
        out.write_all(&bytes).map_err(io)?;
        let pad = bytes.len().div_ceil(align) * align - bytes.len();
        out.write_all(&vec![0u8; pad]).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_bytes_of_a_huge_claimed_row_is_none_not_an_overflow() {
        // 32-element Q8_0 blocks of 34 bytes: a whole number of blocks whose bytes overflow.
        let n = usize::MAX - usize::MAX % 32;
        assert_eq!(GgmlType::Q8_0.row_bytes(n), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.meta("general.architecture", Value::String("qwen3moe".into()))
            .meta("qwen3moe.block_count", Value::U32(2))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            )
            .tensor(
                "w",
                GgmlType::F32,
                vec![4, 2],
                (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            )
            .tensor("q", GgmlType::Q8_0, vec![32, 1], vec![7u8; 34]);
        w.to_bytes()
    }

    #[test]
    fn round_trip() -> Result<()> {
        let bytes = sample();
        let (v, meta, tensors) = parse(Path::new("t.gguf"), &bytes)?;
        assert_eq!(v, 3);
        assert_eq!(meta["qwen3moe.block_count"].as_u64(), Some(2));
        assert_eq!(
            meta["tokenizer.ggml.tokens"].as_array().map(<[Value]>::len),
            Some(2)
        );
        let w = &tensors["w"];
        assert_eq!(
            (w.ty, w.dims.clone(), w.len),
            (GgmlType::F32, vec![4, 2], 32)
        );
        assert_eq!(bytes[w.start + 4..w.start + 8], 1f32.to_le_bytes());
        assert_eq!(tensors["q"].len, 34);
        assert_eq!(tensors["q"].start % 32, 0);
        Ok(())
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for n in 0..bytes.len() - 1 {
            // The last tensor ends before the padding; cutting only padding is still valid.
            let r = parse(Path::new("t.gguf"), &bytes[..n]);
            if n < bytes.len() - 30 {
                assert!(r.is_err(), "truncated at {n} accepted");
            }
        }
    }

    #[test]
    fn lying_counts_are_refused_without_allocating() {
        let mut bytes = sample();
        // Metadata count of 2^40.
        bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse(Path::new("t.gguf"), &bytes).is_err());
        // An array claiming 2^60 elements.
        let mut w = Writer::new();
        w.meta("a", Value::Array(vec![Value::U8(1)]));
        let mut b = w.to_bytes();
        let key_end = 24 + 8 + 1 + 4; // header, key length, key "a", value type
        let count_at = key_end + 4;
        b[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = parse(Path::new("t.gguf"), &b)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cannot fit"), "{e}");
    }

    #[test]
    fn bad_magic_version_type_and_offset() {
        let base = sample();
        let mut b = base.clone();
        b[0] = b'X';
        assert!(
            parse(Path::new("t"), &b)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut b = base.clone();
        b[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(
            parse(Path::new("t"), &b)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        // Unknown tensor type: patch the type id of tensor "w" (F32 = 0) to 99.
        let (_, _, tensors) = parse(Path::new("t"), &base).unwrap();
        assert_eq!(tensors.len(), 2);
        let needle: Vec<u8> = [1u64.to_le_bytes().as_slice(), b"w", &2u32.to_le_bytes()].concat();
        let at = base
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
            + needle.len()
            + 16;
        let mut b = base.clone();
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(
            parse(Path::new("t"), &b)
                .unwrap_err()
                .to_string()
                .contains("ggml type 99")
        );
        let mut b = base;
        b[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            parse(Path::new("t"), &b)
                .unwrap_err()
                .to_string()
                .contains("outside the file")
        );
    }
}
