//! cuBLASLt GEMMs and cuDNN fused convolutions on the CPU (ndarray's GEMM on FP32 copies).

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ShapeBuilder};

use super::{SimMemory, disjoint, invalid};
use crate::CudaError;
use crate::blas::{Epilogue, GemmArgs, GemmElem, GemmSpec};
use crate::dnn::{ConvAct, ConvArgs, ConvElem, ConvLayout, ConvSpec};
use crate::kernels::{Elem, EwOp};

fn gemm_elem(e: GemmElem) -> Elem {
    match e {
        GemmElem::F16 => Elem::F16,
        GemmElem::F32 => Elem::F32,
        GemmElem::I8 => Elem::I8,
    }
}

/// A column-major matrix of `rows × cols` with leading dimension `ld` as a view of `data`
/// (transposed when `trans`: the op(X) cuBLASLt multiplies).
pub(super) fn view(
    data: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
) -> Result<ArrayView2<'_, f32>, CudaError> {
    let v = if trans {
        ArrayView2::from_shape((cols, rows).strides((ld, 1)), data)
    } else {
        ArrayView2::from_shape((rows, cols).strides((1, ld)), data)
    };
    v.map_err(|e| invalid(format!("a {rows}×{cols} matrix with ld {ld} over {} values: {e}", data.len())))
}

/// Elements a column-major `rows × cols` matrix with leading dimension `ld` spans.
pub(super) fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (cols - 1) * ld + rows }
}

/// `D = act(alpha·op(A)·op(B) + beta·C + bias)`, column-major, per batch.
pub(super) fn gemm(mem: &mut SimMemory, spec: &GemmSpec, args: &GemmArgs) -> Result<(), CudaError> {
    spec.validate()?;
    let c_ptr = match (args.c, spec.beta != 0.0) {
        (Some(c), true) => Some(c),
        (None, false) => None,
        (None, true) => return Err(invalid(format!("{spec}: beta is not 0 but no C was given"))),
        (Some(_), false) => return Err(invalid(format!("{spec}: C was given but beta is 0"))),
    };
    if args.bias.is_some() != spec.bias {
        return Err(invalid(format!("{spec}: the bias pointer does not match the plan")));
    }
    let elem = gemm_elem(spec.elem);
    let es = elem.size() as u64;
    let (m, n, k) = (spec.m as usize, spec.n as usize, spec.k as usize);
    let (lda, ldb, ldc) = (spec.lda as usize, spec.ldb as usize, spec.ldc as usize);
    let (ar, ac) = if spec.transa { (k, m) } else { (m, k) };
    let (br, bc) = if spec.transb { (n, k) } else { (k, n) };
    let bias = match args.bias {
        Some(p) => mem.read(p, elem, m)?,
        None => Vec::new(),
    };
    let (count, sa, sb, sc) = spec.batch.map_or((1, 0, 0, 0), |b| (b.count, b.stride_a, b.stride_b, b.stride_c));
    for i in 0..count {
        let at = |p: u64, stride: i64| p.wrapping_add((i as i64 * stride) as u64 * es);
        let d_span = (at(args.d, sc), span(m, n, ldc) * es as usize);
        disjoint("GEMM A", (at(args.a, sa), span(ar, ac, lda) * es as usize), d_span)?;
        disjoint("GEMM B", (at(args.b, sb), span(br, bc, ldb) * es as usize), d_span)?;
        // C may be D itself (the residual added in place), but not part of it.
        if let Some(c) = c_ptr.filter(|&c| c != args.d) {
            disjoint("GEMM C", (at(c, sc), d_span.1), d_span)?;
        }
        let a = mem.read(at(args.a, sa), elem, span(ar, ac, lda))?;
        let b = mem.read(at(args.b, sb), elem, span(br, bc, ldb))?;
        let mut acc = Array2::<f32>::zeros((m, n).f());
        general_mat_mul(
            spec.alpha,
            &view(&a, ar, ac, lda, spec.transa)?,
            &view(&b, br, bc, ldb, spec.transb)?,
            0.0,
            &mut acc,
        );
        let c = match c_ptr {
            Some(p) => mem.read(at(p, sc), elem, span(m, n, ldc))?,
            None => Vec::new(),
        };
        let vals = acc.as_slice_memory_order_mut().ok_or_else(|| invalid("GEMM accumulator is not contiguous"))?;
        for (j, col) in vals.chunks_exact_mut(m.max(1)).enumerate() {
            for (r, v) in col.iter_mut().enumerate() {
                if !c.is_empty() {
                    *v += spec.beta * c[j * ldc + r];
                }
                if !bias.is_empty() {
                    *v += bias[r];
                }
                *v = match spec.epilogue {
                    Epilogue::None => *v,
                    Epilogue::Relu => EwOp::Relu.apply(*v, 0.0, 0.0, 0.0, 0.0),
                    Epilogue::Gelu => EwOp::GeluTanh.apply(*v, 0.0, 0.0, 0.0, 0.0),
                };
            }
        }
        let d = at(args.d, sc);
        if ldc == m {
            mem.write(d, elem, vals)?;
        } else {
            for (j, col) in vals.chunks_exact(m.max(1)).enumerate() {
                mem.write(d + (j * ldc) as u64 * es, elem, col)?;
            }
        }
    }
    Ok(())
}

