//! The GEMM every heavy op funnels into (ndarray → matrixmultiply, which is
//! built optimised even when this crate is not), numpy-style batched matmul,
//! and the im2col lowering Conv and kiln.FusedConv share.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use rayon::prelude::*;

use super::window::Axis;
use crate::ops::util::{broadcast_dims, broadcast_strides};

/// A read-only strided matrix inside a slice (element (i, j) at `i·rs + j·cs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    pub(crate) fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// A writable strided matrix inside a slice.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatMut<'a> {
    pub(crate) fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }
}

/// C ← α·A·B + β·C.
pub(crate) fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) -> Result<(), String> {
    if a.cols != b.rows || a.rows != c.rows || b.cols != c.cols {
        return Err(format!(
            "matrix product of {}x{} and {}x{} into {}x{}",
            a.rows, a.cols, b.rows, b.cols, c.rows, c.cols
        ));
    }
    let err = |e: ndarray::ShapeError| format!("matrix view out of bounds: {e}");
    let av = ArrayView2::from_shape((a.rows, a.cols).strides((a.rs, a.cs)), a.data).map_err(err)?;
    let bv = ArrayView2::from_shape((b.rows, b.cols).strides((b.rs, b.cs)), b.data).map_err(err)?;
    let mut cv = ArrayViewMut2::from_shape((c.rows, c.cols).strides((c.rs, c.cs)), c.data).map_err(err)?;
    general_mat_mul(alpha, &av, &bv, beta, &mut cv);
    Ok(())
}

/// numpy `matmul` of row-major `a` (shape `sa`) and `b` (shape `sb`): 1-D
/// operands are promoted and the promoted axis removed, batch axes broadcast.
pub(crate) fn matmul(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize]) -> Result<(Vec<usize>, Vec<f32>), String> {
    let (a2, b2) = (promote(sa, true)?, promote(sb, false)?);
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("matmul of {sa:?} and {sb:?}: inner dimensions {k} and {k2} differ"));
    }
    let (ba, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let batch = broadcast_dims(ba, bb)?;
    let mut shape = batch.clone();
    if sa.len() > 1 {
        shape.push(m);
    }
    if sb.len() > 1 {
        shape.push(n);
    }
    let too_large = || format!("matmul of {sa:?} and {sb:?} is too large");
    let nbatch = batch.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(too_large)?;
    let total = nbatch.checked_mul(m).and_then(|x| x.checked_mul(n)).ok_or_else(too_large)?;
    let mut out = vec![0.0f32; total];
    if out.is_empty() {
        return Ok((shape, out));
    }
    if bb.iter().product::<usize>() == 1 {
        // One right-hand matrix: the batch folds into the rows of one GEMM.
        gemm(
            1.0,
            MatRef::row_major(a, nbatch * m, k),
            MatRef::row_major(b, k, n),
            0.0,
            MatMut::row_major(&mut out, nbatch * m, n),
        )?;
        return Ok((shape, out));
    }
    let (sa_b, sb_b) = (broadcast_strides(ba, &batch), broadcast_strides(bb, &batch));
    let offsets: Vec<(usize, usize)> = (0..nbatch)
        .map(|i| {
            let (mut rem, mut oa, mut ob) = (i, 0, 0);
            for d in (0..batch.len()).rev() {
                let idx = rem % batch[d];
                rem /= batch[d];
                oa += idx * sa_b[d];
                ob += idx * sb_b[d];
            }
            (oa * m * k, ob * k * n)
        })
        .collect();
    out.par_chunks_mut(m * n).zip(offsets).try_for_each(|(c, (oa, ob))| {
        let am = MatRef::row_major(&a[oa..oa + m * k], m, k);
        let bm = MatRef::row_major(&b[ob..ob + k * n], k, n);
        gemm(1.0, am, bm, 0.0, MatMut::row_major(c, m, n))
    })?;
    Ok((shape, out))
}

/// Shape of a matmul operand as a (batched) matrix: `[K]` → `[1, K]` on the
/// left, `[K, 1]` on the right.
fn promote(s: &[usize], left: bool) -> Result<Vec<usize>, String> {
    match s.len() {
        0 => Err("matmul operands must have rank >= 1".into()),
        1 if left => Ok(vec![1, s[0]]),
        1 => Ok(vec![s[0], 1]),
        _ => Ok(s.to_vec()),
    }
}

/// Range of output positions `o` whose input position `o·s + off` lies in `0..len`.
fn valid_range(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    let end = len as isize - off;
    let hi = if end <= 0 { 0 } else { (end + s - 1) / s };
    let lo = (lo as usize).min(out);
    (lo, (hi as usize).clamp(lo, out))
}

