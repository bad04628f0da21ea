//! Kernel launches with positional arguments.

use cudarc::driver::{CudaFunction, CudaStream};

use crate::CudaError;
use crate::ffi::DevPtr;

/// One kernel argument, passed by value like the `.cu` signature declares it.
#[derive(Debug, Clone, Copy)]
pub enum KArg {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared: u32,
}

impl Dims {
    /// A 1-D launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Self { grid: (blocks.max(1), 1, 1), block: (threads, 1, 1), shared: 0 }
    }

    /// A 1-D launch covering `n` items with `threads` per block (grid capped
    /// at 2^31 − 1 blocks; kernels use grid-stride loops beyond that).
    pub fn cover(n: usize, threads: u32) -> Self {
        let blocks = n.div_ceil(threads.max(1) as usize).clamp(1, i32::MAX as usize);
        Self::linear(blocks as u32, threads)
    }
}

/// Launches `f` on `stream`. The caller guarantees that `args` match the
/// kernel's parameter list in number, order and type, and that every pointer
/// addresses device memory large enough for what the kernel touches at these
/// dimensions; the kernel wrappers of [`crate::kernels`] are where that holds.
pub fn launch(stream: &CudaStream, f: &CudaFunction, dims: Dims, args: &[KArg]) -> Result<(), CudaError> {
    // Each argument's bytes live in `store` (u64-aligned) while the driver reads them.
    let mut store: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            KArg::Ptr(p) => p,
            KArg::I32(v) => u64::from(v as u32),
            KArg::I64(v) => v as u64,
            KArg::F32(v) => u64::from(v.to_bits()),
        })
        .collect();
    let mut params: Vec<*mut std::ffi::c_void> = store.iter_mut().map(|v| (v as *mut u64).cast()).collect();
    // SAFETY: on little-endian x86_64/aarch64 the low bytes of each u64 are the
    // i32/f32 value, which is what the driver reads for 4-byte parameters;
    // `store` outlives the call; argument/kernel agreement is the caller's
    // contract above.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            dims.grid,
            dims.block,
            dims.shared,
            stream.cu_stream(),
            &mut params,
        )
    }
    .map_err(|e| CudaError::Driver(format!("kernel launch: {e:?}")))
}
