//! Row-wise kernels (softmax, layer normalisation, reductions), pooling and attention on
//! the CPU, FP32 throughout, as `softmax.cu`, `layernorm.cu`, `reduce.cu`, `pool.cu` and
//! `attention.cu` describe them.

use super::{SimMemory, disjoint, invalid};
use crate::CudaError;
use crate::kernels::{
    AttentionArgs, Elem, GlobalPoolArgs, LayerNormArgs, Layout, Pool2dArgs, PoolKind, ReduceArgs, ReduceKind,
    SoftmaxArgs,
};

fn float(e: Elem, what: &str) -> Result<(), CudaError> {
    if e.is_float() { Ok(()) } else { Err(invalid(format!("{what} must be F32 or F16, got {e:?}"))) }
}

/// `exp(x − max) / Σ` in place; a row of only -inf, or with a NaN, becomes NaN.
fn softmax_row(row: &mut [f32]) {
    if row.iter().any(|v| v.is_nan()) || row.iter().all(|&v| v == f32::NEG_INFINITY) {
        row.fill(f32::NAN);
        return;
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

pub(super) fn softmax(mem: &mut SimMemory, a: &SoftmaxArgs) -> Result<(), CudaError> {
    float(a.x_elem, "softmax input")?;
    float(a.y_elem, "softmax output")?;
    let n = a.rows * a.cols;
    disjoint("softmax input", (a.x, n * a.x_elem.size()), (a.y, n * a.y_elem.size()))?;
    let mut x = mem.read(a.x, a.x_elem, n)?;
    if a.cols > 0 {
        x.chunks_exact_mut(a.cols).for_each(softmax_row);
    }
    mem.write(a.y, a.y_elem, &x)
}

pub(super) fn layer_norm(mem: &mut SimMemory, a: &LayerNormArgs) -> Result<(), CudaError> {
    for (e, what) in [(a.x_elem, "x"), (a.y_elem, "y"), (a.gamma_elem, "gamma"), (a.beta_elem, "beta")] {
        float(e, &format!("layernorm {what}"))?;
    }
    let n = a.rows * a.cols;
    let mut v = mem.read(a.x, a.x_elem, n)?;
    if let Some(r) = a.residual {
        let r = mem.read(r, a.x_elem, n)?;
        // The sum is stored in x's type before the statistics, as the unfused Add would store it.
        let round = |s: f32| if a.x_elem == Elem::F16 { half::f16::from_f32(s).to_f32() } else { s };
        v.iter_mut().zip(&r).for_each(|(x, r)| *x = round(*x + r));
    }
    if let Some(s) = a.sum_out {
        mem.write(s, a.x_elem, &v)?;
    }
    let gamma = mem.read(a.gamma, a.gamma_elem, a.cols)?;
    let beta = match a.beta {
        Some(b) => mem.read(b, a.beta_elem, a.cols)?,
        None => vec![0.0; a.cols],
    };
    if a.cols > 0 {
        let inv_n = 1.0 / a.cols as f32;
        for row in v.chunks_exact_mut(a.cols) {
            let mean = row.iter().sum::<f32>() * inv_n;
            let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() * inv_n;
            let rstd = 1.0 / (var + a.eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(&gamma).zip(&beta) {
                *x = (*x - mean) * rstd * g + b;
            }
        }
    }
    mem.write(a.y, a.y_elem, &v)
}

/// `f(a, b)`, or NaN when either is NaN (the kernels' max and min propagate NaN).
fn nan_or(a: f32, b: f32, f: fn(f32, f32) -> f32) -> f32 {
    if a.is_nan() || b.is_nan() { f32::NAN } else { f(a, b) }
}

pub(super) fn reduce(mem: &mut SimMemory, a: &ReduceArgs) -> Result<(), CudaError> {
    float(a.x_elem, "reduce input")?;
    float(a.y_elem, "reduce output")?;
    if a.len == 0 && a.outer * a.inner > 0 {
        return Err(invalid("reduction over an empty axis"));
    }
    let (xn, yn) = (a.outer * a.len * a.inner, a.outer * a.inner);
    disjoint("reduce input", (a.x, xn * a.x_elem.size()), (a.y, yn * a.y_elem.size()))?;
    let x = mem.read(a.x, a.x_elem, xn)?;
    let mut y = Vec::with_capacity(a.outer * a.inner);
    for o in 0..a.outer {
        for i in 0..a.inner {
            let vals = (0..a.len).map(|j| x[(o * a.len + j) * a.inner + i]);
            y.push(match a.kind {
                ReduceKind::Sum => vals.sum(),
                ReduceKind::Mean => vals.sum::<f32>() / a.len as f32,
                // NaN propagates, as in the kernel.
                ReduceKind::Max => vals.fold(f32::NEG_INFINITY, |m, v| nan_or(m, v, f32::max)),
                ReduceKind::Min => vals.fold(f32::INFINITY, |m, v| nan_or(m, v, f32::min)),
            });
        }
    }
    mem.write(a.y, a.y_elem, &y)
}

/// Input positions of output `o`'s taps along one axis (`pad` before, `pad_end` after).
struct Axis {
    kernel: usize,
    stride: usize,
    dil: usize,
    pad: i64,
    pad_end: i64,
    size: usize,
}

impl Axis {
    /// Taps inside the input, and taps before the end padding's edge (count_include_pad).
    fn taps(&self, o: usize, inside: &mut Vec<usize>) -> usize {
        inside.clear();
        let mut padded = 0;
        for t in 0..self.kernel {
            let i = (o * self.stride + t * self.dil) as i64 - self.pad;
            padded += usize::from(i < self.size as i64 + self.pad_end);
            if (0..self.size as i64).contains(&i) {
                inside.push(i as usize);
            }
        }
        padded
    }
}

pub(super) fn pool(mem: &mut SimMemory, a: &Pool2dArgs) -> Result<(), CudaError> {
    float(a.elem, "pool element")?;
    if a.kernel.contains(&0) || a.strides.contains(&0) || a.dilations.contains(&0) {
        return Err(invalid(format!(
            "pool kernel {:?}, strides {:?}, dilations {:?}",
            a.kernel, a.strides, a.dilations
        )));
    }
    let (n, c, h, w) = (a.n, a.c, a.h, a.w);
    let [oh, ow] = a.out;
    let [pt, pl, pb, pr] = a.pads.map(|v| v as i64);
    let ay = Axis { kernel: a.kernel[0], stride: a.strides[0], dil: a.dilations[0], pad: pt, pad_end: pb, size: h };
    let ax = Axis { kernel: a.kernel[1], stride: a.strides[1], dil: a.dilations[1], pad: pl, pad_end: pr, size: w };
    let es = a.elem.size();
    disjoint("pool input", (a.x, n * c * h * w * es), (a.y, n * c * oh * ow * es))?;
    let x = mem.read(a.x, a.elem, n * c * h * w)?;
    let nhwc = a.layout == Layout::Nhwc;
    // Element (b, ch, iy, ix) is at base(b, ch) + iy·ystep + ix·xstep.
    let (ystep, xstep) = if nhwc { (w * c, c) } else { (w, 1) };
    let is_max = a.kind == PoolKind::Max;
    let mut y = vec![0.0f32; n * c * oh * ow];
    let (mut rows, mut cols) = (Vec::new(), Vec::new());
    for oy in 0..oh {
        let rows_padded = ay.taps(oy, &mut rows);
        for ox in 0..ow {
            let cols_padded = ax.taps(ox, &mut cols);
            let count = if a.count_include_pad { rows_padded * cols_padded } else { rows.len() * cols.len() };
            for b in 0..n {
                for ch in 0..c {
                    let base = if nhwc { b * h * w * c + ch } else { (b * c + ch) * h * w };
                    let mut acc = if is_max { f32::NEG_INFINITY } else { 0.0 };
                    for &iy in &rows {
                        for &ix in &cols {
                            let v = x[base + iy * ystep + ix * xstep];
                            if !is_max {
                                acc += v;
                            } else if v > acc {
                                acc = v;
                            }
                        }
                    }
                    if !is_max {
                        acc /= count.max(1) as f32;
                    }
                    let at = if nhwc { ((b * oh + oy) * ow + ox) * c + ch } else { ((b * c + ch) * oh + oy) * ow + ox };
                    y[at] = acc;
                }
            }
        }
    }
    mem.write(a.y, a.elem, &y)
}

pub(super) fn global_pool(mem: &mut SimMemory, a: &GlobalPoolArgs) -> Result<(), CudaError> {
    float(a.elem, "global pool element")?;
    if a.spatial == 0 && a.n * a.c > 0 {
        return Err(invalid("global average pool over an empty image"));
    }
    let es = a.elem.size();
    disjoint("global pool input", (a.x, a.n * a.c * a.spatial * es), (a.y, a.n * a.c * es))?;
    let x = mem.read(a.x, a.elem, a.n * a.c * a.spatial)?;
    let mut y = Vec::with_capacity(a.n * a.c);
    for b in 0..a.n {
        for ch in 0..a.c {
            let sum: f32 = (0..a.spatial)
                .map(|i| match a.layout {
                    Layout::Nchw => x[(b * a.c + ch) * a.spatial + i],
                    Layout::Nhwc => x[(b * a.spatial + i) * a.c + ch],
                })
                .sum();
            y.push(sum * (1.0 / a.spatial as f32));
        }
    }
    mem.write(a.y, a.elem, &y)
}

/// `y = softmax(q·kt·scale + mask)·v` per (batch, head), probabilities kept in FP32.
pub(super) fn attention(mem: &mut SimMemory, a: &AttentionArgs) -> Result<(), CudaError> {
    float(a.elem, "attention Q/K/V")?;
    if !a.scale.is_finite() {
        return Err(invalid(format!("attention scale {} is not finite", a.scale)));
    }
    let (bh, s, sk, d, dv) = (a.batch * a.heads, a.s, a.sk, a.d, a.dv);
    let es = a.elem.size();
    let out = (a.y, bh * s * dv * es);
    disjoint("attention Q", (a.q, bh * s * d * es), out)?;
    disjoint("attention KT", (a.kt, bh * d * sk * es), out)?;
    disjoint("attention V", (a.v, bh * sk * dv * es), out)?;
    let q = mem.read(a.q, a.elem, bh * s * d)?;
    let kt = mem.read(a.kt, a.elem, bh * d * sk)?;
    let v = mem.read(a.v, a.elem, bh * sk * dv)?;
    let mask = match &a.mask {
        Some(m) => {
            float(m.elem, "attention mask")?;
            if m.strides.iter().any(|&st| st < 0) {
                return Err(invalid(format!("attention mask strides {:?}", m.strides)));
            }
            let dims = [a.batch, a.heads, s, sk];
            let hi: i64 = dims.iter().zip(m.strides).map(|(&n, st)| (n.max(1) as i64 - 1) * st).sum();
            let len = if bh * s * sk == 0 { 0 } else { hi as usize + 1 };
            disjoint("attention mask", (m.ptr, len * m.elem.size()), out)?;
            Some((mem.read(m.ptr, m.elem, len)?, m.strides))
        }
        None => None,
    };
    let mut y = vec![0.0f32; bh * s * dv];
    let mut p = vec![0.0f32; sk];
    for g in 0..bh {
        let (b, h) = (g / a.heads.max(1), g % a.heads.max(1));
        for i in 0..s {
            for (j, pj) in p.iter_mut().enumerate() {
                let dot: f32 = (0..d).map(|t| q[(g * s + i) * d + t] * kt[(g * d + t) * sk + j]).sum();
                *pj = dot * a.scale;
                if let Some((m, st)) = &mask {
                    let at = b as i64 * st[0] + h as i64 * st[1] + i as i64 * st[2] + j as i64 * st[3];
                    *pj += m[at as usize];
                }
            }
            if a.zero_masked_rows && p.iter().all(|&x| x == f32::NEG_INFINITY) {
                continue;
            }
            softmax_row(&mut p);
            let out = &mut y[(g * s + i) * dv..(g * s + i + 1) * dv];
            for (j, &pj) in p.iter().enumerate() {
                for (o, &vv) in out.iter_mut().zip(&v[(g * sk + j) * dv..(g * sk + j + 1) * dv]) {
                    *o += pj * vv;
                }
            }
        }
    }
    mem.write(a.y, a.elem, &y)
}
