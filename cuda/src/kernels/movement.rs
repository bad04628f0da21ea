//! Data movement: dtype casts (`cast.cu`), the strided copy behind Transpose, Slice, Expand and
//! Concat (`copy.cu`), and row gathers for embeddings (`gather.cu`).

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, int, invalid, long, numel, opt_ptr, ptr, run, stride_blocks};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

const THREADS: u32 = 256;
/// Axes `copy.cu` walks.
const COPY_RANK: usize = 6;

/// `n` elements of `src_elem` at `src` converted into `dst_elem` at `dst`, with the engine's
/// Cast semantics (float → int truncates and saturates, int → narrower int wraps). With
/// `boolean` the destination must be [`Elem::U8`] and receives `x != 0` (ONNX BOOL).
#[derive(Debug, Clone)]
pub struct CastArgs {
    pub src: DevPtr,
    pub src_elem: Elem,
    pub dst: DevPtr,
    pub dst_elem: Elem,
    pub n: usize,
    pub boolean: bool,
}

impl CastArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        if self.boolean && self.dst_elem != Elem::U8 {
            return Err(invalid(format!("a boolean cast writes U8, not {:?}", self.dst_elem)));
        }
        // INT8 tensors only pass through the quantisation kernels.
        if self.src_elem == Elem::I8 || self.dst_elem == Elem::I8 {
            return Err(invalid("cast of INT8 elements"));
        }
        if self.n == 0 {
            return Ok(None);
        }
        let args = vec![
            ptr(self.src, "cast src")?,
            KArg::I32(self.src_elem.code()),
            ptr(self.dst, "cast dst")?,
            KArg::I32(self.dst_elem.code()),
            KArg::I64(long(self.n, "cast n")?),
            KArg::I32(i32::from(self.boolean)),
        ];
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(self.n, THREADS), THREADS), args }))
    }
}

/// A strided copy over an output `shape` of rank ≤ 6 (after merging axes):
/// `dst[Σ iₐ·dst_strides[a]] = src[Σ iₐ·src_strides[a]]`, strides in elements of
/// `elem_size` (1, 2, 4 or 8) bytes.
///
/// - Transpose: `src_strides` = the input's row-major strides permuted, dst contiguous.
/// - Slice: `src` points at the first element taken, `src_strides` = input strides × steps
///   (negative steps give negative strides).
/// - Expand: stride 0 on broadcast axes.
/// - Concat: one copy per input, `dst` offset to where the input starts in the output and
///   `dst_strides` the output's row-major strides.
#[derive(Debug, Clone)]
pub struct CopyArgs {
    pub dst: DevPtr,
    pub src: DevPtr,
    pub elem_size: usize,
    pub shape: Vec<usize>,
    pub src_strides: Vec<i64>,
    pub dst_strides: Vec<i64>,
}

/// Row-major (C order) element strides of `shape`.
pub fn row_major_strides(shape: &[usize]) -> Vec<i64> {
    let mut strides = vec![0i64; shape.len()];
    let mut s = 1i64;
    for (st, &d) in strides.iter_mut().zip(shape).rev() {
        *st = s;
        s = s.saturating_mul(i64::try_from(d).unwrap_or(i64::MAX));
    }
    strides
}

impl CopyArgs {
    /// A copy into a contiguous destination of `shape`.
    pub fn contiguous(dst: DevPtr, src: DevPtr, elem_size: usize, shape: &[usize], src_strides: &[i64]) -> Self {
        Self {
            dst,
            src,
            elem_size,
            shape: shape.to_vec(),
            src_strides: src_strides.to_vec(),
            dst_strides: row_major_strides(shape),
        }
    }

