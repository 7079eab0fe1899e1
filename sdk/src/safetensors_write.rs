//! Safetensors files written as a stream: everything before the data laid out as the
//! safetensors crate lays it out, then each tensor's data as it is produced, so that a file
//! need not be assembled in memory first (a merged model's shards), with the metadata's keys
//! sorted, so that the same tensors are always the same bytes (checkpoints).

use std::collections::BTreeMap;

use safetensors::Dtype;

use crate::error::{Error, Result};

/// One tensor of a file: its name, element type and row-major shape.
#[derive(Debug, Clone)]
pub(crate) struct Entry<'a> {
    pub(crate) name: &'a str,
    pub(crate) dtype: Dtype,
    pub(crate) shape: &'a [usize],
}

impl Entry<'_> {
    /// Bytes of its data.
    pub(crate) fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Everything before the data of a file of `tensors`: the header's length (8 bytes,
/// little-endian) and the header (`__metadata__` first, its keys sorted where the crate writes
/// them in the order of a `HashMap`, which differs from one process to the next; then each
/// tensor's `dtype`, `shape` and `data_offsets`), padded with spaces to 8 bytes; and the order in
/// which the tensors' data follow it (indices into `tensors`), the crate's: by descending
/// element alignment, then by name.
pub(crate) fn header(tensors: &[Entry<'_>], meta: &BTreeMap<&str, String>) -> Result<(Vec<u8>, Vec<usize>)> {
    fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
        serde_json::to_string(v).map_err(|e| Error::invalid("safetensors header", e.to_string()))
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&l, &r| tensors[r].dtype.cmp(&tensors[l].dtype).then(tensors[l].name.cmp(tensors[r].name)));
    let mut head = format!("{{\"__metadata__\":{}", json(meta)?);
    let mut offset = 0;
    for t in order.iter().map(|&i| &tensors[i]) {
        let end = offset + t.bytes();
        head += &format!(
            ",{}:{{\"dtype\":{},\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            json(t.name)?,
            json(&t.dtype)?,
            json(t.shape)?
        );
        offset = end;
    }
    head.push('}');
    while head.len() % 8 != 0 {
        head.push(' ');
    }
    let mut out = Vec::with_capacity(8 + head.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(head.as_bytes());
    Ok((out, order))
}
