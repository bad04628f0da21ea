//! Row-wise kernels: softmax (`softmax.cu`), layer normalisation with an optional fused
//! residual add (`layernorm.cu`) and reductions over one axis range (`reduce.cu`). All
//! accumulate in FP32; inputs and outputs are FP16 or FP32 independently (these nodes compute
//! in FP32 between FP16 neighbours).

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, numel, opt_ptr, ptr, run};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

/// Widest row the one-warp-per-row softmax takes.
const WARP_SOFTMAX_COLS: usize = 1024;
/// Rows up to this length are reduced by one warp each, longer ones by a whole block.
const WARP_REDUCE_LEN: usize = 2048;
const MAX_BLOCKS: usize = i32::MAX as usize;

/// Softmax over the last axis of `x` viewed as `[rows, cols]`, into `y` of the same shape.
#[derive(Debug, Clone)]
pub struct SoftmaxArgs {
    pub x: DevPtr,
    pub x_elem: Elem,
    pub y: DevPtr,
    pub y_elem: Elem,
    pub rows: usize,
    pub cols: usize,
}

/// Which softmax kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SoftmaxVariant {
    Warp,
    Block,
}

impl SoftmaxArgs {
    pub(crate) fn plan(&self) -> Result<(SoftmaxVariant, usize, usize, Option<Launch>), CudaError> {
        let (i, o) = (self.x_elem.float_index("softmax input")?, self.y_elem.float_index("softmax output")?);
        numel(&[self.rows, self.cols], "softmax input")?;
        let cols = int(self.cols, "softmax cols")?;
        let variant = if self.cols <= WARP_SOFTMAX_COLS { SoftmaxVariant::Warp } else { SoftmaxVariant::Block };
        if self.rows == 0 || self.cols == 0 {
            return Ok((variant, i, o, None));
        }
        let args = vec![
            ptr(self.x, "softmax x")?,
            ptr(self.y, "softmax y")?,
            KArg::I64(long(self.rows, "rows")?),
            KArg::I32(cols),
        ];
        let dims = match variant {
            SoftmaxVariant::Warp => Dims::linear(self.rows.div_ceil(8).min(MAX_BLOCKS) as u32, 256),
            SoftmaxVariant::Block => {
                let threads = if self.cols >= 16384 {
                    1024
                } else if self.cols >= 4096 {
                    512
                } else {
                    256
                };
                Dims::linear(self.rows.min(MAX_BLOCKS) as u32, threads)
            }
        };
        Ok((variant, i, o, Some(Launch { dims, args })))
    }
}

/// Layer normalisation over the last axis of `x` viewed as `[rows, cols]`:
/// `v = x + residual`, `y = (v − mean) / √(var + eps) · gamma + beta`.
///
/// `residual` and `sum_out` have `x`'s element type; `sum_out` receives `v` (the residual
/// stream) and may alias `x` or `residual`; `y` may alias `x`. `gamma` and `beta` hold `cols`
/// elements of their own element type (F32 or F16).
#[derive(Debug, Clone)]
pub struct LayerNormArgs {
    pub x: DevPtr,
    pub residual: Option<DevPtr>,
    pub sum_out: Option<DevPtr>,
    pub x_elem: Elem,
    pub gamma: DevPtr,
    pub gamma_elem: Elem,
    pub beta: Option<DevPtr>,
    pub beta_elem: Elem,
    pub y: DevPtr,
    pub y_elem: Elem,
    pub rows: usize,
    pub cols: usize,
    pub eps: f32,
}