/// im2col of one image's `cg` channels in NCHW (`x` starts at the first one):
/// `col` is `[cg·kh·kw, oh·ow]`, rows ordered (channel, ky, kx) like OIHW weights.
pub(crate) fn im2col_nchw(x: &[f32], cg: usize, h: usize, w: usize, ay: &Axis, ax: &Axis, col: &mut [f32]) {
    let (oh, ow) = (ay.out, ax.out);
    let p = oh * ow;
    let mut row = 0;
    for c in 0..cg {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ki in 0..ay.k {
            let (ylo, yhi) = valid_range((ki * ay.d) as isize - ay.pb as isize, ay.s, h, oh);
            for kj in 0..ax.k {
                let off = (kj * ax.d) as isize - ax.pb as isize;
                let (lo, hi) = valid_range(off, ax.s, w, ow);
                let dst = &mut col[row * p..(row + 1) * p];
                row += 1;
                dst[..ylo * ow].fill(0.0);
                dst[yhi * ow..].fill(0.0);
                for oy in ylo..yhi {
                    let iy = oy * ay.s + ki * ay.d - ay.pb;
                    let src = &plane[iy * w..(iy + 1) * w];
                    let out = &mut dst[oy * ow..(oy + 1) * ow];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let first = (lo * ax.s) as isize + off;
                    let first = first as usize;
                    if ax.s == 1 {
                        out[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else {
                        let mut ix = first;
                        let mut o = lo;
                        while o < hi {
                            out[o] = src[ix];
                            ix += ax.s;
                            o += 1;
                        }
                    }
                }
            }
        }
    }
}

/// im2col of one NHWC image `[h, w, c]` for channels `c0..c0 + cg`: `col` is
/// `[oh·ow, kh·kw·cg]`, columns ordered (ky, kx, channel) like OHWI weights.
#[allow(clippy::too_many_arguments)] // the geometry is what it is; a struct would only rename it
pub(crate) fn im2col_nhwc(
    x: &[f32],
    c: usize,
    c0: usize,
    cg: usize,
    h: usize,
    w: usize,
    ay: &Axis,
    ax: &Axis,
    col: &mut [f32],
) {
    let kk = ay.k * ax.k * cg;
    for oy in 0..ay.out {
        for ox in 0..ax.out {
            let dst = &mut col[(oy * ax.out + ox) * kk..(oy * ax.out + ox + 1) * kk];
            for ki in 0..ay.k {
                let iy = (oy * ay.s + ki * ay.d) as isize - ay.pb as isize;
                for kj in 0..ax.k {
                    let ix = (ox * ax.s + kj * ax.d) as isize - ax.pb as isize;
                    let at = (ki * ax.k + kj) * cg;
                    let seg = &mut dst[at..at + cg];
                    if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                        seg.fill(0.0);
                    } else {
                        let src = (iy as usize * w + ix as usize) * c + c0;
                        if cg == 1 {
                            seg[0] = x[src];
                        } else {
                            seg.copy_from_slice(&x[src..src + cg]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (64-bit LCG, high bits).
    pub(crate) struct Lcg(pub u64);

    impl Lcg {
        pub(crate) fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "lengths differ");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: got {g}, want {w}");
        }
    }

    /// Naive batched matmul for rank-3 operands with broadcastable batch.
    fn naive(a: &[f32], sa: [usize; 3], b: &[f32], sb: [usize; 3]) -> Vec<f32> {
        let nb = sa[0].max(sb[0]);
        let (m, k, n) = (sa[1], sa[2], sb[2]);
        let mut out = vec![0.0; nb * m * n];
        for bi in 0..nb {
            let (ia, ib) = (if sa[0] == 1 { 0 } else { bi }, if sb[0] == 1 { 0 } else { bi });
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for p in 0..k {
                        s += a[ia * m * k + i * k + p] * b[ib * k * n + p * n + j];
                    }
                    out[bi * m * n + i * n + j] = s;
                }
            }
        }
        out
    }

    #[test]
    fn matmul_broadcasts_batches_and_promotes_vectors() -> Result<(), String> {
        let mut r = Lcg(1);
        for (sa, sb) in [([3, 4, 5], [3, 5, 2]), ([1, 4, 5], [3, 5, 2]), ([3, 4, 5], [1, 5, 2]), ([2, 1, 3], [2, 3, 1])]
        {
            let (a, b) = (r.vec(sa.iter().product()), r.vec(sb.iter().product()));
            let (shape, got) = matmul(&a, &sa, &b, &sb)?;
            assert_eq!(shape, vec![sa[0].max(sb[0]), sa[1], sb[2]]);
            assert_close(&got, &naive(&a, sa, &b, sb), 1e-5);
        }
        let (a, b) = (r.vec(4), r.vec(2 * 4 * 3));
        let (shape, got) = matmul(&a, &[4], &b, &[2, 4, 3])?;
        assert_eq!(shape, vec![2, 3]);
        assert_close(&got, &naive(&a, [1, 1, 4], &b, [2, 4, 3]), 1e-5);
        let (shape, got) = matmul(&b, &[2, 3, 4], &a, &[4])?;
        assert_eq!(shape, vec![2, 3]);
        assert_close(&got, &naive(&b, [2, 3, 4], &a, [1, 4, 1]), 1e-5);
        let (shape, got) = matmul(&a, &[4], &a, &[4])?;
        assert!(shape.is_empty());
        assert!((got[0] - a.iter().map(|x| x * x).sum::<f32>()).abs() < 1e-5);
        assert!(matmul(&a, &[4], &b, &[2, 3, 4]).is_err());
        assert!(matmul(&a, &[2, 2], &b, &[3, 8]).is_err());
        Ok(())
    }

    #[test]
    fn gemm_honours_strides_alpha_and_beta() -> Result<(), String> {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2x3
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3x2 → as transposed view of 2x3
        let mut c = [1.0f32; 4];
        gemm(2.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 2, 3).t(), 0.5, MatMut::row_major(&mut c, 2, 2))?;
        // The rows of the 2x3 view are (1,0,0) and (1,1,1): A·Bᵀ = [[1, 6], [4, 15]].
        assert_eq!(c, [2.0 * 1.0 + 0.5, 2.0 * 6.0 + 0.5, 2.0 * 4.0 + 0.5, 2.0 * 15.0 + 0.5]);
        assert!(
            gemm(1.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&a, 2, 3), 0.0, MatMut::row_major(&mut c, 2, 2))
                .is_err()
        );
        Ok(())
    }
}