    /// Axes after dropping size-1 axes and merging neighbours that are contiguous in both
    /// tensors: `(len, src stride, dst stride)`, outermost first.
    fn merged_axes(&self) -> Vec<(usize, i64, i64)> {
        let mut axes: Vec<(usize, i64, i64)> = Vec::with_capacity(self.shape.len());
        for ((&n, &s), &d) in self.shape.iter().zip(&self.src_strides).zip(&self.dst_strides) {
            if n == 1 {
                continue;
            }
            match axes.last_mut() {
                Some(last)
                    if n as i64 > 0 && last.1 == s.wrapping_mul(n as i64) && last.2 == d.wrapping_mul(n as i64) =>
                {
                    *last = (last.0 * n, s, d);
                }
                _ => axes.push((n, s, d)),
            }
        }
        axes
    }

    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        if ![1, 2, 4, 8].contains(&self.elem_size) {
            return Err(invalid(format!("copy element size {} (expected 1, 2, 4 or 8)", self.elem_size)));
        }
        let rank = self.shape.len();
        if self.src_strides.len() != rank || self.dst_strides.len() != rank {
            return Err(invalid(format!(
                "copy of shape {:?} has {} source and {} destination strides",
                self.shape,
                self.src_strides.len(),
                self.dst_strides.len()
            )));
        }
        let n = numel(&self.shape, "copy shape")?;
        if n == 0 {
            return Ok(None);
        }
        let mut axes = self.merged_axes();
        if axes.len() > COPY_RANK {
            return Err(invalid(format!("copy of rank {} after merging axes (at most {COPY_RANK})", axes.len())));
        }
        for (which, pick) in [("source", 1), ("destination", 2)] {
            let span = axes.iter().try_fold(0i128, |acc, a| {
                let s = if pick == 1 { a.1 } else { a.2 };
                acc.checked_add((a.0 as i128 - 1) * i128::from(s).abs())
            });
            if span.is_none_or(|s| s > i128::from(i64::MAX)) {
                return Err(invalid(format!("copy {which} offsets exceed 64 bits")));
            }
        }
        let unit = widen(&mut axes, self.elem_size, self.src, self.dst);
        let total: usize = axes.iter().map(|a| a.0).product();
        let mut args = vec![
            ptr(self.dst, "copy dst")?,
            ptr(self.src, "copy src")?,
            KArg::I32(unit as i32),
            KArg::I32(axes.len() as i32),
            KArg::I64(long(total, "copy n")?),
        ];
        let pad = COPY_RANK - axes.len();
        let field = |pick: usize, fill: i64| -> Vec<KArg> {
            let vals = axes.iter().map(|a| match pick {
                0 => a.0 as i64,
                1 => a.1,
                _ => a.2,
            });
            std::iter::repeat_n(fill, pad).chain(vals).map(KArg::I64).collect()
        };
        args.extend(field(0, 1));
        args.extend(field(1, 0));
        args.extend(field(2, 0));
        Ok(Some(Launch { dims: Dims::linear(stride_blocks(total, THREADS), THREADS), args }))
    }
}

/// Moves a copy whose innermost axis is contiguous on both sides in wider units (up to 16
/// bytes) when the run length, the other strides and both pointers allow; returns the unit size
/// in bytes and rewrites `axes` in units.
fn widen(axes: &mut [(usize, i64, i64)], elem: usize, src: DevPtr, dst: DevPtr) -> usize {
    let Some(&(inner, 1, 1)) = axes.last() else { return elem };
    let mut unit = 16;
    while unit > elem {
        let k = unit / elem;
        let fits = inner.is_multiple_of(k)
            && src.is_multiple_of(unit as u64)
            && dst.is_multiple_of(unit as u64)
            && axes[..axes.len() - 1].iter().all(|a| a.1 % k as i64 == 0 && a.2 % k as i64 == 0);
        if fits {
            let last = axes.len() - 1;
            axes[last].0 = inner / k;
            for a in &mut axes[..last] {
                a.1 /= k as i64;
                a.2 /= k as i64;
            }
            return unit;
        }
        unit /= 2;
    }
    elem
}

/// Embedding lookup: `out[i, :] = table[idx[i], :]` for `n_idx` indices of `idx_elem` (I64 or
/// I32) into a table of `rows` rows of `row_len` elements of `elem`. Negative indices count
/// from the end; an index outside `[-rows, rows)` gives a zero row and, when `err` is given,
/// stores 1 into that device `i32` (zero it before, read it after the stream synchronises).
#[derive(Debug, Clone)]
pub struct GatherArgs {
    pub out: DevPtr,
    pub table: DevPtr,
    pub idx: DevPtr,
    pub idx_elem: Elem,
    pub elem: Elem,
    pub n_idx: usize,
    pub rows: usize,
    pub row_len: usize,
    pub err: Option<DevPtr>,
}

