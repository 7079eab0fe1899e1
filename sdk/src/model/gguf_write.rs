//! GGUF v3 writer: metadata, the tensor table, and tensor data aligned to 32 bytes, laid out as
//! llama.cpp's `gguf_write_to_file` and gguf-py's `GGUFWriter` lay it out. The file is written
//! atomically ([`crate::atomic::write_atomic`]): a failure leaves no half-written file.

use std::path::Path;

use super::gguf::Value;
use crate::error::{Error, Result};
use crate::quant::gguf_blocks::{self, GgmlType};

/// The alignment of tensor data (GGUF's default `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

#[derive(Debug)]
struct Tensor {
    name: String,
    /// Row-major (PyTorch) shape; GGUF stores it reversed.
    shape: Vec<usize>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding every metadata value of `g` (its tokenizer, chat template and
    /// hyper-parameters), for a file of the same model with other tensors. `general.alignment`
    /// is left out: this writer aligns to [`ALIGNMENT`].
    pub fn with_metadata_of(g: &super::gguf::GgufFile) -> Self {
        let mut w = Self::new();
        for (k, v) in &g.metadata {
            if k != "general.alignment" {
                w.set(k, v.clone());
            }
        }
        w
    }

    /// Sets a metadata key (a key set twice keeps its first place and its last value).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor of row-major `shape`, quantized from f32 `values` to `ty`.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, values: &[f32]) -> Result<()> {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::invalid(
                "GGUF tensor",
                format!("`{name}`: shape {shape:?} does not hold {} values", values.len()),
            ));
        }
        // ggml quantizes along rows: a row must be a whole number of blocks.
        let row = shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block().0) {
            return Err(Error::invalid(
                "GGUF tensor",
                format!("`{name}`: rows of {row} values are not a whole number of {} blocks", ty.name()),
            ));
        }
        let data =
            gguf_blocks::quantize(ty, values).map_err(|e| Error::invalid("GGUF tensor", format!("`{name}`: {e}")))?;
        self.tensors.push(Tensor { name: name.to_string(), shape: shape.to_vec(), ty, data });
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = self.header()?;
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad(&mut out);
        }
        Ok(out)
    }

    /// Everything before the tensor data: magic, version, counts, metadata, the tensor table,
    /// padding to [`ALIGNMENT`].
    fn header(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            put_value(&mut out, k, v, true)?;
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend((t.shape.len().max(1) as u32).to_le_bytes());
            if t.shape.is_empty() {
                out.extend(1u64.to_le_bytes());
            }
            for &d in t.shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(gguf_blocks::type_id(t.ty).to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += t.data.len().next_multiple_of(ALIGNMENT);
        }
        pad(&mut out);
        Ok(out)
    }

    /// Writes the file atomically: [`GgufWriter::to_bytes`]'s bytes, the tensor data streamed
    /// from where it is held rather than copied into one buffer first (a merged model's file is
    /// as large as the model).
    pub fn write(&self, path: &Path) -> Result<()> {
        let header = self.header()?;
        crate::atomic::write_atomic_with(path, |f| {
            let mut put = |bytes: &[u8]| f.write_all(bytes).map_err(|e| Error::io(path, e));
            put(&header)?;
            for t in &self.tensors {
                put(&t.data)?;
                put(&[0; ALIGNMENT][..t.data.len().next_multiple_of(ALIGNMENT) - t.data.len()])?;
            }
            Ok(())
        })
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_of(v: &Value) -> u32 {
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

/// A value with its type id in front when `typed` (array elements carry none of their own).
fn put_value(out: &mut Vec<u8>, key: &str, v: &Value, typed: bool) -> Result<()> {
    if typed {
        out.extend(type_of(v).to_le_bytes());
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array keeps a type for its elements: u32, as any would do.
            let ety = items.first().map_or(4, type_of);
            if ety == 9 || items.iter().any(|i| type_of(i) != ety) {
                return Err(Error::invalid(
                    "GGUF metadata",
                    format!("`{key}`: an array must hold values of one type, and no arrays"),
                ));
            }
            out.extend(ety.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, key, i, false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgufFile;

    #[test]
    fn written_files_read_back_through_the_reader() {
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()));
        w.set("adapter.lora.alpha", Value::F32(16.0));
        w.set("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into()), Value::String("b".into())]));
        w.set("general.architecture", Value::String("qwen2".into()));
        let a: Vec<f32> = (0..96).map(|i| i as f32 / 7.0 - 3.0).collect();
        w.add_tensor("t.f32", &[3, 32], GgmlType::F32, &a).expect("f32");
        w.add_tensor("t.f16", &[3, 32], GgmlType::F16, &a).expect("f16");
        w.add_tensor("t.q8", &[3, 32], GgmlType::Q8_0, &a).expect("q8_0");
        // After the Q8_0 data (102 bytes, padded to 128), so its place depends on the padding.
        w.add_tensor("t.after", &[2, 32], GgmlType::F32, &a[..64]).expect("f32 after");
        let dir = std::env::temp_dir().join(format!("edgetune-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("t.gguf");
        w.write(&path).expect("write");
        // The file streamed to disk is the layout built in memory, byte for byte.
        assert!(std::fs::read(&path).expect("written") == w.to_bytes().expect("bytes"), "the streamed file differs");
        let g = GgufFile::open(&path).expect("reads back");
        assert_eq!(g.get_str("general.architecture").expect("arch"), "qwen2");
        assert_eq!(g.tensor_f32("t.after").expect("the tensor after Q8_0"), (a[..64].to_vec(), vec![2, 32]));
        assert_eq!(g.metadata.len(), 3);
        assert_eq!(g.get("adapter.lora.alpha"), Some(&Value::F32(16.0)));
        let (f, shape) = g.tensor_f32("t.f32").expect("f32 tensor");
        assert_eq!((f, shape), (a.clone(), vec![3, 32]));
        let (h, _) = g.tensor_f32("t.f16").expect("f16 tensor");
        for (x, y) in a.iter().zip(&h) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-11), "{x} vs {y}");
        }
        let (q, _) = g.tensor_f32("t.q8").expect("q8 tensor");
        for (blk, (xs, ys)) in a.chunks(32).zip(q.chunks(32)).enumerate() {
            // Rounding to the nearest step d = amax/127 (d itself rounded to f16).
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in xs.iter().zip(ys) {
                assert!((x - y).abs() <= amax / 127.0 * (0.5 + 2f32.powi(-11) * 127.0), "block {blk}: {x} vs {y}");
            }
        }
        for t in g.tensors.values() {
            assert_eq!(t.offset % ALIGNMENT, 0, "{} misaligned", t.name);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shapes_that_do_not_fit_the_type_are_errors() {
        let mut w = GgufWriter::new();
        let e = w.add_tensor("x", &[2, 20], GgmlType::Q8_0, &[0.0; 40]).expect_err("20 is no block");
        assert!(e.to_string().contains("`x`"), "{e}");
        assert!(w.add_tensor("y", &[2, 3], GgmlType::F32, &[0.0; 5]).is_err());
        w.set("bad", Value::Array(vec![Value::U32(1), Value::F32(1.0)]));
        assert!(w.to_bytes().is_err());
    }
}