impl LayerNormArgs {
    pub(crate) fn plan(&self) -> Result<(usize, usize, Option<Launch>), CudaError> {
        let (i, o) = (self.x_elem.float_index("layernorm input")?, self.y_elem.float_index("layernorm output")?);
        self.gamma_elem.float_index("layernorm gamma")?;
        self.beta_elem.float_index("layernorm beta")?;
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(invalid(format!("layernorm epsilon {} must be finite and >= 0", self.eps)));
        }
        numel(&[self.rows, self.cols], "layernorm input")?;
        let cols = int(self.cols, "layernorm cols")?;
        if self.rows == 0 || self.cols == 0 {
            return Ok((i, o, None));
        }
        let args = vec![
            ptr(self.x, "layernorm x")?,
            opt_ptr(self.residual, "layernorm residual")?,
            opt_ptr(self.sum_out, "layernorm sum_out")?,
            ptr(self.gamma, "layernorm gamma")?,
            KArg::I32(self.gamma_elem.code()),
            opt_ptr(self.beta, "layernorm beta")?,
            KArg::I32(self.beta_elem.code()),
            ptr(self.y, "layernorm y")?,
            KArg::I64(long(self.rows, "rows")?),
            KArg::I32(cols),
            KArg::F32(self.eps),
        ];
        // About four elements per thread, one to eight warps.
        let threads = (self.cols.div_ceil(128).clamp(1, 8) * 32) as u32;
        Ok((i, o, Some(Launch { dims: Dims::linear(self.rows.min(MAX_BLOCKS) as u32, threads), args })))
    }
}

/// What a reduction computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceKind {
    Sum,
    Mean,
    /// NaN propagates.
    Max,
    /// NaN propagates.
    Min,
}

impl ReduceKind {
    fn code(self) -> i32 {
        match self {
            Self::Sum => 0,
            Self::Mean => 1,
            Self::Max => 2,
            Self::Min => 3,
        }
    }
}

/// Reduction of `x` viewed as `[outer, len, inner]` over `len` into `y` `[outer, inner]`
/// (ReduceSum/Mean/Max/Min over contiguous axes).
#[derive(Debug, Clone)]
pub struct ReduceArgs {
    pub x: DevPtr,
    pub x_elem: Elem,
    pub y: DevPtr,
    pub y_elem: Elem,
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub kind: ReduceKind,
}

/// Which reduction kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceVariant {
    Rows,
    Cols,
}

impl ReduceArgs {
    pub(crate) fn plan(&self) -> Result<(ReduceVariant, usize, usize, Option<Launch>), CudaError> {
        let (i, o) = (self.x_elem.float_index("reduce input")?, self.y_elem.float_index("reduce output")?);
        numel(&[self.outer, self.len, self.inner], "reduce input")?;
        let variant = if self.inner == 1 { ReduceVariant::Rows } else { ReduceVariant::Cols };
        if self.outer == 0 || self.inner == 0 {
            return Ok((variant, i, o, None));
        }
        if self.len == 0 {
            return Err(invalid("reduction over an empty axis"));
        }
        let mut args = vec![
            ptr(self.x, "reduce x")?,
            ptr(self.y, "reduce y")?,
            KArg::I64(long(self.outer, "outer")?),
            KArg::I64(long(self.len, "len")?),
        ];
        let dims = match variant {
            ReduceVariant::Rows => {
                let group = if self.len > WARP_REDUCE_LEN { 256 } else { 32 };
                args.extend([KArg::I32(self.kind.code()), KArg::I32(group)]);
                let per_block = 256 / group as usize;
                Dims::linear(self.outer.div_ceil(per_block).min(MAX_BLOCKS) as u32, 256)
            }
            ReduceVariant::Cols => {
                args.extend([KArg::I64(long(self.inner, "inner")?), KArg::I32(self.kind.code())]);
                Dims::linear(super::stride_blocks(self.outer * self.inner, 256), 256)
            }
        };
        Ok((variant, i, o, Some(Launch { dims, args })))
    }
}

impl Kernels {
    /// Softmax over the last axis ([`SoftmaxArgs`]).
    pub fn softmax(&self, stream: &CudaStream, args: &SoftmaxArgs) -> Result<(), CudaError> {
        let (variant, i, o, plan) = args.plan()?;
        let table = if variant == SoftmaxVariant::Warp { &self.softmax_warp } else { &self.softmax_block };
        run(stream, &table[i][o], plan)
    }

    /// Layer normalisation with optional residual add ([`LayerNormArgs`]).
    pub fn layernorm(&self, stream: &CudaStream, args: &LayerNormArgs) -> Result<(), CudaError> {
        let (i, o, plan) = args.plan()?;
        run(stream, &self.layernorm[i][o], plan)
    }