impl GatherArgs {
    pub(crate) fn plan(&self) -> Result<Option<Launch>, CudaError> {
        let idx_i64 = match self.idx_elem {
            Elem::I64 => 1,
            Elem::I32 => 0,
            other => return Err(invalid(format!("gather indices must be I64 or I32, got {other:?}"))),
        };
        let row_bytes = self
            .row_len
            .checked_mul(self.elem.size())
            .ok_or_else(|| invalid(format!("gather row of {} elements is too large", self.row_len)))?;
        numel(&[self.n_idx, self.row_len], "gather output")?;
        numel(&[self.rows, self.row_len], "gather table")?;
        if self.n_idx == 0 || self.row_len == 0 {
            return Ok(None);
        }
        let unit = [16usize, 8, 4, 2, 1]
            .into_iter()
            .find(|&u| {
                row_bytes.is_multiple_of(u) && self.out.is_multiple_of(u as u64) && self.table.is_multiple_of(u as u64)
            })
            .unwrap_or(1);
        let row_units = row_bytes / unit;
        let threads = (row_units.div_ceil(32) * 32).clamp(32, 256) as u32;
        let blocks = self.n_idx.min(i32::MAX as usize) as u32;
        // A table with no rows is never read (every index is out of range).
        let table = if self.rows == 0 { KArg::Ptr(self.table) } else { ptr(self.table, "gather table")? };
        let args = vec![
            ptr(self.out, "gather out")?,
            table,
            ptr(self.idx, "gather indices")?,
            KArg::I32(idx_i64),
            KArg::I32(int(unit, "gather unit")?),
            KArg::I64(long(self.n_idx, "gather n_idx")?),
            KArg::I64(long(self.rows, "gather rows")?),
            KArg::I64(long(row_units, "gather row units")?),
            opt_ptr(self.err, "gather error flag")?,
        ];
        Ok(Some(Launch { dims: Dims::linear(blocks, threads), args }))
    }
}

impl Kernels {
    /// Element type conversion ([`CastArgs`]).
    pub fn cast(&self, stream: &CudaStream, args: &CastArgs) -> Result<(), CudaError> {
        run(stream, &self.cast, args.plan()?)
    }

    /// Strided copy ([`CopyArgs`]).
    pub fn copy_strided(&self, stream: &CudaStream, args: &CopyArgs) -> Result<(), CudaError> {
        run(stream, &self.copy, args.plan()?)
    }

