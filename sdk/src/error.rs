//! The one error type of edgetune. Every variant names what went wrong and where (file, field,
//! tensor), so a caller can show it to a person or act on it.

use std::path::PathBuf;

/// Everything that can go wrong in edgetune.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter was found.
    #[error(
        "no GPU adapter found{detail}. Install a Vulkan, Metal or DX12 driver for your GPU; on a \
         machine without one, Mesa's CPU rasterizer works (Debian/Ubuntu: `apt-get install \
         mesa-vulkan-drivers libvulkan1`). Set EDGETUNE_ADAPTER to pick an adapter by name."
    )]
    NoAdapter {
        /// What was found instead, if anything (adapters that did not match), with a leading
        /// separator; empty when there is nothing to add.
        detail: String,
    },

    /// The GPU device could not be created or reported an error.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its content is not what was expected.
    #[error("{path}: {what}")]
    Format {
        /// The file (or, for records and settings handed over in memory, their label).
        path: PathBuf,
        /// What is wrong, and where in the file: a line, a field, a tensor.
        what: String,
    },

    /// A model uses something edgetune does not support (architecture, tensor type, rope scaling).
    #[error("{path}: unsupported {what}")]
    Unsupported {
        /// The model file or folder.
        path: PathBuf,
        /// What it uses that edgetune does not support.
        what: String,
    },

    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        /// The file that holds the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its shape in the file.
        actual: Vec<usize>,
        /// The shape the model's configuration gives it.
        expected: Vec<usize>,
    },

    /// A tensor the model needs is missing.
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor {
        /// The model file or folder.
        path: PathBuf,
        /// The tensor's name (Hugging Face naming).
        tensor: String,
    },

    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer ({source_name}): {what}")]
    Tokenizer {
        /// Where the tokenizer came from: a `tokenizer.json` path or a GGUF file's metadata.
        source_name: String,
        /// What failed.
        what: String,
    },

    /// A chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),

    /// An argument given by the caller is invalid.
    #[error("invalid {field}: {what}")]
    Invalid {
        /// The argument or setting, as the caller named it (`learning_rate`, `lora.r`).
        field: String,
        /// What is wrong with it and what was expected.
        what: String,
    },

    /// Training kept producing a non-finite loss or gradient.
    #[error("training diverged at step {step}: {what}")]
    Diverged {
        /// The optimizer step at which training gave up.
        step: u64,
        /// What was not finite, and how many steps were skipped.
        what: String,
    },

    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,

    /// The GPU driver ran out of memory while allocating `what`, for which `planned_bytes` were
    /// planned in all.
    #[error(
        "out of GPU memory allocating {what} ({:.0} MiB planned): {detail}",
        *planned_bytes as f64 / 1048576.0
    )]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// The bytes planned for it (and what it is allocated with).
        planned_bytes: u64,
        /// The driver's words, the GPU's memory and the setting to lower.
        detail: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Format { path: path.into(), what: what.into() }
    }
    pub(crate) fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Unsupported { path: path.into(), what: what.into() }
    }
    pub(crate) fn invalid(field: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), what: what.into() }
    }
}

/// A shader that cannot be expanded or read (the registry's error) is a GPU error.
impl From<edgetune_shaders::ShaderError> for Error {
    fn from(e: edgetune_shaders::ShaderError) -> Self {
        Error::Gpu(e.0)
    }
}
