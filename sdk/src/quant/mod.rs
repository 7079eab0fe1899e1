//! Quantized formats: NF4 (bitsandbytes-exact) and the ggml block types GGUF files use.

#![deny(missing_docs)]
pub mod gguf_blocks;
pub mod nf4;
