//! Conv (ONNX, NCHW) and kiln.FusedConv (Conv + bias + residual + activation,
//! NCHW or NHWC). Both lower to im2col per image and one GEMM per group, with
//! bias and residual preloaded into the output so the GEMM accumulates onto them.

use rayon::prelude::*;

use super::activation::Activation;
use super::linalg::{MatMut, MatRef, gemm, im2col_nchw, im2col_nhwc};
use super::window::{Axis, Layout, WindowAttrs};
use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{expect_f32, f32s, input, input_shape, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};

/// Activations kiln.FusedConv accepts.
pub(crate) const CONV_ACTIVATIONS: &[&str] = &["none", "relu", "clip", "sigmoid", "silu"];

#[derive(Debug)]
pub(crate) struct Conv {
    pub fused: bool,
}

/// Everything a 2-D convolution needs, resolved for concrete shapes.
#[derive(Debug, Clone)]
pub(crate) struct ConvSpec {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub group: usize,
    pub ay: Axis,
    pub ax: Axis,
    pub layout: Layout,
}

impl ConvSpec {
    pub(crate) fn out_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::Nchw => vec![self.n, self.m, self.ay.out, self.ax.out],
            Layout::Nhwc => vec![self.n, self.ay.out, self.ax.out, self.m],
        }
    }

    fn pointwise(&self) -> bool {
        let unit = |a: &Axis| a.k == 1 && a.s == 1 && a.pb == 0 && a.pe == 0;
        unit(&self.ay) && unit(&self.ax)
    }
}

impl Conv {
    fn layout(&self, node: &Node) -> Result<Layout, String> {
        if self.fused { Layout::of(node) } else { Ok(Layout::Nchw) }
    }

    fn group(node: &Node) -> Result<usize, String> {
        let g = node.attrs.int("group", 1)?;
        usize::try_from(g).ok().filter(|&g| g >= 1).ok_or_else(|| format!("group {g} must be >= 1"))
    }

    /// Kernel (kh, kw) and per-group input channels from the weight shape.
    fn weight_dims(w: &[usize], layout: Layout) -> Result<(usize, usize, usize, usize), String> {
        match (w, layout) {
            ([m, cg, kh, kw], Layout::Nchw) | ([m, kh, kw, cg], Layout::Nhwc) => Ok((*m, *cg, *kh, *kw)),
            _ => Err(format!("weights must have rank 4 (2-D convolution), got {w:?}")),
        }
    }

    fn spec(&self, node: &Node, x: &[usize], w: &[usize]) -> Result<ConvSpec, String> {
        let layout = self.layout(node)?;
        let win = WindowAttrs::parse(node, false)?;
        let group = Self::group(node)?;
        let (m, cg, kh, kw) = Self::weight_dims(w, layout)?;
        let &[n, a, b, d] = x else {
            return Err(format!("input must have rank 4 (2-D convolution), got {x:?}"));
        };
        let (c, h, wd) = if layout == Layout::Nchw { (a, b, d) } else { (d, a, b) };
        check_channels(c, cg, m, group, win.kernel, [kh, kw])?;
        let ay = win.resolve(0, h, kh)?;
        let ax = win.resolve(1, wd, kw)?;
        Ok(ConvSpec { n, c, h, w: wd, m, group, ay, ax, layout })
    }
}

fn check_channels(
    c: usize,
    cg: usize,
    m: usize,
    group: usize,
    kernel: Option<[usize; 2]>,
    wk: [usize; 2],
) -> Result<(), String> {
    if Some(c) != cg.checked_mul(group) {
        return Err(format!("input has {c} channels, weights expect {cg} per group × {group} groups"));
    }
    if !m.is_multiple_of(group) {
        return Err(format!("{m} output channels are not divisible by {group} groups"));
    }
    if let Some(k) = kernel
        && k != wk
    {
        return Err(format!("kernel_shape {k:?} does not match the weights' {wk:?}"));
    }
    if wk[0] == 0 || wk[1] == 0 {
        return Err("empty kernel".into());
    }
    Ok(())
}