    /// Row gather ([`GatherArgs`]).
    pub fn gather(&self, stream: &CudaStream, args: &GatherArgs) -> Result<(), CudaError> {
        run(stream, &self.gather, args.plan()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(l: &Launch) -> Vec<i64> {
        l.args
            .iter()
            .map(|a| match *a {
                KArg::Ptr(p) => p as i64,
                KArg::I32(v) => i64::from(v),
                KArg::I64(v) => v,
                KArg::F32(v) => v as i64,
            })
            .collect()
    }

    #[test]
    fn cast_validates_and_skips_empty() -> Result<(), CudaError> {
        let mut a = CastArgs { src: 256, src_elem: Elem::F32, dst: 512, dst_elem: Elem::F16, n: 1000, boolean: false };
        let l = a.plan()?.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(ints(&l), vec![256, 0, 512, 1, 1000, 0]);
        assert_eq!(l.dims.grid.0, 4);
        a.boolean = true;
        assert!(a.plan().is_err(), "boolean casts write U8");
        a.dst_elem = Elem::U8;
        assert!(a.plan()?.is_some());
        a.n = 0;
        assert!(a.plan()?.is_none());
        a.n = 5;
        a.src = 0;
        assert!(a.plan().is_err());
        Ok(())
    }

    #[test]
    fn transpose_merges_axes_and_pads_to_six() -> Result<(), CudaError> {
        // [2, 3, 4, 5] → perm (0, 2, 1, 3): [2, 4, 3, 5]; the batch axis and the inner 5 stay apart.
        let src = row_major_strides(&[2, 3, 4, 5]);
        let a = CopyArgs::contiguous(0x1000, 0x2000, 4, &[2, 4, 3, 5], &[src[0], src[2], src[1], src[3]]);
        let l = a.plan()?.ok_or_else(|| invalid("expected a launch"))?;
        let v = ints(&l);
        assert_eq!(&v[2..5], &[4, 4, 120]);
        assert_eq!(&v[5..11], &[1, 1, 2, 4, 3, 5]);
        assert_eq!(&v[11..17], &[0, 0, 60, 5, 20, 1]);
        assert_eq!(&v[17..23], &[0, 0, 60, 15, 5, 1]);
        Ok(())
    }

    #[test]
    fn contiguous_copies_collapse_and_widen() -> Result<(), CudaError> {
        let shape = [3, 8, 16];
        let a = CopyArgs::contiguous(0x1000, 0x2000, 2, &shape, &row_major_strides(&shape));
        let v = ints(&a.plan()?.ok_or_else(|| invalid("expected a launch"))?);
        // 384 halves = 48 16-byte units on one axis.
        assert_eq!(&v[2..5], &[16, 1, 48]);
        assert_eq!(v[10], 48);
        // A misaligned pointer keeps 2-byte units.
        let b = CopyArgs { src: 0x2002, ..a.clone() };
        assert_eq!(ints(&b.plan()?.ok_or_else(|| invalid("expected a launch"))?)[2], 2);
        // Concat into the second half of the channel axis of [3, 16, 16]: dst rows of 256, runs of 128.
        let c = CopyArgs { dst_strides: vec![256, 16, 1], ..a };
        let v = ints(&c.plan()?.ok_or_else(|| invalid("expected a launch"))?);
        assert_eq!(&v[2..5], &[16, 2, 48]);
        assert_eq!(&v[9..11], &[3, 16]);
        assert_eq!(&v[21..23], &[32, 1]);
        Ok(())
    }

    #[test]
    fn copy_rejects_bad_arguments() {
        let ok = CopyArgs::contiguous(0x1000, 0x2000, 4, &[2, 3], &[3, 1]);
        assert!(CopyArgs { elem_size: 3, ..ok.clone() }.plan().is_err());
        assert!(CopyArgs { src_strides: vec![1], ..ok.clone() }.plan().is_err());
        assert!(CopyArgs { dst: 0, ..ok.clone() }.plan().is_err());
        let seven = vec![2usize; 7];
        let spread: Vec<i64> = (0..7).map(|i| 1 << (3 * i)).collect();
        assert!(CopyArgs::contiguous(1 << 12, 1 << 13, 4, &seven, &spread).plan().is_err(), "rank 7");
        // Rank 7 that merges down to 1 is fine.
        assert!(CopyArgs::contiguous(1 << 12, 1 << 13, 4, &seven, &row_major_strides(&seven)).plan().is_ok());
        let huge = CopyArgs { shape: vec![1 << 20, 1 << 20], src_strides: vec![i64::MAX / 4, 1], ..ok.clone() };
        assert!(huge.plan().is_err(), "offsets overflow");
        assert!(matches!(CopyArgs { shape: vec![2, 0], ..ok }.plan(), Ok(None)));
    }

    #[test]
    fn negative_slice_strides_and_broadcast() -> Result<(), CudaError> {
        // x[::-1] of 10 floats: src points at the last element, stride -1; no widening.
        let a = CopyArgs::contiguous(0x1000, 0x2000 + 36, 4, &[10], &[-1]);
        let v = ints(&a.plan()?.ok_or_else(|| invalid("expected a launch"))?);
        assert_eq!(&v[2..5], &[4, 1, 10]);
        assert_eq!(v[16], -1);
        // Expand [1, 4] → [3, 4]: stride 0 on the broadcast axis, inner run widened to 16 bytes.
        let b = CopyArgs::contiguous(0x1000, 0x2000, 4, &[3, 4], &[0, 1]);
        let v = ints(&b.plan()?.ok_or_else(|| invalid("expected a launch"))?);
        assert_eq!(&v[2..5], &[16, 2, 3]);
        assert_eq!(&v[9..11], &[3, 1]);
        assert_eq!(&v[15..17], &[0, 1]);
        Ok(())
    }

    #[test]
    fn gather_picks_units_and_validates() -> Result<(), CudaError> {
        let a = GatherArgs {
            out: 0x1000,
            table: 0x2000,
            idx: 0x3000,
            idx_elem: Elem::I64,
            elem: Elem::F16,
            n_idx: 256,
            rows: 30522,
            row_len: 384,
            err: Some(0x4000),
        };
        let l = a.plan()?.ok_or_else(|| invalid("expected a launch"))?;
        assert_eq!(ints(&l), vec![0x1000, 0x2000, 0x3000, 1, 16, 256, 30522, 48, 0x4000]);
        assert_eq!((l.dims.grid.0, l.dims.block.0), (256, 64));
        let odd = GatherArgs { row_len: 3, idx_elem: Elem::I32, err: None, ..a.clone() };
        let v = ints(&odd.plan()?.ok_or_else(|| invalid("expected a launch"))?);
        assert_eq!((v[3], v[4], v[7], v[8]), (0, 2, 3, 0));
        assert!(GatherArgs { idx_elem: Elem::F32, ..a.clone() }.plan().is_err());
        assert!(GatherArgs { idx: 0, ..a.clone() }.plan().is_err());
        assert!(GatherArgs { n_idx: 0, ..a.clone() }.plan()?.is_none());
        assert!(GatherArgs { rows: 0, table: 0, ..a }.plan()?.is_some(), "all indices out of range");
        Ok(())
    }
}