/// `y = act(conv(x, w) + bias + z)`: im2col per image and group, then one GEMM.
pub(super) fn conv(mem: &mut SimMemory, spec: &ConvSpec, args: &ConvArgs) -> Result<(), CudaError> {
    spec.validate()?;
    if args.z.is_some() != spec.residual {
        return Err(invalid(format!("{spec:?}: z is given exactly when the spec has a residual")));
    }
    let elem = match spec.elem {
        ConvElem::F16 => Elem::F16,
        ConvElem::F32 => Elem::F32,
        ConvElem::I8 => return Err(invalid("INT8 convolutions are simulated by sim::int8")),
    };
    let (p, q) = spec.output_hw()?;
    let [xl, wl, yl] = spec.lens()?;
    let (es, out) = (elem.size(), (args.y, yl * elem.size()));
    disjoint("convolution input", (args.x, xl * es), out)?;
    disjoint("convolution filters", (args.w, wl * es), out)?;
    disjoint("convolution bias", (args.bias, spec.k * es), out)?;
    if let Some(z) = args.z.filter(|&z| z != args.y) {
        disjoint("convolution residual", (z, yl * es), out)?;
    }
    let x = mem.read(args.x, elem, xl)?;
    let w = mem.read(args.w, elem, wl)?;
    let bias = mem.read(args.bias, elem, spec.k)?;
    let z = match args.z {
        Some(z) => mem.read(z, elem, yl)?,
        None => Vec::new(),
    };
    let (k, groups, pq) = (spec.k, spec.groups, p * q);
    let nhwc = spec.layout == ConvLayout::Nhwc;
    let mut y = vec![0.0f32; yl];
    if nhwc && spec.c == groups && k == groups {
        depthwise_nhwc(spec, &x, &w, (p, q), &mut y);
    } else {
        for b in 0..spec.n {
            for g in 0..groups {
                conv_group(spec, &x, &w, b, g, (p, q), &mut y)?;
            }
        }
    }
    let act = |v: f32| match spec.act {
        ConvAct::Identity => v,
        ConvAct::Relu => EwOp::Relu.apply(v, 0.0, 0.0, 0.0, 0.0),
        // The fused call applies ReLU and stores y; the clip is a second pass over it.
        ConvAct::ClippedRelu(ceil) => {
            let relu = EwOp::Relu.apply(v, 0.0, 0.0, 0.0, 0.0);
            let stored = if elem == Elem::F16 { half::f16::from_f32(relu).to_f32() } else { relu };
            EwOp::Clip.apply(stored, 0.0, 0.0, 0.0, ceil as f32)
        }
    };
    let plane = if nhwc { 1 } else { pq };
    for (i, v) in y.iter_mut().enumerate() {
        let zv = if z.is_empty() { 0.0 } else { z[i] };
        *v = act(*v + bias[(i / plane) % k] + zv);
    }
    mem.write(args.y, elem, &y)
}

/// Group `g` of image `b` through im2col and one GEMM, into `y` (the layout's order).
pub(super) fn conv_group(
    spec: &ConvSpec,
    x: &[f32],
    w: &[f32],
    b: usize,
    g: usize,
    (p, q): (usize, usize),
    y: &mut [f32],
) -> Result<(), CudaError> {
    let (k, groups) = (spec.k, spec.groups);
    let (cg, kg, pq) = (spec.c / groups, k / groups, p * q);
    let taps = spec.r * spec.s * cg;
    let nhwc = spec.layout == ConvLayout::Nhwc;
    let wg = ArrayView2::from_shape((kg, taps), &w[g * kg * taps..(g + 1) * kg * taps])
        .map_err(|e| invalid(format!("filters of group {g}: {e}")))?;
    if nhwc {
        // Rows of output pixels × (ky, kx, channel) taps, the OHWI filter order.
        let col = im2col_nhwc(spec, x, b, g * cg, (p, q))?;
        let mut out = Array2::<f32>::zeros((pq, kg));
        general_mat_mul(1.0, &col, &wg.t(), 0.0, &mut out);
        for (pix, row) in out.rows().into_iter().enumerate() {
            let at = (b * pq + pix) * k + g * kg;
            y[at..at + kg].iter_mut().zip(row).for_each(|(y, v)| *y = *v);
        }
    } else {
        // (channel, ky, kx) taps × output pixels, so each filter's result is one NCHW plane.
        let col = im2col_nchw(spec, x, b, g * cg, (p, q))?;
        let mut out = Array2::<f32>::zeros((kg, pq));
        general_mat_mul(1.0, &wg, &col, 0.0, &mut out);
        let at = (b * k + g * kg) * pq;
        let vals = out.as_slice().ok_or_else(|| invalid("convolution result is not contiguous"))?;
        y[at..at + kg * pq].copy_from_slice(vals);
    }
    Ok(())
}

