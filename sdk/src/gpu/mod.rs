//! GPU layer: the wgpu context, the shader registry, buffers and dispatch, and the launchers.
pub mod context;
pub mod dispatch;
pub mod launch;
pub mod memory;
pub mod shaders;

pub use context::{AdapterReport, GpuContext, GpuCounts, GpuOptions, KernelTime};
pub use dispatch::{BindGroups, Encoder, PendingRead};
pub use memory::GpuMemory;
