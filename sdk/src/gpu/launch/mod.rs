//! Typed launchers, one per kernel, grouped by family. Shapes are given in elements; every
//! launcher records into an encoder and returns immediately.

mod attention;
mod elementwise;
mod loss;
mod matmul;
mod optimizer;
mod sampling;

pub use attention::*;
pub use elementwise::*;
pub use loss::*;
pub use matmul::*;
pub use optimizer::*;
pub use sampling::*;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::dispatch::{Dispatch, Encoder};
use crate::gpu::profile::Cost;
use crate::gpu::shaders::*;

/// Splits a 1-D workgroup count over x and y (each at most 65535); shaders recombine it as
/// `gid.x + gid.y * 65535 * workgroup_size`.
fn groups_1d(n: u32) -> [u32; 3] {
    if n <= 65535 { [n.max(1), 1, 1] } else { [65535, n.div_ceil(65535), 1] }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} does not fit the GPU's 32-bit indices")))
}
