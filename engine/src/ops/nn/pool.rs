//! MaxPool, AveragePool and GlobalAveragePool, NCHW or (attribute `layout`)
//! NHWC. Both layouts run the same per-image kernel over `[h, w, lanes]`: an
//! NCHW plane is one lane, an NHWC image has its channels as lanes.

use rayon::prelude::*;

use super::window::{Axis, Layout, WindowAttrs};
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{expect_f32, f32s, input, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolKind {
    Max,
    Average,
}

#[derive(Debug)]
pub(crate) struct Pool(pub PoolKind);

impl Pool {
    fn count_include_pad(&self, node: &Node) -> Result<bool, String> {
        if self.0 == PoolKind::Max {
            return Ok(false);
        }
        match node.attrs.int("count_include_pad", 0)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("count_include_pad {v} must be 0 or 1")),
        }
    }
}

impl OpDef for Pool {
    fn name(&self) -> &'static str {
        match self.0 {
            PoolKind::Max => "MaxPool",
            PoolKind::Average => "AveragePool",
        }
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        WindowAttrs::parse(node, true)?;
        Layout::of(node)?;
        self.count_include_pad(node)?;
        if self.0 == PoolKind::Max && node.attrs.int("storage_order", 0)? != 0 {
            return Err("storage_order=1 is not supported".into());
        }
        if node.outputs.len() != 1 {
            return Err("only output Y is supported (no Indices)".into());
        }
        if node.inputs.len() != 1 {
            return Err("expects 1 input".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        expect_f32(x)?;
        let Some(shape) = &x.shape else { return Ok(vec![Inferred::new(x.clone())]) };
        if shape.len() != 4 {
            return Err(format!("input must have rank 4 (2-D pooling), got rank {}", shape.len()));
        }
        let win = WindowAttrs::parse(node, true)?;
        let k = win.kernel.ok_or("kernel_shape is required")?;
        let (_, hi, wi) = Layout::of(node)?.axes();
        let mut out = shape.clone();
        out[hi] = win.infer(node, 0, &shape[hi], k[0])?;
        out[wi] = win.infer(node, 1, &shape[wi], k[1])?;
        Ok(vec![Inferred::new(ValueType::new(DType::F32, out))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let layout = Layout::of(node)?;
        let win = WindowAttrs::parse(node, true)?;
        let k = win.kernel.ok_or("kernel_shape is required")?;
        let &[n, a, b, d] = x.shape() else {
            return Err(format!("input must have rank 4 (2-D pooling), got {:?}", x.shape()));
        };
        let (c, h, w) = if layout == Layout::Nchw { (a, b, d) } else { (d, a, b) };
        let (ay, ax) = (win.resolve(0, h, k[0])?, win.resolve(1, w, k[1])?);
        let include_pad = self.count_include_pad(node)?;
        // NCHW: one image per plane with one lane; NHWC: one per image, channels as lanes.
        let (images, lanes) = if layout == Layout::Nchw { (n * c, 1) } else { (n, c) };
        let (in_img, out_img) = (h * w * lanes, ay.out * ax.out * lanes);
        let mut y = vec![0.0f32; images * out_img];
        let xs = f32s(x)?;
        if !y.is_empty() {
            y.par_chunks_mut(out_img).zip(xs.par_chunks(in_img)).for_each(|(yi, xi)| {
                pool_image(xi, yi, [h, w, lanes], &ay, &ax, self.0, include_pad);
            });
        }
        let shape = match layout {
            Layout::Nchw => vec![n, c, ay.out, ax.out],
            Layout::Nhwc => vec![n, ay.out, ax.out, c],
        };
        Ok(vec![tensor_f32(shape, y)?])
    }
}

/// Pools one `[h, w, lanes]` image into `[oh, ow, lanes]`. Plain index loops:
/// this crate is built without optimisation in tests and iterator adapters
/// cost a call per element there.
fn pool_image(
    x: &[f32],
    y: &mut [f32],
    [h, w, lanes]: [usize; 3],
    ay: &Axis,
    ax: &Axis,
    kind: PoolKind,
    include_pad: bool,
) {
    let cols: Vec<(Vec<usize>, usize)> = (0..ax.out).map(|o| taps(ax, w, o)).collect();
    let is_max = kind == PoolKind::Max;
    let init = if is_max { f32::NEG_INFINITY } else { 0.0 };
    for oy in 0..ay.out {
        let (rows, prow) = taps(ay, h, oy);
        let nrows = rows.len();
        for (ox, (xs, pcol)) in cols.iter().enumerate() {
            let ncols = xs.len();
            let base = (oy * ax.out + ox) * lanes;
            if lanes == 1 {
                // NCHW: one scalar accumulator, no per-tap slicing.
                let mut acc = init;
                let mut r = 0;
                while r < nrows {
                    let row = rows[r] * w;
                    let mut q = 0;
                    while q < ncols {
                        let v = x[row + xs[q]];
                        if is_max {
                            if v > acc {
                                acc = v;
                            }
                        } else {
                            acc += v;
                        }
                        q += 1;
                    }
                    r += 1;
                }
                y[base] = if is_max { acc } else { acc / avg_count(include_pad, prow * pcol, nrows * ncols) };
                continue;
            }
            let out = &mut y[base..base + lanes];
            out.fill(init);
            let mut r = 0;
            while r < nrows {
                let row = rows[r] * w;
                let mut q = 0;
                while q < ncols {
                    let src = &x[(row + xs[q]) * lanes..(row + xs[q] + 1) * lanes];
                    let mut l = 0;
                    if is_max {
                        while l < lanes {
                            if src[l] > out[l] {
                                out[l] = src[l];
                            }
                            l += 1;
                        }
                    } else {
                        while l < lanes {
                            out[l] += src[l];
                            l += 1;
                        }
                    }
                    q += 1;
                }
                r += 1;
            }
            if !is_max {
                let inv = 1.0 / avg_count(include_pad, prow * pcol, nrows * ncols);
                let mut l = 0;
                while l < lanes {
                    out[l] *= inv;
                    l += 1;
                }
            }
        }
    }
}

fn avg_count(include_pad: bool, padded: usize, valid: usize) -> f32 {
    (if include_pad { padded } else { valid }).max(1) as f32
}

/// Input indices of the taps of output position `o` that fall inside the
/// input, and the number inside the padded extent (count_include_pad).
fn taps(a: &Axis, len: usize, o: usize) -> (Vec<usize>, usize) {
    let mut valid = Vec::with_capacity(a.k);
    let mut padded = 0;
    for t in 0..a.k {
        let p = (o * a.s + t * a.d) as isize - a.pb as isize;
        if p < (len + a.pe) as isize {
            padded += 1;
        }
        if p >= 0 && (p as usize) < len {
            valid.push(p as usize);
        }
    }
    (valid, padded)
}

/// GlobalAveragePool: the mean over every spatial position, per channel.
#[derive(Debug)]
pub(crate) struct GlobalAveragePool;

impl OpDef for GlobalAveragePool {
    fn name(&self) -> &'static str {
        "GlobalAveragePool"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        Layout::of(node)?;
        if node.inputs.len() != 1 || node.outputs.len() != 1 {
            return Err("expects 1 input and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        expect_f32(x)?;
        let Some(shape) = &x.shape else { return Ok(vec![Inferred::new(x.clone())]) };
        if shape.len() < 3 {
            return Err(format!("input must have rank >= 3, got rank {}", shape.len()));
        }
        let mut out = shape.clone();
        let r = out.len();
        let spatial = if Layout::of(node)? == Layout::Nchw { 2..r } else { 1..r - 1 };
        for d in &mut out[spatial] {
            *d = Dim::fixed(1);
        }
        Ok(vec![Inferred::new(ValueType::new(DType::F32, out))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.shape();
        if s.len() < 3 {
            return Err(format!("input must have rank >= 3, got {s:?}"));
        }
        let xs = f32s(x)?;
        let r = s.len();
        let mut out_shape = s.to_vec();
        let y = match Layout::of(node)? {
            Layout::Nchw => {
                let inner: usize = s[2..].iter().product();
                out_shape[2..].fill(1);
                let inv = 1.0 / inner.max(1) as f32;
                (0..s[0] * s[1])
                    .into_par_iter()
                    .map(|i| xs[i * inner..(i + 1) * inner].iter().sum::<f32>() * inv)
                    .collect::<Vec<f32>>()
            }
            Layout::Nhwc => {
                let (c, inner) = (s[r - 1], s[1..r - 1].iter().product::<usize>());
                out_shape[1..r - 1].fill(1);
                let inv = 1.0 / inner.max(1) as f32;
                let mut y = vec![0.0f32; s[0] * c];
                if c > 0 && inner > 0 {
                    y.par_chunks_mut(c).zip(xs.par_chunks(inner * c)).for_each(|(yi, xi)| {
                        for px in xi.chunks(c) {
                            for (o, &v) in yi.iter_mut().zip(px) {
                                *o += v;
                            }
                        }
                        for o in yi.iter_mut() {
                            *o *= inv;
                        }
                    });
                }
                y
            }
        };
        Ok(vec![tensor_f32(out_shape, y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    /// Direct NCHW pooling; `out` given so ceil_mode cases state their sizes.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        k: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        pads: [usize; 4],
        out: [usize; 2],
        kind: PoolKind,
        include_pad: bool,
    ) -> Vec<f32> {
        let mut y = Vec::new();
        for plane in 0..n * c {
            for oy in 0..out[0] {
                for ox in 0..out[1] {
                    let (mut acc, mut valid, mut padded) = (if kind == PoolKind::Max { f32::MIN } else { 0.0 }, 0, 0);
                    for ky in 0..k[0] {
                        for kx in 0..k[1] {
                            let iy = (oy * s[0] + ky * d[0]) as isize - pads[0] as isize;
                            let ix = (ox * s[1] + kx * d[1]) as isize - pads[1] as isize;
                            if iy < (h + pads[2]) as isize && ix < (w + pads[3]) as isize {
                                padded += 1;
                            }
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            let v = x[(plane * h + iy as usize) * w + ix as usize];
                            valid += 1;
                            acc = if kind == PoolKind::Max { acc.max(v) } else { acc + v };
                        }
                    }
                    y.push(match kind {
                        PoolKind::Max => acc,
                        PoolKind::Average => acc / if include_pad { padded } else { valid } as f32,
                    });
                }
            }
        }
        y
    }

    fn ints(v: [usize; 2]) -> Attr {
        Attr::Ints(v.iter().map(|&x| x as i64).collect())
    }

    fn nhwc(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for b in 0..n {
            for ch in 0..c {
                for i in 0..h * w {
                    y[(b * h * w + i) * c + ch] = x[(b * c + ch) * h * w + i];
                }
            }
        }
        y
    }

    #[test]
    fn pools_match_naive_loops_in_both_layouts() -> Result<(), String> {
        let mut r = Lcg(23);
        let dims = [2, 3, 7, 6];
        let x = r.vec(dims.iter().product());
        // (kernel, strides, dilations, pads, ceil_mode, expected out)
        let cases = [
            ([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], false, [4, 3]),
            ([2, 2], [2, 2], [1, 1], [0, 0, 0, 0], true, [4, 3]),
            ([3, 2], [2, 3], [1, 1], [1, 0, 1, 1], true, [4, 2]), // a third column would start in the padding
            ([2, 2], [1, 1], [2, 2], [1, 1, 0, 0], false, [6, 5]),
            ([3, 3], [1, 1], [1, 1], [0, 0, 0, 0], false, [5, 4]),
        ];
        for (k, s, d, pads, ceil, out) in cases {
            for (kind, op, include_pad) in [
                (PoolKind::Max, "MaxPool", false),
                (PoolKind::Average, "AveragePool", false),
                (PoolKind::Average, "AveragePool", true),
            ] {
                let node = Node::new("p", op, vec![Some(0)], vec![1])
                    .with_attr("kernel_shape", ints(k))
                    .with_attr("strides", ints(s))
                    .with_attr("dilations", ints(d))
                    .with_attr("pads", Attr::Ints(pads.iter().map(|&v| v as i64).collect()))
                    .with_attr("ceil_mode", Attr::Int(i64::from(ceil)))
                    .with_attr("count_include_pad", Attr::Int(i64::from(include_pad)));
                let pool = Pool(kind);
                pool.check(&node)?;
                let want = naive(&x, dims, k, s, d, pads, out, kind, include_pad);
                let y = pool.eval(&node, &[Some(&tensor_f32(dims.to_vec(), x.clone())?)])?;
                assert_eq!(y[0].shape(), &[2, 3, out[0], out[1]], "{op} {k:?} {s:?}");
                assert_close(f32s(&y[0])?, &want, 1e-6);
                let node = node.with_attr("layout", Attr::String("NHWC".into()));
                let y = pool.eval(&node, &[Some(&tensor_f32(vec![2, 7, 6, 3], nhwc(&x, dims))?)])?;
                assert_eq!(y[0].shape(), &[2, out[0], out[1], 3]);
                assert_close(f32s(&y[0])?, &nhwc(&want, [2, 3, out[0], out[1]]), 1e-6);
            }
        }
        Ok(())
    }

    #[test]
    fn global_average_pool_in_both_layouts() -> Result<(), String> {
        let mut r = Lcg(29);
        let x = r.vec(2 * 3 * 4 * 5);
        let node = Node::new("g", "GlobalAveragePool", vec![Some(0)], vec![1]);
        let y = GlobalAveragePool.eval(&node, &[Some(&tensor_f32(vec![2, 3, 4, 5], x.clone())?)])?;
        assert_eq!(y[0].shape(), &[2, 3, 1, 1]);
        let want: Vec<f32> = x.chunks(20).map(|p| p.iter().sum::<f32>() / 20.0).collect();
        assert_close(f32s(&y[0])?, &want, 1e-6);
        let node = node.with_attr("layout", Attr::String("NHWC".into()));
        let y = GlobalAveragePool.eval(&node, &[Some(&tensor_f32(vec![2, 4, 5, 3], nhwc(&x, [2, 3, 4, 5]))?)])?;
        assert_eq!(y[0].shape(), &[2, 1, 1, 3]);
        assert_close(f32s(&y[0])?, &want, 1e-6);
        let t = ValueType::new(DType::F32, vec![Dim::sym("batch"), 7.into(), 7.into(), 1280.into()]);
        let out = GlobalAveragePool.infer(&node, &[InferInput { ty: Some(&t), ..Default::default() }])?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), 1.into(), 1.into(), 1280.into()]));
        Ok(())
    }

    #[test]
    fn infer_and_check() -> Result<(), String> {
        let node = Node::new("p", "MaxPool", vec![Some(0)], vec![1])
            .with_attr("kernel_shape", Attr::Ints(vec![3, 3]))
            .with_attr("strides", Attr::Ints(vec![2, 2]))
            .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let t = ValueType::new(DType::F32, vec![Dim::sym("batch"), 64.into(), 112.into(), 112.into()]);
        let out = Pool(PoolKind::Max).infer(&node, &[InferInput { ty: Some(&t), ..Default::default() }])?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), 64.into(), 56.into(), 56.into()]));
        let max = Pool(PoolKind::Max);
        assert!(max.check(&node).is_ok());
        assert!(max.check(&node.clone().with_attr("storage_order", Attr::Int(1))).is_err());
        let mut indices = node.clone();
        indices.outputs.push(2);
        assert!(max.check(&indices).is_err());
        assert!(max.check(&node.clone().with_attr("kernel_shape", Attr::Ints(vec![3, 3, 3]))).is_err());
        assert!(max.check(&Node::new("p", "MaxPool", vec![Some(0)], vec![1])).is_err());
        let avg = Pool(PoolKind::Average);
        assert!(avg.check(&node.clone().with_attr("count_include_pad", Attr::Int(2))).is_err());
        assert!(avg.check(&node.with_attr("layout", Attr::String("HWCN".into()))).is_err());
        Ok(())
    }
}
