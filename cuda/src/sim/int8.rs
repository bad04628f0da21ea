//! INT8 steps on the CPU: the exact integer sums of cuBLASLt's and cuDNN's integer
//! kernels and of `kiln_dwconv_i8`, and `quant.cu`'s quantisation and requantisation
//! through the kernels' CPU references.
//!
//! The sums reuse the FP32 GEMM and convolution: the INT8 activations are split as
//! `q = 16·hi + lo` (hi ∈ [-8, 7], lo ∈ [0, 15]) and each half is multiplied in FP32,
//! where every partial sum is an integer below 2^24 — exact in any order — as long as
//! the reduction is at most [`MAX_REDUCTION`] long.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ShapeBuilder};

use super::linalg::{conv_group, span, view};
use super::{SimMemory, disjoint, invalid};
use crate::CudaError;
use crate::blas::{GemmArgs, GemmSpec};
use crate::dnn::{ConvArgs, ConvSpec};
use crate::kernels::{
    AccLayout, DwConvI8Args, Elem, Int8Out, QuantizeArgs, RequantArgs, quantize_reference, requant_copy_reference,
    requant_reference,
};

/// Longest reduction summed exactly: 15 · 127 · K < 2^24 (weight codes are within ±127),
/// as the engine's emulation.
const MAX_REDUCTION: usize = kiln_engine::quant::int8::MAX_REDUCTION;

fn split(q: &[f32]) -> (Vec<f32>, Vec<f32>) {
    q.iter().map(|&v| ((v as i32).div_euclid(16) as f32, (v as i32).rem_euclid(16) as f32)).unzip()
}

