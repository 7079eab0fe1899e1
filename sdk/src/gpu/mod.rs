//! GPU layer: the wgpu context and the WGSL kernels with their launchers.
pub mod context;
pub mod kernels;
pub mod memory;

pub use context::{AdapterReport, GpuContext, GpuCounts, GpuOptions, KernelTime};
pub use memory::GpuMemory;