/// A depthwise NHWC convolution (one filter per channel) directly, every channel of a pixel at once.
pub(super) fn depthwise_nhwc(spec: &ConvSpec, x: &[f32], w: &[f32], (p, q): (usize, usize), y: &mut [f32]) {
    let (c, h, wd, taps) = (spec.c, spec.h, spec.w, spec.r * spec.s);
    // Filters [c, taps] to [taps, c], so that a tap's weights line up with a pixel's channels.
    let mut wt = vec![0.0f32; taps * c];
    for ch in 0..c {
        for t in 0..taps {
            wt[t * c + ch] = w[ch * taps + t];
        }
    }
    for b in 0..spec.n {
        for oy in 0..p {
            for ox in 0..q {
                let at = ((b * p + oy) * q + ox) * c;
                let out = &mut y[at..at + c];
                for ky in 0..spec.r {
                    let Some(iy) = tap(oy, ky, spec.stride_h, spec.dil_h, spec.pad_h, h) else { continue };
                    for kx in 0..spec.s {
                        let Some(ix) = tap(ox, kx, spec.stride_w, spec.dil_w, spec.pad_w, wd) else { continue };
                        let src = ((b * h + iy) * wd + ix) * c;
                        let (xs, ws) = (&x[src..src + c], &wt[(ky * spec.s + kx) * c..][..c]);
                        for ch in 0..c {
                            out[ch] += xs[ch] * ws[ch];
                        }
                    }
                }
            }
        }
    }
}

/// Input row and column of output `o` at tap `t`, or `None` in the padding.
fn tap(o: usize, t: usize, stride: usize, dil: usize, pad: usize, size: usize) -> Option<usize> {
    (o * stride + t * dil).checked_sub(pad).filter(|&i| i < size)
}

fn im2col_nhwc(
    spec: &ConvSpec,
    x: &[f32],
    b: usize,
    c0: usize,
    (p, q): (usize, usize),
) -> Result<Array2<f32>, CudaError> {
    let (c, h, w, cg) = (spec.c, spec.h, spec.w, spec.c / spec.groups);
    let taps = spec.r * spec.s * cg;
    let mut col = vec![0.0f32; p * q * taps];
    for oy in 0..p {
        for ky in 0..spec.r {
            let Some(iy) = tap(oy, ky, spec.stride_h, spec.dil_h, spec.pad_h, h) else { continue };
            for ox in 0..q {
                for kx in 0..spec.s {
                    let Some(ix) = tap(ox, kx, spec.stride_w, spec.dil_w, spec.pad_w, w) else { continue };
                    let src = ((b * h + iy) * w + ix) * c + c0;
                    let dst = (oy * q + ox) * taps + (ky * spec.s + kx) * cg;
                    col[dst..dst + cg].copy_from_slice(&x[src..src + cg]);
                }
            }
        }
    }
    Array2::from_shape_vec((p * q, taps), col).map_err(|e| invalid(format!("im2col: {e}")))
}

fn im2col_nchw(
    spec: &ConvSpec,
    x: &[f32],
    b: usize,
    c0: usize,
    (p, q): (usize, usize),
) -> Result<Array2<f32>, CudaError> {
    let (c, h, w, cg) = (spec.c, spec.h, spec.w, spec.c / spec.groups);
    let mut col = vec![0.0f32; cg * spec.r * spec.s * p * q];
    for cc in 0..cg {
        let plane = &x[(b * c + c0 + cc) * h * w..(b * c + c0 + cc + 1) * h * w];
        for ky in 0..spec.r {
            for kx in 0..spec.s {
                let row = &mut col[((cc * spec.r + ky) * spec.s + kx) * p * q..][..p * q];
                for oy in 0..p {
                    let Some(iy) = tap(oy, ky, spec.stride_h, spec.dil_h, spec.pad_h, h) else { continue };
                    let (src, dst) = (&plane[iy * w..(iy + 1) * w], &mut row[oy * q..(oy + 1) * q]);
                    // Output columns whose tap is inside the row: ix = ox·stride + off.
                    let (sw, off) = (spec.stride_w as i64, (kx * spec.dil_w) as i64 - spec.pad_w as i64);
                    let lo = ((-off).max(0) + sw - 1) / sw;
                    let hi = ((w as i64 - off + sw - 1).max(0) / sw).min(q as i64);
                    if lo < hi {
                        let from = (lo * sw + off) as usize;
                        let taken = src[from..].iter().step_by(spec.stride_w);
                        dst[lo as usize..hi as usize].iter_mut().zip(taken).for_each(|(d, v)| *d = *v);
                    }
                }
            }
        }
    }
    Array2::from_shape_vec((cg * spec.r * spec.s, p * q), col).map_err(|e| invalid(format!("im2col: {e}")))
}
