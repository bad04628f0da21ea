//! Launch wrappers for kiln's NVRTC kernels (`kernels/cu/*.cu`): [`Kernels`] holds every
//! function, loaded once per engine, and each family is one method taking a stream and an
//! argument struct of raw device pointers and dimensions.
//!
//! Every method validates its arguments first (sizes, rank limits, supported element types,
//! values that must fit the kernel's 32-bit parameters) and returns
//! [`CudaError::InvalidArgument`] instead of launching something out of range. Pointers cannot be
//! checked here: they must address device memory large enough for the shapes given, which the
//! engine's memory plan guarantees. An empty output launches nothing.
//!
//! The validation and grid computation of each family is a pure `plan` function, so it is unit
//! tested without a GPU; the GPU tests (`tests/gpu/kernels.rs`) compare every family with the
//! engine's CPU reference ops.

mod attention;
mod elementwise;
mod ew_math;
mod movement;
mod norm;
mod pool;
mod quant;

use cudarc::driver::{CudaFunction, CudaStream};
use kiln_engine::DType;
use kiln_kernels::sources::{self, KernelSource};

pub use attention::{AttentionArgs, AttentionMask};
pub use elementwise::{EW_MAX_INPUTS, EW_MAX_OPS, EW_MAX_RANK, EwBuilder, EwOp, EwProgram, Reg};
pub use movement::{CastArgs, CopyArgs, GatherArgs, row_major_strides};
pub use norm::{LayerNormArgs, ReduceArgs, ReduceKind, SoftmaxArgs};
pub use pool::{GlobalPoolArgs, Layout, Pool2dArgs, PoolKind};
pub use quant::{
    AccLayout, DwConvI8Args, Int8Act, Int8Out, QuantizeArgs, RequantArgs, quantize_reference, requant_copy_reference,
    requant_reference,
};

use crate::CudaError;
use crate::device::Device;
use crate::ffi::launch::{Dims, KArg, launch};

/// Element type of a device tensor, with the codes the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    F16,
    I64,
    I32,
    /// One byte; ONNX BOOL tensors are stored as 0/1 bytes.
    U8,
    /// Quantised activations and weights of INT8 layers (only the INT8 kernels and
    /// the integer GEMMs/convolutions read them).
    I8,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 => 2,
            Self::I64 => 8,
            Self::U8 | Self::I8 => 1,
        }
    }

    /// The code the kernels switch on (`E_F32` … `E_U8` in the `.cu` files).
    pub fn code(self) -> i32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::I64 => 2,
            Self::I32 => 3,
            Self::U8 => 4,
            Self::I8 => 5,
        }
    }

    /// The device element type of an engine dtype (BOOL and UINT8 are both bytes).
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::I64 => Some(Self::I64),
            DType::I32 => Some(Self::I32),
            DType::U8 | DType::Bool => Some(Self::U8),
            _ => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16)
    }

    /// Index into a family's FP32/FP16 function table, or an error naming `what`.
    fn float_index(self, what: &str) -> Result<usize, CudaError> {
        match self {
            Self::F32 => Ok(0),
            Self::F16 => Ok(1),
            other => Err(invalid(format!("{what} must be F32 or F16, got {other:?}"))),
        }
    }
}

/// Suffixes of the FP32/FP16 instantiations, in table order.
const FLOAT_SUFFIX: [&str; 2] = ["f32", "f16"];

/// A validated launch: its grid and arguments (`None` from a plan: nothing to do).
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) dims: Dims,
    pub(crate) args: Vec<KArg>,
}

/// Functions indexed by [input float index][output float index].
type FloatPairs = [[CudaFunction; 2]; 2];

/// Every kernel function of the engine, fetched (and compiled, or read from the kernel cache)
/// once by [`Kernels::load`].
#[derive(Debug, Clone)]
pub struct Kernels {
    cast: CudaFunction,
    copy: CudaFunction,
    elementwise: CudaFunction,
    gather: CudaFunction,
    pool2d: [CudaFunction; 2],
    gap_nchw: [CudaFunction; 2],
    gap_nhwc: [CudaFunction; 2],
    softmax_warp: FloatPairs,
    softmax_block: FloatPairs,
    layernorm: FloatPairs,
    reduce_rows: FloatPairs,
    reduce_cols: FloatPairs,
    /// [Q/K/V/Y float index][mask float index].
    attention: FloatPairs,
    quantize: CudaFunction,
    requant: CudaFunction,
    dwconv_i8: CudaFunction,
}