    /// Reduction over one axis range ([`ReduceArgs`]).
    pub fn reduce(&self, stream: &CudaStream, args: &ReduceArgs) -> Result<(), CudaError> {
        let (variant, i, o, plan) = args.plan()?;
        let table = if variant == ReduceVariant::Rows { &self.reduce_rows } else { &self.reduce_cols };
        run(stream, &table[i][o], plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(rows: usize, cols: usize) -> SoftmaxArgs {
        SoftmaxArgs { x: 0x1000, x_elem: Elem::F16, y: 0x2000, y_elem: Elem::F32, rows, cols }
    }

    #[test]
    fn softmax_picks_warp_or_block() -> Result<(), CudaError> {
        let (v, i, o, l) = softmax(24, 128).plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((v, i, o, l.dims.grid.0, l.dims.block.0), (SoftmaxVariant::Warp, 1, 0, 3, 256));
        let (v, _, _, l) = softmax(5, 32768).plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((v, l.dims.grid.0, l.dims.block.0), (SoftmaxVariant::Block, 5, 1024));
        assert!(softmax(0, 10).plan()?.3.is_none());
        assert!(softmax(2, 1 << 31).plan().is_err());
        assert!(SoftmaxArgs { x_elem: Elem::I64, ..softmax(1, 1) }.plan().is_err());
        assert!(SoftmaxArgs { y: 0, ..softmax(1, 1) }.plan().is_err());
        Ok(())
    }

    fn layernorm() -> LayerNormArgs {
        LayerNormArgs {
            x: 0x1000,
            residual: Some(0x2000),
            sum_out: None,
            x_elem: Elem::F16,
            gamma: 0x3000,
            gamma_elem: Elem::F16,
            beta: None,
            beta_elem: Elem::F32,
            y: 0x4000,
            y_elem: Elem::F16,
            rows: 256,
            cols: 384,
            eps: 1e-12,
        }
    }

    #[test]
    fn layernorm_validates() -> Result<(), CudaError> {
        let (i, o, l) = layernorm().plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((i, o, l.dims.grid.0, l.dims.block.0, l.args.len()), (1, 1, 256, 96, 11));
        assert!(matches!(l.args[2], KArg::Ptr(0)), "no sum_out");
        assert!(LayerNormArgs { eps: f32::NAN, ..layernorm() }.plan().is_err());
        assert!(LayerNormArgs { eps: -1.0, ..layernorm() }.plan().is_err());
        assert!(LayerNormArgs { gamma_elem: Elem::I32, ..layernorm() }.plan().is_err());
        assert!(LayerNormArgs { gamma: 0, ..layernorm() }.plan().is_err());
        assert!(LayerNormArgs { residual: Some(0), ..layernorm() }.plan().is_err());
        assert!(LayerNormArgs { rows: 0, ..layernorm() }.plan()?.2.is_none());
        assert_eq!(LayerNormArgs { cols: 8192, ..layernorm() }.plan()?.2.map(|l| l.dims.block.0), Some(256));
        Ok(())
    }

    #[test]
    fn reduce_variants_and_errors() -> Result<(), CudaError> {
        let r = ReduceArgs {
            x: 0x1000,
            x_elem: Elem::F32,
            y: 0x2000,
            y_elem: Elem::F32,
            outer: 100,
            len: 384,
            inner: 1,
            kind: ReduceKind::Mean,
        };
        let (v, _, _, l) = r.plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((v, l.dims.grid.0), (ReduceVariant::Rows, 13));
        assert!(matches!(l.args[4..], [KArg::I32(1), KArg::I32(32)]));
        let long_rows = ReduceArgs { len: 100_000, ..r.clone() }.plan()?.3.ok_or_else(|| invalid("launch"))?;
        assert!(matches!(long_rows.args[5], KArg::I32(256)));
        assert_eq!(long_rows.dims.grid.0, 100);
        let (v, _, _, l) = ReduceArgs { inner: 7, kind: ReduceKind::Max, ..r.clone() }.plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(v, ReduceVariant::Cols);
        assert!(matches!(l.args[4..], [KArg::I64(7), KArg::I32(2)]));
        assert!(ReduceArgs { len: 0, ..r.clone() }.plan().is_err());
        assert!(ReduceArgs { outer: 0, len: 0, ..r.clone() }.plan()?.3.is_none());
        assert!(ReduceArgs { y_elem: Elem::U8, ..r }.plan().is_err());
        Ok(())
    }
}
