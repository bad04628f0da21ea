//! 2-D max/average pooling and global average pooling (`pool.cu`), NCHW or NHWC, FP16 or
//! FP32 (input and output of the same type).

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, numel, ptr, run, stride_blocks};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

/// CUDA's limit on `gridDim.y`.
const MAX_GRID_Y: usize = 65_535;

/// Memory layout of a 4-D activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Average,
}

/// MaxPool / AveragePool over `x` `[n, c, h, w]` (or `[n, h, w, c]`) into `y` with spatial size
/// `out` = `[oh, ow]`, which the caller computes (floor or ceil mode); every window is bounds
/// checked in the kernel, so any `out` is safe. `pads` are ONNX's `[top, left, bottom, right]`.
/// Max ignores NaN and gives -inf for a window entirely in the padding; average divides by the
/// taps inside the image, or with `count_include_pad` by the taps before the end padding's edge.
#[derive(Debug, Clone)]
pub struct Pool2dArgs {
    pub x: DevPtr,
    pub y: DevPtr,
    pub elem: Elem,
    pub layout: Layout,
    pub kind: PoolKind,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub out: [usize; 2],
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub pads: [usize; 4],
    pub count_include_pad: bool,
}

impl Pool2dArgs {
    pub(crate) fn plan(&self) -> Result<(usize, Option<Launch>), CudaError> {
        let t = self.elem.float_index("pool element")?;
        for (what, v) in [("kernel", self.kernel), ("strides", self.strides), ("dilations", self.dilations)] {
            if v.contains(&0) {
                return Err(invalid(format!("pool {what} {v:?} must be >= 1")));
            }
        }
        let [oh, ow] = self.out;
        numel(&[self.n, self.c, self.h, self.w], "pool input")?;
        let total = numel(&[self.n, self.c, oh, ow], "pool output")?;
        let mut args = vec![ptr(self.x, "pool x")?, ptr(self.y, "pool y")?];
        let scalars = [
            ("n", self.n),
            ("c", self.c),
            ("h", self.h),
            ("w", self.w),
            ("oh", oh),
            ("ow", ow),
            ("kernel h", self.kernel[0]),
            ("kernel w", self.kernel[1]),
            ("stride h", self.strides[0]),
            ("stride w", self.strides[1]),
            ("dilation h", self.dilations[0]),
            ("dilation w", self.dilations[1]),
            ("pad top", self.pads[0]),
            ("pad left", self.pads[1]),
            ("pad bottom", self.pads[2]),
            ("pad right", self.pads[3]),
        ];
        for (what, v) in scalars {
            args.push(KArg::I32(int(v, what)?));
        }
        // Tap positions are int in the kernel: the last tap of the last window must fit.
        for (axis, o) in [0, 1].into_iter().zip([oh, ow]) {
            let reach = o
                .saturating_sub(1)
                .checked_mul(self.strides[axis])
                .zip((self.kernel[axis] - 1).checked_mul(self.dilations[axis]))
                .and_then(|(a, b)| a.checked_add(b));
            let size = if axis == 0 { self.h + self.pads[2] } else { self.w + self.pads[3] };
            int(reach.unwrap_or(usize::MAX).max(size), "pool window reach")?;
        }
        args.push(KArg::I32(i32::from(self.kind == PoolKind::Max)));
        args.push(KArg::I32(i32::from(self.count_include_pad && self.kind == PoolKind::Average)));
        args.push(KArg::I32(i32::from(self.layout == Layout::Nhwc)));
        if total == 0 {
            return Ok((t, None));
        }
        Ok((t, Some(Launch { dims: Dims::linear(stride_blocks(total, 256), 256), args })))
    }
}

/// GlobalAveragePool of `x` `[n, c, spatial…]` (or `[n, spatial…, c]`) into `y` `[n, c]`;
/// `spatial` is the product of the spatial dims.
#[derive(Debug, Clone)]
pub struct GlobalPoolArgs {
    pub x: DevPtr,
    pub y: DevPtr,
    pub elem: Elem,
    pub layout: Layout,
    pub n: usize,
    pub c: usize,
    pub spatial: usize,
}

