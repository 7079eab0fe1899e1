//! Reading the files edgetune takes whole (configs, tokenizers, settings, training data) with a
//! size limit each, and mapping the large binary ones (weights, adapters, checkpoints).
//!
//! A read sized by the file alone would make a file larger than memory an allocation that
//! aborts the host process (Rust aborts when an allocation fails; `catch_unwind` cannot stop
//! it). So a file past its limit is an error that names it, its size, the limit and what to do,
//! before anything is allocated for it; a file that grows while it is read is cut off one byte
//! past the limit. The limits are far above any real file of the kind: the largest published
//! `tokenizer.json` files are about 35 MB, and a gigabyte of training text is some 250 million
//! tokens, days of training on the GPUs this SDK is for.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// `config.json`, `generation_config.json`, `tokenizer_config.json`, `adapter_config.json`, a
/// shard index, a chat template, training settings and batch job files.
pub const CONFIG_BYTES: u64 = 64 << 20;
/// `tokenizer.json`.
pub const TOKENIZER_BYTES: u64 = 512 << 20;
/// One training data file; a folder may hold several.
pub const DATA_FILE_BYTES: u64 = 1 << 30;
/// All the training data files of a run together.
pub const DATA_TOTAL_BYTES: u64 = 4 << 30;

/// The whole of `path`, at most `limit` bytes; `what` names the kind of file in the error, and
/// `hint` says what to do instead.
pub fn read(path: &Path, limit: u64, what: &str, hint: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_large = |len: String| {
        let mib = limit as f64 / (1u64 << 20) as f64;
        Error::format(path, format!("is {len} bytes; {what} may be at most {limit} bytes ({mib:.0} MiB){hint}"))
    };
    if len > limit {
        return Err(too_large(len.to_string()));
    }
    // The length only sizes the first allocation; a file that grows meanwhile is read to one
    // byte past the limit.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(format!("over {limit}")));
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text; text that is not UTF-8 is an error naming the offset.
pub fn read_text(path: &Path, limit: u64, what: &str, hint: &str) -> Result<String> {
    String::from_utf8(read(path, limit, what, hint)?).map_err(|e| {
        Error::format(path, format!("is not UTF-8 text (first bad byte at offset {})", e.utf8_error().valid_up_to()))
    })
}

/// A config-sized JSON or text file (see [`CONFIG_BYTES`]).
pub fn read_config(path: &Path) -> Result<String> {
    read_text(path, CONFIG_BYTES, "a configuration file", "")
}

/// `path` mapped read-only: weights, adapters and checkpoints are read through the map, so their
/// size never becomes one allocation.
pub fn map(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a read-only map of a file that edgetune does not modify while it is open (its own
    // writes go to a new file that is renamed over the old one, leaving the mapped one intact).
    // A file changed on disk by another process while mapped is outside what it can guard
    // against.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

/// The repository's test fixtures, for unit tests: under `EDGETUNE_FIXTURES` when set (the unit
/// tests of the unpacked `.crate` file), else in the checkout the crate is built in.
#[cfg(test)]
pub(crate) fn test_fixtures() -> std::path::PathBuf {
    std::env::var_os("EDGETUNE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_past_its_limit_is_refused_naming_it_and_the_limit() {
        let dir = std::env::temp_dir().join(format!("edgetune-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("big.json");
        std::fs::write(&p, vec![b'x'; (3 << 20) + 1]).expect("write");
        let e = read(&p, 3 << 20, "a test file", "; split it").expect_err("past the limit").to_string();
        let want = "is 3145729 bytes; a test file may be at most 3145728 bytes (3 MiB); split it";
        assert!(e.contains("big.json") && e.contains(want), "{e}");
        assert_eq!(read(&p, 4 << 20, "x", "").expect("under the limit").len(), (3 << 20) + 1);
        std::fs::write(&p, [0xff, b'a']).expect("write");
        let e = read_text(&p, 16, "x", "").expect_err("not UTF-8").to_string();
        assert!(e.contains("not UTF-8 text (first bad byte at offset 0)"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