fn int_bytes(v: impl Iterator<Item = i64>) -> Result<Vec<u8>, CudaError> {
    let mut out = Vec::new();
    for x in v {
        let x = i32::try_from(x).map_err(|_| invalid(format!("INT32 accumulator overflow ({x})")))?;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

fn exact(what: &str, reduction: usize) -> Result<(), CudaError> {
    if reduction > MAX_REDUCTION {
        return Err(invalid(format!("{what}: reduction {reduction} beyond the {MAX_REDUCTION} simulated exactly")));
    }
    Ok(())
}

/// `D = op(A)·op(B)` with INT8 A and B and INT32 D, column-major (one matrix, no batch).
pub(super) fn gemm(mem: &mut SimMemory, spec: &GemmSpec, args: &GemmArgs) -> Result<(), CudaError> {
    spec.validate()?;
    if spec.batch.is_some() || args.c.is_some() || args.bias.is_some() {
        return Err(invalid(format!("{spec}: INT8 GEMMs take no batch, C or bias")));
    }
    let (m, n, k) = (spec.m as usize, spec.n as usize, spec.k as usize);
    let (lda, ldb, ldc) = (spec.lda as usize, spec.ldb as usize, spec.ldc as usize);
    exact(&spec.to_string(), k)?;
    let d_span = (args.d, span(m, n, ldc) * 4);
    disjoint("GEMM A", (args.a, span(k, m, lda)), d_span)?;
    disjoint("GEMM B", (args.b, span(k, n, ldb)), d_span)?;
    // TN: A is stored k × m (op(A) = Aᵀ), B k × n.
    let a = mem.read(args.a, Elem::I8, span(k, m, lda))?;
    let b = mem.read(args.b, Elem::I8, span(k, n, ldb))?;
    let (hi, lo) = split(&b);
    let product = |half: &[f32]| -> Result<Array2<f32>, CudaError> {
        let mut acc = Array2::<f32>::zeros((m, n).f());
        general_mat_mul(1.0, &view(&a, k, m, lda, true)?, &view(half, k, n, ldb, false)?, 0.0, &mut acc);
        Ok(acc)
    };
    let (hi, lo) = (product(&hi)?, product(&lo)?);
    for j in 0..n {
        let col = (0..m).map(|r| 16 * hi[[r, j]] as i64 + lo[[r, j]] as i64);
        let bytes = int_bytes(col)?;
        mem.bytes_mut(args.d + (j * ldc * 4) as u64, m * 4)?.copy_from_slice(&bytes);
    }
    Ok(())
}

/// cuDNN's INT8 convolution with FP32 output (`cudnnConvolutionForward`, no bias): `y = float(Σ x·w)`.
pub(super) fn conv(mem: &mut SimMemory, spec: &ConvSpec, args: &ConvArgs) -> Result<(), CudaError> {
    spec.validate()?;
    if args.z.is_some() {
        return Err(invalid(format!("{spec:?}: INT8 convolutions take no residual")));
    }
    let (p, q) = spec.output_hw()?;
    let [xl, wl, yl] = spec.lens()?;
    exact(&format!("{spec:?}"), spec.c * spec.r * spec.s)?;
    let out = (args.y, yl * 4);
    disjoint("convolution input", (args.x, xl), out)?;
    disjoint("convolution filters", (args.w, wl), out)?;
    let x = mem.read(args.x, Elem::I8, xl)?;
    let w = mem.read(args.w, Elem::I8, wl)?;
    let (hi, lo) = split(&x);
    let (mut yh, mut yl_) = (vec![0.0f32; yl], vec![0.0f32; yl]);
    for b in 0..spec.n {
        conv_group(spec, &hi, &w, b, 0, (p, q), &mut yh)?;
        conv_group(spec, &lo, &w, b, 0, (p, q), &mut yl_)?;
    }
    let y: Vec<f32> = yh.iter().zip(&yl_).map(|(&h, &l)| (16 * h as i64 + l as i64) as f32).collect();
    mem.write(args.y, Elem::F32, &y)
}

fn i8s(mem: &SimMemory, ptr: u64, n: usize) -> Result<Vec<i8>, CudaError> {
    Ok(mem.bytes(ptr, n)?.iter().map(|&b| b as i8).collect())
}

pub(super) fn dwconv(mem: &mut SimMemory, a: &DwConvI8Args) -> Result<(), CudaError> {
    a.plan()?;
    let [xl, yl] = a.lens();
    let wl = a.c * a.kernel[0] * a.kernel[1];
    disjoint("depthwise input", (a.x, xl), (a.y, yl * 4))?;
    disjoint("depthwise filters", (a.w, wl), (a.y, yl * 4))?;
    let y = a.reference(&i8s(mem, a.x, xl)?, &i8s(mem, a.w, wl)?);
    let bytes = int_bytes(y.into_iter().map(i64::from))?;
    mem.bytes_mut(a.y, yl * 4)?.copy_from_slice(&bytes);
    Ok(())
}

pub(super) fn quantize(mem: &mut SimMemory, a: &QuantizeArgs) -> Result<(), CudaError> {
    a.plan()?;
    let src_n = a.n / a.padded * a.channels;
    disjoint("quantize source", (a.src, src_n * a.src_elem.size()), (a.dst, a.n))?;
    let x = mem.read(a.src, a.src_elem, src_n)?;
    let q: Vec<u8> = quantize_reference(&x, a.scale, a.channels, a.padded).into_iter().map(|v| v as u8).collect();
    mem.bytes_mut(a.dst, a.n)?.copy_from_slice(&q);
    Ok(())
}

pub(super) fn requant(mem: &mut SimMemory, a: &RequantArgs) -> Result<(), CudaError> {
    a.plan()?;
    let out_elem = match a.out_kind {
        Int8Out::F32 => Elem::F32,
        Int8Out::F16 => Elem::F16,
        Int8Out::I8 { .. } => Elem::I8,
    };
    let acc_n = match (a.inner, a.n / a.channels) {
        (1, 0) => 0,
        (1, rows) => (rows - 1) * a.acc_ld + a.channels,
        _ => a.n,
    };
    let out = (a.out, a.n * out_elem.size());
    disjoint("requant accumulators", (a.acc, acc_n * 4), out)?;
    // The kernel converts INT32 sums with round to nearest, as the decode does.
    let acc = mem.read(a.acc, a.acc_elem, acc_n)?;
    let alpha = mem.read(a.alpha, Elem::F32, a.channels)?;
    let bias = a.bias.map(|b| mem.read(b, Elem::F32, a.channels)).transpose()?;
    let residual = match a.residual {
        Some((z, elem)) => {
            disjoint("requant residual", (z, a.n * elem.size()), out)?;
            Some(mem.read(z, elem, a.n)?)
        }
        None => None,
    };
    let layout = AccLayout { inner: a.inner, ld: a.acc_ld };
    let (bias, residual) = (bias.as_deref(), residual.as_deref());
    let Some((q_out, scale, via_f16)) = a.also_i8 else {
        let y = requant_reference(&acc, layout, &alpha, bias, residual, (a.act, a.out_kind), a.n);
        return mem.write(a.out, out_elem, &y);
    };
    // The copy is taken from the FP32 value, before the output's own rounding.
    disjoint("requant INT8 copy", (q_out, a.n), out)?;
    let y = requant_reference(&acc, layout, &alpha, bias, residual, (a.act, Int8Out::F32), a.n);
    let q: Vec<u8> = requant_copy_reference(&y, scale, via_f16).into_iter().map(|v| v as u8).collect();
    mem.bytes_mut(q_out, a.n)?.copy_from_slice(&q);
    mem.write(a.out, out_elem, &y)
}
