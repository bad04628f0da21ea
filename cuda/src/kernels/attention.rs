//! Fused scaled-dot-product attention (`attention.cu`), the CUDA form of `kiln.Attention`.

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, numel, ptr, run};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

/// Largest head size (`D` and `Dv`): one output column per lane in at most 4 chunks of 32.
pub const MAX_HEAD_DIM: usize = 128;
/// Queries per block (4 warps × 4 queries) and keys per shared-memory tile (`attention.cu`).
const QUERIES_PER_BLOCK: usize = 16;
const KEY_TILE: usize = 32;
const THREADS: u32 = 128;
/// CUDA's limit on `gridDim.y` and `gridDim.z` (heads and batch).
const MAX_GRID_YZ: usize = 65_535;
/// Dynamic shared memory a launch may use without raising the function's limit.
const DEFAULT_SHARED: usize = 48 * 1024;

/// An additive attention mask, broadcast to `[B, H, S, Sk]` through element strides
/// (`[b, h, s, sk]`, 0 on broadcast axes): e.g. a `[B, 1, 1, Sk]` padding mask has strides
/// `[Sk, 0, 0, 1]`.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub ptr: DevPtr,
    pub elem: Elem,
    pub strides: [i64; 4],
}

/// `y = softmax(q · kt · scale + mask) · v` per (batch, head):
/// `q` `[B, H, S, D]`, `kt` `[B, H, D, Sk]`, `v` `[B, H, Sk, Dv]`, `y` `[B, H, S, Dv]`, all
/// contiguous and of `elem` (F32 or F16). With `zero_masked_rows` a query whose scores are all
/// -inf gets zeros (the fused NaN guard); otherwise NaN, as the reference Softmax gives.
#[derive(Debug, Clone)]
pub struct AttentionArgs {
    pub q: DevPtr,
    pub kt: DevPtr,
    pub v: DevPtr,
    pub mask: Option<AttentionMask>,
    pub y: DevPtr,
    pub elem: Elem,
    pub batch: usize,
    pub heads: usize,
    pub s: usize,
    pub sk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    pub zero_masked_rows: bool,
}

impl AttentionArgs {
    /// Dynamic shared memory of one block: Q tile, KT tile, V tile and probabilities, as float.
    pub fn shared_bytes(d: usize, dv: usize) -> usize {
        4 * (QUERIES_PER_BLOCK * d + KEY_TILE * d + KEY_TILE * dv + QUERIES_PER_BLOCK * KEY_TILE)
    }

    pub(crate) fn plan(&self) -> Result<(usize, usize, Option<Launch>), CudaError> {
        let t = self.elem.float_index("attention Q/K/V")?;
        let m = match &self.mask {
            Some(mask) => mask.elem.float_index("attention mask")?,
            None => 0,
        };
        if !self.scale.is_finite() {
            return Err(invalid(format!("attention scale {} is not finite", self.scale)));
        }
        if self.d > MAX_HEAD_DIM || self.dv > MAX_HEAD_DIM {
            return Err(invalid(format!(
                "attention head sizes D = {}, Dv = {} (at most {MAX_HEAD_DIM})",
                self.d, self.dv
            )));
        }
        if self.heads > MAX_GRID_YZ || self.batch > MAX_GRID_YZ {
            return Err(invalid(format!(
                "attention batch {} x heads {} (each at most {MAX_GRID_YZ})",
                self.batch, self.heads
            )));
        }
        let (b, h) = (self.batch, self.heads);
        numel(&[b, h, self.s, self.d], "attention Q")?;
        numel(&[b, h, self.d, self.sk], "attention KT")?;
        numel(&[b, h, self.sk, self.dv], "attention V")?;
        numel(&[b, h, self.s, self.dv], "attention output")?;
        let s = int(self.s, "attention S")?;
        let sk = int(self.sk, "attention Sk")?;
        if b == 0 || h == 0 || self.s == 0 || self.dv == 0 {
            return Ok((t, m, None));
        }
        if self.sk == 0 || self.d == 0 {
            return Err(invalid(format!("attention with Sk = {} and D = {}", self.sk, self.d)));
        }
        let (mask_ptr, strides) = match &self.mask {
            Some(mask) => {
                if mask.strides.iter().any(|&st| st < 0) {
                    return Err(invalid(format!("attention mask strides {:?} must be >= 0", mask.strides)));
                }
                let dims = [b, h, self.s, self.sk];
                let span = dims.iter().zip(mask.strides).try_fold(0i64, |acc, (&n, st)| {
                    i64::try_from(n - 1).ok().and_then(|n| n.checked_mul(st)).and_then(|x| acc.checked_add(x))
                });
                if span.is_none() {
                    return Err(invalid("attention mask offsets exceed 64 bits"));
                }
                (ptr(mask.ptr, "attention mask")?, mask.strides)
            }
            None => (KArg::Ptr(0), [0; 4]),
        };
        let shared = Self::shared_bytes(self.d, self.dv);
        if shared > DEFAULT_SHARED {
            return Err(invalid(format!("attention needs {shared} bytes of shared memory")));
        }
        let mut args = vec![
            ptr(self.q, "attention Q")?,
            ptr(self.kt, "attention KT")?,
            ptr(self.v, "attention V")?,
            mask_ptr,
            ptr(self.y, "attention output")?,
            KArg::I32(int(h, "heads")?),
            KArg::I32(s),
            KArg::I32(sk),
            KArg::I32(self.d as i32),
            KArg::I32(self.dv as i32),
        ];
        args.extend(strides.map(KArg::I64));
        args.push(KArg::F32(self.scale));
        args.push(KArg::I32(i32::from(self.zero_masked_rows)));
        long(self.s.div_ceil(QUERIES_PER_BLOCK), "query tiles")?;
        let dims = Dims {
            grid: (self.s.div_ceil(QUERIES_PER_BLOCK) as u32, h as u32, b as u32),
            block: (THREADS, 1, 1),
            shared: shared as u32,
        };
        Ok((t, m, Some(Launch { dims, args })))
    }
}