impl OpDef for Conv {
    fn name(&self) -> &'static str {
        if self.fused { "kiln.FusedConv" } else { "Conv" }
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        WindowAttrs::parse(node, false)?;
        Self::group(node)?;
        let max_inputs = if self.fused {
            Activation::from_node(node, CONV_ACTIVATIONS)?;
            Layout::of(node)?;
            4
        } else {
            3
        };
        if node.inputs.len() < 2 || node.inputs.len() > max_inputs || node.outputs.len() != 1 {
            return Err(format!("expects 2..={max_inputs} inputs and 1 output"));
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        expect_f32(input_type(inputs, 0)?)?;
        let unknown = Ok(vec![Inferred::new(ValueType { dtype: crate::DType::F32, shape: None })]);
        let (Some(x), Some(w)) = (input_shape(inputs, 0), input_shape(inputs, 1)) else { return unknown };
        let layout = self.layout(node)?;
        let win = WindowAttrs::parse(node, false)?;
        let group = Self::group(node)?;
        if x.len() != 4 {
            return Err(format!("input must have rank 4 (2-D convolution), got rank {}", x.len()));
        }
        let Some(wf) = w.iter().map(|d| d.as_fixed().and_then(|v| usize::try_from(v).ok())).collect::<Option<Vec<_>>>()
        else {
            return unknown;
        };
        let (m, cg, kh, kw) = Self::weight_dims(&wf, layout)?;
        let (ci, hi, wi) = layout.axes();
        if let Some(c) = x[ci].as_fixed() {
            check_channels(c as usize, cg, m, group, win.kernel, [kh, kw])?;
        }
        let oh = win.infer(node, 0, &x[hi], kh)?;
        let ow = win.infer(node, 1, &x[wi], kw)?;
        let m = Dim::fixed(m as i64);
        let shape = match layout {
            Layout::Nchw => vec![x[0].clone(), m, oh, ow],
            Layout::Nhwc => vec![x[0].clone(), oh, ow, m],
        };
        Ok(vec![Inferred::new(ValueType::new(crate::DType::F32, shape))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (x, w) = (input(inputs, 0)?, input(inputs, 1)?);
        let spec = self.spec(node, x.shape(), w.shape())?;
        let bias = match inputs.get(2).copied().flatten() {
            Some(b) if b.shape().iter().product::<usize>() != spec.m => {
                return Err(format!("bias {:?} should have {} elements", b.shape(), spec.m));
            }
            Some(b) => Some(f32s(b)?),
            None => None,
        };
        let out_shape = spec.out_shape();
        let z = match inputs.get(3).copied().flatten() {
            Some(z) if z.shape() != out_shape => {
                return Err(format!("residual {:?} should have the output's shape {out_shape:?}", z.shape()));
            }
            Some(z) => Some(f32s(z)?),
            None => None,
        };
        let act = if self.fused { Activation::from_node(node, CONV_ACTIVATIONS)? } else { Activation::None };
        let y = conv2d(f32s(x)?, f32s(w)?, bias, z, act, &spec)?;
        Ok(vec![tensor_f32(out_shape, y)?])
    }
}

/// act(conv(x, w) + bias + z) for a resolved spec; `w` is OIHW for NCHW and
/// OHWI for NHWC, `z` has the output's shape.
pub(crate) fn conv2d(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    z: Option<&[f32]>,
    act: Activation,
    s: &ConvSpec,
) -> Result<Vec<f32>, String> {
    let (cg, mg) = (s.c / s.group, s.m / s.group);
    let (kk, p) = (cg * s.ay.k * s.ax.k, s.ay.out * s.ax.out);
    let (in_img, out_img) = (s.c * s.h * s.w, s.m * p);
    if x.len() != s.n * in_img || w.len() != s.m * kk {
        return Err(format!("input or weights do not match the convolution geometry {s:?}"));
    }
    let mut y = vec![0.0f32; s.n * out_img];
    if y.is_empty() {
        return Ok(y);
    }
    if in_img == 0 {
        return Err("input images are empty".into());
    }
    let pointwise = s.pointwise();
    let accumulate = bias.is_some() || z.is_some();
    y.par_chunks_mut(out_img).zip(x.par_chunks(in_img)).enumerate().try_for_each(|(i, (yi, xi))| {
        if let Some(z) = z {
            yi.copy_from_slice(&z[i * out_img..(i + 1) * out_img]);
        }
        if let Some(b) = bias {
            add_bias(yi, b, p, s.layout, z.is_some());
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        let mut col = if pointwise { Vec::new() } else { vec![0.0f32; kk * p] };
        for g in 0..s.group {
            let wg = &w[g * mg * kk..(g + 1) * mg * kk];
            match s.layout {
                Layout::Nchw => {
                    let xg = &xi[g * cg * s.h * s.w..(g + 1) * cg * s.h * s.w];
                    let cols = if pointwise {
                        MatRef::row_major(xg, cg, p)
                    } else {
                        im2col_nchw(xg, cg, s.h, s.w, &s.ay, &s.ax, &mut col);
                        MatRef::row_major(&col, kk, p)
                    };
                    let out = MatMut::row_major(&mut yi[g * mg * p..(g + 1) * mg * p], mg, p);
                    gemm(1.0, MatRef::row_major(wg, mg, kk), cols, beta, out)?;
                }
                Layout::Nhwc => {
                    let cols = if pointwise {
                        MatRef { data: &xi[g * cg..], rows: p, cols: cg, rs: s.c, cs: 1 }
                    } else {
                        im2col_nhwc(xi, s.c, g * cg, cg, s.h, s.w, &s.ay, &s.ax, &mut col);
                        MatRef::row_major(&col, p, kk)
                    };
                    let out = MatMut { data: &mut yi[g * mg..], rows: p, cols: mg, rs: s.m, cs: 1 };
                    gemm(1.0, cols, MatRef::row_major(wg, mg, kk).t(), beta, out)?;
                }
            }
        }
        act.apply(yi);
        Ok::<(), String>(())
    })?;
    Ok(y)
}

/// Adds (or, on a zeroed image, writes) the per-channel bias of one image.
fn add_bias(yi: &mut [f32], b: &[f32], p: usize, layout: Layout, add: bool) {
    let m = b.len();
    if !add {
        match layout {
            Layout::Nchw => yi.chunks_mut(p.max(1)).zip(b).for_each(|(row, &bv)| row.fill(bv)),
            Layout::Nhwc => yi.chunks_mut(m.max(1)).for_each(|px| px.copy_from_slice(b)),
        }
        return;
    }
    // Index loops rather than iterator adaptors: fast even at low optimisation levels.
    let mut i = 0;
    while i < yi.len() {
        let ch = if layout == Layout::Nchw { i / p } else { i % m };
        yi[i] += b[ch];
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};
    use crate::ops::registry;

    /// Direct 7-loop convolution with explicit pads, NCHW/OIHW.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        wt: &[f32],
        [m, kh, kw]: [usize; 3],
        group: usize,
        s: [usize; 2],
        d: [usize; 2],
        pads: [usize; 4],
        [oh, ow]: [usize; 2],
    ) -> Vec<f32> {
        let (cg, mg) = (c / group, m / group);
        let mut y = vec![0.0; n * m * oh * ow];
        for b in 0..n {
            for o in 0..m {
                let g = o / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0.0;
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * s[0] + ky * d[0]) as isize - pads[0] as isize;
                                    let ix = (ox * s[1] + kx * d[1]) as isize - pads[1] as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                        continue;
                                    }
                                    let xc = g * cg + ci;
                                    acc += x[((b * c + xc) * h + iy as usize) * w + ix as usize]
                                        * wt[((o * cg + ci) * kh + ky) * kw + kx];
                                }
                            }
                        }
                        y[((b * m + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// [a, b, c, d] row-major → [a, c, d, b] (NCHW → NHWC, OIHW → OHWI).
    pub(crate) fn to_nhwc(x: &[f32], [a, b, c, d]: [usize; 4]) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for i in 0..a {
            for j in 0..b {
                for k in 0..c {
                    for l in 0..d {
                        y[((i * c + k) * d + l) * b + j] = x[((i * b + j) * c + k) * d + l];
                    }
                }
            }
        }
        y
    }

    fn t(shape: &[usize], data: Vec<f32>) -> Result<Tensor, String> {
        tensor_f32(shape.to_vec(), data)
    }

    fn conv_node(op: &str, attrs: &[(&str, Attr)], inputs: usize) -> Node {
        let n = Node::new("conv", op, (0..inputs).map(Some).collect(), vec![inputs]);
        attrs.iter().fold(n, |n, (k, v)| n.with_attr(k, v.clone()))
    }

    fn run(node: &Node, inputs: &[&Tensor]) -> Result<Tensor, String> {
        let op = registry().get(&node.op).ok_or("op missing")?;
        op.check(node)?;
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(node, &refs)?.pop().ok_or_else(|| "no output".into())
    }

    #[test]
    fn conv_matches_naive_loops() -> Result<(), String> {
        let mut r = Lcg(7);
        // (n, c, h, w, m, k, group, strides, dilations, pads)
        type Case = (usize, usize, usize, usize, usize, [usize; 2], usize, [usize; 2], [usize; 2], [usize; 4]);
        let cases: [Case; 7] = [
            (2, 3, 9, 8, 4, [3, 3], 1, [1, 1], [1, 1], [1, 1, 1, 1]),
            (1, 4, 11, 10, 6, [3, 2], 2, [2, 1], [1, 2], [0, 1, 2, 0]),
            (2, 6, 8, 8, 6, [3, 3], 6, [2, 2], [1, 1], [1, 1, 1, 1]), // depthwise
            (2, 4, 7, 6, 8, [3, 3], 4, [1, 1], [2, 2], [2, 2, 2, 2]), // depthwise ×2 multiplier
            (3, 5, 6, 7, 4, [1, 1], 1, [1, 1], [1, 1], [0, 0, 0, 0]), // pointwise fast path
            (1, 4, 9, 9, 2, [1, 1], 2, [2, 2], [1, 1], [0, 0, 0, 0]), // strided 1×1
            (1, 2, 5, 5, 3, [5, 5], 1, [3, 3], [1, 1], [2, 2, 2, 2]),
        ];
        for (n, c, h, w, m, k, group, s, d, pads) in cases {
            let x = r.vec(n * c * h * w);
            let wt = r.vec(m * (c / group) * k[0] * k[1]);
            let b = r.vec(m);
            let node = conv_node(
                "Conv",
                &[
                    ("group", Attr::Int(group as i64)),
                    ("strides", Attr::Ints(s.iter().map(|&v| v as i64).collect())),
                    ("dilations", Attr::Ints(d.iter().map(|&v| v as i64).collect())),
                    ("pads", Attr::Ints(pads.iter().map(|&v| v as i64).collect())),
                    ("kernel_shape", Attr::Ints(k.iter().map(|&v| v as i64).collect())),
                ],
                3,
            );
            let oh = (h + pads[0] + pads[2] - (k[0] - 1) * d[0] - 1) / s[0] + 1;
            let ow = (w + pads[1] + pads[3] - (k[1] - 1) * d[1] - 1) / s[1] + 1;
            let mut want = naive(&x, [n, c, h, w], &wt, [m, k[0], k[1]], group, s, d, pads, [oh, ow]);
            for (i, v) in want.iter_mut().enumerate() {
                *v += b[(i / (oh * ow)) % m];
            }
            let xt = t(&[n, c, h, w], x)?;
            let wtt = t(&[m, c / group, k[0], k[1]], wt)?;
            let y = run(&node, &[&xt, &wtt, &t(&[m], b)?])?;
            assert_eq!(y.shape(), &[n, m, oh, ow]);
            assert_close(f32s(&y)?, &want, 1e-5);
        }
        Ok(())
    }

    #[test]
    fn auto_pad_same_matches_explicit_pads() -> Result<(), String> {
        let mut r = Lcg(3);
        let (x, w) = (t(&[1, 2, 7, 7], r.vec(98))?, t(&[3, 2, 4, 4], r.vec(96))?);
        // 7 with k4 s2: out 4, total pad 3 → SAME_UPPER (1, 2), SAME_LOWER (2, 1).
        for (mode, pads) in [("SAME_UPPER", vec![1, 1, 2, 2]), ("SAME_LOWER", vec![2, 2, 1, 1])] {
            let auto =
                conv_node("Conv", &[("auto_pad", Attr::String(mode.into())), ("strides", Attr::Ints(vec![2, 2]))], 2);
            let explicit = conv_node("Conv", &[("pads", Attr::Ints(pads)), ("strides", Attr::Ints(vec![2, 2]))], 2);
            let (a, b) = (run(&auto, &[&x, &w])?, run(&explicit, &[&x, &w])?);
            assert_eq!(a.shape(), &[1, 3, 4, 4]);
            assert_eq!(a, b, "{mode}");
        }
        let valid = conv_node("Conv", &[("auto_pad", Attr::String("VALID".into()))], 2);
        assert_eq!(run(&valid, &[&x, &w])?.shape(), &[1, 3, 4, 4]);
        Ok(())
    }

    #[test]
    fn fused_conv_adds_bias_residual_and_activation_in_both_layouts() -> Result<(), String> {
        let mut r = Lcg(11);
        let (n, c, h, w, m, group) = (2, 4, 6, 5, 4, 2);
        let x = r.vec(n * c * h * w);
        let wt = r.vec(m * (c / group) * 9);
        let b = r.vec(m);
        let z = r.vec(n * m * 3 * 3);
        let attrs = [
            ("group", Attr::Int(group as i64)),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ];
        let plain = conv_node("Conv", &attrs, 3);
        let base = run(&plain, &[&t(&[n, c, h, w], x.clone())?, &t(&[m, 2, 3, 3], wt.clone())?, &t(&[m], b.clone())?])?;
        let want: Vec<f32> = f32s(&base)?.iter().zip(&z).map(|(v, zv)| (v + zv).clamp(0.0, 0.5)).collect();
        let mut fused_attrs = attrs.to_vec();
        fused_attrs.push(("activation", Attr::String("clip".into())));
        fused_attrs.push(("clip_min", Attr::Float(0.0)));
        fused_attrs.push(("clip_max", Attr::Float(0.5)));
        let fused = conv_node("kiln.FusedConv", &fused_attrs, 4);
        let bt = t(&[m], b)?;
        let y = run(
            &fused,
            &[&t(&[n, c, h, w], x.clone())?, &t(&[m, 2, 3, 3], wt.clone())?, &bt, &t(&[n, m, 3, 3], z.clone())?],
        )?;
        assert_close(f32s(&y)?, &want, 1e-5);
        assert!(want.contains(&0.0) && want.contains(&0.5) && want.iter().any(|&v| v > 0.0 && v < 0.5));

        fused_attrs.push(("layout", Attr::String("NHWC".into())));
        let nhwc = conv_node("kiln.FusedConv", &fused_attrs, 4);
        let y = run(
            &nhwc,
            &[
                &t(&[n, h, w, c], to_nhwc(&x, [n, c, h, w]))?,
                &t(&[m, 3, 3, 2], to_nhwc(&wt, [m, 2, 3, 3]))?,
                &bt,
                &t(&[n, 3, 3, m], to_nhwc(&z, [n, m, 3, 3]))?,
            ],
        )?;
        assert_eq!(y.shape(), &[n, 3, 3, m]);
        assert_close(f32s(&y)?, &to_nhwc(&want, [n, m, 3, 3]), 1e-5);

        // Pointwise NHWC (no im2col) against NCHW.
        let pw = conv_node("kiln.FusedConv", &[("activation", Attr::String("silu".into()))], 2);
        let pw_nhwc = pw.clone().with_attr("layout", Attr::String("NHWC".into()));
        let w1 = r.vec(m * c);
        let a = run(&pw, &[&t(&[n, c, h, w], x.clone())?, &t(&[m, c, 1, 1], w1.clone())?])?;
        let b = run(&pw_nhwc, &[&t(&[n, h, w, c], to_nhwc(&x, [n, c, h, w]))?, &t(&[m, 1, 1, c], w1)?])?;
        assert_close(f32s(&b)?, &to_nhwc(f32s(&a)?, [n, m, h, w]), 1e-5);
        Ok(())
    }

    #[test]
    fn infer_keeps_symbolic_batch() -> Result<(), String> {
        let node = conv_node(
            "Conv",
            &[
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![3, 3, 3, 3])),
                ("kernel_shape", Attr::Ints(vec![7, 7])),
            ],
            2,
        );
        let xt = ValueType::new(crate::DType::F32, vec![Dim::sym("batch"), 3.into(), 224.into(), 224.into()]);
        let wt = ValueType::new(crate::DType::F32, vec![64.into(), 3.into(), 7.into(), 7.into()]);
        let ins =
            [InferInput { ty: Some(&xt), ..Default::default() }, InferInput { ty: Some(&wt), ..Default::default() }];
        let out = Conv { fused: false }.infer(&node, &ins)?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), 64.into(), 112.into(), 112.into()]));
        let nhwc = conv_node("kiln.FusedConv", &[("layout", Attr::String("NHWC".into()))], 2);
        let xt = ValueType::new(crate::DType::F32, vec![Dim::sym("batch"), Dim::sym("h"), 9.into(), 3.into()]);
        let wt = ValueType::new(crate::DType::F32, vec![8.into(), 1.into(), 1.into(), 3.into()]);
        let ins =
            [InferInput { ty: Some(&xt), ..Default::default() }, InferInput { ty: Some(&wt), ..Default::default() }];
        let out = Conv { fused: true }.infer(&nhwc, &ins)?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), Dim::sym("h"), 9.into(), 8.into()]));
        let bad = ValueType::new(crate::DType::F32, vec![8.into(), 2.into(), 1.into(), 1.into()]);
        let xt = ValueType::new(crate::DType::F32, vec![Dim::sym("batch"), 3.into(), 9.into(), 9.into()]);
        let ins =
            [InferInput { ty: Some(&xt), ..Default::default() }, InferInput { ty: Some(&bad), ..Default::default() }];
        assert!(Conv { fused: false }.infer(&conv_node("Conv", &[], 2), &ins).is_err());
        Ok(())
    }

    #[test]
    fn check_rejects_unsupported_attributes() {
        let conv = Conv { fused: false };
        let fused = Conv { fused: true };
        assert!(conv.check(&conv_node("Conv", &[("kernel_shape", Attr::Ints(vec![3]))], 2)).is_err());
        assert!(conv.check(&conv_node("Conv", &[("strides", Attr::Ints(vec![1, 1, 1]))], 2)).is_err());
        assert!(conv.check(&conv_node("Conv", &[("group", Attr::Int(0))], 2)).is_err());
        assert!(conv.check(&conv_node("Conv", &[("auto_pad", Attr::String("SAME".into()))], 2)).is_err());
        assert!(conv.check(&conv_node("Conv", &[], 4)).is_err());
        assert!(fused.check(&conv_node("kiln.FusedConv", &[("activation", Attr::String("gelu".into()))], 2)).is_err());
        assert!(fused.check(&conv_node("kiln.FusedConv", &[("layout", Attr::String("NCWH".into()))], 2)).is_err());
        assert!(fused.check(&conv_node("kiln.FusedConv", &[("activation", Attr::String("silu".into()))], 4)).is_ok());
        assert!(conv.check(&conv_node("Conv", &[("pads", Attr::Ints(vec![1, 1, 1, 1]))], 3)).is_ok());
    }
}
