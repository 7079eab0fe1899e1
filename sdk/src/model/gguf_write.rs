//! GGUF v3 writer: metadata, the tensor table, and tensor data aligned to 32 bytes, laid out as
//! llama.cpp's `gguf_write_to_file` and gguf-py's `GGUFWriter` lay it out. The file is written
//! atomically ([`crate::atomic::write_atomic_with`]): a failure leaves no half-written file. A
//! tensor is either held (quantized when added) or declared and quantized as the file reaches
//! it ([`GgufWriter::write_with`]), so a file as large as a model is written holding one tensor.

use std::path::Path;

use super::gguf::Value;
use crate::error::{Error, Result};
use crate::quant::gguf_blocks::{self, GgmlType};

/// The alignment of tensor data (GGUF's default `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// A GGUF file being assembled: its metadata, and its tensors held or declared.
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
    /// The quantized data, or `None` for a tensor declared to be given when written.
    data: Option<Vec<u8>>,
    /// The data's size in bytes, from its type and shape.
    bytes: usize,
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
        let bytes = data_bytes(name, shape, ty)?;
        let data = quantized(name, shape, ty, values)?;
        self.tensors.push(Tensor { name: name.to_string(), shape: shape.to_vec(), ty, data: Some(data), bytes });
        Ok(())
    }

    /// Declares a tensor of row-major `shape` and type `ty` whose values
    /// [`GgufWriter::write_with`] asks for when the file reaches it.
    pub fn declare_tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType) -> Result<()> {
        let bytes = data_bytes(name, shape, ty)?;
        self.tensors.push(Tensor { name: name.to_string(), shape: shape.to_vec(), ty, data: None, bytes });
        Ok(())
    }

    /// The file's bytes (every tensor held, none declared).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = self.header()?;
        for t in &self.tensors {
            out.extend_from_slice(t.data.as_deref().ok_or_else(|| undeclared_values(&t.name))?);
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
            offset += t.bytes.next_multiple_of(ALIGNMENT);
        }
        pad(&mut out);
        Ok(out)
    }

    /// Writes the file atomically: [`GgufWriter::to_bytes`]'s bytes, the tensor data streamed
    /// from where it is held rather than copied into one buffer first.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.write_with(path, |name| Err(undeclared_values(name)))
    }

    /// Writes the file atomically as [`GgufWriter::write`] does, asking `values(name)` for each
    /// declared tensor's f32 values as the file reaches it and quantizing them then: the file
    /// holds one declared tensor at a time (a merged model's file is as large as the model). An
    /// error from `values`, or values that do not fill the declared shape, leaves no file.
    pub fn write_with(&self, path: &Path, mut values: impl FnMut(&str) -> Result<Vec<f32>>) -> Result<()> {
        let header = self.header()?;
        crate::atomic::write_atomic_with(path, |f| {
            let mut put = |bytes: &[u8]| f.write_all(bytes).map_err(|e| Error::io(path, e));
            put(&header)?;
            for t in &self.tensors {
                let given;
                let data = match &t.data {
                    Some(d) => d,
                    None => {
                        given = quantized(&t.name, &t.shape, t.ty, &values(&t.name)?)?;
                        &given
                    }
                };
                put(data)?;
                put(&[0; ALIGNMENT][..t.bytes.next_multiple_of(ALIGNMENT) - t.bytes])?;
            }
            Ok(())
        })
    }
}

/// The size of a tensor's data, or an error naming it when its rows are no whole number of
/// `ty`'s blocks (ggml quantizes along rows).
fn data_bytes(name: &str, shape: &[usize], ty: GgmlType) -> Result<usize> {
    let row = shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(ty.block().0) {
        return Err(Error::invalid(
            "GGUF tensor",
            format!("`{name}`: rows of {row} values are not a whole number of {} blocks", ty.name()),
        ));
    }
    ty.bytes_for(shape.iter().product())
        .ok_or_else(|| Error::invalid("GGUF tensor", format!("`{name}`: shape {shape:?} is too large")))
}

