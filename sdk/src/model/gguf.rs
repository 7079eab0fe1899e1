//! GGUF (v2/v3) reader: metadata, tensor infos and memory-mapped tensor data.
//!
//! Every read is bounds-checked against the file length, so a truncated or corrupt file gives an
//! [`Error::Format`] naming the file and the field that failed, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::quant::gguf_blocks::{self, GgmlType};

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // each is the GGUF value type of its name
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
    /// Values of one type.
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is any non-negative integer type.
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
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's entry in the GGUF tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The tensor's name (llama.cpp's naming, such as `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored: fastest-varying first (ggml order).
    pub dims: Vec<usize>,
    /// How its values are stored.
    pub ty: GgmlType,
    /// Byte offset from the start of the file.
    pub offset: usize,
    /// Bytes of its data.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Shape in row-major (PyTorch) order: the reverse of the GGUF dims.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    /// Values in the tensor.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Every metadata entry by key.
    pub metadata: BTreeMap<String, Value>,
    /// Every tensor by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: memmap2::Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::format(
                self.path,
                format!("file ends at byte {} while reading {what} (needs {n} bytes at {})", self.buf.len(), self.pos),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // No length can exceed the bytes left; this rejects corrupt counts before allocating.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(Error::format(self.path, format!("{what}: length {n} exceeds the file size")));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::format(self.path, format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        let w = format!("metadata `{key}`");
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(&w)?[0]),
            1 => Value::I8(self.arr::<1>(&w)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(&w)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(&w)?)),
            4 => Value::U32(self.u32(&w)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(&w)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(&w)?)),
            7 => Value::Bool(self.arr::<1>(&w)?[0] != 0),
            8 => Value::String(self.string(&w)?),
            9 if depth == 0 => {
                let ety = self.u32(&w)?;
                let n = self.len(&w)?;
                // Each element becomes a `Value` many times its size in the file: bound the count
                // by what real files hold (vocabularies and their merges, a few hundred thousand).
                if n > MAX_ARRAY_LEN {
                    return Err(Error::format(
                        self.path,
                        format!("{w} is an array of {n} values (at most {MAX_ARRAY_LEN})"),
                    ));
                }
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(&w)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(&w)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(&w)?)),
            other => return Err(Error::format(self.path, format!("{w} has unknown value type {other}"))),
        })
    }
}

/// The most values a metadata array may hold: twice the largest vocabulary a config may have.
pub const MAX_ARRAY_LEN: usize = 1 << 24;

impl GgufFile {
    /// Opens and parses a GGUF file; tensor data stays memory-mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = crate::files::map(path)?;
        let mut c = Cursor { buf: &mmap, pos: 0, path };
        let magic = c.arr::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(Error::format(path, format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(path, format!("GGUF version {version} (edgetune reads v2 and v3)")));
        }
        let n_tensors = c.len("tensor count")?;
        let n_kv = c.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        // The count is bounded by the file's size; the list grows as tensors are read.
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let nd = c.u32(&format!("tensor `{name}` n_dims"))?;
            if nd == 0 || nd > 4 {
                return Err(Error::format(path, format!("tensor `{name}` has {nd} dimensions (expected 1..4)")));
            }
            let mut dims = Vec::new();
            for _ in 0..nd {
                let d = c.u64(&format!("tensor `{name}` dims"))?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| Error::format(path, format!("tensor `{name}` dim {d} too large")))?,
                );
            }
            let ty_id = c.u32(&format!("tensor `{name}` type"))?;
            let ty = GgmlType::from_id(ty_id)
                .map_err(|what| Error::unsupported(path, format!("{what} in tensor `{name}`")))?;
            let off = c.u64(&format!("tensor `{name}` offset"))?;
            infos.push((name, dims, ty, off));
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::format(path, format!("general.alignment = {align} is not a power of two")));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, off) in infos {
            let n: usize = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::format(path, format!("tensor `{name}` dims {dims:?} overflow")))?;
            let n_bytes = ty.bytes_for(n).ok_or_else(|| {
                Error::format(
                    path,
                    format!("tensor `{name}`: {n} elements is not a whole number of {} blocks", ty.name()),
                )
            })?;
            let offset = usize::try_from(off).ok().and_then(|o| o.checked_add(data_start));
            let end = offset.and_then(|o| o.checked_add(n_bytes));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= mmap.len() => {
                    tensors.insert(name.clone(), TensorInfo { name, dims, ty, offset, n_bytes });
                }
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `{name}` data (offset {off}, {n_bytes} bytes) runs past the end of the file ({} bytes); the file is truncated",
                            mmap.len()
                        ),
                    ));
                }
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, mmap })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` is missing or not a string")))
    }

    /// A required unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` is missing or not an integer")))
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.n_bytes]
    }

    /// A tensor dequantized to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.to_string() })?;
        let data = gguf_blocks::dequantize(info.ty, self.tensor_bytes(info), info.n_elements())
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok((data, info.shape()))
    }
}