impl GlobalPoolArgs {
    pub(crate) fn plan(&self) -> Result<(usize, Option<Launch>), CudaError> {
        let t = self.elem.float_index("global pool element")?;
        numel(&[self.n, self.c, self.spatial], "global pool input")?;
        if self.n == 0 || self.c == 0 {
            return Ok((t, None));
        }
        if self.spatial == 0 {
            return Err(invalid("global average pool over an empty image"));
        }
        let len = int(self.spatial, "global pool spatial size")?;
        let (x, y) = (ptr(self.x, "global pool x")?, ptr(self.y, "global pool y")?);
        let launch = match self.layout {
            Layout::Nchw => {
                let planes = self.n * self.c;
                Launch {
                    dims: Dims::linear(planes.div_ceil(8).min(1 << 20) as u32, 256),
                    args: vec![x, y, KArg::I64(long(planes, "planes")?), KArg::I32(len)],
                }
            }
            Layout::Nhwc => {
                if self.n > MAX_GRID_Y {
                    return Err(invalid(format!("global pool batch {} exceeds {MAX_GRID_Y}", self.n)));
                }
                let c = int(self.c, "global pool channels")?;
                Launch {
                    dims: Dims { grid: (self.c.div_ceil(32) as u32, self.n as u32, 1), block: (32, 8, 1), shared: 0 },
                    args: vec![x, y, KArg::I32(len), KArg::I32(c)],
                }
            }
        };
        Ok((t, Some(launch)))
    }
}

impl Kernels {
    /// MaxPool / AveragePool ([`Pool2dArgs`]).
    pub fn pool2d(&self, stream: &CudaStream, args: &Pool2dArgs) -> Result<(), CudaError> {
        let (t, plan) = args.plan()?;
        run(stream, &self.pool2d[t], plan)
    }

    /// GlobalAveragePool ([`GlobalPoolArgs`]).
    pub fn global_avg_pool(&self, stream: &CudaStream, args: &GlobalPoolArgs) -> Result<(), CudaError> {
        let (t, plan) = args.plan()?;
        let table = if args.layout == Layout::Nchw { &self.gap_nchw } else { &self.gap_nhwc };
        run(stream, &table[t], plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet_maxpool() -> Pool2dArgs {
        Pool2dArgs {
            x: 0x1000,
            y: 0x2000,
            elem: Elem::F16,
            layout: Layout::Nhwc,
            kind: PoolKind::Max,
            n: 8,
            c: 64,
            h: 112,
            w: 112,
            out: [56, 56],
            kernel: [3, 3],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [1, 1, 1, 1],
            count_include_pad: true,
        }
    }

    #[test]
    fn pool2d_arguments() -> Result<(), CudaError> {
        let (t, l) = resnet_maxpool().plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(t, 1);
        assert_eq!(l.args.len(), 21);
        // Max ignores count_include_pad; NHWC flag last.
        assert!(matches!(l.args[18..], [KArg::I32(1), KArg::I32(0), KArg::I32(1)]));
        assert_eq!(l.dims.grid.0 as usize, (8 * 64 * 56 * 56usize).div_ceil(256));
        assert!(Pool2dArgs { kernel: [0, 3], ..resnet_maxpool() }.plan().is_err());
        assert!(Pool2dArgs { strides: [1, 0], ..resnet_maxpool() }.plan().is_err());
        assert!(Pool2dArgs { elem: Elem::I32, ..resnet_maxpool() }.plan().is_err());
        assert!(Pool2dArgs { h: 1 << 31, ..resnet_maxpool() }.plan().is_err());
        assert!(Pool2dArgs { out: [1 << 30, 1], strides: [4, 1], ..resnet_maxpool() }.plan().is_err());
        assert!(Pool2dArgs { out: [0, 56], ..resnet_maxpool() }.plan()?.1.is_none());
        Ok(())
    }

    #[test]
    fn global_pool_grids() -> Result<(), CudaError> {
        let g =
            GlobalPoolArgs { x: 0x1000, y: 0x2000, elem: Elem::F32, layout: Layout::Nhwc, n: 4, c: 2048, spatial: 49 };
        let l = g.plan()?.1.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((l.dims.grid, l.dims.block), ((64, 4, 1), (32, 8, 1)));
        let l = GlobalPoolArgs { layout: Layout::Nchw, ..g.clone() }.plan()?.1.ok_or_else(|| invalid("launch"))?;
        assert_eq!(l.dims.grid.0, 1024);
        assert!(GlobalPoolArgs { n: 70_000, ..g.clone() }.plan().is_err());
        assert!(GlobalPoolArgs { spatial: 0, ..g.clone() }.plan().is_err());
        assert!(GlobalPoolArgs { c: 0, ..g }.plan()?.1.is_none());
        Ok(())
    }
}