impl Kernels {
    /// Fused attention ([`AttentionArgs`]).
    pub fn attention(&self, stream: &CudaStream, args: &AttentionArgs) -> Result<(), CudaError> {
        let (t, m, plan) = args.plan()?;
        run(stream, &self.attention[t][m], plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert() -> AttentionArgs {
        AttentionArgs {
            q: 0x1000,
            kt: 0x2000,
            v: 0x3000,
            mask: Some(AttentionMask { ptr: 0x4000, elem: Elem::F32, strides: [128, 0, 0, 1] }),
            y: 0x5000,
            elem: Elem::F16,
            batch: 2,
            heads: 12,
            s: 128,
            sk: 128,
            d: 64,
            dv: 64,
            scale: 0.125,
            zero_masked_rows: true,
        }
    }

    #[test]
    fn attention_grid_and_shared_memory() -> Result<(), CudaError> {
        let (t, m, l) = bert().plan()?;
        let l = l.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!((t, m), (1, 0));
        assert_eq!(l.dims.grid, (8, 12, 2));
        assert_eq!(l.dims.block, (128, 1, 1));
        assert_eq!(l.dims.shared as usize, 4 * (16 * 64 + 32 * 64 + 32 * 64 + 512));
        assert_eq!(l.args.len(), 16);
        assert!(AttentionArgs::shared_bytes(128, 128) <= DEFAULT_SHARED);
        Ok(())
    }

    #[test]
    fn attention_rejects_out_of_range() -> Result<(), CudaError> {
        assert!(AttentionArgs { d: 129, ..bert() }.plan().is_err());
        assert!(AttentionArgs { dv: 256, ..bert() }.plan().is_err());
        assert!(AttentionArgs { sk: 0, ..bert() }.plan().is_err());
        assert!(AttentionArgs { d: 0, ..bert() }.plan().is_err());
        assert!(AttentionArgs { heads: 70_000, ..bert() }.plan().is_err());
        assert!(AttentionArgs { elem: Elem::I32, ..bert() }.plan().is_err());
        assert!(AttentionArgs { scale: f32::INFINITY, ..bert() }.plan().is_err());
        assert!(AttentionArgs { s: 1 << 31, ..bert() }.plan().is_err());
        let neg = AttentionMask { ptr: 0x4000, elem: Elem::F16, strides: [-1, 0, 0, 1] };
        assert!(AttentionArgs { mask: Some(neg), ..bert() }.plan().is_err());
        let bad = AttentionMask { ptr: 0x4000, elem: Elem::I64, strides: [128, 0, 0, 1] };
        assert!(AttentionArgs { mask: Some(bad), ..bert() }.plan().is_err());
        let f16_mask = AttentionMask { ptr: 0x4000, elem: Elem::F16, strides: [128, 0, 0, 1] };
        assert_eq!(AttentionArgs { mask: Some(f16_mask), elem: Elem::F32, ..bert() }.plan()?.0, 0);
        assert!(AttentionArgs { s: 0, ..bert() }.plan()?.2.is_none());
        assert!(AttentionArgs { mask: None, ..bert() }.plan()?.2.is_some());
        Ok(())
    }
}
