//! edgetune: fine-tune and run Llama-family LLMs on any GPU through WGSL compute shaders.
//!
//! The data flow: a model folder or GGUF file is opened ([`model`]), its linear weights are
//! quantized to NF4 ([`quant`]) and uploaded once to the GPU ([`gpu`]); the forward pass runs as
//! a sequence of WGSL kernels, each with a CPU twin in [`reference`].

pub mod atomic;
pub mod data;
pub mod error;
pub mod files;
pub mod gpu;
pub mod infer;
pub mod lora;
pub mod model;
pub mod prim;
pub mod quant;
pub mod reference;
pub mod session;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
pub use session::Session;
