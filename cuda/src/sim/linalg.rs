//! cuBLASLt GEMMs and cuDNN fused convolutions on the CPU (ndarray's GEMM on FP32 copies).

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ShapeBuilder};

use super::{SimMemory, invalid};
use crate::CudaError;
use crate::blas::{Epilogue, GemmArgs, GemmElem, GemmSpec};
use crate::dnn::{ConvAct, ConvArgs, ConvElem, ConvLayout, ConvSpec};
use crate::kernels::{Elem, EwOp};

fn gemm_elem(e: GemmElem) -> Elem {
    match e {
        GemmElem::F16 => Elem::F16,
        GemmElem::F32 => Elem::F32,
    }
}

/// A column-major matrix of `rows × cols` with leading dimension `ld` as a view of `data`
/// (transposed when `trans`: the op(X) cuBLASLt multiplies).
fn view(data: &[f32], rows: usize, cols: usize, ld: usize, trans: bool) -> Result<ArrayView2<'_, f32>, CudaError> {
    let v = if trans {
        ArrayView2::from_shape((cols, rows).strides((ld, 1)), data)
    } else {
        ArrayView2::from_shape((rows, cols).strides((1, ld)), data)
    };
    v.map_err(|e| invalid(format!("a {rows}×{cols} matrix with ld {ld} over {} values: {e}", data.len())))
}

/// Elements a column-major `rows × cols` matrix with leading dimension `ld` spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
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
    };
    let (p, q) = spec.output_hw()?;
    let [xl, wl, yl] = spec.lens()?;
    let x = mem.read(args.x, elem, xl)?;
    let w = mem.read(args.w, elem, wl)?;
    let bias = mem.read(args.bias, elem, spec.k)?;
    let z = match args.z {
        Some(z) => mem.read(z, elem, yl)?,
        None => Vec::new(),
    };
    let (n, c, h, wd, k) = (spec.n, spec.c, spec.h, spec.w, spec.k);
    let (r, s, groups) = (spec.r, spec.s, spec.groups);
    let (cg, kg) = (c / groups, k / groups);
    let taps = r * s * cg;
    let nhwc = spec.layout == ConvLayout::Nhwc;
    // Element (b, ch, iy, ix) of x, and (b, ch, oy·q + ox) of y, in the layout's order.
    let xi = |b: usize, ch: usize, iy: usize, ix: usize| {
        if nhwc { ((b * h + iy) * wd + ix) * c + ch } else { ((b * c + ch) * h + iy) * wd + ix }
    };
    let yi =
        |b: usize, ch: usize, pix: usize| if nhwc { (b * p * q + pix) * k + ch } else { (b * k + ch) * p * q + pix };
    let mut y = vec![0.0f32; yl];
    let mut col = Array2::<f32>::zeros((p * q, taps));
    let mut out = Array2::<f32>::zeros((p * q, kg));
    for b in 0..n {
        for g in 0..groups {
            col.fill(0.0);
            for oy in 0..p {
                for ox in 0..q {
                    let row = col.row_mut(oy * q + ox).into_slice().ok_or_else(|| invalid("im2col row"))?;
                    for ky in 0..r {
                        let iy = (oy * spec.stride_h + ky * spec.dil_h).wrapping_sub(spec.pad_h);
                        if iy >= h {
                            continue;
                        }
                        for kx in 0..s {
                            let ix = (ox * spec.stride_w + kx * spec.dil_w).wrapping_sub(spec.pad_w);
                            if ix >= wd {
                                continue;
                            }
                            if nhwc {
                                // OHWI: taps ordered (ky, kx, channel); the channels are contiguous in x.
                                let at = xi(b, g * cg, iy, ix);
                                let t = (ky * s + kx) * cg;
                                row[t..t + cg].copy_from_slice(&x[at..at + cg]);
                            } else {
                                // OIHW: taps ordered (channel, ky, kx).
                                for cc in 0..cg {
                                    row[(cc * r + ky) * s + kx] = x[xi(b, g * cg + cc, iy, ix)];
                                }
                            }
                        }
                    }
                }
            }
            let wg = ArrayView2::from_shape((kg, taps), &w[g * kg * taps..(g + 1) * kg * taps])
                .map_err(|e| invalid(format!("filters of group {g}: {e}")))?;
            general_mat_mul(1.0, &col, &wg.t(), 0.0, &mut out);
            for (pix, vals) in out.rows().into_iter().enumerate() {
                for (kk, &v) in vals.iter().enumerate() {
                    y[yi(b, g * kg + kk, pix)] = v;
                }
            }
        }
    }
    for (i, v) in y.iter_mut().enumerate() {
        let ch = if nhwc { i % k } else { (i / (p * q)) % k };
        *v += bias[ch];
        if !z.is_empty() {
            *v += z[i];
        }
        *v = match spec.act {
            ConvAct::Identity => *v,
            ConvAct::Relu => EwOp::Relu.apply(*v, 0.0, 0.0, 0.0, 0.0),
            // The fused call applies ReLU and stores; the clip is a second pass over y.
            ConvAct::ClippedRelu(ceil) => {
                let relu = EwOp::Relu.apply(*v, 0.0, 0.0, 0.0, 0.0);
                let stored = if elem == Elem::F16 { half::f16::from_f32(relu).to_f32() } else { relu };
                EwOp::Clip.apply(stored, 0.0, 0.0, 0.0, ceil as f32)
            }
        };
    }
    mem.write(args.y, elem, &y)
}
