//! GPU layer: the wgpu context, the shader registry, buffers and dispatch, and the launchers.
pub mod context;
pub mod dispatch;
pub mod family;
pub mod launch;
pub mod memory;
pub mod probe;
pub mod profile;
pub mod workgroup;
pub use edgetune_shaders as shaders;

pub use context::{AdapterReport, GpuContext, GpuCounts, GpuOptions, ShaderChecks};
pub use dispatch::{BindGroups, Commands, Encoder, PendingRead};
pub use family::{KernelFamily, Kernels};
pub use memory::GpuMemory;
pub use profile::{Cost, KernelTime, Timer};
pub use workgroup::workgroup_bytes;
