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
    NoAdapter { detail: String },

    /// The GPU device could not be created or reported an error.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its content is not what was expected.
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },

    /// A model uses something edgetune does not support (architecture, tensor type, rope scaling).
    #[error("{path}: unsupported {what}")]
    Unsupported { path: PathBuf, what: String },

    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, actual: Vec<usize>, expected: Vec<usize> },

    /// A tensor the model needs is missing.
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },

    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer ({source_name}): {what}")]
    Tokenizer { source_name: String, what: String },

    /// A chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),

    /// An argument given by the caller is invalid.
    #[error("invalid {field}: {what}")]
    Invalid { field: String, what: String },

    /// Training kept producing a non-finite loss or gradient.
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: u64, what: String },

    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,

    /// The GPU driver ran out of memory while allocating `what`, for which `planned_bytes` were
    /// planned in all.
    #[error(
        "out of GPU memory allocating {what} ({:.0} MiB planned): {detail}",
        *planned_bytes as f64 / 1048576.0
    )]
    OutOfMemory { what: String, planned_bytes: u64, detail: String },
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