impl Kernels {
    /// Fetches every function from `dev` (NVRTC compiles each `.cu` on first use per process,
    /// or loads it from the disk cache).
    pub fn load(dev: &Device) -> Result<Kernels, CudaError> {
        let one = |src: &KernelSource, name: &str| dev.function(src, name);
        let per_float = |src: &KernelSource, prefix: &str| -> Result<[CudaFunction; 2], CudaError> {
            Ok([one(src, &format!("{prefix}_f32"))?, one(src, &format!("{prefix}_f16"))?])
        };
        let pairs = |src: &KernelSource, prefix: &str, mask: &str| -> Result<FloatPairs, CudaError> {
            let f = |i: usize, o: usize| one(src, &format!("{prefix}_{}_{mask}{}", FLOAT_SUFFIX[i], FLOAT_SUFFIX[o]));
            Ok([[f(0, 0)?, f(0, 1)?], [f(1, 0)?, f(1, 1)?]])
        };
        Ok(Kernels {
            cast: one(&sources::CAST, "kiln_cast")?,
            copy: one(&sources::COPY, "kiln_copy_strided")?,
            elementwise: one(&sources::ELEMENTWISE, "kiln_elementwise")?,
            gather: one(&sources::GATHER, "kiln_gather")?,
            pool2d: per_float(&sources::POOL, "kiln_pool2d")?,
            gap_nchw: per_float(&sources::POOL, "kiln_global_avg_pool_nchw")?,
            gap_nhwc: per_float(&sources::POOL, "kiln_global_avg_pool_nhwc")?,
            softmax_warp: pairs(&sources::SOFTMAX, "kiln_softmax_warp", "")?,
            softmax_block: pairs(&sources::SOFTMAX, "kiln_softmax_block", "")?,
            layernorm: pairs(&sources::LAYERNORM, "kiln_layernorm", "")?,
            reduce_rows: pairs(&sources::REDUCE, "kiln_reduce_rows", "")?,
            reduce_cols: pairs(&sources::REDUCE, "kiln_reduce_cols", "")?,
            attention: pairs(&sources::ATTENTION, "kiln_attention", "m")?,
            quantize: one(&sources::QUANT, "kiln_quantize")?,
            requant: one(&sources::QUANT, "kiln_requant")?,
            dwconv_i8: one(&sources::QUANT, "kiln_dwconv_i8")?,
        })
    }
}

/// Launches `plan` (when there is one) of function `f`.
fn run(stream: &CudaStream, f: &CudaFunction, plan: Option<Launch>) -> Result<(), CudaError> {
    match plan {
        Some(l) => launch(stream, f, l.dims, &l.args),
        None => Ok(()),
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> CudaError {
    CudaError::InvalidArgument(msg.into())
}

/// `v` as a 32-bit kernel parameter.
pub(crate) fn int(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| invalid(format!("{what} = {v} exceeds the kernel's 32-bit range")))
}

/// `v` as a 64-bit kernel parameter.
pub(crate) fn long(v: usize, what: &str) -> Result<i64, CudaError> {
    i64::try_from(v).map_err(|_| invalid(format!("{what} = {v} exceeds the 64-bit range")))
}

/// Product of `dims`, or an error when it overflows `i64`.
pub(crate) fn numel(dims: &[usize], what: &str) -> Result<usize, CudaError> {
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(format!("{what} {dims:?} has too many elements")))?;
    long(n, what)?;
    Ok(n)
}

/// A required device pointer.
pub(crate) fn ptr(p: u64, what: &str) -> Result<KArg, CudaError> {
    if p == 0 { Err(invalid(format!("{what} is a null device pointer"))) } else { Ok(KArg::Ptr(p)) }
}

/// An optional device pointer (null in the kernel when absent).
pub(crate) fn opt_ptr(p: Option<u64>, what: &str) -> Result<KArg, CudaError> {
    match p {
        Some(p) => ptr(p, what),
        None => Ok(KArg::Ptr(0)),
    }
}

/// Blocks for a grid-stride loop over `n` items (the kernels loop past the cap).
pub(crate) fn stride_blocks(n: usize, threads: u32) -> u32 {
    const CAP: usize = 1 << 20;
    n.div_ceil(threads as usize).clamp(1, CAP) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elem_codes_sizes_and_dtypes() {
        let all = [Elem::F32, Elem::F16, Elem::I64, Elem::I32, Elem::U8];
        assert_eq!(all.map(Elem::code), [0, 1, 2, 3, 4]);
        assert_eq!(all.map(Elem::size), [4, 2, 8, 4, 1]);
        assert_eq!(Elem::from_dtype(DType::Bool), Some(Elem::U8));
        assert_eq!(Elem::from_dtype(DType::F16), Some(Elem::F16));
        assert_eq!(Elem::from_dtype(DType::F64), None);
        assert_eq!(Elem::F16.float_index("x").ok(), Some(1));
        assert!(matches!(Elem::I64.float_index("x"), Err(CudaError::InvalidArgument(_))));
    }

    #[test]
    fn helpers_reject_overflow_and_null() {
        assert!(int(1 << 31, "n").is_err());
        assert_eq!(int(7, "n").ok(), Some(7));
        assert!(numel(&[usize::MAX, 2], "x").is_err());
        assert!(numel(&[1 << 40, 1 << 30], "x").is_err());
        assert_eq!(numel(&[], "x").ok(), Some(1));
        assert!(ptr(0, "x").is_err());
        assert!(matches!(opt_ptr(None, "x"), Ok(KArg::Ptr(0))));
        assert_eq!(stride_blocks(0, 256), 1);
        assert_eq!(stride_blocks(257, 256), 2);
        assert_eq!(stride_blocks(usize::MAX, 256), 1 << 20);
    }
}
