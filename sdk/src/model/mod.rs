//! Models: configuration, file formats, weights and the Llama-family forward pass.
pub mod config;
pub mod gguf;
pub mod weights;