/// `values` quantized to `ty`, once they are known to fill `shape`.
fn quantized(name: &str, shape: &[usize], ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if shape.iter().product::<usize>() != values.len() {
        return Err(Error::invalid(
            "GGUF tensor",
            format!("`{name}`: shape {shape:?} does not hold {} values", values.len()),
        ));
    }
    gguf_blocks::quantize(ty, values).map_err(|e| Error::invalid("GGUF tensor", format!("`{name}`: {e}")))
}

fn undeclared_values(name: &str) -> Error {
    Error::invalid("GGUF tensor", format!("`{name}` was declared, and no values were given for it"))
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
    fn declared_tensors_are_quantized_as_the_file_reaches_them() {
        let dir = std::env::temp_dir().join(format!("edgetune-gguf-declared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let values =
            |i: usize, n: usize| -> Vec<f32> { (0..n).map(|j| ((i * 31 + j) % 17) as f32 / 5.0 - 1.5).collect() };
        let tensors = [("a", [2, 64], GgmlType::Q8_0), ("b", [3, 32], GgmlType::F16), ("c", [1, 96], GgmlType::Q4_0)];
        // The same tensors held from the start: the file the streamed one must equal.
        let mut held = GgufWriter::new();
        held.set("general.architecture", Value::String("llama".into()));
        let mut declared = GgufWriter::new();
        declared.set("general.architecture", Value::String("llama".into()));
        for (i, (name, shape, ty)) in tensors.iter().enumerate() {
            let v = values(i, shape.iter().product());
            held.add_tensor(name, shape, *ty, &v).expect("held");
            // The middle one stays held in the declared file too: both kinds in one file.
            if i == 1 {
                declared.add_tensor(name, shape, *ty, &v).expect("held among declared");
            } else {
                declared.declare_tensor(name, shape, *ty).expect("declared");
            }
        }
        let e = declared.to_bytes().expect_err("to_bytes has no values for a declared tensor");
        assert!(e.to_string().contains("`a` was declared"), "{e}");
        let path = dir.join("declared.gguf");
        let mut asked = Vec::new();
        declared
            .write_with(&path, |name| {
                asked.push(name.to_string());
                let i = tensors.iter().position(|t| t.0 == name).expect("a declared name");
                Ok(values(i, tensors[i].1.iter().product()))
            })
            .expect("streamed");
        assert_eq!(asked, ["a", "c"], "each declared tensor asked for once, in file order");
        assert!(
            std::fs::read(&path).expect("written") == held.to_bytes().expect("bytes"),
            "differs from the held file"
        );
        // Values that do not fill a declared shape, an error from the source, or a plain write
        // of a declared tensor: an error naming the tensor, and no file.
        type Source = Box<dyn Fn(&str) -> Result<Vec<f32>>>;
        let failing: [(&str, Source); 2] = [
            ("`a`: shape [2, 64] does not hold 127 values", Box::new(|_: &str| Ok(vec![0.0; 127]))),
            (
                "no values for `a`",
                Box::new(|name: &str| Err(Error::invalid("source", format!("no values for `{name}`")))),
            ),
        ];
        for (i, (want, source)) in failing.iter().enumerate() {
            let path = dir.join(format!("failed-{i}.gguf"));
            let e = declared.write_with(&path, source).expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
            assert!(!path.exists(), "a failed write left {}", path.display());
        }
        let e = declared.write(&dir.join("plain.gguf")).expect_err("write has no values for a declared tensor");
        assert!(e.to_string().contains("`a` was declared"), "{e}");
        let e = declared.declare_tensor("d", &[2, 20], GgmlType::Q8_0).expect_err("20 is no block");
        assert!(e.to_string().contains("`d`"), "{e}");
        let leftover: Vec<_> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(leftover, ["declared.gguf"], "temporary files left behind");
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
