//! Quantized formats: NF4 (bitsandbytes-exact) and the ggml block types GGUF files use.

pub mod gguf_blocks;
pub mod nf4;
